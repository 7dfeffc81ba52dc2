"""Reading DICOM: headers for discovery, and whole series assembled into a canonical HU volume.

Decoding of compressed transfer syntaxes (JPEG baseline/lossless, JPEG-LS, JPEG 2000, RLE) is pydicom's, through
the pylibjpeg plugins. Ordering and geometry are checked here from the positions of the slices (see geometry.py)
because the ready-made readers either order by InstanceNumber (MONAI's PydicomReader) or refuse irregular stacks
without saying which problem they found; a cohort report needs the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from .geometry import canonical_transform, obliquity_deg, orientation_key, stack_geometry
from .nifti import OUTSIDE_FOV_HU
from .volume import SeriesError, Volume

SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"


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


def _text(ds, name: str) -> str:
    value = ds.get(name, "")
    if isinstance(value, pydicom.multival.MultiValue):
        return "/".join(str(v) for v in value)
    return str(value or "").strip()


def _floats(value, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(np.isfinite(out)) else None


def _functional(ds, index: int, sequence: str):
    """An item of a functional group sequence for frame ``index``: per-frame first, then shared."""
    for groups, i in (("PerFrameFunctionalGroupsSequence", index), ("SharedFunctionalGroupsSequence", 0)):
        seq = ds.get(groups)
        items = getattr(seq[i], sequence, None) if seq is not None and len(seq) > i else None
        if items:
            return items[0]
    return None


def is_dicom_file(path: Path) -> bool:
    """Part 10 files carry 'DICM' after a 128-byte preamble."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def read_header(path: str | Path) -> DicomHeader | None:
    """The header of a DICOM file, None when the file is not DICOM. Raises SeriesError for a DICOM file that
    cannot be parsed."""
    path = Path(path)
    magic = is_dicom_file(path)
    try:
        # defer_size skips large values (pixel data) without reading them; the element's presence is still seen
        ds = pydicom.dcmread(path, defer_size=1024, force=not magic)
    except (InvalidDicomError, EOFError, ValueError, OSError, AttributeError, KeyError, TypeError) as err:
        if not magic:
            return None
        raise SeriesError(f"unreadable DICOM file ({type(err).__name__}: {' '.join(str(err).split())[:80]})") from None
    if not any(k in ds for k in ("SOPClassUID", "Modality", "SOPInstanceUID")):
        if not magic:
            return None
        # pydicom reads garbage after the signature as a dataset of meaningless elements instead of failing
        raise SeriesError("unreadable DICOM file (damaged or truncated header)")
    return _header_of(ds, path)


