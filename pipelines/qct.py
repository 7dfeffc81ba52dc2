"""``hagan-clinic qct``: quantitative CT measures for every series of a cohort, one CSV row per series.

Each CT series is read at its own resolution (no resampling: the measures are defined on the scanner's voxels) and
measured by :func:`hagan_clinic.qct.measure_with_mask`. Skipped and failed series keep their row with the reason. A
run that is interrupted resumes from a hidden state folder beside the CSV, which is removed once the CSV is
complete (resume with the same options: finished series are not measured again).

Lung masks, both ways, are NIfTI files named by :func:`mask_name` (the series UID, or the source when a series has
none): ``masks`` receives each lung mask measured (uint8, 1 = lung, on the scan's own grid and affine), and
``external_masks`` holds the user's own masks, measured instead of ours. An external mask must share the scan's
shape, spacing and origin, else that series fails with the reason; a series with no file there is measured with
our own mask and says so in ``warning``.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from hagan_clinic.config import Config
from hagan_clinic.errors import HaganError
from hagan_clinic.io.cohort import SeriesRecord, discover, load_series
from hagan_clinic.io.files import Outputs, make_folder, regular_file, table_format, write_rows, write_table, write_text
from hagan_clinic.io.volume import Volume

from .cohort import OutputFailed, counts_text, run_series, status_counts
from .privacy import Scrubber

COLUMNS = [
    "patient_id", "study_uid", "series_uid", "status", "reason", "lung_volume_ml", "laa950_pct", "perc15_hu",
    "kernel", "slice_thickness_mm", "warning", "manufacturer", "source", "mask",
]  # fmt: skip
MEASURES = ("lung_volume_ml", "laa950_pct", "perc15_hu")


def mask_name(record: SeriesRecord) -> str:
    """The file stem of a series' lung mask: its series UID, else its source (the row's ``source``: a folder or
    a NIfTI file relative to the root) without a .nii/.nii.gz suffix, every run of characters other than letters,
    digits, '.', '_' and '-' replaced by '_' (``chest/CT 1.nii.gz`` -> ``chest_CT_1``)."""
    if record.series_uid:
        return record.series_uid
    stem = re.sub(r"\.nii(\.gz)?$", "", record.folder, flags=re.IGNORECASE)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("_") or "series"
    return f"{stem}_{record.digest[:8]}"  # two sources may clean to one stem: the digest keeps them apart


def _external_mask(folder: Path, name: str, volume: Volume) -> np.ndarray | None:
    """The user's mask for this series as bool (D, H, W), None when there is no file for it."""
    from hagan_clinic.io.nifti import read_scan
    from hagan_clinic.qct import QCTError

    path = next((p for p in (folder / f"{name}.nii.gz", folder / f"{name}.nii") if p.is_file()), None)
    if path is None:
        return None
    mask = read_scan(path, "CT")
    if mask.shape != volume.shape:
        raise QCTError(f"external mask {path.name}: shape {mask.shape} != scan shape {volume.shape} (D, H, W)")
    tol = 0.01 * min(volume.spacing)
    if not np.allclose(mask.spacing, volume.spacing, rtol=1e-3, atol=1e-4) or not np.allclose(
        mask.origin, volume.origin, atol=tol
    ):
        raise QCTError(
            f"external mask {path.name}: grid (spacing {_mm(mask.spacing)}, origin {_mm(mask.origin)}) is not the "
            f"scan's (spacing {_mm(volume.spacing)}, origin {_mm(volume.origin)})"
        )
    return mask.hu > 0.5


def _mm(values) -> str:
    return "(" + ", ".join(f"{v:.3f}" for v in values) + ") mm"


def measure_one(
    record: SeriesRecord, irregular: str, masks: Path | None = None, external_masks: Path | None = None
) -> dict:
    """Read one series and measure it (runs in a worker process); write its mask when ``masks`` is given."""
    from hagan_clinic.io.nifti import write_scan
    from hagan_clinic.qct import measure_with_mask

    volume = load_series(record, "CT", irregular)
    kernel = volume.meta.get("kernel") or record.kernel
    thickness = volume.meta.get("slice_thickness_mm", record.slice_thickness_mm)
    name = mask_name(record)
    external = _external_mask(external_masks, name, volume) if external_masks is not None else None
    values, mask = measure_with_mask(volume.hu, volume.spacing, volume.valid, kernel, thickness, mask=external)
    if masks is not None:
        lung = Volume(hu=mask.astype(np.uint8), spacing=volume.spacing, origin=volume.origin)
        try:
            write_scan(masks / f"{name}.nii.gz", lung, dtype=np.uint8, description="hagan-clinic lung mask")
        except OSError as err:  # a full or read-only disk: not this series' fault
            raise OutputFailed(f"cannot write the mask {name}.nii.gz: {err.strerror or err}") from None
    bad = [k for k in MEASURES if not np.isfinite(values[k])]
    if bad:  # NaN/inf voxels in the lungs: a number that is no measure is never reported as one
        raise HaganError(f"no QCT measure: {', '.join(bad)} not finite (NaN or infinite voxels in the lungs?)")
    row = {k: round(float(values[k]), 3) for k in MEASURES}
    notes = [n for n in (values.get("warning", ""), volume.meta.get("notes", "")) if n]
    if external_masks is not None and external is None:
        notes.append(f"no external mask {name}.nii.gz: measured with our own mask")
    return {**row, "kernel": kernel, "slice_thickness_mm": thickness, "warning": "; ".join(notes), "status": "ok",
            "mask": "own" if external is None else "external"}  # fmt: skip


