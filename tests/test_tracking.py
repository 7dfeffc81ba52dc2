"""Where the commands log, and what their outputs say about how they were made: a refused input creates no store;
``--tracking-uri`` beats the config's ``tracking.uri``, which beats ``MLFLOW_TRACKING_URI``; ``--no-tracking`` and
``tracking.enabled: false`` log nothing anywhere; a tracked encode records its data, its system metrics and a
provenance record (in the parquet metadata and beside the table) that keeps no salt, path or patient name; generated
NIfTI files name their model."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import nibabel as nib
import pandas as pd
import pydicom
import pytest

from hagan_clinic.models.hagan import HAGAN
from hagan_clinic.phantoms import write_cohort

from conftest import run_cli, tiny_config

SALT = "pepper-7c1e"
SECRET_FOLDER = "SECRETSITE_cohort"  # the source folder's name: a pseudonymised run must not write it anywhere
N_SERIES = 2
FAST = ("--workers", "0")  # reading in the main process skips the worker start-up
PROVENANCE_KEYS = {"package", "checkpoint_sha256", "checkpoint", "model_version", "data_contract", "preprocessing",
                   "encode", "command_line"}  # fmt: skip


# ---------------------------------------------------------------- fixtures and helpers
def sqlite_uri(folder: Path) -> str:
    return f"sqlite:///{folder / 'mlflow.db'}"


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(uri)


def runs_of(uri: str, experiment: str) -> list:
    """The runs of ``experiment`` in the store ``uri`` (an explicit store: mlflow's global URI is whatever the last
    Tracker set)."""
    c = client(uri)
    found = c.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment!r} in {uri}"
    return c.search_runs([found.experiment_id])


def experiments_in(folder: Path) -> set[str]:
    """The experiment names of the sqlite store in ``folder`` (empty when there is no store)."""
    if not (folder / "mlflow.db").exists():
        return set()
    return {e.name for e in client(sqlite_uri(folder)).search_experiments()} - {"Default"}


def empty_folder(tmp_path: Path, name: str = "cwd") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    return folder


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """Two phantom patients with a PatientName (PHANTOM^...) in every header, in a folder whose name is a secret."""
    root = tmp_path_factory.mktemp("cohort") / SECRET_FOLDER
    write_cohort(root, N_SERIES, seed=0, shape=(24, 48, 48), progress=False)
    return root


@pytest.fixture(scope="module")
def conditional(tmp_path_factory) -> Path:
    """An untrained tiny model of two classes (so a --label can be out of range)."""
    return HAGAN.from_config(tiny_config("model.num_classes=2")).save(tmp_path_factory.mktemp("cond") / "cond.pt")


@pytest.fixture(scope="module")
def tracked(cohort, checkpoint, tmp_path_factory):
    """One tracked encode into its own store, sampling system metrics every 0.2 s during a run of over a second.

    Module-scoped (set up before the per-test fixtures), so it sets its own folder, store and patches."""
    from hagan_clinic.cli import main
    from hagan_clinic.tracking import Tracker

    base = tmp_path_factory.mktemp("tracked")
    out, store, cwd = base / "out" / "features.parquet", base / "store", base / "cwd"
    cwd.mkdir()
    log_input = Tracker.log_input

    def slow_log_input(self, *args, **kwargs):  # keeps the run open long enough for a few samples
        log_input(self, *args, **kwargs)
        time.sleep(1.2)

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        mp.setattr("hagan_clinic.tracking.SYSTEM_METRICS_INTERVAL_S", 0.2)
        mp.setattr(Tracker, "log_input", slow_log_input)
        # mlflow keeps the interval in this variable: set here, so it is removed again afterwards
        mp.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
        mp.setenv("MLFLOW_TRACKING_URI", sqlite_uri(base / "env_store"))
        args = ["encode", str(cohort), "--checkpoint", str(checkpoint), "--out", str(out), *FAST,
                "--tracking-uri", sqlite_uri(store), "--experiment", "encode-test"]  # fmt: skip
        assert main(args) == 0
    assert not any(cwd.iterdir()) and not (base / "env_store").exists()  # the flag's store only
    return {"out": out, "uri": sqlite_uri(store), "args": args}


#: Where the checkpoint of the pseudonymised run says it was trained: its config's data.dir and data.table name
#: the training site, and must not reach a pseudonymised output (they are not preprocessing settings).
TRAINING_PLACES = ("/site/SECRETDIR", "/site/SECRETTABLE/train.csv")


@pytest.fixture(scope="module")
def pseudonymized(cohort, tmp_path_factory):
    """A tracked encode with --pseudonymize into its own store, by a model whose config names its training data."""
    from hagan_clinic.cli import main
    from hagan_clinic.models.hagan import HAGAN

    base = tmp_path_factory.mktemp("pseudo")
    checkpoint = base / "trained_at_site.pt"
    HAGAN.from_config(tiny_config(f"data.dir={TRAINING_PLACES[0]}", f"data.table={TRAINING_PLACES[1]}")).save(
        checkpoint
    )
    out, store = base / "out" / "features.parquet", base / "store"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(base)
        args = ["encode", str(cohort), "--checkpoint", str(checkpoint), "--out", str(out), *FAST,
                "--pseudonymize", SALT, "--tracking-uri", sqlite_uri(store), "--experiment", "pseudo"]  # fmt: skip
        assert main(args) == 0
    return {"out": out, "store": store, "uri": sqlite_uri(store), "checkpoint": checkpoint}


def encode_into(capsys, cohort, checkpoint, out: Path, *args: str) -> None:
    code, _, err = run_cli(capsys, "encode", cohort, "--checkpoint", checkpoint, "--out", out, *FAST, *args)
    assert code == 0, err


def patient_identity(root: Path) -> set[str]:
    """Every PatientName and PatientID in the DICOM headers under ``root``."""
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in root.rglob("*.dcm")]
    names = {str(ds.PatientName) for ds in headers}
    assert names and all(n.startswith("PHANTOM^") for n in names)  # so the searches below can fail
    return names | {str(ds.PatientID) for ds in headers}


# ---------------------------------------------------------------- a refused input creates no store
REFUSALS = {
    "encode-source": (["encode", "{missing}", "--checkpoint", "{ckpt}", "--out", "{outs}/f.parquet", *FAST],
                      "source not found"),
    "encode-checkpoint": (["encode", "{inputs}", "--checkpoint", "{missing}", "--out", "{outs}/f.parquet", *FAST],
                          "checkpoint not found"),
    "regress-features": (["regress", "--features", "{missing}", "--clinical", "{clinical}", "--out", "{outs}/r"],
                         "feature table not found"),
    "evaluate-real": (["evaluate", "--checkpoint", "{ckpt}", "--real", "{missing}", "--out", "{outs}/e"],
                      "real volumes not found"),
    "augment-config": (["augment", "--config", "tiny", "--set", "augment.cache={missing}", "--out", "{outs}/a"],
                       "no preprocess cache"),
    "generate-checkpoint": (["generate", "--checkpoint", "{missing}", "--out", "{outs}/g"], "checkpoint not found"),
    "train-data": (["train", "--config", "tiny", "--data", "{missing}", "--out", "{outs}/run"],
                   "data folder not found"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_a_refused_input_creates_no_store(capsys, checkpoint, tmp_path, monkeypatch, case):
    """With no MLFLOW_TRACKING_URI the default store is ./mlruns: a refusal leaves the current folder empty, and an
    explicit --tracking-uri store is not created either."""
    args, needle = REFUSALS[case]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "clinical.csv").write_text("patient_id,fev1pp\nP1,80\n")
    names = {
        "missing": inputs / "missing",
        "ckpt": checkpoint,
        "inputs": inputs,
        "clinical": inputs / "clinical.csv",
        "outs": tmp_path / "outputs",
    }  # outputs outside the current folder: it must stay empty
    args = [a.format(**names) for a in args]
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    cwd = empty_folder(tmp_path)
    monkeypatch.chdir(cwd)

    code, _, err = run_cli(capsys, *args)
    assert code != 0 and needle in err, err
    assert sorted(p.name for p in cwd.iterdir()) == []  # no mlruns/

    code, _, err = run_cli(capsys, *args, "--tracking-uri", sqlite_uri(tmp_path / "x"))
    assert code != 0 and needle in err, err  # the same refusal, not an unknown option
    assert not (tmp_path / "x").exists() and sorted(p.name for p in cwd.iterdir()) == []


def test_a_generate_with_a_bad_label_creates_no_store(capsys, conditional, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    cwd = empty_folder(tmp_path)
    monkeypatch.chdir(cwd)
    for extra in ([], ["--tracking-uri", sqlite_uri(tmp_path / "x")]):
        code, _, err = run_cli(capsys, "generate", "--checkpoint", conditional, "--out", "g", "--label", "5", *extra)
        assert code != 0 and "--label" in err, err
        assert not (cwd / "mlruns").exists() and not (tmp_path / "x").exists()


# ---------------------------------------------------------------- the switchboard
@pytest.mark.parametrize(
    "flag, config, env, expected",
    [
        ("sqlite:///f.db", "sqlite:///c.db", "sqlite:///e.db", "sqlite:///f.db"),
        (None, "sqlite:///c.db", "sqlite:///e.db", "sqlite:///c.db"),
        (None, None, "sqlite:///e.db", "sqlite:///e.db"),
        (None, None, None, None),  # the sqlite store under the root
    ],
)
def test_choose_takes_the_flag_then_the_config_then_the_environment(tmp_path, monkeypatch, flag, config, env, expected):
    from types import SimpleNamespace

    from hagan_clinic.tracking import DEFAULT_EXPERIMENT, choose

    if env is None:
        monkeypatch.delenv("MLFLOW_TRACKING_URI")
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", env)
    root = tmp_path / "root"
    expected = expected or f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    section = SimpleNamespace(enabled=True, uri=config, experiment=None)
    assert choose(section, flag, None, False, root).uri == expected
    assert choose(section, flag, None, False, root).experiment == DEFAULT_EXPERIMENT
    named = SimpleNamespace(enabled=True, uri=config, experiment="from-config")
    assert choose(named, flag, None, False, root).experiment == "from-config"
    assert choose(named, flag, "from-flag", False, root).experiment == "from-flag"
    assert choose(named, flag, None, False, root).enabled
    assert not choose(named, flag, None, True, root).enabled  # --no-tracking
    assert not choose(SimpleNamespace(enabled=False, uri=config, experiment=None), flag).enabled  # tracking.enabled
    assert not root.exists()  # choosing creates nothing


def test_the_store_is_the_flag_else_the_config_else_the_environment(capsys, cohort, checkpoint, tmp_path, monkeypatch):
    env, cfg, flag = tmp_path / "env", tmp_path / "cfg", tmp_path / "flag"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri(env))
    cwd = empty_folder(tmp_path)
    monkeypatch.chdir(cwd)
    out = tmp_path / "out"
    config = ("--set", f"tracking.uri={sqlite_uri(cfg)}", "--set", "tracking.experiment=from-config")

    encode_into(capsys, cohort, checkpoint, out / "a.parquet")
    assert experiments_in(env) == {"hagan-clinic"} and not cfg.exists() and not flag.exists()
    encode_into(capsys, cohort, checkpoint, out / "b.parquet", *config)
    assert experiments_in(cfg) == {"from-config"} and len(runs_of(sqlite_uri(env), "hagan-clinic")) == 1
    encode_into(capsys, cohort, checkpoint, out / "c.parquet", *config, "--tracking-uri", sqlite_uri(flag),
                "--experiment", "from-flag")  # fmt: skip
    assert experiments_in(flag) == {"from-flag"}
    assert len(runs_of(sqlite_uri(cfg), "from-config")) == 1 and len(runs_of(sqlite_uri(env), "hagan-clinic")) == 1
    assert not any(cwd.iterdir())


@pytest.mark.parametrize("off", [("--no-tracking",), ("--set", "tracking.enabled=false")])
def test_tracking_off_logs_nothing_anywhere(capsys, cohort, checkpoint, tmp_path, monkeypatch, off):
    env, flag = tmp_path / "env", tmp_path / "flag"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri(env))
    cwd = empty_folder(tmp_path)
    monkeypatch.chdir(cwd)
    encode_into(capsys, cohort, checkpoint, tmp_path / "out" / "f.parquet", *off, "--tracking-uri", sqlite_uri(flag))
    assert (tmp_path / "out" / "f.parquet").is_file()
    assert not env.exists() and not flag.exists() and not any(cwd.iterdir())


# ---------------------------------------------------------------- what a tracked encode records
def test_a_tracked_encode_records_its_experiment_stage_and_data(tracked, cohort):
    c = client(tracked["uri"])
    experiment = c.get_experiment_by_name("encode-test")
    assert experiment.tags.get("mlflow.experimentKind") == "custom_model_development"  # the UI's training view
    (run,) = c.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["stage"] == "encode"
    (data,) = run.inputs.dataset_inputs
    assert data.dataset.name == cohort.name
    assert len(data.dataset.digest) >= 16 and int(data.dataset.digest, 16) >= 0  # hex
    assert json.loads(data.dataset.profile)["num_rows"] == N_SERIES
    assert {t.key: t.value for t in data.tags}.get("mlflow.data.context") == "encode"
    logged = {a.path for a in c.list_artifacts(run.info.run_id)}
    assert {"features.report.csv", "features.provenance.json"} <= logged


def test_a_tracked_encode_samples_system_metrics(tracked):
    (run,) = runs_of(tracked["uri"], "encode-test")
    assert run.info.end_time - run.info.start_time > 1000  # ms: several 0.2 s sampling intervals
    system = sorted(k for k in run.data.metrics if k.startswith("system/"))
    assert any("cpu" in k for k in system) and any("memory" in k for k in system), system


def test_a_tracked_train_records_its_data(capsys, volume_dir, tmp_path, monkeypatch):
    uri = sqlite_uri(tmp_path / "store")
    cwd = empty_folder(tmp_path)
    monkeypatch.chdir(cwd)
    args = ["--set", "train.iterations=2", "--tracking-uri", uri, "--experiment", "train-test"]
    code, _, err = run_cli(capsys, "train", "--config", "tiny", "--data", volume_dir, "--out", tmp_path / "run", *args)
    assert code == 0, err
    (run,) = runs_of(uri, "train-test")
    assert run.data.tags["stage"] == "train"
    (data,) = run.inputs.dataset_inputs
    assert data.dataset.name == volume_dir.name and json.loads(data.dataset.profile)["num_rows"] == 4
    assert {t.key: t.value for t in data.tags}.get("mlflow.data.context") == "training"
    assert not any(cwd.iterdir()) and not (tmp_path / "mlruns").exists()  # nor the environment's store


# ---------------------------------------------------------------- provenance of the feature table
def test_the_feature_table_says_what_made_it(tracked, cohort, checkpoint):
    import hagan_clinic
    from hagan_clinic.io.files import read_provenance
    from hagan_clinic.models.hagan import describe_checkpoint

    out = tracked["out"]
    in_parquet = read_provenance(out)
    beside = json.loads(out.with_name("features.provenance.json").read_text())
    assert in_parquet == beside and set(beside) == PROVENANCE_KEYS
    assert beside["package"] == f"hagan-clinic {hagan_clinic.__version__}"
    assert beside["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert beside["checkpoint"] == checkpoint.name and beside["model_version"] == "unregistered"
    assert beside["data_contract"] == json.loads(json.dumps(describe_checkpoint(checkpoint)["data_contract"]))
    assert beside["preprocessing"]["spacing_mm"] == beside["data_contract"]["spacing_mm"]
    assert beside["encode"]["pseudonymized"] is False and beside["encode"]["batch_size"] >= 1
    assert beside["command_line"] == " ".join(["hagan-clinic", *tracked["args"]])
    (run,) = runs_of(tracked["uri"], "encode-test")
    assert run.data.params["checkpoint_sha256"] == beside["checkpoint_sha256"]


def test_a_pseudonymised_encode_keeps_no_salt_path_or_name(pseudonymized, cohort, tmp_path):
    from hagan_clinic.io.files import read_provenance

    out, checkpoint = pseudonymized["out"], pseudonymized["checkpoint"]
    provenance = read_provenance(out)
    assert provenance is not None and set(provenance) == PROVENANCE_KEYS
    assert provenance["encode"]["pseudonymized"] is True
    assert provenance["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    command = provenance["command_line"]
    assert command.startswith("hagan-clinic encode ") and "--pseudonymize" in command
    (run,) = runs_of(pseudonymized["uri"], "pseudo")
    downloads = tmp_path / "artifacts"
    downloads.mkdir()
    for artifact in client(pseudonymized["uri"]).list_artifacts(run.info.run_id):
        client(pseudonymized["uri"]).download_artifacts(run.info.run_id, artifact.path, str(downloads))
    assert (downloads / "features.provenance.json").is_file()
    inputs = [(d.dataset.name, d.dataset.source) for d in run.inputs.dataset_inputs]
    texts = {
        "table": pd.read_parquet(out).to_csv(),  # decoded: parquet pages may be compressed
        "parquet metadata": json.dumps(provenance),
        "mlflow": json.dumps([run.data.params, run.data.tags, run.info.run_name, inputs]),
    }
    files = [*out.parent.rglob("*"), *pseudonymized["store"].rglob("*"), *downloads.rglob("*")]
    texts.update({str(p): p.read_bytes().decode("latin-1") for p in files if p.is_file()})
    assert any(name.endswith("provenance.json") for name in texts) and any(n.endswith("mlflow.db") for n in texts)
    secrets = {SALT, SECRET_FOLDER, str(cohort), checkpoint.name, *patient_identity(cohort), "SECRETDIR", "SECRETTABLE"}
    for where, text in texts.items():
        assert not [s for s in secrets if s in text], where


# ---------------------------------------------------------------- generate
def test_a_tracked_generate_logs_its_samples_and_names_its_model(capsys, checkpoint, tmp_path):
    from hagan_clinic.cli.model import GENERATE_ARTIFACTS

    uri = sqlite_uri(tmp_path / "store")
    n = GENERATE_ARTIFACTS + 1
    code, _, err = run_cli(capsys, "generate", "--checkpoint", checkpoint, "-n", n, "--out", "g", "--tracking-uri", uri,
                           "--experiment", "gen")  # fmt: skip
    assert code == 0, err
    sha = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    written = sorted((tmp_path / "g").glob("*.nii.gz"))
    assert len(written) == n
    for path in written:
        assert nib.load(path).header["descrip"].item().decode().startswith(f"hagan-clinic model={sha[:12]};")
    (run,) = runs_of(uri, "gen")
    assert run.info.status == "FINISHED" and run.data.tags["stage"] == "generate"
    assert run.data.params["checkpoint_sha256"] == sha and run.data.params["n"] == str(n)
    logged = [Path(a.path).name for a in client(uri).list_artifacts(run.info.run_id, "generated")]
    assert "samples.csv" in logged
    assert len([a for a in logged if a.endswith(".nii.gz")]) == GENERATE_ARTIFACTS  # a few, not all of them


@pytest.mark.parametrize(
    "argv, salt, expected",
    [
        (["encode", "/data/DOE", "--tracking-uri", "http://bob:pw@host:5000"], None,
         "hagan-clinic encode /data/DOE --tracking-uri http://<credentials>@host:5000"),
        (["encode", "x", "--set", "tracking.uri=https://a:b@h/x", "--pseudonymize=abc"], None,
         "hagan-clinic encode x --set tracking.uri=https://<credentials>@h/x --pseudonymize=<salt>"),
        (["encode", "x", "--tracking-uri", "https://alice:p@ss@mlflow.h/x"], None,
         "hagan-clinic encode x --tracking-uri https://<credentials>@mlflow.h/x"),
        (["encode", "/data/DOE", "--pseudonymize", "s3cr3t", "--precision", "bf16", "--batch-size", "4"], "s3cr3t",
         "hagan-clinic encode <redacted> --pseudonymize <salt> --precision bf16 --batch-size 4"),
    ],
)  # fmt: skip
def test_the_recorded_command_line_holds_no_salt_credentials_or_pseudonymised_paths(argv, salt, expected):
    from hagan_clinic.pipelines.privacy import command_line

    assert command_line(argv, salt) == expected


# ---------------------------------------------------------------- a bad tracking setting costs nothing
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


BAD_SETTINGS = {
    "a bare name": (["--tracking-uri", "foo"], "give sqlite:///PATH/mlflow.db"),
    "a file store": (["--tracking-uri", "file:./mlruns"], "no plain folder store"),
    "sqlite without a path": (["--tracking-uri", "sqlite:///"], "give sqlite:///PATH/mlflow.db"),
    "a server that is down": (["--tracking-uri", "http://127.0.0.1:{port}"], "no MLflow server answers"),
    "an empty experiment": (["--experiment", ""], "is empty"),
    "a 10 KB experiment": (["--experiment", "e" * 10_000], "at most 500"),
}


@pytest.mark.parametrize("case", sorted(BAD_SETTINGS))
def test_a_bad_tracking_setting_is_refused_before_any_work(capsys, cohort, checkpoint, tmp_path, monkeypatch, case):
    """Refused in one line within seconds (MLflow itself retries a dead server for minutes, and a file store
    fails only at the end), before encode writes its state folder: the current folder stays empty."""
    args, needle = BAD_SETTINGS[case]
    args = [a.format(port=_free_port()) for a in args]
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    cwd = empty_folder(tmp_path)
    monkeypatch.chdir(cwd)
    start = time.perf_counter()
    code, _, err = run_cli(capsys, "encode", cohort, "--checkpoint", checkpoint, "--out", "f.parquet", *FAST, *args)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert time.perf_counter() - start < 60  # the connection timeout is 5 s; MLflow's own retries take minutes
    assert sorted(p.name for p in cwd.iterdir()) == []


def test_a_read_only_store_is_refused_before_any_work(capsys, cohort, checkpoint, tmp_path, monkeypatch):
    import hagan_clinic.tracking as tracking

    real_access = os.access
    store = tmp_path / "store"  # stands in for a read-only mount (as root, permissions would not refuse)
    monkeypatch.setattr(tracking.os, "access", lambda p, mode: False if str(p).startswith(str(store)) or
                        Path(p) == tmp_path else real_access(p, mode))  # fmt: skip
    cwd = empty_folder(tmp_path)
    monkeypatch.chdir(cwd)
    code, _, err = run_cli(capsys, "encode", cohort, "--checkpoint", checkpoint, "--out", "f.parquet", *FAST,
                           "--tracking-uri", sqlite_uri(store))  # fmt: skip
    assert code == 2 and "cannot write there" in err, err
    assert sorted(p.name for p in cwd.iterdir()) == [] and not store.exists()


def test_a_deleted_experiment_is_refused_before_any_work(capsys, cohort, checkpoint, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    uri = sqlite_uri(tmp_path / "store")
    (tmp_path / "store").mkdir()
    client = MlflowClient(uri)
    client.delete_experiment(client.create_experiment("gone"))
    cwd = empty_folder(tmp_path)
    monkeypatch.chdir(cwd)
    code, _, err = run_cli(capsys, "encode", cohort, "--checkpoint", checkpoint, "--out", "f.parquet", *FAST,
                           "--tracking-uri", uri, "--experiment", "gone")  # fmt: skip
    assert code == 2 and "'gone' is deleted" in err, err
    assert sorted(p.name for p in cwd.iterdir()) == []


def test_a_server_that_accepts_but_never_answers_is_refused_within_seconds():
    """A hung server (or another service on the port) passes the connection check; the first request is bounded
    by the connection timeout instead of MLflow's minutes of retries."""
    import socket
    import threading

    from hagan_clinic.tracking import Choice, TrackingError

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    held = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])  # never answered
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    start = time.perf_counter()
    try:
        with pytest.raises(TrackingError) as err:
            Choice(True, f"http://127.0.0.1:{listener.getsockname()[1]}", "e").checked()
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        listener.close()
    assert time.perf_counter() - start < 60 and "\n" not in str(err.value)


