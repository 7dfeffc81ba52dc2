"""Reading scans: HU and geometry round trips through DICOM and NIfTI, and the reasons discovery gives for a series.

Series are written by :mod:`hagan_clinic.io.dicom_write` from a canonical (D, H, W) = (z, y, x) LPS volume, so a
correct reader gives back the very array it was written from, whatever the scanner-like scrambling in between.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pydicom
import pytest

from hagan_clinic.io.cohort import discover, load_series
from hagan_clinic.io.dicom import read_dicom_series, read_header
from hagan_clinic.io.dicom_write import write_enhanced, write_series
from hagan_clinic.io.nifti import read_scan
from hagan_clinic.io.volume import SeriesError, Volume

SHAPE = (16, 24, 32)  # (D, H, W): 16 slices (discovery's default minimum) of 24 rows x 32 columns
SPACING = (0.7, 0.8, 2.5)  # (x, y, z) mm, all different so a swapped axis shows
ORIGIN = (-11.2, 23.4, -40.0)  # LPS mm of voxel (0, 0, 0)


def random_hu(shape=SHAPE, seed: int = 0, low: int = -1024, high: int = 2000) -> np.ndarray:
    """Integer HU (what a CT stores) as float32 (D, H, W)."""
    return np.random.default_rng(seed).integers(low, high, shape, endpoint=True).astype(np.float32)


def body(shape=SHAPE) -> np.ndarray:
    """An ellipsoid of soft tissue (40 HU) in air (-1024 HU), float32 (D, H, W)."""
    grid = np.indices(shape).astype(np.float32)
    r2 = sum(((g - (n - 1) / 2) / (0.4 * n)) ** 2 for g, n in zip(grid, shape))
    return np.where(r2 < 1.0, 40.0, -1024.0).astype(np.float32)


def flip_in_plane(paths) -> None:
    """Rewrite axial files as a scanner that stores the image rotated by 180 degrees would: pixels flipped along
    rows and columns, both direction cosines negated, and the position of the new first pixel (the old last)."""
    for path in paths:
        ds = pydicom.dcmread(path)
        raw = ds.pixel_array
        rows, cols = raw.shape
        dy, dx = (float(v) for v in ds.PixelSpacing)
        orientation = np.array(ds.ImageOrientationPatient, float)
        row_cos, col_cos = orientation[:3], orientation[3:]
        last = np.array(ds.ImagePositionPatient, float) + (cols - 1) * dx * row_cos + (rows - 1) * dy * col_cos
        ds.PixelData = np.ascontiguousarray(raw[::-1, ::-1]).tobytes()
        ds.ImageOrientationPatient = [float(v) for v in np.r_[-row_cos, -col_cos]]
        ds.ImagePositionPatient = [float(v) for v in last]
        ds.save_as(path, enforce_file_format=True)


# ---- HU and geometry round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize("transfer_syntax", ["explicit", "implicit", "rle"])
@pytest.mark.parametrize("per_slice_rescale", [False, True])
@pytest.mark.parametrize("storage", ["int16", "uint16"])
def test_hu_and_spacing_round_trip(tmp_path, storage, per_slice_rescale, transfer_syntax):
    hu = random_hu()  # >= -1024 HU, so uint16 with intercept -1024 represents every value
    paths = write_series(
        tmp_path / "s",
        hu,
        SPACING,
        origin=ORIGIN,
        patient_id="P1",
        storage=storage,
        per_slice_rescale=per_slice_rescale,
        transfer_syntax=transfer_syntax,
        shuffle=True,
    )
    instance_numbers = [int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber) for p in paths]
    assert instance_numbers != sorted(instance_numbers)  # the writer did scramble them
    assert [p.name for p in paths] != sorted(p.name for p in paths)

    volume = read_dicom_series(paths[::-1])
    # integers with slope 1 stay exact int16; a fractional per-slice slope needs float32
    assert volume.hu.dtype == (np.float32 if per_slice_rescale else np.int16) and volume.shape == SHAPE
    assert np.abs(volume.hu.astype(np.float32) - hu).max() == 0
    assert volume.valid is None
    np.testing.assert_allclose(volume.spacing, SPACING, rtol=1e-6)
    np.testing.assert_allclose(volume.origin, ORIGIN, atol=1e-4)


@pytest.mark.parametrize("transfer_syntax", ["jpeg2000", "jpegls"])
@pytest.mark.parametrize("storage", ["int16", "uint16"])
def test_lossless_compressed_round_trip(tmp_path, storage, transfer_syntax):
    hu = random_hu((3, 64, 64), seed=1)  # the JPEG 2000 encoder wants images of 64 pixels or more
    paths = write_series(tmp_path / "s", hu, SPACING, patient_id="P1", storage=storage, transfer_syntax=transfer_syntax)
    assert pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID.is_compressed
    volume = read_dicom_series(paths)
    assert np.abs(volume.hu - hu).max() == 0
    np.testing.assert_allclose(volume.spacing, SPACING, rtol=1e-6)


def test_slices_are_ordered_by_position_not_by_instance_number_or_name(tmp_path):
    hu = random_hu(seed=2)
    depth = SHAPE[0]
    # the same patient scanned head first: file k is the slice at z = (D - 1 - k) * dz
    positions = np.arange(depth)[::-1] * SPACING[2]
    paths = write_series(tmp_path / "s", hu[::-1], SPACING, origin=ORIGIN, patient_id="P1", positions_z=positions)
    volume = read_dicom_series(paths)
    assert np.abs(volume.hu - hu).max() == 0
    np.testing.assert_allclose(volume.origin, ORIGIN, atol=1e-4)
    np.testing.assert_allclose(volume.spacing, SPACING, rtol=1e-6)


@pytest.mark.parametrize("rotated", [False, True], ids=["as_written", "stored_rotated"])
def test_marker_lands_at_its_patient_position(tmp_path, rotated):
    """A bright voxel at the patient's left, anterior, superior corner ends up at canonical (D-2, 1, W-2), and the
    volume's affine puts it where the DICOM header of the file holding it says it is."""
    depth, rows, cols = SHAPE
    hu = np.full(SHAPE, -1024.0, np.float32)
    marker = (depth - 2, 1, cols - 2)  # superior (high z), anterior (low y), patient left (high x)
    hu[marker] = 1000.0
    paths = write_series(tmp_path / "s", hu, SPACING, origin=ORIGIN, patient_id="P1")
    if rotated:
        flip_in_plane(paths)
        assert read_header(paths[0]).orientation == (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0)

    volume = read_dicom_series(paths)
    assert np.unravel_index(np.argmax(volume.hu), volume.shape) == marker
    np.testing.assert_array_equal(volume.hu, hu)

    # the marker's LPS position from the raw file that contains it, independently of the reader
    for path in paths:
        ds = pydicom.dcmread(path)
        raw = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        if raw.max() > 0:
            r, c = np.unravel_index(np.argmax(raw), raw.shape)
            o = np.array(ds.ImageOrientationPatient, float)
            dy, dx = (float(v) for v in ds.PixelSpacing)
            expected = np.array(ds.ImagePositionPatient, float) + c * dx * o[:3] + r * dy * o[3:]
    d, h, w = marker
    np.testing.assert_allclose((volume.affine_lps() @ [w, h, d, 1.0])[:3], expected, atol=1e-4)
    centre = (volume.affine_lps() @ [(cols - 1) / 2, (rows - 1) / 2, (depth - 1) / 2, 1.0])[:3]
    assert expected[0] > centre[0] and expected[1] < centre[1] and expected[2] > centre[2]  # L, A, S in LPS