def _check_state(state: Path, settings: dict) -> None:
    """A resumed run re-uses finished series only when they were measured with the same options (a run that
    adds --masks must write the masks of every series, not only of those left)."""
    import json

    path = state / "run_options"  # not *.json: those are the finished series
    if state.is_symlink() or (state.exists() and not state.is_dir()):  # never delete through a link
        raise HaganError(f"{state} is not the state folder of a qct run (a link or a file): move it away")
    try:
        old = json.loads(regular_file(path, "state file", 2**20).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none, or damaged: nothing in the state folder can be trusted
        old = None
    if state.is_dir() and old != settings:
        shutil.rmtree(state)  # other options, or a state from a version that did not record them
    if not path.is_file():
        write_text(path, json.dumps(settings, sort_keys=True) + "\n")


@dataclass
class QCTResult:
    path: Path
    counts: dict[str, int]
    rows: list[dict]

    def summary(self) -> str:
        """What ``hagan-clinic qct`` prints: the series per status, and the table."""
        return f"{counts_text(self.counts)}: {self.path}"


def run(
    src: str | Path,
    out: str | Path,
    cfg: Config,
    workers: int = 0,
    progress: bool = True,
    masks: str | Path | None = None,
    external_masks: str | Path | None = None,
    overwrite: bool = False,
    fmt: str | None = None,
) -> QCTResult:
    """Measure every CT series under ``src`` into the table ``out`` (``fmt`` csv or parquet; default: from the
    name, CSV for a name without a suffix: :func:`hagan_clinic.io.files.table_format`); ``workers``: reader
    processes (0: this process); ``masks``: a folder to write each lung mask to;
    ``external_masks``: a folder of the user's lung masks to measure instead of ours (see the module)."""
    src, out = Path(src), Path(out)
    if not src.exists():
        raise HaganError(f"source not found: {src}")
    fmt = table_format(out, fmt, "csv")  # before any work: a name that contradicts the format is refused
    guard = Outputs("qct", [src if src.is_file() else None], overwrite)
    guard.check(out)  # before any work
    options: dict[str, Any] = {}  # only the folders given: measure_one's defaults stand for the others
    if external_masks is not None:
        if not Path(external_masks).is_dir():
            raise HaganError(f"--mask: no folder of lung masks at {external_masks}")
        options["external_masks"] = Path(external_masks)
    if masks is not None:
        if external_masks is not None and Path(masks).resolve() == Path(external_masks).resolve():
            raise HaganError("--masks and --mask name one folder: the masks written would replace yours")
        options["masks"] = Path(masks)
        make_folder(options["masks"])
    d = cfg.data
    found = discover(src, "CT", d.min_slices, d.irregular, progress=progress)
    if not found.records:
        raise HaganError(f"{src}: no DICOM series or NIfTI files found ({found.ignored_files} other files)")
    state = out.parent / f".{out.name}.state"
    _check_state(state, {"irregular": d.irregular, **{k: str(Path(v).resolve()) for k, v in options.items()}})
    fn = partial(measure_one, irregular=d.irregular, **options)
    done = run_series(found.ok, fn, state, workers, progress, desc="qct")
    by_digest = {r.digest: row for r, row in zip(found.ok, done)}
    scrub = Scrubber(src, None)  # reasons name files relative to the source, as the source column does
    rows = [scrub.row(by_digest.get(r.digest, r.row())) for r in found.records]
    if fmt == "csv":
        write_rows(out, rows, COLUMNS, guard)
    else:
        import pandas as pd

        write_table(out, pd.DataFrame([{c: row.get(c) for c in COLUMNS} for row in rows], columns=COLUMNS), fmt, guard)
    shutil.rmtree(state, ignore_errors=True)
    counts = status_counts(rows)
    return QCTResult(out, counts, rows)
