"""Quantitative CT of the lungs: a classic threshold lung mask and the emphysema indices measured inside it.

Input arrays follow the canonical orientation of :mod:`hagan_clinic.io.volume`: ``hu`` float (D, H, W) = (z, y, x)
in HU, ``spacing`` (x, y, z) in mm, ``valid`` bool (D, H, W) or None (False outside the scanner's field of view).
Every size is given in mm and converted with the spacing, so the same code serves 3 mm phantoms and 0.6 mm scans.

The mask pipeline: the body is the largest object above -500 HU once an in-plane opening has cut off thin shells
that touch the skin (a couch, a cushion's cover); its outer contour is its convex hull, slice by slice, which also
closes the contour where the field of view cuts the patient. Air below -400 HU is outside the body when most of
its 3D region lies outside that contour: the air around the patient and the foam core of a couch or a cushion,
whatever encloses it. The trachea is found as a round air blob near the midline in the top slices and grown down
the main bronchi at an adaptive strict threshold with a leak check, then removed with its wall; vessels and
nodules (per-slice holes up to 15 cm^2) are filled; the lungs are the largest one or two air regions that hold
parenchyma (not gas) and reach above the lowest point of the airway tree (above the diaphragm: not the stomach);
the airway and its wall are removed again at the end, since filling closes over them. Every mask, ours or a
user's, is then checked for what a pair of lungs cannot be (one lung, cut by the field of view, outside the
body's contour, outside 1-10 L) and each finding is a warning.

Public API: ``lung_mask``, ``measure``, ``measure_with_mask``, ``measure_volume``, ``is_sharp_kernel`` (from kernels),
``QCTError``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from .errors import HaganError
from .io.volume import Volume
from .kernels import is_sharp_kernel

LUNG_THRESHOLD_HU = -400.0
BODY_THRESHOLD_HU = -500.0
BODY_OPENING_MM = 3.0  # in-plane opening radius: detaches shells up to ~6 mm thick (couch, covers) from the skin
GAS_MEDIAN_HU = -975.0  # without a visible airway: an air region this dark and without vessels is gas, not lung
GAS_MAX_VESSEL_FRACTION = 0.01  # lungs hold vessels (a few % of their volume even in severe emphysema); gas none
END_SLICE_FRACTION = 0.01  # more lung than this in an end slice: the scan cut the apex or base (a tip is less)
SLAB_MAX_MM = 70.0  # an air region at most this thick (front to back) and 3x as wide is a couch, cushion or blanket
# (a lung is 100-250 mm deep front to back in its middle slices, and at most about as wide as it is deep)
MIN_LUNG_ML = 50.0
OUTSIDE_BODY_FRACTION = 0.01  # more of a mask than this outside the body's outer contour is reported
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


def _body(hu: np.ndarray, valid: np.ndarray | None, spacing) -> np.ndarray:
    """The patient, bool (D, H, W): the largest 3D object above -500 HU after an in-plane opening.

    The opening (a square BODY_OPENING_MM in radius, separable so cheap at any size) cuts thin dense shells off the
    skin: a couch's carbon shell or a cushion's cover that the patient lies on is a separate object afterwards.
    """
    dense = hu > BODY_THRESHOLD_HU
    if valid is not None:
        dense &= valid
    size = [1] + [max(3, 2 * int(round(BODY_OPENING_MM / s)) + 1) for s in (spacing[1], spacing[0])]
    opened = ndimage.maximum_filter(ndimage.minimum_filter(dense.view(np.uint8), size=size), size=size) > 0
    labels, n = ndimage.label(opened)
    if n == 0:
        return opened
    body = labels == int(np.argmax(np.bincount(labels.ravel())[1:])) + 1
    # give back the thin parts of the patient the opening took (chest wall cut by the field of view), and no more
    # than that of a shell touching the skin: a few voxels, never the far side of a couch
    square = np.zeros((3, 3, 3), bool)
    square[1] = True
    return ndimage.binary_dilation(body, square, iterations=max(size) // 2 + 1, mask=dense)


def _hull_rows(ys: np.ndarray, x0: np.ndarray, x1: np.ndarray, width: int) -> np.ndarray:
    """The convex hull of one slice's body given each row's first and last body column, bool (rows, width)."""
    corners = [(ys + dy, xs + dx) for dy in (-0.5, 0.5) for xs, dx in ((x0, -0.5), (x1, 0.5))]
    pts = np.concatenate([np.stack(c, axis=1) for c in corners])
    rows = np.arange(ys[0], ys[-1] + 1, dtype=float)
    try:
        eq = ConvexHull(pts).equations  # a*y + b*x + c <= 0 inside, one row per facet
    except (QhullError, ValueError):  # all on one line: the bounding box is the hull
        return np.broadcast_to(
            (np.arange(width) >= x0.min()) & (np.arange(width) <= x1.max()), (rows.size, width)
        ).copy()
    a, b, c = eq.T
    rhs = -(a[None] * rows[:, None] + c[None]) + 1e-6
    with np.errstate(divide="ignore", invalid="ignore"):
        bound = rhs / b
    lo = np.where(b < -1e-9, bound, -np.inf).max(axis=1)
    hi = np.where(b > 1e-9, bound, np.inf).min(axis=1)
    flat_ok = np.all(np.where(np.abs(b) <= 1e-9, rhs >= 0, True), axis=1)
    cols = np.arange(width)
    return (cols >= lo[:, None]) & (cols <= hi[:, None]) & flat_ok[:, None]


def _outer_contour(body: np.ndarray) -> np.ndarray:
    """Per axial slice, the convex hull of ``body``, bool (D, H, W): its outer contour with every concavity closed,
    and closed along the cut where the field of view cuts the body. The couch or cushions it rests on lie outside.
    """
    out = np.zeros(body.shape, bool)
    rows_any = np.any(body, axis=2)
    width = body.shape[2]
    for k in np.nonzero(rows_any.any(axis=1))[0]:
        ys = np.nonzero(rows_any[k])[0]
        sl = body[k, ys]
        x0 = np.argmax(sl, axis=1)
        x1 = width - 1 - np.argmax(sl[:, ::-1], axis=1)
        out[k, ys[0] : ys[-1] + 1] = _hull_rows(ys, x0, x1, width)
    return out


def _body_air(hu: np.ndarray, valid: np.ndarray | None, spacing) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Air inside the body, the body, and its outer contour, all bool (D, H, W).

    Air is below -400 HU where the scanner measured. A 3D air region is outside the body when most of it lies
    outside the body's convex hull (the air around the patient, the gap to the couch, the foam of a couch or a
    cushion); a lung cut by the field of view stays inside, since only the sliver between the hull's chord and
    the edge lies beyond it. The outer contour is then the hull of the body and the air inside it, slice by slice.
    """
    air = hu < LUNG_THRESHOLD_HU
    if valid is not None:
        air &= valid
    body = _body(hu, valid, spacing)
    labels, n = ndimage.label(air)
    beyond = np.bincount(labels[air & ~_outer_contour(body)], minlength=n + 1)
    outside = 2 * beyond > np.bincount(labels.ravel(), minlength=n + 1)
    outside[0] = True
    inside = ~outside[labels]
    return inside, body, _outer_contour(body | inside)


