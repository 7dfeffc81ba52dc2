"""The phantoms and qct commands end to end: the files a user gets, their accuracy against truth, resumption."""

from __future__ import annotations

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


def test_phantoms_writes_series_and_clinical_table(cohort):
    clinical = pd.read_csv(cohort / "clinical.csv")
    assert list(clinical["patient_id"]) == [f"PH{i:04d}" for i in range(1, 12)]
    assert {"lung_volume_ml", "laa950_pct", "pct_emphysema", "fev1pp", "fev1_fvc", "gold", "label"} <= set(clinical)
    files = sorted(cohort.rglob("*.dcm"))
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert str(ds.PatientName).startswith("PHANTOM^")  # the fake name exists, so the checks below mean something
    assert len({pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID for f in files}) == 12  # + localizer


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


def test_qct_resumes_from_its_state(cohort, tmp_path, monkeypatch):
    import pipelines.qct as qct_pipeline

    out = tmp_path / "qct.csv"
    calls, stop = [], [True]
    real = qct_pipeline.measure_one

    def counting(record, irregular):
        calls.append(record.key)
        if stop[0] and len(calls) == 4:
            raise KeyboardInterrupt  # the user stops the run after three series
        return real(record, irregular)

    monkeypatch.setattr(qct_pipeline, "measure_one", counting)
    assert main(["qct", str(cohort), "--out", str(out)]) == 130
    assert not out.exists() and len(list((tmp_path / ".qct.csv.state").glob("*.json"))) == 3
    calls.clear()
    stop[0] = False
    assert main(["qct", str(cohort), "--out", str(out)]) == 0
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
