"""Rasterising a phantom patient at any grid shape: the deterministic twin of :func:`draw_patient`."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..errors import short_repr
from ..io.volume import Volume
from .params import (
    AIR,
    BONE,
    COUCH_CORE,
    COUCH_SHELL,
    CUSHION_COVER,
    CUSHION_FOAM,
    DEFAULT_SHAPE,
    EMPHYSEMA,
    FAT,
    FOV_MM,
    GAS,
    HEART,
    LUMEN,
    LUNG_LABELS,
    MARROW,
    PARENCHYMA,
    SOFT,
    VESSEL,
    WALL,
    Z_ORIGIN_MM,
    PatientParams,
    PhantomError,
    _in_any_lung,
    _inside_lung,
)  # fmt: skip

_SQUARE = np.ones((3, 3), bool)
# Grid shapes (slices, rows, cols) rendered: 16 voxels resolve the anatomy at all; 2**27 voxels (512^3) is a
# full-resolution chest CT and a few GB of memory while rendering.
MIN_EDGE, MAX_EDGE, MAX_VOXELS = 16, 2048, 2**27


@dataclass
class ThoraxPhantom:
    """A rendered patient: ``volume`` (canonical, integer HU), ``labels`` uint8 (D, H, W), ``lung_mask`` bool truth."""

    volume: Volume
    labels: np.ndarray
    lung_mask: np.ndarray
    truth: dict
    params: PatientParams


# ---------------------------------------------------------------- rendering (deterministic twin)
class _Grid:
    """Voxel centres in phantom mm: x, y in (-200, 200), z in (0, 300)."""

    def __init__(self, shape: tuple[int, int, int]):
        self.shape = tuple(int(s) for s in shape)
        d, h, w = self.shape
        self.spacing = (FOV_MM[0] / w, FOV_MM[1] / h, FOV_MM[2] / d)  # (x, y, z) mm
        self.first = (-FOV_MM[0] / 2 + self.spacing[0] / 2, -FOV_MM[1] / 2 + self.spacing[1] / 2, self.spacing[2] / 2)

    def box(self, lo, hi):
        """Array slices (z, y, x) and broadcastable float32 coordinates of the voxels in the mm box [lo, hi]."""
        slices, coords = [], []
        for axis, n in ((2, self.shape[0]), (1, self.shape[1]), (0, self.shape[2])):
            s, f = self.spacing[axis], self.first[axis]
            i0, i1 = max(0, int(np.floor((lo[axis] - f) / s))), min(n, int(np.ceil((hi[axis] - f) / s)) + 1)
            if i1 <= i0:
                return None
            slices.append(slice(i0, i1))
            coords.append((f + s * np.arange(i0, i1)).astype(np.float32))
        z, y, x = coords
        return tuple(slices), (x[None, None, :], y[None, :, None], z[:, None, None])


def _segment_dist2(x, y, z, seg) -> np.ndarray:
    x0, y0, z0, x1, y1, z1 = seg[:6]
    vx, vy, vz = x1 - x0, y1 - y0, z1 - z0
    dx, dy, dz = x - x0, y - y0, z - z0
    t = np.clip((dx * vx + dy * vy + dz * vz) / max(vx * vx + vy * vy + vz * vz, 1e-9), 0, 1)
    return (dx - t * vx) ** 2 + (dy - t * vy) ** 2 + (dz - t * vz) ** 2


def _paint_segments(labels, grid, segments, value, allow, inside=None) -> None:
    for seg in segments:
        r = seg[6]
        lo = np.minimum(seg[:3], seg[3:6]) - r
        hi = np.maximum(seg[:3], seg[3:6]) + r
        box = grid.box(lo, hi)
        if box is None:
            continue
        sl, (x, y, z) = box
        sub = labels[sl]
        m = (_segment_dist2(x, y, z, seg) <= r * r) & np.isin(sub, allow)
        if inside is not None:  # clip to a region, evaluated only where the tube is
            idx = np.nonzero(m)
            m[idx] = inside(x[0, 0, idx[2]], y[0, idx[1], 0], z[idx[0], 0, 0])
        sub[m] = value


def _anatomy(p: PatientParams, grid: _Grid) -> np.ndarray:
    """The label map, uint8 (D, H, W)."""
    _, (x, y, z) = grid.box((-999, -999, -999), (999, 999, 999))
    x2, y2 = x[0], y[0]
    body = (x2 / p.body_a) ** 2 + (y2 / p.body_b) ** 2 <= 1
    inner = (x2 / (p.body_a - p.fat_mm)) ** 2 + (y2 / (p.body_b - p.fat_mm)) ** 2 <= 1
    if p.couch is not None:  # the back is flattened where it rests on the couch (fat only: see _draw_couch)
        on_couch = y2 < p.couch.top_y - x2**2 / (2 * p.couch.radius)
        body, inner = body & on_couch, inner & on_couch
    r_spine = np.hypot(x2, y2 - p.spine_y)
    plane = np.select([r_spine <= p.spine_r - 3, r_spine <= p.spine_r, inner, body], [MARROW, BONE, SOFT, FAT], AIR)
    plane = plane.astype(np.uint8)
    _paint_outside_objects(plane, p, x2, y2)
    labels = np.broadcast_to(plane, grid.shape).copy()
    _paint_pockets(labels, grid, p)
    disc = (z[:, 0, 0] % 28.0) < 5.0  # intervertebral discs
    spine = r_spine <= p.spine_r
    for k in np.nonzero(disc)[0]:
        labels[k][spine] = SOFT
    _paint_segments(labels, grid, p.ribs, BONE, (SOFT, FAT))
    hx, hy, hz, hax, hay, haz = p.heart
    sl, (x, y, z) = grid.box((hx - hax, hy - hay, hz - haz), (hx + hax, hy + hay, hz + haz))
    sub = labels[sl]
    sub[(((x - hx) / hax) ** 2 + ((y - hy) / hay) ** 2 + ((z - hz) / haz) ** 2 <= 1) & (sub == SOFT)] = HEART
    for lung in p.lungs:
        lo = (lung.cx - lung.ax, lung.cy - lung.ay, lung.z_low)
        sl, (x, y, z) = grid.box(lo, (lung.cx + lung.ax, lung.cy + lung.ay, lung.z_low + lung.height))
        sub = labels[sl]
        sub[_inside_lung(p, lung, x, y, z) & (sub == SOFT)] = PARENCHYMA
    _paint_segments(labels, grid, p.vessels, VESSEL, (PARENCHYMA,), lambda x, y, z: _in_any_lung(p, x, y, z, 5.0))
    for bx, by, bz, r, level in p.blobs:
        box = grid.box((bx - r, by - r, bz - r), (bx + r, by + r, bz + r))
        if box is not None:
            sl, (x, y, z) = box
            sub = labels[sl]
            sub[((x - bx) ** 2 + (y - by) ** 2 + (z - bz) ** 2 <= r * r) & (sub == PARENCHYMA)] = EMPHYSEMA + level
    _paint_airways(labels, grid, p.airways)
    _paint_stomach(labels, grid, p)
    return labels


def _covered(foam: np.ndarray, outer: np.ndarray) -> np.ndarray:
    """The cover of a foam region (2D): ``outer`` minus the foam, at least one pixel thick all round, so the foam
    is enclosed at any grid spacing (as couch and cushion covers are on a real scanner)."""
    return (outer | ndimage.binary_dilation(foam, _SQUARE)) & ~foam


def _paint_outside_objects(plane: np.ndarray, p: PatientParams, x2, y2) -> None:
    """The couch and the cushions, the same in every slice, painted into the air of one axial plane (H, W)."""
    if p.couch is not None:
        c = p.couch
        depth = y2 - (c.top_y - x2**2 / (2 * c.radius))  # mm below the couch's top surface
        outer = (np.abs(x2) <= c.half_width) & (depth >= 0) & (depth <= 2 * c.shell_mm + c.core_mm)
        core = (np.abs(x2) <= c.half_width - c.shell_mm) & (depth >= c.shell_mm) & (depth <= c.shell_mm + c.core_mm)
        plane[_covered(core, outer) & (plane == AIR)] = COUCH_SHELL
        plane[core & (plane == AIR)] = COUCH_CORE
    if p.cushions is not None:
        cu, a, b = p.cushions, p.body_a, p.body_b
        thick, front = cu.blanket
        cover = cu.cover_mm

        def ellipse(k: float) -> np.ndarray:
            return (x2 / (a + k)) ** 2 + (y2 / (b + k)) ** 2 <= 1

        outer = ellipse(thick + 2 * cover) & ~ellipse(0) & (y2 < front)
        foam = ellipse(thick + cover) & ~ellipse(cover) & (y2 < front - cover)
        for wx, wy, rn, rt, angle in cu.wedges:
            u = (x2 - wx) * np.cos(angle) + (y2 - wy) * np.sin(angle)
            v = (y2 - wy) * np.cos(angle) - (x2 - wx) * np.sin(angle)
            outer = outer | ((u / rn) ** 2 + (v / rt) ** 2 <= 1)
            foam = foam | ((u / (rn - cover)) ** 2 + (v / (rt - cover)) ** 2 <= 1)
        foam &= plane == AIR
        plane[_covered(foam, outer) & (plane == AIR)] = CUSHION_COVER
        plane[foam] = CUSHION_FOAM


def _paint_pockets(labels: np.ndarray, grid: _Grid, p: PatientParams) -> None:
    """Air bubbles inside the cushions' foam."""
    if p.cushions is None:
        return
    for bx, by, bz, r in p.cushions.pockets:
        box = grid.box((bx - r, by - r, bz - r), (bx + r, by + r, bz + r))
        if box is not None:
            sl, (x, y, z) = box
            sub = labels[sl]
            sub[((x - bx) ** 2 + (y - by) ** 2 + (z - bz) ** 2 <= r * r) & (sub == CUSHION_FOAM)] = AIR


