"""Hostile DICOM headers: damaged integer tags, unparseable files, implausible rescale and spacing values, DICOMDIR
indexes and valid datasets that are not images, and a fuzz test over bit-flipped and truncated slices.

Discovery must never raise and must give every file a status and a reason; reading a series must raise nothing but
SeriesError and return only finite values. Damaged values are written by patching bytes, as pydicom refuses to
write most of them.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import struct
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset

import hagan_clinic.io.dicom as dicom
from hagan_clinic.io.cohort import discover, load_series
from hagan_clinic.io.dicom import DICOMDIR_REASON, NOT_AN_IMAGE_REASON, read_dicom_series, read_header
from hagan_clinic.io.dicom_write import write_enhanced, write_series
from hagan_clinic.io.volume import SeriesError

SHAPE = (4, 8, 8)  # (D, H, W): tiny, so that hundreds of mutants are read in seconds
SPACING = (0.8, 0.8, 2.0)
PYDICOM_FILES = Path(pydicom.data.get_testdata_file("CT_small.dcm")).parent
REAL_DATA = Path(os.environ.get("HAGAN_CLINIC_REAL_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(autouse=True)
def _quiet_pydicom():
    """pydicom warns about every invalid value it reads; damaged values are what these tests are made of."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def hu(shape=SHAPE) -> np.ndarray:
    return np.random.default_rng(0).integers(-1024, 1500, shape).astype(np.float32)


def series(folder: Path, **kwargs) -> list[Path]:
    """A small axial CT series, files IM0001.dcm ... in position order."""
    return write_series(folder, hu(), SPACING, patient_id="A", shuffle=False, **kwargs)


def patch(path: Path, keyword: str, raw: bytes, item: tuple[str, ...] = ()) -> None:
    """Store ``raw`` as the value of ``keyword`` (explicit VR little endian), as a damaged file would hold it.
    ``item``: the sequence keywords leading to a nested dataset (first item of each)."""
    raw = raw + b" " * (len(raw) % 2)
    ds = pydicom.dcmread(path)
    target = ds
    for seq in item:
        target = target[seq].value[0]
    target[keyword].value = "1" * len(raw)  # a placeholder of the same length, then the bytes are replaced
    ds.save_as(path, enforce_file_format=True)
    tag = tag_for_keyword(keyword)
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + dictionary_VR(tag).encode() + struct.pack("<H", len(raw))
    data = path.read_bytes()
    assert data.count(head) == 1
    at = data.index(head) + len(head)
    path.write_bytes(data[:at] + raw + data[at + len(raw) :])


def record_of(found, path: Path):
    (record,) = [r for r in found.records if path in r.paths]
    return record


# ---- item 1: damaged integer tags and unparseable headers ----------------------------------------------------


def test_pydicom_bad_vr_file_is_a_failed_record_naming_number_of_frames():
    found = discover(PYDICOM_FILES / "badVR.dcm", progress=False)
    (record,) = found.records
    assert record.status == "failed" and "NumberOfFrames" in record.reason and "'1A'" in record.reason


def _rows_as_list(path: Path) -> None:
    ds = pydicom.dcmread(path)
    ds.Rows = [SHAPE[1], SHAPE[1]]
    ds.save_as(path, enforce_file_format=True)


def _tag_setter(keyword: str, value, raw: bytes = b""):
    """A damage that sets ``keyword`` to ``value``, then (when given) patches its stored bytes to ``raw``."""

    def damage(path: Path) -> None:
        ds = pydicom.dcmread(path)
        setattr(ds, keyword, value)
        ds.save_as(path, enforce_file_format=True)
        if raw:
            patch(path, keyword, raw)

    return damage


INTEGER_DAMAGE = {
    "frames_text": (_tag_setter("NumberOfFrames", 1, b"1A"), "NumberOfFrames"),
    "frames_huge": (_tag_setter("NumberOfFrames", 2_000_000_000), "NumberOfFrames"),
    "rows_list": (_rows_as_list, "Rows"),
    "columns_zero": (_tag_setter("Columns", 0), "Columns"),
    "samples_zero": (_tag_setter("SamplesPerPixel", 0), "SamplesPerPixel"),
    "bits_zero": (_tag_setter("BitsAllocated", 0), "BitsAllocated"),
}


