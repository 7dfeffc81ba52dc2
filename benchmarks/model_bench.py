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
Parameter counts per block come from ``parameter_table`` for paper_128 and paper_256, and per size from the
model each child builds (``parameters``). Sizes without a ``paper_S`` config (64, 512) use ``base`` with
``model.size=S``: the published widths (a third G^H stage at 512).

The machine (host, threads, OMP settings, load, fp32 and bf16 matmul rates: ``machine.record``) is measured first,
by the child that counts parameters, so that the parent still never imports torch; the JSON's header (benchmark,
created, argv, machine with ``load_end``) is ``machine.write_result``'s.

Options for large sizes: ``--modes`` picks which of one_pass / slab / reference / encode run (default all);
``--max-mb`` kills a child whose resident memory (VmRSS of the child, polled by the parent) passes that many MB
and records it as skipped; when one_pass was skipped or failed, slab children do not compare against it (no
``max_abs_diff_vs_one_pass`` or paired ratios); ``--timeout`` bounds each child's wall time. ``--merge`` combines
the ``results`` of earlier JSON files into one (later files win per size and mode); ``--md`` writes a
markdown table (size, mode, G parameters, peak MB, time, max abs diff).
"""

from __future__ import annotations

import argparse
import json
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

from hagan_clinic.config import CONFIG_DIR  # no torch: the parent process stays light (see above)
from hagan_clinic.io.files import write_json, write_text

from machine import load, record, write_result  # benchmarks/ is on sys.path when a script here runs; no torch

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "model_bench.json"
MARK = "MODEL_BENCH_RESULT "
MB = 1024.0  # ru_maxrss and /proc figures are in KiB on Linux
MODES = ("one_pass", "slab", "reference", "encode")


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
    from hagan_clinic.devices import resolve_device
    from hagan_clinic.models.hagan import HAGAN, parameter_table
    from hagan_clinic.models.layers import UpConv3d

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    if spec["task"] == "info":
        # the machine first: its load is the load at the start of the benchmark, its matmul rate the one the
        # measured times are read against (threads as the timing children will have them)
        host = record(str(resolve_device(spec["device"])))
        params = {n: parameter_table(HAGAN.from_config(load_config(n))) for n in ("paper_128", "paper_256")}
        return {"machine": host, "parameters": params}

    dev = resolve_device(spec["device"])
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
    res["parameters"] = parameter_table(model)
    res["loadavg_before"] = load()["loadavg"]
    res["high_stages"] = len(model.G.high.stages)
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
        # after the memory readings: sanity check, then A/B timing pairs (unless one pass is known not to fit)
        if mode in ("reference", "slab") and spec.get("compare", True):
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
    res.update(
        warmup_s=times[0], times_s=times[1:], time_s=statistics.median(times[1:]), loadavg_after=load()["loadavg"]
    )
    if res["hwm_after_mb"] is not None and res["rss_before_mb"] is not None:
        res["peak_over_rss_mb"] = res["hwm_after_mb"] - res["rss_before_mb"]
    return res


def _child_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / MB
    except (OSError, ValueError):
        pass
    return None


def _spawn(spec: dict[str, Any], max_mb: float | None = None, timeout: float | None = None) -> dict[str, Any]:
    """Run one worker in a fresh interpreter; return its result, or {'error': ...} ({'skipped': ...} too if
    the parent killed it for passing ``max_mb`` of resident memory or ``timeout`` seconds)."""
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    if max_mb is None and timeout is None:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        stdout, stderr, rc, killed = proc.stdout, proc.stderr, proc.returncode, None
    else:  # poll the child's VmRSS; outputs go to files so that a full pipe never blocks the child
        with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
            child = subprocess.Popen(cmd, stdout=fo, stderr=fe, text=True)
            t0, polled, killed = time.monotonic(), 0.0, None
            while child.poll() is None:
                rss = _child_rss_mb(child.pid) or 0.0
                polled = max(polled, rss)
                if max_mb is not None and rss > max_mb:
                    killed = f"resident memory passed --max-mb {max_mb:.0f} MB ({rss:.0f} MB)"
                elif timeout is not None and time.monotonic() - t0 > timeout:
                    killed = f"ran past --timeout {timeout:.0f} s"
                if killed:
                    child.kill()
                    child.wait()
                    break
                time.sleep(0.02)
            rc = child.returncode
            fo.seek(0)
            fe.seek(0)
            stdout, stderr = fo.read(), fe.read()
        if killed:
            msg = f"killed after {time.monotonic() - t0:.1f} s: {killed}; max polled VmRSS {polled:.0f} MB"
            return {"error": msg, "skipped": msg}
    for line in reversed(stdout.splitlines()):
        if line.startswith(MARK):
            return json.loads(line[len(MARK) :])
    tail = (stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"worker exited {rc}: {tail}"}


def _ratio(a: dict[str, Any], b: dict[str, Any], key: str) -> float | None:
    x, y = a.get(key), b.get(key)
    return None if x is None or y is None or y <= 0 else x / y


def _ratios(modes: dict[str, dict[str, Any]], slabs: list[int]) -> dict[str, float | None]:
    ours, out = modes.get("one_pass", {}), {}
    keys = [("time_s", "time"), ("peak_mb", "peak"), ("cuda_peak_mb", "cuda_peak")]
    for name in [n for n in [f"slab_{k}" for k in slabs] + ["reference"] if n in modes]:
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
        ours = r["modes"].get("one_pass", {})
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


def _g_parameters(r: dict[str, Any]) -> int | None:
    return next((m["parameters"]["G"] for m in r["modes"].values() if "parameters" in m), None)


def _mode_order(item: tuple[str, dict[str, Any]]) -> tuple[int, int]:
    name, m = item
    rank = {"one_pass": 0, "reference": 2, "encode": 3}.get(name, 1)
    return rank, (m.get("slab") or int(name.rpartition("_")[2])) if rank == 1 else 0


def _markdown(results: dict[str, Any]) -> str:
    """Markdown table: size, mode, G parameters, peak memory above the loaded model, time, max abs diff."""
    rows = [
        "| size | mode | G parameters | peak memory above loaded model (MB) | time per volume (s) "
        "| max abs diff vs one pass |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for size, r in sorted(results.items(), key=lambda kv: int(kv[0])):
        g = _g_parameters(r)
        g_txt = "-" if g is None else f"{g:,} ({g / 1e6:.2f}M)"
        for name, m in sorted(r["modes"].items(), key=_mode_order):
            label = "one pass" if name == "one_pass" else name.replace("_", " ")
            if m.get("slab") is not None and m.get("high_stages") is not None:
                label += f" ({m['slab'] * 2 ** m['high_stages']} output slices)"
            cube = f"{size}^3"
            if "error" in m:
                why = m.get("skipped") or m["error"]
                rows.append(f"| {cube} | {label} | {g_txt} | not run: {why} | - | - |")
                continue
            t = m["time_s"]
            n = len(m["times_s"])
            t_txt = f"{t:.2f}" + (f" (median of {n})" if n > 1 else "")
            d = m.get("max_abs_diff_vs_one_pass")
            rows.append(f"| {cube} | {label} | {g_txt} | {m['peak_mb']:.0f} | {t_txt} | {_fmt(d, '.1e')} |")
    return "\n".join(rows) + "\n"


def _merge(paths: list[Path], argv: list[str]) -> dict[str, Any]:
    """One result document from several: ``results`` merged per size and mode, later files winning. The header
    is this command's (``argv``) with the first file's machine; every source keeps its own machine, since the
    runs merged may come from different moments or hosts."""
    docs = [json.loads(p.read_text()) for p in paths]
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    data: dict[str, Any] = {"benchmark": "model_bench", "created": created, "argv": argv}
    skip = ("results", "argv", "created", "repeats", "slabs", "benchmark")
    data.update({k: v for k, v in docs[0].items() if k not in skip})
    keys = ("created", "argv", "repeats", "slabs", "max_mb", "modes", "machine")
    data["sources"] = [{"file": str(p), **{k: d.get(k) for k in keys}} for p, d in zip(paths, docs)]
    results: dict[str, Any] = {}
    for d in docs:
        for size, r in d["results"].items():
            into = results.setdefault(size, {"config": r["config"], "overrides": r["overrides"], "modes": {}})
            into["modes"].update(r["modes"])
    for r in results.values():
        slabs = sorted(m["slab"] for m in r["modes"].values() if m.get("slab") is not None)
        r["modes"] = dict(sorted(r["modes"].items(), key=_mode_order))
        r["g_parameters"] = _g_parameters(r)
        r["ratios"] = _ratios(r["modes"], slabs)
    data["results"] = dict(sorted(results.items(), key=lambda kv: int(kv[0])))
    return data


def _argv(argv: list[str] | None) -> list[str]:
    """The command line as run: this script and its arguments (``argv`` when main is called with them)."""
    return list(sys.argv) if argv is None else [__file__, *argv]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help="output sizes (default 128 256)")
    ap.add_argument("--slabs", type=int, nargs="+", default=[4, 8], help="slab widths k in feature slices")
    ap.add_argument("--repeats", type=int, default=2, help="timed repeats after one warm-up (median)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--quick", action="store_true", help="smoke test: sizes 64 128, tiny widths")
    ap.add_argument("--out", type=Path, default=None, help=f"JSON path (default {DEFAULT_OUT.name}, *_quick)")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="which modes run (default all)")
    ap.add_argument("--max-mb", type=float, default=None, help="kill a child whose VmRSS (model in) passes this MB")
    ap.add_argument("--timeout", type=float, default=None, help="kill a child past this many seconds")
    ap.add_argument("--merge", type=Path, nargs="+", default=None, help="merge these result JSONs (no runs)")
    ap.add_argument("--md", type=Path, default=None, help="also write a markdown table of the results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(MARK + json.dumps(_worker(json.loads(args.worker))), flush=True)
        return 0
    if args.merge:
        if args.out is None:
            ap.error("--merge needs --out")
        data = _merge(args.merge, _argv(argv))
        write_json(args.out, data, sort_keys=False)
        print(_table(data["results"], False))
        print(f"wrote {args.out}")
        if args.md:
            write_text(args.md, _markdown(data["results"]))
            print(f"wrote {args.md}")
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
        if args.quick or not (CONFIG_DIR / f"{config}.yaml").exists():  # other sizes: base widths at size s
            config, overrides = ("tiny" if args.quick else "base"), [f"model.size={s}"]
        modes = [("one_pass", None), *[(f"slab_{k}", k) for k in args.slabs], ("reference", None)]
        modes.append(("encode", None))
        runs: dict[str, dict[str, Any]] = {}
        for name, k in modes:
            if ("slab" if k is not None else name) not in args.modes:
                continue
            print(f"size {s}: {name} ...", file=sys.stderr, flush=True)
            # compare with one pass unless one pass ran here and failed or was skipped (it would not fit)
            spec = {"task": "run", "config": config, "overrides": overrides, "slab": k}
            spec["compare"] = "error" not in runs.get("one_pass", {})
            spec["mode"] = "slab" if k is not None else name
            runs[name] = _spawn({**common, **spec}, args.max_mb, args.timeout)
        ratios = _ratios(runs, args.slabs)
        results[str(s)] = {"config": config, "overrides": overrides, "modes": runs, "ratios": ratios}
    body = {
        "argv": _argv(argv),
        "repeats": args.repeats,
        "slabs": args.slabs,
        "quick": args.quick,
        "modes": args.modes,
        "max_mb": args.max_mb,
        "timeout": args.timeout,
        "parameters": info["parameters"],
        "results": results,
    }
    out = args.out or DEFAULT_OUT.with_stem(DEFAULT_OUT.stem + "_quick" * args.quick)
    write_result(out, "model_bench", info["machine"], body)
    print(_table(results, args.device.startswith("cuda")))
    print(f"wrote {out}")
    if args.md:
        write_text(args.md, _markdown(results))
        print(f"wrote {args.md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
