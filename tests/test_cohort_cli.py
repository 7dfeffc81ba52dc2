"""The phantoms and qct commands end to end: the files a user gets, their accuracy against truth, resumption."""

from __future__ import annotations

import os

import pandas as pd
import pydicom
import pytest

from hagan_clinic.cli import main

SHAPE = "32,64,64"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort") / "phantoms"
    assert main(["phantoms", str(out), "--n", "11", "--seed", "3", "--shape", SHAPE]) == 0
    return out


@pytest.mark.slow
def test_phantoms_writes_series_and_clinical_table(cohort):
    clinical = pd.read_csv(cohort / "clinical.csv")
    assert list(clinical["patient_id"]) == [f"PH{i:04d}" for i in range(1, 12)]
    assert {"lung_volume_ml", "laa950_pct", "pct_emphysema", "fev1pp", "fev1_fvc", "gold", "label"} <= set(clinical)
    files = sorted(cohort.rglob("*.dcm"))
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert str(ds.PatientName).startswith("PHANTOM^")  # the fake name exists, so the checks below mean something
    assert len({pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID for f in files}) == 12  # + localizer


@pytest.mark.slow
def test_qct_matches_truth_and_carries_no_names(cohort, tmp_path):
    out = tmp_path / "qct.csv"
    assert main(["qct", str(cohort), "--out", str(out)]) == 0
    table = pd.read_csv(out, dtype={"reason": str, "warning": str})
    assert list(table.columns[:11]) == [
        "patient_id", "study_uid", "series_uid", "status", "reason", "lung_volume_ml", "laa950_pct", "perc15_hu",
        "kernel", "slice_thickness_mm", "warning",
    ]  # fmt: skip
    assert (table["status"] == "skipped").sum() == 1  # the localizer
    assert "localizer" in table.loc[table["status"] == "skipped", "reason"].iloc[0]
    ok = table[table["status"] == "ok"].merge(
        pd.read_csv(cohort / "clinical.csv"), on="patient_id", suffixes=("", "_t")
    )
    assert len(ok) == 11
    assert ((ok["lung_volume_ml"] / ok["lung_volume_ml_t"] - 1).abs() < 0.03).all()
    assert ((ok["laa950_pct"] - ok["laa950_pct_t"]).abs() < 1.0).all()
    sharp = ok["kernel"].isin(["B70f", "LUNG", "YB"])
    assert ok.loc[sharp, "warning"].str.contains("sharp kernel").all()
    text = out.read_text()
    assert "PHANTOM^" not in text and "PHANTOM" not in text
    assert not (tmp_path / ".qct.csv.state").exists()  # removed once the table is complete


@pytest.mark.slow
def test_qct_resumes_from_its_state(cohort, tmp_path, monkeypatch):
    import hagan_clinic.pipelines.qct as qct_pipeline

    out = tmp_path / "qct.csv"
    calls, stop = [], [True]
    real = qct_pipeline.measure_one

    def counting(record, irregular):
        calls.append(record.key)
        if stop[0] and len(calls) == 4:
            raise KeyboardInterrupt  # the user stops the run after three series
        return real(record, irregular)

    monkeypatch.setattr(qct_pipeline, "measure_one", counting)
    here = ["--workers", "0"]  # the replaced measure_one runs in this process only
    assert main(["qct", str(cohort), "--out", str(out), *here]) == 130
    assert not out.exists() and len(list((tmp_path / ".qct.csv.state").glob("*.json"))) == 3
    calls.clear()
    stop[0] = False
    assert main(["qct", str(cohort), "--out", str(out), *here]) == 0
    assert len(calls) == 11 - 3  # the three finished series are not measured again
    assert (pd.read_csv(out)["status"] == "ok").sum() == 11


