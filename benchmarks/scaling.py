"""How time and peak memory grow with the volume size and the batch, for train, generate and encode.

Per point (task, size S, batch B), in a fresh child process (``--worker``; the parent never imports torch, so
``ru_maxrss`` high-water marks never mix):

* ``train``    one ``train_step`` of what ``training.build.build`` makes, on a random batch (B, 1, S, S, S);
* ``generate`` ``model.generate(z)`` in one pass, z (B, L);
* ``encode``   ``model.encode(x)``, x (B, 1, S, S, S) uniform in [-1, 1].

``s`` is the median of ``--repeats`` timed calls after one warm-up; ``peak_mb`` the rise of the peak above the
high-water mark just after the model and inputs are built (``ru_maxrss``; CUDA: ``max_memory_allocated`` above the
post-build allocation), not the process's total; ``gflop`` is ``FlopCounterMode`` over one more call (train: forward
and backward of all four phases; the generator's phase-decomposed upsampling pads each phase by one voxel, and the
count includes it); ``efficiency`` is the achieved GFLOP/s over the matmul rate (``machine.matmul_gflops``)
measured in the same child right after. ``--precision``: train runs ``train.precision`` as training does; encode
runs ``HAGAN.encode(x, precision=...)`` (inference copies of the encoders, weights cast once, as ``hagan-clinic
encode`` runs) where the model offers it for that precision; otherwise, and for generate, autocast around the fp32
model. The JSON's ``settings.precision_paths`` and the table's notes say which.

Points run per task in increasing work (S^3 x B). A first child (``--plan``) records the machine and counts every
point's FLOPs on the ``meta`` device (no arithmetic, no memory); a point is then predicted from the last measured
point of its task (see :func:`predict`) and skipped (with its prediction) when over ``--budget-s`` per call or
``--max-mem-gb``; ``--force`` runs it anyway. A point above a failed one is skipped (with ``--force`` too: that
failure was measured, not predicted); a child that dies is recorded with its exit status and last stderr line, and
one whose resident memory passes ``--max-mem-gb`` is killed. The JSON and the table are rewritten after every point,
so a killed sweep keeps what it measured.

Analysis: per task and batch, the least-squares log-log slope of time against GFLOP and of the peak rise against
voxels, and the local slope between consecutive sizes; a local time slope above 1.15 (time grows faster than the
work) flags the point ``superlinear``. Per task and size, the slope of time against the batch.

    python benchmarks/scaling.py                 # paper_256, 64..512, batches 1 2 4 -> results/scaling.{json,md,png}
    python benchmarks/scaling.py --quick         # tiny config, 32 and 64, batches 1 2 -> results/scaling_quick.*

The analysis and the report (table, plot) are in scaling_report.py.
"""

from __future__ import annotations

import argparse
import inspect
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from hagan_clinic.io.files import write_text

from machine import RESULTS, cpu_model, load, write_result  # benchmarks/ is on sys.path; no torch
from scaling_report import TASKS, analyse, loglog_slope, markdown, num, plot

MARK = "SCALING_RESULT "
MB = 1024.0  # ru_maxrss and VmRSS are in KiB on Linux
#: below this peak rise (MB) a point's memory is allocator noise: its slope says nothing about larger points
MEMORY_SLOPE_FLOOR_MB = 200.0
ENCODE_PRECISIONS = ("fp32", "bf16")  # the precisions HAGAN.encode runs itself (as hagan-clinic encode does)


def _native_encode(precision: str) -> bool:
    """Whether ``HAGAN.encode`` runs ``precision`` itself (its ``precision`` argument), without autocast."""
    from hagan_clinic.models.hagan import HAGAN

    return precision in ENCODE_PRECISIONS and "precision" in inspect.signature(HAGAN.encode).parameters


def precision_path(task: str, precision: str, native_encode: bool) -> str:
    """How a ``task`` point runs ``precision`` (recorded in the JSON and the table's notes)."""
    if task == "train":
        return f"train_step with train.precision={precision}, as training runs it"
    if task == "encode" and native_encode:
        return (f"HAGAN.encode(x, precision='{precision}'): inference copies of the encoders, weights cast once, "
                "channels-last 3D, no autocast (as hagan-clinic encode runs it)")  # fmt: skip
    if precision == "fp32":
        return "the fp32 model, no autocast"
    return f"torch.autocast({precision}) around the fp32 model (weights stay fp32; not a shipped {task} path)"


