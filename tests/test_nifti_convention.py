"""One NIfTI convention everywhere: an asymmetric scan (a marker in one corner) through write, read, nibabel,
independent DICOM-to-NIfTI converters, preprocessing, training data, generation and encoding."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch

from hagan_clinic.data import VolumeFolder
from hagan_clinic.io.cohort import discover, load_series
from hagan_clinic.io.dicom_write import write_series
from hagan_clinic.io.nifti import from_model_range, read_scan, write_array, write_scan
from hagan_clinic.io.volume import Volume
from hagan_clinic.models.hagan import HAGAN
from hagan_clinic.preprocessing import model_input, to_model_grid
from hagan_clinic.qct import measure
from hagan_clinic.sampling import generate_to_nifti, sample_latent

from conftest import tiny_config

SPACING = (5.0, 4.0, 6.0)  # x, y, z: all different, so a swapped axis shows
ORIGIN = (-150.0, -120.0, -310.0)  # LPS of voxel (0, 0, 0)
MARKER = (3, 20, 15)  # (D, H, W): inferior, anterior, patient's right: a corner of the body, inside it


def marked_thorax(shape=(40, 72, 80)) -> np.ndarray:
    """A body ellipse with two air 'lungs' of different sizes and a 1000 HU marker near one corner (D, H, W)."""
    d, h, w = shape
    z, y, x = np.mgrid[:d, :h, :w].astype(np.float32)
    hu = np.full(shape, -1000.0, np.float32)
    body = ((y - h / 2) / (h * 0.45)) ** 2 + ((x - w / 2) / (w * 0.47)) ** 2 <= 1
    hu[body] = 40.0
    right = ((y - h / 2) / (h * 0.25)) ** 2 + ((x - w * 0.3) / (w * 0.13)) ** 2 <= 1
    left = ((y - h / 2) / (h * 0.2)) ** 2 + ((x - w * 0.7) / (w * 0.1)) ** 2 <= 1
    lungs = (right | left) & (z > 4) & (z < d - 4)
    hu[lungs] = -860.0
    hu[lungs & (z > d * 0.6)] = -970.0  # emphysema in the upper slices only: %LAA-950 is not symmetric in z
    hu[tuple(slice(m, m + 3) for m in MARKER)] = 1000.0
    return hu


def lps_of(index_dhw, spacing=SPACING, origin=ORIGIN) -> np.ndarray:
    d, h, w = index_dhw
    return np.asarray(origin) + np.asarray([w, h, d]) * np.asarray(spacing)


def brightest_world_ras(img) -> np.ndarray:
    """RAS mm of the centre of the brightest 3x3x3 block of a nibabel image, through its own affine."""
    data = np.asarray(img.dataobj, dtype=np.float32)
    ijk = np.argwhere(data >= data.max() - 1e-3).mean(axis=0)
    return nib.affines.apply_affine(img.affine, ijk)


def test_written_file_reads_back_identically_with_the_documented_axes(tmp_path):
    hu = marked_thorax()
    path = write_scan(tmp_path / "scan.nii.gz", Volume(hu=hu, spacing=SPACING, origin=ORIGIN), np.int16)
    img = nib.load(str(path))
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    np.testing.assert_allclose(img.get_qform(), img.get_sform(), atol=1e-4)
    np.testing.assert_allclose(img.header.get_zooms(), SPACING)
    back = read_scan(path)
    np.testing.assert_array_equal(back.hu, hu)
    assert back.spacing == SPACING and np.allclose(back.origin, ORIGIN)
    # nibabel, independently, puts the marker where the scan has it: LPS (x, y, z) -> RAS (-x, -y, z)
    marker_lps = lps_of(np.asarray(MARKER) + 1)
    np.testing.assert_allclose(brightest_world_ras(img), marker_lps * [-1, -1, 1], atol=1e-3)
    # brought to RAS, the array is the canonical one with x and y reversed
    ras = np.asarray(nib.as_closest_canonical(img).dataobj)
    np.testing.assert_array_equal(ras, np.transpose(hu, (2, 1, 0))[::-1, ::-1, :])


def test_aligned_array_is_centred_on_the_origin(tmp_path):
    hu = marked_thorax((8, 10, 12))
    img = nib.load(str(write_array(tmp_path / "g.nii", hu, (2.0, 3.0, 4.0))))
    assert int(img.header["sform_code"]) == 2 and int(img.header["qform_code"]) == 2
    centre = nib.affines.apply_affine(img.affine, (np.asarray(img.shape) - 1) / 2)
    np.testing.assert_allclose(centre, 0.0, atol=1e-6)


@pytest.fixture(scope="module")
def dicom_scan(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dicom") / "series"
    hu = marked_thorax()
    write_series(folder, hu, SPACING, origin=ORIGIN, patient_id="MARK01", kernel="B30f", shuffle=False)
    return folder, hu


def _independent_nifti(tool: str, folder: Path, out: Path) -> Path:
    if tool == "highdicom":
        import highdicom as hd

        datasets = [pydicom.dcmread(p) for p in sorted(folder.iterdir())]
        nib.save(hd.get_volume_from_series(datasets).to_nibabel(), str(out))
    else:
        import dicom2nifti

        dicom2nifti.dicom_series_to_nifti(str(folder), str(out), reorient_nifti=True)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("tool", ["highdicom", "dicom2nifti"])
def test_dicom_and_independent_nifti_give_the_same_grid_qct_and_features(tmp_path, dicom_scan, tool):
    folder, hu = dicom_scan
    cfg = tiny_config()
    (record,) = discover(folder, "CT", 16, "refuse", progress=False).ok
    from_dicom = load_series(record)
    np.testing.assert_array_equal(from_dicom.hu, hu)  # the DICOM reader itself keeps the marker in place
    nifti = read_scan(_independent_nifti(tool, folder, tmp_path / f"{tool}.nii.gz"))
    np.testing.assert_allclose(nifti.hu, hu, atol=0.5)
    np.testing.assert_allclose(nifti.spacing, SPACING, atol=1e-4)
    np.testing.assert_allclose(nifti.origin, ORIGIN, atol=1e-3)

    grid_dicom, info_dicom = to_model_grid(from_dicom, cfg)
    grid_nifti, info_nifti = to_model_grid(nifti, cfg)
    assert info_dicom.box == info_nifti.box
    np.testing.assert_allclose(grid_nifti, grid_dicom, atol=1e-5)
    # the marker survives preprocessing in its corner: right (low W), anterior (low H), inferior (low D)
    peak = np.unravel_index(np.argmax(grid_dicom), grid_dicom.shape)
    assert all(p < s / 2 for p, s in zip(peak, grid_dicom.shape)), peak

    qct_dicom = measure(from_dicom.hu.astype(np.float32), from_dicom.spacing, from_dicom.valid)
    qct_nifti = measure(nifti.hu, nifti.spacing, nifti.valid)
    for key in ("lung_volume_ml", "laa950_pct", "perc15_hu"):
        assert qct_nifti[key] == pytest.approx(qct_dicom[key], abs=1e-3), key

    model = HAGAN.from_config(cfg).eval()
    with torch.no_grad():
        grids = np.stack([model_input(from_dicom, cfg), model_input(nifti, cfg)])
        z = model.encode(torch.from_numpy(grids)[:, None])
        flipped = model.encode(torch.from_numpy(grids[:1, :, :, ::-1].copy())[:, None])
    torch.testing.assert_close(z[0], z[1], atol=1e-5, rtol=0)
    assert (flipped[0] - z[0]).abs().max() > 1e-3  # the features do see a left-right flip


def test_training_reads_nifti_exactly_as_encode(tmp_path, dicom_scan):
    """A NIfTI file stored in another orientation (RAS) reaches the training loop as encode prepares it."""
    from hagan_clinic.pipelines.encode import prepare_one

    folder, hu = dicom_scan
    nii = tmp_path / "train" / "scan.nii.gz"
    nii.parent.mkdir()
    _independent_nifti("highdicom", folder, nii)
    cfg = tiny_config()
    data = VolumeFolder.from_config(cfg, nii.parent)
    (record,) = discover(nii.parent, "CT", 16, "refuse", progress=False).ok
    encoded = prepare_one(record, cfg.to_dict(), qct=False)["grid"].astype(np.float32)
    np.testing.assert_array_equal(data.load(0), encoded)


def test_generated_nifti_equals_model_generate_in_ras(tmp_path):
    cfg = tiny_config()
    model = HAGAN.from_config(cfg).eval()
    (path,) = generate_to_nifti(model, 1, tmp_path, seed=7)
    with torch.no_grad():
        volume = model.generate(sample_latent(7, 0, cfg.model.latent_dim))[0, 0].numpy()
    expected_hu = from_model_range(volume, cfg.data.window)  # (D, H, W) in LPS
    img = nib.load(str(path))
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
    assert int(img.header["sform_code"]) == 2 and int(img.header["qform_code"]) == 2
    np.testing.assert_allclose(img.header.get_zooms(), cfg.data.spacing_mm)
    ras = nib.as_closest_canonical(img).get_fdata()
    np.testing.assert_allclose(ras, np.transpose(expected_hu, (2, 1, 0))[::-1, ::-1, :], atol=0.51)
    np.testing.assert_allclose(read_scan(path).hu, expected_hu, atol=0.51)


def test_preprocess_nifti_views_sit_where_the_scan_is(tmp_path, dicom_scan):
    from hagan_clinic.pipelines.preprocess import run

    folder, hu = dicom_scan
    cfg = tiny_config("data.spacing_mm=[8, 8, 8]")
    result = run(folder, tmp_path / "cache", cfg, progress=False, nifti=True)
    (row,) = [r for r in result.rows if r["status"] == "ok"]
    view = tmp_path / "cache" / "nifti" / (Path(row["path"]).stem + ".nii.gz")
    img = nib.load(str(view))
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S") and int(img.header["sform_code"]) == 1
    grid = np.load(tmp_path / "cache" / row["path"]).astype(np.float32)
    np.testing.assert_allclose(read_scan(view).hu, from_model_range(grid, cfg.data.window), atol=0.51)
    # the marker's position in the world, seen through the view's affine, is where the scan has it (within a
    # grid voxel: the grid is 8 mm, the source 4-6 mm)
    marker_ras = lps_of(np.asarray(MARKER) + 1) * [-1, -1, 1]
    assert np.abs(brightest_world_ras(img) - marker_ras).max() <= 8.0


def test_non_finite_voxels_are_no_measurement_and_never_silent(tmp_path):
    """NaN or inf in a NIfTI scan is read as 'no measurement' (never air or tissue), noted, and a lung that runs
    into it is reported as partial rather than measured short without a word."""
    from hagan_clinic.phantoms import draw_patient, render_thorax

    ph = render_thorax(draw_patient(0, 1), (48, 96, 96))
    hu = ph.volume.hu.astype(np.float32)
    hu[24] = np.nan  # one slice through the lungs lost
    hu[30, 5, 5] = np.inf
    path = write_scan(tmp_path / "nan.nii.gz", Volume(hu=hu, spacing=ph.volume.spacing), np.float32)
    volume = read_scan(path)
    assert np.isfinite(volume.hu).all()
    assert volume.valid is not None and not volume.valid[24].any() and not volume.valid[30, 5, 5]
    assert "9217 non-finite voxels" in volume.meta["notes"]
    res = measure(volume.hu, volume.spacing, volume.valid)
    assert np.isfinite([res["lung_volume_ml"], res["laa950_pct"], res["perc15_hu"]]).all()
    assert "edge of the field of view" in res["warning"]


def _marker_world(img, threshold: float) -> np.ndarray:
    """Intensity-weighted centre (RAS mm) of the voxels above ``threshold``, through the image's own affine."""
    data = np.asarray(img.dataobj, dtype=np.float64)
    ijk = np.argwhere(data > threshold)
    w = data[tuple(ijk.T)] - threshold
    return nib.affines.apply_affine(img.affine, (ijk * w[:, None]).sum(0) / w.sum())