def _midline(body: np.ndarray) -> np.ndarray:
    """Per axial slice, the x index (column) halfway across the body, float (D,), NaN where a slice has no body."""
    cols = np.any(body, axis=1)
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


def _select_lungs(cand: np.ndarray, hu: np.ndarray, mid_x: float, spacing, airway_bottom: int | None) -> np.ndarray:
    """The lungs among the air regions inside the body, bool (D, H, W).

    A region is not lung when it is a slab (at most SLAB_MAX_MM thick front to back and three times as wide: the
    foam of a couch, a cushion or a blanket that the body's contour took in). Where the airway tree was found, a
    lung reaches above its lowest point (lungs rise above the diaphragm, stomach and bowel gas do not); where it
    was not, a region without vessels whose median is below GAS_MEDIAN_HU is gas. (A median alone would drop a
    severely emphysematous lung, which still holds its vessels.) The lungs are the largest such region and, when
    it holds one lung only, the largest one on the other side of the body's midline that is at least a tenth its
    size and reaches the upper half of the first.
    """
    labels, n = ndimage.label(cand)
    if n == 0:
        raise QCTError("no lung found: no air inside the body below -400 HU")
    sizes = np.bincount(labels.ravel())[1:] * float(np.prod(spacing)) / 1000
    order = np.argsort(sizes)[::-1][:8] + 1
    if sizes[order[0] - 1] < MIN_LUNG_ML:
        raise QCTError(f"no lung found: the largest air region inside the body is {sizes[order[0] - 1]:.0f} ml")
    objects = ndimage.find_objects(labels)
    regions = []  # (label, ml, fraction on the patient's left, lowest slice, highest slice)
    for i in order[sizes[order - 1] >= MIN_LUNG_ML]:
        sl = objects[i - 1]
        inside = labels[sl] == i
        if _is_slab(inside, spacing):
            continue
        zs = np.nonzero(inside.any(axis=(1, 2)))[0] + sl[0].start
        if airway_bottom is not None and zs[-1] < airway_bottom:
            continue
        if airway_bottom is None and _is_gas(hu[sl][inside]):
            continue
        cols = inside.sum(axis=(0, 1))
        left = cols[np.arange(sl[2].start, sl[2].stop) > mid_x].sum() / cols.sum()
        regions.append((i, sizes[i - 1], left, zs[0], zs[-1]))
    if not regions:
        raise QCTError(
            "no lung found: the air inside the body is gas (stomach, bowel), foam (couch, cushion) or below the airways"
        )
    first, *others = regions
    lungs = labels == first[0]
    if 0.2 < first[2] < 0.8:  # both lungs in one region (joined in front of the heart)
        return lungs
    half = (first[3] + first[4]) / 2
    for i, ml, left, _, top in others:
        if ml >= 0.1 * first[1] and (left > 0.5) != (first[2] > 0.5) and top >= half:
            return lungs | (labels == i)
    return lungs


