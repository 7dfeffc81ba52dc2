"""The served models: a registered encoder loaded by alias with ``mlflow.pyfunc.load_model`` gives, for a DICOM
series folder and a NIfTI file, the same features as ``hagan-clinic encode``; so does ``mlflow models serve`` over
HTTP; arrays are taken within bounds; a path is bounded before it is read (one series, no system tree, under the
serving root when one is set); bad input is one line (HTTP 400 from the server). The generator model gives the
volumes ``generate`` makes from the same seeds; a model refuses a checkpoint that is not the one it recorded.

Tolerance: the served model and encode run the same functions on the same float16 grids with the same weights; only
the batches differ (encode batches series in discovery order, a request in its own order), and a convolution may
take another code path for another batch, which moves float32 features (values of order 1) by about 1e-7. 1e-5
absolute allows for that on any x86-64 CPU and stays far below the differences between scans (asserted > 1e-2).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hagan_clinic.errors import HaganError

from conftest import ellipsoid_hu, tiny_config

NAME = "served"
Z = [f"z{i}" for i in range(32)]  # the tiny config's latent_dim
ATOL = 1e-5


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """Two phantom CT series (DICOM) and one NIfTI scan: {patient_id: path} of the scans, and their root."""
    from hagan_clinic.io.nifti import write_scan
    from hagan_clinic.io.volume import Volume
    from hagan_clinic.phantoms import write_cohort

    root = tmp_path_factory.mktemp("scans")
    write_cohort(root / "dicom", 2, seed=0, shape=(24, 48, 48), progress=False, extras=False)
    write_scan(root / "nifti" / "scan7.nii.gz", Volume(ellipsoid_hu((30, 40, 40), seed=7), (10.0, 10.0, 10.0)))
    paths = {p: root / "dicom" / p / "STUDY_1" / "SERIES_2" for p in ("PH0001", "PH0002")}
    paths["scan7"] = root / "nifti" / "scan7.nii.gz"
    assert all(p.exists() for p in paths.values())
    return root, paths


@pytest.fixture(scope="module")
def encoded(scans, checkpoint, tmp_path_factory) -> pd.DataFrame:
    """``hagan-clinic encode`` of the scans with the same checkpoint: the features by patient id."""
    from hagan_clinic.pipelines.encode import EncodeOptions, run

    out = tmp_path_factory.mktemp("encode") / "features.parquet"
    result = run(scans[0], EncodeOptions(checkpoint=checkpoint, out=out, workers=0, progress=False))
    assert result.counts.get("ok") == 3, result.counts
    table = pd.read_parquet(out).set_index("patient_id")
    z = table[Z].to_numpy()
    assert np.abs(z[:, None] - z[None]).max(axis=2)[~np.eye(3, dtype=bool)].min() > 1e-2  # the scans differ
    return table[Z]


@pytest.fixture(scope="module")
def store(checkpoint, tmp_path_factory) -> str:
    """A store with the checkpoint registered (NAME and NAME-generator) as training registers it."""
    from hagan_clinic.tracking import Tracker

    uri = f"sqlite:///{tmp_path_factory.mktemp('served') / 'mlflow.db'}"
    tracker = Tracker(uri, "serving")
    with tracker.run("train"):
        assert tracker.register_model(NAME, checkpoint, tiny_config().to_dict(), {}) == "1"
    return uri


@pytest.fixture(autouse=True)
def _in_store(store, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    mlflow.set_tracking_uri(store)
    yield
    mlflow.set_tracking_uri(None)  # back to the environment's store (conftest's, restored by monkeypatch)


@pytest.fixture(scope="module")
def encoder(store):
    import mlflow

    mlflow.set_tracking_uri(store)
    return mlflow.pyfunc.load_model(f"models:/{NAME}@latest")


def grids_of(paths: list[Path]) -> list[np.ndarray]:
    """The model grids encode feeds its encoder for these scans (its own reader)."""
    from hagan_clinic.pipelines.encode_inputs import list_series, prepare_one

    cfg = tiny_config()
    return [prepare_one(list_series(p, cfg, False, False)[0][0], cfg.to_dict(), False)["grid"] for p in paths]


def assert_refused(err: BaseException, *needles: str) -> None:
    """A refusal of a served model: one line, a HaganError and an MlflowException the server answers with 400."""
    from mlflow.exceptions import MlflowException

    text = str(err)
    assert isinstance(err, HaganError) and isinstance(err, MlflowException), type(err)
    assert err.get_http_status_code() == 400 and "\n" not in text and len(text) <= 300, text
    for needle in needles:
        assert needle in text, text


# ---------------------------------------------------------------- the encoder
def test_the_model_loaded_by_alias_gives_the_features_of_encode(encoder, scans, encoded):
    order = ["scan7", "PH0002", "PH0001"]  # NIfTI and DICOM, not in encode's order
    got = encoder.predict(pd.DataFrame({"path": [str(scans[1][p]) for p in order]}))
    assert list(got.columns) == Z and len(got) == 3 and (got.dtypes == np.float32).all()
    np.testing.assert_allclose(got.to_numpy(), encoded.loc[order].to_numpy(), rtol=0, atol=ATOL)


def test_volumes_on_the_model_scale_give_the_same_features(encoder, scans, encoded):
    order = ["PH0001", "scan7"]
    grids = grids_of([scans[1][p] for p in order])
    expected = encoded.loc[order].to_numpy()
    by_column = encoder.predict(pd.DataFrame({"volume": [g.astype(np.float32) for g in grids]}))
    np.testing.assert_allclose(by_column.to_numpy(), expected, rtol=0, atol=ATOL)
    # the model itself also takes a plain array, (n, S, S, S) or (n, 1, S, S, S)
    model = encoder.unwrap_python_model()
    array = np.stack(grids).astype(np.float32)
    for shaped in (array, array[:, None]):
        np.testing.assert_allclose(model.predict(None, shaped).to_numpy(), expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize(
    ("make", "needles"),
    [
        (lambda root, paths: {"path": [str(root / "missing")]}, ("row 0", "not found")),
        (lambda root, paths: {"path": [str(paths["PH0001"]), str(root)]}, ("row 1", "holds 3 series")),
        (lambda root, paths: {"path": [str(root / "dicom" / "clinical.csv")]}, ("row 0", "no DICOM series")),
        (lambda root, paths: {"path": [str(paths["scan7"])] * 65}, ("65 paths", "at most 64")),
        (lambda root, paths: {"volume": [np.zeros((32, 32, 32), np.float32)] * 5}, ("5 volumes", "at most 4")),
        (lambda root, paths: {"volume": [np.full((32, 32, 32), 40.0, np.float32)]}, ("scale [-1, 1]", "40")),
        (lambda root, paths: {"volume": [np.zeros((16, 32, 32), np.float32)]}, ("(1, 32, 32, 32)", "(1, 16, 32, 32)")),
        (lambda root, paths: {"volume": [np.full((32, 32, 32), np.nan, np.float32)]}, ("NaN",)),
        (
            lambda root, paths: {"path": [str(paths["scan7"])], "volume": [np.zeros((32, 32, 32), np.float32)]},
            ("not both",),
        ),
    ],
)
def test_bad_input_is_refused_in_one_line(encoder, scans, make, needles):
    with pytest.raises(HaganError) as err:
        encoder.predict(pd.DataFrame(make(*scans)))
    assert_refused(err.value, *needles)


def test_a_grid_too_large_for_arrays_is_refused(encoder, monkeypatch):
    from hagan_clinic import serving

    monkeypatch.setattr(serving, "MAX_ARRAY_SIZE", 16)  # the tiny model's 32^3 grid stands in for a 256^3 one
    with pytest.raises(HaganError) as err:
        encoder.predict(pd.DataFrame({"volume": [np.zeros((32, 32, 32), np.float32)]}))
    assert_refused(err.value, "32^3", "send the scan's 'path'")


def test_a_path_is_bounded_before_anything_is_read(encoder, tmp_path, monkeypatch):
    """A request names one series: a tree of more entries (a cohort, a folder of 10^5 files, /proc/self whose walk
    never ends) is refused after counting at most MAX_SERIES_ENTRIES of them, before encode's reader sees it."""
    from hagan_clinic import serving
    from hagan_clinic.pipelines import encode_inputs

    def not_reached(*args, **kwargs):
        raise AssertionError("the path was handed to the reader")

    monkeypatch.setattr(encode_inputs, "list_series", not_reached)
    many = tmp_path / "many"
    for part in ("a", "b"):  # entries at any depth count
        (many / part).mkdir(parents=True)
        for i in range(serving.MAX_SERIES_ENTRIES // 2):
            (many / part / f"{i:05d}.dcm").touch()
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    cases = [
        (many, ("row 0", f"over {serving.MAX_SERIES_ENTRIES} files and folders", "give one series folder")),
        (tmp_path / "fifo", ("not a file or a folder",)),
        (tmp_path / "loop", ("cannot be read",)),
        (tmp_path / "missing", ("source not found",)),
        (Path("/proc/self"), ("/proc, a system folder",)),
        (Path("/dev/zero"), ("/dev, a system folder",)),
        ("scan\0.nii.gz", ("not a usable path",)),
    ]
    for path, needles in cases:
        start = time.monotonic()
        with pytest.raises(HaganError) as err:
            encoder.predict(pd.DataFrame({"path": [str(path)]}))
        assert_refused(err.value, *needles)
        assert time.monotonic() - start < 5, path


def test_with_a_serving_root_every_path_must_lie_under_it(encoder, scans, encoded, tmp_path, monkeypatch):
    import shutil

    from hagan_clinic.serving import ROOT_ENV

    outside = tmp_path / "outside.nii.gz"
    shutil.copy(scans[1]["scan7"], outside)
    root = tmp_path / "served"
    (root / "series").mkdir(parents=True)
    shutil.copy(scans[1]["scan7"], root / "scan7.nii.gz")
    (root / "link.nii.gz").symlink_to(outside)
    (root / "series" / "scan.nii.gz").symlink_to(outside)
    monkeypatch.setenv(ROOT_ENV, str(root))
    got = encoder.predict(pd.DataFrame({"path": [str(root / "scan7.nii.gz")]}))
    np.testing.assert_allclose(got.to_numpy(), encoded.loc[["scan7"]].to_numpy(), rtol=0, atol=ATOL)
    for path, needle in (
        (outside, f"is not under {ROOT_ENV}"),
        (root / ".." / "outside.nii.gz", f"is not under {ROOT_ENV}"),
        (root / "link.nii.gz", f"is not under {ROOT_ENV}"),  # links are followed before the check
        (root / "series", f"holds a link that leads out of {ROOT_ENV}"),
    ):
        with pytest.raises(HaganError) as err:
            encoder.predict(pd.DataFrame({"path": [str(path)]}))
        assert_refused(err.value, "row 0", needle)
    monkeypatch.setenv(ROOT_ENV, "served")
    with pytest.raises(HaganError) as err:
        encoder.predict(pd.DataFrame({"path": [str(root / "scan7.nii.gz")]}))
    assert_refused(err.value, ROOT_ENV, "not the absolute path of a folder")


# ---------------------------------------------------------------- the checkpoint a model loads
def test_a_model_refuses_a_checkpoint_other_than_the_one_it_recorded(checkpoint, tmp_path, caplog):
    """Each served model records its checkpoint's SHA-256 at registration (the version's tags are not visible
    where it loads) and checks it in load_context."""
    from types import SimpleNamespace

    from hagan_clinic.io.torch_files import file_sha256
    from hagan_clinic.serving import EncoderModel, GeneratorModel

    record = tmp_path / "checkpoint.sha256"
    context = SimpleNamespace(artifacts={"checkpoint": str(checkpoint), "checkpoint_sha256": str(record)})
    record.write_text("0" * 64 + "\n")
    for cls in (EncoderModel, GeneratorModel):
        with pytest.raises(HaganError) as err:
            cls().load_context(context)
        assert_refused(err.value, f"{checkpoint.name} does not match the sha256 '000000000000'", "replaced?")
    record.write_text(file_sha256(checkpoint) + "\n")
    for cls in (EncoderModel, GeneratorModel):
        cls().load_context(context)
    # a version registered before the record existed loads, with a warning
    with caplog.at_level("WARNING", logger="hagan_clinic.serving"):
        GeneratorModel().load_context(SimpleNamespace(artifacts={"checkpoint": str(checkpoint)}))
    assert "no recorded sha256" in caplog.text


# ---------------------------------------------------------------- the generator
def test_the_generator_model_gives_the_volumes_of_generate(store, checkpoint):
    import mlflow
    import torch

    from hagan_clinic.models.hagan import load_checkpoint
    from hagan_clinic.sampling import sample_latent

    generator = mlflow.pyfunc.load_model(f"models:/{NAME}-generator@latest")
    got = generator.predict(pd.DataFrame({"seed": [3, 3], "index": [0, 2]}))
    assert got.shape == (2, 32, 32, 32) and got.dtype == np.float32
    model = load_checkpoint(checkpoint)  # as generate loads it
    for row, (seed, index) in enumerate([(3, 0), (3, 2)]):
        with torch.no_grad():
            expected = model.generate(sample_latent(seed, index, 32))[0, 0].numpy()
        np.testing.assert_allclose(got[row], expected, rtol=0, atol=1e-6)
    assert not np.allclose(got[0], got[1], atol=1e-3)
    for frame, needles in (
        ({"seed": list(range(5))}, ("5 volume(s)", "at most 4")),
        ({"seed": [-1]}, ("row 0", "'seed'", "[0, 4294967295]")),
        ({"seed": [0], "label": [1]}, ("unconditional",)),
    ):
        with pytest.raises(HaganError) as err:
            generator.predict(pd.DataFrame(frame))
        assert_refused(err.value, *needles)


# ---------------------------------------------------------------- served over HTTP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, column: str, values: list) -> tuple[int, dict]:
    body = json.dumps({"dataframe_split": {"columns": [column], "data": [[v] for v in values]}}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_served_over_http_it_answers_with_the_features_of_encode(store, scans, encoded, tmp_path):
    port = _free_port()
    # --env-manager local runs `uvicorn` from PATH; this interpreter's must serve (a venv over the system's
    # site-packages has no uvicorn script of its own, and the system's would not import this checkout)
    shim = tmp_path / "bin" / "uvicorn"
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m uvicorn "$@"\n')
    shim.chmod(0o755)
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": store,
        "PATH": f"{shim.parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}@latest",
               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]  # fmt: skip
    log = tmp_path / "server.log"
    with open(log, "wb") as sink:
        server = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=sink, stderr=subprocess.STDOUT,
                                  start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, f"the server stopped: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"no answer to /ping in 120 s: {log.read_text()[-2000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:  # not listening yet
                time.sleep(0.25)
        order = ["PH0002", "scan7"]
        status, answer = _post(port, "path", [str(scans[1][p]) for p in order])
        assert status == 200, answer
        got = pd.DataFrame(answer["predictions"])[Z].to_numpy()
        np.testing.assert_allclose(got, encoded.loc[order].to_numpy(), rtol=0, atol=ATOL)
        # a volume as nested lists (32^3 values, about 300 kB of JSON)
        status, answer = _post(port, "volume", [grids_of([scans[1]["PH0001"]])[0].astype(np.float32).tolist()])
        assert status == 200, answer
        got = pd.DataFrame(answer["predictions"])[Z].to_numpy()
        np.testing.assert_allclose(got, encoded.loc[["PH0001"]].to_numpy(), rtol=0, atol=ATOL)
        status, answer = _post(port, "path", [str(scans[0] / "missing")])
        assert status == 400 and answer["error_code"] == "INVALID_PARAMETER_VALUE"
        assert "row 0" in answer["message"] and "not found" in answer["message"]
        assert "Traceback" not in answer["message"]
    finally:  # a server that already stopped leaves its process group gone: the assertion above says why
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def test_the_generator_gives_a_conditional_sample_its_class_by_index(tmp_path):
    """Sample ``index`` of ``generate --seed S`` has class index % classes; a request for that index alone must get
    the same class (not its row's place in the request)."""
    from types import SimpleNamespace

    import torch

    from hagan_clinic.models.hagan import HAGAN, load_checkpoint
    from hagan_clinic.sampling import sample_latent
    from hagan_clinic.serving import GeneratorModel

    path = tmp_path / "conditional.pt"
    HAGAN.from_config(tiny_config("model.num_classes=2")).save(path)
    served = GeneratorModel()
    served.load_context(SimpleNamespace(artifacts={"checkpoint": str(path)}))
    got = served.predict(None, pd.DataFrame({"seed": [0], "index": [1]}))
    model = load_checkpoint(path)
    with torch.no_grad():
        z = sample_latent(0, 1, 32)
        as_generated = model.generate(z, torch.tensor([1]))[0, 0].numpy()  # generate's sample_0001_label1
        other_class = model.generate(z, torch.tensor([0]))[0, 0].numpy()
    assert not np.allclose(as_generated, other_class, atol=1e-3)  # the class matters to this model
    np.testing.assert_allclose(got[0], as_generated, rtol=0, atol=1e-6)