def _paint_stomach(labels: np.ndarray, grid: _Grid, p: PatientParams) -> None:
    """A gas bubble under the left hemidiaphragm, in soft tissue and never next to a lung voxel."""
    if p.stomach is None:
        return
    sx, sy, sz, rx, ry, rz = p.stomach
    pad = np.array(grid.spacing)
    box = grid.box(np.array((sx - rx, sy - ry, sz - rz)) - pad, np.array((sx + rx, sy + ry, sz + rz)) + pad)
    if box is None:
        return
    sl, (x, y, z) = box
    sub = labels[sl]
    gas = (((x - sx) / rx) ** 2 + ((y - sy) / ry) ** 2 + ((z - sz) / rz) ** 2 <= 1) & (sub == SOFT)
    gas &= ~_in_any_lung(p, x, y, z, margin=-10.0)  # 10 mm of diaphragm and stomach wall under the lung
    gas &= ~ndimage.binary_dilation(np.isin(sub, LUNG_LABELS), np.ones((3, 3, 3), bool))
    sub[gas] = GAS


def _paint_airways(labels: np.ndarray, grid: _Grid, airways) -> None:
    """Lumen inside the tubes, a 2 mm wall around them that is at least one voxel thick in every direction."""
    pts = np.array([a[:3] for a in airways] + [a[3:6] for a in airways])
    pad = max(a[6] for a in airways) + 2.0 + 2 * max(grid.spacing)
    sl, (x, y, z) = grid.box(pts.min(0) - pad, pts.max(0) + pad)
    lumen = np.zeros(labels[sl].shape, bool)
    wall = np.zeros_like(lumen)
    for a in airways:
        d2 = _segment_dist2(x, y, z, a)
        lumen |= d2 <= a[6] ** 2
        wall |= d2 <= (a[6] + 2.0) ** 2
    wall = (wall | ndimage.binary_dilation(lumen, np.ones((3, 3, 3), bool))) & ~lumen
    sub = labels[sl]
    sub[wall] = WALL
    sub[lumen] = LUMEN


