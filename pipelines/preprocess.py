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
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from hagan_clinic.config import Config
from hagan_clinic.errors import HaganError, short_repr
from hagan_clinic.io.cohort import SeriesRecord, discover, load_series
from hagan_clinic.io.files import (
    Outputs,
    atomic_target,
    make_folder,
    read_csv_table,
    regular_file,
    write_rows,
    write_text,
)

from .cohort import OutputFailed, run_series, status_counts
from .privacy import Scrubber

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


# ---------------------------------------------------------------- reading a cache (any file of it may be damaged)
MANIFEST_REQUIRED = ("path", "status")
STORED_DTYPES = tuple(np.dtype(t) for t in ("float16", "int16", "float32", "float64"))  # the last two: by hand
EARLIER_RUN = "from an earlier run of this cache"


def _why(err: BaseException) -> str:
    """A reading error in a few words, without the file's path (the message names it once)."""
    if isinstance(err, UnicodeDecodeError):
        return "not UTF-8 text"
    if isinstance(err, json.JSONDecodeError):
        return f"not JSON: {err.msg} at line {err.lineno}"
    if isinstance(err, OSError):
        return err.strerror or type(err).__name__
    return " ".join(str(err).split())[:120] or type(err).__name__


def read_cache_settings(folder: Path) -> dict:
    """A cache's ``cache.json``; HaganError naming the file when it is missing or not a JSON object."""
    path = folder / "cache.json"
    try:
        settings = json.loads(regular_file(path, "cache description", 2**20).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise HaganError(f"{path} cannot be read ({_why(err)}): not a preprocess cache; preprocess again") from None
    if not isinstance(settings, dict):
        raise HaganError(f"{path} is not a preprocess cache's description (a JSON object): preprocess again")
    return settings


def _is_cache(folder: Path) -> bool:
    try:
        return "contract" in read_cache_settings(folder)
    except HaganError:
        return False


def read_manifest(folder: Path) -> list[dict[str, str]]:
    """The rows of a cache's ``manifest.csv``, every cell as text (missing ones empty); HaganError naming the file
    when it is not a CSV table with the ``path`` and ``status`` columns."""
    import pandas as pd

    path = folder / "manifest.csv"
    try:
        table = read_csv_table(path, "manifest", dtype=str, keep_default_na=False, encoding="utf-8")
    except (OSError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise HaganError(f"{path} is not a readable CSV table ({_why(err)}): restore it, or preprocess again") from None
    missing = [c for c in MANIFEST_REQUIRED if c not in table.columns]
    if missing:
        raise HaganError(f"{path} has no '{missing[0]}' column: not a preprocess manifest; restore it, or preprocess")
    return [{str(k): v if isinstance(v, str) else "" for k, v in row.items()} for row in table.to_dict("records")]


def cached_file(folder: Path, rel: str) -> Path | None:
    """``folder / rel`` when ``rel`` names a file inside the cache folder, else None (a manifest may be hostile)."""
    if not rel or Path(rel).is_absolute():
        return None
    path = folder / rel
    try:
        inside = path.resolve().is_relative_to(folder.resolve())
    except (OSError, RuntimeError):  # a symlink loop
        return None
    return path if inside and path.is_file() else None


def manifest_record(folder: Path, row: dict[str, str]) -> SeriesRecord | str:
    """An ok manifest row as a series to read from the cache, or why it cannot be one (an edited or damaged
    manifest): its path must name a file in the cache, its numbers be numbers."""
    path = cached_file(folder, row["path"])
    if path is None:
        return f"manifest path {short_repr(row['path'])} is not a file in the cache: repair the row, or preprocess"
    numbers: dict[str, float | int | None] = {}
    for column, kind in (("slice_thickness_mm", float), ("n_slices", int)):
        text = row.get(column, "").strip()
        try:
            numbers[column] = kind(text) if text else None
        except ValueError:
            numbers[column] = math.nan
        if numbers[column] is not None and not 0 <= numbers[column] < math.inf:  # NaN fails too
            return f"manifest {column} {short_repr(text)} is not a number: repair the row, or preprocess again"
    return SeriesRecord(
        key=f"cache:{row['path']}", kind="cache", paths=(path,), folder=row.get("source", ""), status="ok",
        patient_id=row.get("patient_id", ""), study_uid=row.get("study_uid", ""), series_uid=row.get("series_uid", ""),
        modality=row.get("modality", ""), kernel=row.get("kernel", ""),
        slice_thickness_mm=numbers["slice_thickness_mm"], n_slices=numbers["n_slices"] or 0,
    )  # fmt: skip


def load_cached_grid(path: Path, size: int, name: str) -> np.ndarray:
    """One cached volume as float32 (S, S, S) in [-1, 1]. SeriesError with the reason (``name`` for the file) when
    it is not a plain .npy array (pickled objects are never loaded), has another shape or dtype, or holds NaN/inf.
    The header is checked before the data is read: a hostile header cannot make us allocate what it claims."""
    from hagan_clinic.io.volume import SeriesError
    from hagan_clinic.preprocessing import decode_cache

    try:
        stored = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise SeriesError(f"cached volume {name} cannot be read as a .npy array ({_why(err)})") from None
    if not isinstance(stored, np.ndarray):  # an .npz archive
        stored.close()
        raise SeriesError(f"cached volume {name} is an archive, not one .npy array")
    if stored.dtype not in STORED_DTYPES:
        raise SeriesError(f"cached volume {name} has dtype {stored.dtype}; a cache stores float16 or int16")
    if stored.shape != (size,) * 3:
        raise SeriesError(
            f"cached volume {name} has shape {stored.shape}, but the model's grid is {size}^3 (preprocess it first)"
        )
    data = np.array(stored)  # read now, the file closed
    del stored
    if not np.isfinite(data).all():  # checked before decoding, whose clip would turn inf into +-1
        raise SeriesError(f"cached volume {name} holds NaN or infinite values")
    return decode_cache(data)


def require_finite(grid: np.ndarray) -> None:
    """A grid with NaN or infinite values is never 'ok': the model would turn it into NaN features."""
    from hagan_clinic.io.volume import SeriesError

    if not np.isfinite(grid).all():
        raise SeriesError("the model grid holds NaN or infinite values (NaN/inf voxels in the scan)")


def _save_npy(path: Path, array: np.ndarray) -> None:
    try:
        with atomic_target(path, ".npy") as tmp:
            np.save(tmp, array)
    except OSError as err:  # numpy's short write names no errno: any failure to write the cache stops the run
        raise OutputFailed(f"cannot write {path.name} into the cache: {err.strerror or err}") from None


def process_one(record: SeriesRecord, cfg_dict: dict, out: str) -> dict:
    """Read, preprocess and cache one series (runs in a worker process)."""
    from hagan_clinic.preprocessing import encode_cache, to_model_grid

    cfg = Config.from_dict(cfg_dict)
    volume = load_series(record, cfg.data.modality, cfg.data.irregular)
    grid, info = to_model_grid(volume, cfg)
    require_finite(grid)
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


def check_cache(out: Path, settings: dict, guard: Outputs | None = None) -> None:
    """Refuse to mix volumes preprocessed two different ways in one cache."""
    path = out / "cache.json"
    if path.exists():
        old = read_cache_settings(out)
        if old != settings:
            diff = sorted(k for k in settings if old.get(k) != settings[k])
            raise HaganError(f"{out} was preprocessed with other settings ({', '.join(diff)}); use another --out")
    else:
        write_text(path, json.dumps(settings, indent=2) + "\n", guard)


def run(
    src: str | Path,
    out: str | Path,
    cfg: Config,
    workers: int = 1,
    progress: bool = True,
    nifti: bool = False,
    overwrite: bool = False,
) -> PreprocessResult:
    src, out = Path(src), Path(out)
    if not src.exists():
        raise HaganError(f"source not found: {src}")
    guard = Outputs("preprocess", [src if src.is_file() else None], overwrite)
    ours = _is_cache(out)  # a cache of ours (made before outputs were recorded, or copied): its files are ours
    for name in ("cache.json", "manifest.csv"):
        if ours:
            guard.adopt(out / name)
        guard.check(out / name)  # a folder that is not a cache of ours is left alone
    d = cfg.data
    found = discover(src, d.modality, d.min_slices, d.irregular, progress=progress)
    if not found.records:
        raise HaganError(f"{src}: no DICOM series or NIfTI files found ({found.ignored_files} other files)")
    make_folder(out / "volumes")
    check_cache(out, cache_settings(cfg), guard)
    manifest = out / "manifest.csv"
    earlier = read_manifest(out) if manifest.exists() else []  # read first: an unreadable one stops the run here
    fn = partial(process_one, cfg_dict=cfg.to_dict(), out=str(out))
    done = run_series(found.ok, fn, out / ".state", workers, progress, desc="preprocessing")
    done_by_digest = {r.digest: row for r, row in zip(found.ok, done)}
    scrub = Scrubber(src, None)  # reasons name files relative to the source, as the source column does
    rows = [scrub.row(done_by_digest.get(r.digest, r.row())) for r in found.records]
    all_rows = rows + _still_cached(out, earlier, rows)
    write_rows(manifest, all_rows, MANIFEST_COLUMNS, guard)
    if nifti:
        write_nifti_views(out, all_rows, cfg)
    counts = status_counts(rows)  # this run's series; the manifest also keeps the earlier volumes
    return PreprocessResult(manifest, counts, all_rows)


NOW_FAILING = "its files now fail to read (see the failed row of this series)"
SUPERSEDED = "superseded: this series (same SeriesInstanceUID) was read again from other files; the newer volume counts"


def _still_cached(out: Path, earlier: list[dict], rows: list[dict]) -> list[dict]:
    """The ok rows of the cache's previous manifest whose volume is still there and that this run did not write
    again: a new manifest never forgets volumes the cache holds (another source, a series gone from this one)."""
    written = {row.get("path") for row in rows if row.get("path")}
    # a series read again from other files (same UID, other content) replaces its earlier volume for training: two
    # ok rows of one series would count it twice
    uids = {row.get("series_uid") for row in rows if row.get("status") == "ok" and row.get("series_uid")}
    failing = {row.get("series_uid") for row in rows if row.get("status") == "failed" and row.get("series_uid")}
    kept = []
    for row in earlier:
        rel = row.get("path", "")
        if row.get("status") not in ("ok", "skipped") or rel in written or cached_file(out, rel) is None:
            continue
        notes = row.get("notes", "")
        if EARLIER_RUN not in notes:
            notes = f"{notes}; {EARLIER_RUN}" if notes else EARLIER_RUN
        if row.get("series_uid") in uids:
            row = {**row, "status": "skipped", "reason": SUPERSEDED}
        elif row.get("series_uid") in failing and NOW_FAILING not in notes:
            notes += f"; {NOW_FAILING}"
        kept.append({**row, "notes": notes})
        written.add(rel)
    return kept
