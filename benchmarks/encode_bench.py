"""Encoding a cohort end to end: series per minute, and where the time goes.

    python benchmarks/encode_bench.py [--n 6] [--shape 240,512,512] [--sizes 128 256] [--precision fp32 bf16]

A phantom cohort of ``--n`` DICOM series is written once. For each model size (the published geometry,
untrained: speed does not depend on the weights) it measures, in one process, side by side:

- read + preprocess alone (per series, in the main process: the floor of any encoder of DICOM);
- encode alone (E^H then E^G on the preprocessed volumes, batch ``--batch-size``), per volume;
- end to end: ``hagan-clinic encode`` with one reader process overlapping the encoder, and with none.

Results go to benchmarks/results/encode_bench.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from hagan_clinic.pipelines.encode import EncodeOptions, encode_batch, run

from hagan_clinic.config import load_config
from hagan_clinic.io.cohort import discover, load_series
from hagan_clinic.models.hagan import HAGAN
from hagan_clinic.phantoms import write_cohort
from hagan_clinic.preprocessing import to_model_grid


def bench_size(size: int, folder: Path, work: Path, args) -> dict:
    cfg = load_config(f"paper_{size}")
    ckpt = work / f"paper_{size}.pt"
    HAGAN.from_config(cfg).save(ckpt)
    model = HAGAN.from_config(cfg).eval()
    records = discover(folder, progress=False).ok
    grids, reads, preps = [], [], []
    for record in records:
        t = time.perf_counter()
        volume = load_series(record)
        t1 = time.perf_counter()
        grids.append(to_model_grid(volume, cfg)[0].astype(np.float16))
        preps.append(time.perf_counter() - t1)
        reads.append(t1 - t)
    out = {"size": size, "series": len(records), "read_s": statistics.median(reads),
           "preprocess_s": statistics.median(preps)}  # fmt: skip
    b = args.batch_size
    for precision in args.precision:
        encode_batch(model, grids[:b], "cpu", precision)  # warm-up
        t = time.perf_counter()
        for i in range(0, len(grids), b):
            encode_batch(model, grids[i : i + b], "cpu", precision)
        out[f"encode_{precision}_s"] = (time.perf_counter() - t) / len(grids)
    for precision in args.precision:
        for workers in (1, 0):
            walls = {}
            for name, src in (("one", folder / records[0].folder.split("/")[0]), ("all", folder)):
                target = work / f"f{size}_{precision}_{workers}_{name}.parquet"
                opts = EncodeOptions(ckpt, target, workers=workers, batch_size=b, precision=precision, progress=False)
                t = time.perf_counter()
                run(src, opts)
                walls[name] = time.perf_counter() - t
            key = f"end_to_end_{precision}_workers{workers}"
            # start-up (loading and hashing the checkpoint, discovery, worker start) is paid once per run; the
            # steady rate is the cost of each further series
            steady = (walls["all"] - walls["one"]) / (len(records) - 1)
            out[key + "_startup_s"] = walls["one"] - steady
            out[key + "_s_per_series"] = steady
            out[key + "_series_per_min"] = 60 / steady
            out[key + "_wall_s"] = walls["all"]
    floor = out["read_s"] + out["preprocess_s"]
    for k in [k for k in out if k.endswith("_s_per_series")]:
        out[k.replace("_s_per_series", "_ratio_to_read_preprocess")] = out[k] / floor
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--shape", default="240,512,512")
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "encode_bench.json")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shape = tuple(int(v) for v in args.shape.split(","))
        write_cohort(work / "cohort", n=args.n, seed=0, shape=shape, progress=False, extras=False)
        results = []
        for size in args.sizes:
            res = bench_size(size, work / "cohort", work, args)
            print(json.dumps(res), flush=True)
            results.append(res)
    report = {"shape": args.shape, "threads": torch.get_num_threads(), "batch_size": args.batch_size,
              "reference_encode_s": {"128": 0.4, "256": 4.5}, "results": results}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