def _hu_table(p: PatientParams) -> np.ndarray:
    lut = np.zeros(256, np.float32)
    lut[[AIR, FAT, SOFT, BONE, MARROW, HEART, PARENCHYMA, VESSEL, WALL, LUMEN]] = [
        -1000, p.hu_fat, 40, p.hu_bone, 250, 40, p.hu_parenchyma, 40, 40, -1000]  # fmt: skip
    lut[EMPHYSEMA : EMPHYSEMA + 21] = -990 + np.arange(21)
    lut[GAS] = -1000
    if p.couch is not None:
        lut[[COUCH_SHELL, COUCH_CORE]] = p.couch.hu_shell, p.couch.hu_core
    if p.cushions is not None:
        lut[[CUSHION_COVER, CUSHION_FOAM]] = p.cushions.hu_cover, p.cushions.hu_foam
    return lut


def _noise(p: PatientParams, grid: _Grid) -> np.ndarray:
    """Scanner noise (HU), float32 (D, H, W): white, then correlated in-plane, rescaled to the profile's sd."""
    rng = np.random.default_rng([p.seed, p.index, 11])
    noise = rng.standard_normal(grid.shape, dtype=np.float32)
    sigma = p.profile.noise_corr_mm / grid.spacing[0]
    gain = 1.0
    if sigma >= 0.3:
        for axis in (1, 2):
            ndimage.gaussian_filter1d(noise, sigma, axis=axis, output=noise, truncate=2.0)
        k = np.exp(-0.5 * (np.arange(-int(2 * sigma + 0.5), int(2 * sigma + 0.5) + 1) / sigma) ** 2)
        gain = float(np.sum((k / k.sum()) ** 2))  # variance left by one pass; two passes leave gain**2
    noise *= np.float32(p.profile.noise_hu / gain)
    return noise


