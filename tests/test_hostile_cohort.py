"""The cohort pipelines against hostile input: a damaged or edited preprocess cache, non-finite numbers where a
grid, a feature or a QCT measure should be, a cache filled from two sources, and evaluate given a cache made for
another model. Bad cache files as a whole are one-line errors; a bad row or volume fails its series only."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from hagan_clinic.cli import main
from hagan_clinic.config import load_config
from hagan_clinic.io.dicom_write import write_series
from hagan_clinic.models.hagan import HAGAN
from hagan_clinic.phantoms import write_cohort

from conftest import run_cli

FAST = ("--workers", "0", "--no-tracking")
NON_FINITE_FEATURES = "non-finite features (NaN or inf from the encoder: a damaged checkpoint?)"
SIZE = 32  # the tiny config's grid


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort") / "phantoms"
    write_cohort(root, 3, seed=0, shape=(24, 48, 48), progress=False)
    return root


@pytest.fixture(scope="module")
def cache(cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "cache"
    assert main(["preprocess", str(cohort), "--out", str(out), "--config", "tiny"]) == 0
    return out


@pytest.fixture
def copy(cache, tmp_path):
    """A copy of the cache to damage."""
    return shutil.copytree(cache, tmp_path / "cache")


def encode(capsys, src, out, checkpoint, *args: str) -> tuple[int, str, str]:
    return run_cli(capsys, "encode", src, "--out", out, "--checkpoint", checkpoint, *FAST, *args)


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert err.strip().count("\n") == 0 and "Traceback" not in err, err
    assert "hagan-clinic: error:" in err and all(n in err for n in needles), err


def report_of(out) -> list[dict]:
    return pd.read_csv(out.with_name(f"{out.stem}.report.csv"), dtype=str, keep_default_na=False).to_dict("records")


def manifest_of(cache) -> pd.DataFrame:
    return pd.read_csv(cache / "manifest.csv", dtype=str, keep_default_na=False)


# ---------------------------------------------------------------- a cache's files as a whole: one-line errors
@pytest.mark.slow
@pytest.mark.parametrize("content", [b"\xff\xfe\x00garbage", b'{"contract": ', b"[1, 2]"])
def test_a_garbage_cache_json_is_a_one_line_error(capsys, copy, cohort, checkpoint, tmp_path, content):
    (copy / "cache.json").write_bytes(content)
    code, _, err = encode(capsys, copy, tmp_path / "f.parquet", checkpoint)
    assert_one_line_error(code, err, "cache.json")
    code, _, err = run_cli(capsys, "preprocess", cohort, "--out", copy, "--config", "tiny")
    assert_one_line_error(code, err, "cache.json")


@pytest.mark.parametrize(
    "damage, needle",
    [
        ("binary", "manifest.csv"),
        ("no path", "'path' column"),
        ("no status", "'status' column"),
        ("missing", "manifest.csv"),
    ],
)
def test_a_damaged_manifest_is_a_one_line_error(capsys, copy, checkpoint, tmp_path, damage, needle):
    manifest = copy / "manifest.csv"
    if damage == "binary":
        manifest.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif damage == "missing":
        manifest.unlink()
    else:
        table = manifest_of(copy)
        table.drop(columns=[damage.split()[1]]).to_csv(manifest, index=False)
    code, _, err = encode(capsys, copy, tmp_path / "f.parquet", checkpoint)
    assert_one_line_error(code, err, needle)


# ---------------------------------------------------------------- one bad row or volume: that series fails alone
@pytest.mark.slow
@pytest.mark.parametrize(
    "column, value, needle",
    [
        ("n_slices", "many", "n_slices"),
        ("slice_thickness_mm", "thick", "slice_thickness_mm"),
        ("slice_thickness_mm", "nan", "slice_thickness_mm"),
        ("path", "../../../etc/passwd", "not a file in the cache"),
        ("path", "volumes/gone.npy", "not a file in the cache"),
    ],
)
def test_a_bad_manifest_cell_fails_its_series_only(capsys, copy, checkpoint, tmp_path, column, value, needle):
    table = manifest_of(copy)
    table.loc[1, column] = value
    table.to_csv(copy / "manifest.csv", index=False)
    out = tmp_path / "f.parquet"
    code, stdout, err = encode(capsys, copy, out, checkpoint)
    assert code == 0, err
    assert "2 ok, 0 skipped, 1 failed" in stdout
    failed = [r for r in report_of(out) if r["status"] == "failed"]
    assert len(failed) == 1 and needle in failed[0]["reason"]
    assert failed[0]["series_uid"] == table.loc[1, "series_uid"]
    assert len(pd.read_parquet(out)) == 2


def _damage_volume(path, how: str) -> None:
    if how == "wrong shape":
        np.save(path, np.zeros((SIZE // 2,) * 3, np.float16))
    elif how == "wrong dtype":
        np.save(path, np.zeros((SIZE,) * 3, np.int32))
    elif how in ("nan", "inf"):
        vol = np.load(path)
        vol[3, 4, 5] = np.nan if how == "nan" else np.inf
        np.save(path, vol)
    elif how == "pickled objects":
        np.save(path, np.array([{"a": 1}] * 4, dtype=object), allow_pickle=True)
    elif how == "text":
        path.write_text("not an array")
    elif how == "archive":
        with open(path, "wb") as f:
            np.savez(f, a=np.zeros((SIZE,) * 3, np.float16))
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[:1000])


@pytest.mark.slow
@pytest.mark.parametrize(
    "how, needle",
    [
        ("wrong shape", "shape (16, 16, 16)"),
        ("wrong dtype", "dtype int32"),
        ("nan", "NaN or infinite"),
        ("inf", "NaN or infinite"),
        ("pickled objects", "cannot be read"),
        ("text", "cannot be read"),
        ("archive", "archive"),
        ("truncated", "cannot be read"),
    ],
)
def test_a_bad_cached_volume_fails_its_series_only(capsys, copy, checkpoint, tmp_path, how, needle):
    table = manifest_of(copy)
    _damage_volume(copy / table.loc[0, "path"], how)
    out = tmp_path / "f.parquet"
    code, stdout, err = encode(capsys, copy, out, checkpoint)
    assert code == 0, err
    assert "2 ok, 0 skipped, 1 failed" in stdout
    failed = [r for r in report_of(out) if r["status"] == "failed"]
    assert len(failed) == 1 and needle in failed[0]["reason"], failed
    assert failed[0]["series_uid"] == table.loc[0, "series_uid"]
    features = pd.read_parquet(out).filter(regex=r"^z\d+$").to_numpy()
    assert features.shape == (2, 32) and np.isfinite(features).all()


@pytest.mark.slow
def test_a_damaged_encode_state_is_encoded_again_or_refused(capsys, cohort, checkpoint, tmp_path):
    out = tmp_path / "f.parquet"
    assert encode(capsys, cohort, out, checkpoint)[0] == 0
    expected = pd.read_parquet(out)
    state = tmp_path / ".f.parquet.state"
    (state / "batch_000000.npz").write_bytes(b"PK\x03\x04 cut short")
    code, _, err = encode(capsys, cohort, out, checkpoint)
    assert code == 0, err
    assert pd.read_parquet(out).equals(expected)
    (state / "complete").unlink()  # an unfinished run whose settings cannot be read: its batches are not trusted
    (state / "settings.json").write_bytes(b"\xff{")
    code, _, err = encode(capsys, cohort, out, checkpoint)
    assert_one_line_error(code, err, "settings.json unreadable")


# ---------------------------------------------------------------- no non-finite number is ever 'ok'
def test_a_grid_with_nan_is_never_ok(capsys, monkeypatch, cohort, tmp_path):
    """Readers mark NaN voxels as unmeasured today; should a grid still hold NaN, its series fails, in preprocess
    and in encode alike (the model would turn it into NaN features)."""
    import hagan_clinic.preprocessing as preprocessing
    from hagan_clinic.pipelines.encode import prepare_one

    real = preprocessing.to_model_grid

    def poisoned(volume, cfg):
        grid, info = real(volume, cfg)
        grid[0, 0, 0] = np.nan
        return grid, info

    monkeypatch.setattr(preprocessing, "to_model_grid", poisoned)
    out = tmp_path / "cache"
    code, stdout, err = run_cli(capsys, "preprocess", cohort / "PH0001", "--out", out, "--config", "tiny")
    assert code == 0, err
    (row,) = manifest_of(out).to_dict("records")
    assert row["status"] == "failed" and "NaN" in row["reason"] and row["path"] == ""
    assert not list((out / "volumes").glob("*.npy"))

    from hagan_clinic.io.cohort import discover

    (record,) = discover(cohort / "PH0002", progress=False).ok
    prepared = prepare_one(record, load_config("tiny").to_dict(), qct=False)
    assert prepared["grid"] is None and prepared["row"]["status"] == "failed" and "NaN" in prepared["row"]["reason"]


def test_features_that_overflow_are_never_ok(capsys, cohort, tmp_path):
    """Finite but huge weights in the last encoder layer: the features overflow to inf; every row fails."""
    model = HAGAN.from_config(load_config("tiny"))
    with torch.no_grad():
        model.EG.out.weight.fill_(3e38)
    model.save(tmp_path / "overflow.pt")
    out = tmp_path / "f.parquet"
    code, stdout, err = encode(capsys, cohort, out, tmp_path / "overflow.pt")
    assert code == 0, err
    assert "0 ok, 0 skipped, 3 failed" in stdout
    assert {r["reason"] for r in report_of(out)} == {NON_FINITE_FEATURES}
    assert len(pd.read_parquet(out)) == 0


def _nan_measure(*args, **kwargs):
    return {"lung_volume_ml": 4000.0, "laa950_pct": 12.0, "perc15_hu": float("nan"), "warning": ""}


@pytest.mark.slow
def test_a_non_finite_qct_measure_is_never_reported(capsys, monkeypatch, cohort, checkpoint, tmp_path):
    """-inf voxels in the lungs give perc15 NaN (readers mark them unmeasured today); neither qct nor encode --qct
    may report such a number: the qct row fails, and encode leaves its QCT cells empty with a warning."""
    import hagan_clinic.qct as qct

    monkeypatch.setattr(qct, "measure_with_mask", lambda *a, **k: (_nan_measure(), np.ones((1, 1, 1), bool)))
    monkeypatch.setattr(qct, "measure", _nan_measure)
    out = tmp_path / "qct.csv"
    code, stdout, err = run_cli(capsys, "qct", cohort / "PH0001", "--out", out, "--config", "tiny")
    assert code == 0, err
    (row,) = pd.read_csv(out, dtype=str, keep_default_na=False).to_dict("records")
    assert row["status"] == "failed" and "perc15_hu" in row["reason"] and row["perc15_hu"] == ""

    out = tmp_path / "f.csv"
    code, stdout, err = encode(capsys, cohort / "PH0001", out, checkpoint, "--qct")
    assert code == 0, err
    (row,) = report_of(out)
    assert row["status"] == "ok" and "perc15_hu" in row["qct_warning"]
    assert row["lung_volume_ml"] == row["laa950_pct"] == row["perc15_hu"] == ""
    table = pd.read_csv(out)
    assert len(table) == 1 and table[["lung_volume_ml", "laa950_pct", "perc15_hu"]].isna().all(axis=None)


# ---------------------------------------------------------------- one cache, several runs
def _phantom(shape, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    grid = np.indices(shape).astype(np.float32)
    r2 = sum(((g - (n - 1) / 2) / (0.4 * n)) ** 2 for g, n in zip(grid, shape))
    return np.where(r2 < 1.0, rng.integers(-100, 200, shape), -1024).astype(np.float32)


def _two_patients(root, seed: int) -> None:
    """Two CT series whose UIDs do not depend on ``seed``; their images do."""
    for i in (1, 2):
        uids = {"study_uid": f"1.2.826.0.1.3680043.10.{i}.1", "series_uid": f"1.2.826.0.1.3680043.10.{i}.2"}
        write_series(root / f"p{i}", _phantom((16, 24, 32), seed + i), (10.0, 10.0, 10.0), patient_id=f"P{i}", **uids)


def test_a_cache_filled_from_two_sources_keeps_both(capsys, tmp_path):
    """Cohort B has cohort A's UIDs but other images: preprocessed into A's cache, B gets volumes of its own (not
    A's, reused under the same UIDs), and the manifest still lists A's volumes, which are still there, as
    superseded: one series counted twice would enter training and encoding twice."""
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "cache"
    _two_patients(a, seed=0)
    _two_patients(b, seed=10)
    assert run_cli(capsys, "preprocess", a, "--out", out, "--config", "tiny")[0] == 0
    first = manifest_of(out)
    assert run_cli(capsys, "preprocess", b, "--out", out, "--config", "tiny")[0] == 0
    second = manifest_of(out)
    assert len(second) == 4
    assert set(first["path"]) <= set(second["path"])  # A's rows are kept ...
    kept = second[second["path"].isin(first["path"])]
    assert (kept["notes"].str.contains("from an earlier run of this cache")).all()
    assert (kept["status"] == "skipped").all() and kept["reason"].str.startswith("superseded").all()
    new = second[~second["path"].isin(first["path"])]
    assert len(new) == 2 and set(new["series_uid"]) == set(first["series_uid"])  # ... and B's are new files
    assert (new["status"] == "ok").all()  # each series once among the ok rows
    for p_a, p_b in zip(sorted(first["path"]), sorted(new["path"])):
        assert not np.array_equal(np.load(out / p_a), np.load(out / p_b))


def test_a_series_gone_from_the_source_stays_in_the_manifest(capsys, tmp_path):
    src, out = tmp_path / "src", tmp_path / "cache"
    _two_patients(src, seed=0)
    assert run_cli(capsys, "preprocess", src, "--out", out, "--config", "tiny")[0] == 0
    shutil.rmtree(src / "p2")
    code, stdout, err = run_cli(capsys, "preprocess", src, "--out", out, "--config", "tiny")
    assert code == 0, err
    assert stdout.startswith("1 ok, 0 skipped, 0 failed")  # this run's series
    rows = manifest_of(out).to_dict("records")
    assert [r["patient_id"] for r in rows] == ["P1", "P2"]
    assert rows[1]["notes"] == "from an earlier run of this cache" and (out / rows[1]["path"]).is_file()
    assert run_cli(capsys, "preprocess", src, "--out", out, "--config", "tiny")[0] == 0  # the note is not repeated
    assert manifest_of(out).to_dict("records") == rows


# ---------------------------------------------------------------- evaluate: the cache must be the model's
@pytest.mark.slow
def test_evaluate_refuses_a_cache_made_for_another_contract(capsys, cohort, checkpoint, tmp_path):
    other = tmp_path / "other"
    overrides = ("--set", "data.spacing_mm=[10,10,10]")
    assert run_cli(capsys, "preprocess", cohort, "--out", other, "--config", "tiny", *overrides)[0] == 0
    args = ("--checkpoint", checkpoint, "--n", "2", "--no-tracking", "--out", tmp_path / "eval")
    code, _, err = run_cli(capsys, "evaluate", "--real", other, *args)
    assert_one_line_error(code, err, "data contract")
    (other / "cache.json").unlink()
    code, _, err = run_cli(capsys, "evaluate", "--real", other, *args)
    assert_one_line_error(code, err, "cache.json")
    (other / "cache.json").write_text(json.dumps({"contract": load_config("tiny").data_contract()}))
    (other / "manifest.csv").write_text("patient_id,series_uid\nP1,1.2\n")
    code, _, err = run_cli(capsys, "evaluate", "--real", other, *args)
    assert_one_line_error(code, err, "'path' column")


def test_a_fifo_among_the_cached_volumes_is_refused_by_training_and_augment(capsys, cohort, tmp_path):
    """Readers that take the manifest's paths (training's listing, augment) never open a FIFO put in a volume's
    place: they would block forever."""
    from hagan_clinic.config import load_config
    from hagan_clinic.data import VolumeFolder
    from hagan_clinic.errors import HaganError
    from hagan_clinic.pipelines.augment import load_real

    out = tmp_path / "cache"
    assert run_cli(capsys, "preprocess", cohort, "--out", out, "--config", "tiny")[0] == 0
    victim = sorted((out / "volumes").glob("*.npy"))[0]
    victim.unlink()
    os.mkfifo(victim)
    with pytest.raises(HaganError, match="not regular files"):
        VolumeFolder.from_config(load_config("tiny"), out)
    clinical = tmp_path / "clinical.csv"
    ids = [r["patient_id"] for r in manifest_of(out).to_dict("records") if r["status"] == "ok"]
    clinical.write_text("patient_id,label\n" + "".join(f"{p},{k % 2}\n" for k, p in enumerate(ids)))
    cfg = load_config("tiny", [f"augment.cache={out}", f"augment.clinical={clinical}"])
    with pytest.raises(HaganError, match="not regular files"):
        load_real(cfg)
