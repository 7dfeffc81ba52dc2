"""``hagan-clinic encode``: a phantom cohort to one row of latent features per series, with a report of every series
found; re-runs and workers do not change the numbers, an interrupted run resumes where it stopped, shards add up to
the whole, a preprocess cache encodes like its DICOM source, and nothing identifying reaches the outputs."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from hagan_clinic.cli import main
from hagan_clinic.io.dicom_write import write_series
from hagan_clinic.phantoms import write_cohort

N_PATIENTS = 5
LATENT = 32  # the tiny config's latent_dim
Z = [f"z{i}" for i in range(LATENT)]
ID_COLUMNS = ["patient_id", "study_uid", "series_uid", "kernel", "slice_thickness_mm"]
QCT_COLUMNS = ["lung_volume_ml", "laa950_pct", "perc15_hu", "qct_warning"]
FAST = ("--workers", "0", "--no-tracking")  # reading in the main process skips the worker start-up


# ---------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Five phantom patients, one CT series each, with a fake PatientName and birth date in every header."""
    root = tmp_path_factory.mktemp("cohort") / "phantoms"
    write_cohort(root, N_PATIENTS, seed=0, shape=(24, 48, 48), progress=False)
    return root


@pytest.fixture(scope="module")
def reference(cohort, checkpoint, tmp_path_factory):
    """An uninterrupted encode of the cohort with the default batch size (2: batches of 2, 2 and 1 series)."""
    out = tmp_path_factory.mktemp("reference") / "features.parquet"
    assert main(["encode", str(cohort), "--checkpoint", str(checkpoint), "--out", str(out), *FAST]) == 0
    return out


@pytest.fixture(scope="module")
def mixed(cohort, tmp_path_factory):
    """The cohort plus an MR series (skipped), a corrupt DICOM file and an all-air CT series (both failed)."""
    root = tmp_path_factory.mktemp("mixed") / "cohort"
    shutil.copytree(cohort, root)
    who = {"patient_name": "PHANTOM^EXTRA", "birth_date": "19461207"}
    spacing = (12.0, 12.0, 12.0)
    body = np.full((16, 24, 32), 40.0, np.float32)
    write_series(root / "MR0001" / "mr", body, spacing, patient_id="MR0001", modality="MR", **who)
    # 'AIR0001' sorts before the phantoms, so its batch mixes a failed series with an encoded one
    air = np.full((20, 24, 32), -1024.0, np.float32)
    write_series(root / "AIR0001" / "ct", air, spacing, patient_id="AIR0001", kernel="B30f", **who)
    broken = root / "BROKEN01"
    broken.mkdir()
    garbage = np.random.default_rng(0).integers(0, 256, 512, dtype=np.uint8).tobytes()
    (broken / "slice.dcm").write_bytes(b"\0" * 128 + b"DICM" + garbage)
    return root


def encode(capsys, src, out, *args: str) -> tuple[int, str, str]:
    code = main(["encode", str(src), "--out", str(out), *args])
    stdout, stderr = capsys.readouterr()
    return code, stdout, stderr


def assert_one_line_error(code: int, err: str, needle: str) -> None:
    assert code == 2, err
    assert err.strip().count("\n") == 0, err
    assert "hagan-clinic: error:" in err and needle in err, err
    assert "Traceback" not in err


def read_report(path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def state_of(out):
    return out.parent / f".{out.name}.state"


def header_secrets(root) -> set[str]:
    """Every PatientName and birth date written into the DICOM headers under ``root``."""
    found = set()
    for path in root.rglob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)  # the corrupt file reads as empty
        found |= {str(ds.get("PatientName", "")), str(ds.get("PatientBirthDate", ""))}
    return {s for s in found if s}


def state_text(out) -> str:
    """What the state folder holds, decoded (numpy stores the report rows as UTF-32, invisible to a byte search)."""
    state = state_of(out)
    parts = [(state / "settings.json").read_text()]
    for path in sorted(state.glob("batch_*.npz")):
        with np.load(path, allow_pickle=False) as data:
            parts.append(str(data["rows"]))
    return "\n".join(parts)