# ---- the child: one point, or the plan ---------------------------------------------------------------------------
def _config(spec: dict[str, Any], size: int, batch: int, precision: str):
    from hagan_clinic.config import load_config

    sets = [f"model.size={size}", f"train.batch_size={batch}", f"train.precision={precision}"]
    return load_config(spec["config"], [*sets, *spec.get("overrides", [])])


def _setup(task: str, cfg, dev, precision: str):
    """The model and inputs of one point, and the call to time (no arguments)."""
    import torch

    from hagan_clinic.models.hagan import HAGAN
    from hagan_clinic.training.build import build
    from hagan_clinic.training.loop import autocast, train_only, train_step
    from hagan_clinic.training.losses import PHASES

    s, b, meta = cfg.model.size, cfg.train.batch_size, dev.type == "meta"
    gen = torch.Generator().manual_seed(cfg.seed)

    def volumes():  # (B, 1, S, S, S) in [-1, 1]; on meta only a shape, never 4 bytes a voxel on the host
        if meta:
            return torch.empty((b, 1, s, s, s), device=dev)
        return torch.rand((b, 1, s, s, s), generator=gen).mul_(2).sub_(1).to(dev)

    if task == "train":
        with torch.device(dev) if meta else nullcontext():  # on meta the weights are never materialised
            parts = build(cfg, dev)
        x = volumes()
        if not meta:
            return lambda: train_step(parts, x, None, gen)

        def step_on_meta() -> None:
            # train_step reads loss values on the host; on meta, the same phases' forward and backward
            inputs = parts.loss.draw(x, None, gen)
            for phase in PHASES:
                train_only(parts.model, phase)
                parts.loss.phase(phase, inputs)[0].backward()

        return step_on_meta
    with torch.device(dev) if meta else nullcontext():
        model = HAGAN.from_config(cfg).to(dev).eval()
    generate = task == "generate"
    inp = torch.randn((b, cfg.model.latent_dim), generator=gen).to(dev) if generate else volumes()
    if not generate and _native_encode(precision):
        make_copies = getattr(model, "inference_encoders", None)
        with torch.device(dev) if meta else nullcontext():
            if make_copies:  # made here, so the copies count in the build, not in the call's peak
                make_copies(precision)
        return lambda: model.encode(inp, precision=precision)
    fn: Callable[[torch.Tensor], torch.Tensor] = model.generate if generate else model.encode

    def call():
        with autocast(dev, precision):
            return fn(inp)

    return call


def _gflop(call) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        call()
    return counter.get_total_flops() / 1e9


