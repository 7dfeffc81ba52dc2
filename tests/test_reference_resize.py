"""``data.resize: reference``: the reference implementation's preprocessing, for imported weights."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from test_reference_import import as_ours, narrow

from hagan_clinic.config import ConfigError, load_config
from hagan_clinic.io.cohort import discover, load_series
from hagan_clinic.io.volume import Volume
from hagan_clinic.models.hagan import HAGAN
from hagan_clinic.preprocessing import to_model_grid
from hagan_clinic.reference import import_reference_state_dicts
from hagan_clinic.sampling import generate_to_nifti

from conftest import tiny_config

REAL_DATA = Path(os.environ.get("HAGAN_CLINIC_REAL_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
CHEST = REAL_DATA / "chest_ct_lungdx_A0002_8mm_B40f"
REFERENCE = ("data.resize=reference", "data.spacing_mm=null")


def reference_maths(hu: np.ndarray, window, size: int) -> np.ndarray:
    """The reference's preprocessing as HAGAN.md states it, written here on its own: missing values are the
    window's floor; the window maps linearly to [-1, 1] with clipping; axial slices holding nothing but the floor
    are dropped wherever they are; the rest is resized to size^3 with scikit-image's resize (linear, anti-aliased
    when shrinking, the floor outside the volume), the library that preprocessing used."""
    from skimage.transform import resize

    lo, hi = window
    x = np.nan_to_num(hu.astype(np.float64), nan=lo)
    x = 2.0 * (np.clip(x, lo, hi) - lo) / (hi - lo) - 1.0
    x = x[np.any(x > -1.0, axis=(1, 2))]
    return resize(x, (size, size, size), order=1, mode="constant", cval=-1.0, anti_aliasing=True)


@pytest.mark.slow
@pytest.mark.skipif(not CHEST.is_dir(), reason="real validation data not present")
def test_reference_grid_equals_the_reference_maths_on_a_real_series():
    import highdicom as hd

    cfg = load_config("base", ["model.size=128", *REFERENCE])
    (record,) = discover(CHEST, "CT", 16, "refuse", progress=False).ok
    grid, info = to_model_grid(load_series(record), cfg)
    # the reference maths on an independent reading of the same files (highdicom, brought to the same axes)
    volume = hd.get_volume_from_series([pydicom.dcmread(p) for p in sorted(CHEST.iterdir())])
    hu = volume.to_patient_orientation("HPL").array  # (D, H, W): towards head, posterior, left
    expected = reference_maths(hu, cfg.data.window, 128)
    assert grid.shape == (128, 128, 128) and grid.dtype == np.float32
    np.testing.assert_allclose(grid, expected, atol=2e-5)
    assert info.origin is None  # no physical grid
    # the default mode gives another grid: the test can tell the two apart
    spacing_grid, _ = to_model_grid(load_series(record), load_config("base", ["model.size=128"]))
    assert np.abs(spacing_grid - expected).max() > 0.5


def test_reference_mode_drops_blank_slices_anywhere_and_resizes_anisotropically():
    rng = np.random.default_rng(0)
    hu = rng.uniform(-1100, 700, (40, 24, 56)).astype(np.float32)
    blank = [0, 1, 17, 18, 39]  # both ends and the middle
    hu[blank] = -1500.0  # below the window: blank after clipping
    hu[5, 3, 7] = np.nan
    cfg = tiny_config(*REFERENCE)
    grid, info = to_model_grid(Volume(hu=hu, spacing=(0.7, 0.7, 2.5)), cfg)
    np.testing.assert_allclose(grid, reference_maths(hu, cfg.data.window, 32), atol=2e-5)
    assert "5 blank slice(s) dropped" in "; ".join(info.notes)


def test_config_and_contract_record_the_mode():
    cfg = tiny_config(*REFERENCE)
    assert cfg.data_contract()["resize"] == "reference" and cfg.data_contract()["spacing_mm"] is None
    assert tiny_config().data_contract()["resize"] == "spacing"
    with pytest.raises(ConfigError, match="data.spacing_mm: null"):
        tiny_config("data.spacing_mm=null")
    for bad in ("[.inf, 1, 1]", "[.nan, 1, 1]", "[0, 1, 1]", "[-1, 1, 1]"):
        with pytest.raises(ConfigError, match="spacing_mm"):
            tiny_config(f"data.spacing_mm={bad}")


def test_import_reference_uses_reference_preprocessing_and_unknown_spacing():
    sds, _ = narrow(128, 0)
    model = import_reference_state_dicts(as_ours(sds), 128)
    assert model.config.data.resize == "reference" and model.config.data.spacing_mm is None
    chosen = import_reference_state_dicts(as_ours(sds), 128, ("data.resize=spacing", "data.spacing_mm=[1.5,1.5,1.5]"))
    assert chosen.config.data.resize == "spacing" and chosen.config.data.spacing_mm == (1.5, 1.5, 1.5)


def test_generate_without_spacing_says_so(tmp_path):
    model = HAGAN.from_config(tiny_config(*REFERENCE)).eval()
    (path,) = generate_to_nifti(model, 1, tmp_path)
    img = nib.load(str(path))
    assert "spacing unknown" in img.header["descrip"].item().decode()
    np.testing.assert_allclose(img.header.get_zooms(), (1.0, 1.0, 1.0))


def test_encode_applies_the_reference_preprocessing(tmp_path):
    from hagan_clinic.io.nifti import write_scan
    from hagan_clinic.pipelines.encode import prepare_one

    rng = np.random.default_rng(1)
    hu = rng.uniform(-1100, 700, (20, 48, 40)).astype(np.float32)
    hu[[0, 9]] = -1024.0
    volume = Volume(hu=hu, spacing=(0.8, 0.8, 3.0), origin=(-10.0, 20.0, -30.0))
    write_scan(tmp_path / "scans" / "a.nii.gz", volume, np.float32)
    cfg = tiny_config(*REFERENCE)
    (record,) = discover(tmp_path / "scans", "CT", 16, "refuse", progress=False).ok
    encoded = prepare_one(record, cfg.to_dict(), qct=False)["grid"]
    expected = reference_maths(hu, cfg.data.window, 32).astype(np.float16)
    np.testing.assert_allclose(encoded.astype(np.float32), expected.astype(np.float32), atol=1e-3)


def test_a_slice_with_one_voxel_above_the_floor_is_not_blank():
    """One voxel at -1020 HU in a 512^2 slice rounds the slice's float32 mean to exactly -1; it is not blank."""
    hu = np.full((20, 512, 512), -1100.0, np.float32)
    hu[3:17, 100:400, 120:380] = 30.0
    hu[1, 256, 256] = -1020.0
    cfg = tiny_config(*REFERENCE)
    grid, info = to_model_grid(Volume(hu=hu, spacing=(0.7, 0.7, 2.5)), cfg)
    assert info.box[0] == (1, 17)
    assert "5 blank slice(s) dropped" in "; ".join(info.notes)
    np.testing.assert_allclose(grid, reference_maths(hu, cfg.data.window, 32), atol=2e-5)


def test_reference_mode_windows_raw_mr_intensities():
    """For MR the reference clipped the raw intensities to its thresholds: no percentile scaling."""
    rng = np.random.default_rng(3)
    hu = rng.gamma(2.0, 40.0, (24, 40, 40)).astype(np.float32)
    hu[:3] = 0.0
    cfg = tiny_config(*REFERENCE, "data.modality=MR", "data.window=[0, 255]")
    grid, _ = to_model_grid(Volume(hu=hu, spacing=(1.0, 1.0, 1.0)), cfg)
    np.testing.assert_allclose(grid, reference_maths(hu, (0.0, 255.0), 32), atol=2e-5)
