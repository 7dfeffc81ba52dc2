"""``hagan-clinic preprocess``: a small synthetic cohort to a cache of model-grid volumes with a manifest; re-runs
resume, workers do not change the result, and nothing identifying reaches the cache."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from hagan_clinic.cli import main
from hagan_clinic.config import load_config
from hagan_clinic.data import VolumeFolder
from hagan_clinic.io.dicom_write import write_series
from hagan_clinic.io.volume import Volume

from conftest import ellipsoid_hu

SPACING = (10.0, 10.0, 10.0)  # (x, y, z) mm: 24 x 32 pixels of 10 mm fit the tiny config's 32 x 12 mm grid
NAME, BIRTH_DATE = "DOE^JANE", "19500101"
COLUMNS = ["patient_id", "study_uid", "series_uid", "path", "shape", "spacing", "kernel", "status", "reason"]


@pytest.fixture
def cohort(tmp_path):
    """Two CT series, a localizer, an MR series (all DICOM with a name and birth date), and a NIfTI scan."""
    root = tmp_path / "cohort"
    who = {"patient_name": NAME, "birth_date": BIRTH_DATE}
    write_series(root / "p1" / "ct", ellipsoid_hu((16, 24, 32), 1), SPACING, patient_id="P1", kernel="B30f", **who)
    write_series(root / "p2" / "ct", ellipsoid_hu((18, 24, 32), 2), SPACING, patient_id="P2", kernel="STANDARD", **who)
    write_series(
        root / "p2" / "scout",
        ellipsoid_hu((16, 24, 32), 3),
        SPACING,
        patient_id="P2",
        series_number=9,
        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
        **who,
    )
    write_series(root / "p3" / "mr", ellipsoid_hu((16, 24, 32), 4), SPACING, patient_id="P3", modality="MR", **who)
    hu = ellipsoid_hu((20, 24, 32), 5)
    affine = Volume(hu, SPACING).affine_ras()
    nib.save(nib.Nifti1Image(np.ascontiguousarray(hu.transpose(2, 1, 0)), affine), str(root / "p4.nii.gz"))
    return root


def preprocess(capsys, src, out, *args: str) -> tuple[int, str, str]:
    code = main(["preprocess", str(src), "--out", str(out), "--config", "tiny", *args])
    stdout, stderr = capsys.readouterr()
    return code, stdout, stderr


def read_manifest(cache) -> tuple[list[str], list[dict]]:
    with open(cache / "manifest.csv", newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames), list(reader)


def mtimes(cache) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (cache / "volumes").glob("*.npy")}


def assert_one_line_error(code: int, err: str, needle: str) -> None:
    assert code == 2
    assert err.strip().count("\n") == 0, err
    assert "hagan-clinic: error:" in err and needle in err
    assert "Traceback" not in err


def test_preprocess_writes_a_cache_and_a_manifest(capsys, cohort, tmp_path):
    cache = tmp_path / "cache"
    code, out, err = preprocess(capsys, cohort, cache)
    assert code == 0, err
    assert "3 ok, 2 skipped, 0 failed" in out

    columns, rows = read_manifest(cache)
    assert columns[: len(COLUMNS)] == COLUMNS
    assert len(rows) == 5  # one per series, whatever its status
    status = {(r["patient_id"], r["source"]): r["status"] for r in rows}
    assert status == {
        ("P1", "p1/ct"): "ok",
        ("P2", "p2/ct"): "ok",
        ("P2", "p2/scout"): "skipped",
        ("P3", "p3/mr"): "skipped",
        ("p4", "p4.nii.gz"): "ok",
    }
    reasons = {r["source"]: r["reason"] for r in rows if r["status"] != "ok"}
    assert "localizer" in reasons["p2/scout"] and "other modality" in reasons["p3/mr"]
    for row in rows:
        if row["status"] == "ok":
            volume = np.load(cache / row["path"])
            assert volume.shape == (32, 32, 32) and volume.dtype == np.float16
            assert np.isfinite(volume).all() and volume.min() >= -1.0 and volume.max() <= 1.0
            assert volume.max() > -0.5  # the body made it onto the grid
            assert row["spacing"] == "10x10x10" and row["reason"] == ""
        else:
            assert row["path"] == "" and row["reason"]
    by_source = {r["source"]: r for r in rows}
    assert by_source["p1/ct"]["shape"] == "16x24x32" and by_source["p1/ct"]["kernel"] == "B30f"
    assert by_source["p2/ct"]["shape"] == "18x24x32" and by_source["p2/ct"]["kernel"] == "STANDARD"
    assert by_source["p4.nii.gz"]["shape"] == "20x24x32"
    assert len({r["path"] for r in rows if r["status"] == "ok"}) == 3
    settings = json.loads((cache / "cache.json").read_text())
    assert settings["contract"] == load_config("tiny").data_contract()


def test_rerun_resumes(capsys, cohort, tmp_path):
    cache = tmp_path / "cache"
    assert preprocess(capsys, cohort, cache)[0] == 0
    manifest = (cache / "manifest.csv").read_text()
    first = mtimes(cache)
    arrays = {name: np.load(cache / "volumes" / name) for name in first}
    assert len(first) == 3

    # everything done: nothing is rewritten and the manifest is the same
    assert preprocess(capsys, cohort, cache)[0] == 0
    assert mtimes(cache) == first
    assert (cache / "manifest.csv").read_text() == manifest

    # one series lost its result: only that one is done again
    redo = sorted(first)[0]
    (cache / ".state" / redo.replace(".npy", ".json")).unlink()
    (cache / "volumes" / redo).unlink()
    assert preprocess(capsys, cohort, cache)[0] == 0
    again = mtimes(cache)
    assert set(again) == set(first)
    assert {k: v for k, v in again.items() if k != redo} == {k: v for k, v in first.items() if k != redo}
    np.testing.assert_array_equal(np.load(cache / "volumes" / redo), arrays[redo])
    assert (cache / "manifest.csv").read_text() == manifest


@pytest.mark.slow
def test_workers_do_not_change_the_result(capsys, cohort, tmp_path):
    assert preprocess(capsys, cohort, tmp_path / "one")[0] == 0
    code, _, err = preprocess(capsys, cohort, tmp_path / "two", "--workers", "2")
    assert code == 0, err
    manifest = (tmp_path / "one" / "manifest.csv").read_text()
    assert (tmp_path / "two" / "manifest.csv").read_text() == manifest
    _, rows = read_manifest(tmp_path / "one")
    ok = [r["path"] for r in rows if r["status"] == "ok"]
    assert len(ok) == 3
    for rel in ok:
        np.testing.assert_array_equal(np.load(tmp_path / "two" / rel), np.load(tmp_path / "one" / rel))


def test_other_settings_into_the_same_cache_are_refused(capsys, cohort, tmp_path):
    cache = tmp_path / "cache"
    assert preprocess(capsys, cohort, cache)[0] == 0
    manifest = (cache / "manifest.csv").read_text()
    code, _, err = preprocess(capsys, cohort, cache, "--set", "data.spacing_mm=[10,10,10]")
    assert_one_line_error(code, err, "other settings")
    assert (cache / "manifest.csv").read_text() == manifest


def test_missing_or_empty_source_is_an_error(capsys, tmp_path):
    code, _, err = preprocess(capsys, tmp_path / "nowhere", tmp_path / "cache")
    assert_one_line_error(code, err, "not found")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no scans here\n")
    code, _, err = preprocess(capsys, empty, tmp_path / "cache")
    assert_one_line_error(code, err, "no DICOM series")


def test_a_series_that_cannot_be_read_fails_alone(capsys, cohort, tmp_path):
    paths = sorted((cohort / "p2" / "ct").iterdir())
    paths[0].write_bytes(paths[0].read_bytes()[:-200])  # pixel data cut short
    code, out, err = preprocess(capsys, cohort, tmp_path / "cache")
    assert code == 0, err
    assert "2 ok, 2 skipped, 1 failed" in out
    _, rows = read_manifest(tmp_path / "cache")
    (failed,) = [r for r in rows if r["status"] == "failed"]
    assert failed["source"] == "p2/ct" and failed["reason"] and failed["path"] == ""


def test_nothing_identifying_reaches_the_cache(capsys, cohort, tmp_path):
    cache = tmp_path / "cache"
    assert preprocess(capsys, cohort, cache)[0] == 0
    texts = [p for p in cache.rglob("*") if p.is_file() and p.suffix != ".npy"]
    assert {p.name for p in texts} >= {"manifest.csv", "cache.json"}
    for path in texts:
        text = path.read_text()
        for secret in (NAME, "DOE", "JANE", BIRTH_DATE):
            assert secret not in text, (path.name, secret)


def test_manifest_is_a_training_table(capsys, cohort, tmp_path):
    cache = tmp_path / "cache"
    assert preprocess(capsys, cohort, cache)[0] == 0
    _, rows = read_manifest(cache)
    cfg = load_config("tiny", [f"data.dir={cache}", f"data.table={cache / 'manifest.csv'}"])
    data = VolumeFolder.from_config(cfg)
    assert sorted(data.files) == sorted(cache / r["path"] for r in rows if r["status"] == "ok")
    assert len(data) == 3
    for i in range(len(data)):
        assert data.load(i).shape == (32, 32, 32)


def test_the_summary_is_what_the_command_prints(tmp_path):
    from hagan_clinic.pipelines.preprocess import PreprocessResult

    result = PreprocessResult(tmp_path / "manifest.csv", {"ok": 3, "skipped": 1, "failed": 0}, [])
    assert result.summary() == f"3 ok, 1 skipped, 0 failed: {tmp_path / 'manifest.csv'}"