def parse_shape(text: str) -> tuple[int, int, int]:
    """A grid shape written as 'D,H,W' or 'DxHxW' (slices, rows, cols; e.g. '96,128,128'), checked by
    :func:`check_shape`; raises PhantomError."""
    parts = text.replace("x", ",").split(",")
    # ASCII digits only, and few of them: int() of a thousands-digit string raises (and str.isdigit takes '²')
    if len(parts) != 3 or not all(re.fullmatch(r"[0-9]{1,9}", p.strip()) for p in parts):
        raise PhantomError(f"expected three integers like 96,128,128, got {text[:40]!r}")
    return check_shape(int(p) for p in parts)


def check_shape(shape: Iterable[int]) -> tuple[int, int, int]:
    """``shape`` as (slices, rows, cols) if it is three integers from MIN_EDGE to MAX_EDGE voxels, at most
    MAX_VOXELS in all (checked before any memory is asked for); raises PhantomError."""
    dims = tuple(shape)
    if len(dims) != 3 or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool)
                                  and MIN_EDGE <= s <= MAX_EDGE for s in dims):  # fmt: skip
        raise PhantomError(
            f"shape must be three integers from {MIN_EDGE} to {MAX_EDGE} (slices, rows, cols), got {short_repr(dims)}"
        )
    voxels = int(np.prod([int(s) for s in dims]))
    if voxels > MAX_VOXELS:  # rendering takes ~20 bytes a voxel: bound it before any memory is asked for
        raise PhantomError(
            f"shape {'x'.join(str(int(s)) for s in dims)} is {voxels:,} voxels per series; phantoms have at most "
            f"{MAX_VOXELS:,} (e.g. 512,512,512): choose a smaller shape"
        )
    slices, rows, cols = (int(s) for s in dims)
    return slices, rows, cols


def render_thorax(params: PatientParams, shape: tuple[int, int, int] = DEFAULT_SHAPE) -> ThoraxPhantom:
    """Rasterise ``params`` on a (D, H, W) grid covering 400 x 400 x 300 mm; deterministic for given params."""
    grid = _Grid(check_shape(shape))
    labels = _anatomy(params, grid)
    hu = _hu_table(params)[labels]
    hu += _noise(params, grid)
    np.rint(np.clip(hu, -1024, 3071, out=hu), out=hu)  # what storage as integers after rescale gives back
    valid = None
    if params.profile.padded_fov:
        _, (x, y, _) = grid.box((-999, -999, 0), (999, 999, 0))
        circle = x[0] ** 2 + y[0] ** 2 <= params.fov_radius_mm**2
        valid = np.broadcast_to(circle, grid.shape).copy()
        hu[:, ~circle] = -1024.0
    lung = np.isin(labels, LUNG_LABELS)
    voxel_ml = float(np.prod(grid.spacing)) / 1000
    values = hu[lung]
    truth = {
        "lung_volume_ml": float(values.size * voxel_ml),
        "laa950_pct": float(np.mean(values < -950) * 100),
        "perc15_hu": float(np.percentile(values, 15)),
        "pct_emphysema": float(np.mean(labels[lung] >= EMPHYSEMA) * 100),
    }
    prof = params.profile
    meta = {"patient_id": params.patient_id, "modality": "CT", "kernel": prof.kernel,
            "manufacturer": prof.manufacturer, "model": prof.model, "slice_thickness_mm": prof.slice_thickness_mm,
            "source": "hagan_clinic.phantoms"}  # fmt: skip
    origin = (grid.first[0], grid.first[1], Z_ORIGIN_MM + grid.first[2])
    return ThoraxPhantom(Volume(hu, grid.spacing, origin, valid, meta), labels, lung, truth, params)
