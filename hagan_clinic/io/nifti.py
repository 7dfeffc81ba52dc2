"""NIfTI reading and writing for model-space volumes.

Array convention: the model's tensors are (D, H, W) with D the axial (slice) axis, i.e. (z, y, x). NIfTI stores
(i, j, k) = (x, y, z), so volumes are transposed on the way out and back in, and the affine carries the voxel
spacing (x, y, z) in mm of the data contract: a generated volume keeps its physical size.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from .files import atomic_target
from .volume import SeriesError, Volume

OUTSIDE_FOV_HU = -1500.0  # CT values below this are padding (-2048, -3024), not air


def to_model_range(values: np.ndarray, window: Sequence[float]) -> np.ndarray:
    """Scanner units (HU for CT) -> [-1, 1], clipping to the window. float32."""
    lo, hi = float(window[0]), float(window[1])
    out = (np.clip(values.astype(np.float32), lo, hi) - lo) / (hi - lo)
    return out * 2.0 - 1.0


def from_model_range(values: np.ndarray, window: Sequence[float]) -> np.ndarray:
    """[-1, 1] -> scanner units (HU for CT). float32."""
    lo, hi = float(window[0]), float(window[1])
    return ((np.clip(values.astype(np.float32), -1.0, 1.0) + 1.0) / 2.0) * (hi - lo) + lo


def spacing_affine(spacing_xyz: Sequence[float]) -> np.ndarray:
    return np.diag([float(spacing_xyz[0]), float(spacing_xyz[1]), float(spacing_xyz[2]), 1.0])


def write_volume(
    path: str | Path,
    volume_dhw: np.ndarray,
    spacing_xyz: Sequence[float],
    dtype: np.dtype | type = np.float32,
    description: str = "",
) -> Path:
    """Write a (D, H, W) volume as NIfTI with the spacing in its affine, atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.ascontiguousarray(np.transpose(volume_dhw, (2, 1, 0)))
    if np.issubdtype(np.dtype(dtype), np.integer):
        info = np.iinfo(dtype)
        data = np.clip(np.rint(data), info.min, info.max)
    img = nib.Nifti1Image(data.astype(dtype), spacing_affine(spacing_xyz))
    img.header.set_xyzt_units("mm")
    if description:
        img.header["descrip"] = description.encode()[:79]
    suffix = "".join(path.suffixes) or ".nii.gz"
    with atomic_target(path, suffix) as tmp:
        nib.save(img, tmp)
    return path


def read_volume(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(volume (D, H, W) float32, affine 4x4) of a NIfTI file written in the convention above."""
    img = nib.load(str(path))
    data = np.asarray(img.dataobj, dtype=np.float32)
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3D volume, got shape {data.shape}")
    return np.ascontiguousarray(np.transpose(data, (2, 1, 0))), img.affine


def read_scan(path: str | Path, modality: str = "CT") -> Volume:
    """A NIfTI scan in scanner units (HU for CT) as a canonical Volume, whatever its stored orientation.

    The affine's rotation is rounded to the nearest patient axes (nibabel's io_orientation); an oblique affine is
    read on that nearest grid and noted.
    """
    path = Path(path)
    try:
        img = nib.load(str(path))
        img = nib.squeeze_image(img)
        if len(img.shape) != 3:
            raise SeriesError(f"not a 3D volume (shape {img.shape})")
        # canonical (x, y, z) = LPS; nibabel's axis codes name the direction each axis increases towards
        ornt = nib.orientations.ornt_transform(
            nib.orientations.io_orientation(img.affine), nib.orientations.axcodes2ornt(("L", "P", "S"))
        )
        data = nib.orientations.apply_orientation(np.asarray(img.dataobj, dtype=np.float32), ornt)
        affine = img.affine @ nib.orientations.inv_ornt_aff(ornt, img.shape)
    except SeriesError:
        raise
    except Exception as err:  # nibabel raises many types for damaged files
        raise SeriesError(f"unreadable NIfTI file ({' '.join(str(err).split())[:100]})") from None
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # RAS -> LPS
    spacing = tuple(float(s) for s in np.linalg.norm(lps[:3, :3], axis=0))
    notes = ""
    if not np.allclose(np.abs(lps[:3, :3]), np.diag(spacing), atol=1e-3 * max(spacing)):
        notes = "oblique affine (read as the nearest axial grid)"
    hu = np.ascontiguousarray(np.transpose(data, (2, 1, 0)))
    valid = None
    if modality == "CT" and (hu < OUTSIDE_FOV_HU).any():
        valid = hu >= OUTSIDE_FOV_HU
        hu[~valid] = -1024.0
    name = path.name.removesuffix(".gz").removesuffix(".nii")
    return Volume(
        hu=hu,
        spacing=spacing,
        origin=tuple(lps[:3, 3]),
        valid=valid,
        meta={"patient_id": name, "modality": modality, "source": path.name, "notes": notes},
    )
