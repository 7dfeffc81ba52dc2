"""Reading DICOM: headers for discovery, and whole series assembled into a canonical HU volume.

Decoding of compressed transfer syntaxes (JPEG baseline/lossless, JPEG-LS, JPEG 2000, RLE) is pydicom's, through
the pylibjpeg plugins. Ordering and geometry are checked here from the positions of the slices (see geometry.py)
because the ready-made readers either order by InstanceNumber (MONAI's PydicomReader) or refuse irregular stacks
without saying which problem they found; a cohort report needs the reason.
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
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

from .geometry import canonical_transform, obliquity_deg, orientation_key, stack_geometry
from .nifti import OUTSIDE_FOV_HU, refuse_implausible_values
from .volume import SeriesError, Volume

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
MAX_VOXELS_PER_FILE = 2**31  # a whole-body CT (512 x 512 x 3000) is 8e8; more is not decoded into memory blindly
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
MAX_RESAMPLED_FACTOR = 4  # data.irregular 'resample' fills gaps, but not a stack that is mostly gap


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


def _position(ds) -> tuple[float, ...] | None:
    values = _decimals(ds, "ImagePositionPatient", 3)
    if values is not None and max(abs(v) for v in values) > MAX_POSITION_MM:
        raise SeriesError(f"ImagePositionPatient {_shown(values)} is beyond {MAX_POSITION_MM:g} mm")
    return values


def _orientation(ds) -> tuple[float, ...] | None:
    values = _decimals(ds, "ImageOrientationPatient", 6)
    if values is not None:
        row, col = np.asarray(values[:3]), np.asarray(values[3:])
        # loose tolerances: writers round cosines, but parallel or zero vectors give no slice normal at all
        if not (0.9 < np.linalg.norm(row) < 1.1 and 0.9 < np.linalg.norm(col) < 1.1 and abs(row @ col) < 0.1):
            raise SeriesError(f"ImageOrientationPatient {_shown(values)} is not two perpendicular unit vectors")
    return values


def _rescale(item) -> tuple[float, float]:
    """(slope, intercept) of a dataset or a PixelValueTransformation item; SeriesError naming the tag and value for a
    value that is not a finite number, a slope of 0, or magnitudes beyond MAX_SLOPE and MAX_INTERCEPT."""
    slope = (_decimals(item, "RescaleSlope", 1) or (1.0,))[0]
    intercept = (_decimals(item, "RescaleIntercept", 1) or (0.0,))[0]
    if slope == 0.0 or abs(slope) > MAX_SLOPE:
        raise SeriesError(f"RescaleSlope '{slope:g}' is out of range (not 0, magnitude at most {MAX_SLOPE:g})")
    if abs(intercept) > MAX_INTERCEPT:
        raise SeriesError(f"RescaleIntercept '{intercept:g}' is out of range (magnitude at most {MAX_INTERCEPT:g})")
    return slope, intercept


def _padding(ds) -> int | None:
    value = ds.get("PixelPaddingValue")
    if value is None or value == "":
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return int(value)
    raise SeriesError(f"PixelPaddingValue {_shown(value)} is not a single integer")


def _functional(ds, index: int, sequence: str):
    """An item of a functional group sequence for frame ``index``: per-frame first, then shared. Anything that is
    not a sequence of datasets (a damaged VR) counts as absent."""
    for groups, i in (("PerFrameFunctionalGroupsSequence", index), ("SharedFunctionalGroupsSequence", 0)):
        seq = ds.get(groups)
        if isinstance(seq, Sequence) and len(seq) > i:
            items = seq[i].get(sequence)
            if isinstance(items, Sequence) and len(items):
                return items[0]
    return None


def _cause(err: BaseException, path: Path) -> str:
    """An exception as a short plain cause for a report, without the file's path."""
    text = " ".join(str(err).split()).replace(str(path), "the file")
    return f"{type(err).__name__}: {text[:100]}" if text else type(err).__name__


