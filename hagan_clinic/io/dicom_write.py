"""Writing CT volumes as DICOM series: the phantom cohort and the test fixtures that exercise the reader.

The writer can reproduce what real scanners do to a reader: shuffled file names and instance numbers, reversed
slice order, signed or unsigned storage, a rescale that changes from slice to slice, pixel padding outside the
field of view, compressed transfer syntaxes, positions with gaps, duplicates or uneven steps, gantry tilt, and the
enhanced multi-frame form. Input volumes follow the canonical orientation of :mod:`hagan_clinic.io.volume`.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from .files import atomic_target

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"

TRANSFER_SYNTAXES = {
    "explicit": ExplicitVRLittleEndian,
    "implicit": ImplicitVRLittleEndian,
    "rle": RLELossless,
    "jpeg2000": JPEG2000Lossless,
    "jpegls": JPEGLSLossless,
}


def uid(*parts: object) -> str:
    """A deterministic UID from its parts (same parts, same UID)."""
    return generate_uid(entropy_srcs=[str(p) for p in parts])


def _stored(hu: np.ndarray, slope: float, intercept: float, dtype: np.dtype) -> np.ndarray:
    info = np.iinfo(dtype)
    return np.clip(np.rint((hu - intercept) / slope), info.min, info.max).astype(dtype)


def _save(ds: Dataset, path: Path, transfer_syntax: str) -> None:
    ts = TRANSFER_SYNTAXES[transfer_syntax]
    if ts.is_compressed:
        ds.compress(ts, generate_instance_uid=False)
    else:
        ds.file_meta.TransferSyntaxUID = ts
    with atomic_target(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True, implicit_vr=ts.is_implicit_VR, little_endian=True)


def _base_dataset(sop_class: str, sop_uid: str, study_uid: str, series_uid: str, info: dict) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = uid(study_uid, "frame")
    ds.PatientID = info["patient_id"]
    ds.PatientName = info.get("patient_name", "")
    ds.PatientBirthDate = info.get("birth_date", "")
    ds.PatientSex = info.get("sex", "O")
    ds.StudyDate = ds.SeriesDate = info.get("study_date", date(2026, 1, 1).strftime("%Y%m%d"))
    ds.StudyID = "1"
    ds.AccessionNumber = info.get("accession", "")
    ds.Modality = info.get("modality", "CT")
    ds.Manufacturer = info.get("manufacturer", "")
    ds.ManufacturerModelName = info.get("model", "")
    ds.InstitutionName = info.get("institution", "")
    ds.SeriesNumber = int(info.get("series_number", 1))
    ds.SeriesDescription = info.get("description", "")
    ds.BodyPartExamined = info.get("body_part", "CHEST")
    if info.get("kernel"):
        ds.ConvolutionKernel = info["kernel"]
    ds.KVP = info.get("kvp", 120)
    ds.PatientPosition = "FFS"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    return ds


def write_series(
    folder: str | Path,
    hu: np.ndarray,
    spacing: Sequence[float],
    *,
    patient_id: str,
    study_uid: str | None = None,
    series_uid: str | None = None,
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    slice_thickness: float | None = None,
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    storage: str = "int16",
    intercept: float = -1024.0,
    slope: float = 1.0,
    per_slice_rescale: bool = False,
    transfer_syntax: str = "explicit",
    valid: np.ndarray | None = None,
    padding_hu: float = -2000.0,
    positions_z: Sequence[float] | None = None,
    tilt_deg: float = 0.0,
    shuffle: bool = True,
    seed: int = 0,
    **info: object,
) -> list[Path]:
    """Write ``hu`` (D, H, W) float HU, spacing (x, y, z) mm, as one axial DICOM series in ``folder``.

    One file per slice. ``positions_z`` overrides the slice positions along z (mm, one per slice) to make gaps,
    duplicates or uneven steps. ``tilt_deg`` tilts the image plane about the x axis while positions still advance
    along z (a gantry-tilted acquisition). Voxels where ``valid`` is False are stored as the padding value
    (``padding_hu`` through the rescale, or 0 when that is not representable) and named by PixelPaddingValue.
    ``shuffle`` gives files random names and instance numbers unrelated to position. Extra keyword arguments
    (kernel, manufacturer, model, patient_name, birth_date, modality, description, series_number, ...) go to the
    header. Returns the paths written.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    depth, rows, cols = hu.shape
    dtype = np.dtype(storage)
    study_uid = study_uid or uid(patient_id, seed, "study")
    series_uid = series_uid or uid(study_uid, info.get("series_number", 1), "series")
    z = np.asarray(positions_z if positions_z is not None else np.arange(depth) * spacing[2], dtype=float)
    if len(z) != depth:
        raise ValueError(f"positions_z has {len(z)} values for {depth} slices")
    t = np.deg2rad(tilt_deg)
    orientation = [1.0, 0.0, 0.0, 0.0, float(np.cos(t)), float(np.sin(t))]
    rng = np.random.default_rng(seed)
    numbers = rng.permutation(depth) + 1 if shuffle else np.arange(depth) + 1
    info = {"patient_id": patient_id, **info}
    paths = []
    for k in range(depth):
        s, b = slope, intercept
        if per_slice_rescale:  # what some scanners do: a slope and intercept fitted to each slice's range
            s = slope * 0.5 ** (k % 3)  # finer steps keep integer HU exact
            b = intercept - 8.0 * k
        raw = _stored(hu[k], s, b, dtype)
        sop_uid = uid(series_uid, k)
        ds = _base_dataset(
            CT_IMAGE_STORAGE if info.get("modality", "CT") == "CT" else MR_IMAGE_STORAGE,
            sop_uid,
            study_uid,
            series_uid,
            info,
        )
        ds.ImageType = list(image_type)
        ds.InstanceNumber = int(numbers[k])
        ds.ImagePositionPatient = [float(origin[0]), float(origin[1]), float(origin[2] + z[k])]
        ds.ImageOrientationPatient = orientation
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # (row spacing, column spacing)
        ds.SliceThickness = float(slice_thickness if slice_thickness is not None else spacing[2])
        ds.SliceLocation = float(origin[2] + z[k])
        ds.Rows, ds.Columns = rows, cols
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1 if dtype.kind == "i" else 0
        ds.RescaleIntercept = float(b)
        ds.RescaleSlope = float(s)
        ds.RescaleType = "HU"
        if valid is not None:
            pad = np.rint((padding_hu - b) / s)
            info_t = np.iinfo(dtype)
            pad = int(pad) if info_t.min <= pad <= info_t.max else 0
            raw = np.where(valid[k], raw, np.asarray(pad, dtype=dtype)).astype(dtype)
            ds.PixelPaddingValue = pad
        ds.PixelData = raw.tobytes()
        name = f"{uid(sop_uid, 'name')[-12:]}.dcm" if shuffle else f"IM{k + 1:04d}.dcm"
        path = folder / name
        _save(ds, path, transfer_syntax)
        paths.append(path)
    return paths