@pytest.mark.parametrize("case", sorted(INTEGER_DAMAGE))
def test_damaged_integer_tag_is_a_failed_record_naming_the_tag(tmp_path, case):
    damage, keyword = INTEGER_DAMAGE[case]
    paths = series(tmp_path / "s")
    damage(paths[1])
    found = discover(tmp_path, min_slices=2, progress=False)
    bad = record_of(found, paths[1])
    assert bad.status == "failed" and keyword in bad.reason, bad.reason
    with pytest.raises(SeriesError, match=keyword if case != "bits_zero" else ""):
        read_dicom_series(paths)


PARSER_ERRORS = [
    NotImplementedError("Unknown Value Representation"),
    TypeError("int() argument must be a string, not 'list'"),
    struct.error("unpack requires a buffer of 4 bytes"),
    UnicodeDecodeError("ascii", b"\xff", 0, 1, "ordinal not in range"),
]


@pytest.mark.parametrize("error", PARSER_ERRORS, ids=lambda e: type(e).__name__)
def test_any_parser_exception_becomes_a_failed_record(tmp_path, monkeypatch, error):
    paths = series(tmp_path / "s")
    real = pydicom.dcmread

    def dcmread(path, *args, **kwargs):
        if Path(path) == paths[2]:
            raise error
        return real(path, *args, **kwargs)

    monkeypatch.setattr(dicom.pydicom, "dcmread", dcmread)
    found = discover(tmp_path, min_slices=2, progress=False)
    bad = record_of(found, paths[2])
    assert bad.status == "failed" and type(error).__name__ in bad.reason and str(tmp_path) not in bad.reason
    with pytest.raises(SeriesError, match=type(error).__name__):
        read_dicom_series(paths)


def test_series_refused_beside_a_damaged_file_says_so(tmp_path):
    paths = write_series(tmp_path / "s", hu((8, 8, 8)), SPACING, patient_id="A", shuffle=False)
    _rows_as_list(paths[3])
    found = discover(tmp_path, min_slices=2, progress=False)
    (rest,) = [r for r in found.records if len(r.paths) == 7]
    assert rest.status == "skipped" and "missing slices" in rest.reason
    assert "(1 file in its folder cannot be read)" in rest.reason


# ---- item 4: DICOMDIR indexes and valid datasets that are not images -----------------------------------------


@pytest.mark.parametrize("name", ["DICOMDIR", "index.dcm"])
def test_dicomdir_is_skipped_as_an_index(tmp_path, name):
    paths = series(tmp_path / "s")
    shutil.copy(PYDICOM_FILES / "dicomdirtests" / "DICOMDIR", tmp_path / "s" / name)
    found = discover(tmp_path, min_slices=2, progress=False)
    index = record_of(found, tmp_path / "s" / name)
    assert index.status == "skipped" and index.reason == DICOMDIR_REASON
    assert record_of(found, paths[0]).status == "ok"


FRAGMENTS = [
    "priv_SQ.dcm",
    "nested_priv_SQ.dcm",
    "no_meta_group_length.dcm",
    "empty_charset_LEI.dcm",
    "UN_sequence.dcm",
]


@pytest.mark.parametrize("name", FRAGMENTS)
def test_valid_dataset_without_image_identifiers_is_skipped_not_damaged(tmp_path, name):
    shutil.copy(PYDICOM_FILES / name, tmp_path / name)
    (record,) = discover(tmp_path, progress=False).records
    assert (record.status, record.reason) == ("skipped", NOT_AN_IMAGE_REASON)


def test_series_with_private_sequences_and_empty_charset_is_read(tmp_path):
    paths = series(tmp_path / "s")
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.SpecificCharacterSet = ""
        inner = Dataset()
        inner.add_new(0x00291010, "LO", "vendor")
        ds.add_new(0x00290010, "LO", "ACME 1.0")
        ds.add_new(0x00291020, "SQ", [inner])
        ds.save_as(path, enforce_file_format=True)
    (record,) = discover(tmp_path, min_slices=2, progress=False).records
    assert record.status == "ok", record.reason
    np.testing.assert_array_equal(load_series(record).hu, hu())


# ---- item 5: implausible rescale, spacing and thickness values -----------------------------------------------


