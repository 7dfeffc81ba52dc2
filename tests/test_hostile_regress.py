"""Hostile tables and arguments for regress and predict: exit 2 with one line naming the column and a bad value,
or rows dropped with a note; never an internal error, and never NaN (or a number for an undefined R^2) printed or
written as a result. A feature table that its provenance says another encoder made is refused; one whose encoder
is not known is used with a warning."""

from __future__ import annotations

import hashlib
import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from hagan_clinic import regression
from hagan_clinic.cli import main
from hagan_clinic.io.files import read_provenance, write_json, write_table
from hagan_clinic.io.model_file import load_bundle

from conftest import assert_refused

N = 20


@pytest.fixture(autouse=True)
def _fewer_bootstrap_draws(monkeypatch):
    monkeypatch.setattr(regression, "BOOTSTRAP", 100)


@pytest.fixture
def tables(tmp_path):
    """features.csv (20 patients, z0..z3) and clinical.csv with a target y linear in z0 and GOLD stages 0-3 in
    'stage' (not the default 'gold': the GOLD classifier runs only where a test asks for it);
    returns a writer of variants: write(features=..., **clinical columns) -> (features path, clinical path)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 4))
    ids = [f"P{i:02d}" for i in range(N)]
    features = pd.DataFrame(x, columns=[f"z{i}" for i in range(4)])
    features.insert(0, "patient_id", ids)
    clinical = pd.DataFrame({"patient_id": ids, "y": x[:, 0] + rng.normal(0, 0.1, N), "stage": np.arange(N) % 4})

    def write(features_table: pd.DataFrame | None = None, **columns) -> tuple[str, str]:
        (features if features_table is None else features_table).to_csv(tmp_path / "features.csv", index=False)
        clinical.assign(**columns).to_csv(tmp_path / "clinical.csv", index=False)
        return str(tmp_path / "features.csv"), str(tmp_path / "clinical.csv")

    write.features, write.clinical = features, clinical
    return write


def regress(capsys, files: tuple[str, str], *args: str) -> tuple[int, str, str]:
    features, clinical = files
    code = main(["regress", "--features", features, "--clinical", clinical, "--out", "out", "--no-tracking",
                 "--folds", "3", *args])  # fmt: skip
    out, err = capsys.readouterr()
    return code, out, err


def strict_json(path) -> dict:
    def refuse(constant: str):
        raise AssertionError(f"{path} holds {constant}")

    return json.loads(path.read_text(), parse_constant=refuse)


# ---------------------------------------------------------------- GOLD
@pytest.mark.slow
@pytest.mark.parametrize(
    ("values", "shown"),
    [([7] * N, "7"), ([2.5] * N, "2.5"), (["severe"] * N, "'severe'"), ([1e308] * N, "1e+308")],
    ids=["seven", "fraction", "text", "huge"],
)
def test_a_gold_column_without_any_stage_is_refused_with_an_example(capsys, tables, values, shown):
    code, _, err = regress(capsys, tables(stage=values), "--targets", "y", "--gold-column", "stage")
    assert_refused(code, err, "'stage'", "no GOLD stage", shown)


@pytest.mark.slow
def test_gold_rows_without_a_stage_are_dropped_with_a_note_naming_a_value(capsys, tables, tmp_path):
    stage = tables.clinical["stage"].to_numpy(dtype=object, copy=True)
    stage[[1, 6]] = [7, "severe"]
    code, out, err = regress(capsys, tables(stage=stage), "--targets", "y", "--gold-column", "stage")
    assert code == 0, err
    assert "note: 2 of 20 rows of 'stage' hold no GOLD stage" in out
    assert "(e.g. '7')" in out  # a column of numbers and text is read as text
    assert strict_json(tmp_path / "out" / "metrics.json")["gold"]["classifier"]["n"] == 18


@pytest.mark.slow
def test_a_gold_column_of_prism_only_has_nothing_to_classify(capsys, tables):
    code, _, err = regress(capsys, tables(stage=[-1] * N), "--targets", "y", "--gold-column", "stage")
    assert_refused(code, err, "'stage'", "one GOLD stage")


@pytest.mark.slow
def test_a_gold_stage_known_for_too_few_patients_is_refused(capsys, tables):
    stage = [0, 1, 2, 3] + [None] * (N - 4)
    code, _, err = regress(capsys, tables(stage=stage), "--targets", "y", "--gold-column", "stage")
    assert_refused(code, err, "'stage'")


# ---------------------------------------------------------------- values beyond any measure
def test_a_target_of_1e308_is_refused_naming_column_and_value(capsys, tables):
    y = tables.clinical["y"].to_numpy(copy=True)
    y[4] = 1e308
    code, _, err = regress(capsys, tables(y=y), "--targets", "y")
    assert_refused(code, err, "'y'", "1e+308")


def test_a_feature_of_1e300_is_refused_naming_column_and_value(capsys, tables):
    features = tables.features.copy()
    features.loc[3, "z1"] = 1e300
    code, _, err = regress(capsys, tables(features), "--targets", "y")
    assert_refused(code, err, "feature column 'z1'", "1e+300")


@pytest.mark.slow
def test_predict_refuses_a_feature_of_1e300(capsys, tables, tmp_path):
    assert regress(capsys, tables(), "--targets", "y")[0] == 0
    features = tables.features.copy()
    features.loc[0, "z2"] = -1e300
    features.to_csv(tmp_path / "new.csv", index=False)
    code = main(["predict", "--model", "out/model.skops", "--features", "new.csv", "--out", "p.csv"])
    assert_refused(code, capsys.readouterr().err, "feature column 'z2'", "-1e+300")
    assert not (tmp_path / "p.csv").exists()


@pytest.mark.slow
def test_a_target_of_tiny_values_is_scored_not_nan(capsys, tables, tmp_path):
    # squares of 1e-200 underflow to 0: R^2 as 1 - 0/0 was NaN; R^2 does not depend on the unit
    code, out, err = regress(capsys, tables(y=tables.clinical["y"] * 1e-200), "--targets", "y")
    assert code == 0, err
    assert "nan" not in out.lower()
    assert strict_json(tmp_path / "out" / "metrics.json")["targets"]["y"]["r2"] > 0.9


# ---------------------------------------------------------------- undefined R^2
@pytest.mark.parametrize("offset", [0.0, 1e-15], ids=["constant", "constant-to-rounding"])
def test_a_constant_target_is_refused_never_scored(capsys, tables, tmp_path, offset):
    y = np.full(N, 5.0)
    y[1] += offset  # one value differs by rounding: 'R2 1.000' for model and baseline
    code, out, err = regress(capsys, tables(y=y), "--targets", "y")
    assert_refused(code, err, "'y'", "constant target", "R^2 is undefined")
    assert "r2" not in out
    assert not (tmp_path / "out" / "metrics.json").exists()


@pytest.mark.slow
def test_as_many_folds_as_patients_reports_the_pooled_r2_and_says_why_not_per_fold(capsys, tables, tmp_path):
    code, out, err = regress(capsys, tables(tables.features.head(8)), "--targets", "y", "--folds", "8")
    assert code == 0, err
    assert "nan" not in out.lower()
    assert "R^2 per fold is undefined" in out
    metrics = strict_json(tmp_path / "out" / "metrics.json")
    target = metrics["targets"]["y"]
    assert target["r2_fold_mean"] is None and target["r2_fold_sd"] is None
    assert np.isfinite(target["r2"])


# ---------------------------------------------------------------- arguments
def test_a_bad_feature_regex_is_a_clear_error(capsys, tables):
    code, _, err = regress(capsys, tables(), "--targets", "y", "--feature-regex", "(")
    assert_refused(code, err, "--feature-regex '('", "not a regular expression")


@pytest.mark.parametrize("seed", ["-5", "4294967296"])
def test_a_seed_out_of_range_is_a_clear_error(capsys, tables, seed):
    code, _, err = regress(capsys, tables(), "--targets", "y", "--seed", seed)
    assert_refused(code, err, "--seed", seed)


@pytest.mark.slow
def test_the_largest_seed_runs(capsys, tables):
    code, _, err = regress(capsys, tables(), "--targets", "y", "--seed", str(2**32 - 1))
    assert code == 0, err


# ---------------------------------------------------------------- what is written: file names and numbers
def test_a_hostile_target_name_gives_a_plain_plot_name_and_an_undefined_score_is_named():
    from hagan_clinic.pipelines.regress_report import check_finite, plot_name

    name = plot_name("../" * 100 + "fev1\n\0é")
    assert name.startswith("pred_vs_true_") and name.endswith(".png") and len(name) <= 117
    assert "/" not in name and name.isascii() and name.isprintable()
    check_finite({"targets": {"y": {"r2": 0.5, "r2_ci": [0.1, 0.9]}}})
    with pytest.raises(regression.RegressionError, match=r"metrics\.targets\.y\.r2_ci is nan"):
        check_finite({"targets": {"y": {"r2": 0.5, "r2_ci": [0.1, float("nan")]}}})


# ---------------------------------------------------------------- features of another encoder
#: Two checkpoints' SHA-256: every encoder names its features z0, z1, ..., so only the provenance tells them apart.
SHA_A, SHA_B = (hashlib.sha256(name).hexdigest() for name in (b"checkpoint A", b"checkpoint B"))
CONTRACT = {"modality": "CT", "window": [-1024.0, 600.0], "spacing_mm": [1.5, 1.5, 1.5], "size": 64, "resize": True}


def made_by(checkpoint_sha256: str) -> dict:
    """The provenance encode writes (its keys), for a table encoded by the checkpoint ``checkpoint_sha256``."""
    return {"package": "hagan-clinic 0", "checkpoint_sha256": checkpoint_sha256, "checkpoint": "model.pt",
            "model_version": "unregistered", "data_contract": CONTRACT, "preprocessing": {}, "encode": {},
            "command_line": "encode"}  # fmt: skip


@pytest.fixture(scope="module")
def fitted_on_a(tmp_path_factory):
    """The folder of one regress (``out/``) on features.parquet, whose provenance names checkpoint A; returns the
    folder and the feature table."""
    root = tmp_path_factory.mktemp("encoder_a")
    rng = np.random.default_rng(1)
    x = rng.normal(size=(N, 4))
    features = pd.DataFrame(x, columns=[f"z{i}" for i in range(4)])
    features.insert(0, "patient_id", [f"P{i:02d}" for i in range(N)])
    write_table(root / "features.parquet", features, "parquet", provenance=made_by(SHA_A))
    pd.DataFrame({"patient_id": features["patient_id"], "y": x[:, 0] + rng.normal(0, 0.1, N)}).to_csv(
        root / "clinical.csv", index=False
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setattr(regression, "BOOTSTRAP", 100)
        argv = ["regress", "--features", "features.parquet", "--clinical", "clinical.csv", "--targets", "y",
                "--folds", "3", "--out", "out", "--no-tracking"]  # fmt: skip
        assert main(argv) == 0
    return SimpleNamespace(model=str(root / "out" / "model.skops"), out=root / "out", features=features)


def predict(capsys, model: str, features: str, out: str) -> tuple[int, str]:
    code = main(["predict", "--model", model, "--features", features, "--out", out])
    return code, capsys.readouterr().err


def test_regress_records_the_encoder_of_its_features(fitted_on_a):
    assert strict_json(fitted_on_a.out / "metrics.json")["features"]["checkpoint_sha256"] == SHA_A
    bundle = load_bundle(fitted_on_a.model)
    assert (bundle.checkpoint_sha256, bundle.data_contract) == (SHA_A, CONTRACT)


def test_predict_refuses_features_of_another_encoder_under_the_same_names(capsys, fitted_on_a, tmp_path):
    write_table(tmp_path / "b.parquet", fitted_on_a.features, "parquet", provenance=made_by(SHA_B))
    code, err = predict(capsys, fitted_on_a.model, "b.parquet", "p.parquet")
    assert_refused(code, err, "b.parquet", f"checkpoint {SHA_B[:12]}", f"checkpoint {SHA_A[:12]}")
    # a CSV table's provenance is the record beside it
    fitted_on_a.features.to_csv(tmp_path / "b.csv", index=False)
    write_json(tmp_path / "b.provenance.json", made_by(SHA_B))
    code, err = predict(capsys, fitted_on_a.model, "b.csv", "p.csv")
    assert_refused(code, err, f"checkpoint {SHA_B[:12]}", f"checkpoint {SHA_A[:12]}")
    assert not (tmp_path / "p.parquet").exists() and not (tmp_path / "p.csv").exists()


def test_predict_on_features_of_the_same_encoder_is_checked(capsys, fitted_on_a, tmp_path):
    write_table(tmp_path / "a.parquet", fitted_on_a.features, "parquet", provenance=made_by(SHA_A))
    code, err = predict(capsys, fitted_on_a.model, "a.parquet", "p.parquet")
    assert code == 0, err
    assert "could not be checked" not in err
    made = read_provenance(tmp_path / "p.parquet")
    assert made["encoder_checked"] is True and made["checkpoint_sha256"] == SHA_A


def test_predict_on_a_table_made_by_hand_warns_that_the_encoder_could_not_be_checked(capsys, fitted_on_a, tmp_path):
    fitted_on_a.features.to_csv(tmp_path / "hand.csv", index=False)  # no provenance, none beside it
    code, err = predict(capsys, fitted_on_a.model, "hand.csv", "p.parquet")
    assert code == 0, err
    warning = [line for line in err.splitlines() if "could not be checked" in line]
    assert len(warning) == 1 and warning[0].startswith("warning: the encoder of hand.csv"), err
    assert f"checkpoint {SHA_A[:12]}" in warning[0]
    assert len(pd.read_parquet(tmp_path / "p.parquet")) == N
    assert read_provenance(tmp_path / "p.parquet")["encoder_checked"] is False