def is_dicom_file(path: Path) -> bool:
    """Part 10 files carry 'DICM' after a 128-byte preamble."""
    try:
        return _probe(path)[0]
    except SeriesError:
        return False


def _unreadable_file(err: OSError) -> SeriesError:
    if isinstance(err, PermissionError):
        return SeriesError("file cannot be read (permission denied)")
    return SeriesError(f"file cannot be read ({err.strerror or type(err).__name__})")


def _regular(path: Path) -> os.stat_result:
    """The file's stat; SeriesError for a file that cannot be read, and for anything but a regular file: opening a
    FIFO or a device would block or never end."""
    try:
        info = os.stat(path)
    except OSError as err:
        raise _unreadable_file(err) from None
    if not stat.S_ISREG(info.st_mode):
        raise SeriesError("not a regular file (not read)")
    return info


def _probe(path: Path) -> tuple[bool, int]:
    """(whether the file has the DICM magic, its size in bytes); SeriesError as :func:`_regular` says."""
    info = _regular(path)
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError as err:
        raise _unreadable_file(err) from None
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
        raise SeriesError(f"unreadable DICOM file ({_cause(err, path)})") from None
    try:
        return _checked_header(ds, path, magic)
    except SeriesError:
        raise
    except Exception as err:  # values are converted when first used, so damage can surface here too
        raise SeriesError(f"unreadable DICOM file ({_cause(err, path)})") from None


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
    return _header_of(ds, path)


def _plausible(ds) -> bool:
    """Whether a dataset without image identifiers is a real one (private tags only, a fragment) rather than bytes
    read as elements: garbage gives public (even group) tags that no dictionary knows."""
    return len(ds) > 0 and all(
        t.group % 2 or t.element == 0 or dictionary_has_tag(t) or repeater_has_tag(int(t)) for t in list(ds.keys())
    )


def _header_of(ds, path: Path) -> DicomHeader:
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
    spacing = checked(_lengths, ds, "PixelSpacing", 2)
    thickness = _thickness(ds)
    checked(_rescale, ds)
    if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
        for i in range(frames):
            item = _functional(ds, i, "PlanePositionSequence")
            pos = checked(_position, item) if item is not None else None
            if pos is not None:
                positions.append(pos)
            item = _functional(ds, i, "PixelValueTransformationSequence")
            if item is not None:
                checked(_rescale, item)
        item = _functional(ds, 0, "PlaneOrientationSequence")
        orientation = orientation or (checked(_orientation, item) if item is not None else None)
        item = _functional(ds, 0, "PixelMeasuresSequence")
        if item is not None:
            spacing = spacing or checked(_lengths, item, "PixelSpacing", 2)
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