# ---------------------------------------------------------------- the table and the report
@pytest.mark.slow
def test_encode_writes_one_row_per_series_and_a_report(reference):
    table = pd.read_parquet(reference)
    assert list(table.columns) == ID_COLUMNS + Z
    assert len(table) == N_PATIENTS and table["series_uid"].is_unique
    assert list(table["patient_id"]) == [f"PH{i:04d}" for i in range(1, N_PATIENTS + 1)]
    assert all(table[c].dtype == np.float32 for c in Z)
    z = table[Z].to_numpy()
    assert np.isfinite(z).all() and z.std(axis=0).max() > 0  # the rows differ: each is its own series
    assert (table["slice_thickness_mm"] > 0).all() and (table["kernel"] != "").all()

    report = read_report(reference.with_name("features.report.csv"))
    assert list(report.columns[:10]) == [
        "patient_id", "study_uid", "series_uid", "modality", "kernel", "slice_thickness_mm", "n_slices", "source",
        "status", "reason",
    ]  # fmt: skip
    assert len(report) == N_PATIENTS and (report["status"] == "ok").all() and (report["reason"] == "").all()
    assert set(report["series_uid"]) == set(table["series_uid"])
    assert set(report["source"]) == {f"PH{i:04d}/STUDY_1/SERIES_2" for i in range(1, N_PATIENTS + 1)}
    state = state_of(reference)
    assert sorted(p.name for p in state.glob("batch_*.npz")) == [f"batch_{k:06d}.npz" for k in range(3)]
    assert (state / "complete").is_file() and json.loads((state / "settings.json").read_text())["batch_size"] == 2


@pytest.mark.slow
def test_reruns_formats_and_workers_give_the_same_numbers(capsys, cohort, checkpoint, reference, tmp_path):
    expected = pd.read_parquet(reference)
    code, out, err = encode(capsys, cohort, tmp_path / "again.parquet", "--checkpoint", str(checkpoint), *FAST)
    assert code == 0, err
    assert f"{N_PATIENTS} ok, 0 skipped, 0 failed" in out
    assert pd.read_parquet(tmp_path / "again.parquet").equals(expected)

    args = ("--checkpoint", str(checkpoint), "--workers", "1", "--no-tracking")
    assert encode(capsys, cohort, tmp_path / "pool.parquet", *args)[0] == 0
    assert pd.read_parquet(tmp_path / "pool.parquet").equals(expected)

    assert encode(capsys, cohort, tmp_path / "features.csv", "--checkpoint", str(checkpoint), *FAST)[0] == 0
    text = pd.read_csv(tmp_path / "features.csv", dtype={c: str for c in ID_COLUMNS[:4]}, keep_default_na=False)
    assert list(text.columns) == list(expected.columns)
    pd.testing.assert_frame_equal(text[ID_COLUMNS], expected[ID_COLUMNS])
    np.testing.assert_allclose(text[Z].to_numpy(), expected[Z].to_numpy(), rtol=1e-6, atol=0)


@pytest.mark.slow
def test_bf16_encodes_with_bf16_weights_and_agrees_with_fp32(
    capsys, cohort, checkpoint, reference, monkeypatch, tmp_path
):
    """--precision bf16 runs bf16 copies of the encoders (weights cast once, not autocast around fp32 weights) and
    leaves the model's own weights fp32; its features agree with the fp32 table; the provenance says which precision
    made them."""
    import hagan_clinic.pipelines.encode as encode_pipeline

    dtypes, real = {"copy": set(), "own": set()}, encode_pipeline.encode_batch

    def watching(model, grids, device, precision):
        z = real(model, grids, device, precision)
        _, eh, eg = model._inference[precision]  # the copies encode_batch made (KeyError: it made none)
        dtypes["copy"].update(str(p.dtype) for p in [*eh.parameters(), *eg.parameters()])
        dtypes["own"].update(str(p.dtype) for p in [*model.EH.parameters(), *model.EG.parameters()])
        return z

    monkeypatch.setattr(encode_pipeline, "encode_batch", watching)
    out = tmp_path / "bf16.parquet"
    assert encode(capsys, cohort, out, "--checkpoint", str(checkpoint), "--precision", "bf16", *FAST)[0] == 0
    assert dtypes == {"copy": {"torch.bfloat16"}, "own": {"torch.float32"}}
    a = pd.read_parquet(reference)[Z].to_numpy(np.float64)
    b = pd.read_parquet(out)[Z].to_numpy(np.float64)
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.999
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()
    assert json.loads(out.with_name("bf16.provenance.json").read_text())["encode"]["precision"] == "bf16"


