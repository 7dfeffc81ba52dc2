"""The model file of ``regress`` (model.skops) and its MLflow side: ``predict`` from the file or from the run's URI
gives the predictions of the fitted models; a pickle, a type skops does not trust, a callable and an oversized zip
are refused in one line before anything runs (a file that would be written stays unwritten); the feature table's
digest travels into every output, and the encoder of the training features into the bundle; each fitted model is
logged with mlflow.sklearn in the skops format, with its scale (a log target's model predicts the log) said."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import skops.io

from hagan_clinic import regression
from hagan_clinic.errors import HaganError
from hagan_clinic.io import model_file
from hagan_clinic.io.files import read_provenance
from hagan_clinic.io.model_file import RegressionBundle, load_bundle, save_bundle
from hagan_clinic.pipelines import regress as regress_pipeline

from conftest import assert_refused, run_cli

N, D = 24, 4
COLUMNS = [f"z{i}" for i in range(D)]


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def feature_table(x: np.ndarray, prefix: str = "P") -> pd.DataFrame:
    table = pd.DataFrame(x, columns=COLUMNS)
    table.insert(0, "patient_id", [f"{prefix}{i:02d}" for i in range(len(x))])
    return table


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """24 patients, D = 4: ``y`` linear in the features, ``ypos`` (> 0, regressed on the log scale), GOLD 0-2;
    regressed once by the command with tracking on (a store of this module), 3 folds. ``bundle``: the bundle as
    regress held it in memory, before it was written."""
    root = tmp_path_factory.mktemp("fitted")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, D))
    features = feature_table(x)
    clinical = pd.DataFrame({
        "patient_id": features["patient_id"], "y": 3 * x[:, 0] - x[:, 1] + rng.normal(0, 0.1, N),
        "ypos": np.exp(0.5 * x[:, 2] + rng.normal(0, 0.05, N)), "gold": np.digitize(x[:, 3], [-0.5, 0.5]),
    })  # fmt: skip
    features.to_csv(root / "features.csv", index=False)
    clinical.to_csv(root / "clinical.csv", index=False)
    uri = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    held: list[RegressionBundle] = []

    def keep(bundle, path, guard=None):
        held.append(bundle)
        save_bundle(bundle, path, guard)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.chdir(root)
        mp.setattr(regression, "BOOTSTRAP", 100)
        mp.setattr(regress_pipeline, "save_bundle", keep)
        from hagan_clinic.cli import main

        argv = ["regress", "--features", "features.csv", "--clinical", "clinical.csv", "--targets", "y,ypos",
                "--log-targets", "ypos", "--folds", "3", "--out", "out"]  # fmt: skip
        assert main(argv) == 0
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("hagan-clinic").experiment_id])
    return SimpleNamespace(root=root, out=root / "out", uri=uri, bundle=held[0], run=runs[0], client=client)


def new_table(path: Path, rows: int = 9) -> pd.DataFrame:
    table = feature_table(np.random.default_rng(5).normal(size=(rows, D)), "N")
    table.to_csv(path, index=False)
    return table


def predict(capsys, model: str | Path, out: str = "p.parquet") -> tuple[int, str]:
    code, _, err = run_cli(capsys, "predict", "--model", model, "--features", "new.csv", "--out", out)
    return code, err


# ---------------------------------------------------------------- the round trip
def test_predict_from_the_file_gives_the_predictions_of_the_fitted_models(fitted, capsys, tmp_path):
    new = new_table(tmp_path / "new.csv")
    code, err = predict(capsys, fitted.out / "model.skops")
    assert code == 0, err
    got = pd.read_parquet(tmp_path / "p.parquet")
    assert got["patient_id"].tolist() == new["patient_id"].tolist()
    x, models = new[COLUMNS].to_numpy(), fitted.bundle.models
    assert set(models) == {"y", "ypos", "gold"}
    # the same arrays through the same code; only the BLAS's order of summation may differ between two copies
    np.testing.assert_allclose(got["y_pred"], models["y"].predict(x), rtol=1e-12)
    np.testing.assert_allclose(got["ypos_pred"], np.exp(models["ypos"].predict(x)), rtol=1e-12)
    assert got["gold_pred"].tolist() == [str(g) for g in models["gold"].predict(x)]
    loaded = load_bundle(fitted.out / "model.skops")
    assert (loaded.feature_columns, loaded.targets, loaded.log_targets) == (COLUMNS, ["y", "ypos"], ["ypos"])
    for name, model in models.items():
        assert type(loaded.models[name]) is type(model)
        assert loaded.models[name].get_params().keys() == model.get_params().keys()


def test_the_feature_tables_digest_is_in_every_output(fitted, capsys, tmp_path):
    digest = sha256(fitted.root / "features.csv")
    features = json.loads((fitted.out / "metrics.json").read_text())["features"]
    assert features["sha256"] == digest
    assert features["checkpoint_sha256"] is None  # a table made by hand names no encoder
    assert load_bundle(fitted.out / "model.skops").features_sha256 == fitted.bundle.features_sha256 == digest
    assert fitted.run.data.params["features_sha256"] == digest
    new_table(tmp_path / "new.csv")
    assert predict(capsys, fitted.out / "model.skops")[0] == 0
    made = read_provenance(tmp_path / "p.parquet")
    assert made["training_features_sha256"] == digest
    assert made["model_sha256"] == sha256(fitted.out / "model.skops")
    assert made["features_sha256"] == sha256(tmp_path / "new.csv")


# ---------------------------------------------------------------- MLflow
def test_a_tracked_regress_logs_each_model_with_mlflow_sklearn_in_the_skops_format(fitted, monkeypatch, tmp_path):
    from mlflow.artifacts import download_artifacts
    from mlflow.models import Model

    monkeypatch.setenv("MLFLOW_TRACKING_URI", fitted.uri)
    run = fitted.run
    logged = fitted.client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert sorted(m.name for m in logged) == ["gold", "y", "ypos"]
    assert {m.source_run_id for m in logged} == {run.info.run_id}
    for found in logged:
        model = Model.load(f"models:/{found.model_id}")
        flavor = model.flavors["sklearn"]
        assert flavor["serialization_format"] == "skops" and flavor["pickled_model"].endswith(".skops")
        assert model.signature.inputs.input_names() == COLUMNS
        assert model.saved_input_example_info is not None
        assert found.tags["target"] == found.name
        # the logged file needs no trust beyond skops' own
        local = download_artifacts(f"{found.artifact_location}/{flavor['pickled_model']}", dst_path=str(tmp_path))
        assert skops.io.get_untrusted_types(file=local) == []
    artifacts = {a.path for a in fitted.client.list_artifacts(run.info.run_id, "regress")}
    assert "regress/model.skops" in artifacts and "regress/model.joblib" not in artifacts


@pytest.mark.filterwarnings("ignore:X has feature names")  # fitted on arrays; pyfunc passes the DataFrame on
def test_a_logged_model_says_its_scale_and_pyfunc_gives_a_log_targets_log(fitted, monkeypatch):
    import mlflow.pyfunc
    from mlflow.models import Model

    monkeypatch.setenv("MLFLOW_TRACKING_URI", fitted.uri)
    logged = {m.name: m for m in fitted.client.search_logged_models(experiment_ids=[fitted.run.info.experiment_id])}
    expected = {
        "y": ("y", {"target": "y", "scale": "linear"}),
        "ypos": ("log_ypos", {"target": "ypos", "scale": "log", "inverse": "exp"}),
        "gold": ("gold_code", {"target": "gold", "scale": "class"}),
    }
    for name, (output, tags) in expected.items():
        found = logged[name]
        model = Model.load(f"models:/{found.model_id}")
        assert model.signature.outputs.input_names() == [output]
        assert {key: found.tags.get(key) for key in tags} == tags
        assert ("inverse" in found.tags) == (tags["scale"] == "log")
        assert model.metadata["output"] == output and model.metadata["scale"] == tags["scale"]
    codes = logged["gold"].tags["codes"]  # what the classifier's integers mean
    assert f"{regression.PRISM}: PRISm" in codes and all(str(c) in codes for c in regression.GOLD_CODES)
    # as an MLflow user loads it: the log of ypos, whose exp is what predict writes
    x = feature_table(np.random.default_rng(5).normal(size=(3, D)))[COLUMNS]
    log_ypos = mlflow.pyfunc.load_model(f"models:/{logged['ypos'].model_id}").predict(x)
    np.testing.assert_allclose(np.asarray(log_ypos), fitted.bundle.models["ypos"].predict(x.to_numpy()), rtol=1e-12)


def test_predict_from_the_run_uri_equals_predict_from_the_file(fitted, capsys, monkeypatch, tmp_path):
    new_table(tmp_path / "new.csv")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", fitted.uri)
    code, err = predict(capsys, f"runs:/{fitted.run.info.run_id}", "from_run.parquet")
    assert code == 0, err
    assert "Downloading" not in err  # no progress bar for one small file
    assert predict(capsys, fitted.out / "model.skops", "from_file.parquet")[0] == 0
    from_run, from_file = (pd.read_parquet(tmp_path / f"from_{k}.parquet") for k in ("run", "file"))
    pd.testing.assert_frame_equal(from_run, from_file)
    made = read_provenance(tmp_path / "from_run.parquet")
    assert made["model"] == f"runs:/{fitted.run.info.run_id}"
    assert made["model_sha256"] == sha256(fitted.out / "model.skops")
    # the pipeline's tracking_uri wins over the environment's store
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    uri = f"runs:/{fitted.run.info.run_id}/regress/model.skops"
    result = regress_pipeline.predict(uri, "new.csv", "again.parquet", tracking_uri=fitted.uri)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "again.parquet"), from_file)
    assert len(result.table) == len(from_file)


def test_a_model_uri_that_names_no_model_file_is_one_line(fitted, capsys, monkeypatch, tmp_path):
    new_table(tmp_path / "new.csv")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", fitted.uri)
    run_id = fitted.run.info.run_id
    cases = [
        ("runs:/0123456789abcdef0123456789abcdef", ("no run 0123456789abcdef0123456789abcdef",)),
        ("runs:/", ("not a run's model URI",)),
        (f"runs:/{run_id}/../x.skops", ("not a run's model URI",)),
        ("models:/regress/1", ("runs:/RUN_ID",)),
        (f"runs:/{run_id}/regress/other.skops", ("has no model file regress/other.skops",)),
        (f"runs:/{run_id}/regress/metrics.json", (f"runs:/{run_id}/regress/metrics.json", "not a skops model file")),
    ]
    for model, needles in cases:
        code, err = predict(capsys, model)
        assert_refused(code, err, *needles)
        assert "hagan-clinic-model-" not in err  # the temporary download is never named
    assert not (tmp_path / "p.parquet").exists()
    missing = tmp_path / "nowhere" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{missing}")
    code, err = predict(capsys, f"runs:/{run_id}")
    assert_refused(code, err, "no tracking store")
    assert not missing.parent.exists()  # refused, not created


def test_a_run_without_a_model_file_is_one_line(capsys, tmp_path):
    from mlflow import MlflowClient

    new_table(tmp_path / "new.csv")
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])  # conftest's store of this test
    run = client.create_run(client.create_experiment("other"))
    code, err = predict(capsys, f"runs:/{run.info.run_id}")
    assert_refused(code, err, "has no model file regress/model.skops")


# ---------------------------------------------------------------- files that must never run
class WritesFiles:
    """Unpickled, writes ``marker`` through pathlib and creates ``marker``.touched through the shell."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"import os, pathlib; pathlib.Path({str(self.marker)!r}).write_text('owned'); "
                       f"os.system('touch {self.marker}.touched')",))  # fmt: skip