def _is_slab(region: np.ndarray, spacing) -> bool:
    """Whether a 3D region (bool, its bounding box) is wide and thin in its axial slices, as foam under or over a
    patient is, flat or curved: its front-to-back thickness, measured column by column (median over all columns of
    all its slices), is at most SLAB_MAX_MM, and its median width more than three times that."""
    per_column = region.sum(axis=1)  # (slices, W): voxels along H in each column
    thick = float(np.median(per_column[per_column > 0])) * spacing[1]
    cols = np.any(region, axis=1)
    cols = cols[np.any(cols, axis=1)]
    first = np.argmax(cols, axis=1)
    last = cols.shape[1] - 1 - np.argmax(cols[:, ::-1], axis=1)
    wide = float(np.median(last - first + 1)) * spacing[0]
    return thick <= SLAB_MAX_MM and wide > 3 * thick


def _is_gas(values: np.ndarray) -> bool:
    """Whether the HU of a (vessel-filled) air region look like gas: dark throughout and without vessels."""
    vessels = float(np.mean(values > LUNG_THRESHOLD_HU))
    return bool(np.median(values) < GAS_MEDIAN_HU and vessels < GAS_MAX_VESSEL_FRACTION)


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


def _check_input(hu: np.ndarray, valid: np.ndarray | None) -> None:
    if hu.ndim != 3:
        raise QCTError(f"expected a 3D (D, H, W) volume, got shape {hu.shape}")
    if valid is not None and valid.shape != hu.shape:
        raise QCTError(f"valid mask shape {valid.shape} != volume shape {hu.shape}")


def _lung_mask(
    hu: np.ndarray, spacing, valid: np.ndarray | None
) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
    """The lung mask, notes on what went wrong on the way (no trachea), the body and its outer contour."""
    _check_input(hu, valid)
    spacing = tuple(float(s) for s in spacing)
    cand, body, contour = _body_air(hu, valid, spacing)
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
    bottom = None
    if airway.any():
        sl = _bbox(airway, pad=int(np.ceil(_voxels(AIRWAY_WALL_MM, spacing).max())) + 1)
        wall[sl] = ndimage.binary_dilation(airway[sl], _ball(_voxels(AIRWAY_WALL_MM, spacing)))
        bottom = int(np.argmax(airway.any(axis=(1, 2))))
    # vessels are filled before the regions are counted: a vessel can cut a piece of lung off in 3D
    lungs = _select_lungs(_fill_vessels(cand & ~wall, spacing), hu_c, float(np.nanmean(midline)), spacing, bottom)
    lungs &= ~wall
    out = np.zeros(hu.shape, bool)
    out[crop] = lungs
    if valid is not None:
        out &= valid
    return out, notes, body, contour


