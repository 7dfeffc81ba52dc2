"""DICOM headers: what discovery needs from one file, read and checked without decoding pixels.

Every header value that later becomes a loop bound, a shape, a rescale or a position is checked here, and a damaged
one is named with its tag: a cohort report needs the reason, and a hostile value must not reach the decoder.
:mod:`hagan_clinic.io.dicom` assembles the pixels of a series from the files these headers describe.
"""

from __future__ import annotations

import math
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.datadict import dictionary_has_tag, repeater_has_tag
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

from ..errors import one_line
from .volume import SeriesError

SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
DICOMDIR_REASON = "DICOMDIR index (the images are read from their own files)"
NOT_AN_IMAGE_REASON = "not an image (a DICOM dataset without SOPClassUID, Modality or SOPInstanceUID)"

# Size bounds (module constants so that tests can make them small). A file without the DICM magic is tried as
# headerless DICOM only below the first: larger ones are archives or raw volumes, and parsing them wastes minutes.
MAX_NON_DICOM_BYTES = 64 * 2**20
MAX_DICOM_BYTES = 4 * 2**30  # far above any single image object; a larger one is not parsed into memory

# Bounds on header values; a value outside them is a damaged or hostile header, not a scan.
MAX_FRAMES = 100_000  # enhanced CT/MR objects hold a few thousand frames; the frame count bounds header loops
INTEGER_LIMITS = {
    "Rows": 65535,
    "Columns": 65535,
    "SamplesPerPixel": 4,
    "BitsAllocated": 64,
    "NumberOfFrames": MAX_FRAMES,
}
# HU = slope * stored + intercept with stored values of at most 32 bits: these bounds keep every HU below 1e14,
# far inside float32 (3e38), while real slopes are 1 for CT and 1e-3 to 1e3 for MR and PET, and real intercepts
# are -1024, -1000 or -3024 for CT and small for the rest.
MAX_SLOPE = 1e4
MAX_INTERCEPT = 1e5
SPACING_RANGE_MM = (1e-3, 1e3)  # PixelSpacing and SliceThickness: micro-CT reaches micrometres, no scan has 1 m voxels
MAX_POSITION_MM = 1e5  # patient coordinates lie within metres of the scanner's origin


class SkippedFile(SeriesError):
    """A readable DICOM file that is not an image of a series (an index, a dataset without image identifiers)."""


@dataclass
class DicomHeader:
    """What discovery needs from one file, read without decoding pixels. Identifying tags are not kept."""

    path: Path
    sop_uid: str
    study_uid: str
    series_uid: str
    patient_id: str
    modality: str
    sop_class: str
    image_type: tuple[str, ...]
    rows: int
    cols: int
    samples: int
    frames: int
    has_pixels: bool
    orientation: tuple[float, ...] | None
    positions: list[tuple[float, float, float]] = field(default_factory=list)
    pixel_spacing: tuple[float, float] | None = None
    slice_thickness: float | None = None
    kernel: str = ""
    manufacturer: str = ""
    model: str = ""
    problem: str = ""  # a header value that makes the file unusable (named with its tag), "" when none


def _text(ds, name: str) -> str:
    value = ds.get(name, "")
    if isinstance(value, MultiValue):
        return "/".join(str(v) for v in value)
    return str(value or "").strip()


def _strings(value) -> tuple[str, ...]:
    """A multi-valued code string as a tuple (a single value is one string, not its characters)."""
    if value is None or value == "":
        return ()
    values = value if isinstance(value, MultiValue | list | tuple) else (value,)
    return tuple(str(v).upper() for v in values)


def _shown(value) -> str:
    """A header value quoted for a message: one line of at most 40 printable characters (numbers as DICOM
    writes several values: separated by backslashes)."""
    if isinstance(value, tuple):
        value = "\\".join(f"{v:g}" for v in value)
    text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
    text = "".join(c if c.isprintable() and c.isascii() else "?" for c in " ".join(text.split())[:40])
    return f"'{text}'"


