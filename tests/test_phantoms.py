"""The phantom cohort: determinism, truth that matches its own labels, the clinical table, and DICOM round trips."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pydicom
import pytest
from scipy import ndimage

from hagan_clinic.errors import HaganError
from hagan_clinic.phantoms import (
    AIR,
    CLINICAL_COLUMNS,
    COUCH_CORE,
    COUCH_SHELL,
    CUSHION_FOAM,
    GAS,
    LUMEN,
    LUNG_LABELS,
    PARENCHYMA,
    WALL,
    PhantomError,
    check_shape,
    draw_cohort,
    draw_patient,
    gold_stage,
    parse_shape,
    render_thorax,
    write_cohort,
)
from hagan_clinic.phantoms.params import FAT

SMALL = (24, 48, 48)


def _read_series(folder) -> tuple[np.ndarray, list]:
    """HU (D, H, W) from a folder of single-slice files, sorted by position, and the datasets."""
    ds = sorted((pydicom.dcmread(f) for f in folder.glob("*.dcm")), key=lambda d: float(d.ImagePositionPatient[2]))
    hu = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in ds])
    return hu, ds


def test_draw_depends_on_seed_and_index_only():
    assert draw_patient(5, 3) == draw_patient(5, 3)
    assert draw_cohort(4, seed=5)[3] == draw_cohort(9, seed=5)[3]
    assert draw_patient(5, 3) != draw_patient(6, 3)
    assert draw_patient(5, 3).patient_id == "PH0004"


def test_render_is_deterministic():
    params = draw_patient(1, 0)
    a, b = render_thorax(params, SMALL), render_thorax(params, SMALL)
    np.testing.assert_array_equal(a.volume.hu, b.volume.hu)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.truth == b.truth


@pytest.mark.parametrize("index", [0, 2])  # seed 0: a sharp unpadded profile, a padded GE profile
def test_truth_matches_labels_and_final_hu(index):
    ph = render_thorax(draw_patient(0, index), SMALL)
    vol = ph.volume
    assert vol.hu.shape == SMALL and vol.hu.dtype == np.float32
    assert vol.spacing == pytest.approx((400 / 48, 400 / 48, 300 / 24))
    np.testing.assert_array_equal(vol.hu, np.rint(vol.hu))  # integers, as a DICOM reader will see them
    voxel_ml = np.prod(vol.spacing) / 1000
    assert ph.truth["lung_volume_ml"] == pytest.approx(ph.lung_mask.sum() * voxel_ml)
    assert ph.truth["laa950_pct"] == pytest.approx(np.mean(vol.hu[ph.lung_mask] < -950) * 100)
    assert ph.truth["perc15_hu"] == pytest.approx(np.percentile(vol.hu[ph.lung_mask], 15))
    assert not (ph.lung_mask & np.isin(ph.labels, (LUMEN, WALL, AIR))).any()
    assert 2000 < ph.truth["lung_volume_ml"] < 8000
    assert set(vol.meta) >= {"patient_id", "kernel", "manufacturer", "model", "slice_thickness_mm", "modality"}
    if vol.valid is not None:
        assert not vol.valid.all() and (vol.hu[~vol.valid] == -1024).all()
        assert not (ph.lung_mask & ~vol.valid).any()


def test_anatomy_is_in_mm_and_canonical():
    params = draw_patient(0, 4)
    a, b = render_thorax(params, (24, 48, 48)), render_thorax(params, (32, 64, 40))
    assert b.volume.spacing == pytest.approx((10.0, 6.25, 9.375))
    assert a.truth["lung_volume_ml"] == pytest.approx(b.truth["lung_volume_ml"], rel=0.05)
    top = a.labels[-1]  # the trachea runs out of the top (superior) slice, at the midline
    cols = np.nonzero((top == LUMEN).any(axis=0))[0]
    assert cols.size and abs(cols.mean() - 23.5) < 3
    lungs = a.labels == PARENCHYMA
    assert lungs[:, :, :24].sum() > 0 and lungs[:, :, 24:].sum() > 0


@pytest.mark.parametrize(
    "fev1pp, ratio, gold",
    [(95, 0.78, 0), (40, 0.70, 0), (85, 0.65, 1), (80, 0.5, 1), (79.9, 0.6, 2), (50, 0.6, 2), (49, 0.5, 3),
     (30, 0.4, 3), (29.9, 0.4, 4)],
)  # fmt: skip
def test_gold_rule(fev1pp, ratio, gold):
    assert gold_stage(fev1pp, ratio) == gold


def test_label_balance_and_spirometry_follow_severity():
    params = draw_cohort(40, seed=0)
    labels = np.array([gold_stage(p.fev1pp, p.fev1_fvc) >= 1 for p in params])
    assert 0.3 <= labels.mean() <= 0.7
    severity = np.array([p.severity for p in params])
    fev1pp = np.array([p.fev1pp for p in params])
    assert np.corrcoef(severity, fev1pp)[0, 1] < -0.7
    assert len({p.profile.name for p in params}) >= 4


def test_write_cohort_round_trip(tmp_path):
    table = write_cohort(tmp_path / "cohort", n=3, seed=0, shape=(16, 32, 32), progress=False)
    assert list(table.columns) == list(CLINICAL_COLUMNS)
    assert list(table.patient_id) == ["PH0001", "PH0002", "PH0003"]
    for row in table.itertuples():
        assert row.label == int(row.gold >= 1) and row.gold == gold_stage(row.fev1pp, row.fev1_fvc)
    csv = pd.read_csv(tmp_path / "cohort" / "clinical.csv")
    pd.testing.assert_frame_equal(csv, table, check_dtype=False)
    text = (tmp_path / "cohort" / "clinical.csv").read_text().upper()
    assert "PHANTOM^" not in text and not ({"PATIENTNAME", "BIRTH_DATE", "PATIENT_NAME"} & set(csv.columns.str.upper()))
    for i in range(3):
        ph = render_thorax(draw_patient(0, i), (16, 32, 32))
        hu, ds = _read_series(tmp_path / "cohort" / f"PH{i + 1:04d}" / "STUDY_1" / "SERIES_2")
        valid = ph.volume.valid if ph.volume.valid is not None else np.ones(hu.shape, bool)
        np.testing.assert_array_equal(hu[valid], ph.volume.hu[valid])
        assert str(ds[0].PatientName) == f"PHANTOM^PH{i + 1:04d}" and len(ds[0].PatientBirthDate) == 8
        assert ds[0].ConvolutionKernel == ph.volume.meta["kernel"]
        assert str(ds[0].PatientBirthDate) not in text
        assert len({d.StudyInstanceUID for d in ds}) == 1 and len({d.SeriesInstanceUID for d in ds}) == 1
        if ph.volume.valid is not None:
            assert "PixelPaddingValue" in ds[0] and (hu[~valid] < -1500).all()
    again = write_cohort(tmp_path / "again", n=1, seed=0, shape=(16, 32, 32), progress=False, extras=False)
    _, ds_again = _read_series(tmp_path / "again" / "PH0001" / "STUDY_1" / "SERIES_2")
    _, ds_first = _read_series(tmp_path / "cohort" / "PH0001" / "STUDY_1" / "SERIES_2")
    assert ds_again[0].StudyInstanceUID == ds_first[0].StudyInstanceUID
    pd.testing.assert_frame_equal(again, table.iloc[:1])


@pytest.mark.slow
def test_every_tenth_patient_gets_a_localizer(tmp_path):
    write_cohort(tmp_path, n=10, seed=2, shape=(16, 16, 16), progress=False)
    scouts = sorted(tmp_path.glob("*/STUDY_1/SERIES_1"))
    assert [s.parts[-3] for s in scouts] == ["PH0010"]
    (only,) = list(scouts[0].glob("*.dcm"))
    assert "LOCALIZER" in list(pydicom.dcmread(only).ImageType)


def _files(root) -> dict[str, bytes]:
    """Every file the cohort wrote, by name, but the outputs ledger (it records the table's modification time)."""
    from hagan_clinic.io.files import LEDGER_NAME

    return {
        str(f.relative_to(root)): f.read_bytes()
        for f in sorted(root.rglob("*"))
        if f.is_file() and f.name != LEDGER_NAME
    }


def test_workers_follow_the_shared_rule_and_give_the_same_files(tmp_path, monkeypatch):
    """workers 0: this process; N >= 1: a pool of N worker processes (as every --workers); the same bytes."""
    import hagan_clinic.phantoms.cohort as cohort_module

    pools = []

    class Recorded(cohort_module.ProcessPoolExecutor):
        def __init__(self, workers: int) -> None:
            pools.append(workers)
            super().__init__(workers)

    monkeypatch.setattr(cohort_module, "ProcessPoolExecutor", Recorded)
    tables, files = [], []
    for workers in (0, 1, 2):
        out = tmp_path / f"w{workers}"
        tables.append(write_cohort(out, n=3, seed=4, shape=(16, 16, 16), workers=workers, progress=False))
        files.append(_files(out))
    assert pools == [1, 2]
    assert len(files[0]) > 3 * 16 and "clinical.csv" in files[0]
    assert files[1] == files[0] and files[2] == files[0]  # every DICOM slice and the table, byte for byte
    pd.testing.assert_frame_equal(tables[1], tables[0])
    pd.testing.assert_frame_equal(tables[2], tables[0])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n": 0},
        {"n": 2.5},
        {"n": 1, "shape": (8, 64, 64)},
        {"n": 1, "shape": (64, 64)},
        {"n": 1, "workers": -1},
        {"n": 1, "workers": 1.5},
        {"n": 1, "workers": True},
    ],
)
def test_bad_arguments_raise(tmp_path, kwargs):
    with pytest.raises(PhantomError) as err:
        write_cohort(tmp_path, progress=False, **kwargs)
    assert isinstance(err.value, HaganError) and "\n" not in str(err.value)
    assert not (tmp_path / "clinical.csv").exists()


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("16,16", "expected three integers"),
        ("²,16,16", "expected three integers"),
        ("9" * 5000 + ",16,16", "expected three integers"),
        ("8,64,64", "from 16 to 2048"),
        ("2048x2048x2048", "voxels per series"),
    ],
)
def test_a_shape_is_parsed_and_bounded_in_one_public_place(text, needle):
    assert parse_shape("24,48x48") == parse_shape(" 24 , 48 , 48 ") == check_shape(np.array(SMALL)) == SMALL
    with pytest.raises(PhantomError, match=needle) as err:
        parse_shape(text)
    assert "\n" not in str(err.value) and len(str(err.value)) < 200


