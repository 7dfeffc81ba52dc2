"""The GPU check: one unattended command that tells whether the model, its training and its cohort workflows run
right and how fast on a GPU, written to benchmarks/results/gpu_check.json.

    python benchmarks/gpu_check.py [--device cuda] [--out PATH] [--quick] [--budget 480]

Sections, in order (each one's failure is recorded as one line and the rest still run):

1. parity: one seeded model, the same weights on the CPU and on the device; generate(z) and encode(x) on both,
   fp32 with TF32 off: the largest absolute difference and the correlation of the outputs.
2. train: ``train_step`` of what ``training.build.build`` makes, at 128^3 and 256^3 (paper_128 / paper_256),
   batch 2, in fp32, bf16 and fp16: s/iter (median of the timed iterations after one warm-up), it/s, peak memory,
   whether every loss was finite, GFLOP per step (``FlopCounterMode`` over the warm-up step) and the efficiency:
   achieved GFLOP/s over the matmul rate of the row's dtype measured at the start. Next to the paper's 5961 MB at
   256^3: the paper's figure, at its own settings, not measured here.
3. slab: generating one 512^3 volume ``k`` feature slices at a time (k = 1, 4), fp32 and bf16 weights: time, peak
   memory, shape, value range; and that both k give the same volume (compared on the CPU: the k = 1 volume is
   moved off the device, so that it is not in the k = 4 row's peak).
4. encode: ``hagan-clinic encode`` of a phantom DICOM cohort with an untrained paper_256 checkpoint, fp32 and bf16,
   each after a warm-up encode of one series at its own precision: series/min end to end and of the encoder alone,
   and how far the bf16 features are from the fp32 ones.
5. torchrun: a one-process ``torchrun ... hagan_clinic.cli train`` of the tiny config; ok when it exits 0 and
   writes its final state.

Peak memory is ``torch.cuda.max_memory_allocated`` on a GPU (with ``max_memory_reserved``, what the allocator held),
and on the CPU the rise of the process's ``ru_maxrss`` high-water mark (0 when an earlier section already peaked
higher). The matmul rates are of one n x n matmul, n = 8192 on a GPU (a smaller one is bound by its launch, not the
arithmetic) and 2048 on a CPU (512 with ``--quick``). TF32: torch's defaults stand outside the parity section, so
the fp32 matmul rate is true fp32 (TF32 matmuls off) while cuDNN's fp32 convolutions in training may use TF32 (on):
on a GPU with TF32 an fp32 row's efficiency can exceed what true fp32 reaches; each train row records both flags.

The JSON is rewritten after every row, so a killed run leaves what it finished. Each section may use its share of
``--budget`` plus what earlier sections left; a row whose estimated cost would overrun that is skipped, with the
reason. ``--quick`` shrinks every section (the tiny config, 32^3-64^3, two timed iterations) to test the script on
a CPU in about a minute.
Exit status: 0 when every section is ok or skipped, 1 when one failed, 2 when the device is not there, is MPS (its
timings are not synchronised) or fails its first matmuls (the JSON then holds the error).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hagan_clinic.config import Config, load_config
from hagan_clinic.devices import resolve_device, torch_dtype, usable_cores
from hagan_clinic.errors import HaganError, describe, one_line
from hagan_clinic.models.hagan import HAGAN

from gpu_check_report import row_name, table
from machine import RESULTS, agreement, record, write_result

SECTIONS = ("parity", "train", "slab", "encode", "torchrun")
#: each section's share of the budget; a section may also spend what the ones before it left
SHARES = {"parity": 0.05, "train": 0.45, "slab": 0.15, "encode": 0.2, "torchrun": 0.15}
PRECISIONS = ("fp32", "bf16", "fp16")
PAPER_REFERENCE = {"size": 256, "mb": 5961, "note": "the paper's figure, at its own settings; not measured here"}
PARITY_TOLERANCE = 1e-3  # fp32 without TF32: kernels differ only in summation order, far below this
BATCH = 2


@dataclass
class Check:
    """The run's settings, its clock and the results so far (written to ``out`` after every row)."""

    device: torch.device
    device_name: str
    quick: bool
    budget_s: float
    out: Path
    work: Path
    machine: dict[str, Any]
    header: dict[str, Any]
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    start: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def over_budget(self, section: str, estimate_s: float) -> str | None:
        """Why a step estimated at ``estimate_s`` must be skipped, or None when it fits in ``section``'s share."""
        names = SECTIONS[: SECTIONS.index(section) + 1]
        deadline = self.budget_s * sum(SHARES[n] for n in names)
        if self.elapsed() + estimate_s > deadline:
            return (f"estimated {estimate_s:.0f} s at {self.elapsed():.0f} s would pass the {deadline:.0f} s that "
                    f"the budget of {self.budget_s:.0f} s gives up to the end of this section")  # fmt: skip
        return None

    def save(self) -> None:
        body = {**self.header, "elapsed_s": round(self.elapsed(), 2), "sections": self.sections}
        write_result(self.out, "gpu_check", self.machine, body)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@contextlib.contextmanager
