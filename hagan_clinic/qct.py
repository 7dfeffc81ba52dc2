"""Quantitative CT of the lungs: a classic threshold lung mask and the emphysema indices measured inside it.

Input arrays follow the canonical orientation of :mod:`hagan_clinic.io.volume`: ``hu`` float (D, H, W) = (z, y, x)
in HU, ``spacing`` (x, y, z) in mm, ``valid`` bool (D, H, W) or None (False outside the scanner's field of view).
Every size is given in mm and converted with the spacing, so the same code serves 3 mm phantoms and 0.6 mm scans.

The mask pipeline: air below -400 HU inside the valid region; air connected to the in-plane borders (or to the
invalid region outside the field of view) is outside the body; the trachea is found as a round air blob near the
midline in the top slices and grown down the main bronchi at an adaptive strict threshold with a leak check, then
removed with its wall; vessels and nodules (per-slice holes up to 15 cm^2) are filled; the lungs are the largest
one or two components; the airway and its wall are removed again at the end, since filling closes over them.

Public API: ``lung_mask``, ``measure``, ``measure_volume``, ``is_sharp_kernel``, ``QCTError``.
"""

from __future__ import annotations

import re

import numpy as np
from scipy import ndimage

from .errors import HaganError
from .io.volume import Volume

LUNG_THRESHOLD_HU = -400.0
LAA_THRESHOLD_HU = -950.0
AIRWAY_THRESHOLDS_HU = (-990.0, -975.0, -960.0, -945.0, -930.0, -915.0, -900.0, -880.0, -860.0, -840.0)
AIRWAY_MAX_ML = 250.0  # trachea + main bronchi are ~20-80 ml; a grown airway beyond this has leaked into the lungs
AIRWAY_LEAK_ML = 60.0  # a jump this large (and a doubling) between two thresholds is a leak, not more bronchi
AIRWAY_SMOOTH_MM = 1.0  # Gaussian sd before growing, so noise does not break the lumen at a strict threshold
AIRWAY_WALL_MM = 2.5  # main bronchus walls are ~1.5-2.5 mm
PLAUSIBLE_LUNG_ML = (1000.0, 10000.0)
THICK_SLICE_MM = 2.5
MAX_HOLE_MM2 = 1500.0  # per-slice holes up to this area are vessels or nodules; the diaphragm dome is larger
_SLICE_2D = np.zeros((3, 3, 3), bool)
_SLICE_2D[1] = ndimage.generate_binary_structure(2, 1)  # connectivity within an axial slice only


class QCTError(HaganError):
    """The lungs could not be measured in this scan; the message says why."""


# Sharp (lung/bone/edge-enhancing) reconstruction kernels, which raise image noise and so %LAA-950:
# Siemens B/Br/Bl/Bv/Bf/I/Ir/Q/Qr with a number >= 50 (B60f, B70f, Br64, Bl57, I70f); GE LUNG, BONE, BONEPLUS,
# EDGE, CHEST, DETAIL; Philips C, D, E, L, LA, YC, YD, YE; Toshiba/Canon FC30-FC39 (bone), FC50-FC59 and FC80-FC89
# (lung). Also any name containing SHARP, LUNG or BONE. Smooth examples: B30f, B40f, Br40, STANDARD, SOFT, B, YB, FC13.
_SIEMENS = re.compile(r"^(?:B|BR|BL|BV|BF|I|IR|Q|QR)(\d{2})[A-Z]?$")
_TOSHIBA = re.compile(r"^FC(\d{2})$")
_NAMED_SHARP = {"LUNG", "BONE", "BONEPLUS", "EDGE", "CHEST", "DETAIL", "C", "D", "E", "L", "LA", "YC", "YD", "YE"}


def is_sharp_kernel(kernel: str | None) -> bool:
    """Whether a ConvolutionKernel value names a sharp kernel (the list is in this module's comments)."""
    if not kernel:
        return False
    name = str(kernel).split("\\")[0].strip().upper()  # multi-valued (Siemens "Br64\\2"): the first value names it
    if m := _SIEMENS.match(name):
        return int(m.group(1)) >= 50
    if m := _TOSHIBA.match(name):
        n = int(m.group(1))
        return 30 <= n <= 39 or 50 <= n <= 59 or 80 <= n <= 89
    return name in _NAMED_SHARP or any(w in name for w in ("SHARP", "LUNG", "BONE"))