VALUE_DAMAGE = {
    "slope_nan": ("RescaleSlope", b"nan", "RescaleSlope 'nan' is not a finite number"),
    "slope_inf": ("RescaleSlope", b"inf", "RescaleSlope 'inf' is not a finite number"),
    "slope_text": ("RescaleSlope", b"one", "RescaleSlope 'one' is not a finite number"),
    "slope_zero": ("RescaleSlope", b"0", "RescaleSlope '0' is out of range"),
    "slope_huge": ("RescaleSlope", b"1e308", "RescaleSlope '1e+308' is out of range"),
    "intercept_nan": ("RescaleIntercept", b"NaN", "RescaleIntercept 'NaN' is not a finite number"),
    "intercept_huge": ("RescaleIntercept", b"1e300", "RescaleIntercept '1e+300' is out of range"),
    "spacing_negative": ("PixelSpacing", b"-1\\-1", "PixelSpacing '-1\\-1' is not a voxel size"),
    "spacing_nan": ("PixelSpacing", b"nan\\1", "PixelSpacing 'nan\\1' is not 2 finite numbers"),
    "spacing_one_value": ("PixelSpacing", b"0.8", "PixelSpacing '0.8' is not 2 finite numbers"),
}


@pytest.mark.parametrize("which", [0, 2], ids=["first_file", "later_file"])
@pytest.mark.parametrize("case", sorted(VALUE_DAMAGE))
def test_implausible_header_value_is_refused_naming_tag_and_value(tmp_path, case, which):
    keyword, raw, message = VALUE_DAMAGE[case]
    paths = series(tmp_path / "s")
    patch(paths[which], keyword, raw)
    (record,) = discover(tmp_path, min_slices=2, progress=False).records
    assert record.status == "failed" and record.reason.startswith(message), record.reason
    assert "(in 1 of 4 files)" in record.reason
    with pytest.raises(SeriesError) as err:
        read_dicom_series(paths)
    assert str(err.value).startswith(message)


@pytest.mark.parametrize("raw", [b"0", b"-inf", b"nan", b"thin"])
def test_a_damaged_slice_thickness_is_unknown_not_a_refusal(tmp_path, raw):
    """SliceThickness is only reported; the spacing comes from the positions."""
    paths = series(tmp_path / "s")
    for path in paths:
        patch(path, "SliceThickness", raw)
    (record,) = discover(tmp_path, min_slices=2, progress=False).records
    assert record.status == "ok" and record.slice_thickness_mm is None, record.reason
    volume = load_series(record)
    assert volume.meta["slice_thickness_mm"] is None and np.isfinite(volume.hu).all()


@pytest.mark.parametrize("where", ["shared", "per_frame"])
def test_multiframe_transformation_sequence_is_validated(tmp_path, where):
    path = write_enhanced(tmp_path / "e" / "enhanced.dcm", hu(), SPACING, patient_id="A")
    if where == "shared":
        patch(path, "RescaleSlope", b"nan", ("SharedFunctionalGroupsSequence", "PixelValueTransformationSequence"))
        message = "RescaleSlope 'nan'"
    else:
        ds = pydicom.dcmread(path)
        transform = Dataset()
        transform.RescaleSlope, transform.RescaleIntercept = 1.0, 1e300
        ds.PerFrameFunctionalGroupsSequence[2].PixelValueTransformationSequence = [transform]
        ds.save_as(path, enforce_file_format=True)
        message = "RescaleIntercept '1e+300'"
    (record,) = discover(tmp_path, min_slices=2, progress=False).records
    assert record.status == "failed" and message in record.reason, record.reason
    with pytest.raises(SeriesError, match=re.escape(message)):
        read_dicom_series([path])


def test_float_pixel_data_with_nan_is_refused_at_read_time(tmp_path):
    paths = series(tmp_path / "s")
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        del ds.PixelData, ds.PixelRepresentation
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 32, 31
        values = hu()[k]
        values[3, 3] = np.nan if k == 2 else values[3, 3]
        ds.FloatPixelData = values.tobytes()
        ds.save_as(path, enforce_file_format=True)
    (record,) = discover(tmp_path, min_slices=2, progress=False).records
    with pytest.raises(SeriesError, match="non-finite"):
        load_series(record)


def test_resampling_refuses_to_invent_most_of_a_stack(tmp_path):
    z = np.array([0.0, 2.0, 4.0, 400.0])  # the last slice far away: about 200 slices of interpolation
    paths = series(tmp_path / "s", positions_z=z)
    with pytest.raises(SeriesError, match="too many missing slices"):
        read_dicom_series(paths, irregular="resample")


# ---- the fuzz test ------------------------------------------------------------------------------------------


class _Hang(Exception):
    """Not an OSError, which readers swallow."""


def _alarm(signum, frame):
    raise _Hang("discovery or reading did not finish")


