"""``hagan-clinic preprocess``: a cohort folder to a cache of volumes on the model's grid, with a manifest.

The cache's layout, its settings file and how a grid is stored belong to :mod:`hagan_clinic.io.cache`; this module
fills a cache: it reads each series, preprocesses it (:func:`hagan_clinic.preprocessing.to_model_grid`), stores the
grid, and writes the manifest (with ``--nifti``, also a NIfTI view of each grid in scanner units).

The manifest works as ``data.table`` for training (``data.dir`` = the cache folder, ``path`` column).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from hagan_clinic.config import Config
from hagan_clinic.errors import HaganError
from hagan_clinic.io.cache import (
    MANIFEST_COLUMNS,
    cached_file,
    claim_folder,
    decode_grid,
    is_cache,
    read_manifest,
    require_finite,
    write_grid,
)
from hagan_clinic.io.cohort import SeriesRecord, discover, load_series
from hagan_clinic.io.files import Outputs, make_folder, write_rows

from .cohort import SECONDS, OutputFailed, run_series, status_counts
from .privacy import Scrubber

EARLIER_RUN = "from an earlier run of this cache"
log = logging.getLogger(__name__)


def process_one(record: SeriesRecord, cfg_dict: dict, out: str) -> dict:
    """Read, preprocess and cache one series (in a worker process, or in this one with no workers)."""
    from hagan_clinic.preprocessing import to_model_grid

    cfg = Config.from_dict(cfg_dict)
    t0 = time.perf_counter()
    volume = load_series(record, cfg.data.modality, cfg.data.irregular)
    t1 = time.perf_counter()
    grid, info = to_model_grid(volume, cfg)
    require_finite(grid)
    t2 = time.perf_counter()
    try:
        rel = write_grid(Path(out), record.digest, grid, cfg.data.cache_dtype)
    except OSError as err:  # numpy's short write names no errno: any failure to write the cache stops the run
        raise OutputFailed(f"cannot write {record.digest}.npy into the cache: {err.strerror or err}") from None
    seconds = {"read": t1 - t0, "preprocess": t2 - t1, "write": time.perf_counter() - t2}  # --verbose shows them
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
        SECONDS: seconds,
    }


def write_nifti_views(out: Path, rows: list[dict], cfg: Config) -> int:
    """``nifti/<id>.nii.gz`` for every ok row that has none yet: the cached grid in scanner units (HU for CT)
    with its affine: the grid's position in the source scan's coordinates and the spacing its resampling made
    (``grid_origin``, ``grid_spacing``). A grid without a place in the scanner's coordinates (the reference's
    resize, an oblique source read on the nearest axial grid) is centred on the origin, and its description says
    why."""
    from hagan_clinic.io.nifti import from_model_range, write_array

    written = 0
    for row in rows:
        if row.get("status") != "ok" or not row.get("path"):
            continue
        target = out / "nifti" / (Path(row["path"]).stem + ".nii.gz")
        if target.is_file():
            continue
        values = from_model_range(decode_grid(np.load(out / row["path"])), cfg.data.window)
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
    counts: dict[str, int]  # this run's series by status
    rows: list[dict]  # every manifest row (earlier runs' volumes included)

    def summary(self) -> str:
        """What ``hagan-clinic preprocess`` prints: the counts and the manifest."""
        return f"{', '.join(f'{v} {k}' for k, v in self.counts.items())}: {self.manifest}"


def run(
    src: str | Path,
    out: str | Path,
    cfg: Config,
    workers: int = 0,
    progress: bool = True,
    nifti: bool = False,
    overwrite: bool = False,
) -> PreprocessResult:
    """Fill the cache ``out`` from the cohort ``src`` with ``cfg``'s data contract; resumes an earlier run.

    workers: 0 works in this process, N >= 1 in N worker processes (the same cache either way).
    """
    src, out = Path(src), Path(out)
    if not src.exists():
        raise HaganError(f"source not found: {src}")
    guard = Outputs("preprocess", [src if src.is_file() else None], overwrite)
    ours = is_cache(out)  # a cache of ours (made before outputs were recorded, or copied): its files are ours
    for name in ("cache.json", "manifest.csv"):
        if ours:
            guard.adopt(out / name)
        guard.check(out / name)  # a folder that is not a cache of ours is left alone
    d = cfg.data
    found = discover(src, d.modality, d.min_slices, d.irregular, progress=progress)
    if not found.records:
        raise HaganError(f"{src}: no DICOM series or NIfTI files found ({found.ignored_files} other files)")
    make_folder(out / "volumes")
    claim_folder(out, cfg, guard)
    manifest = out / "manifest.csv"
    earlier = read_manifest(out) if manifest.exists() else []  # read first: an unreadable one stops the run here
    fn = partial(process_one, cfg_dict=cfg.to_dict(), out=str(out))
    done = run_series(found.ok, fn, out / ".state", workers, progress, desc="preprocessing")
    done_by_digest = {r.digest: row for r, row in zip(found.ok, done)}
    scrub = Scrubber(src, None)  # reasons name files relative to the source, as the source column does
    rows = [scrub.row(done_by_digest.get(r.digest, r.row())) for r in found.records]
    kept = _still_cached(out, earlier, rows)
    all_rows = rows + kept
    write_rows(manifest, all_rows, MANIFEST_COLUMNS, guard)
    log.debug("manifest: %d rows of this source, %d volumes kept from earlier runs", len(rows), len(kept))
    if nifti:
        log.debug("%d new NIfTI views", write_nifti_views(out, all_rows, cfg))
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
