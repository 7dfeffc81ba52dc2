"""The in-memory volume every reader returns: HU on a canonical grid, its geometry and its provenance.

Canonical orientation (all readers reorient to it): the array is (D, H, W) = (z, y, x) in DICOM patient
coordinates (LPS): W runs from the patient's right to left, H from anterior to posterior, D from inferior to
superior. An axial slice ``hu[k]`` therefore shows the patient as a radiologist reads it (anterior at the top,
patient's right on the left of the image).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import HaganError

# Metadata keys a Volume may carry. Nothing else from a header is ever copied: no names, birth dates, addresses.
META_KEYS = (
    "patient_id",
    "study_uid",
    "series_uid",
    "modality",
    "kernel",
    "slice_thickness_mm",
    "manufacturer",
    "model",
    "source",
    "notes",
)


class SeriesError(HaganError):
    """A series (or volume file) that cannot be turned into a volume; the message is the reason, for a report."""


def xyz(values: Iterable[float], what: str = "a position") -> tuple[float, float, float]:
    """Three numbers (x, y, z) as floats; ValueError naming ``what`` for any other count."""
    numbers = tuple(float(v) for v in values)
    if len(numbers) != 3:
        raise ValueError(f"{what} must hold 3 values (x, y, z), got {len(numbers)}")
    x, y, z = numbers
    return x, y, z


@dataclass
class Volume:
    """A scan in scanner units on the canonical grid.

    hu: (D, H, W) HU for CT (raw intensities for MR); float32, or int16 where that is exact (DICOM CT stored as
        integers with slope 1). Use ``hu.astype(np.float32)`` before arithmetic that could overflow.
    spacing: (x, y, z) voxel size in mm, i.e. (W, H, D).
    origin: LPS position in mm of the centre of voxel (0, 0, 0).
    valid: bool (D, H, W) or None; False where the scanner recorded no measurement (outside its circular field of
        view, padding): those voxels hold -1024 in ``hu`` for display but are neither air nor tissue to a measure.
    meta: provenance, only the keys in META_KEYS.
    """

    hu: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    valid: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.hu.ndim != 3:
            raise ValueError(f"Volume.hu must be 3D (D, H, W), got shape {self.hu.shape}")
        if self.valid is not None and self.valid.shape != self.hu.shape:
            raise ValueError(f"Volume.valid shape {self.valid.shape} != hu shape {self.hu.shape}")
        unknown = set(self.meta) - set(META_KEYS)
        if unknown:
            raise ValueError(f"Volume.meta: keys not allowed: {sorted(unknown)}")
        self.spacing = xyz(self.spacing, "Volume.spacing")
        self.origin = xyz(self.origin, "Volume.origin")

    @property
    def shape(self) -> tuple[int, int, int]:
        d, h, w = self.hu.shape
        return d, h, w

    def affine_lps(self) -> np.ndarray:
        """4x4 mapping (x, y, z) = (W, H, D) voxel indices to LPS mm."""
        a = np.diag([*self.spacing, 1.0])
        a[:3, 3] = self.origin
        return a

    def affine_ras(self) -> np.ndarray:
        """The same mapping in RAS (what NIfTI stores)."""
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ self.affine_lps()
