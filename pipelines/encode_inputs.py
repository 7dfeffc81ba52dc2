"""What ``hagan-clinic encode`` reads: the series of a cohort (discovery, or a preprocess cache's manifest), and one
series read and preprocessed to the model's input (in a worker process), with its report cells.

Every series reaches the encoder as the cache stores it (float16), whether it comes from DICOM, NIfTI or a cache,
so encoding a cache and encoding its source give the same features.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from hagan_clinic.config import Config
from hagan_clinic.errors import HaganError, one_line, short_repr
from hagan_clinic.io.cache import (
    cached_file,
    encode_grid,
    load_grid,
    looks_like_cache,
    manifest_numbers,
    open_cache,
    require_finite,
)
from hagan_clinic.io.cohort import SeriesRecord, discover, load_series

from .privacy import series_names

#: Reasons are cut to length by the report (Scrubber.row) once file names are out of them, not here.
UNCUT = 100_000

QCT_COLUMNS = ["lung_volume_ml", "laa950_pct", "perc15_hu", "qct_warning"]
Others = list[tuple[dict, set[str]]]  # report rows of the series not encoded, with the file names each may mention


# ---------------------------------------------------------------- listing the series
def _cache_records(src: Path, cfg: Config, qct: bool) -> tuple[list[SeriesRecord], Others]:
    """The ok series of a preprocess cache, and the report rows of the others. Any file of the cache may be damaged
    or hostile: cache.json and the manifest as a whole are checked when it is opened (HaganError, as is a cache made
    at other settings than the checkpoint's), each row in :func:`manifest_record` and each volume when it is read
    (that series failed)."""
    cache = open_cache(src, cfg, by="the checkpoint")
    if qct:
        raise HaganError("--qct needs the scans themselves (a DICOM or NIfTI folder), not a preprocess cache")
    ok, others = [], []
    for row in cache.manifest:
        names = series_names((), row.get("source", ""), src)
        if row["status"] not in ("ok", "skipped", "failed"):
            row = {**row, "status": "failed", "reason": f"manifest status {short_repr(row['status'])} is unknown"}
        record = manifest_record(src, row) if row["status"] == "ok" else None
        if isinstance(record, SeriesRecord):
            ok.append(record)
        else:
            others.append(({**row, "status": "failed", "reason": record} if record else row, names))
    return ok, others


def manifest_record(folder: Path, row: dict[str, str]) -> SeriesRecord | str:
    """An ok manifest row as a series to read from the cache, or why it cannot be one (an edited or damaged
    manifest): its path must name a file in the cache, its numbers be numbers."""
    path = cached_file(folder, row["path"])
    if path is None:
        return f"manifest path {short_repr(row['path'])} is not a file in the cache: repair the row, or preprocess"
    numbers = manifest_numbers(row)
    if isinstance(numbers, str):
        return numbers
    n_slices = numbers["n_slices"]
    return SeriesRecord(
        key=f"cache:{row['path']}", kind="cache", paths=(path,), folder=row.get("source", ""), status="ok",
        patient_id=row.get("patient_id", ""), study_uid=row.get("study_uid", ""), series_uid=row.get("series_uid", ""),
        modality=row.get("modality", ""), kernel=row.get("kernel", ""),
        slice_thickness_mm=numbers["slice_thickness_mm"], n_slices=0 if n_slices is None else int(n_slices),
    )  # fmt: skip


def list_series(src: Path, cfg: Config, qct: bool, progress: bool) -> tuple[list[SeriesRecord], Others]:
    """The series to encode, and the report rows of the others with the file names each may mention."""
    if not src.exists():
        raise HaganError(f"source not found: {src}")
    if looks_like_cache(src):  # a preprocess cache, whole or damaged
        ok, others = _cache_records(src, cfg, qct)
    else:
        d = cfg.data
        found = discover(src, d.modality, d.min_slices, d.irregular, progress=progress)
        base = src.parent if src.is_file() else src
        ok = found.ok
        others = [(r.row(), series_names(r.paths, r.folder, base)) for r in found.records if r.status != "ok"]
    if not ok and not others:
        raise HaganError(f"{src}: no DICOM series, NIfTI files or preprocess cache found")
    return ok, others


# ---------------------------------------------------------------- one series (in a worker process)
def prepare_one(record: SeriesRecord, cfg_dict: dict, qct: bool) -> dict:
    """Read and preprocess one series: {'grid': float16 (S, S, S) or None, 'row': ..., 'read_s', 'prep_s'}."""
    from hagan_clinic.preprocessing import to_model_grid

    cfg = Config.from_dict(cfg_dict)
    row: dict = {"status": "ok", "reason": "", "notes": ""}
    t0 = time.perf_counter()
    try:
        if record.kind == "cache":
            name = record.key.removeprefix("cache:")
            grid = encode_grid(load_grid(record.paths[0], cfg.model.size, name), "float16")
            return {"grid": grid, "row": row, "read_s": time.perf_counter() - t0, "prep_s": 0.0}
        volume = load_series(record, cfg.data.modality, cfg.data.irregular)
        t1 = time.perf_counter()
        grid, info = to_model_grid(volume, cfg)
        require_finite(grid)
        t2 = time.perf_counter()
    except HaganError as err:  # the reason is cut to length once file names are out of it (Scrubber.row)
        return {"grid": None, "row": {**row, "status": "failed", "reason": one_line(err, UNCUT)}}
    meta = volume.meta
    row.update(kernel=meta.get("kernel") or record.kernel, slice_thickness_mm=meta.get("slice_thickness_mm"))
    row["notes"] = "; ".join(n for n in (meta.get("notes", ""), *info.notes) if n)
    if qct:
        row.update(_qct_cells(volume, row["kernel"], row["slice_thickness_mm"]))
    return {"grid": encode_grid(grid, "float16"), "row": row, "read_s": t1 - t0, "prep_s": t2 - t1}


def _qct_cells(volume, kernel: str, thickness: float | None) -> dict:
    """The --qct columns of one series: the measures, or none and the reason in ``qct_warning`` (the features
    are valid either way). A measure that is NaN or infinite (NaN/inf voxels in the lungs) is never reported."""
    from hagan_clinic.qct import measure

    try:
        values = measure(volume.hu.astype(np.float32, copy=False), volume.spacing, volume.valid,
                         kernel=kernel, slice_thickness_mm=thickness)  # fmt: skip
    except HaganError as err:  # no lung found
        return {"qct_warning": one_line(err, UNCUT)}
    measured = {k: float(values[k]) for k in QCT_COLUMNS[:3]}
    bad = [k for k, v in measured.items() if not math.isfinite(v)]
    if bad:
        note = f"no QCT measure: {', '.join(bad)} not finite (NaN/inf voxels in the lungs?)"
        return {"qct_warning": "; ".join(w for w in (note, values.get("warning", "")) if w)}
    return {**{k: round(v, 3) for k, v in measured.items()}, "qct_warning": values["warning"]}