def _check(root: Path, tally: dict) -> None:
    """Discover and read everything under ``root``: only SeriesError from reading, never from discovery."""
    found = discover(root, min_slices=2, progress=False)
    for record in found.records:
        assert record.status in {"ok", "skipped", "failed"}, record
        assert record.status == "ok" or record.reason.strip(), record
        tally[record.status] += 1
        if record.status != "ok":
            continue
        try:
            volume = load_series(record)
        except SeriesError:
            tally["refused"] += 1
            continue
        assert np.isfinite(volume.hu).all() and all(np.isfinite(volume.spacing))
        tally["read"] += 1


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="the hang guard needs POSIX timers")
def test_fuzzed_slices_never_crash_or_hang(tmp_path):
    """300 mutants of one slice with 1 to 4 random bytes changed in its header region, and 60 truncations."""
    folder = tmp_path / "s"
    paths = series(folder)
    victim = paths[1]
    original = victim.read_bytes()
    pixels_at = original.index(struct.pack("<HH", 0x7FE0, 0x0010))
    rng = np.random.default_rng(2024)
    tally = dict.fromkeys(["ok", "skipped", "failed", "read", "refused"], 0)
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, 120, 1)  # a hang fails the test instead of stopping the suite
    try:
        for _ in range(300):
            data = bytearray(original)
            for at in rng.integers(0, pixels_at + 12, rng.integers(1, 5)):
                data[at] ^= int(rng.integers(1, 256))
            victim.write_bytes(bytes(data))
            _check(tmp_path, tally)
        for length in rng.integers(0, len(original), 60):
            victim.write_bytes(original[:length])
            _check(tmp_path, tally)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    # the mutants must have exercised both sides: series still read, and damage reported
    assert tally["read"] > 50 and tally["failed"] + tally["skipped"] + tally["refused"] > 50, tally


# ---- whole folders of odd real-world files ------------------------------------------------------------------


def _read_everything(root: Path) -> dict:
    tally = dict.fromkeys(["ok", "skipped", "failed", "read", "refused"], 0)
    for modality in ("CT", "MR"):
        found = discover(root, modality, min_slices=2, progress=False)
        for record in found.records:
            assert record.status in {"ok", "skipped", "failed"} and (record.status == "ok" or record.reason)
            tally[record.status] += 1
            if record.status == "ok":
                try:
                    volume = load_series(record, modality)
                except SeriesError:
                    tally["refused"] += 1
                    continue
                assert np.isfinite(volume.hu).all()
                tally["read"] += 1
    return tally


def test_pydicom_test_files_are_discovered_without_an_exception(tmp_path):
    tally = _read_everything(PYDICOM_FILES)
    assert tally["skipped"] > 0 and tally["failed"] > 0, tally


@pytest.mark.skipif(not (REAL_DATA / "dicom_robustness").is_dir(), reason="real-world DICOM files not available")
def test_real_world_odd_files_are_discovered_without_an_exception():
    tally = _read_everything(REAL_DATA / "dicom_robustness")
    assert tally["read"] > 0, tally


def test_read_header_accepts_a_clean_series(tmp_path):
    """The validation refuses damage, not ordinary headers: every written file reads, with its values."""
    paths = series(tmp_path / "s", transfer_syntax="implicit")
    header = read_header(paths[0])
    assert header.problem == "" and header.pixel_spacing == (0.8, 0.8) and header.slice_thickness == 2.0
    assert header.image_type == ("ORIGINAL", "PRIMARY", "AXIAL")


# ---- rescale values inside their bounds that still give no HU -------------------------------------------------


@pytest.mark.parametrize(
    ("keyword", "raw", "message"),
    [
        ("RescaleIntercept", b"90000", "above 3071 HU"),  # within the intercept bound, every voxel far above bone
        ("RescaleSlope", b"9000", "beyond any scanner"),  # within the slope bound, values beyond any HU
    ],
)
def test_a_rescale_that_gives_no_hu_is_refused(tmp_path, keyword, raw, message):
    paths = series(tmp_path / "s")
    for path in paths:
        patch(path, keyword, raw)
    (record,) = discover(tmp_path, min_slices=2, progress=False).records
    with pytest.raises(SeriesError, match=message):
        load_series(record)


def test_a_ct_with_no_air_fat_or_water_is_refused(tmp_path):
    """An intercept inside its bound that lifts the whole scan above +500 HU (air at about +600): not HU."""
    paths = series(tmp_path / "s")
    for path in paths:
        patch(path, "RescaleIntercept", b"1600")
    (record,) = discover(tmp_path, min_slices=2, progress=False).records
    with pytest.raises(SeriesError, match="no air, fat or water"):
        load_series(record)