@dataclass
class _Slice:
    """One decoded slice: stored values and how they become HU (converted late, straight into the volume)."""

    position: np.ndarray
    orientation: tuple[float, ...]
    spacing: tuple[float, float]
    raw: np.ndarray
    slope: float = 1.0
    intercept: float = 0.0
    padding: int | None = None
    ct: bool = True
    invalid: np.ndarray | None = None

    @property
    def exact_int16(self) -> bool:
        """Whether HU = raw + intercept is an exact int16 (slope 1, integer intercept, no overflow)."""
        if self.slope != 1.0 or self.intercept != round(self.intercept) or self.raw.dtype.kind not in "iu":
            return False
        lo, hi = int(self.raw.min()) + self.intercept, int(self.raw.max()) + self.intercept
        return lo >= -32768 and hi <= 32767

    def to_hu(self, out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """(HU with no-measurement voxels set to -1024, the mask of those voxels or None). float32 unless ``out``
        is int16 (for slices where ``exact_int16`` holds: half the memory traffic of float32)."""
        hu = np.empty(self.raw.shape, np.float32) if out is None else out
        if hu.dtype == np.int16:
            np.add(self.raw, np.int32(self.intercept), out=hu, dtype=np.int32, casting="unsafe")
        else:
            np.multiply(self.raw, np.float32(self.slope), out=hu, dtype=np.float32)
            if self.intercept != 0.0:
                hu += np.float32(self.intercept)
        invalid = self.invalid
        if self.padding is not None:
            pad = self.raw == np.asarray(self.padding).astype(self.raw.dtype)
            invalid = pad if invalid is None else invalid | pad
        if self.ct and hu.min() < OUTSIDE_FOV_HU:  # one cheap pass; the mask only when needed
            low = hu < OUTSIDE_FOV_HU
            invalid = low if invalid is None else invalid | low
        if invalid is not None:
            if invalid.any():
                hu[invalid] = -1024.0
            else:
                invalid = None
        return hu, invalid

    @property
    def hu(self) -> np.ndarray:
        return self.to_hu()[0]


def _plain_geometry(ds, path: Path) -> DicomHeader | None:
    """The few values a plain single-frame slice needs (converting every header value costs as much as decoding
    an uncompressed slice); None for files that need the full header. SeriesError naming a damaged value."""
    if "NumberOfFrames" in ds or "PerFrameFunctionalGroupsSequence" in ds:
        return None
    position, thickness = _position(ds), _thickness(ds)
    return DicomHeader(
        path, "", "", "", "", "", "", (), _count(ds, "Rows", 0), _count(ds, "Columns", 0),
        _count(ds, "SamplesPerPixel", 1), 1, True, _orientation(ds), [position] if position else [],
        _lengths(ds, "PixelSpacing", 2), thickness[0] if thickness else None,
    )  # fmt: skip


def _dataset(path: Path):
    try:
        return pydicom.dcmread(path)
    except InvalidDicomError:  # no preamble: discovery accepted it as DICOM already
        return pydicom.dcmread(path, force=True)


def _decode(path: Path, modality: str, full: bool) -> tuple[list[_Slice], DicomHeader]:
    """The slices of one file. Only SeriesError leaves: parsers, decoders and lazily converted header values raise
    many types, and the report needs the reason, not a traceback."""
    try:
        _regular(path)  # a file replaced by a FIFO since discovery
        ds = _dataset(path)
    except SeriesError as err:
        raise SeriesError(f"{path.name}: {err}") from None
    except PermissionError as err:  # made unreadable since discovery
        raise SeriesError(f"{path.name}: {_unreadable_file(err)}") from None
    except Exception as err:
        raise SeriesError(f"{path.name}: unreadable DICOM file ({_cause(err, path)})") from None
    try:
        return _slices(ds, path, modality, full)
    except SeriesError:
        raise
    except Exception as err:
        raise SeriesError(f"{path.name}: pixel data cannot be decoded ({_cause(err, path)})") from None


def _slices(ds, path: Path, modality: str, full: bool) -> tuple[list[_Slice], DicomHeader]:
    header = (None if full else _plain_geometry(ds, path)) or _header_of(ds, path)
    if header.problem:
        raise SeriesError(header.problem)
    if header.samples != 1:
        raise SeriesError("colour or multi-sample image (not scanner intensities)")
    if header.rows * header.cols * header.frames > MAX_VOXELS_PER_FILE:
        raise SeriesError(f"Rows x Columns x NumberOfFrames is over {MAX_VOXELS_PER_FILE} voxels (damaged header)")
    pixels = ds.pixel_array
    if pixels.ndim not in (2, 3) or pixels.size != header.rows * header.cols * header.frames:
        raise SeriesError(f"pixel data of shape {pixels.shape} does not match Rows, Columns and NumberOfFrames")
    pixels = pixels.reshape((-1, header.rows, header.cols))
    if len(header.positions) != len(pixels) or header.orientation is None or header.pixel_spacing is None:
        raise SeriesError("no slice geometry (ImagePositionPatient/ImageOrientationPatient/PixelSpacing)")
    padding = _padding(ds)
    multiframe = header.frames > 1 or "PerFrameFunctionalGroupsSequence" in ds
    slices = []
    for i, raw in enumerate(pixels):
        transform = (_functional(ds, i, "PixelValueTransformationSequence") if multiframe else None) or ds
        slope, intercept = _rescale(transform)
        slices.append(
            _Slice(
                position=np.asarray(header.positions[i]),
                orientation=header.orientation,
                spacing=header.pixel_spacing,
                raw=raw,
                slope=slope,
                intercept=intercept,
                padding=padding,
                ct=modality == "CT",
            )
        )
    return slices, header


def _regularise(slices: list[_Slice], irregular: str, notes: list[str]) -> tuple[list[_Slice], float]:
    """Sorted, duplicate-free, evenly spaced, untilted slices; or SeriesError with the reason."""
    geo = stack_geometry(np.stack([s.position for s in slices]), np.asarray(slices[0].orientation))
    ordered = [slices[i] for i in geo.order]
    if geo.duplicates:
        kept, differing = [ordered[0]], 0
        for s, step in zip(ordered[1:], geo.steps):
            if step < 0.01:
                differing += int(not np.array_equal(s.hu, kept[-1].hu))
                continue
            kept.append(s)
        if differing and irregular != "resample":
            raise SeriesError(f"duplicate positions with different pixels ({differing} slices)")
        extra = f", {differing} of them with different pixels: the first in position order kept" if differing else ""
        notes.append(f"dropped {len(ordered) - len(kept)} duplicate slices{extra}")
        return _regularise(kept, irregular, notes)
    problems = geo.problems
    if problems and irregular != "resample":
        raise SeriesError("; ".join(problems) + " (refused; data.irregular: resample interpolates)")
    if geo.tilt_deg > 0.5:
        ordered = _untilt(ordered, geo.normal)
        notes.append(f"gantry tilt {geo.tilt_deg:.1f} degrees corrected by shifting slices")
    if geo.gaps or geo.uneven:
        ordered = _resample_z(ordered, geo.normal, geo.spacing)
        notes.append(f"resampled to an even {geo.spacing:.2f} mm slice spacing ({problems[0]})")
    return ordered, geo.spacing


def _untilt(slices: list[_Slice], normal: np.ndarray) -> list[_Slice]:
    from scipy import ndimage

    o = np.asarray(slices[0].orientation)
    row_cos, col_cos = o[:3], o[3:]
    dy, dx = slices[0].spacing
    out = []
    for s in slices:
        delta = s.position - slices[0].position
        shift = (float(delta @ col_cos) / dy, float(delta @ row_cos) / dx)
        values, was_invalid = s.to_hu()
        hu = ndimage.shift(values, shift, order=1, mode="constant", cval=np.nan)
        invalid = np.isnan(hu)
        if was_invalid is not None:
            invalid |= ndimage.shift(was_invalid.astype(np.float32), shift, order=1, cval=1.0) > 0
        hu[invalid] = -1024.0
        position = slices[0].position + float(delta @ normal) * normal
        out.append(_Slice(position, s.orientation, s.spacing, hu, ct=s.ct, invalid=invalid if invalid.any() else None))
    return out


def _resample_z(slices: list[_Slice], normal: np.ndarray, spacing: float) -> list[_Slice]:
    """Linear interpolation along the normal onto an even grid from the first to the last slice."""
    dist = np.array([s.position @ normal for s in slices])
    count = int(np.floor((dist[-1] - dist[0]) / spacing + 1e-6)) + 1
    if count > MAX_RESAMPLED_FACTOR * len(slices):  # interpolating that much would invent the volume, and fill memory
        raise SeriesError(f"too many missing slices to interpolate ({len(slices)} slices would become {count})")
    targets = dist[0] + spacing * np.arange(count)
    out = []
    for t in targets:
        j = int(np.clip(np.searchsorted(dist, t) - 1, 0, len(slices) - 2))
        w = float(np.clip((t - dist[j]) / (dist[j + 1] - dist[j]), 0.0, 1.0))
        a, b = slices[j], slices[j + 1]
        (ha, ia), (hb, ib) = a.to_hu(), b.to_hu()
        hu = (1 - w) * ha + w * hb
        inv = [m for m in (ia, ib) if m is not None]
        invalid = np.logical_or.reduce(inv) if inv else None
        position = a.position + (t - dist[j]) * normal
        out.append(_Slice(position, a.orientation, a.spacing, hu.astype(np.float32), ct=a.ct, invalid=invalid))
    return out


def read_dicom_series(paths: list[str | Path], modality: str = "CT", irregular: str = "refuse") -> Volume:
    """Assemble the files of one series into a canonical Volume (HU (D, H, W): exact int16 when every slice
    stores integers with slope 1, which is nearly all CT; float32 otherwise).

    ``irregular``: 'refuse' raises SeriesError for missing slices, uneven spacing, gantry tilt and duplicate
    positions with different pixels; 'resample' interpolates them onto an even orthogonal grid and says so in
    ``meta['notes']``. Identical duplicates are always dropped.
    """
    if not paths:
        raise SeriesError("no files")
    slices, header = [], None
    for i, p in enumerate(sorted(Path(p) for p in paths)):
        s, h = _decode(p, modality, full=i == 0)
        header = header or h  # the first file's full header gives the series' metadata
        slices.extend(s)
    shapes = {s.raw.shape for s in slices}
    orientations = {orientation_key(s.orientation) for s in slices}
    if len(shapes) > 1 or len(orientations) > 1:
        raise SeriesError(f"slices of different sizes or orientations in one series ({len(orientations)} orientations)")
    if len(slices) < 2:
        raise SeriesError("a single slice (not a volume)")
    notes: list[str] = []
    ordered, step = _regularise(slices, irregular, notes)
    orientation = np.asarray(ordered[0].orientation)
    oblique = obliquity_deg(orientation)
    if oblique > 1.0:
        notes.append(f"oblique by {oblique:.1f} degrees (read as the nearest axial grid)")
    # CT is almost always stored as integers with slope 1: keep HU as exact int16 then, float32 otherwise
    exact = all(s.exact_int16 for s in ordered)
    stack = np.empty((len(ordered), *ordered[0].raw.shape), np.int16 if exact else np.float32)
    masks = [s.to_hu(out=stack[k])[1] for k, s in enumerate(ordered)]
    if not exact and not np.isfinite(stack).all():  # float pixel data can hold NaN or inf; int16 cannot
        raise SeriesError("non-finite values (NaN or inf) in the pixel data after rescaling")
    refuse_implausible_values(stack, modality)  # a rescale that passed its bounds can still give no HU
    invalid = None
    if any(m is not None for m in masks):
        invalid = np.stack([m if m is not None else np.zeros(stack.shape[1:], bool) for m in masks])
    flip, transpose, spacing = canonical_transform(orientation, ordered[0].spacing, step)
    # the LPS position of the voxel that becomes canonical (0, 0, 0)
    first = np.array(
        [
            len(ordered) - 1 if 0 in flip else 0,
            stack.shape[1] - 1 if 1 in flip else 0,
            stack.shape[2] - 1 if 2 in flip else 0,
        ]
    )
    dy, dx = ordered[0].spacing
    origin = ordered[first[0]].position + first[1] * dy * orientation[3:] + first[2] * dx * orientation[:3]
    if flip:
        stack = np.flip(stack, flip)
        invalid = np.flip(invalid, flip) if invalid is not None else None
    stack = np.ascontiguousarray(np.transpose(stack, transpose))
    if invalid is not None:
        invalid = np.ascontiguousarray(np.transpose(invalid, transpose))
    return Volume(
        hu=stack,
        spacing=spacing,
        origin=tuple(origin),
        valid=None if invalid is None else ~invalid,
        meta={
            "patient_id": header.patient_id,
            "study_uid": header.study_uid,
            "series_uid": header.series_uid,
            "modality": header.modality,
            "kernel": header.kernel,
            "slice_thickness_mm": header.slice_thickness,
            "manufacturer": header.manufacturer,
            "model": header.model,
            "notes": "; ".join(notes),
        },
    )