@pytest.mark.parametrize("index", [0, 2, 3])  # a sharp, a padded GE and a 3 mm Toshiba profile
def test_objects_outside_the_lungs_leave_patient_and_truth_unchanged(index):
    base = draw_patient(0, index)
    params = draw_patient(0, index, couch_mm=40, cushions=True, stomach=True)
    assert replace(params, couch=None, cushions=None, stomach=None) == base
    assert draw_patient(0, index, couch_mm=40).couch == params.couch  # each object has its own random stream
    a, b = render_thorax(base, SMALL), render_thorax(params, SMALL)
    assert a.truth == b.truth
    np.testing.assert_array_equal(a.lung_mask, b.lung_mask)
    np.testing.assert_array_equal(a.volume.hu[a.lung_mask], b.volume.hu[b.lung_mask])
    assert {COUCH_SHELL, COUCH_CORE, CUSHION_FOAM, GAS} <= set(np.unique(b.labels))
    assert not (np.isin(b.labels, LUNG_LABELS) & ~np.isin(a.labels, LUNG_LABELS)).any()


@pytest.mark.parametrize("shape", [SMALL, (48, 96, 96)])
@pytest.mark.parametrize("couch_mm", [10, 60])
def test_couch_is_a_closed_shell_under_the_back_inside_the_image(shape, couch_mm):
    ph = render_thorax(draw_patient(0, 0, couch_mm=couch_mm), shape)  # patient 0: a square field of view
    couch = np.isin(ph.labels, (COUCH_SHELL, COUCH_CORE))
    assert not (couch[:, 0].any() or couch[:, -1].any() or couch[:, :, 0].any() or couch[:, :, -1].any())
    air, _ = ndimage.label(ph.volume.hu < -400)
    core = ph.labels == COUCH_CORE
    faces = np.concatenate([air[:, 0].ravel(), air[:, -1].ravel(), air[:, :, 0].ravel(), air[:, :, -1].ravel()])
    assert core.any() and not np.isin(air[core], faces[faces > 0]).any()  # enclosed: outside air never reaches it
    shell = ph.labels == COUCH_SHELL
    touching = ndimage.binary_dilation(shell, np.ones((1, 3, 3), bool)) & (ph.labels == FAT)
    assert touching.any()  # the patient lies on the couch


@pytest.mark.parametrize("couch_mm", [-1, 61, "30", True])
def test_bad_couch_raises(tmp_path, couch_mm):
    with pytest.raises(PhantomError, match="couch_mm"):
        draw_patient(0, 0, couch_mm=couch_mm)
    with pytest.raises(PhantomError):
        write_cohort(tmp_path, n=1, couch_mm=couch_mm, progress=False)
    assert not (tmp_path / "clinical.csv").exists()
