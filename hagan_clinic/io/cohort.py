"""Cohort discovery: every series under a root folder, found from headers alone, with a status and a reason.

DICOM files are grouped by SeriesInstanceUID; files without one are grouped by folder and image geometry. A group is
kept ('ok') when it is an image series of the wanted modality with axial slices that form a volume; otherwise it is
'skipped' with the reason (localizer, derived, other modality, ...). Files that claim to be DICOM but cannot be
parsed are listed as 'failed'. NIfTI files (.nii, .nii.gz) are series of their own. Everything else is ignored and
counted.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .dicom import SECONDARY_CAPTURE_PREFIX, DicomHeader, read_dicom_series, read_header
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
    """One series found under the root. ``key`` is stable across runs (used to name cached outputs)."""

    key: str
    kind: str  # 'dicom' or 'nifti'
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

    @property
    def digest(self) -> str:
        """A short file-name-safe id derived from the key."""
        return hashlib.sha1(self.key.encode()).hexdigest()[:16]

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


def _files(root: Path) -> list[Path]:
    out = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out.extend(Path(folder) / n for n in sorted(names) if not n.startswith("."))
    return out


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
    if any(h.orientation is None or not h.positions for h in headers):
        return "skipped", "no slice geometry (ImagePositionPatient/ImageOrientationPatient missing)"
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
    """Find and classify every series under ``root`` (a folder at any depth, or one file)."""
    from tqdm import tqdm

    root = Path(root)
    files = [root] if root.is_file() else _files(root)
    base = root.parent if root.is_file() else root
    groups: dict[tuple, list[DicomHeader]] = defaultdict(list)
    records: list[SeriesRecord] = []
    ignored = 0
    for path in tqdm(files, desc="reading headers", unit="file", disable=None if progress else True, leave=False):
        rel = str(path.relative_to(base))
        if path.name.endswith(NIFTI_SUFFIXES):
            records.append(_nifti_record(path, rel, modality))
            continue
        if path.suffix.lower() in NOT_DICOM:
            ignored += 1
            continue
        try:
            header = read_header(path)
        except SeriesError as err:
            records.append(SeriesRecord(f"file:{rel}", "dicom", (path,), rel, "failed", str(err)))
            continue
        if header is None:
            ignored += 1
            continue
        folder = str(path.parent.relative_to(base))
        if header.series_uid:
            key = ("uid", header.series_uid)
        else:  # no UID: the folder and the image geometry stand in for it
            key = ("folder", folder, header.modality, header.rows, header.cols,
                   orientation_key(header.orientation) if header.orientation else None)  # fmt: skip
        groups[key].append(header)
    for key, headers in groups.items():
        records.append(_dicom_record(key, headers, base, modality, min_slices, irregular))
    records.sort(key=lambda r: (r.patient_id, r.study_uid, r.folder, r.series_uid, r.key))
    return Discovery(records, ignored)


def _dicom_record(key, headers, base: Path, modality: str, min_slices: int, irregular: str) -> SeriesRecord:
    headers = sorted(headers, key=lambda h: str(h.path))
    first = headers[0]
    status, reason = _classify(headers, modality, min_slices, irregular)
    folders = sorted({str(h.path.parent.relative_to(base)) for h in headers})
    name = f"uid:{key[1]}" if key[0] == "uid" else "folder:" + "|".join(str(k) for k in key[1:])
    return SeriesRecord(
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


def _nifti_record(path: Path, rel: str, modality: str) -> SeriesRecord:
    record = SeriesRecord(f"nifti:{rel}", "nifti", (path,), rel, "ok", modality=modality)
    record.patient_id = path.name.removesuffix(".gz").removesuffix(".nii")
    try:
        shape = header_shape(path)
    except SeriesError as err:
        record.status, record.reason = "failed", str(err)
        return record
    if len([s for s in shape if s > 1]) != 3:
        record.status, record.reason = "skipped", f"not a 3D volume (shape {tuple(shape)})"
        return record
    record.n_slices = read_shape(path)[0]
    return record


def load_series(record: SeriesRecord, modality: str = "CT", irregular: str = "refuse") -> Volume:
    """Read a discovered series into a canonical Volume (SeriesError with the reason when it cannot)."""
    if record.kind == "nifti":
        volume = read_scan(record.paths[0], modality)
        volume.meta["patient_id"] = record.patient_id
        return volume
    return read_dicom_series(list(record.paths), modality=modality, irregular=irregular)