def test_preprocess_nifti_view_puts_the_marker_where_the_scan_has_it_to_a_fraction_of_a_voxel(tmp_path):
    """16 slices of 1 mm on a 1.5 mm grid become 11 slices 1.45 mm apart: the view's affine must say so, or the
    anatomy drifts by a fraction of a millimetre per voxel away from the origin."""
    from hagan_clinic.pipelines.preprocess import run

    d, h, w = 16, 48, 48
    hu = np.full((d, h, w), -1000.0, np.float32)
    hu[:, 4:44, 4:44] = 40.0
    hu[10:13, 30:33, 8:11] = 1500.0
    source = Volume(hu=hu, spacing=(1.0, 1.0, 1.0), origin=(-20.0, 35.0, 100.0))
    write_scan(tmp_path / "src" / "scan.nii.gz", source, np.int16)
    cfg = tiny_config("data.spacing_mm=[1.5, 1.5, 1.5]")
    run(tmp_path / "src", tmp_path / "cache", cfg, progress=False, nifti=True)
    (view,) = (tmp_path / "cache" / "nifti").iterdir()
    src_img = nib.load(str(tmp_path / "src" / "scan.nii.gz"))
    error = np.abs(_marker_world(nib.load(str(view)), 300.0) - _marker_world(src_img, 300.0))
    assert error.max() < 0.25 * 1.5, error


