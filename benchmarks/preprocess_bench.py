"""Reading and preprocessing one series against decoding its pixels alone (the physical floor).

    python benchmarks/preprocess_bench.py SERIES_FOLDER [SERIES_FOLDER ...] [--config base] [--repeats 3]
    python benchmarks/preprocess_bench.py --phantom 300,512,512   # writes a phantom series first

Floor: for every file, pydicom.dcmread + pixel_array (what any reader must do). Ours: read_dicom_series (headers,
ordering, checks, HU) then to_model_grid (crop, antialiased resample, pad, window). Median of ``--repeats`` runs,
side by side in one process. Results go to benchmarks/results/preprocess_bench.json (``--out``), under the header
of ``machine.write_result``: benchmark, created, argv, and the machine (host, threads, load at start and end, fp32 and
bf16 matmul rates), measured before the first series.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pydicom

from hagan_clinic.config import Config, load_config
from hagan_clinic.io.cohort import SeriesRecord, discover, load_series
from hagan_clinic.preprocessing import to_model_grid

from machine import record, write_result  # benchmarks/ is on sys.path when a script here runs


def floor_decode(paths: Sequence[str | Path]) -> float:
    """Seconds to read and decode every file's pixels with pydicom alone."""
    t = time.perf_counter()
    for p in paths:
        pydicom.dcmread(p).pixel_array  # noqa: B018 - decoding is the point
    return time.perf_counter() - t


def ours(series: SeriesRecord, cfg: Config) -> tuple[float, float]:
    """Seconds to read the series (headers, ordering, checks, HU) and to bring it to the model grid."""
    t = time.perf_counter()
    volume = load_series(series, cfg.data.modality, cfg.data.irregular)
    t_read = time.perf_counter() - t
    t = time.perf_counter()
    to_model_grid(volume, cfg)
    return t_read, time.perf_counter() - t


def bench(folder: Path, cfg: Config, repeats: int) -> dict[str, Any]:
    """Median times of ``repeats`` interleaved runs of the floor and of ours on the one series in ``folder``."""
    found = discover(folder, cfg.data.modality, cfg.data.min_slices, cfg.data.irregular, progress=False)
    if len(found.ok) != 1:
        raise SystemExit(f"{folder}: expected one usable series, found {found.counts()}")
    series = found.ok[0]
    ours(series, cfg)  # warm-up: imports, page cache
    floors, reads, preps = [], [], []
    for _ in range(repeats):  # interleaved so machine noise hits both alike
        floors.append(floor_decode(series.paths))
        r, p = ours(series, cfg)
        reads.append(r)
        preps.append(p)
    floor, read, prep = (statistics.median(x) for x in (floors, reads, preps))
    return {
        "series": folder.name,
        "slices": series.n_slices,
        "decode_floor_s": round(floor, 3),
        "read_s": round(read, 3),
        "preprocess_s": round(prep, 3),
        "total_s": round(read + prep, 3),
        "ratio_total_to_floor": round((read + prep) / floor, 2),
        "ratios_per_repeat": [round((r + p) / f, 2) for f, r, p in zip(floors, reads, preps)],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="*", type=Path)
    ap.add_argument("--phantom", default=None, help="also bench a phantom of this shape (slices,rows,cols)")
    ap.add_argument("--config", default="base")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "preprocess_bench.json")
    args = ap.parse_args(argv)
    try:
        shape = tuple(int(v) for v in args.phantom.split(",")) if args.phantom else (0, 0, 0)
    except ValueError:
        shape = ()
    if len(shape) != 3:
        ap.error(f"--phantom {args.phantom}: expected slices,rows,cols")
    cfg = load_config(args.config)
    machine = record("cpu")  # before any series: the load at the start, the matmul rate the times are read against
    folders = list(args.folders)
    tmp = None
    if args.phantom:
        from hagan_clinic.phantoms import write_cohort

        tmp = tempfile.TemporaryDirectory()
        write_cohort(Path(tmp.name), n=1, seed=0, shape=(shape[0], shape[1], shape[2]), progress=False)
        series = sorted({p.parent for p in Path(tmp.name).rglob("*.dcm")})
        folders += series[:1]
    results = []
    for folder in folders:
        res = bench(folder, cfg, args.repeats)
        if tmp is not None and str(folder).startswith(tmp.name):
            res["series"] = f"phantom {args.phantom}"
        print(json.dumps(res), flush=True)
        results.append(res)
    grid = f"{cfg.model.size}^3 at {list(cfg.data.spacing_mm)} mm" if cfg.data.spacing_mm else f"{cfg.model.size}^3"
    report = {
        "config": args.config,
        "grid": grid,  # no spacing: the reference's resize, which keeps none
        "results": results,
    }
    if argv is not None:  # called with arguments: those, not the caller's command line
        report = {"argv": [__file__, *argv], **report}
    write_result(args.out, "preprocess_bench", machine, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