def _plan(spec: dict[str, Any]) -> dict[str, Any]:
    """The machine, and every point's GFLOP counted on the meta device (None where counting failed)."""
    import torch

    from machine import record

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    dtypes = tuple(dict.fromkeys(("fp32", spec["precision"])))
    out: dict[str, Any] = {"machine": record(spec["device"], dtypes, spec["mm_size"]), "gflop": {}, "errors": {}}
    out["native_encode"] = _native_encode(spec["precision"])
    for task, size, batch in spec["points"]:
        try:  # FLOPs do not depend on the dtype: count in fp32 (an fp16 GradScaler has no meta device)
            cfg = _config(spec, size, batch, "fp32")
            out["gflop"][key(task, size, batch)] = _gflop(_setup(task, cfg, torch.device("meta"), "fp32"))
        except Exception as e:  # noqa: BLE001 - a point the planner cannot count is predicted by its work
            out["gflop"][key(task, size, batch)] = None
            out["errors"][key(task, size, batch)] = f"{type(e).__name__}: {e}"
    return out


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from hagan_clinic.devices import resolve_device

    from machine import matmul_gflops

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    dev, prec = resolve_device(spec["device"]), spec["precision"]
    cuda = dev.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(dev)) if cuda else (lambda: None)
    cfg = _config(spec, spec["size"], spec["batch"], prec)
    torch.manual_seed(cfg.seed)
    call = _setup(spec["task"], cfg, dev, prec)
    rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / MB  # noqa: E731
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    base_cuda = torch.cuda.memory_allocated(dev) / 2**20 if cuda else 0.0
    res: dict[str, Any] = {"base_mb": base_cuda if cuda else rss()}
    times = []
    for _ in range(1 + spec["repeats"]):  # the first is the warm-up
        sync()
        t0 = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - t0)
    res["peak_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20 - base_cuda if cuda else rss() - res["base_mb"]
    res.update(warmup_s=times[0], times_s=times[1:], s=statistics.median(times[1:]), maxrss_mb=rss())
    res["gflop"] = _gflop(call)
    res["gflops"] = res["gflop"] / res["s"]
    res["matmul_gflops"] = matmul_gflops(prec, str(dev), spec["mm_size"])
    res["efficiency"] = res["gflops"] / res["matmul_gflops"]
    res["threads"] = torch.get_num_threads()
    return res


# ---- the parent: children, budget ------------------------------------------------------------------------------
def key(task: str, size: int, batch: int) -> str:
    return f"{task}/{size}/{batch}"


def work(p: dict[str, Any]) -> int:
    """Voxels per call: S^3 x B."""
    return p["size"] ** 3 * p["batch"]


def _vmrss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return float(line.split()[1]) / MB
    except OSError:
        pass
    return 0.0


def _spawn(flag: str, spec: dict[str, Any], timeout_s: float, max_mb: float) -> dict[str, Any]:
    """Run a child; its result, or {'status': 'failed', 'reason': ...} when it dies, times out or outgrows max_mb."""
    proc = subprocess.Popen(
        [sys.executable, __file__, flag, json.dumps(spec)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    start, out, err, killed = time.monotonic(), "", "", ""
    while True:
        try:
            out, err = proc.communicate(timeout=0.5)
            break
        except subprocess.TimeoutExpired:
            if time.monotonic() - start > timeout_s:
                killed = f"killed after {timeout_s:.0f} s"
            elif _vmrss_mb(proc.pid) > max_mb:
                killed = f"killed at {max_mb / 1024:.1f} GB resident"
            if killed:
                proc.kill()
    for line in reversed(out.splitlines()):
        if line.startswith(MARK):
            return json.loads(line[len(MARK) :])
    tail = (err.strip().splitlines() or ["no output"])[-1]
    return {"status": "failed", "reason": killed or f"exit {proc.returncode}: {tail}"}


def predict(done: list[dict[str, Any]], point: dict[str, Any]) -> dict[str, Any] | None:
    """Time (s per call) and memory (GB, post-build resident + peak rise) of ``point`` from the measured points of
    its task with less work; None when there are none.

    Scaled from the largest: time by the FLOP ratio (``gflop_planned``; the work ratio where it is unknown) to the
    power of the last two points' local slope clamped to [1, 2] (fixed costs make small points grow slower than
    their work, and a superlinear trend is assumed to go on); the memory rise by the work ratio, to the power of
    that clamped local slope only when both points rose by more than ``MEMORY_SLOPE_FLOOR_MB`` (a smaller rise is
    allocator noise, whose slope would over-predict by up to the work ratio squared), else to the power 1."""
    ok = sorted(
        (p for p in done if p["task"] == point["task"] and p["status"] == "ok" and work(p) < work(point)), key=work
    )
    if not ok:
        return None
    last = ok[-1]
    flops = point.get("gflop_planned") and last.get("gflop")
    r_t = point["gflop_planned"] / last["gflop"] if flops else work(point) / work(last)
    e_t = e_m = 1.0
    if len(ok) > 1:
        prev = ok[-2]
        e_t = min(2.0, max(1.0, loglog_slope([prev["gflop"], last["gflop"]], [prev["s"], last["s"]]) or 1.0))
        if min(prev["peak_mb"], last["peak_mb"]) > MEMORY_SLOPE_FLOOR_MB:
            slope = loglog_slope([work(prev), work(last)], [prev["peak_mb"], last["peak_mb"]])
            e_m = min(2.0, max(1.0, slope or 1.0))
    mem_mb = last["base_mb"] + max(last["peak_mb"], 0.0) * (work(point) / work(last)) ** e_m
    return {"s": last["s"] * r_t**e_t, "mem_gb": mem_mb / 1024, "from": [last["size"], last["batch"]]}


def over_budget(pred: dict[str, Any] | None, budget_s: float, max_mem_gb: float) -> str | None:
    """Why a point with prediction ``pred`` is not run, or None to run it."""
    if pred is None:
        return None
    if pred["s"] > budget_s:
        return f"predicted {num(pred['s'])} s > budget {budget_s:g} s"
    if pred["mem_gb"] > max_mem_gb:
        return f"predicted {pred['mem_gb']:.1f} GB > limit {max_mem_gb:g} GB"
    return None


# ---- main --------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help="volume edges (default 64 128 256 512)")
    ap.add_argument("--batches", type=int, nargs="+", default=None, help="batch sizes (default 1 2 4)")
    ap.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    ap.add_argument("--config", default=None, help="config name or file (default paper_256); size set per point")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra config override key=value")
    ap.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per point after one warm-up (default 2)")
    ap.add_argument("--budget-s", type=float, default=120.0, help="skip a point predicted slower per call")
    ap.add_argument("--max-mem-gb", type=float, default=18.0, help="skip a point predicted larger; kill past it")
    ap.add_argument("--force", action="store_true", help="run the points the predictions would skip (the kill stays)")
    ap.add_argument("--mm-size", type=int, default=None, help="edge of the reference matmuls (default 2048)")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    ap.add_argument("--quick", action="store_true", help="tiny config, sizes 32 64, batches 1 2, one repeat")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--plan", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker or args.plan:
        print(MARK + json.dumps(_worker(json.loads(args.worker)) if args.worker else _plan(json.loads(args.plan))))
        return 0
    q = args.quick
    sizes = args.sizes or ([32, 64] if q else [64, 128, 256, 512])
    batches = args.batches or ([1, 2] if q else [1, 2, 4])
    repeats = args.repeats or (1 if q else 2)
    if min(batches) < 1 or repeats < 1:
        ap.error("--batches and --repeats must be >= 1")
    common = {"config": args.config or ("tiny" if q else "paper_256"), "overrides": args.overrides}
    common.update(precision=args.precision, device=args.device, threads=args.threads, repeats=repeats)
    common["mm_size"] = args.mm_size or (512 if q else 2048)
    stem = args.out_dir / ("scaling_quick" if q else "scaling")
    json_path, md_path, png_path = (stem.with_suffix(s) for s in (".json", ".md", ".png"))
    max_mb = args.max_mem_gb * 1024
    child_timeout = args.budget_s * (repeats + 2) * 3 + 300  # warm-up, repeats and the FLOP count, with slack

    order = sorted(
        ((t, s, b) for t in args.tasks for s in sizes for b in batches),
        key=lambda p: (args.tasks.index(p[0]), p[1] ** 3 * p[2], p[1]),
    )
    print(f"planning {len(order)} points ...", file=sys.stderr, flush=True)
    plan = _spawn("--plan", {**common, "points": order}, child_timeout, max_mb)
    machine = plan.get("machine") or {"cpu": cpu_model(), "load": load(), "plan_error": plan.get("reason")}
    settings = {**common, "sizes": sizes, "batches": batches, "tasks": args.tasks, "quick": q}
    settings.update(budget_s=args.budget_s, max_mem_gb=args.max_mem_gb, force=args.force)
    native = plan.get("native_encode")  # asked of the planner: the parent stays without torch
    settings["precision_paths"] = {
        t: "unknown (the planner failed)" if native is None else precision_path(t, args.precision, native)
        for t in args.tasks
    }
    settings["planner_errors"] = plan.get("errors", {})
    points: list[dict[str, Any]] = []
    for task, size, batch in order:
        p: dict[str, Any] = {"task": task, "size": size, "batch": batch, "voxels": size**3}
        p["gflop_planned"] = plan.get("gflop", {}).get(key(task, size, batch))
        failed = [d for d in points if d["task"] == task and d["status"] == "failed" and work(d) <= work(p)]
        p["prediction"] = predict(points, p)
        reason = None if args.force else over_budget(p["prediction"], args.budget_s, args.max_mem_gb)
        if failed:
            reason = f"a smaller point ({failed[0]['size']}^3 x{failed[0]['batch']}) failed"
        print(f"{task} {size}^3 x{batch} ...", file=sys.stderr, flush=True)
        if reason:
            p.update(status="skipped", reason=reason)
        else:
            before = load()
            got = _spawn("--worker", {**common, "task": task, "size": size, "batch": batch}, child_timeout, max_mb)
            p.update({"status": "ok", **got, "load_before": before, "load_after": load()})
        points.append(p)
        summary = f"{p.get('s', 0):.3g} s, {p.get('peak_mb', 0):.0f} MB" if p["status"] == "ok" else p["reason"]
        print(f"  {p['status']}: {summary}", file=sys.stderr, flush=True)
        analysis = analyse(points)
        write_result(json_path, "scaling", machine, {"settings": settings, "points": points, "analysis": analysis})
        write_text(md_path, markdown(points, analysis, machine, settings))  # the plot waits for the end
    analysis = analyse(points)
    md = markdown(points, analysis, {**machine, "load_end": load()}, settings)
    write_text(md_path, md)
    plot(points, png_path)
    print(md, end="")
    print(f"wrote {json_path}, {md_path.name}, {png_path.name}")
    return 1 if any(p["status"] == "failed" for p in points) else 0


if __name__ == "__main__":
    sys.exit(main())
