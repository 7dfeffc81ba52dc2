"""Hostile cohort folders: special files and links, oversized and unreadable files and folders, implausible NIfTI
files, and cached outputs keyed by the files' identity rather than by their UIDs alone.

Discovery must finish, never raise, and give everything it does not read a record with a status and a reason.
Permission tests run twice: with chmod (skipped as root, who reads anything) and with the failing call patched, so
that a CI job running as root still exercises the logic.
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import os
import signal
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import hagan_clinic.io.dicom_header as dicom_header
from hagan_clinic.io.cohort import SeriesRecord, discover, load_series
from hagan_clinic.io.dicom_write import write_series
from hagan_clinic.io.nifti import read_scan
from hagan_clinic.io.volume import SeriesError

SHAPE = (6, 8, 8)  # (D, H, W)
SPACING = (0.8, 0.8, 2.0)
AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


class Hang(Exception):
    """Not an OSError, which readers swallow."""


@pytest.fixture(autouse=True)
def _no_hang():
    """A discovery that blocks on a FIFO or reads /dev/zero forever fails the test instead of stopping the suite
    (the alarm repeats each second after the first 30, in case one is swallowed)."""

    def alarm(signum, frame):
        raise Hang("discovery did not finish")

    if not hasattr(signal, "setitimer"):  # not POSIX: no FIFOs to block on either
        yield
        return
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, 30, 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def hu(shape=SHAPE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1024, 1500, shape).astype(np.float32)


def series(folder: Path, seed: int = 0) -> list[Path]:
    """A small axial CT series, files IM0001.dcm ... in position order; the same UIDs whatever ``seed``."""
    return write_series(folder, hu(seed=seed), SPACING, patient_id="A", shuffle=False)


def by_name(found, name: str) -> SeriesRecord:
    (record,) = [r for r in found.records if r.folder.endswith(name)]
    return record


# ---- item 2: special files, links and size bounds ----------------------------------------------------------


POSIX_ONLY = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs and /dev are POSIX")


@POSIX_ONLY
def test_fifo_and_links_to_devices_are_skipped_without_being_opened(tmp_path):
    paths = series(tmp_path / "s")
    os.mkfifo(tmp_path / "s" / "pipe")
    os.symlink(tmp_path / "s" / "pipe", tmp_path / "s" / "IM9998")
    os.symlink("/dev/zero", tmp_path / "s" / "IM9999")
    os.symlink("/dev/urandom", tmp_path / "urandom")
    found = discover(tmp_path, min_slices=2, progress=False)
    assert by_name(found, "pipe").reason == "special file (FIFO), not read"
    assert by_name(found, "IM9998").reason == "special file (FIFO), not read"
    assert by_name(found, "IM9999").reason == "special file (character device), not read"
    assert by_name(found, "urandom").status == "skipped"
    (ok,) = found.ok
    assert ok.paths == tuple(paths)
    assert found.counts() == {"ok": 1, "skipped": 4, "failed": 0}


@POSIX_ONLY
def test_a_fifo_as_the_root_is_skipped(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    (record,) = discover(tmp_path / "pipe", progress=False).records
    assert (record.status, record.reason) == ("skipped", "special file (FIFO), not read")


def test_broken_and_looping_links_are_failed_and_folder_links_skipped(tmp_path):
    series(tmp_path / "s")
    os.symlink(tmp_path / "gone", tmp_path / "broken")
    os.symlink(tmp_path / "loop_b", tmp_path / "loop_a")
    os.symlink(tmp_path / "loop_a", tmp_path / "loop_b")
    os.symlink(tmp_path / "s", tmp_path / "linked_folder")
    found = discover(tmp_path, min_slices=2, progress=False)
    assert (by_name(found, "broken").status, by_name(found, "broken").reason) == ("failed", "broken link")
    assert by_name(found, "loop_a").reason == "broken link (a loop of links)"
    assert by_name(found, "linked_folder").reason == "link to a folder (not followed)"
    assert len(found.ok) == 1


def test_large_file_without_dicom_magic_is_not_parsed(tmp_path, monkeypatch):
    series(tmp_path / "s")
    (tmp_path / "s" / "RAWDATA").write_bytes(b"\x08\x00" * 200)
    monkeypatch.setattr(dicom_header, "MAX_NON_DICOM_BYTES", 100)
    real = dicom_header.pydicom.dcmread

    def dcmread(path, *args, **kwargs):
        assert Path(path).name != "RAWDATA", "a large file without the DICM magic was parsed"
        return real(path, *args, **kwargs)

    monkeypatch.setattr(dicom_header.pydicom, "dcmread", dcmread)
    found = discover(tmp_path, min_slices=2, progress=False)
    assert found.ignored_files == 1 and len(found.records) == 1 and found.records[0].status == "ok"


def test_dicom_file_over_the_size_bound_is_failed_as_too_large(tmp_path, monkeypatch):
    paths = series(tmp_path / "s")
    monkeypatch.setattr(dicom_header, "MAX_DICOM_BYTES", 1024)
    (tmp_path / "s" / "IM9999.dcm").write_bytes(paths[0].read_bytes() + b"\0" * 2048)
    found = discover(tmp_path, min_slices=2, progress=False)
    big = by_name(found, "IM9999.dcm")
    assert big.status == "failed" and big.reason.startswith("too large")


# ---- item 3: unreadable folders and files -------------------------------------------------------------------


def _deny_open(monkeypatch, denied: set[Path]) -> None:
    """Opening any of ``denied`` raises PermissionError, as a file without read permission does."""
    real = builtins.open

    def guarded(file, *args, **kwargs):
        if isinstance(file, str | os.PathLike) and Path(file) in denied:
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded)


def _deny_listing(monkeypatch, denied: Path) -> None:
    real = os.scandir

    def guarded(path=".", *args):
        if Path(path) == denied:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *args)

    monkeypatch.setattr(os, "scandir", guarded)


@pytest.mark.parametrize("how", ["chmod", "patched"])
def test_unreadable_folder_is_a_failed_record(tmp_path, monkeypatch, how):
    series(tmp_path / "readable")
    series(tmp_path / "locked" / "s")
    if how == "chmod":
        if AS_ROOT:
            pytest.skip("root reads any folder; the patched variant covers this")
        (tmp_path / "locked").chmod(0)
    else:
        _deny_listing(monkeypatch, tmp_path / "locked")
    try:
        found = discover(tmp_path, min_slices=2, progress=False)
    finally:
        (tmp_path / "locked").chmod(0o755)
    locked = by_name(found, "locked")
    assert (locked.status, locked.reason) == ("failed", "folder cannot be read (permission denied)")
    assert len(found.ok) == 1


@pytest.mark.parametrize("how", ["chmod", "patched"])
def test_unreadable_slice_is_failed_and_named_in_the_series_reason(tmp_path, monkeypatch, how):
    paths = series(tmp_path / "s")
    locked = paths[2]
    if how == "chmod":
        if AS_ROOT:
            pytest.skip("root reads any file; the patched variant covers this")
        locked.chmod(0)
    else:
        _deny_open(monkeypatch, {locked})
    try:
        found = discover(tmp_path, min_slices=2, progress=False)
    finally:
        locked.chmod(0o644)
    bad = by_name(found, locked.name)
    assert (bad.status, bad.reason) == ("failed", "file cannot be read (permission denied)")
    (rest,) = [r for r in found.records if len(r.paths) == len(paths) - 1]
    assert rest.status == "skipped" and "missing slices" in rest.reason
    assert rest.reason.endswith("(1 file in its folder cannot be read)")


def test_whole_unreadable_series_is_listed(tmp_path, monkeypatch):
    paths = series(tmp_path / "s")
    _deny_open(monkeypatch, set(paths))
    found = discover(tmp_path, min_slices=2, progress=False)
    assert found.counts() == {"ok": 0, "skipped": 0, "failed": len(paths)}
    assert {r.reason for r in found.records} == {"file cannot be read (permission denied)"}


def test_unreadable_nifti_is_failed_in_plain_words(tmp_path, monkeypatch):
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(hu().T.copy(), np.diag([0.8, 0.8, 2.0, 1.0])), path)
    _deny_open(monkeypatch, {path})
    (record,) = discover(tmp_path, progress=False).records
    assert (record.status, record.reason) == ("failed", "file cannot be read (permission denied)")


def test_a_slice_made_unreadable_after_discovery_is_a_series_error(tmp_path, monkeypatch):
    paths = series(tmp_path / "s")
    (record,) = discover(tmp_path, min_slices=2, progress=False).records
    _deny_open(monkeypatch, {paths[3]})
    with pytest.raises(SeriesError) as err:
        load_series(record)
    assert str(err.value) == f"{paths[3].name}: file cannot be read (permission denied)"


# ---- item 6: NIfTI files that are not measurements ----------------------------------------------------------


def nifti(path: Path, data: np.ndarray, pixdim: tuple | None = None, qform_only: bool = False) -> Path:
    """Write (x, y, z) ``data``; ``pixdim`` is stored as given (nibabel would correct it), with the affine taken
    from it (qform) when ``qform_only``."""
    img = nib.Nifti1Image(data.astype(np.float32), np.diag([0.8, 0.8, 2.0, 1.0]))
    if qform_only:
        img.set_sform(None, code=0)
    nib.save(img, path)
    if pixdim is not None:
        raw = bytearray(path.read_bytes())
        raw[80:92] = np.asarray(pixdim, "<f4").tobytes()  # pixdim[1:4] of a NIfTI-1 header
        path.write_bytes(bytes(raw))
    return path


def _values(nan_fraction: float = 0.0, peak: float | None = None) -> np.ndarray:
    data = hu((8, 8, 6)).astype(np.float32)
    flat = data.reshape(-1)
    flat[: int(round(nan_fraction * flat.size))] = np.nan
    if peak is not None:
        flat[-1] = peak
    return data


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_values(1.0), "no finite voxels"),
        (_values(0.6), "mostly non-finite voxels"),
        (_values(peak=3e38), "beyond any scanner's range"),
        (_values(peak=-2e6), "beyond any scanner's range"),
    ],
    ids=["all_nan", "mostly_nan", "float_max", "minus_2e6"],
)
def test_nifti_that_is_not_a_measurement_is_refused(tmp_path, data, message):
    path = nifti(tmp_path / "scan.nii", data)
    with pytest.raises(SeriesError, match=message):
        read_scan(path)


def test_nifti_with_a_few_nan_voxels_is_read_with_a_note(tmp_path):
    volume = read_scan(nifti(tmp_path / "scan.nii", _values(0.1)))
    assert np.isfinite(volume.hu).all() and "non-finite voxels" in volume.meta["notes"]
    assert volume.valid is not None and (~volume.valid).sum() == round(0.1 * volume.hu.size)


@pytest.mark.parametrize("pixdim", [(np.nan, 0.8, 2.0), (0.0, 0.8, 2.0), (-0.8, 0.8, 2.0), (np.inf, 0.8, 2.0)])
@pytest.mark.parametrize("qform_only", [False, True], ids=["sform", "qform"])
def test_nifti_with_bad_pixdim_is_refused_naming_pixdim(tmp_path, pixdim, qform_only):
    path = nifti(tmp_path / "scan.nii", _values(), pixdim, qform_only)
    (record,) = discover(tmp_path, progress=False).records
    assert record.status == "failed" and "pixdim" in record.reason, record.reason
    with pytest.raises(SeriesError, match="pixdim"):
        read_scan(path)


@pytest.mark.parametrize("content", [b"", b"\x1f\x8b\x08\x00", bytes(range(256)) * 2], ids=["empty", "gzip", "junk"])
def test_unreadable_nifti_reason_names_the_cause_not_the_path(tmp_path, content):
    (tmp_path / "scan.nii").write_bytes(content)
    (record,) = discover(tmp_path, progress=False).records
    assert record.status == "failed" and record.reason.startswith("unreadable NIfTI file (")
    cause = record.reason.removeprefix("unreadable NIfTI file (").removesuffix(")")
    assert cause and "Error" in cause.split(":")[0] and str(tmp_path) not in record.reason, record.reason


# ---- item 7: cached outputs keyed by the files, not only by their UIDs ---------------------------------------


def test_same_uids_with_other_images_get_another_digest(tmp_path):
    first = discover(series(tmp_path / "a" / "s", seed=1)[0].parents[1], min_slices=2, progress=False).ok[0]
    second = discover(series(tmp_path / "b" / "s", seed=2)[0].parents[1], min_slices=2, progress=False).ok[0]
    assert first.key == second.key  # the same SeriesInstanceUID: a stable series key
    assert first.identity != second.identity and first.digest != second.digest
    assert len(first.digest) == 16 and int(first.digest, 16) >= 0


def test_digest_is_stable_until_a_file_changes(tmp_path):
    paths = series(tmp_path / "s")
    before = discover(tmp_path, min_slices=2, progress=False).ok[0]
    again = discover(tmp_path, min_slices=2, progress=False).ok[0]
    assert again.digest == before.digest
    stat = paths[3].stat()
    os.utime(paths[3], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    touched = discover(tmp_path, min_slices=2, progress=False).ok[0]
    assert touched.key == before.key and touched.digest != before.digest


def test_nifti_records_carry_an_identity_too(tmp_path):
    nifti(tmp_path / "scan.nii", _values())
    record = discover(tmp_path, progress=False).ok[0]
    assert record.identity and record.digest != hashlib.sha1(record.key.encode()).hexdigest()[:16]


def test_records_made_without_identity_keep_the_key_digest(tmp_path):
    record = SeriesRecord("cache:volumes/x.npy", "cache", (tmp_path / "x.npy",), "volumes", "ok")
    assert record.identity == ""
    assert record.digest == hashlib.sha1(b"cache:volumes/x.npy").hexdigest()[:16]


@pytest.mark.parametrize("dtype", [np.complex64, np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])])
def test_a_complex_or_colour_nifti_is_refused(tmp_path, dtype):
    data = np.zeros((8, 8, 8), dtype)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "odd.nii")
    with pytest.raises(SeriesError, match="not scanner intensities"):
        read_scan(tmp_path / "odd.nii")
