"""A worker process that dies (killed, out of memory) fails only the series it held; the run goes on and a re-run
tries that series again. The killers below are module functions: spawned workers import this module to run them,
and an environment variable (inherited by the workers) arms them."""

from __future__ import annotations

import os
import signal
from functools import partial
from pathlib import Path

import pytest

from hagan_clinic.io.cohort import SeriesRecord
from hagan_clinic.pipelines.cohort import WORKER_DIED, run_series
from hagan_clinic.pipelines.encode import _safe_prepare as _real_prepare  # bound before any test replaces it

VICTIM = "uid:2"


def _kill_on(record: SeriesRecord, victim: str) -> dict:
    """Reads a series; the victim's reading kills the process as the kernel's OOM killer would."""
    if record.key == victim and os.environ.get("HAGAN_TEST_KILLER") == "1":
        os.kill(os.getpid(), signal.SIGKILL)
    return {"value": record.key}


def _records(n: int) -> list[SeriesRecord]:
    return [SeriesRecord(f"uid:{i}", "dicom", (Path(f"s{i}.dcm"),), f"s{i}", "ok", series_uid=str(i)) for i in range(n)]


@pytest.mark.slow
def test_a_killed_worker_fails_its_own_series_only_and_a_rerun_recovers(tmp_path, monkeypatch):
    monkeypatch.setenv("HAGAN_TEST_KILLER", "1")  # spawned workers inherit it; the re-run below runs without
    records = _records(5)
    rows = run_series(records, partial(_kill_on, victim=VICTIM), tmp_path / "state", workers=2, progress=False)
    status = {r["series_uid"]: (r["status"], r.get("reason", "")) for r in rows}
    assert status.pop("2") == ("failed", WORKER_DIED)
    assert status == {str(i): ("ok", "") for i in (0, 1, 3, 4)}
    assert [r["value"] for r in rows if r["status"] == "ok"] == ["uid:0", "uid:1", "uid:3", "uid:4"]

    monkeypatch.setenv("HAGAN_TEST_KILLER", "0")
    again = run_series(records, partial(_kill_on, victim=VICTIM), tmp_path / "state", workers=1, progress=False)
    assert [r["status"] for r in again] == ["ok"] * 5


def _prepare_or_die(record: SeriesRecord, cfg_dict: dict, qct: bool) -> dict:
    """encode's reader, except that reading PH0002 kills the process."""
    if record.patient_id == "PH0002" and os.environ.get("HAGAN_TEST_KILLER") == "1":
        os.kill(os.getpid(), signal.SIGKILL)
    return _real_prepare(record, cfg_dict, qct)


@pytest.mark.slow
def test_a_killed_reader_fails_its_series_only_and_a_rerun_encodes_it(tmp_path, monkeypatch, capsys):
    import pandas as pd

    import hagan_clinic.pipelines.encode as encode
    from hagan_clinic.cli import main
    from hagan_clinic.config import load_config
    from hagan_clinic.models.hagan import HAGAN
    from hagan_clinic.phantoms import write_cohort

    write_cohort(tmp_path / "cohort", 3, seed=0, shape=(24, 48, 48), progress=False)
    HAGAN.from_config(load_config("tiny")).save(tmp_path / "tiny.pt")
    monkeypatch.setattr(encode, "_safe_prepare", _prepare_or_die)  # pickled by name: workers import this module
    monkeypatch.setenv("HAGAN_TEST_KILLER", "1")
    out = tmp_path / "features.csv"
    args = ["encode", str(tmp_path / "cohort"), "--checkpoint", str(tmp_path / "tiny.pt"), "--out", str(out)]
    assert main([*args, "--workers", "1", "--no-tracking"]) == 0
    assert "2 ok, 0 skipped, 1 failed" in capsys.readouterr().out
    report = pd.read_csv(tmp_path / "features.report.csv", dtype=str, keep_default_na=False)
    assert dict(zip(report["patient_id"], report["reason"])) == {"PH0001": "", "PH0002": WORKER_DIED, "PH0003": ""}
    assert list(pd.read_csv(out)["patient_id"]) == ["PH0001", "PH0003"]

    # a re-run tries the series again: only its batch (PH0001, PH0002) is encoded again
    state = tmp_path / ".features.csv.state"
    untouched = (state / "batch_000001.npz").stat().st_mtime_ns
    monkeypatch.setenv("HAGAN_TEST_KILLER", "0")
    assert main([*args, "--workers", "0", "--no-tracking"]) == 0
    assert "3 ok, 0 skipped, 0 failed" in capsys.readouterr().out
    assert list(pd.read_csv(out)["patient_id"]) == ["PH0001", "PH0002", "PH0003"]
    assert (state / "batch_000001.npz").stat().st_mtime_ns == untouched


def test_a_damaged_state_file_means_not_done(tmp_path):
    records = _records(3)
    state = tmp_path / "state"
    run_series(records, partial(_kill_on, victim=""), state, progress=False)
    (state / f"{records[0].digest}.json").write_bytes(b"\xff\x00garbage")
    (state / f"{records[1].digest}.json").write_text('{"status": "ok", "val')  # cut short by a crash
    (state / f"{records[2].digest}.json").write_text('["ok"]')
    rows = run_series(records, partial(_kill_on, victim=""), state, progress=False)
    assert [r["status"] for r in rows] == ["ok"] * 3
    assert [r["value"] for r in rows] == ["uid:0", "uid:1", "uid:2"]


def test_a_full_disk_stops_preprocess_with_one_line_and_keeps_what_is_done(tmp_path, monkeypatch, capsys):
    """Writing the cache fails (a full disk): not each series' fault, so exit 2, not a manifest of failed rows."""
    import numpy as np

    from hagan_clinic.cli import main
    from hagan_clinic.phantoms import write_cohort

    write_cohort(tmp_path / "cohort", 2, seed=0, shape=(24, 48, 48), progress=False, extras=False)
    calls = []

    def full(file, array, *args, **kwargs):
        calls.append(file)
        if len(calls) > 1:
            raise OSError("32768 requested and 10176 written")  # numpy's short write: no errno
        return real_save(file, array, *args, **kwargs)

    real_save = np.save
    monkeypatch.setattr(np, "save", full)
    # --workers 0: the patched np.save lives in this process
    args = [
        "preprocess",
        str(tmp_path / "cohort"),
        "--out",
        str(tmp_path / "cache"),
        "--config",
        "tiny",
        "--workers",
        "0",
    ]
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2 and "cannot write" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "cache" / "manifest.csv").exists()
    assert len(list((tmp_path / "cache" / ".state").glob("*.json"))) == 1  # the first series is kept
    monkeypatch.setattr(np, "save", real_save)
    assert main(args) == 0