def test_a_server_behind_a_proxy_is_not_probed_directly(monkeypatch):
    """Through HTTP_PROXY the server's name may not resolve here: a direct probe would refuse a working setup."""
    from hagan_clinic.tracking import TrackingError, check_writable

    uri = "http://mlflow.hospital.invalid:5000"
    with pytest.raises(TrackingError):
        check_writable(uri)  # no proxy: the name does not resolve
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:3128")
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    check_writable(uri)  # left to the first request, which goes through the proxy as MLflow's do


def test_store_checks_name_no_credentials_and_take_any_case(capsys, tmp_path, monkeypatch):
    from hagan_clinic.tracking import TrackingError, check_uri, shown

    assert check_uri("HTTP://host:5000/mlflow") == "HTTP://host:5000/mlflow"
    assert shown("https://alice:p@ss@mlflow.h/x") == "'https://<credentials>@mlflow.h/x'"
    with pytest.raises(TrackingError) as err:
        check_uri("ftp://alice:s3cret@host/x")
    assert "s3cret" not in str(err.value)


def test_predict_from_a_model_file_needs_no_store(capsys, tmp_path, monkeypatch):
    """A local model file is read without the tracking store: an old MLFLOW_TRACKING_URI that names a folder
    store does not stop it."""
    import numpy as np

    from hagan_clinic.cli import main

    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(12, 3)), columns=["z0", "z1", "z2"])
    frame.insert(0, "patient_id", [f"P{i}" for i in range(12)])
    frame.to_csv(tmp_path / "f.csv", index=False)
    pd.DataFrame({"patient_id": frame["patient_id"], "y": rng.normal(size=12) + 5}).to_csv(tmp_path / "c.csv",
                                                                                          index=False)  # fmt: skip
    args = ["regress", "--features", str(tmp_path / "f.csv"), "--clinical", str(tmp_path / "c.csv"), "--targets",
            "y", "--folds", "3", "--out", str(tmp_path / "r"), "--no-tracking"]  # fmt: skip
    assert main(args) == 0
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "./mlruns")
    code, _, err = run_cli(capsys, "predict", "--model", tmp_path / "r" / "model.skops", "--features",
                           tmp_path / "f.csv", "--out", tmp_path / "p.csv")  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "p.csv").is_file()