# ---------------------------------------------------------------- interruption and resumption
@pytest.mark.slow
def test_an_interrupted_run_resumes_with_only_the_missing_batches(
    capsys, cohort, checkpoint, reference, monkeypatch, tmp_path
):
    import hagan_clinic.pipelines.encode as encode_pipeline

    out = tmp_path / "features.parquet"
    args = ("--checkpoint", str(checkpoint), "--batch-size", "2", *FAST)
    calls, stop = [], [True]
    real = encode_pipeline.encode_batch

    def counting(model, grids, device, precision):
        calls.append(len(grids))
        if stop[0] and len(calls) == 2:
            raise KeyboardInterrupt  # the user stops the run while the second batch is encoded
        return real(model, grids, device, precision)

    monkeypatch.setattr(encode_pipeline, "encode_batch", counting)
    code, _, err = encode(capsys, cohort, out, *args)
    assert code == 130 and "interrupted" in err
    state = state_of(out)
    assert [p.name for p in state.glob("batch_*.npz")] == ["batch_000000.npz"]
    assert not out.exists() and not out.with_name("features.report.csv").exists()
    assert not (state / "complete").exists()
    first = (state / "batch_000000.npz").stat().st_mtime_ns

    # other settings on an unfinished state are refused, and the state is left as it was
    calls.clear()
    code, _, err = encode(capsys, cohort, out, "--checkpoint", str(checkpoint), "--batch-size", "1", *FAST)
    assert_one_line_error(code, err, "batch_size")
    assert calls == [] and json.loads((state / "settings.json").read_text())["batch_size"] == 2

    stop[0] = False
    code, _, err = encode(capsys, cohort, out, *args)
    assert code == 0, err
    assert calls == [2, 1]  # batches 1 and 2 only; batch 0 is not encoded again
    assert (state / "batch_000000.npz").stat().st_mtime_ns == first
    assert pd.read_parquet(out).equals(pd.read_parquet(reference))
    assert (state / "complete").is_file()

    # a finished run's state does not block other settings: the new run starts afresh
    calls.clear()
    code, _, err = encode(capsys, cohort, out, "--checkpoint", str(checkpoint), "--batch-size", "1", *FAST)
    assert code == 0, err
    assert calls == [1] * N_PATIENTS
    assert len(list(state.glob("batch_*.npz"))) == N_PATIENTS
    assert json.loads((state / "settings.json").read_text())["batch_size"] == 1
    again, expected = pd.read_parquet(out), pd.read_parquet(reference)
    assert again[ID_COLUMNS].equals(expected[ID_COLUMNS])
    np.testing.assert_allclose(again[Z].to_numpy(), expected[Z].to_numpy(), atol=1e-5)


