"""A canonical scan to the model's grid: intensity window, body crop, blank-slice trim, antialiased resample, pad.

Input: a :class:`~hagan_clinic.io.volume.Volume` (HU (D, H, W), canonical orientation). Output: float32
(S, S, S) in [-1, 1] on the grid of the data contract (``data.spacing_mm``, ``model.size``), so a generated volume
maps back to HU and millimetres through the same contract. The steps, in order:

1. intensities: CT stays in HU; MR is scaled so the body's ``data.mr_percentiles`` land on the window's bounds;
2. body crop (``data.crop: body``): the bounding box of the largest object above ``data.body_threshold``, found
   on a coarse copy (the couch and loose cables are smaller objects); slices without body at either end are
   trimmed (the reference dropped blank slices anywhere, which breaks the geometry; we trim the ends only);
3. resample to the contract's spacing with an antialiasing filter when shrinking (separable: in-plane, then along
   z, each with torch's antialiased bilinear interpolation: one C++ pass per axis pair, several times faster on
   a 512 x 512 x 300 scan than a 3D Gaussian pre-filter followed by interpolation, which is MONAI's Resize with
   anti_aliasing);
4. centre on the body and pad (air) or crop to S^3; what was cut is noted;
5. the window [lo, hi] maps to [-1, 1].

Voxels outside the scanner's field of view (``Volume.valid`` False) are air for this purpose: the model has no
"unknown" value, and the window maps both to -1.

``data.resize: reference`` replaces steps 1-4 with the reference implementation's preprocessing, which the
published COPDGene and GSP weights were trained on: the window maps the raw intensities to [-1, 1] (MR too,
without the percentile scaling of step 1), every axial slice with nothing above the window's floor is dropped
(anywhere in the volume, not only at the ends), and the rest is resized anisotropically to S^3 (a Gaussian
anti-aliasing filter of sd (factor - 1) / 2 voxels on each shrunk axis, then linear interpolation with the
half-voxel convention and the floor outside the volume). The grid then has no
defined voxel spacing: each scan's field of view is stretched to the cube.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .config import Config
from .io.cache import decode_grid, encode_grid
from .io.volume import SeriesError, Volume

COARSE_MM = 4.0  # resolution of the body search
MARGIN_MM = 5.0  # kept around the body box


@dataclass
class GridInfo:
    """What preprocessing did to one scan (for the manifest)."""

    source_shape: tuple[int, int, int]
    source_spacing: tuple[float, float, float]
    box: tuple[tuple[int, int], ...]  # (start, stop) per axis (D, H, W) of the source kept before resampling
    resampled_shape: tuple[int, int, int]
    notes: list[str] = field(default_factory=list)
    origin: tuple[float, float, float] | None = None  # LPS mm of grid voxel (0, 0, 0); None: no physical grid
    # (x, y, z) mm between grid voxels as resampled: the contract's spacing up to the rounding of the voxel count
    spacing: tuple[float, float, float] | None = None


def normalise_intensity(volume: Volume, cfg: Config) -> np.ndarray:
    """(D, H, W) in the window's units: HU for CT (as stored: int16 or float32); MR scaled by body percentiles
    (float32)."""
    if cfg.data.modality == "CT":
        return volume.hu
    hu = volume.hu.astype(np.float32, copy=False)
    lo_w, hi_w = cfg.data.window
    values = hu[volume.valid] if volume.valid is not None else hu
    body = values[values > np.percentile(values, 50) * 0.1] if values.size else values
    if body.size == 0:
        raise SeriesError("empty MR volume")
    lo, hi = np.percentile(body, cfg.data.mr_percentiles)
    if hi <= lo:
        raise SeriesError("MR volume without intensity contrast")
    return (hu - lo) / (hi - lo) * (hi_w - lo_w) + lo_w


def body_box(values: np.ndarray, spacing: tuple[float, float, float], threshold: float, valid=None):
    """(start, stop) per axis (D, H, W) of the largest object above ``threshold``, plus a margin. None if empty."""
    from scipy import ndimage

    step = [max(1, int(COARSE_MM // s)) for s in (spacing[2], spacing[1], spacing[0])]
    coarse = values[:: step[0], :: step[1], :: step[2]] > threshold
    if valid is not None:
        coarse &= valid[:: step[0], :: step[1], :: step[2]]
    labels, n = ndimage.label(coarse)
    if n == 0:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    obj = ndimage.find_objects(labels)[int(np.argmax(sizes))]
    box = []
    for axis, sl in enumerate(obj):
        margin = int(np.ceil(MARGIN_MM / (spacing[2 - axis])))
        start = max(0, sl.start * step[axis] - margin)
        stop = min(values.shape[axis], sl.stop * step[axis] + step[axis] + margin)
        box.append((start, stop))
    return tuple(box)


def resample(values: np.ndarray, spacing: tuple[float, float, float], target: tuple[float, float, float]):
    """Resample float32 (D, H, W) from ``spacing`` to ``target`` (x, y, z mm), antialiased when shrinking."""
    import torch
    import torch.nn.functional as F

    d, h, w = values.shape
    size = [max(1, int(round(n * s / t))) for n, s, t in zip((d, h, w), spacing[::-1], target[::-1])]
    x = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
    with torch.inference_mode():
        if (size[1], size[2]) != (h, w):  # in-plane: slices as a batch of 2D images
            x = F.interpolate(x[:, None], size=size[1:], mode="bilinear", antialias=True, align_corners=False)[:, 0]
        if size[0] != d:  # along z: (H, 1, D, W) images, only D changes
            x = x.permute(1, 0, 2)[:, None]
            x = F.interpolate(x, size=(size[0], size[2]), mode="bilinear", antialias=True, align_corners=False)
            x = x[:, 0].permute(1, 0, 2)
    return np.ascontiguousarray(x.numpy())


def fit(values: np.ndarray, size: int, fill: float, notes: list[str], spacing) -> np.ndarray:
    """Centre ``values`` (D, H, W) in a size^3 cube: pad with ``fill``, or crop the middle where it is larger."""
    out = np.full((size,) * 3, fill, dtype=np.float32)
    src, dst = [], []
    for axis, n in enumerate(values.shape):
        if n > size:
            name = "zyx"[axis]
            mm = spacing[2 - axis]
            notes.append(f"cropped along {name}: {n * mm:.0f} mm > the grid's {size * mm:.0f} mm")
            start = (n - size) // 2
            src.append(slice(start, start + size))
            dst.append(slice(0, size))
        else:
            start = (size - n) // 2
            src.append(slice(0, n))
            dst.append(slice(start, start + n))
    out[tuple(dst)] = values[tuple(src)]
    return out


def _grid_geometry(volume: Volume, box, resampled_shape, size: int):
    """(origin, spacing) of the grid in the source's LPS coordinates: the centre of grid voxel (0, 0, 0) from the
    crop's start, the resampling's half-voxel convention (align_corners=False) and the centring offset of ``fit``;
    the spacing (x, y, z) the resampling really made (n source voxels onto m: n * s / m, which rounding of m
    keeps within half a voxel of the contract's over the whole extent). (None, None) for a source read on the
    nearest axial grid of an oblique one: its voxels have no exact place in the scanner's coordinates."""
    if "oblique" in str(volume.meta.get("notes", "")):
        return None, None
    origin, spacing = [], []
    for axis in (2, 1, 0):  # x (W), y (H), z (D)
        n, m = box[axis][1] - box[axis][0], resampled_shape[axis]
        offset = (size - m) // 2 if m <= size else -((m - size) // 2)  # grid index = resampled index + offset
        source_index = box[axis][0] + (0 - offset + 0.5) * n / m - 0.5
        origin.append(volume.origin[2 - axis] + source_index * volume.spacing[2 - axis])
        spacing.append(volume.spacing[2 - axis] * n / m)
    return tuple(origin), tuple(spacing)


def reference_resize(values: np.ndarray, size: int) -> np.ndarray:
    """The reference's anisotropic resize of float32 (D, H, W) in [-1, 1] to (size,) * 3, floor (-1) outside."""
    from scipy import ndimage

    factors = [n / size for n in values.shape]
    sigma = [max(0.0, (f - 1.0) / 2.0) for f in factors]
    if any(f > 1 for f in factors):  # shrinking along some axis: anti-alias first
        values = ndimage.gaussian_filter(values, sigma, mode="constant", cval=-1.0)
    zoom = [size / n for n in values.shape]
    out = ndimage.zoom(values, zoom, order=1, mode="grid-constant", cval=-1.0, grid_mode=True)
    return np.ascontiguousarray(out, dtype=np.float32)


def _reference_grid(volume: Volume, cfg: Config) -> tuple[np.ndarray, GridInfo]:
    # the reference windowed raw intensities for MR too (no percentile scaling)
    values = volume.hu.astype(np.float32)
    lo = float(cfg.data.window[0])
    values[~np.isfinite(values)] = lo
    if volume.valid is not None:
        values[~volume.valid] = lo
    window_inplace(values, cfg.data.window)
    # blank axial slices: nothing above the floor (the reference's "mean == -1", without float rounding)
    keep = np.flatnonzero((values > -1.0).any(axis=(1, 2)))
    if keep.size == 0:
        raise SeriesError(f"every slice is blank (nothing above the window's floor, {lo:g})")
    dropped = len(values) - keep.size
    notes = [f"reference resize: {dropped} blank slice(s) dropped"] if dropped else []
    grid = reference_resize(values[keep], cfg.model.size)
    box = ((int(keep[0]), int(keep[-1]) + 1), (0, values.shape[1]), (0, values.shape[2]))
    return grid, GridInfo(volume.shape, volume.spacing, box, tuple(grid.shape), notes)


def to_model_grid(volume: Volume, cfg: Config) -> tuple[np.ndarray, GridInfo]:
    """The model's input for one scan: float32 (S, S, S) in [-1, 1], and what was done to get it."""
    data = cfg.data
    if data.resize == "reference":
        return _reference_grid(volume, cfg)
    values = normalise_intensity(volume, cfg)
    lo = float(data.window[0])
    notes: list[str] = []
    box = tuple((0, n) for n in values.shape)
    if data.crop == "body":
        threshold = data.body_threshold if data.modality == "CT" else lo + 0.05 * (data.window[1] - lo)
        found = body_box(values, volume.spacing, threshold, volume.valid)
        if found is None:
            raise SeriesError(f"no body found (nothing above {threshold:g} {'HU' if data.modality == 'CT' else ''})")
        box = found
    crop = tuple(slice(a, b) for a, b in box)
    values = values[crop]
    if volume.valid is not None:  # no measurement counts as the window's floor (air), never as tissue
        values = np.where(volume.valid[crop], values, np.float32(lo)).astype(np.float32, copy=False)
    if data.spacing_mm is None:  # the config allows no spacing only with resize: reference (handled above)
        raise SeriesError("data.spacing_mm is null: only data.resize: reference works without a spacing")
    target = (float(data.spacing_mm[0]), float(data.spacing_mm[1]), float(data.spacing_mm[2]))
    resampled = resample(values, volume.spacing, target)
    if np.shares_memory(resampled, values) or np.shares_memory(resampled, volume.hu):
        resampled = resampled.copy()
    window_inplace(resampled, data.window)
    grid = fit(resampled, cfg.model.size, -1.0, notes, target)
    origin, spacing = _grid_geometry(volume, box, resampled.shape, cfg.model.size)
    return grid, GridInfo(volume.shape, volume.spacing, box, tuple(resampled.shape), notes, origin, spacing)


def model_input(volume: Volume, cfg: Config) -> np.ndarray:
    """What the networks see of one scan, in training and in encoding alike: the model grid rounded as the
    cache stores it (float16), as float32 (S, S, S) in [-1, 1]."""
    grid, _ = to_model_grid(volume, cfg)
    return decode_grid(encode_grid(grid, "float16"))


def window_inplace(values: np.ndarray, window) -> np.ndarray:
    """The same mapping as io.nifti.to_model_range ([lo, hi] -> [-1, 1], clipped), without temporaries."""
    lo, hi = float(window[0]), float(window[1])
    np.clip(values, lo, hi, out=values)
    values -= np.float32(lo)
    values *= np.float32(2.0 / (hi - lo))
    values -= np.float32(1.0)
    return values