def test_oblique_source_view_claims_no_scanner_position(tmp_path):
    from hagan_clinic.pipelines.preprocess import run

    hu = marked_thorax((24, 48, 48))
    angle = np.deg2rad(15)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([-4.0, -4.0, 6.0])
    img = nib.Nifti1Image(np.transpose(hu, (2, 1, 0)).astype(np.int16), affine)
    img.set_qform(affine, code=1)
    (tmp_path / "src").mkdir()
    nib.save(img, str(tmp_path / "src" / "oblique.nii.gz"))
    result = run(tmp_path / "src", tmp_path / "cache", tiny_config(), progress=False, nifti=True)
    (row,) = result.rows
    assert row["status"] == "ok" and "oblique" in row["notes"] and row["grid_origin"] == ""
    (view,) = (tmp_path / "cache" / "nifti").iterdir()
    header = nib.load(str(view)).header
    assert int(header["sform_code"]) == 2 and b"oblique" in header["descrip"].item()


def test_training_on_a_cache_with_views_uses_each_scan_once(tmp_path, dicom_scan):
    from hagan_clinic.pipelines.preprocess import run

    folder, _ = dicom_scan
    cfg = tiny_config()
    run(folder, tmp_path / "cache", cfg, progress=False, nifti=True)
    data = VolumeFolder.from_config(cfg, tmp_path / "cache")
    assert len(data) == 1 and data.files[0].suffix == ".npy"