@pytest.mark.parametrize("name", ["model.joblib", "model.skops", "model.pkl"])
def test_a_malicious_pickle_is_never_unpickled(capsys, tmp_path, name):
    marker = tmp_path / "owned.txt"
    payload = pickle.dumps(WritesFiles(marker), protocol=4)
    pickle.loads(payload)  # the payload is live: unpickled, it writes both files
    assert marker.exists() and Path(f"{marker}.touched").exists()
    marker.unlink(), Path(f"{marker}.touched").unlink()
    (tmp_path / name).write_bytes(payload)
    new_table(tmp_path / "new.csv")
    code, err = predict(capsys, name)
    assert not marker.exists() and not Path(f"{marker}.touched").exists()
    needles = ("not a skops model file", "run regress again") if name.endswith(".joblib") else ("is a pickle",)
    assert_refused(code, err, name, *needles)
    assert not (tmp_path / "p.parquet").exists()


def test_a_model_joblib_of_an_older_regress_is_refused_not_loaded(capsys, tmp_path):
    import joblib
    from sklearn.dummy import DummyRegressor

    x = np.zeros((2, D))
    bundle = {"models": {"y": DummyRegressor().fit(x, [0, 1])}, "feature_columns": COLUMNS,
              "id_column": "patient_id", "log_targets": [], "targets": ["y"]}  # fmt: skip
    joblib.dump(bundle, tmp_path / "model.joblib")
    new_table(tmp_path / "new.csv")
    assert_refused(*predict(capsys, "model.joblib"), "not a skops model file; run regress again")


