"""Encoding a cohort end to end: series per minute, where the time goes, and the reference pipeline beside it.

    python benchmarks/encode_bench.py [--n 6] [--shape 240,512,512] [--sizes 128 256] [--precision fp32 bf16]

A phantom cohort of ``--n`` DICOM series is written once. For each model size (the published geometry,
untrained: speed does not depend on the weights) it measures, in one process, side by side:

- read + preprocess alone (per series, in the main process: the floor of any encoder of DICOM);
- encode alone (``encode_batch``: E^H then E^G on the preprocessed volumes, batch ``--batch-size``), per volume,
  per precision, with the agreement of the bf16 features with the fp32 ones (correlation, max difference);
- the reference pipeline on the same series: the same reader, the reference's preprocessing (``data.resize:
  reference``, stored as float64 as the reference stores it) and its encoders (fp32 weights in the default
  layout, E^H over the whole volume, then E^G), one series after another;
- end to end: ``hagan-clinic encode`` with one reader process overlapping the encoder, and with none.

Results go to benchmarks/results/encode_bench.json with the machine's matmul rates and load (benchmarks/machine.py).
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

from hagan_clinic.config import load_config
from hagan_clinic.io.cohort import discover, load_series
from hagan_clinic.models.hagan import HAGAN
from hagan_clinic.phantoms import write_cohort
from hagan_clinic.phantoms.render import parse_shape
from hagan_clinic.pipelines.encode import EncodeOptions, encode_batch, run
from hagan_clinic.pipelines.encode_inputs import prepare_one
from hagan_clinic.preprocessing import to_model_grid

from machine import RESULTS, agreement, record, write_result


def reference_pipeline(records: list, size: int) -> dict[str, float]:
    """Per series (median): read, the reference's preprocessing, and its encoders (fp32, default layout, whole
    volume through E^H), run one after another as the reference's scripts do."""
    cfg = load_config(f"paper_{size}", ["data.resize=reference"])
    model = HAGAN.from_config(cfg).eval()
    reads, preps, encs = [], [], []
    for record_ in records:
        t0 = time.perf_counter()
        volume = load_series(record_)
        t1 = time.perf_counter()
        grid = to_model_grid(volume, cfg)[0].astype(np.float64)  # the reference saves its volumes as float64
        t2 = time.perf_counter()
        with torch.inference_mode():
            model.encode(torch.from_numpy(grid).float()[None, None], mode="whole")
        t3 = time.perf_counter()
        reads.append(t1 - t0)
        preps.append(t2 - t1)
        encs.append(t3 - t2)
    out = {
        "read_s": statistics.median(reads),
        "preprocess_s": statistics.median(preps),
        "encode_s": statistics.median(encs[1:] or encs),
    }  # fmt: skip  (the first call warms up)
    out["s_per_series"] = out["read_s"] + out["preprocess_s"] + out["encode_s"]
    out["series_per_min"] = 60 / out["s_per_series"]
    return out