def test_training_refuses_a_bad_scan_before_it_starts(tmp_path):
    from hagan_clinic.data import DataError

    good = Volume(hu=marked_thorax((24, 48, 48)), spacing=SPACING)
    write_scan(tmp_path / "scans" / "good.nii.gz", good, np.int16)
    air = Volume(hu=np.full((24, 48, 48), -1000.0, np.float32), spacing=SPACING)
    write_scan(tmp_path / "scans" / "air.nii.gz", air, np.int16)
    with pytest.raises(DataError, match="air.nii.gz: no body found"):
        VolumeFolder.from_config(tiny_config(), tmp_path / "scans")


def test_files_of_the_earlier_mirrored_convention_are_refused(tmp_path):
    from hagan_clinic.io.volume import SeriesError

    img = nib.Nifti1Image(np.zeros((6, 5, 4), np.int16), np.diag([12.0, 12.0, 12.0, 1.0]))
    img.header["descrip"] = b"hagan-clinic seed=0 index=0"
    nib.save(img, str(tmp_path / "old.nii.gz"))
    with pytest.raises(SeriesError, match="earlier hagan-clinic"):
        read_scan(tmp_path / "old.nii.gz")


@pytest.mark.parametrize(
    ("values", "dtype", "stored", "expected"),
    [
        (np.array([40000, -40000, 7], np.int32), np.int16, np.int16, [32767, -32768, 7]),
        (np.array([1.5, -2.25, 0.0], np.float16), None, np.float32, [1.5, -2.25, 0.0]),
        (np.array([3, 2**40, -5], np.int64), None, np.int32, [3, 2**31 - 1, -5]),
        (np.array([True, False, True]), None, np.uint8, [1, 0, 1]),
    ],
)
def test_writer_stores_any_array_without_wrapping(tmp_path, values, dtype, stored, expected):
    path = write_array(tmp_path / "a.nii", values.reshape(1, 1, 3), (1.0, 1.0, 1.0), dtype=dtype)
    img = nib.load(str(path))
    assert img.get_data_dtype() == stored
    np.testing.assert_array_equal(np.asarray(img.dataobj).ravel(), expected)