@pytest.mark.parametrize("reverse", [False, True])
def test_enhanced_multiframe_round_trip(tmp_path, reverse):
    hu = random_hu(seed=3)
    path = write_enhanced(tmp_path / "enh.dcm", hu, SPACING, origin=ORIGIN, patient_id="P1", reverse=reverse)
    volume = read_dicom_series([path])
    assert np.abs(volume.hu - hu).max() == 0
    np.testing.assert_allclose(volume.spacing, SPACING, rtol=1e-6)
    np.testing.assert_allclose(volume.origin, ORIGIN, atol=1e-4)
    record = discover(tmp_path, progress=False).records
    assert [(r.status, r.n_slices) for r in record] == [("ok", SHAPE[0])]


# ---- padding and the field of view --------------------------------------------------------------------------


# -1100 HU is above the -1500 HU cut-off for padding: only PixelPaddingValue says those voxels are not air
@pytest.mark.parametrize("padding_hu", [-1100.0, -2000.0, -3024.0])
def test_pixel_padding_becomes_invalid(tmp_path, padding_hu):
    hu = random_hu(seed=4)
    _, h, w = np.indices(SHAPE)
    valid = (h - 11.5) ** 2 + (w - 15.5) ** 2 < 11.0**2  # the scanner's circular field of view
    paths = write_series(tmp_path / "s", hu, SPACING, patient_id="P1", valid=valid, padding_hu=padding_hu)
    assert "PixelPaddingValue" in pydicom.dcmread(paths[0])

    volume = read_dicom_series(paths)
    assert volume.valid is not None
    np.testing.assert_array_equal(volume.valid, valid)
    assert np.all(volume.hu[~valid] == -1024.0)
    np.testing.assert_array_equal(volume.hu[valid], hu[valid])