def _findings(mask: np.ndarray, body: np.ndarray, contour: np.ndarray, valid: np.ndarray | None) -> list[str]:
    """What a lung mask cannot be, as warnings: all on one side of the body, cut by the edge of the field of view
    (the in-plane image border or the unmeasured region), or outside the body's outer contour."""
    found = []
    w = mask.shape[2]
    mid = _midline(body)
    mid = np.where(np.isnan(mid), (w - 1) / 2, mid)
    per_column = mask.sum(axis=1)  # (D, W)
    left = (per_column * (np.arange(w)[None] > mid[:, None])).sum() / max(per_column.sum(), 1)
    if min(left, 1 - left) < 0.1:
        found.append("one lung found: the mask lies on one side of the body")
    edge = bool(mask[:, 0].any() or mask[:, -1].any() or mask[:, :, 0].any() or mask[:, :, -1].any())
    if valid is not None and not edge:
        bad = ~valid
        edge = bool((mask & bad).any() or (mask[:, 1:] & bad[:, :-1]).any() or (mask[:, :-1] & bad[:, 1:]).any()
                    or (mask[:, :, 1:] & bad[:, :, :-1]).any() or (mask[:, :, :-1] & bad[:, :, 1:]).any()
                    or (mask[1:] & bad[:-1]).any() or (mask[:-1] & bad[1:]).any())  # fmt: skip
    if edge:
        found.append("lung touches the edge of the field of view: volume and %LAA-950 are partial")
    total = max(int(mask.sum()), 1)
    if max(int(mask[0].sum()), int(mask[-1].sum())) > END_SLICE_FRACTION * total:
        found.append("lung cut by the first or last slice: the scan does not cover the whole lung")
    outside = (mask & ~contour).sum() / max(mask.sum(), 1)
    if outside > OUTSIDE_BODY_FRACTION:
        found.append(f"{outside * 100:.0f} % of the mask lies outside the body's outer contour")
    return found


def measure_with_mask(
    hu: np.ndarray,
    spacing,
    valid: np.ndarray | None = None,
    kernel: str | None = None,
    slice_thickness_mm: float | None = None,
    mask: np.ndarray | None = None,
) -> tuple[dict, np.ndarray]:
    """:func:`measure` and the lung mask it measured, bool (D, H, W).

    mask: a lung mask of the volume's shape to measure instead of our own (non-zero is lung; unmeasured voxels are
    left out); it goes through the same checks as ours.
    """
    spacing = tuple(float(s) for s in spacing)
    if mask is None:
        mask, notes, body, contour = _lung_mask(hu, spacing, valid)
    else:
        _check_input(hu, valid)
        if mask.shape != hu.shape:
            raise QCTError(f"lung mask shape {mask.shape} != volume shape {hu.shape}")
        mask, notes, body = mask != 0, [], _body(hu, valid, spacing)
        contour = _outer_contour(body)
    findings = _findings(mask, body, contour, valid)
    if valid is not None:
        mask = mask & valid
    if not mask.any():
        raise QCTError("the lung mask is empty" + (" where the scanner measured" if valid is not None else ""))
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
    warnings += findings + notes
    values_dict = {
        "lung_volume_ml": float(volume_ml),
        "laa950_pct": float(np.mean(values < LAA_THRESHOLD_HU) * 100),
        "perc15_hu": float(np.percentile(values, 15)),
        "warning": "; ".join(warnings),
    }
    return values_dict, mask


def measure(
    hu: np.ndarray,
    spacing,
    valid: np.ndarray | None = None,
    kernel: str | None = None,
    slice_thickness_mm: float | None = None,
    mask: np.ndarray | None = None,
) -> dict:
    """Lung volume (ml), %LAA-950 (percent of lung voxels below -950 HU) and the 15th HU percentile of the lungs.

    Also ``warning``: empty when fine, else the reasons the numbers are biased or doubtful ("; "-joined): a sharp
    kernel, slices thicker than 2.5 mm (``slice_thickness_mm``, else the z spacing), a lung volume outside 1-10 L,
    a mask on one side of the body only, cut by the edge of the field of view or outside the body's outer contour,
    a missing trachea. ``mask``: measure this lung mask (bool (D, H, W)) instead of our own. Raises QCTError when
    no lung is found.
    """
    return measure_with_mask(hu, spacing, valid, kernel, slice_thickness_mm, mask)[0]


def measure_volume(volume: Volume, mask: np.ndarray | None = None) -> dict:
    """:func:`measure` on a :class:`~hagan_clinic.io.volume.Volume`, with its kernel and slice thickness from meta."""
    meta = volume.meta
    return measure(volume.hu, volume.spacing, volume.valid, meta.get("kernel"), meta.get("slice_thickness_mm"), mask)