# ---------------------------------------------------------------- what the report says
@pytest.mark.slow
def test_report_lists_skipped_and_failed_series_and_the_rest_is_encoded(capsys, mixed, checkpoint, reference):
    out = mixed.parent / "mixed.parquet"
    code, stdout, err = encode(capsys, mixed, out, "--checkpoint", str(checkpoint), *FAST)
    assert code == 0, err
    assert f"{N_PATIENTS} ok, 1 skipped, 2 failed" in stdout

    report = read_report(mixed.parent / "mixed.report.csv")
    assert len(report) == N_PATIENTS + 3
    by_source = {r["source"]: r for r in report.to_dict("records")}
    assert by_source["MR0001/mr"]["status"] == "skipped"
    assert "other modality" in by_source["MR0001/mr"]["reason"]
    assert by_source["AIR0001/ct"]["status"] == "failed"
    assert "no body found" in by_source["AIR0001/ct"]["reason"]
    assert by_source["BROKEN01/slice.dcm"]["status"] == "failed"
    assert "unreadable DICOM" in by_source["BROKEN01/slice.dcm"]["reason"]
    assert (report.loc[report["status"] == "ok", "reason"] == "").all()

    # the failed series shares a batch with PH0001, yet every row keeps its own features
    table, expected = pd.read_parquet(out), pd.read_parquet(reference)
    assert table[ID_COLUMNS].equals(expected[ID_COLUMNS])
    np.testing.assert_allclose(table[Z].to_numpy(), expected[Z].to_numpy(), atol=1e-5)


# ---------------------------------------------------------------- privacy
@pytest.mark.slow
def test_pseudonymize_replaces_ids_and_folders(capsys, mixed, checkpoint, reference, tmp_path):
    ckpt = ("--checkpoint", str(checkpoint))
    for name, salt in [("a.parquet", "salt-1"), ("b.csv", "salt-1"), ("c.parquet", "salt-2")]:
        code, _, err = encode(capsys, mixed, tmp_path / name, *ckpt, "--pseudonymize", salt, *FAST)
        assert code == 0, err
    a, c = pd.read_parquet(tmp_path / "a.parquet"), pd.read_parquet(tmp_path / "c.parquet")
    b = pd.read_csv(tmp_path / "b.csv", dtype={k: str for k in ID_COLUMNS[:4]}, keep_default_na=False)
    reports = {k: read_report(tmp_path / f"{k}.report.csv") for k in "abc"}

    original = read_report(reference.with_name("features.report.csv"))
    secrets = set(original["patient_id"]) | set(original["study_uid"]) | set(original["series_uid"])
    secrets |= {"MR0001", "AIR0001", "BROKEN01", "STUDY_1", "SERIES_2"}
    for folder in ("MR0001", "AIR0001"):
        ds = pydicom.dcmread(next((mixed / folder).rglob("*.dcm")), stop_before_pixels=True)
        secrets |= {ds.StudyInstanceUID, ds.SeriesInstanceUID}
    for name in ("a.parquet", "b.csv", "c.parquet"):
        text = (tmp_path / name).read_text() if name.endswith(".csv") else pd.read_parquet(tmp_path / name).to_csv()
        text += (tmp_path / name).with_name(f"{name[0]}.report.csv").read_text()
        assert not [s for s in secrets if s in text], name

    assert len(a) == N_PATIENTS and a["patient_id"].is_unique and a["series_uid"].is_unique
    assert (a["patient_id"] != "").all() and (reports["a"]["source"] != "").all()
    for column in ("patient_id", "study_uid", "series_uid"):
        assert list(a[column]) == list(b[column])  # same salt, same pseudonyms
        assert not set(a[column]) & set(c[column])  # another salt, other pseudonyms
    assert list(reports["a"]["source"]) == list(reports["b"]["source"])
    assert not set(reports["a"]["source"]) & set(reports["c"]["source"])
    assert set(a["series_uid"]) <= set(reports["a"]["series_uid"])
    np.testing.assert_allclose(a[Z].to_numpy(), pd.read_parquet(reference)[Z].to_numpy(), atol=1e-5)

    for salt in ("", "  "):
        code, _, err = encode(capsys, mixed, tmp_path / "d.parquet", *ckpt, "--pseudonymize", salt, *FAST)
        assert_one_line_error(code, err, "--pseudonymize")
    assert not (tmp_path / "d.parquet").exists()