def peak_memory(check: Check) -> Iterator[dict[str, Any]]:
    """Peak memory of the block, in MB, into the yielded dict: the CUDA allocator's peak on a GPU (the block's own,
    from a reset), the process's ru_maxrss rise on the CPU."""
    cuda = check.device.type == "cuda"
    reading: dict[str, Any] = {"peak_kind": "cuda_max_memory_allocated" if cuda else "cpu_ru_maxrss_rise"}
    check.sync()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(check.device)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    yield reading
    check.sync()
    if cuda:
        reading["peak_mb"] = round(torch.cuda.max_memory_allocated(check.device) / 2**20, 1)
        reading["reserved_mb"] = round(torch.cuda.max_memory_reserved(check.device) / 2**20, 1)
    else:
        reading["peak_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before, 1)


def compare(ref: torch.Tensor, got: torch.Tensor) -> dict[str, Any]:
    """machine.agreement of two outputs, compared in float64 on the CPU."""
    return agreement(ref.detach().cpu().double().numpy(), got.detach().cpu().double().numpy())


def attempt(check: Check, row: dict[str, Any], work: Callable[[], dict[str, Any]]) -> None:
    """One row: its figures with status ok, or status error in one line (out of memory, fp16 on a CPU without it);
    then the file is rewritten. The row's tensors die with ``work``'s frame, before the next row."""
    try:
        row.update(status="ok", **work())
    except Exception as err:  # that row's failure; the others still run
        row.update(status="error", error=describe(err))
    check.save()


def matmul_size(device: torch.device, quick: bool) -> int:
    """The edge of the reference matmuls: 8192 on a GPU (one 2048^2 matmul is bound by its launch, which would
    understate the rate and inflate every efficiency), 2048 on a CPU, 512 for a quick CPU run."""
    return 8192 if device.type == "cuda" else 512 if quick else 2048


# ---------------------------------------------------------------- 1. parity
def parity(check: Check, res: dict[str, Any]) -> None:
    name, overrides = ("tiny", []) if check.quick else ("paper_256", ["model.size=64"])
    cfg = load_config(name, overrides)
    cuda = check.device.type == "cuda"
    res.update(config=name, overrides=overrides, batch=BATCH, tolerance=PARITY_TOLERANCE)
    res["tf32"] = "off for this section (matmul and cuDNN)" if cuda else "not applicable on the CPU"
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # TF32 would hide real drift
    try:
        on_cpu = HAGAN.from_config(cfg).eval()
        on_device = copy.deepcopy(on_cpu).to(check.device)
        gen = torch.Generator().manual_seed(cfg.seed)
        s = cfg.model.size
        z = torch.randn((BATCH, cfg.model.latent_dim), generator=gen)
        x = torch.rand((BATCH, 1, s, s, s), generator=gen).mul_(2).sub_(1)
        calls: dict[str, Callable[[HAGAN], torch.Tensor]] = {"generate": lambda m: m.generate(z),
                                                              "encode": lambda m: m.encode(x)}  # fmt: skip
        for what, call in calls.items():
            ref, got = call(on_cpu), call(on_device)
            res[what] = {"shape": list(ref.shape), **compare(ref, got)}
            res[what]["agree"] = res[what]["max_abs_diff"] <= PARITY_TOLERANCE * max(1.0, res[what]["scale"])
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ---------------------------------------------------------------- 2. training steps
def train_row(check: Check, cfg: Config, timed: int) -> dict[str, Any]:
    """1 warm-up + ``timed`` steps of ``train_step`` on a seeded random batch in [-1, 1]; peak memory from the build
    on (weights, optimiser state and activations); the FLOPs counted over the warm-up step (so ``warmup_s`` includes
    the counting), and the efficiency against ``check.machine``'s matmul rate in the row's precision."""
    from torch.utils.flop_counter import FlopCounterMode

    from hagan_clinic.training.build import build
    from hagan_clinic.training.loop import train_step

    s = cfg.model.size
    torch.manual_seed(cfg.seed)
    times: list[float] = []
    losses: dict[str, float] = {}
    finite = True
    with peak_memory(check) as memory:
        parts = build(cfg, check.device)
        gen = torch.Generator().manual_seed(cfg.seed)
        x = torch.rand((BATCH, 1, s, s, s), generator=gen).mul_(2).sub_(1).to(check.device)
        counter = FlopCounterMode(display=False)
        for i in range(1 + timed):
            check.sync()
            t0 = time.perf_counter()
            with counter if i == 0 else contextlib.nullcontext():
                losses, ok = train_step(parts, x, None, gen)
            check.sync()
            times.append(time.perf_counter() - t0)
            finite = finite and ok and all(math.isfinite(v) for v in losses.values())
    s_per_iter = statistics.median(times[1:])
    gflop = counter.get_total_flops() / 1e9
    rate = check.machine.get("matmul_gflops", {}).get(cfg.train.precision)  # none for fp16 on a CPU
    tf32 = {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}
    return {"s_per_iter": s_per_iter, "it_per_s": 1.0 / s_per_iter, "warmup_s": times[0], "times_s": times[1:],
            "gflop_per_step": gflop, "achieved_gflops": gflop / s_per_iter, "matmul_gflops": rate,
            "efficiency": gflop / s_per_iter / rate if rate else None, "tf32": tf32,
            "losses_finite": finite, "last_losses": losses, **memory}  # fmt: skip


def train(check: Check, res: dict[str, Any]) -> None:
    sizes, timed = ((32, 64), 2) if check.quick else ((128, 256), 5)
    res.update(batch_size=BATCH, warmup=1, timed=timed, paper_reference=PAPER_REFERENCE)
    rows: list[dict[str, Any]] = res.setdefault("rows", [])
    for size in sizes:
        for prec in PRECISIONS:
            name, overrides = ("tiny", [f"model.size={size}"]) if check.quick else (f"paper_{size}", [])
            row: dict[str, Any] = {"size": size, "precision": prec, "status": "pending", "config": name}
            row["overrides"] = overrides
            if size == PAPER_REFERENCE["size"]:
                row["paper_reference"] = PAPER_REFERENCE
            rows.append(row)
            # cost of this row: the same precision one size down (FLOPs grow with the volume), else the same size
            known = [(r["s_per_iter"] * (size / r["size"]) ** 3, r) for r in rows if "s_per_iter" in r]
            same = [e for e, r in known if r["precision"] == prec] or [e for e, r in known if r["size"] == size]
            reason = check.over_budget("train", (1 + timed) * (same[-1] if same else 0.0))
            if check.device.type == "cpu" and prec == "fp16" and size != sizes[0]:
                reason = "fp16 on the CPU has only slow reference kernels (see the first size); the GPU run times it"
            if reason:
                row.update(status="skipped", reason=reason)
                continue
            cfg = load_config(name, [*overrides, f"train.precision={prec}", f"train.batch_size={BATCH}"])
            attempt(check, row, lambda: train_row(check, cfg, timed))  # noqa: B023  (called at once)


# ---------------------------------------------------------------- 3. slab generation
def slab_row(
    check: Check, model: HAGAN, z: torch.Tensor, k: int, first: list[tuple[torch.Tensor, int]]
) -> dict[str, Any]:
    """One volume generated ``k`` feature slices at a time, after a warm-up; the first volume of the precision is
    kept in ``first``, on the CPU, for the others to be compared with."""
    model.generate(z, slab=k)  # warm-up: cuDNN's algorithm search and the allocator's first blocks
    with peak_memory(check) as memory:
        t0 = time.perf_counter()
        volume = model.generate(z, slab=k)
        check.sync()
        took = time.perf_counter() - t0
    v = volume.float()
    out = {"time_s": took, "shape": list(volume.shape), "dtype": str(volume.dtype).split(".")[-1], **memory}
    out.update(finite=bool(torch.isfinite(v).all()), min=float(v.min()), max=float(v.max()))
    if first:
        out[f"max_abs_diff_vs_slab_{first[0][1]}"] = float((v.cpu() - first[0][0].float()).abs().max())
    else:  # kept on the CPU: on the device it would count in the next row's peak
        first.append((volume.cpu(), k))
    return out


def slab(check: Check, res: dict[str, Any]) -> None:
    name, size = ("tiny", 64) if check.quick else ("paper_256", 512)
    cfg = load_config(name, [f"model.size={size}"])
    model = HAGAN.from_config(cfg).eval().to(check.device)
    z = torch.randn((1, cfg.model.latent_dim), generator=torch.Generator().manual_seed(cfg.seed))
    res.update(config=name, size=size, batch=1, slab_semantics="k feature slices of G^H per pass")
    rows: list[dict[str, Any]] = res.setdefault("rows", [])
    for prec in ("fp32", "bf16"):
        model.to(torch_dtype(prec))  # inference weights cast once, as a bf16 user would run it
        first: list[tuple[torch.Tensor, int]] = []
        for k in (1, 4):
            row: dict[str, Any] = {"precision": prec, "slab": k, "status": "pending"}
            rows.append(row)
            reason = check.over_budget("slab", 2 * max([r["time_s"] for r in rows if "time_s" in r], default=0.0))
            if reason:  # the estimate counts the warm-up
                row.update(status="skipped", reason=reason)
                continue
            attempt(check, row, lambda: slab_row(check, model, z, k, first))  # noqa: B023  (called at once)
        first.clear()


# ---------------------------------------------------------------- 4. encode series/min
def encode(check: Check, res: dict[str, Any]) -> None:
    import pandas as pd

    from hagan_clinic.phantoms import write_cohort
    from hagan_clinic.pipelines.encode import EncodeOptions, run

    name, n, shape = ("tiny", 2, (16, 32, 32)) if check.quick else ("paper_256", 4, (120, 256, 256))
    workers = 0 if check.quick else min(4, usable_cores() // 4)  # readers beside a fast GPU encoder
    work = check.work / "encode"
    cohort = work / "cohort"
    write_cohort(cohort, n=n, seed=0, shape=shape, progress=False, extras=False)
    checkpoint = HAGAN.from_config(load_config(name)).save(work / "model.pt")  # untrained: speed needs no training
    res.update(config=name, series=n, shape=list(shape), workers=workers, batch_size=BATCH)

    def encode_run(src: Path, target: str, precision: str) -> tuple[Any, float]:
        opts = EncodeOptions(checkpoint, work / target, device=check.device_name, precision=precision,
                             workers=workers, batch_size=BATCH, progress=False)  # fmt: skip
        t0 = time.perf_counter()
        result = run(src, opts)  # no tracker: tracking off
        return result, time.perf_counter() - t0

    first = sorted(p for p in cohort.iterdir() if p.is_dir())[0]

    def encode_row(prec: str) -> dict[str, Any]:
        # each precision's warm-up: CUDA start-up, cuDNN's kernel search and the encoders' copies at that precision
        out: dict[str, Any] = {"warmup_s": encode_run(first, f"warmup_{prec}.parquet", prec)[1]}
        result, wall = encode_run(cohort, f"features_{prec}.parquet", prec)
        encoded = result.counts.get("ok", 0)
        out.update(counts=result.counts, wall_s=wall, series_per_min=60 * encoded / wall)
        out.update({f"{k}_s": v for k, v in result.seconds.items()})
        out["encoder_series_per_min"] = 60 * encoded / result.seconds["encode"] if result.seconds["encode"] else None
        return out

    rows: list[dict[str, Any]] = res.setdefault("rows", [])
    for prec in ("fp32", "bf16"):
        row: dict[str, Any] = {"precision": prec, "status": "pending"}
        rows.append(row)
        cost = max([r["warmup_s"] + r["wall_s"] for r in rows if "wall_s" in r], default=0.0)
        reason = check.over_budget("encode", cost)
        if reason:
            row.update(status="skipped", reason=reason)
            continue
        attempt(check, row, lambda: encode_row(prec))  # noqa: B023  (called at once)
    if all(r.get("status") == "ok" for r in rows):
        fp32, bf16 = (pd.read_parquet(work / f"features_{p}.parquet").sort_values("series_uid") for p in PRECISIONS[:2])
        columns = [c for c in fp32.columns if c.startswith("z") and c[1:].isdigit()]
        res["bf16_vs_fp32"] = compare(torch.tensor(fp32[columns].to_numpy()), torch.tensor(bf16[columns].to_numpy()))
    if any(r.get("counts", {}).get("ok", n) != n for r in rows):
        res.update(status="error", error=f"not every series encoded: {[r.get('counts') for r in rows]}")


# ---------------------------------------------------------------- 5. one-process torchrun
def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and its descendants (torchrun starts its workers in sessions of their own)."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        with contextlib.suppress(OSError, ValueError):
            todo += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def run_with_timeout(cmd: list[str], cwd: Path, timeout: float) -> tuple[str, int | None]:
    """Run ``cmd`` (stdout and stderr together); its output and exit status, or None for the status after
    ``timeout`` s. The child leads a process group of its own: on timeout the whole group is killed, with every
    descendant that left it (torchrun's workers), so no survivor holds the output pipe open."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        return proc.communicate(timeout=timeout)[0], proc.returncode
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        try:
            log = proc.communicate(timeout=30)[0]
        except subprocess.TimeoutExpired:  # a descendant in another group still holds the pipe: leave it
            log = "(its output could not be read)\n"
        return f"(timed out after {timeout:.0f} s)\n" + log, None


def torchrun(check: Check, res: dict[str, Any]) -> None:
    iterations = 2 if check.quick else 4
    data, out = check.work / "volumes", check.work / "run"  # named relative to the child's folder, check.work
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):  # a preprocessed cohort: float16 volumes in [-1, 1] at the tiny config's 32^3
        np.save(data / f"vol_{i:02d}.npy", rng.uniform(-1, 1, (32, 32, 32)).astype(np.float16))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    cmd += ["-m", "hagan_clinic.cli", "train", "--config", "tiny", "--data", data.name, "--out", out.name]
    cmd += ["--no-tracking", "--device", check.device_name, "--set", f"train.iterations={iterations}"]
    cmd += ["--set", f"train.checkpoint_every={iterations}", "--set", "train.log_every=1"]
    cmd += ["--set", "train.image_every=0"]
    timeout = max(60.0, min(300.0, check.budget_s - check.elapsed()))
    res.update(command=shlex.join(["python", *cmd[1:]]), iterations=iterations, timeout_s=timeout)  # no home path
    t0 = time.perf_counter()
    log, code = run_with_timeout(cmd, check.work, timeout)
    res.update(returncode=code, wall_s=time.perf_counter() - t0)
    state = out / "checkpoints" / f"state_{iterations:07d}.pt"
    res.update(state_written=state.is_file(), model_written=(out / "model.pt").is_file())
    with contextlib.suppress(OSError, ValueError, IndexError):
        res["last_metrics"] = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    if code != 0 or not state.is_file():
        res.update(status="error", output_tail=log.splitlines()[-20:])
        res["error"] = f"torchrun exited {code}" + ("" if state.is_file() else f", no {state.name}")


# ---------------------------------------------------------------- the run, the table
RUNNERS: dict[str, Callable[[Check, dict[str, Any]], None]] = {
    "parity": parity, "train": train, "slab": slab, "encode": encode, "torchrun": torchrun,
}  # fmt: skip


def run_section(check: Check, name: str) -> None:
    res: dict[str, Any] = {"status": "running"}
    check.sections[name] = res
    t0 = time.perf_counter()
    if check.elapsed() >= check.budget_s:
        res.update(status="skipped", reason=f"the budget of {check.budget_s:.0f} s was spent before this section")
    else:
        try:
            RUNNERS[name](check, res)
            failed = [f"{row_name(r)}: {r.get('error')}" for r in res.get("rows", []) if r.get("status") == "error"]
            if failed and res["status"] == "running":
                res.update(status="error", error=one_line("; ".join(failed)))
            if res["status"] == "running":
                res["status"] = "ok"
        except Exception as err:  # recorded; the other sections still run
            res.update(status="error", error=describe(err))
    res["wall_s"] = round(time.perf_counter() - t0, 2)
    check.save()
    print(f"gpu_check: {name} {res['status']} in {res['wall_s']:.1f} s ({check.elapsed():.0f} of "
          f"{check.budget_s:.0f} s used)", file=sys.stderr, flush=True)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default results/gpu_check.json, *_quick)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes everywhere: tests the script on a CPU")
    ap.add_argument("--budget", type=float, default=480.0, help="seconds for all sections (default 480)")
    args = ap.parse_args(argv)
    if args.device.strip().lower().startswith("mps"):
        print("gpu_check: --device mps: timings on MPS are not synchronised, so they would not be measured; "
              "use cuda, cuda:N or cpu", file=sys.stderr)  # fmt: skip
        return 2
    try:
        device = resolve_device(args.device)
    except HaganError as err:
        print(f"gpu_check: {err}", file=sys.stderr)
        return 2
    out = args.out or RESULTS / f"gpu_check{'_quick' * args.quick}.json"
    cuda = device.type == "cuda"
    header = {"quick": args.quick, "budget_s": args.budget, "torch_cuda": torch.version.cuda}
    try:  # the first work on the device: a broken CUDA set-up shows here
        machine = record(
            str(device), ("fp32", "bf16", "fp16") if cuda else ("fp32", "bf16"), matmul_size(device, args.quick)
        )
        header["cudnn"] = torch.backends.cudnn.version() if cuda else None
    except Exception as err:  # recorded, then exit 2: the device is not usable
        write_result(out, "gpu_check", {"device": str(device)}, {**header, "error": describe(err), "sections": {}})
        print(f"gpu_check: {device} failed its first matmuls: {describe(err)}", file=sys.stderr)
        return 2
    header["tf32_outside_parity"] = {"matmul": torch.backends.cuda.matmul.allow_tf32,
                                     "cudnn": torch.backends.cudnn.allow_tf32}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        check = Check(device, args.device, args.quick, args.budget, out, Path(tmp), machine, header)
        check.sections = {name: {"status": "pending"} for name in SECTIONS}
        for name in SECTIONS:
            run_section(check, name)
    print(table(check.sections))
    print(f"wrote {out}")
    return 1 if any(res.get("status") == "error" for res in check.sections.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