def _count(ds, keyword: str, default: int) -> int:
    """A tag that must hold one positive integer (Rows, Columns, NumberOfFrames, ...); ``default`` when absent or
    empty. SeriesError naming the tag otherwise: a damaged value must not become a list, a loop bound or a shape."""
    value = ds.get(keyword)
    if value is None or value == "" or value == b"":
        return default
    limit = INTEGER_LIMITS[keyword]
    if isinstance(value, MultiValue | list | tuple):
        raise SeriesError(f"{keyword} holds {len(value)} values where one integer from 1 to {limit} is expected")
    try:
        number = value if isinstance(value, int) else int(str(value).strip())
    except (TypeError, ValueError):
        number = 0
    if not 1 <= number <= limit:
        raise SeriesError(f"{keyword} {_shown(value)} is not an integer from 1 to {limit} (damaged header)")
    return int(number)


def _frames(ds) -> int:
    # some writers store 0 for a single-frame image; pydicom decodes those as one frame too
    return 1 if ds.get("NumberOfFrames") == 0 else _count(ds, "NumberOfFrames", 1)


def _decimals(ds, keyword: str, n: int) -> tuple[float, ...] | None:
    """``n`` finite numbers from a decimal-string tag; None when absent or empty; SeriesError naming the tag and the
    value otherwise. Parsed from the raw bytes where possible: pydicom's DS conversion dominates the per-slice cost
    of reading an uncompressed series."""
    elem = ds.get_item(keyword)
    if elem is None:
        return None
    value = elem.value
    if isinstance(value, bytes):
        text = value.decode("latin-1")
    else:
        value = ds.get(keyword)
        text = "\\".join(str(v) for v in value) if isinstance(value, MultiValue | list | tuple) else str(value or "")
    text = text.strip(" \0")
    if not text:
        return None
    try:
        out = tuple(float(part) for part in text.split("\\"))
    except ValueError:
        out = ()
    if len(out) != n or not all(math.isfinite(v) for v in out):
        raise SeriesError(f"{keyword} {_shown(text)} is not {'a finite number' if n == 1 else f'{n} finite numbers'}")
    return out


def _lengths(ds, keyword: str, n: int) -> tuple[float, ...] | None:
    """A voxel size in mm (PixelSpacing, SliceThickness): finite and within SPACING_RANGE_MM, or SeriesError."""
    values = _decimals(ds, keyword, n)
    lo, hi = SPACING_RANGE_MM
    if values is not None and not all(lo <= v <= hi for v in values):
        raise SeriesError(f"{keyword} {_shown(values)} is not a voxel size from {lo:g} to {hi:g} mm")
    return values


def _thickness(ds) -> tuple[float, ...] | None:
    """SliceThickness is only reported (the slice spacing comes from the positions): a damaged or zero value, which
    some reformats and MR series carry, makes it unknown rather than refusing the series."""
    try:
        return _lengths(ds, "SliceThickness", 1)
    except SeriesError:
        return None


def _pixel_spacing(ds) -> tuple[float, float] | None:
    """PixelSpacing (row spacing, column spacing) mm."""
    values = _lengths(ds, "PixelSpacing", 2)
    if values is None:
        return None
    row, col = values
    return row, col


def _position(ds) -> tuple[float, float, float] | None:
    """ImagePositionPatient (x, y, z) mm, LPS."""
    values = _decimals(ds, "ImagePositionPatient", 3)
    if values is None:
        return None
    if max(abs(v) for v in values) > MAX_POSITION_MM:
        raise SeriesError(f"ImagePositionPatient {_shown(values)} is beyond {MAX_POSITION_MM:g} mm")
    x, y, z = values
    return x, y, z


def _orientation(ds) -> tuple[float, ...] | None:
    values = _decimals(ds, "ImageOrientationPatient", 6)
    if values is not None:
        row, col = np.asarray(values[:3]), np.asarray(values[3:])
        # loose tolerances: writers round cosines, but parallel or zero vectors give no slice normal at all
        if not (0.9 < np.linalg.norm(row) < 1.1 and 0.9 < np.linalg.norm(col) < 1.1 and abs(row @ col) < 0.1):
            raise SeriesError(f"ImageOrientationPatient {_shown(values)} is not two perpendicular unit vectors")
    return values