def test_values_below_minus_1500_hu_without_padding_tag_are_invalid(tmp_path):
    hu = random_hu(seed=5)
    outside = np.zeros(SHAPE, bool)
    outside[:, :4, :] = outside[:, :, -3:] = True
    hu[outside] = -2048.0
    paths = write_series(tmp_path / "s", hu, SPACING, patient_id="P1")
    assert "PixelPaddingValue" not in pydicom.dcmread(paths[0])

    volume = read_dicom_series(paths)
    np.testing.assert_array_equal(volume.valid, ~outside)
    assert np.all(volume.hu[outside] == -1024.0)
    np.testing.assert_array_equal(volume.hu[~outside], hu[~outside])


# ---- discovery: what is found, what is skipped and why ------------------------------------------------------


def _gap():
    return {"positions_z": np.r_[np.arange(8), np.arange(9, 17)] * SPACING[2]}


def _uneven():
    steps = np.where(np.arange(SHAPE[0] - 1) % 2, 2.5, 3.0)  # too uneven to be one spacing, too small to be a gap
    return {"positions_z": np.r_[0.0, np.cumsum(steps)]}


BROKEN = {
    "gap": (_gap, "missing slices"),
    "uneven": (_uneven, "non-uniform"),
    "tilt": (lambda: {"tilt_deg": 10.0}, "gantry tilt"),
    "localizer": (lambda: {"image_type": ("ORIGINAL", "PRIMARY", "LOCALIZER")}, "localizer"),
    "derived": (lambda: {"image_type": ("DERIVED", "SECONDARY")}, "derived"),
    "mr": (lambda: {"modality": "MR"}, "other modality"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_discovery_skips_with_a_reason(tmp_path, case):
    make, reason = BROKEN[case]
    root = tmp_path / "cohort"
    write_series(root / "good", body(), SPACING, patient_id="A")
    write_series(root / "bad", body(), SPACING, patient_id="B", **make())
    found = discover(root, progress=False)
    by_patient = {r.patient_id: r for r in found.records}
    assert set(by_patient) == {"A", "B"}
    assert by_patient["A"].status == "ok" and by_patient["A"].n_slices == SHAPE[0]
    assert by_patient["B"].status == "skipped"
    assert reason in by_patient["B"].reason
    assert found.counts() == {"ok": 1, "skipped": 1, "failed": 0}


def test_too_few_slices_are_skipped(tmp_path):
    write_series(tmp_path / "short", body()[:4], SPACING, patient_id="A")
    (record,) = discover(tmp_path, progress=False).records
    assert record.status == "skipped" and "too few slices" in record.reason
    (record,) = discover(tmp_path, min_slices=4, progress=False).records
    assert record.status == "ok"


def test_several_orientations_in_one_series_are_skipped(tmp_path):
    series_uid = "1.2.826.0.1.3680043.8.498.1"
    hu = body()
    write_series(tmp_path / "a", hu[:8], SPACING, patient_id="A", series_uid=series_uid)
    write_series(
        tmp_path / "b",
        hu[8:],
        SPACING,
        patient_id="A",
        series_uid=series_uid,
        tilt_deg=5.0,
        origin=(0.0, 0.0, 8 * SPACING[2]),
    )
    (record,) = discover(tmp_path, progress=False).records
    assert record.status == "skipped" and "several orientations" in record.reason
    assert len(record.paths) == SHAPE[0]


def test_two_series_in_one_folder_are_two_records(tmp_path):
    a = write_series(tmp_path / "mixed", body(), SPACING, patient_id="A", series_number=1)
    b = write_series(tmp_path / "mixed", random_hu(), SPACING, patient_id="A", series_number=2)
    records = discover(tmp_path, progress=False).records
    assert len(records) == 2 and all(r.status == "ok" for r in records)
    assert {frozenset(r.paths) for r in records} == {frozenset(a), frozenset(b)}
    assert len({r.series_uid for r in records}) == 2


def test_identical_duplicates_are_dropped(tmp_path):
    hu = random_hu(seed=6)
    with_copy = np.concatenate([hu[:8], hu[7:8], hu[8:15]])  # slice 7 twice, 16 files for 15 positions
    positions = np.r_[np.arange(8), 7, np.arange(8, 15)] * SPACING[2]
    write_series(tmp_path / "s", with_copy, SPACING, patient_id="A", positions_z=positions)
    (record,) = discover(tmp_path, progress=False).records
    assert record.status == "ok"
    volume = load_series(record)
    assert volume.shape == (15, *SHAPE[1:])
    assert np.abs(volume.hu - hu[:15]).max() == 0
    assert "duplicate" in volume.meta["notes"]


def test_duplicates_with_different_pixels_are_refused(tmp_path):
    hu = random_hu(seed=7)
    positions = np.r_[np.arange(8), 7, np.arange(8, 15)] * SPACING[2]
    paths = write_series(tmp_path / "s", hu, SPACING, patient_id="A", positions_z=positions)
    with pytest.raises(SeriesError, match="duplicate"):
        read_dicom_series(paths)


def test_non_dicom_files_are_ignored_and_counted(tmp_path):
    write_series(tmp_path / "s", body(), SPACING, patient_id="A")
    (tmp_path / "s" / "notes.txt").write_text("scanned on a Tuesday\n")
    (tmp_path / "README").write_text("a text file without a suffix\n")
    found = discover(tmp_path, progress=False)
    assert [r.status for r in found.records] == ["ok"]
    assert len(found.records[0].paths) == SHAPE[0]
    assert found.ignored_files == 2


def test_corrupt_dicom_file_is_a_failed_record_and_the_rest_is_found(tmp_path):
    write_series(tmp_path / "s", body(), SPACING, patient_id="A")
    garbage = np.random.default_rng(8).integers(0, 256, 3000, dtype=np.uint8).tobytes()
    corrupt = tmp_path / "broken" / "IM0001.dcm"
    corrupt.parent.mkdir()
    corrupt.write_bytes(b"\0" * 128 + b"DICM" + garbage)  # a Part 10 preamble, then nothing DICOM
    found = discover(tmp_path, progress=False)
    ok = [r for r in found.records if r.status == "ok"]
    assert len(ok) == 1 and len(ok[0].paths) == SHAPE[0]
    (bad,) = [r for r in found.records if corrupt in r.paths]
    assert bad.status == "failed", (bad.status, bad.reason)
    assert bad.reason


def test_series_without_uids_are_grouped_by_folder(tmp_path):
    for name in ("one", "two"):
        for path in write_series(tmp_path / name, body(), SPACING, patient_id="A"):
            ds = pydicom.dcmread(path)
            ds.SeriesInstanceUID = ""
            ds.StudyInstanceUID = ""
            ds.save_as(path, enforce_file_format=True)
    records = discover(tmp_path, progress=False).records
    assert sorted(r.folder for r in records) == ["one", "two"]
    assert all(r.status == "ok" and len(r.paths) == SHAPE[0] and r.series_uid == "" for r in records)
    volume = load_series(records[0])
    np.testing.assert_array_equal(volume.hu, body())


# ---- irregular series resampled on request ------------------------------------------------------------------


def test_gap_is_resampled_on_request(tmp_path):
    hu = random_hu(seed=9)
    positions = np.r_[np.arange(8), np.arange(9, 17)] * SPACING[2]  # slice 8 of 17 is missing
    write_series(tmp_path / "s", hu, SPACING, origin=ORIGIN, patient_id="A", positions_z=positions)
    (record,) = discover(tmp_path, irregular="resample", progress=False).records
    assert record.status == "ok"
    with pytest.raises(SeriesError, match="missing slices"):
        load_series(record)

    volume = load_series(record, irregular="resample")
    assert volume.shape == (17, *SHAPE[1:])
    np.testing.assert_allclose(volume.spacing, SPACING, rtol=1e-6)
    np.testing.assert_allclose(volume.origin, ORIGIN, atol=1e-4)
    assert "resampled" in volume.meta["notes"]
    # the even grid passes through every slice that was there; the missing one lies halfway between its neighbours
    np.testing.assert_allclose(volume.hu[:8], hu[:8], atol=1e-3)
    np.testing.assert_allclose(volume.hu[9:], hu[8:], atol=1e-3)
    np.testing.assert_allclose(volume.hu[8], (hu[7] + hu[8]) / 2, atol=1e-3)


def test_gantry_tilt_is_corrected_on_request(tmp_path):
    write_series(tmp_path / "s", body(), SPACING, patient_id="A", tilt_deg=10.0)
    (record,) = discover(tmp_path, irregular="resample", progress=False).records
    assert record.status == "ok"
    volume = load_series(record, irregular="resample")
    assert volume.shape == SHAPE
    assert "gantry tilt" in volume.meta["notes"]


# ---- NIfTI in any stored orientation ------------------------------------------------------------------------

# file voxel (i, j, k) -> canonical index (w, h, d), as a 4x4 integer map; D, H, W = SHAPE
_D, _H, _W = SHAPE
NIFTI_LAYOUTS = {
    # RAS: i runs to the patient's right (w reversed), j anterior (h reversed), k superior
    "RAS": (lambda hu: hu.transpose(2, 1, 0)[::-1, ::-1, :],
            [[-1, 0, 0, _W - 1], [0, -1, 0, _H - 1], [0, 0, 1, 0], [0, 0, 0, 1]]),
    # LPS: the canonical order itself, transposed to (x, y, z)
    "LPS": (lambda hu: hu.transpose(2, 1, 0), np.eye(4)),
    # PIR: i posterior (h), j inferior (d reversed), k right (w reversed)
    "PIR": (lambda hu: hu.transpose(1, 0, 2)[:, ::-1, ::-1],
            [[0, 0, -1, _W - 1], [1, 0, 0, 0], [0, -1, 0, _D - 1], [0, 0, 0, 1]]),
}  # fmt: skip


@pytest.mark.parametrize("layout", sorted(NIFTI_LAYOUTS))
def test_nifti_any_orientation_reads_canonical(tmp_path, layout):
    hu = random_hu(seed=10)
    to_file, index_map = NIFTI_LAYOUTS[layout]
    data = np.ascontiguousarray(to_file(hu))
    affine = Volume(hu, SPACING, ORIGIN).affine_ras() @ np.asarray(index_map, float)
    assert "".join(nib.aff2axcodes(affine)) == layout
    nib.save(nib.Nifti1Image(data, affine), str(tmp_path / "scan.nii.gz"))

    volume = read_scan(tmp_path / "scan.nii.gz")
    assert volume.shape == SHAPE
    np.testing.assert_array_equal(volume.hu, hu)
    np.testing.assert_allclose(volume.spacing, SPACING, rtol=1e-6)
    np.testing.assert_allclose(volume.origin, ORIGIN, atol=1e-4)
    assert volume.meta["patient_id"] == "scan"


# ---- privacy -------------------------------------------------------------------------------------------------


def test_identifying_tags_are_never_kept(tmp_path):
    paths = write_series(
        tmp_path / "s", body(), SPACING, patient_id="A", patient_name="DOE^JANE", birth_date="19500101"
    )
    assert pydicom.dcmread(paths[0]).PatientName == "DOE^JANE"
    volume = read_dicom_series(paths)
    header = read_header(paths[0])
    (record,) = discover(tmp_path, progress=False).records
    for text in (repr(volume.meta), repr(header), repr(record.row())):
        assert "DOE" not in text and "JANE" not in text and "19500101" not in text
    assert volume.meta["patient_id"] == "A"