def _schema(data: bytes) -> dict:
    return json.loads(zipfile.ZipFile(io.BytesIO(data)).read("schema.json"))


def _with_schema(data: bytes, schema: dict) -> bytes:
    """The skops file ``data`` with its schema.json replaced."""
    source, out = zipfile.ZipFile(io.BytesIO(data)), io.BytesIO()
    with zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            body = json.dumps(schema) if info.filename == "schema.json" else source.read(info.filename)
            target.writestr(info.filename, body)
    return out.getvalue()


class Trap:
    """A class of no library: constructed by skops, it would write its ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __getstate__(self):
        return {"marker": self.marker}

    def __setstate__(self, state):
        Path(state["marker"]).write_text("owned")


def _bundle_bytes(model) -> bytes:
    bundle = RegressionBundle({"y": model}, COLUMNS, "patient_id", ["y"], [], "0" * 64)
    return skops.io.dumps(bundle.as_dict())


def _calls_numpy_save(marker: Path) -> bytes:
    """A bundle whose model is a node that skops builds by calling numpy.save(marker, [1, 2]): trusting every
    numpy name would write the file while loading."""
    from sklearn.dummy import DummyRegressor

    data = _bundle_bytes(DummyRegressor().fit(np.zeros((2, D)), [0, 1]))
    schema = _schema(data)
    args = _schema(skops.io.dumps((str(marker), [1, 2])))
    args.pop("protocol", None), args.pop("_skops_version", None)
    node = {"__class__": "save", "__module__": "numpy", "__loader__": "ConstructorFromReduceNode", "content": args}
    schema["content"]["models"]["content"]["y"] = {**node, "__id__": 1}
    return _with_schema(data, schema)


def _crafted(kind: str, marker: Path) -> bytes:
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer

    x = np.zeros((3, D))
    if kind == "class of no library":
        return _bundle_bytes(Trap(marker))
    if kind == "numpy.save called while loading":
        return _calls_numpy_save(marker)
    if kind == "os.system as a function":
        return _bundle_bytes(make_pipeline(FunctionTransformer(os.system)))
    # a ufunc skops trusts by itself, which predict would call on the features
    return _bundle_bytes(make_pipeline(FunctionTransformer(np.log)).fit(x))


@pytest.mark.parametrize(
    "kind, needles",
    [
        ("class of no library", ("test_regress_model.Trap", "not loaded")),
        ("numpy.save called while loading", ("numpy.save", "not loaded")),
        ("os.system as a function", ("system", "not loaded")),
        ("numpy ufunc as a function", ("callable", "numpy.log", "data only")),
    ],
)
def test_a_skops_file_naming_what_no_model_holds_is_refused_before_anything_runs(capsys, tmp_path, kind, needles):
    marker = tmp_path / "owned.npy"  # numpy.save adds .npy to any other name
    (tmp_path / "model.skops").write_bytes(_crafted(kind, marker))
    if kind == "numpy.save called while loading":  # the file is live: with numpy.save trusted it writes the marker
        skops.io.loads((tmp_path / "model.skops").read_bytes(), trusted=["numpy.save"])
        assert marker.exists()
        marker.unlink()
    new_table(tmp_path / "new.csv")
    code, err = predict(capsys, "model.skops")
    assert not marker.exists()
    assert_refused(code, err, "model.skops", *needles)
    assert not (tmp_path / "p.parquet").exists()


# ---------------------------------------------------------------- bounds and damage
def _real_bundle() -> bytes:
    from sklearn.linear_model import Ridge

    return _bundle_bytes(Ridge().fit(np.random.default_rng(0).normal(size=(5, D)), np.arange(5.0)))


def _deflated_zeros(size: int) -> bytes:
    """A zip whose one entry unpacks to ``size`` zero bytes (a zip bomb at scale), with a skops schema."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as target:
        target.writestr("schema.json", json.dumps({"protocol": 2}))
        target.writestr("zeros.npy", b"\0" * size)
    return out.getvalue()