def rescale(item) -> tuple[float, float]:
    """(slope, intercept) of a dataset or a PixelValueTransformation item; SeriesError naming the tag and value for a
    value that is not a finite number, a slope of 0, or magnitudes beyond MAX_SLOPE and MAX_INTERCEPT."""
    slope = (_decimals(item, "RescaleSlope", 1) or (1.0,))[0]
    intercept = (_decimals(item, "RescaleIntercept", 1) or (0.0,))[0]
    if slope == 0.0 or abs(slope) > MAX_SLOPE:
        raise SeriesError(f"RescaleSlope '{slope:g}' is out of range (not 0, magnitude at most {MAX_SLOPE:g})")
    if abs(intercept) > MAX_INTERCEPT:
        raise SeriesError(f"RescaleIntercept '{intercept:g}' is out of range (magnitude at most {MAX_INTERCEPT:g})")
    return slope, intercept


def padding_value(ds) -> int | None:
    value = ds.get("PixelPaddingValue")
    if value is None or value == "":
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return int(value)
    raise SeriesError(f"PixelPaddingValue {_shown(value)} is not a single integer")


def functional_item(ds, index: int, sequence: str):
    """An item of a functional group sequence for frame ``index``: per-frame first, then shared. Anything that is
    not a sequence of datasets (a damaged VR) counts as absent."""
    for groups, i in (("PerFrameFunctionalGroupsSequence", index), ("SharedFunctionalGroupsSequence", 0)):
        seq = ds.get(groups)
        if isinstance(seq, Sequence) and len(seq) > i:
            items = seq[i].get(sequence)
            if isinstance(items, Sequence) and len(items):
                return items[0]
    return None


def cause(err: BaseException, path: Path) -> str:
    """An exception as a short plain cause for a report, without the file's path."""
    text = one_line(str(err).replace(str(path), "the file"), 100)
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def is_dicom_file(path: Path) -> bool:
    """Part 10 files carry 'DICM' after a 128-byte preamble."""
    try:
        return _probe(path)[0]
    except SeriesError:
        return False


def unreadable(err: OSError) -> SeriesError:
    if isinstance(err, PermissionError):
        return SeriesError("file cannot be read (permission denied)")
    return SeriesError(f"file cannot be read ({err.strerror or type(err).__name__})")


def regular_stat(path: Path) -> os.stat_result:
    """The file's stat; SeriesError for a file that cannot be read, and for anything but a regular file: opening a
    FIFO or a device would block or never end."""
    try:
        info = os.stat(path)
    except OSError as err:
        raise unreadable(err) from None
    if not stat.S_ISREG(info.st_mode):
        raise SeriesError("not a regular file (not read)")
    return info


def _probe(path: Path) -> tuple[bool, int]:
    """(whether the file has the DICM magic, its size in bytes); SeriesError as :func:`regular_stat` says."""
    info = regular_stat(path)
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError as err:
        raise unreadable(err) from None
    return len(head) == 132 and head[128:132] == b"DICM", info.st_size


def read_header(path: str | Path) -> DicomHeader | None:
    """The header of a DICOM file; None when the file is not DICOM (or too large to try as DICOM without the magic).

    Raises SkippedFile for a DICOM file that is not an image of a series (a DICOMDIR index, a dataset without image
    identifiers) and SeriesError for one that cannot be read or parsed, is too large, or has damaged integer tags.
    Other damaged values (rescale, spacing, geometry) are kept in ``problem`` so that discovery reports the series.
    """
    path = Path(path)
    magic, size = _probe(path)
    if not magic and size > MAX_NON_DICOM_BYTES:
        return None
    if magic and size > MAX_DICOM_BYTES:
        limit = f"{MAX_DICOM_BYTES / 2**30:g} GiB"
        raise SeriesError(f"too large ({size / 2**30:.1f} GiB; DICOM files over {limit} are not read)")
    if path.name.upper() == "DICOMDIR":
        raise SkippedFile(DICOMDIR_REASON)
    try:
        # defer_size skips large values (pixel data) without reading them; the element's presence is still seen
        ds = pydicom.dcmread(path, defer_size=1024, force=not magic)
    except Exception as err:  # the parser raises many types (NotImplementedError for an unknown VR, struct.error...)
        if not magic:
            return None
        raise SeriesError(f"unreadable DICOM file ({cause(err, path)})") from None
    try:
        return _checked_header(ds, path, magic)
    except SeriesError:
        raise
    except Exception as err:  # values are converted when first used, so damage can surface here too
        raise SeriesError(f"unreadable DICOM file ({cause(err, path)})") from None


