"""The project's one NIfTI reader and one NIfTI writer.

Array convention (the same for every volume in the project, see :mod:`hagan_clinic.io.volume`): a volume is a
(D, H, W) = (z, y, x) array in DICOM patient coordinates (LPS): W runs from the patient's right to left, H from
anterior to posterior, D from inferior to superior. NIfTI stores (i, j, k) in RAS world coordinates, so the writer
transposes (D, H, W) -> (i, j, k) = (W, H, D) and stores the affine that says so: its columns point to L, P and S
(``nibabel.aff2axcodes`` gives ``('L', 'P', 'S')``), scaled by the voxel spacing, with the origin of voxel
(0, 0, 0); sform and qform are both set. The reader brings any stored orientation back to that convention, so a
file written here reads back as the same array, and a file from any other tool reads as its anatomy dictates.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.openers import ImageOpener
from nibabel.spatialimages import SpatialImage

from ..errors import one_line
from .files import atomic_target
from .volume import SeriesError, Volume, xyz

OUTSIDE_FOV_HU = -1500.0  # CT values below this are padding (-2048, -3024), not air
XFORM_CODES = {"scanner": 1, "aligned": 2}  # NIfTI xform codes: scanner-based, or aligned to another scan
LPS_AXCODES = ("L", "P", "S")
# Plausibility bounds for files read as scans. CT spans -1024 to about 30000 HU even with metal, so a magnitude
# over 1e6 is a damaged or foreign file; other modalities store arbitrary units, bounded only where float32
# sums over a volume would overflow.
MAX_ABS_VALUE = {"CT": 1e6}
MAX_ABS_VALUE_OTHER = 1e12
#: The top of the standard 12-bit HU range: bone and contrast lie below it; only metal lies above.
CT_MAX_TISSUE_HU = 3071
#: The 5th percentile of any CT's voxels lies below this (air around the body, fat, water, lung).
CT_MIN_P5_HU = 500
MAX_VOXELS = 2**31  # a whole-body CT is 8e8 voxels; a larger shape is a damaged header, not read into memory
MIN_VOXEL_MM, MAX_VOXEL_MM = 1e-3, 1e3  # micro-CT reaches micrometres; no scan has metre-sized voxels


def to_model_range(values: np.ndarray, window: Sequence[float]) -> np.ndarray:
    """Scanner units (HU for CT) -> [-1, 1], clipping to the window. float32."""
    lo, hi = float(window[0]), float(window[1])
    out = (np.clip(values.astype(np.float32), lo, hi) - lo) / (hi - lo)
    return out * 2.0 - 1.0


def from_model_range(values: np.ndarray, window: Sequence[float]) -> np.ndarray:
    """[-1, 1] -> scanner units (HU for CT). float32."""
    lo, hi = float(window[0]), float(window[1])
    return ((np.clip(values.astype(np.float32), -1.0, 1.0) + 1.0) / 2.0) * (hi - lo) + lo


def centred_origin(shape_dhw: Sequence[int], spacing_xyz: Sequence[float]) -> tuple[float, float, float]:
    """LPS origin (mm) of voxel (0, 0, 0) that puts the centre of a (D, H, W) grid at (0, 0, 0): for volumes
    without a scanner position (generated ones)."""
    d, h, w = shape_dhw
    return xyz(-(n - 1) / 2.0 * float(s) for n, s in zip((w, h, d), spacing_xyz))


def write_scan(
    path: str | Path,
    volume: Volume,
    dtype: np.dtype | type | None = None,
    description: str = "",
    xform: str = "scanner",
) -> Path:
    """Write a canonical Volume as NIfTI (gzip when the name ends in .gz), atomically (temp file + rename).

    ``dtype``: stored type (default: the array's); integer types are rounded and clipped to their range.
    ``xform``: 'scanner' when the origin comes from a scan's own coordinates, 'aligned' otherwise (generated
    volumes, centred on the origin). ``description`` goes into the header (at most 79 bytes, ASCII).
    """
    path = Path(path)
    dtype = _storable(np.dtype(dtype or volume.hu.dtype))
    data = np.ascontiguousarray(np.transpose(volume.hu, (2, 1, 0)))
    if np.issubdtype(dtype, np.integer):  # round, and clip rather than wrap around (40000 in int16 is 32767)
        info = np.iinfo(dtype)
        data = np.clip(np.rint(data) if np.issubdtype(data.dtype, np.floating) else data, info.min, info.max)
    affine = volume.affine_ras()
    img = nib.Nifti1Image(data.astype(dtype), affine)
    code = XFORM_CODES[xform]
    img.set_sform(affine, code=code)
    img.set_qform(affine, code=code)
    img.header.set_xyzt_units("mm")
    if description:
        img.header["descrip"] = description.encode("ascii", "replace")[:79]
    suffix = ".nii.gz" if path.name.endswith(".gz") else ".nii"
    with atomic_target(path, suffix) as tmp:
        nib.save(img, tmp)
    return path


def _storable(dtype: np.dtype) -> np.dtype:
    """A NIfTI-1 data type for ``dtype``: bool as uint8, float16 as float32, 64-bit integers as 32-bit (clipped)."""
    if dtype == np.bool_:
        return np.dtype(np.uint8)
    if dtype == np.float16:
        return np.dtype(np.float32)
    if dtype in (np.int64, np.uint64):
        return np.dtype(np.int32)
    return dtype


def write_array(
    path: str | Path,
    array_dhw: np.ndarray,
    spacing_xyz: Sequence[float],
    origin_lps: Sequence[float] | None = None,
    dtype: np.dtype | type | None = None,
    description: str = "",
) -> Path:
    """Write a (D, H, W) array in the convention above; without ``origin_lps`` the grid is centred on (0, 0, 0)
    and the file says 'aligned' rather than 'scanner'."""
    origin = centred_origin(array_dhw.shape, spacing_xyz) if origin_lps is None else origin_lps
    volume = Volume(hu=array_dhw, spacing=xyz(spacing_xyz, "spacing"), origin=xyz(origin, "origin"))
    return write_scan(path, volume, dtype, description, "aligned" if origin_lps is None else "scanner")


def _canonical(img) -> tuple[np.ndarray, np.ndarray]:
    """(ornt transform to LPS, affine of the reoriented array) for a 3D image."""
    ornt = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(img.affine), nib.orientations.axcodes2ornt(LPS_AXCODES)
    )
    return ornt, img.affine @ nib.orientations.inv_ornt_aff(ornt, img.shape)


def _load(path: str | Path) -> SpatialImage:
    """The image, header read and pixels not yet. nibabel types its loader as returning any file-based image; every
    format it opens as a scan (NIfTI-1 and -2, Analyze, MGH) is a spatial image, and anything else is refused."""
    img = nib.load(str(path))
    if not isinstance(img, SpatialImage):
        raise SeriesError(f"not a volume image ({type(img).__name__})")
    return img


def header_shape(path: str | Path) -> tuple[int, ...]:
    """The stored shape of a NIfTI file, from its header alone (SeriesError when it cannot be read)."""
    _probe(path)
    try:
        return tuple(int(n) for n in _load(path).shape)
    except SeriesError:
        raise
    except Exception as err:  # nibabel raises many types for damaged files
        raise _unreadable(err, path) from None


def _open(path: str | Path):
    """(image, ornt transform to LPS, affine of the reoriented array) of a 3D NIfTI file, header only; SeriesError
    with the reason for a damaged, non-3D, implausible or mirrored (version 0.1) file."""
    _probe(path)
    try:
        img = nib.squeeze_image(_load(path))
        if len(img.shape) != 3:
            raise SeriesError(f"not a 3D volume (shape {img.shape})")
        if int(np.prod(img.shape, dtype=np.float64)) > MAX_VOXELS:
            raise SeriesError(f"shape {img.shape} is over {MAX_VOXELS} voxels (damaged header)")
        _refuse_bad_affine(img)
        _refuse_mirrored(img)
        return (img, *_canonical(img))
    except SeriesError:
        raise
    except Exception as err:  # nibabel raises many types for damaged files
        raise _unreadable(err, path) from None


def _stored_header(path: str | Path):
    """The header as stored, or None when it cannot be read (nibabel's own load then says why). nibabel's load
    silently reads a pixdim of 0 as 1 mm and a negative one as its magnitude, or fails on NaN in its affine."""
    try:
        with ImageOpener(str(path)) as f:
            size = f.read(4)
            f.seek(0)
            nifti2 = size in (b"\x1c\x02\x00\x00", b"\x00\x00\x02\x1c")  # sizeof_hdr 540, either byte order
            return (nib.Nifti2Header if nifti2 else nib.Nifti1Header).from_fileobj(f, check=False)
    except Exception:  # a damaged or truncated file: reported by the load that follows
        return None


def _refuse_bad_pixdim(path: str | Path) -> None:
    """The stored voxel size (pixdim of the axes longer than 1) must be finite and positive."""
    raw = _stored_header(path)
    if raw is None:
        return
    dims = [int(n) for n in raw["dim"][1 : 1 + min(max(int(raw["dim"][0]), 0), 7)]]
    axes = [i for i, n in enumerate(dims) if n > 1][:3]  # the three axes the squeezed volume keeps
    pixdim = tuple(float(raw["pixdim"][1 + i]) for i in axes)
    if not all(np.isfinite(v) and v > 0 for v in pixdim):
        shown = ", ".join(f"{v:g}" for v in pixdim)
        raise SeriesError(f"pixdim ({shown}) is not a finite positive voxel size in mm: fix the file's header")


def _refuse_bad_affine(img) -> None:
    """The voxel size the image is read with (its affine's column lengths) must be finite, positive and plausible."""
    sizes = np.linalg.norm(img.affine[:3, :3], axis=0)
    if not np.all(np.isfinite(img.affine)):
        raise SeriesError("the affine (sform/qform) holds values that are not finite: fix the header")
    if not (np.all(sizes >= MIN_VOXEL_MM) and np.all(sizes <= MAX_VOXEL_MM)):
        shown = ", ".join(f"{s:g}" for s in sizes)
        raise SeriesError(f"the affine (sform/qform) gives voxel sizes ({shown}) mm, not plausible: fix the header")


def _probe(path: str | Path) -> None:
    """SeriesError for a path that is not a readable regular file (nibabel reports a permission problem as a file
    it cannot read, and would block on a FIFO), or whose stored pixdim is not a voxel size."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise SeriesError("not a regular file (not read)")
        with open(path, "rb"):
            pass
    except OSError as err:
        raise _unreadable(err, path) from None
    _refuse_bad_pixdim(path)


def _unreadable(err: BaseException, path: str | Path) -> SeriesError:
    if isinstance(err, PermissionError):
        return SeriesError("file cannot be read (permission denied)")
    return SeriesError(f"unreadable NIfTI file ({_reason(err, path)})")


def read_shape(path: str | Path) -> tuple[int, int, int]:
    """(D, H, W) of a NIfTI file in the canonical orientation, from its header alone."""
    img, ornt, _ = _open(path)
    x, y, z = (img.shape[int(a)] for a in np.argsort(ornt[:, 0]))
    return (z, y, x)


def _reason(err: BaseException, path: str | Path) -> str:
    """The exception's type and plain cause, one line, without the file's path (nibabel's messages carry it)."""
    text = str(err)
    for quoted in (f"'{path}'", f'"{path}"', str(path)):
        text = text.replace(quoted, "the file")
    text = one_line(text, 100)
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _refuse_mirrored(img) -> None:
    """Files written by hagan-clinic 0.1 stored the (D, H, W) array under a positive diagonal affine that nibabel
    reads as RAS: the patient's left-right and front-back were mirrored. They are recognised (our description,
    sform 'aligned', no qform) and refused rather than read mirrored."""
    header = img.header
    descrip = bytes(header["descrip"].item()).split(b"\0")[0]
    if descrip.startswith(b"hagan-clinic") and int(header["qform_code"]) == 0:
        raise SeriesError(
            "written by an earlier hagan-clinic whose affine mirrored left-right and front-back: generate it again"
        )


def refuse_implausible_values(data: np.ndarray, modality: str) -> None:
    """SeriesError for a volume that is not a measurement: no or mostly non-finite voxels, finite values beyond any
    scanner's range (3e38 is a float's limit, not an intensity), or a CT whose voxels are mostly above the densest
    tissue (a rescale that does not give HU). Used for NIfTI and DICOM alike."""
    limit = MAX_ABS_VALUE.get(modality, MAX_ABS_VALUE_OTHER)
    if data.dtype.kind == "f":
        finite = np.isfinite(data)
        count = int(finite.sum())
        if count == 0:
            raise SeriesError("no finite voxels (all NaN or inf)")
        if count * 2 < data.size:
            raise SeriesError(f"mostly non-finite voxels ({data.size - count} of {data.size} are NaN or inf)")
        values = data[finite] if count < data.size else data
        peak = max(abs(float(values.min())), abs(float(values.max())))
    else:  # integers are finite; int16 (nearly all CT) cannot exceed any limit
        peak = 0.0 if data.dtype.itemsize <= 2 else max(abs(float(data.min())), abs(float(data.max())))
    if peak > limit:
        raise SeriesError(f"voxel value of magnitude {peak:.3g} is beyond any scanner's range ({limit:g}, {modality})")
    if modality == "CT":
        sample = data[(slice(None, None, 4),) * data.ndim]  # a majority is one on every 4th voxel per axis too
        dense = float(np.mean(sample > CT_MAX_TISSUE_HU))
        if dense > 0.5:
            raise SeriesError(
                f"{dense:.0%} of the voxels lie above {CT_MAX_TISSUE_HU} HU (denser than bone): not HU; check "
                "RescaleSlope/RescaleIntercept"
            )
        low = float(np.percentile(sample, 5))
        if low > CT_MIN_P5_HU:  # a scan holds air, fat or water; 95% of it denser than bone is a wrong rescale
            raise SeriesError(
                f"95% of the voxels lie above {low:.0f} HU (no air, fat or water at all): not HU; check "
                "RescaleSlope/RescaleIntercept"
            )


def read_scan(path: str | Path, modality: str = "CT") -> Volume:
    """A NIfTI file in scanner units (HU for CT) as a canonical Volume, whatever its stored orientation.

    The affine's rotation is rounded to the nearest patient axes (nibabel's io_orientation); an oblique affine is
    read on that nearest grid and noted. CT values below -1500 HU and non-finite values (NaN, inf) are marked
    invalid (no measurement), and the latter are noted; a file that is mostly non-finite, or holds values beyond
    any scanner's range (MAX_ABS_VALUE), is refused (SeriesError).
    """
    path = Path(path)
    img, ornt, affine = _open(path)
    stored = img.get_data_dtype()
    if stored.kind not in "iuf" or (stored.fields is not None):  # complex or RGB: not one scanner intensity per voxel
        raise SeriesError(f"voxels stored as {stored} (complex or colour), not scanner intensities")
    try:
        data = nib.orientations.apply_orientation(np.asarray(img.dataobj, dtype=np.float32), ornt)
    except Exception as err:  # nibabel raises many types for damaged files
        raise _unreadable(err, path) from None
    refuse_implausible_values(data, modality)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # RAS -> LPS
    spacing = xyz(np.linalg.norm(lps[:3, :3], axis=0), "spacing")
    notes = ""
    if not np.allclose(np.abs(lps[:3, :3]), np.diag(spacing), atol=1e-3 * max(spacing)):
        notes = "oblique affine (read as the nearest axial grid)"
    hu = np.ascontiguousarray(np.transpose(data, (2, 1, 0)))
    valid = None
    finite = np.isfinite(hu)
    if modality == "CT" and (~finite | (hu < OUTSIDE_FOV_HU)).any():
        valid = finite & (hu >= OUTSIDE_FOV_HU)
        hu[~valid] = -1024.0
    elif not finite.all():
        valid = finite
        hu[~valid] = 0.0
    if not finite.all():  # NaN or inf is no measurement: never air, tissue or lung
        notes = "; ".join(n for n in (notes, f"{int((~finite).sum())} non-finite voxels read as no measurement") if n)
    name = path.name.removesuffix(".gz").removesuffix(".nii")
    return Volume(
        hu=hu,
        spacing=spacing,
        origin=xyz(lps[:3, 3], "origin"),
        valid=valid,
        meta={"patient_id": name, "modality": modality, "source": path.name, "notes": notes},
    )
