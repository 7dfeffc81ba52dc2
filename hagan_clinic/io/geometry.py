"""Slice geometry from headers alone: ordering, spacing, gaps, duplicates, tilt, and the canonical reorientation.

Slices are ordered by their position projected on the slice normal (row cosine x column cosine), never by
InstanceNumber or file name, which scanners and anonymisers scramble. The checks here run on header values only, so
discovery can report a broken series without decoding a pixel.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .volume import SeriesError

# Tolerances. Positions are stored as decimal strings, often rounded to 0.01 mm or worse.
DUPLICATE_MM = 0.01
SPACING_RTOL = 0.02
SPACING_ATOL_MM = 0.05
TILT_DEG = 0.5
ORIENTATION_ATOL = 1e-3


def normal_of(orientation: np.ndarray) -> np.ndarray:
    """Unit slice normal of an ImageOrientationPatient (row cosine, column cosine)."""
    n = np.cross(orientation[:3], orientation[3:])
    return n / np.linalg.norm(n)


def is_axial(orientation: np.ndarray) -> bool:
    """Axial or near-axial (a gantry tilt of up to 45 degrees still counts): the normal is mostly along z."""
    return abs(normal_of(np.asarray(orientation, dtype=float))[2]) > np.sqrt(0.5)


def orientation_key(orientation) -> tuple[float, ...]:
    return tuple(np.round(np.asarray(orientation, dtype=float), 3))


@dataclass
class StackGeometry:
    """The ordering and regularity of a stack of parallel slices.

    order: indices of the slices sorted along the normal (ascending), duplicates included.
    steps: distances in mm between consecutive sorted slices.
    spacing: the regular step in mm (the median step without duplicates).
    problems: reasons a person understands, empty when the stack is a regular volume.
    """

    order: np.ndarray
    positions: np.ndarray
    normal: np.ndarray
    steps: np.ndarray
    spacing: float
    duplicates: list[tuple[int, int]] = field(default_factory=list)
    gaps: list[tuple[int, float]] = field(default_factory=list)
    uneven: bool = False
    tilt_deg: float = 0.0

    @property
    def problems(self) -> list[str]:
        out = []
        if self.duplicates:
            out.append(f"duplicate positions ({len(self.duplicates)} slices share a position)")
        if self.gaps:
            missing = sum(max(1, round(step / self.spacing) - 1) for _, step in self.gaps)
            where = ", ".join(f"{step:.2f} mm after slice {i + 1}" for i, step in self.gaps[:3])
            out.append(f"missing slices (about {missing}; gap of {where}; expected {self.spacing:.2f} mm)")
        elif self.uneven:
            lo, hi = float(self.steps[self.steps > DUPLICATE_MM].min()), float(self.steps.max())
            out.append(f"non-uniform slice spacing ({lo:.2f} to {hi:.2f} mm)")
        if self.tilt_deg > TILT_DEG:
            out.append(f"gantry tilt ({self.tilt_deg:.1f} degrees)")
        return out


def stack_geometry(positions: np.ndarray, orientation: np.ndarray) -> StackGeometry:
    """Analyse slice positions (N, 3) LPS mm sharing one orientation (6,)."""
    positions = np.asarray(positions, dtype=float)
    normal = normal_of(np.asarray(orientation, dtype=float))
    dist = positions @ normal
    order = np.argsort(dist, kind="stable")
    steps = np.diff(dist[order])
    duplicates = [(int(order[i]), int(order[i + 1])) for i in np.flatnonzero(steps < DUPLICATE_MM)]
    real = steps[steps >= DUPLICATE_MM]
    if real.size == 0:
        raise SeriesError("all slices at one position (not a volume)")
    spacing = float(np.median(real))
    tol = max(SPACING_RTOL * spacing, SPACING_ATOL_MM)
    gaps = [(i, float(s)) for i, s in enumerate(steps) if s > 1.5 * spacing and s - spacing > tol]
    uneven = bool(np.any(np.abs(real - spacing) > tol))
    tilt = 0.0
    if len(positions) > 1:
        travel = positions[order[-1]] - positions[order[0]]
        length = np.linalg.norm(travel)
        if length > 0:
            tilt = float(np.degrees(np.arccos(np.clip(abs(travel @ normal) / length, -1.0, 1.0))))
    return StackGeometry(order, positions[order], normal, steps, spacing, duplicates, gaps, uneven, tilt)


def canonical_transform(orientation: np.ndarray, spacing_rc: tuple[float, float], normal_step: float):
    """How to bring an array (k, r, c) = (slice, row, column) into canonical (D, H, W) order.

    Returns (flip, transpose, spacing_xyz): flip the given array axes, then transpose with the given axes, to get
    (D, H, W) with W along +x (patient left), H along +y (posterior), D along +z (superior). ``spacing_rc`` is the
    PixelSpacing (between rows, between columns); ``normal_step`` the slice spacing.
    """
    row_cos, col_cos = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    normal = normal_of(np.asarray(orientation, float))
    # array axis (k, r, c) -> direction in LPS and its voxel size
    axes = [(normal, normal_step), (col_cos, spacing_rc[0]), (row_cos, spacing_rc[1])]
    world_of_axis = [int(np.argmax(np.abs(d))) for d, _ in axes]
    if sorted(world_of_axis) != [0, 1, 2]:
        raise SeriesError("oblique orientation that does not map onto the patient axes")
    flip = tuple(i for i, (d, _) in enumerate(axes) if d[world_of_axis[i]] < 0)
    # canonical (D, H, W) = world (z, y, x) = world axes (2, 1, 0)
    transpose = tuple(world_of_axis.index(w) for w in (2, 1, 0))
    size = {world_of_axis[i]: axes[i][1] for i in range(3)}
    return flip, transpose, (float(size[0]), float(size[1]), float(size[2]))


def obliquity_deg(orientation: np.ndarray) -> float:
    """Largest angle in degrees between the image axes and the nearest patient axis."""
    o = np.asarray(orientation, float)
    angles = []
    for d in (o[:3], o[3:], normal_of(o)):
        d = d / np.linalg.norm(d)
        angles.append(np.degrees(np.arccos(np.clip(np.max(np.abs(d)), -1.0, 1.0))))
    return float(max(angles))