def _voxels(mm: float, spacing: tuple[float, float, float]) -> np.ndarray:
    """A length in mm as voxels along (z, y, x)."""
    return np.array([mm / spacing[2], mm / spacing[1], mm / spacing[0]])


def _ball(radius_vox: np.ndarray) -> np.ndarray:
    """An ellipsoidal structuring element with the given (z, y, x) radii in voxels, at least the 3x3x3 cube."""
    r = np.maximum(np.floor(radius_vox + 1e-6).astype(int), 1)
    g = np.ogrid[-r[0] : r[0] + 1, -r[1] : r[1] + 1, -r[2] : r[2] + 1]
    ball = sum((g[i] / max(radius_vox[i], 1.0)) ** 2 for i in range(3)) <= 1 + 1e-6
    ball[r[0] - 1 : r[0] + 2, r[1] - 1 : r[1] + 2, r[2] - 1 : r[2] + 2] = True
    return ball


def _bbox(mask: np.ndarray, pad: int = 0) -> tuple[slice, ...]:
    idx = [np.nonzero(mask.any(axis=tuple(j for j in range(3) if j != i)))[0] for i in range(3)]
    return tuple(slice(max(0, a[0] - pad), min(n, a[-1] + pad + 1)) for a, n in zip(idx, mask.shape))


def _touching_sides(mask: np.ndarray) -> np.ndarray:
    """The 3D components of ``mask`` that touch the in-plane faces (H and W) of the volume, bool (D, H, W)."""
    labels, n = ndimage.label(mask)
    faces = np.concatenate([labels[:, 0, :].ravel(), labels[:, -1, :].ravel(), labels[:, :, 0].ravel(),
                            labels[:, :, -1].ravel()])  # fmt: skip
    keep = np.zeros(n + 1, bool)
    keep[np.unique(faces)] = True
    keep[0] = False
    return keep[labels]