def _header_of(ds, path: Path) -> DicomHeader:
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    positions, orientation = [], _floats(ds.get("ImageOrientationPatient"), 6)
    spacing = _floats(ds.get("PixelSpacing"), 2)
    thickness = ds.get("SliceThickness")
    if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
        for i in range(frames):
            item = _functional(ds, i, "PlanePositionSequence")
            pos = _floats(item.get("ImagePositionPatient"), 3) if item is not None else None
            if pos is not None:
                positions.append(pos)
        item = _functional(ds, 0, "PlaneOrientationSequence")
        orientation = orientation or (_floats(item.get("ImageOrientationPatient"), 6) if item is not None else None)
        item = _functional(ds, 0, "PixelMeasuresSequence")
        if item is not None:
            spacing = spacing or _floats(item.get("PixelSpacing"), 2)
            thickness = thickness if thickness is not None else item.get("SliceThickness")
    else:
        pos = _floats(ds.get("ImagePositionPatient"), 3)
        if pos is not None:
            positions.append(pos)
    try:
        thickness_mm = float(thickness) if thickness not in (None, "") else None
    except (TypeError, ValueError):
        thickness_mm = None
    return DicomHeader(
        path=path,
        sop_uid=_text(ds, "SOPInstanceUID"),
        study_uid=_text(ds, "StudyInstanceUID"),
        series_uid=_text(ds, "SeriesInstanceUID"),
        patient_id=_text(ds, "PatientID"),
        modality=_text(ds, "Modality").upper(),
        sop_class=_text(ds, "SOPClassUID"),
        image_type=tuple(str(v).upper() for v in (ds.get("ImageType") or ())),
        rows=int(ds.get("Rows", 0) or 0),
        cols=int(ds.get("Columns", 0) or 0),
        samples=int(ds.get("SamplesPerPixel", 1) or 1),
        frames=frames,
        has_pixels=any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")),
        orientation=orientation,
        positions=positions,
        pixel_spacing=spacing,
        slice_thickness=thickness_mm,
        kernel=_text(ds, "ConvolutionKernel"),
        manufacturer=_text(ds, "Manufacturer"),
        model=_text(ds, "ManufacturerModelName"),
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


def _fast_floats(ds, keyword: str, n: int) -> tuple[float, ...] | None:
    """A decimal-string value parsed from its raw bytes: pydicom's DS conversion dominates the per-slice cost
    of reading an uncompressed series."""
    elem = ds.get_item(keyword)
    if elem is None:
        return None
    value = elem.value
    if isinstance(value, bytes):
        try:
            return _floats(value.split(b"\\"), n)
        except ValueError:
            pass
    return _floats(ds.get(keyword), n)


def _plain_geometry(ds, path: Path) -> DicomHeader | None:
    """The few values a plain single-frame slice needs (converting every header value costs as much as decoding
    an uncompressed slice); None for files that need the full header."""
    if "NumberOfFrames" in ds or "PerFrameFunctionalGroupsSequence" in ds:
        return None
    position = _fast_floats(ds, "ImagePositionPatient", 3)
    return DicomHeader(
        path, "", "", "", "", "", "", (), int(ds.Rows), int(ds.Columns), int(ds.get("SamplesPerPixel", 1) or 1),
        1, True, _fast_floats(ds, "ImageOrientationPatient", 6), [position] if position else [],
        _fast_floats(ds, "PixelSpacing", 2),
    )  # fmt: skip


def _decode(path: Path, modality: str, full: bool) -> tuple[list[_Slice], DicomHeader]:
    try:
        try:
            ds = pydicom.dcmread(path)
        except InvalidDicomError:  # no preamble: discovery accepted it as DICOM already
            ds = pydicom.dcmread(path, force=True)
        header = (None if full else _plain_geometry(ds, path)) or _header_of(ds, path)
        pixels = ds.pixel_array
    except Exception as err:  # parsers and decoders raise many types; the report needs the reason, not a traceback
        raise SeriesError(f"{path.name}: pixel data cannot be decoded ({' '.join(str(err).split())[:100]})") from None
    if header.samples != 1 or pixels.ndim not in (2, 3):
        raise SeriesError("colour or multi-sample image (not scanner intensities)")
    pixels = pixels.reshape((-1, header.rows, header.cols))
    if len(header.positions) != len(pixels) or header.orientation is None or header.pixel_spacing is None:
        raise SeriesError("no slice geometry (ImagePositionPatient/ImageOrientationPatient/PixelSpacing)")
    padding = ds.get("PixelPaddingValue")
    multiframe = header.frames > 1 or "PerFrameFunctionalGroupsSequence" in ds
    slices = []
    for i, raw in enumerate(pixels):
        transform = (_functional(ds, i, "PixelValueTransformationSequence") if multiframe else None) or ds
        slices.append(
            _Slice(
                position=np.asarray(header.positions[i]),
                orientation=header.orientation,
                spacing=header.pixel_spacing,
                raw=raw,
                slope=(_fast_floats(transform, "RescaleSlope", 1) or (1.0,))[0],
                intercept=(_fast_floats(transform, "RescaleIntercept", 1) or (0.0,))[0],
                padding=None if padding is None else int(padding),
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
    targets = dist[0] + spacing * np.arange(int(np.floor((dist[-1] - dist[0]) / spacing + 1e-6)) + 1)
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
