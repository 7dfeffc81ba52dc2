"""``hagan-clinic preprocess``: a cohort folder to a cache of volumes on the model's grid, with a manifest.

Layout of the cache folder::

    cache.json      the data contract and preprocessing options the cache was made with
    manifest.csv    one row per series found (ok, skipped, failed) with the reason
    volumes/        <id>.npy (S, S, S) float16 in [-1, 1] (or int16 fixed point), one per ok series
    nifti/          with ``--nifti``: <id>.nii.gz, the same grid in HU (CT) with its affine, to open in a viewer
    .state/         one JSON per finished series, so a re-run skips them

The manifest works as ``data.table`` for training (``data.dir`` = the cache folder, ``path`` column).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from hagan_clinic.config import Config
from hagan_clinic.errors import HaganError
from hagan_clinic.io.cohort import SeriesRecord, discover, load_series
from hagan_clinic.io.files import atomic_target

from .cohort import atomic_write_text, run_series, status_counts, write_csv

MANIFEST_COLUMNS = [
    "patient_id", "study_uid", "series_uid", "path", "shape", "spacing", "kernel", "status", "reason",
    "slice_thickness_mm", "manufacturer", "modality", "n_slices", "source", "notes", "grid_origin", "grid_spacing",
]  # fmt: skip


def cache_settings(cfg: Config) -> dict:
    d = cfg.data
    return {
        "contract": cfg.data_contract(),
        "crop": d.crop,
        "body_threshold": d.body_threshold,
        "mr_percentiles": list(d.mr_percentiles),
        "irregular": d.irregular,
        "min_slices": d.min_slices,
        "cache_dtype": d.cache_dtype,
    }


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_target(path, ".npy") as tmp:
        np.save(tmp, array)


def process_one(record: SeriesRecord, cfg_dict: dict, out: str) -> dict:
    """Read, preprocess and cache one series (runs in a worker process)."""
    from hagan_clinic.preprocessing import encode_cache, to_model_grid

    cfg = Config.from_dict(cfg_dict)
    volume = load_series(record, cfg.data.modality, cfg.data.irregular)
    grid, info = to_model_grid(volume, cfg)
    rel = f"volumes/{record.digest}.npy"
    _save_npy(Path(out) / rel, encode_cache(grid, cfg.data.cache_dtype))
    meta = volume.meta
    notes = [n for n in (meta.get("notes", ""), *info.notes) if n]
    return {
        "path": rel,
        "shape": "x".join(str(n) for n in volume.shape),
        "spacing": "x".join(f"{s:.4g}" for s in volume.spacing),
        "kernel": meta.get("kernel") or record.kernel,
        "slice_thickness_mm": meta.get("slice_thickness_mm", record.slice_thickness_mm),
        "status": "ok",
        "reason": "",
        "notes": "; ".join(notes),
        "grid_origin": "" if info.origin is None else " ".join(f"{o:.4f}" for o in info.origin),
        "grid_spacing": "" if info.spacing is None else " ".join(f"{v:.6f}" for v in info.spacing),
    }


def write_nifti_views(out: Path, rows: list[dict], cfg: Config) -> int:
    """``nifti/<id>.nii.gz`` for every ok row that has none yet: the cached grid in scanner units (HU for CT)
    with its affine: the grid's position in the source scan's coordinates and the spacing its resampling made
    (``grid_origin``, ``grid_spacing``). A grid without a place in the scanner's coordinates (the reference's
    resize, an oblique source read on the nearest axial grid) is centred on the origin, and its description says
    why."""
    from hagan_clinic.io.nifti import from_model_range, write_array
    from hagan_clinic.preprocessing import decode_cache

    written = 0
    for row in rows:
        if row.get("status") != "ok" or not row.get("path"):
            continue
        target = out / "nifti" / (Path(row["path"]).stem + ".nii.gz")
        if target.is_file():
            continue
        values = from_model_range(decode_cache(np.load(out / row["path"])), cfg.data.window)
        origin = tuple(float(v) for v in str(row.get("grid_origin") or "").split()) or None
        spacing = tuple(float(v) for v in str(row.get("grid_spacing") or "").split()) or None
        desc = "hagan-clinic model grid"
        if cfg.data.spacing_mm is None:
            desc, spacing, origin = desc + "; spacing unknown (reference resize), 1 mm nominal", (1.0,) * 3, None
        elif origin is None or spacing is None:
            desc, spacing, origin = desc + "; position unknown (oblique source)", cfg.data.spacing_mm, None
        dtype = np.int16 if cfg.data.modality == "CT" else np.float32
        write_array(target, values, spacing, origin, dtype, desc)
        written += 1
    return written


@dataclass
class PreprocessResult:
    manifest: Path
    counts: dict[str, int]
    rows: list[dict]


def check_cache(out: Path, settings: dict) -> None:
    """Refuse to mix volumes preprocessed two different ways in one cache."""
    path = out / "cache.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != settings:
            diff = sorted(k for k in settings if old.get(k) != settings[k])
            raise HaganError(f"{out} was preprocessed with other settings ({', '.join(diff)}); use another --out")
    else:
        atomic_write_text(path, json.dumps(settings, indent=2) + "\n")


def run(
    src: str | Path, out: str | Path, cfg: Config, workers: int = 1, progress: bool = True, nifti: bool = False
) -> PreprocessResult:
    src, out = Path(src), Path(out)
    if not src.exists():
        raise HaganError(f"source not found: {src}")
    d = cfg.data
    found = discover(src, d.modality, d.min_slices, d.irregular, progress=progress)
    if not found.records:
        raise HaganError(f"{src}: no DICOM series or NIfTI files found ({found.ignored_files} other files)")
    (out / "volumes").mkdir(parents=True, exist_ok=True)
    check_cache(out, cache_settings(cfg))
    fn = partial(process_one, cfg_dict=cfg.to_dict(), out=str(out))
    done = run_series(found.ok, fn, out / ".state", workers, progress, desc="preprocessing")
    done_by_key = {r.key: row for r, row in zip(found.ok, done)}
    rows = [done_by_key.get(r.key, r.row()) for r in found.records]
    manifest = out / "manifest.csv"
    write_csv(manifest, rows, MANIFEST_COLUMNS)
    if nifti:
        write_nifti_views(out, rows, cfg)
    counts = status_counts(rows)
    return PreprocessResult(manifest, counts, rows)