def write_enhanced(
    path: str | Path,
    hu: np.ndarray,
    spacing: Sequence[float],
    *,
    patient_id: str,
    study_uid: str | None = None,
    series_uid: str | None = None,
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    reverse: bool = False,
    intercept: float = -1024.0,
    **info: object,
) -> Path:
    """Write ``hu`` (D, H, W) as one enhanced multi-frame CT file (frames in reversed order when ``reverse``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    depth, rows, cols = hu.shape
    study_uid = study_uid or uid(patient_id, "study")
    series_uid = series_uid or uid(study_uid, "enhanced")
    ds = _base_dataset(
        ENHANCED_CT_IMAGE_STORAGE, uid(series_uid, 0), study_uid, series_uid, {"patient_id": patient_id, **info}
    )
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.InstanceNumber = 1
    ds.NumberOfFrames = depth
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = [float(spacing[1]), float(spacing[0])]
    measures.SliceThickness = float(spacing[2])
    shared.PixelMeasuresSequence = [measures]
    plane = Dataset()
    plane.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    shared.PlaneOrientationSequence = [plane]
    transform = Dataset()
    transform.RescaleIntercept = float(intercept)
    transform.RescaleSlope = 1.0
    transform.RescaleType = "HU"
    shared.PixelValueTransformationSequence = [transform]
    ds.SharedFunctionalGroupsSequence = [shared]
    order = np.arange(depth)[::-1] if reverse else np.arange(depth)
    frames = []
    for k in order:
        frame = Dataset()
        position = Dataset()
        position.ImagePositionPatient = [float(origin[0]), float(origin[1]), float(origin[2] + k * spacing[2])]
        frame.PlanePositionSequence = [position]
        frames.append(frame)
    ds.PerFrameFunctionalGroupsSequence = frames
    ds.PixelData = _stored(hu[order], 1.0, intercept, np.dtype(np.int16)).tobytes()
    _save(ds, path, "explicit")
    return path