def per_feature_agreement(ref: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """What a regression on the features sees of bf16: per feature (column), the correlation across series and the
    largest |difference| in units of that feature's spread across series (fp32). Minimum / median / maximum."""
    corr = [np.corrcoef(ref[:, j], other[:, j])[0, 1] for j in range(ref.shape[1]) if ref[:, j].std() > 0]
    spread = ref.std(axis=0, ddof=1)
    rel = np.abs(ref - other).max(axis=0)[spread > 0] / spread[spread > 0]
    return {"series": int(ref.shape[0]), "corr_min": float(np.min(corr)), "corr_median": float(np.median(corr)),
            "max_diff_over_sd_median": float(np.median(rel)), "max_diff_over_sd_max": float(np.max(rel))}  # fmt: skip


def bench_size(size: int, folder: Path, work: Path, args) -> dict:
    cfg = load_config(f"paper_{size}")
    ckpt = work / f"paper_{size}.pt"
    HAGAN.from_config(cfg).save(ckpt)
    records = discover(folder, progress=False).ok
    # the floor, through the pipeline's own reader (prepare_one: read, order, HU, crop, resample, window), on a
    # second pass: the first read of each freshly written series is slower than every later one, and the
    # end-to-end runs below read each series for the third time and more
    for r in records:
        prepare_one(r, cfg.to_dict(), False)
    prepared = [prepare_one(r, cfg.to_dict(), False) for r in records]
    grids = [p["grid"] for p in prepared]
    out: dict = {"size": size, "series": len(records), "read_s": statistics.median(p["read_s"] for p in prepared),
                 "preprocess_s": statistics.median(p["prep_s"] for p in prepared)}  # fmt: skip
    b = args.batch_size
    features = {}
    model = HAGAN.from_config(cfg).eval()
    for precision in args.precision:
        encode_batch(model, grids[:b], "cpu", precision)  # warm-up (and the inference copies made)
        t = time.perf_counter()
        features[precision] = np.concatenate([encode_batch(model, grids[i : i + b], "cpu", precision)
                                              for i in range(0, len(grids), b)])  # fmt: skip
        out[f"encode_{precision}_s"] = (time.perf_counter() - t) / len(grids)
    if "fp32" in features and "bf16" in features:
        out["bf16_agreement_with_fp32"] = agreement(features["fp32"], features["bf16"])
        out["bf16_per_feature_agreement"] = per_feature_agreement(features["fp32"], features["bf16"])
    out["reference"] = reference_pipeline(records, size)
    # end to end: `encode` on the first series alone and on all of them, ``--repeats`` rounds with the set-ups
    # interleaved (a busy spell of a shared host then hits every set-up alike); start-up (checkpoint, discovery,
    # worker start, warm-up) is paid once per run, so the steady cost of a series is (all - one) / (n - 1)
    setups = [(precision, workers) for precision in args.precision for workers in (1, 0)]
    walls: dict = {s: {"one": [], "all": []} for s in setups}
    one = folder / records[0].folder.split("/")[0]
    for round_ in range(args.repeats):
        for precision, workers in setups:
            for name, src in (("one", one), ("all", folder)):
                target = work / f"f{size}_{precision}_{workers}_{name}_{round_}.parquet"
                opts = EncodeOptions(ckpt, target, workers=workers, batch_size=b, precision=precision, progress=False)
                t = time.perf_counter()
                run(src, opts)
                walls[(precision, workers)][name].append(time.perf_counter() - t)
    floor = out["read_s"] + out["preprocess_s"]
    for (precision, workers), w in walls.items():
        key = f"end_to_end_{precision}_workers{workers}"
        steadies = [(a - o) / (len(records) - 1) for a, o in zip(w["all"], w["one"])]
        steady = statistics.median(steadies)
        out[key + "_s_per_series"] = steady
        out[key + "_s_per_series_rounds"] = steadies
        out[key + "_startup_s"] = statistics.median(o - steady for o in w["one"])
        out[key + "_series_per_min"] = 60 / steady
        out[key + "_ratio_to_read_preprocess"] = steady / floor
        out[key + "_speedup_over_reference"] = out["reference"]["s_per_series"] / steady
    return _rounded(out)


def _rounded(value):
    """Floats to 6 significant digits (a correlation of 0.99997 must not print as 1.0)."""
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--shape", default="240,512,512", type=parse_shape, help="phantom series shape: slices,rows,cols")
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="rounds of the end-to-end runs (median reported)")
    ap.add_argument("--out", type=Path, default=RESULTS / "encode_bench.json")
    args = ap.parse_args(argv)
    machine = record("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_cohort(work / "cohort", n=args.n, seed=0, shape=args.shape, progress=False, extras=False)
        results = []
        for size in args.sizes:
            res = bench_size(size, work / "cohort", work, args)
            print(json.dumps(res), flush=True)
            results.append(res)
    body = {"shape": ",".join(map(str, args.shape)), "batch_size": args.batch_size, "repeats": args.repeats}
    body["results"] = results
    write_result(args.out, "encode_bench", machine, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