@pytest.mark.parametrize(
    "limit, value, data, needle",
    [
        ("MAX_MODEL_BYTES", 1000, _real_bundle, "MiB"),
        ("MAX_MEMBERS", 1, _real_bundle, "entries"),
        ("MAX_DIRECTORY_BYTES", 100, _real_bundle, "zip directory"),
        ("MAX_UNPACKED_BYTES", 2**20, lambda: _deflated_zeros(2**21), "unpacks to 2 MiB"),
        ("MAX_SCHEMA_BYTES", 100, _real_bundle, "schema.json"),
    ],
)
def test_a_model_file_over_a_bound_is_refused_before_it_is_unpacked(monkeypatch, tmp_path, limit, value, data, needle):
    path = tmp_path / "model.skops"
    path.write_bytes(data())
    monkeypatch.setattr(model_file, limit, value)

    def unpacked(*args, **kwargs):
        raise AssertionError("unpacked")

    monkeypatch.setattr(skops.io, "get_untrusted_types", unpacked)
    monkeypatch.setattr(skops.io, "loads", unpacked)
    with pytest.raises(HaganError, match=needle):
        load_bundle(path)


@pytest.mark.parametrize(
    "data, needle",
    [
        (lambda: _real_bundle()[:-30], "no zip directory"),  # cut short
        (lambda: b"PK\x03\x04" + b"\0" * 100, "no zip directory"),
        (lambda: _deflated_zeros(10), "not a readable skops model file"),
        (lambda: skops.io.dumps({"models": {}}), "not a model file of hagan-clinic regress"),
        (lambda: skops.io.dumps([1, 2]), "not a model file of hagan-clinic regress"),
        (lambda: b"patient_id,z0\n", "not a skops model file"),
        (lambda: b"", "not a skops model file"),
    ],
    ids=["truncated", "no-directory", "no-skops-schema", "other-dict", "list", "csv", "empty"],
)
def test_a_damaged_or_foreign_file_is_one_line(tmp_path, data, needle):
    path = tmp_path / "model.skops"
    path.write_bytes(data())
    with pytest.raises(model_file.ModelFileError, match=needle) as caught:
        load_bundle(path)
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 300