@pytest.mark.slow
def test_names_and_birth_dates_reach_no_output_nor_mlflow(capsys, mixed, checkpoint, tmp_path):
    from mlflow import MlflowClient

    secrets = header_secrets(mixed)
    assert any(s.startswith("PHANTOM^") for s in secrets) and "19461207" in secrets  # the checks below can fail
    out = tmp_path / "features.parquet"
    code, _, err = encode(capsys, mixed, out, "--checkpoint", str(checkpoint), "--workers", "0")
    assert code == 0, err

    texts = {
        "table": pd.read_parquet(out).to_csv(),
        "report": out.with_name("features.report.csv").read_text(),
        "state": state_text(out),
    }
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("hagan-clinic").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    params, metrics = run.data.params, run.data.metrics
    assert params["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert params["model_version"] == "unregistered" and params["series_found"] == str(N_PATIENTS + 3)
    assert metrics["series_ok"] == N_PATIENTS and metrics["series_skipped"] == 1 and metrics["series_failed"] == 2
    texts["mlflow"] = json.dumps([params, run.data.tags, run.info.run_name])
    downloads = tmp_path / "artifacts"
    downloads.mkdir()
    for artifact in client.list_artifacts(run.info.run_id):
        if artifact.path.endswith(".csv"):
            local = client.download_artifacts(run.info.run_id, artifact.path, str(downloads))
            texts[artifact.path] = Path(local).read_text()
    assert "features.report.csv" in texts
    for where, text in texts.items():
        assert "PHANTOM" not in text.upper(), where
        assert not [s for s in secrets if s in text], where


# ---------------------------------------------------------------- QCT columns
@pytest.mark.slow
def test_qct_columns_match_the_phantom_truth(capsys, checkpoint, tmp_path):
    root = tmp_path / "cohort"
    truth = write_cohort(root, 3, seed=1, shape=(32, 64, 64), progress=False)
    out = tmp_path / "qct.parquet"
    code, _, err = encode(capsys, root, out, "--checkpoint", str(checkpoint), "--qct", *FAST)
    assert code == 0, err
    table = pd.read_parquet(out)
    assert list(table.columns) == ID_COLUMNS + QCT_COLUMNS + Z
    merged = table.merge(truth, on="patient_id", suffixes=("", "_t"))
    assert len(merged) == 3
    assert ((merged["lung_volume_ml"] / merged["lung_volume_ml_t"] - 1).abs() < 0.03).all()
    assert ((merged["laa950_pct"] - merged["laa950_pct_t"]).abs() < 1.0).all()
    assert ((merged["perc15_hu"] - merged["perc15_hu_t"]).abs() < 15.0).all()
    assert merged["perc15_hu"].between(-1000, -700).all()
    assert table["qct_warning"].map(lambda w: isinstance(w, str)).all()
    report = read_report(tmp_path / "qct.report.csv")
    assert set(QCT_COLUMNS) <= set(report.columns) and (report["lung_volume_ml"] != "").all()


# ---------------------------------------------------------------- a preprocess cache as the source
@pytest.mark.slow
def test_a_preprocess_cache_encodes_like_its_dicom_source(capsys, cohort, checkpoint, reference, tmp_path):
    cache = tmp_path / "cache"
    assert main(["preprocess", str(cohort), "--out", str(cache), "--config", "tiny"]) == 0
    code, stdout, err = encode(capsys, cache, tmp_path / "cached.parquet", "--checkpoint", str(checkpoint), *FAST)
    assert code == 0, err
    assert f"{N_PATIENTS} ok" in stdout
    table, expected = pd.read_parquet(tmp_path / "cached.parquet"), pd.read_parquet(reference)
    assert table[ID_COLUMNS].equals(expected[ID_COLUMNS])
    assert np.allclose(table[Z].to_numpy(), expected[Z].to_numpy(), atol=1e-5)
    report = read_report(tmp_path / "cached.report.csv")
    assert list(report["source"]) == list(read_report(reference.with_name("features.report.csv"))["source"])

    code, _, err = encode(capsys, cache, tmp_path / "qct.parquet", "--checkpoint", str(checkpoint), "--qct", *FAST)
    assert_one_line_error(code, err, "--qct")

    other = tmp_path / "other_cache"
    overrides = ["--set", "data.spacing_mm=[10,10,10]"]
    assert main(["preprocess", str(cohort / "PH0001"), "--out", str(other), "--config", "tiny", *overrides]) == 0
    capsys.readouterr()
    code, _, err = encode(capsys, other, tmp_path / "other.parquet", "--checkpoint", str(checkpoint), *FAST)
    assert_one_line_error(code, err, "data contract")
    assert not (tmp_path / "other.parquet").exists()


def test_a_cache_preprocessed_other_than_the_checkpoint_says_is_refused(capsys, cohort, checkpoint, tmp_path):
    """Same contract, other crop: the cache's volumes are not what the checkpoint's config would make of the DICOM
    (features differ by ~0.5), so encoding it must be refused like a contract mismatch, not silently accepted.
    FAILS today: pipelines/encode.py::_cache_records compares only the contract, not cache.json's other settings."""
    cache = tmp_path / "uncropped"
    overrides = ["--set", "data.crop=none"]
    assert main(["preprocess", str(cohort / "PH0001"), "--out", str(cache), "--config", "tiny", *overrides]) == 0
    capsys.readouterr()
    code, _, err = encode(capsys, cache, tmp_path / "features.parquet", "--checkpoint", str(checkpoint), *FAST)
    assert_one_line_error(code, err, "crop")


# ---------------------------------------------------------------- shards
@pytest.mark.slow
def test_shards_add_up_to_the_whole_table(capsys, cohort, checkpoint, reference, tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = tmp_path / "features.parquet"
    args = ("--checkpoint", str(checkpoint), *FAST)
    code, stdout, err = encode(capsys, cohort, out, *args, "--shard", "0/2")
    assert code == 0, err
    assert "written by the last shard" in stdout
    assert not out.exists() and not (tmp_path / "features.report.csv").exists()
    assert sorted(p.name for p in state_of(out).glob("batch_*.npz")) == ["batch_000000.npz", "batch_000002.npz"]

    code, stdout, err = encode(capsys, cohort, out, *args, "--shard", "1/2")
    assert code == 0, err
    assert f"{N_PATIENTS} ok" in stdout
    assert pd.read_parquet(out).equals(pd.read_parquet(reference))
    assert len(read_report(tmp_path / "features.report.csv")) == N_PATIENTS

    for shard in ("2/2", "1", "a/b"):
        code, _, err = encode(capsys, cohort, tmp_path / "bad.parquet", *args, "--shard", shard)
        assert_one_line_error(code, err, "--shard")


# ---------------------------------------------------------------- bad arguments
@pytest.mark.parametrize(
    "case, needle",
    [("checkpoint", "checkpoint not found"), ("source", "source not found"), ("empty", "no DICOM series")],
)
def test_bad_arguments_are_one_line_errors(capsys, checkpoint, tmp_path, case, needle):
    (tmp_path / "empty").mkdir()
    src = tmp_path / ("missing" if case == "source" else "empty")
    ckpt = tmp_path / "missing.pt" if case == "checkpoint" else checkpoint
    code, _, err = encode(capsys, src, tmp_path / "features.parquet", "--checkpoint", str(ckpt), *FAST)
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "features.parquet").exists()


def test_the_summary_is_what_the_command_prints(tmp_path):
    from hagan_clinic.pipelines.encode import EncodeResult

    table, report = tmp_path / "f.parquet", tmp_path / "f.report.csv"
    done = EncodeResult(table, report, {"ok": 2, "skipped": 0, "failed": 1})
    assert done.summary() == f"2 ok, 0 skipped, 1 failed: {table} (report: {report})"
    waiting = EncodeResult(None, None, {"encoded_here": 2}, shard=(1, 3))
    assert waiting.summary() == "shard 1/3 done; the table is written by the last shard to finish"
