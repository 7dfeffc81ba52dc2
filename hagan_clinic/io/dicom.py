"""Reading DICOM: whole series assembled into a canonical HU volume (headers for discovery: dicom_header.py).

Decoding of compressed transfer syntaxes (JPEG baseline/lossless, JPEG-LS, JPEG 2000, RLE) is pydicom's, through
the pylibjpeg plugins. Ordering and geometry are checked here from the positions of the slices (see geometry.py)
because the ready-made readers either order by InstanceNumber (MONAI's PydicomReader) or refuse irregular stacks
without saying which problem they found; a cohort report needs the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from .dicom_header import (
    DICOMDIR_REASON,
    NOT_AN_IMAGE_REASON,
    SECONDARY_CAPTURE_PREFIX,
    DicomHeader,
    SkippedFile,
    cause,
    dataset_header,
    functional_item,
    is_dicom_file,
    padding_value,
    plain_geometry,
    read_header,
    regular_stat,
    rescale,
    unreadable,
)
from .geometry import canonical_transform, obliquity_deg, orientation_key, stack_geometry
from .nifti import OUTSIDE_FOV_HU, refuse_implausible_values
from .volume import SeriesError, Volume

__all__ = [
    "DICOMDIR_REASON",
    "NOT_AN_IMAGE_REASON",
    "SECONDARY_CAPTURE_PREFIX",
    "DicomHeader",
    "SkippedFile",
    "is_dicom_file",
    "read_dicom_series",
    "read_header",
]

MAX_VOXELS_PER_FILE = 2**31  # a whole-body CT (512 x 512 x 3000) is 8e8; more is not decoded into memory blindly
MAX_RESAMPLED_FACTOR = 4  # data.irregular 'resample' fills gaps, but not a stack that is mostly gap


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


def _dataset(path: Path):
    try:
        return pydicom.dcmread(path)
    except InvalidDicomError:  # no preamble: discovery accepted it as DICOM already
        return pydicom.dcmread(path, force=True)


def _decode(path: Path, modality: str, full: bool) -> tuple[list[_Slice], DicomHeader]:
    """The slices of one file. Only SeriesError leaves: parsers, decoders and lazily converted header values raise
    many types, and the report needs the reason, not a traceback."""
    try:
        regular_stat(path)  # a file replaced by a FIFO since discovery
        ds = _dataset(path)
    except SeriesError as err:
        raise SeriesError(f"{path.name}: {err}") from None
    except PermissionError as err:  # made unreadable since discovery
        raise SeriesError(f"{path.name}: {unreadable(err)}") from None
    except Exception as err:
        raise SeriesError(f"{path.name}: unreadable DICOM file ({cause(err, path)})") from None
    try:
        return _slices(ds, path, modality, full)
    except SeriesError:
        raise
    except Exception as err:
        raise SeriesError(f"{path.name}: pixel data cannot be decoded ({cause(err, path)})") from None


def _slices(ds, path: Path, modality: str, full: bool) -> tuple[list[_Slice], DicomHeader]:
    header = (None if full else plain_geometry(ds, path)) or dataset_header(ds, path)
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
    padding = padding_value(ds)
    multiframe = header.frames > 1 or "PerFrameFunctionalGroupsSequence" in ds
    slices = []
    for i, raw in enumerate(pixels):
        transform = (functional_item(ds, i, "PixelValueTransformationSequence") if multiframe else None) or ds
        slope, intercept = rescale(transform)
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
    head, *rest = sorted(Path(p) for p in paths)
    slices, header = _decode(head, modality, full=True)  # the first file's full header gives the series' metadata
    for p in rest:
        slices.extend(_decode(p, modality, full=False)[0])
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