def test_a_bundle_of_the_wrong_shape_is_refused(tmp_path):
    from sklearn.linear_model import Ridge

    ridge = Ridge().fit(np.zeros((3, D + 1)), [0.0, 1.0, 2.0])  # fitted on 5 features, the bundle names 4
    path = tmp_path / "model.skops"
    path.write_bytes(_bundle_bytes(ridge))
    with pytest.raises(model_file.ModelFileError, match="no estimator fitted on 4 features"):
        load_bundle(path)
    good = RegressionBundle({"y": Ridge().fit(np.zeros((3, D)), [0.0, 1.0, 2.0])}, COLUMNS, "id", ["y"], [], "0" * 64)
    for change, needle in [
        ({"targets": ["y", "y"]}, "distinct names"),
        ({"log_targets": ["other"]}, "log target that is no target"),
        ({"features_sha256": "abc"}, "not a SHA-256"),
        ({"checkpoint_sha256": "ABC"}, "checkpoint_sha256 is neither a SHA-256 nor None"),
        ({"data_contract": {"window": (1, 2)}}, "data_contract is neither a mapping"),
        ({"format": "hagan-clinic-regress/0"}, "run regress again"),
        ({"models": {"y": good.models["y"], "extra": good.models["y"]}}, "one per target"),
    ]:
        path.write_bytes(skops.io.dumps({**good.as_dict(), **change}))
        with pytest.raises(model_file.ModelFileError, match=needle):
            load_bundle(path)


