"""Benchmark HA-GAN whole-volume generation and encoding: time and peak memory, written to JSON.

What is measured, per output size S (paper configs, fp32, batch 1):

* ``one_pass``   ``model.generate(z)``: G^H over the whole feature map, phase-decomposed UpConv3d (default);
* ``slab_k``     ``model.generate(z, slab=k)``: G^H k feature slices at a time, for each k of ``--slabs``;
* ``reference``  one pass with ``phase_decomposed = False`` on every UpConv3d, i.e. the reference's literal
  nearest-upsample-then-conv3 maths, as the side-by-side baseline;
* ``encode``     ``model.encode(x)`` for a random volume x in [-1, 1].

How: every mode runs in its own child process (``--worker``), so that ``ru_maxrss`` high-water marks never
mix. The child builds ``HAGAN.from_config(cfg).eval()``, reads ``ru_maxrss`` (baseline after model build),
runs one warm-up and R timed repeats under ``torch.no_grad`` (median reported; CUDA synchronised around each
call) and reads ``ru_maxrss`` again: ``peak_mb`` = after - before. ``VmRSS``/``VmHWM`` from /proc are kept as a
cross-check, and on CUDA ``torch.cuda.max_memory_allocated`` above the post-build allocation. Only after these
readings does a slab or reference child compute the default one-pass output (max abs difference recorded) and
time R adjacent (mode, one-pass) pairs in the same process: ``paired_time_ratio``, the median pair ratio, is
robust to load that drifts between children on a shared host. The parent never imports torch: Linux carries
a parent's ``ru_maxrss`` into its exec'd children, so a heavy parent would raise every child's baseline.
Parameter counts per block come from ``parameter_table`` for paper_128 and paper_256.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "model_bench.json"
CONFIGS = Path(__file__).resolve().parent.parent / "configs"
MARK = "MODEL_BENCH_RESULT "
MB = 1024.0  # ru_maxrss and /proc figures are in KiB on Linux


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / MB


def _proc_mb(key: str) -> float | None:
    """VmRSS (resident now) or VmHWM (this process's own peak) from /proc/self/status, in MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / MB
    except OSError:
        pass
    return None


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from hagan_clinic.config import load_config
    from hagan_clinic.models.hagan import HAGAN, parameter_table
    from hagan_clinic.models.layers import UpConv3d

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    if spec["task"] == "info":
        params = {n: parameter_table(HAGAN.from_config(load_config(n))) for n in ("paper_128", "paper_256")}
        host = {
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": spec["device"],
            "python": platform.python_version(),
            "machine": platform.machine(),
        }
        if spec["device"].startswith("cuda"):
            host["cuda_device"] = torch.cuda.get_device_name(torch.device(spec["device"]))
        return {"host": host, "parameters": params}

    dev = torch.device(spec["device"])
    cuda = dev.type == "cuda"
    cfg = load_config(spec["config"], spec["overrides"])
    model = HAGAN.from_config(cfg).eval().to(dev)
    upconvs = [m for m in model.modules() if isinstance(m, UpConv3d)]
    mode, slab = spec["mode"], spec.get("slab")

    def literal(on: bool) -> None:  # the reference's maths on every UpConv3d, or ours
        for m in upconvs:
            m.phase_decomposed = not on

    def timed(f: Callable[[], Any]) -> tuple[float, Any]:
        if cuda:
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        y = f()
        if cuda:
            torch.cuda.synchronize(dev)
        return time.perf_counter() - t0, y

    literal(mode == "reference")
    s, gen = cfg.model.size, torch.Generator().manual_seed(1)
    z = torch.randn((1, cfg.model.latent_dim), generator=gen).to(dev)
    if mode == "encode":
        run = partial(model.encode, torch.rand((1, 1, s, s, s), generator=gen).mul_(2).sub_(1).to(dev))
    else:
        run = partial(model.generate, z, slab=slab)
    if cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    res: dict[str, Any] = {"config": spec["config"], "overrides": spec["overrides"], "mode": mode, "slab": slab}
    res.update(maxrss_before_mb=_maxrss_mb(), rss_before_mb=_proc_mb("VmRSS"), cuda_before_mb=None)
    if cuda:
        res["cuda_before_mb"] = torch.cuda.memory_allocated(dev) / 2**20
    times: list[float] = []
    out: Any = None
    with torch.no_grad():
        for _ in range(spec["repeats"] + 1):  # the first call is the warm-up
            out = None  # do not hold the previous output through the next call
            t, out = timed(run)
            times.append(t)
        res.update(maxrss_after_mb=_maxrss_mb(), hwm_after_mb=_proc_mb("VmHWM"), cuda_peak_mb=None)
        if cuda:
            res["cuda_peak_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20 - res["cuda_before_mb"]
        res.update(output_shape=list(out.shape), peak_mb=res["maxrss_after_mb"] - res["maxrss_before_mb"])
        if mode in ("reference", "slab"):  # after the memory readings: sanity check, then A/B timing pairs
            literal(False)
            res["max_abs_diff_vs_one_pass"] = (out - model.generate(z)).abs().max().item()
            out, pairs = None, []
            for _ in range(spec["repeats"]):
                literal(mode == "reference")
                t_mode = timed(run)[0]
                literal(False)
                pairs.append(t_mode / timed(partial(model.generate, z))[0])
            res["paired_time_ratio"] = statistics.median(pairs)
            res["paired_time_ratios"] = pairs
    res.update(warmup_s=times[0], times_s=times[1:], time_s=statistics.median(times[1:]))
    if res["hwm_after_mb"] is not None and res["rss_before_mb"] is not None:
        res["peak_over_rss_mb"] = res["hwm_after_mb"] - res["rss_before_mb"]
    return res


def _spawn(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one worker in a fresh interpreter; return its result, or {'error': ...}."""
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARK):
            return json.loads(line[len(MARK) :])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"worker exited {proc.returncode}: {tail}"}


def _ratio(a: dict[str, Any], b: dict[str, Any], key: str) -> float | None:
    x, y = a.get(key), b.get(key)
    return None if x is None or y is None or y <= 0 else x / y


def _ratios(modes: dict[str, dict[str, Any]], slabs: list[int]) -> dict[str, float | None]:
    ours, out = modes["one_pass"], {}
    keys = [("time_s", "time"), ("peak_mb", "peak"), ("cuda_peak_mb", "cuda_peak")]
    for name in [f"slab_{k}" for k in slabs] + ["reference"]:
        for key, short in keys:
            if ours.get(key) is not None:
                out[f"{name}_{short} / one_pass_{short}"] = _ratio(modes[name], ours, key)
        out[f"{name}_time / one_pass_time (paired, same process)"] = modes[name].get("paired_time_ratio")
    return out


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _table(results: dict[str, Any], cuda: bool) -> str:
    head = f"{'size':>5} {'mode':<10} {'time_s':>8} {'peak_MB':>8} {'t/ours':>7} {'t/ours_AB':>9} {'peak/ours':>9}"
    head += f" {'cuda_MB':>8}" * cuda + f" {'max|diff|':>10}"
    rows = [head]
    for size, r in results.items():
        ours = r["modes"]["one_pass"]
        for name, m in r["modes"].items():
            if "error" in m:
                rows.append(f"{size:>5} {name:<10} ERROR {m['error']}")
                continue
            t = _ratio(m, ours, "time_s") if name != "encode" else None
            p = _ratio(m, ours, "peak_mb") if name != "encode" else None
            row = f"{size:>5} {name:<10} {m['time_s']:>8.3f} {m['peak_mb']:>8.0f} {_fmt(t, '.2f'):>7} "
            row += f"{_fmt(m.get('paired_time_ratio'), '.2f'):>9} "
            row += f"{_fmt(p, '.2f'):>9}" + (f" {_fmt(m.get('cuda_peak_mb'), '.0f'):>8}" if cuda else "")
            rows.append(row + f" {_fmt(m.get('max_abs_diff_vs_one_pass'), '.2e'):>10}")
    return "\n".join(rows)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=path.name + ".", suffix=".tmp", delete=False) as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.chmod(f.name, 0o644)  # NamedTemporaryFile creates 0600
    os.replace(f.name, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help="output sizes (default 128 256)")
    ap.add_argument("--slabs", type=int, nargs="+", default=[4, 8], help="slab widths k in feature slices")
    ap.add_argument("--repeats", type=int, default=2, help="timed repeats after one warm-up (median)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--quick", action="store_true", help="smoke test: sizes 64 128, tiny widths")
    ap.add_argument("--out", type=Path, default=None, help=f"JSON path (default {DEFAULT_OUT.name}, *_quick)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(MARK + json.dumps(_worker(json.loads(args.worker))), flush=True)
        return 0

    sizes = args.sizes or ([64, 128] if args.quick else [128, 256])
    common = {"threads": args.threads, "device": args.device, "repeats": args.repeats}
    info = _spawn({**common, "task": "info"})
    if "error" in info:
        print(f"info worker failed: {info['error']}", file=sys.stderr)
        return 1
    results: dict[str, Any] = {}
    for s in sizes:
        config, overrides = f"paper_{s}", []
        if args.quick or not (CONFIGS / f"{config}.yaml").exists():  # other sizes: base widths at size s
            config, overrides = ("tiny" if args.quick else "base"), [f"model.size={s}"]
        modes = [("one_pass", None), *[(f"slab_{k}", k) for k in args.slabs], ("reference", None)]
        modes.append(("encode", None))
        runs: dict[str, dict[str, Any]] = {}
        for name, k in modes:
            print(f"size {s}: {name} ...", file=sys.stderr, flush=True)
            spec = {"task": "run", "config": config, "overrides": overrides, "slab": k}
            runs[name] = _spawn({**common, **spec, "mode": "slab" if k is not None else name})
        ratios = _ratios(runs, args.slabs)
        results[str(s)] = {"config": config, "overrides": overrides, "modes": runs, "ratios": ratios}
    data = {
        "benchmark": "model_bench",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv[1:] if argv is None else argv,
        "repeats": args.repeats,
        "slabs": args.slabs,
        "quick": args.quick,
        **info,
        "results": results,
    }
    out = args.out or DEFAULT_OUT.with_stem(DEFAULT_OUT.stem + "_quick" * args.quick)
    _write_json(out, data)
    print(_table(results, args.device.startswith("cuda")))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