@pytest.mark.parametrize(
    "args, message",
    [
        (["phantoms", "x", "--shape", "8,8"], "--shape"),
        (["phantoms", "x", "--shape", "8,64,64"], "shape"),
        (["qct", "missing_dir", "--out", "q.csv"], "not found"),
        (["qct", ".", "--out", "q.txt"], ".csv"),
    ],
)
def test_bad_arguments_are_one_line(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err


def test_phantoms_with_a_couch_keep_the_truth_and_qct_holds_it(cohort, tmp_path):
    out = tmp_path / "couch"
    args = ["phantoms", str(out), "--n", "3", "--seed", "3", "--shape", SHAPE, "--couch", "40", "--cushions"]
    assert main([*args, "--stomach"]) == 0
    truth = pd.read_csv(out / "clinical.csv")
    pd.testing.assert_frame_equal(truth, pd.read_csv(cohort / "clinical.csv").iloc[:3])  # same patients, same truth
    assert main(["qct", str(out), "--out", str(tmp_path / "qct.csv")]) == 0
    table = pd.read_csv(tmp_path / "qct.csv", dtype={"warning": str}).fillna({"warning": ""})
    ok = table[table["status"] == "ok"].merge(truth, on="patient_id", suffixes=("", "_t"))
    assert len(ok) == 3
    assert ((ok["lung_volume_ml"] / ok["lung_volume_ml_t"] - 1).abs() < 0.03).all()
    assert ((ok["laa950_pct"] - ok["laa950_pct_t"]).abs() < 1.0).all()
    assert not ok["warning"].str.contains("implausible|one lung|outside the body|edge of the field").any()


def _series(cohort) -> dict:
    """patient_id -> (series UID, volume) of each CT series in the cohort."""
    from hagan_clinic.io.cohort import discover, load_series

    found = discover(cohort, "CT", 16, progress=False)
    return {r.patient_id: (r.series_uid, load_series(r)) for r in found.ok}


@pytest.mark.slow
def test_qct_writes_each_lung_mask_as_nifti(cohort, tmp_path):
    import nibabel as nib
    import numpy as np

    from hagan_clinic.io.nifti import read_scan

    out, masks = tmp_path / "qct.csv", tmp_path / "masks"
    assert main(["qct", str(cohort), "--out", str(out), "--masks", str(masks)]) == 0
    table = pd.read_csv(out)
    ok = table[table["status"] == "ok"]
    assert sorted(p.name for p in masks.iterdir()) == sorted(f"{uid}.nii.gz" for uid in ok["series_uid"])
    assert (ok["mask"] == "own").all()
    series = _series(cohort)
    for row in ok.itertuples():
        uid, volume = series[row.patient_id]
        img = nib.load(masks / f"{uid}.nii.gz")
        assert img.get_data_dtype() == np.uint8 and nib.aff2axcodes(img.affine) == ("L", "P", "S")
        np.testing.assert_allclose(img.affine, volume.affine_ras(), atol=1e-3)
        mask = read_scan(masks / f"{uid}.nii.gz")
        assert mask.shape == volume.shape and set(np.unique(mask.hu)) <= {0.0, 1.0}
        assert mask.hu.sum() * np.prod(volume.spacing) / 1000 == pytest.approx(row.lung_volume_ml, abs=0.01)


@pytest.mark.slow
def test_qct_resumed_with_masks_writes_every_mask(cohort, tmp_path, monkeypatch):
    """A run killed after measuring (its state left behind) and resumed with --masks measures again rather than
    leaving the finished series without a mask."""
    import hagan_clinic.pipelines.qct as qct_pipeline

    out, masks = tmp_path / "qct.csv", tmp_path / "masks"
    with monkeypatch.context() as m:  # the kill: the state folder is never cleaned up
        m.setattr(qct_pipeline.shutil, "rmtree", lambda *a, **k: None)
        assert main(["qct", str(cohort), "--out", str(out)]) == 0
    assert (tmp_path / ".qct.csv.state").is_dir()
    assert main(["qct", str(cohort), "--out", str(out), "--masks", str(masks)]) == 0
    ok = pd.read_csv(out).query("status == 'ok'")
    assert sorted(p.name for p in masks.iterdir()) == sorted(f"{uid}.nii.gz" for uid in ok["series_uid"])


@pytest.mark.slow
def test_qct_measures_external_masks(cohort, tmp_path):
    import numpy as np

    from hagan_clinic.io.nifti import write_scan
    from hagan_clinic.io.volume import Volume
    from hagan_clinic.phantoms import draw_patient, render_thorax

    series = _series(cohort)
    folder = tmp_path / "masks"
    uid, volume = series["PH0001"]
    truth = render_thorax(draw_patient(3, 0), tuple(int(s) for s in SHAPE.split(","))).lung_mask
    write_scan(folder / f"{uid}.nii.gz", Volume(truth.astype(np.uint8), volume.spacing, volume.origin), np.uint8)
    uid2, volume2 = series["PH0002"]
    small = Volume(np.ones((4, 8, 8), np.uint8), volume2.spacing, volume2.origin)
    write_scan(folder / f"{uid2}.nii.gz", small, np.uint8)  # not the scan's grid
    out = tmp_path / "qct.csv"
    assert main(["qct", str(cohort), "--out", str(out), "--mask", str(folder)]) == 0
    table = pd.read_csv(out, dtype={"reason": str, "warning": str}).set_index("patient_id")
    clinical = pd.read_csv(cohort / "clinical.csv").set_index("patient_id")
    first = table.loc["PH0001"]
    assert first["status"] == "ok" and first["mask"] == "external"
    assert first["lung_volume_ml"] == pytest.approx(clinical.loc["PH0001", "lung_volume_ml"], abs=0.01)
    assert first["laa950_pct"] == pytest.approx(clinical.loc["PH0001", "laa950_pct"], abs=0.01)
    second = table.loc["PH0002"]
    assert second["status"] == "failed" and "shape" in second["reason"] and f"{uid2}.nii.gz" in second["reason"]
    third = table.loc["PH0003"]
    assert third["status"] == "ok" and third["mask"] == "own" and "no external mask" in third["warning"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["qct", ".", "--out", "q.csv", "--mask", "no_such_folder"], "--mask: no folder of lung masks"),
        (["phantoms", "x", "--couch", "70"], "'--couch': 70.0 is not in the range"),
        (["qct", ".", "--out", "q.csv", "--mask", ".", "--masks", "."], "--masks and --mask name one folder"),
    ],
)
def test_bad_mask_and_couch_arguments_are_one_line(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err


@pytest.mark.slow
def test_qct_state_of_an_older_version_is_not_trusted(cohort, tmp_path):
    """A state folder without the options it was made with (an older version's) is measured afresh."""
    import json

    from hagan_clinic.io.cohort import discover

    out = tmp_path / "qct.csv"
    state = tmp_path / ".qct.csv.state"
    state.mkdir()
    record = discover(cohort, "CT", 16, "refuse", progress=False).ok[0]
    stale = {"status": "ok", "lung_volume_ml": 9999.0, "laa950_pct": 99.0, "perc15_hu": 0.0, "warning": ""}
    (state / f"{record.digest}.json").write_text(json.dumps(stale))
    assert main(["qct", str(cohort), "--out", str(out)]) == 0
    assert not (pd.read_csv(out)["lung_volume_ml"] == 9999.0).any()


def test_mask_names_of_series_without_uid_never_collide(tmp_path):
    """Two NIfTI files whose cleaned names coincide ('a/ct.nii.gz' and 'a_ct.nii.gz') get two mask files."""
    import numpy as np

    from hagan_clinic.io.nifti import write_scan
    from hagan_clinic.phantoms import draw_patient, render_thorax

    src = tmp_path / "src"
    for i, rel in enumerate(("a/ct.nii.gz", "a_ct.nii.gz")):
        volume = render_thorax(draw_patient(0, i), (32, 64, 64)).volume
        write_scan(src / rel, volume, np.int16)
    masks = tmp_path / "masks"
    assert main(["qct", str(src), "--out", str(tmp_path / "q.csv"), "--masks", str(masks)]) == 0
    names = sorted(p.name for p in masks.iterdir())
    assert len(names) == 2 and all(n.startswith("a_ct_") for n in names), names


def test_qct_writes_the_table_format_its_name_or_format_says(tmp_path, capsys):
    src = tmp_path / "one"
    assert main(["phantoms", "--out", str(src), "-n", "1", "--seed", "3", "--shape", SHAPE]) == 0
    assert main(["qct", str(src), "--out", str(tmp_path / "q.csv")]) == 0
    assert main(["qct", str(src), "--out", str(tmp_path / "q.parquet")]) == 0
    text, parquet = pd.read_csv(tmp_path / "q.csv"), pd.read_parquet(tmp_path / "q.parquet")  # real parquet
    assert list(parquet.columns) == list(text.columns) and (parquet["status"] == "ok").all()
    pd.testing.assert_frame_equal(parquet[["lung_volume_ml", "laa950_pct"]], text[["lung_volume_ml", "laa950_pct"]])
    assert main(["qct", str(src), "--out", str(tmp_path / "q.table"), "--format", "parquet"]) == 0
    assert len(pd.read_parquet(tmp_path / "q.table")) == len(text)
    capsys.readouterr()
    assert main(["qct", str(src), "--out", str(tmp_path / "r.csv"), "--format", "parquet"]) == 2
    assert "r.csv" in capsys.readouterr().err and not (tmp_path / "r.csv").exists()


def _where(record) -> dict:
    """Which process ran the series (a module function: spawned workers import this module to run it)."""
    return {"pid": os.getpid(), "seconds": {"read": 0.5}}


def test_the_series_runner_follows_the_workers_rule_and_stores_no_timing(tmp_path):
    """workers 0: this process; N >= 1: N worker processes, as every --workers. The seconds --verbose shows never
    reach a row or a state file (a re-run's rows equal the first run's)."""
    from pathlib import Path

    from hagan_clinic.io.cohort import SeriesRecord
    from hagan_clinic.pipelines.cohort import SECONDS, run_series

    records = [
        SeriesRecord(f"uid:{i}", "dicom", (Path(f"s{i}.dcm"),), f"s{i}", "ok", series_uid=str(i)) for i in (1, 2)
    ]
    here = run_series(records, _where, tmp_path / "here", workers=0, progress=False)
    assert [r["pid"] for r in here] == [os.getpid()] * 2
    apart = run_series(records, _where, tmp_path / "apart", workers=1, progress=False)
    assert len({r["pid"] for r in apart}) == 1 and apart[0]["pid"] != os.getpid()
    for folder, rows in (("here", here), ("apart", apart)):
        assert all(SECONDS not in row and row["seconds"] == {"read": 0.5} for row in rows)  # fn's own columns stay
        assert not any(SECONDS in f.read_text() for f in (tmp_path / folder).glob("*.json"))
    assert run_series(records, _where, tmp_path / "here", workers=0, progress=False) == here


def test_an_unpicklable_function_for_worker_processes_is_a_programming_error(tmp_path):
    """With workers >= 1 a lambda failed in every worker, and each series was recorded as failed by it."""
    from hagan_clinic.io.cohort import discover
    from hagan_clinic.phantoms import write_cohort
    from hagan_clinic.pipelines.cohort import run_series

    write_cohort(tmp_path / "c", 2, seed=0, shape=(24, 48, 48), progress=False, extras=False)
    records = discover(tmp_path / "c", progress=False).ok
    with pytest.raises(TypeError, match="picklable"):
        run_series(records, lambda r: {}, tmp_path / "state", workers=2, progress=False)
    assert not list((tmp_path / "state").glob("*.json"))  # nothing recorded against the series
    rows = run_series(records, lambda r: {}, tmp_path / "state", workers=0, progress=False)
    assert [r["status"] for r in rows] == ["ok", "ok"]