def test_a_model_file_of_the_earlier_format_is_refused_run_regress_again(capsys, tmp_path):
    from sklearn.linear_model import Ridge

    # the layout before the encoder of the training features was recorded
    old = {"format": "hagan-clinic-regress/1", "models": {"y": Ridge().fit(np.zeros((3, D)), [0.0, 1.0, 2.0])},
           "feature_columns": COLUMNS, "id_column": "patient_id", "targets": ["y"], "log_targets": [],
           "features_sha256": "0" * 64}  # fmt: skip
    (tmp_path / "model.skops").write_bytes(skops.io.dumps(old))
    new_table(tmp_path / "new.csv")
    assert_refused(*predict(capsys, "model.skops"), "format 'hagan-clinic-regress/1'", "run regress again")
    assert not (tmp_path / "p.parquet").exists()


# ---------------------------------------------------------------- the encoder of a feature table
SHA_A, SHA_B = "a" * 64, "b" * 64


def test_a_tables_encoder_is_read_from_its_metadata_else_the_record_beside_it(tmp_path):
    from hagan_clinic.io.files import write_json, write_table

    table = feature_table(np.zeros((2, D)))
    contract = {"modality": "CT", "window": [-1024, 600], "spacing_mm": None}
    write_table(tmp_path / "f.parquet", table, "parquet", provenance={"checkpoint_sha256": SHA_A,
                                                                      "data_contract": contract})  # fmt: skip
    write_json(tmp_path / "f.provenance.json", {"checkpoint_sha256": SHA_B})  # the table's own metadata wins
    assert model_file.table_encoder(tmp_path / "f.parquet") == (SHA_A, contract)
    table.to_csv(tmp_path / "f.csv", index=False)
    assert model_file.table_encoder(tmp_path / "f.csv") == (SHA_B, None)
    table.to_csv(tmp_path / "hand.csv", index=False)
    assert model_file.table_encoder(tmp_path / "hand.csv") == (None, None)
    for beside in ["{not json", '["a list"]', json.dumps({"checkpoint_sha256": "A" * 64, "data_contract": [1]})]:
        (tmp_path / "hand.provenance.json").write_text(beside)
        assert model_file.table_encoder(tmp_path / "hand.csv") == (None, None)  # said in no usable form: unknown
    (tmp_path / "hand.provenance.json").unlink()
    os.mkfifo(tmp_path / "hand.provenance.json")  # never opened: it would block
    assert model_file.table_encoder(tmp_path / "hand.csv") == (None, None)


def test_the_encoder_is_checked_when_both_sides_name_one_and_another_is_refused():
    from dataclasses import replace

    from sklearn.dummy import DummyRegressor

    bundle = RegressionBundle({"y": DummyRegressor().fit(np.zeros((2, D)), [0, 1])}, COLUMNS, "patient_id", ["y"],
                              [], "0" * 64, checkpoint_sha256=SHA_A)  # fmt: skip
    assert model_file.check_encoder(bundle, "f.parquet", SHA_A) is True
    assert model_file.check_encoder(bundle, "f.parquet", None) is False
    assert model_file.check_encoder(replace(bundle, checkpoint_sha256=None), "f.parquet", SHA_B) is False
    with pytest.raises(model_file.EncoderMismatch, match=f"checkpoint {SHA_B[:12]}.*checkpoint {SHA_A[:12]}"):
        model_file.check_encoder(bundle, "f.parquet", SHA_B)
