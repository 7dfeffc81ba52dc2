"""Reading and preprocessing one series against decoding its pixels alone (the physical floor).

    python benchmarks/preprocess_bench.py SERIES_FOLDER [SERIES_FOLDER ...] [--config base] [--repeats 3]
    python benchmarks/preprocess_bench.py --phantom 300,512,512   # writes a phantom series first

Floor: for every file, pydicom.dcmread + pixel_array (what any reader must do). Ours: read_dicom_series (headers,
ordering, checks, HU) then to_model_grid (crop, antialiased resample, pad, window). Median of ``--repeats`` runs,
side by side in one process. Results go to benchmarks/results/preprocess_bench.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pydicom
import torch

from hagan_clinic.config import load_config
from hagan_clinic.io.cohort import discover, load_series
from hagan_clinic.preprocessing import to_model_grid


def floor_decode(paths) -> float:
    t = time.perf_counter()
    for p in paths:
        pydicom.dcmread(p).pixel_array  # noqa: B018 - decoding is the point
    return time.perf_counter() - t


def ours(record, cfg) -> tuple[float, float]:
    t = time.perf_counter()
    volume = load_series(record, cfg.data.modality, cfg.data.irregular)
    t_read = time.perf_counter() - t
    t = time.perf_counter()
    to_model_grid(volume, cfg)
    return t_read, time.perf_counter() - t


def bench(folder: Path, cfg, repeats: int) -> dict:
    found = discover(folder, cfg.data.modality, cfg.data.min_slices, cfg.data.irregular, progress=False)
    if len(found.ok) != 1:
        raise SystemExit(f"{folder}: expected one usable series, found {found.counts()}")
    record = found.ok[0]
    ours(record, cfg)  # warm-up: imports, page cache
    floors, reads, preps = [], [], []
    for _ in range(repeats):  # interleaved so machine noise hits both alike
        floors.append(floor_decode(record.paths))
        r, p = ours(record, cfg)
        reads.append(r)
        preps.append(p)
    floor, read, prep = (statistics.median(x) for x in (floors, reads, preps))
    return {
        "series": folder.name,
        "slices": record.n_slices,
        "decode_floor_s": round(floor, 3),
        "read_s": round(read, 3),
        "preprocess_s": round(prep, 3),
        "total_s": round(read + prep, 3),
        "ratio_total_to_floor": round((read + prep) / floor, 2),
        "ratios_per_repeat": [round((r + p) / f, 2) for f, r, p in zip(floors, reads, preps)],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="*", type=Path)
    ap.add_argument("--phantom", default=None, help="also bench a phantom of this shape (slices,rows,cols)")
    ap.add_argument("--config", default="base")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "preprocess_bench.json")
    args = ap.parse_args(argv)
    cfg = load_config(args.config)
    folders = list(args.folders)
    tmp = None
    if args.phantom:
        from hagan_clinic.phantoms import write_cohort

        tmp = tempfile.TemporaryDirectory()
        shape = tuple(int(v) for v in args.phantom.split(","))
        write_cohort(Path(tmp.name), n=1, seed=0, shape=shape, progress=False)
        series = sorted({p.parent for p in Path(tmp.name).rglob("*.dcm")})
        folders += series[:1]
    results = []
    for folder in folders:
        res = bench(folder, cfg, args.repeats)
        if tmp is not None and str(folder).startswith(tmp.name):
            res["series"] = f"phantom {args.phantom}"
        print(json.dumps(res), flush=True)
        results.append(res)
    report = {
        "config": args.config,
        "grid": f"{cfg.model.size}^3 at {list(cfg.data.spacing_mm)} mm",
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "python": sys.version.split()[0],
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
