"""Benchmark one HA-GAN training iteration: time, peak memory, FLOPs and efficiency, written to JSON.

One iteration is ``hagan_clinic.training.loop.train_step`` on what ``hagan_clinic.training.build.build`` makes
from the config (the model, its EMA copy with ``train.ema``, the optimisers, grad scalers and loss object that
``train`` trains): a random real batch x in [-1, 1] of shape (B, 1, S, S, S), the phase inputs drawn by the loss
object (slab start, S^H(x), x_low, latents), then for each phase D, G, E^H, E^G the loss under autocast, the
finiteness check, the scaled backward and the Adam step; then the EMA update. Data loading, logging and
checkpoints are left out.

Each (config, precision, channels-last) runs in its own child process (``--worker``), so ``ru_maxrss`` marks
never mix: ``peak_mb`` is the ``ru_maxrss`` rise from just after the model, optimisers and batch are built to
after W warm-up and R timed iterations (optimiser state, made at the first step, counts); on CUDA,
``torch.cuda.max_memory_allocated``. ``s_per_iter`` is the median of the R timed iterations. Right after each
iteration the child times a few ``--mm-size``^2 matmuls in the run's dtype, so that ``efficiency`` (the median
over timed iterations of achieved FLOP/s / matmul FLOP/s) pairs two readings taken under the same host load.
``FlopCounterMode`` counts one more iteration's FLOPs (forward + backward) after the memory readings. The
parent never imports torch (see model_bench.py).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from machine import RESULTS, load, record, write_result  # benchmarks/ is on sys.path when a script here runs

DEFAULT_OUT = RESULTS / "train_speed.json"
MARK = "TRAIN_SPEED_RESULT "
MB = 1024.0  # ru_maxrss is in KiB on Linux
G = 1e9


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from hagan_clinic.config import load_config
    from hagan_clinic.devices import resolve_device, torch_dtype
    from hagan_clinic.training.build import build
    from hagan_clinic.training.loop import train_step
    from hagan_clinic.training.losses import PHASES

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    dev = resolve_device(spec["device"])
    cuda = dev.type == "cuda"
    sets = [f"train.{k}={json.dumps(spec[k])}" for k in ("batch_size", "precision", "channels_last")]
    cfg = load_config(spec["config"], [*spec["overrides"], *sets])
    tc, mcfg = cfg.train, cfg.model
    torch.manual_seed(cfg.seed)

    def sync() -> None:
        torch.cuda.synchronize(dev) if cuda else None

    # ---- as in train(): model, EMA, optimisers, scalers, loss, generator; a random real batch ------------------
    parts = build(cfg, dev)
    if spec.get("literal_upsampling"):  # the reference's maths: nearest upsample, then conv3, side by side
        from hagan_clinic.models.layers import UpConv3d

        for m in parts.model.modules():
            if isinstance(m, UpConv3d):
                m.phase_decomposed = False
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003)
    s = mcfg.size
    x = torch.rand((tc.batch_size, 1, s, s, s), generator=gen).mul_(2).sub_(1).to(dev)
    if tc.channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)

    def iteration(phase_ctx=lambda phase: nullcontext(), phase_times: dict[str, float] | None = None) -> None:
        """The loop's own step (single process, no labels), with each phase timed when asked."""

        @contextmanager
        def per_phase(phase: str):
            t0 = time.perf_counter()
            with phase_ctx(phase):
                yield
            if phase_times is not None:
                sync()
                phase_times[phase] = time.perf_counter() - t0

        train_step(parts, x, None, gen, phase_context=per_phase)

    # ---- attainable matmul FLOP/s, in the run's dtype, timed right after each timed iteration ----------------
    def matmul_gflops(dtype: torch.dtype, reps: int = 3) -> list[float]:
        (a, b), rates = mats[dtype], []
        for _ in range(reps + 1):  # the first is the warm-up
            sync()
            t0 = time.perf_counter()
            torch.mm(a, b)
            sync()
            rates.append(2 * n**3 / (time.perf_counter() - t0) / G)
        return rates[1:]

    dtype = torch_dtype(tc.precision)
    n, mm_gen = spec["mm_size"], torch.Generator().manual_seed(1)  # operands made before the memory baseline
    mats = {t: [torch.randn(n, n, generator=mm_gen).to(dev, t) for _ in "ab"] for t in {dtype, torch.float32}}

    # ---- time and memory -------------------------------------------------------------------------------------
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    res: dict[str, Any] = {k: spec[k] for k in ("config", "overrides", "batch_size", "precision", "channels_last")}
    res["literal_upsampling"] = bool(spec.get("literal_upsampling"))
    maxrss_mb = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / MB  # noqa: E731
    res.update(size=s, maxrss_before_mb=maxrss_mb(), cuda_peak_mb=None)
    times: list[float] = []
    phases: list[dict[str, float]] = []
    mm: list[float] = []  # median matmul GFLOP/s right after each iteration: the host's speed at that moment
    for _ in range(spec["warmup"] + spec["repeats"]):
        sync()
        pt: dict[str, float] = {}
        t0 = time.perf_counter()
        iteration(phase_times=pt)
        sync()
        times.append(time.perf_counter() - t0)
        phases.append(pt)
        mm.append(statistics.median(matmul_gflops(dtype)))
    res.update(maxrss_after_mb=maxrss_mb())
    res["peak_mb"] = res["maxrss_after_mb"] - res["maxrss_before_mb"]
    if cuda:
        res["cuda_peak_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    w = spec["warmup"]
    res.update(warmup_s=times[:w], times_s=times[w:], s_per_iter=statistics.median(times[w:]))
    res["it_per_s"] = 1.0 / res["s_per_iter"]
    res["phase_s"] = {p: statistics.median(t[p] for t in phases[w:]) for p in PHASES}

    # ---- FLOPs of one iteration (forward + backward), per phase ----------------------------------------------
    counters = {p: FlopCounterMode(display=False) for p in PHASES}
    iteration(phase_ctx=lambda phase: counters[phase])
    res["gflop_phase"] = {p: c.get_total_flops() / G for p, c in counters.items()}
    res["gflop_per_iter"] = sum(res["gflop_phase"].values())
    res["achieved_gflops"] = res["gflop_per_iter"] / res["s_per_iter"]

    res["matmul_dtype"] = str(dtype).removeprefix("torch.")
    res.update(matmul_gflops_after_each=mm[w:], matmul_gflops=statistics.median(mm[w:]))
    res["matmul_fp32_gflops"] = statistics.median(matmul_gflops(torch.float32))
    # per timed iteration, achieved / matmul measured just after it; the median of these paired ratios
    res["efficiency"] = statistics.median(res["gflop_per_iter"] / t / m for t, m in zip(times[w:], mm[w:]))
    res.update(threads=torch.get_num_threads(), torch=torch.__version__)
    return res


def _spawn(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one worker in a fresh interpreter; return its result, or {'error': ...}."""
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    before = load()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARK):
            return {**json.loads(line[len(MARK) :]), "load_before": before, "load_after": load()}
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {**spec, "error": f"worker exited {proc.returncode}: {tail}"}


def _machine(args: argparse.Namespace) -> dict[str, Any]:
    """benchmarks/machine.record() from a child process (torch stays out of this one)."""
    cmd = [sys.executable, __file__, "--machine", "--device", args.device, "--mm-size", str(args.mm_size)]
    proc = subprocess.run(
        cmd + (["--threads", str(args.threads)] if args.threads else []), capture_output=True, text=True
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARK):
            return json.loads(line[len(MARK) :])
    raise SystemExit(f"could not measure the machine: {(proc.stderr.strip().splitlines() or ['no output'])[-1]}")


def _table(runs: list[dict[str, Any]], cuda: bool) -> str:
    head = f"{'config':<10} {'B':>2} {'prec':<4} {'CL':<2} {'s/iter':>8} {'it/s':>7} {'peak_MB':>8} {'rss_MB':>7}"
    head += f" {'GFLOP':>7} {'GFLOP/s':>8} {'mm_GFLOP/s':>10} {'eff':>6} {'D/G/EH/EG s':>22}"
    rows = [head + f" {'cuda_MB':>8}" * cuda]
    for r in runs:
        name = f"{r['config']:<10} {r['batch_size']:>2} {r['precision']:<4} {'y' if r['channels_last'] else 'n':<2}"
        if "error" in r:
            rows.append(f"{name} ERROR {r['error']}")
            continue
        ph = "/".join(f"{v:.1f}" for v in r["phase_s"].values())
        row = f"{name} {r['s_per_iter']:>8.2f} {r['it_per_s']:>7.4f} {r['peak_mb']:>8.0f} {r['maxrss_after_mb']:>7.0f}"
        row += f" {r['gflop_per_iter']:>7.0f} {r['achieved_gflops']:>8.1f} {r['matmul_gflops']:>10.1f}"
        row += f" {r['efficiency']:>6.3f} {ph:>22}"
        rows.append(row + (f" {r['cuda_peak_mb']:>8.0f}" if cuda else ""))
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=None, help="config names or files (default paper_128)")
    ap.add_argument("--batch-size", type=int, default=2, help="volumes per iteration")
    ap.add_argument("--precisions", nargs="+", default=["fp32"], choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--channels-last", action="store_true", help="channels-last-3d model and batch")
    ap.add_argument(
        "--literal-upsampling", action="store_true", help="the reference's upsample-then-conv maths (baseline)"
    )
    ap.add_argument("--warmup", type=int, default=1, help="untimed iterations first (W)")
    ap.add_argument("--repeats", type=int, default=3, help="timed iterations (R; median reported)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--mm-size", type=int, default=2048, help="edge of the reference matmuls")
    ap.add_argument("--quick", action="store_true", help="smoke test: the tiny config, fp32 and bf16")
    ap.add_argument("--out", type=Path, default=None, help=f"JSON path (default {DEFAULT_OUT.name}, *_quick)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--machine", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(MARK + json.dumps(_worker(json.loads(args.worker))), flush=True)
        return 0
    if args.machine:  # the machine record, measured in a child so that this parent never imports torch
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        dtypes = ("fp32", "bf16", "fp16") if args.device.startswith("cuda") else ("fp32", "bf16")
        print(MARK + json.dumps(record(args.device, dtypes, args.mm_size)), flush=True)
        return 0
    if min(args.batch_size, args.repeats) < 1 or args.warmup < 0:
        ap.error("--batch-size and --repeats must be >= 1, --warmup >= 0")

    configs = args.configs or (["tiny"] if args.quick else ["paper_128"])
    precisions = ["fp32", "bf16"] if args.quick and args.precisions == ["fp32"] else args.precisions
    common = {"threads": args.threads, "device": args.device, "warmup": args.warmup, "repeats": args.repeats}
    common.update(batch_size=args.batch_size, channels_last=args.channels_last, mm_size=args.mm_size)
    common["literal_upsampling"] = args.literal_upsampling
    machine = _machine(args)
    runs = []
    for config in configs:
        for prec in precisions:
            print(f"{config} B={args.batch_size} {prec} ...", file=sys.stderr, flush=True)
            runs.append(_spawn({**common, "config": config, "overrides": [], "precision": prec}))
    body = {"warmup": args.warmup, "repeats": args.repeats, "quick": args.quick, "runs": runs}
    out = args.out or DEFAULT_OUT.with_stem(DEFAULT_OUT.stem + "_quick" * args.quick)
    write_result(out, "train_speed", machine, body)
    print(_table(runs, args.device.startswith("cuda")))
    print(f"wrote {out}")
    return 0 if all("error" not in r for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