def _body_air(hu: np.ndarray, valid: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Air inside the body and the body itself (everything valid that is not outside air), both bool (D, H, W).

    Outside air is the air connected to the in-plane faces (H and W), directly or through the invalid region
    outside the field of view; the z faces do not count, since lungs and trachea run through the top and bottom
    of a scan. Invalid voxels enclosed by the body (not reaching a face) separate rather than connect.
    """
    air = hu < LUNG_THRESHOLD_HU
    if valid is None:
        outside = _touching_sides(air)
        return air & ~outside, ~outside
    air &= valid
    outside = _touching_sides(air | _touching_sides(~valid))
    return air & ~outside, valid & ~outside


def _midline(body: np.ndarray) -> np.ndarray:
    """Per axial slice, the x index (column) halfway across the body, float (D,), NaN where a slice has no body."""
    cols = body.any(axis=1)
    first = np.argmax(cols, axis=1).astype(float)
    last = cols.shape[1] - 1 - np.argmax(cols[:, ::-1], axis=1)
    return np.where(cols.any(axis=1), (first + last) / 2, np.nan)


def _find_trachea(cand: np.ndarray, hu: np.ndarray, midline: np.ndarray, spacing) -> tuple[int, int, int] | None:
    """A seed voxel in the trachea: a round, dark, 30-800 mm^2 air blob near the body's midline in the top 60 mm."""
    sx, sy, sz = spacing
    top = cand.shape[0] - 1
    for k in range(top, max(-1, top - int(np.ceil(60.0 / sz)) - 1), -1):
        mid_x = midline[k]
        if np.isnan(mid_x):
            continue
        labels, _ = ndimage.label(cand[k])
        best = None
        for i, sl in enumerate(ndimage.find_objects(labels), start=1):
            blob = labels[sl] == i
            area = blob.sum() * sx * sy
            h, w = (sl[0].stop - sl[0].start) * sy, (sl[1].stop - sl[1].start) * sx
            cy, cx = (np.mean(a) + s.start for a, s in zip(np.nonzero(blob), sl))
            if not 30 <= area <= 800 or area < 0.6 * np.pi / 4 * h * w or max(h, w) > 2 * min(h, w):
                continue
            off = abs(cx - mid_x) * sx
            if off > 30 or np.mean(hu[k][sl][blob]) > -850:
                continue
            if best is None or off < best[0]:
                ys, xs = np.nonzero(blob)
                j = np.argmin((ys + sl[0].start - cy) ** 2 + (xs + sl[1].start - cx) ** 2)
                best = (off, (k, int(ys[j] + sl[0].start), int(xs[j] + sl[1].start)))
        if best is not None:
            return best[1]
    return None


def _grow_airway(hu: np.ndarray, cand: np.ndarray, seed: tuple[int, int, int], spacing) -> np.ndarray:
    """The trachea and main bronchi grown from ``seed``, bool (D, H, W): the loosest threshold that does not leak."""
    comp, _ = ndimage.label(cand)
    sl = _bbox(comp == comp[seed], pad=1)
    region = comp[sl] == comp[seed]
    sigma = _voxels(AIRWAY_SMOOTH_MM, spacing)
    sigma[sigma < 0.3] = 0  # below a third of a voxel smoothing does nothing useful along that axis
    smooth = ndimage.gaussian_filter(hu[sl].astype(np.float32), sigma, truncate=2.0)
    local_seed = tuple(s - c.start for s, c in zip(seed, sl))
    voxel_ml = float(np.prod(spacing)) / 1000
    airway, previous = None, 0.0
    for t in AIRWAY_THRESHOLDS_HU:
        labels, _ = ndimage.label(region & (smooth < t))
        if labels[local_seed] == 0:
            continue
        grown = labels == labels[local_seed]
        ml = grown.sum() * voxel_ml
        if ml > AIRWAY_MAX_ML or (previous > 0 and ml > 2 * previous and ml - previous > AIRWAY_LEAK_ML):
            break  # leaked into the lungs: keep the last airway that did not
        airway, previous = grown, ml
    out = np.zeros(hu.shape, bool)
    if airway is not None:
        out[sl] = ndimage.binary_fill_holes(airway, _SLICE_2D)
    return out


def _select_lungs(cand: np.ndarray, mid_x: float, spacing) -> tuple[np.ndarray, int]:
    """The lungs, bool (D, H, W), and how many: the largest air component and, when it holds one lung only, the
    largest one at least a tenth its size on the other side of the body's midline."""
    labels, n = ndimage.label(cand)
    if n == 0:
        raise QCTError("no lung found: no air inside the body below -400 HU")
    sizes = np.bincount(labels.ravel())[1:] * float(np.prod(spacing)) / 1000
    order = np.argsort(sizes)[::-1][:6] + 1
    if sizes[order[0] - 1] < 50:
        raise QCTError(f"no lung found: the largest air region inside the body is {sizes[order[0] - 1]:.0f} ml")
    objects = ndimage.find_objects(labels)

    def left_fraction(i: int) -> float:
        sl = objects[i - 1]
        xs = np.nonzero(labels[sl] == i)[2] + sl[2].start
        return float(np.mean(xs > mid_x))

    first = left_fraction(order[0])
    keep = [order[0]]
    if 0.2 < first < 0.8:  # both lungs in one component (joined in front of the heart)
        return labels == order[0], 2
    for i in order[1:]:
        if sizes[i - 1] >= 0.1 * sizes[order[0] - 1] and (left_fraction(i) > 0.5) != (first > 0.5):
            keep.append(i)
            break
    lungs = labels == keep[0]
    if len(keep) > 1:
        lungs |= labels == keep[1]
    return lungs, len(keep)


def _fill_vessels(air: np.ndarray, spacing) -> np.ndarray:
    """Fill per axial slice the holes that vessels and nodules leave, bool (D, H, W).

    Only holes up to MAX_HOLE_MM2 are filled: where the lung base rings the diaphragm dome a slice shows a far
    larger hole, which is liver or spleen. (A dome's top slice or two still pass as small holes: a few ml.)
    """
    holes = ndimage.binary_fill_holes(air, _SLICE_2D) & ~air
    if not holes.any():
        return air
    flat, n = ndimage.label(holes, _SLICE_2D)
    small = np.bincount(flat.ravel(), minlength=n + 1) * (spacing[0] * spacing[1]) <= MAX_HOLE_MM2
    small[0] = False
    return air | small[flat]


def lung_mask(hu: np.ndarray, spacing, valid: np.ndarray | None = None) -> np.ndarray:
    """Both lungs without trachea and main bronchi: bool (D, H, W), vessels and nodules inside included.

    hu: float (D, H, W) HU, canonical orientation. spacing: (x, y, z) mm. valid: False where the scanner measured
    nothing; those voxels are never lung. Raises QCTError when no lung is found.
    """
    return _lung_mask(hu, spacing, valid)[0]


def _lung_mask(hu: np.ndarray, spacing, valid: np.ndarray | None) -> tuple[np.ndarray, list[str]]:
    """The lung mask and notes on what went wrong on the way (no trachea, one lung)."""
    if hu.ndim != 3:
        raise QCTError(f"expected a 3D (D, H, W) volume, got shape {hu.shape}")
    spacing = tuple(float(s) for s in spacing)
    if valid is not None and valid.shape != hu.shape:
        raise QCTError(f"valid mask shape {valid.shape} != volume shape {hu.shape}")
    cand, body = _body_air(hu, valid)
    if not cand.any():
        raise QCTError("no lung found: no air inside the body below -400 HU")
    crop = _bbox(cand, pad=1)  # everything after this happens inside the body's air, a fraction of the volume
    midline = _midline(body)[crop[0]] - crop[2].start
    cand, hu_c = cand[crop], hu[crop]
    notes = []
    seed = _find_trachea(cand, hu_c, midline, spacing)
    airway = _grow_airway(hu_c, cand, seed, spacing) if seed is not None else np.zeros(cand.shape, bool)
    if not airway.any():
        notes.append("no trachea found: airways are left in the lung mask")
    wall = np.zeros(cand.shape, bool)
    if airway.any():
        sl = _bbox(airway, pad=int(np.ceil(_voxels(AIRWAY_WALL_MM, spacing).max())) + 1)
        wall[sl] = ndimage.binary_dilation(airway[sl], _ball(_voxels(AIRWAY_WALL_MM, spacing)))
    # vessels are filled before the components are counted: a vessel can cut a piece of lung off in 3D
    lungs, n_lungs = _select_lungs(_fill_vessels(cand & ~wall, spacing), float(np.nanmean(midline)), spacing)
    if n_lungs == 1:
        notes.append("one lung found")
    lungs &= ~wall
    out = np.zeros(hu.shape, bool)
    out[crop] = lungs
    if valid is not None:
        out &= valid
    return out, notes


def measure(
    hu: np.ndarray,
    spacing,
    valid: np.ndarray | None = None,
    kernel: str | None = None,
    slice_thickness_mm: float | None = None,
) -> dict:
    """Lung volume (ml), %LAA-950 (percent of lung voxels below -950 HU) and the 15th HU percentile of the lungs.

    Also ``warning``: empty when fine, else the reasons the numbers are biased or doubtful ("; "-joined): a sharp
    kernel, slices thicker than 2.5 mm (``slice_thickness_mm``, else the z spacing), a lung volume outside
    1-10 L, a missing trachea. Raises QCTError when no lung is found.
    """
    spacing = tuple(float(s) for s in spacing)
    mask, notes = _lung_mask(hu, spacing, valid)
    values = hu[mask]
    volume_ml = values.size * float(np.prod(spacing)) / 1000
    warnings = []
    if is_sharp_kernel(kernel):
        warnings.append(f"sharp kernel {kernel} raises %LAA-950")
    thickness = slice_thickness_mm if slice_thickness_mm is not None else spacing[2]
    if thickness > THICK_SLICE_MM:
        warnings.append(f"{thickness:g} mm slices bias %LAA-950 (partial volume)")
    if not PLAUSIBLE_LUNG_ML[0] <= volume_ml <= PLAUSIBLE_LUNG_ML[1]:
        warnings.append(f"implausible lung volume {volume_ml:.0f} ml: check the mask")
    warnings += notes
    return {
        "lung_volume_ml": float(volume_ml),
        "laa950_pct": float(np.mean(values < LAA_THRESHOLD_HU) * 100),
        "perc15_hu": float(np.percentile(values, 15)),
        "warning": "; ".join(warnings),
    }


def measure_volume(volume: Volume) -> dict:
    """:func:`measure` on a :class:`~hagan_clinic.io.volume.Volume`, with its kernel and slice thickness from meta."""
    meta = volume.meta
    return measure(volume.hu, volume.spacing, volume.valid, meta.get("kernel"), meta.get("slice_thickness_mm"))