def _checked_header(ds, path: Path, magic: bool) -> DicomHeader | None:
    meta = getattr(ds, "file_meta", None) or {}
    if str(meta.get("MediaStorageSOPClassUID", "")) == DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in ds:
        raise SkippedFile(DICOMDIR_REASON)
    if not any(k in ds for k in ("SOPClassUID", "Modality", "SOPInstanceUID")):
        if not magic:
            return None
        if meta and _plausible(ds):
            raise SkippedFile(NOT_AN_IMAGE_REASON)
        # pydicom reads garbage after the signature as a dataset of meaningless elements instead of failing
        raise SeriesError("unreadable DICOM file (damaged or truncated header)")
    return dataset_header(ds, path)


def _plausible(ds) -> bool:
    """Whether a dataset without image identifiers is a real one (private tags only, a fragment) rather than bytes
    read as elements: garbage gives public (even group) tags that no dictionary knows."""
    return len(ds) > 0 and all(
        t.group % 2 or t.element == 0 or dictionary_has_tag(t) or repeater_has_tag(int(t)) for t in list(ds.keys())
    )


def dataset_header(ds, path: Path) -> DicomHeader:
    """The discovery header of a parsed dataset; damaged integer tags raise SeriesError, other damaged values go
    into ``problem``."""
    problems: list[str] = []

    def checked(read, *args):
        try:
            return read(*args)
        except SeriesError as err:
            problems.append(str(err))
            return None

    frames = _frames(ds)
    rows, cols, samples = _count(ds, "Rows", 0), _count(ds, "Columns", 0), _count(ds, "SamplesPerPixel", 1)
    _count(ds, "BitsAllocated", 16)  # not used here, but a damaged value means damaged pixel data
    positions, orientation = [], checked(_orientation, ds)
    spacing = checked(_pixel_spacing, ds)
    thickness = _thickness(ds)
    checked(rescale, ds)
    if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
        for i in range(frames):
            item = functional_item(ds, i, "PlanePositionSequence")
            pos = checked(_position, item) if item is not None else None
            if pos is not None:
                positions.append(pos)
            item = functional_item(ds, i, "PixelValueTransformationSequence")
            if item is not None:
                checked(rescale, item)
        item = functional_item(ds, 0, "PlaneOrientationSequence")
        orientation = orientation or (checked(_orientation, item) if item is not None else None)
        item = functional_item(ds, 0, "PixelMeasuresSequence")
        if item is not None:
            spacing = spacing or checked(_pixel_spacing, item)
            thickness = thickness or _thickness(item)
    else:
        pos = checked(_position, ds)
        if pos is not None:
            positions.append(pos)
    return DicomHeader(
        path=path,
        sop_uid=_text(ds, "SOPInstanceUID"),
        study_uid=_text(ds, "StudyInstanceUID"),
        series_uid=_text(ds, "SeriesInstanceUID"),
        patient_id=_text(ds, "PatientID"),
        modality=_text(ds, "Modality").upper(),
        sop_class=_text(ds, "SOPClassUID"),
        image_type=_strings(ds.get("ImageType")),
        rows=rows,
        cols=cols,
        samples=samples,
        frames=frames,
        has_pixels=any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")),
        orientation=orientation,
        positions=positions,
        pixel_spacing=spacing,
        slice_thickness=thickness[0] if thickness else None,
        kernel=_text(ds, "ConvolutionKernel"),
        manufacturer=_text(ds, "Manufacturer"),
        model=_text(ds, "ManufacturerModelName"),
        problem="; ".join(dict.fromkeys(problems)),
    )


def plain_geometry(ds, path: Path) -> DicomHeader | None:
    """The few values a plain single-frame slice needs (converting every header value costs as much as decoding
    an uncompressed slice); None for files that need the full header. SeriesError naming a damaged value."""
    if "NumberOfFrames" in ds or "PerFrameFunctionalGroupsSequence" in ds:
        return None
    position, thickness = _position(ds), _thickness(ds)
    return DicomHeader(
        path, "", "", "", "", "", "", (), _count(ds, "Rows", 0), _count(ds, "Columns", 0),
        _count(ds, "SamplesPerPixel", 1), 1, True, _orientation(ds), [position] if position else [],
        _pixel_spacing(ds), thickness[0] if thickness else None,
    )  # fmt: skip
