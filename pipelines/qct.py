"""``hagan-clinic qct``: quantitative CT measures for every series of a cohort, one CSV row per series.

Each CT series is read at its own resolution (no resampling: the measures are defined on the scanner's voxels) and
measured by :func:`hagan_clinic.qct.measure`. Skipped and failed series keep their row with the reason. A run that
is interrupted resumes from a hidden state folder beside the CSV, which is removed once the CSV is complete.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from hagan_clinic.config import Config
from hagan_clinic.errors import HaganError
from hagan_clinic.io.cohort import SeriesRecord, discover, load_series

from .cohort import run_series, status_counts, write_csv

COLUMNS = [
    "patient_id", "study_uid", "series_uid", "status", "reason", "lung_volume_ml", "laa950_pct", "perc15_hu",
    "kernel", "slice_thickness_mm", "warning", "manufacturer", "source",
]  # fmt: skip
MEASURES = ("lung_volume_ml", "laa950_pct", "perc15_hu")


def measure_one(record: SeriesRecord, irregular: str) -> dict:
    """Read one series and measure it (runs in a worker process)."""
    from hagan_clinic.qct import measure

    volume = load_series(record, "CT", irregular)
    kernel = volume.meta.get("kernel") or record.kernel
    thickness = volume.meta.get("slice_thickness_mm", record.slice_thickness_mm)
    values = measure(volume.hu, volume.spacing, volume.valid, kernel=kernel, slice_thickness_mm=thickness)
    row = {k: round(float(values[k]), 3) for k in MEASURES}
    notes = [n for n in (values.get("warning", ""), volume.meta.get("notes", "")) if n]
    return {**row, "kernel": kernel, "slice_thickness_mm": thickness, "warning": "; ".join(notes), "status": "ok"}


@dataclass
class QCTResult:
    path: Path
    counts: dict[str, int]
    rows: list[dict]


def run(src: str | Path, out: str | Path, cfg: Config, workers: int = 1, progress: bool = True) -> QCTResult:
    src, out = Path(src), Path(out)
    if not src.exists():
        raise HaganError(f"source not found: {src}")
    if out.suffix.lower() != ".csv":
        raise HaganError(f"--out must be a .csv file, got '{out}'")
    d = cfg.data
    found = discover(src, "CT", d.min_slices, d.irregular, progress=progress)
    if not found.records:
        raise HaganError(f"{src}: no DICOM series or NIfTI files found ({found.ignored_files} other files)")
    state = out.parent / f".{out.name}.state"
    fn = partial(measure_one, irregular=d.irregular)
    done = run_series(found.ok, fn, state, workers, progress, desc="qct")
    by_key = {r.key: row for r, row in zip(found.ok, done)}
    rows = [by_key.get(r.key, r.row()) for r in found.records]
    write_csv(out, rows, COLUMNS)
    shutil.rmtree(state, ignore_errors=True)
    counts = status_counts(rows)
    return QCTResult(out, counts, rows)
