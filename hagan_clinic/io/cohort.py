"""Cohort discovery: every series under a root folder, found from headers alone, with a status and a reason.

DICOM files are grouped by SeriesInstanceUID; files without one are grouped by folder and image geometry. A group is
kept ('ok') when it is an image series of the wanted modality with axial slices that form a volume; otherwise it is
'skipped' with the reason (localizer, derived, other modality, ...). Files that claim to be DICOM but cannot be
parsed are listed as 'failed'. NIfTI files (.nii, .nii.gz) are series of their own. Everything else is ignored and
counted.

Discovery never raises for what it finds: unreadable folders and files, broken links and damaged headers are
'failed' records; special files (FIFOs, devices, sockets, also behind links) are 'skipped' without being opened,
since reading one blocks or never ends; DICOMDIR indexes and DICOM datasets that are not images are 'skipped'.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .dicom import SECONDARY_CAPTURE_PREFIX, DicomHeader, SkippedFile, read_dicom_series, read_header
from .geometry import is_axial, orientation_key, stack_geometry
from .nifti import header_shape, read_scan, read_shape
from .volume import SeriesError, Volume

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# Files with these suffixes are never parsed as DICOM (DICOM files often have no suffix, or a UID-like one).
NOT_DICOM = {
    ".txt", ".csv", ".json", ".md", ".gz", ".png", ".jpg", ".jpeg", ".xml", ".html", ".py", ".pdf", ".zip",
    ".tar", ".npy", ".npz", ".yaml", ".yml", ".log", ".nrrd", ".mha", ".mhd", ".bmp", ".tif", ".tiff", ".parquet",
}  # fmt: skip


@dataclass
class SeriesRecord:
    """One series found under the root, or one file or folder that is not read (its status and reason say why).

    ``key`` is stable across runs (the series UID where there is one); ``identity`` is a digest of the source files
    (paths, sizes, modification times, SOP instance UIDs), "" where unknown; ``digest`` combines both and names
    cached outputs, so that other files under the same UIDs never reuse them."""

    key: str
    kind: str  # 'dicom', 'nifti', 'file' (a file or folder that is not read), or 'cache' (made by the pipelines)
    paths: tuple[Path, ...]
    folder: str  # relative to the root
    status: str  # 'ok', 'skipped' or 'failed'
    reason: str = ""
    patient_id: str = ""
    study_uid: str = ""
    series_uid: str = ""
    modality: str = ""
    kernel: str = ""
    slice_thickness_mm: float | None = None
    manufacturer: str = ""
    model: str = ""
    n_slices: int = 0
    identity: str = ""

    @property
    def digest(self) -> str:
        """A short file-name-safe id derived from the key and the files' identity (16 hex digits)."""
        text = f"{self.key}\n{self.identity}" if self.identity else self.key
        return hashlib.sha1(text.encode()).hexdigest()[:16]

    def row(self) -> dict:
        """The record as a report row (no file lists)."""
        return {
            "patient_id": self.patient_id,
            "study_uid": self.study_uid,
            "series_uid": self.series_uid,
            "modality": self.modality,
            "kernel": self.kernel,
            "slice_thickness_mm": self.slice_thickness_mm,
            "manufacturer": self.manufacturer,
            "n_slices": self.n_slices,
            "source": self.folder,
            "status": self.status,
            "reason": self.reason,
        }


@dataclass
class Discovery:
    records: list[SeriesRecord]
    ignored_files: int = 0

    @property
    def ok(self) -> list[SeriesRecord]:
        return [r for r in self.records if r.status == "ok"]

    def counts(self) -> dict[str, int]:
        out = {"ok": 0, "skipped": 0, "failed": 0}
        for r in self.records:
            out[r.status] = out.get(r.status, 0) + 1
        return out


# Refusals that a file which cannot be read may explain (it may hold the missing slices): their reason says so.
SLICES_MAY_BE_UNREAD = ("missing slices", "non-uniform slice spacing", "too few slices")
SPECIAL_FILES = (
    (stat.S_ISFIFO, "FIFO"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
    (stat.S_ISSOCK, "socket"),
)


def _not_read(path: Path, base: Path, status: str, reason: str, folder: bool = False) -> SeriesRecord:
    """The record of a file or folder that is not read."""
    rel = str(path.relative_to(base))
    return SeriesRecord(f"{'dir' if folder else 'file'}:{rel}", "file", () if folder else (path,), rel, status, reason)


def _unreadable(err: OSError, what: str) -> str:
    cause = "permission denied" if isinstance(err, PermissionError) else (err.strerror or type(err).__name__)
    return f"{what} cannot be read ({cause})"


def _inspect(path: Path) -> tuple[os.stat_result | None, str, str]:
    """(the stat of a regular file to read, "", "") or (None, status, reason) for an entry that is not read. A link
    is judged by its target, which is never opened: a FIFO blocks and /dev/zero never ends."""
    try:
        info = os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return None, "failed", "broken link (a loop of links)"
        if isinstance(err, FileNotFoundError):
            return None, "failed", "broken link" if path.is_symlink() else "file vanished during discovery"
        return None, "failed", _unreadable(err, "file")
    if stat.S_ISREG(info.st_mode):
        return info, "", ""
    if stat.S_ISDIR(info.st_mode):
        return None, "skipped", "link to a folder (not followed)"
    kind = next((name for test, name in SPECIAL_FILES if test(info.st_mode)), "unknown type")
    return None, "skipped", f"special file ({kind}), not read"


def _is_folder(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def _scan(root: Path, base: Path) -> tuple[list[tuple[Path, os.stat_result]], list[SeriesRecord]]:
    """The regular files under ``root`` with their stat, depth first in name order (hidden names left out), and a
    record for each folder or entry that is not read (os.walk would drop unreadable folders silently)."""
    files: list[tuple[Path, os.stat_result]] = []
    records: list[SeriesRecord] = []
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as listing:
                entries = sorted((e for e in listing if not e.name.startswith(".")), key=lambda e: e.name)
        except OSError as err:
            records.append(_not_read(folder, base, "failed", _unreadable(err, "folder"), folder=True))
            continue
        subfolders = []
        for entry in entries:
            path = Path(entry.path)
            if _is_folder(entry):
                subfolders.append(path)
                continue
            info, status, reason = _inspect(path)
            if info is None:
                records.append(_not_read(path, base, status, reason))
            else:
                files.append((path, info))
        stack.extend(reversed(subfolders))
    return files, records


def _entries(root: Path) -> tuple[Path, list[tuple[Path, os.stat_result]], list[SeriesRecord]]:
    """(the folder paths are relative to, the regular files to read, the records of entries not read) for a root
    that is a folder or one file; nothing for a root that does not exist."""
    try:
        folder = stat.S_ISDIR(os.stat(root).st_mode)
    except OSError:
        folder = False
    if folder:
        return (root, *_scan(root, root))
    if not os.path.lexists(root):
        return root, [], []
    info, status, reason = _inspect(root)
    if info is None:
        return root.parent, [], [_not_read(root, root.parent, status, reason)]
    return root.parent, [(root, info)], []


def _identity(files: list[tuple[Path, os.stat_result, str]], base: Path) -> str:
    """A digest of the source files: each one's path under the root, size, modification time and SOP instance UID
    (DICOM), in path order. Two cohorts with the same UIDs but other images differ here."""
    lines = sorted(f"{p.relative_to(base)}\t{info.st_size}\t{info.st_mtime_ns}\t{sop}" for p, info, sop in files)
    return hashlib.sha1("\n".join(lines).encode()).hexdigest()


def _classify(headers: list[DicomHeader], modality: str, min_slices: int, irregular: str) -> tuple[str, str]:
    first = headers[0]
    if first.modality != modality:
        return "skipped", f"other modality ({first.modality or 'none'}; {modality} wanted)"
    if not any(h.has_pixels for h in headers):
        return "skipped", "no pixel data"
    types = {t for h in headers for t in h.image_type}
    if types & {"LOCALIZER", "SCOUT", "TOPOGRAM", "SCANOGRAM"}:
        return "skipped", "localizer/scout image"
    if first.sop_class.startswith(SECONDARY_CAPTURE_PREFIX) or (
        first.image_type[:1] == ("DERIVED",) or first.image_type[1:2] == ("SECONDARY",)
    ):
        return "skipped", "derived/secondary image (" + "\\".join(first.image_type[:3]) + ")"
    if first.samples != 1:
        return "skipped", "colour image (not scanner intensities)"
    problems = [h.problem for h in headers if h.problem]
    if problems:
        where = f" (in {len(problems)} of {len(headers)} files)" if len(headers) > 1 else ""
        return "failed", problems[0] + where
    if any(h.orientation is None or not h.positions for h in headers):
        return "skipped", "no slice geometry (ImagePositionPatient/ImageOrientationPatient missing)"
    if any(h.pixel_spacing is None for h in headers):
        return "skipped", "no slice geometry (PixelSpacing missing)"
    orientations = {orientation_key(h.orientation) for h in headers}
    if len(orientations) > 1:
        return "skipped", f"several orientations in one series ({len(orientations)})"
    if not is_axial(np.asarray(first.orientation)):
        return "skipped", "not axial (a sagittal or coronal series)"
    positions = np.array([p for h in headers for p in h.positions])
    if len(positions) >= 2:
        try:
            geometry = stack_geometry(positions, np.asarray(first.orientation))
        except SeriesError as err:
            return "skipped", str(err)
        # duplicates are judged when the pixels are read: identical copies are dropped, differing ones refused
        problems = [p for p in geometry.problems if not p.startswith("duplicate")]
        if problems and irregular != "resample":
            return "skipped", "; ".join(problems) + " (refused; data.irregular: resample interpolates)"
    if len(positions) < min_slices:
        return "skipped", f"too few slices ({len(positions)} < {min_slices})"
    return "ok", ""


def discover(
    root: str | Path,
    modality: str = "CT",
    min_slices: int = 16,
    irregular: str = "refuse",
    progress: bool = True,
) -> Discovery:
    """Find and classify every series under ``root`` (a folder at any depth, or one file). Never raises for what it
    finds: every file or folder that is not read gets a record with the reason."""
    from .logs import progress as bar

    base, files, records = _entries(Path(root))
    stats = dict(files)
    groups: dict[tuple, list[DicomHeader]] = defaultdict(list)
    ignored = 0
    for path, _ in bar(files, "reading headers", "file", **({"leave": False} if progress else {"disable": True})):
        rel = str(path.relative_to(base))
        if path.name.endswith(NIFTI_SUFFIXES):
            records.append(_nifti_record(path, rel, modality, _identity([(path, stats[path], "")], base)))
            continue
        if path.suffix.lower() in NOT_DICOM:
            ignored += 1
            continue
        try:
            header = read_header(path)
        except SkippedFile as err:
            records.append(SeriesRecord(f"file:{rel}", "dicom", (path,), rel, "skipped", str(err)))
            continue
        except SeriesError as err:
            records.append(SeriesRecord(f"file:{rel}", "dicom", (path,), rel, "failed", str(err)))
            continue
        if header is None:
            ignored += 1
            continue
        folder = str(path.parent.relative_to(base))
        if header.series_uid:
            key: tuple = ("uid", header.series_uid)
        else:  # no UID: the folder and the image geometry stand in for it
            key = ("folder", folder, header.modality, header.rows, header.cols,
                   orientation_key(header.orientation) if header.orientation else None)  # fmt: skip
        groups[key].append(header)
    # files that failed are named in the reason of a series refused beside them (they may be its missing slices)
    failed_in = Counter(str(r.paths[0].parent.relative_to(base)) for r in records if _failed_file(r))
    for key, headers in groups.items():
        records.append(_dicom_record(key, headers, base, modality, min_slices, irregular, stats, failed_in))
    records.sort(key=lambda r: (r.patient_id, r.study_uid, r.folder, r.series_uid, r.key))
    return Discovery(records, ignored)


def _failed_file(record: SeriesRecord) -> bool:
    return record.status == "failed" and record.key.startswith("file:") and len(record.paths) == 1


def _dicom_record(
    key, headers, base: Path, modality: str, min_slices: int, irregular: str, stats: dict, failed_in: Counter
) -> SeriesRecord:
    headers = sorted(headers, key=lambda h: str(h.path))
    first = headers[0]
    status, reason = _classify(headers, modality, min_slices, irregular)
    folders = sorted({str(h.path.parent.relative_to(base)) for h in headers})
    unread = sum(failed_in[f] for f in folders)
    if unread and reason.startswith(SLICES_MAY_BE_UNREAD):
        reason += f" ({unread} file{'s' if unread > 1 else ''} in its folder cannot be read)"
    name = f"uid:{key[1]}" if key[0] == "uid" else "folder:" + "|".join(str(k) for k in key[1:])
    return SeriesRecord(
        identity=_identity([(h.path, stats[h.path], h.sop_uid) for h in headers], base),
        key=name,
        kind="dicom",
        paths=tuple(h.path for h in headers),
        folder=folders[0] if len(folders) == 1 else f"{folders[0]} (+{len(folders) - 1} folders)",
        status=status,
        reason=reason,
        patient_id=first.patient_id,
        study_uid=first.study_uid,
        series_uid=first.series_uid,
        modality=first.modality,
        kernel=first.kernel,
        slice_thickness_mm=first.slice_thickness,
        manufacturer=first.manufacturer,
        model=first.model,
        n_slices=sum(max(len(h.positions), h.frames if h.has_pixels else 0) for h in headers),
    )


def _nifti_record(path: Path, rel: str, modality: str, identity: str) -> SeriesRecord:
    record = SeriesRecord(f"nifti:{rel}", "nifti", (path,), rel, "ok", modality=modality, identity=identity)
    record.patient_id = path.name.removesuffix(".gz").removesuffix(".nii")
    try:
        shape = header_shape(path)
        if len([s for s in shape if s > 1]) != 3:
            record.status, record.reason = "skipped", f"not a 3D volume (shape {tuple(shape)})"
            return record
        record.n_slices = read_shape(path)[0]
    except SeriesError as err:
        record.status, record.reason = "failed", str(err)
    return record


def load_series(record: SeriesRecord, modality: str = "CT", irregular: str = "refuse") -> Volume:
    """Read a discovered series into a canonical Volume (SeriesError with the reason when it cannot)."""
    if record.kind == "nifti":
        volume = read_scan(record.paths[0], modality)
        volume.meta["patient_id"] = record.patient_id
        return volume
    return read_dicom_series(list(record.paths), modality=modality, irregular=irregular)
