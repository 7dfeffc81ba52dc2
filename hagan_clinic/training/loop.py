"""The HA-GAN training loop: per iteration, one update each of D, G, E^H and E^G.

One slab start r (on the feature grid, so real and generated slabs cover the same slices) is drawn per
iteration and shared by the batch and all four phases:

1. D:   real (S^H(x), x_low) -> 1, fake G(z, r) -> 0 [+ class CE on real] [+ R1 on real]
2. G:   fresh z; D(G(z, r)) -> 1 [+ class_weight_g * class CE]
3. E^H: L1(G^H(E^H(S^H(x))), S^H(x)), G frozen
4. E^G: z_hat = E^G(E^H of all 8 slabs, no grad); (L1(G(z_hat, r) slab) + L1(low-res)) / 2, G frozen

Run folder: ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one line per log step),
``checkpoints/`` (``snapshot_<it>.pt`` for sampling, ``state_<it>.pt`` for resuming; the last ``keep_last`` of
each), ``previews/`` (PNG mid-slices) and ``model.pt`` (the final snapshot).
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import resource
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..config import NUM_SLABS, Config
from ..data import ShardedSampler, VolumeFolder
from ..errors import HaganError
from ..io.torch_files import file_sha256
from ..models.hagan import HAGAN
from ..tracking import NullTracker
from . import losses
from .distributed import DistContext, init_from_env
from .state import global_rng_state, latest_state, load_state, rotate, save_state, set_global_rng_state

PHASES = ("D", "G", "EH", "EG")
_FAULT_ENV = "HAGAN_CLINIC_KILL_AFTER_ITERATION"  # tests: SIGKILL this process right after that iteration


class TrainingError(HaganError):
    """The run cannot go on (diverged, nothing to resume, a run folder in the way); one line."""


@dataclass
class TrainResult:
    run_dir: Path
    iteration: int
    snapshot: Path | None
    last_losses: dict[str, float] = field(default_factory=dict)
    nonfinite_skipped: int = 0
    run_id: str | None = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"device {name}: CUDA is not available on this machine")
    return device


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _low_res(x: torch.Tensor, factor: int, how: str) -> torch.Tensor:
    """x_low: the whole volume at the feature grid's resolution."""
    if how == "nearest":  # the reference: F.interpolate(scale_factor=1/4), i.e. every 4th voxel
        return x[:, :, ::factor, ::factor, ::factor]
    return F.avg_pool3d(x, kernel_size=factor)


def _requires_grad(model: HAGAN, part: str | None) -> None:
    for name in PHASES:
        getattr(model, name).requires_grad_(name == part)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Progress:
    """A tqdm bar on a terminal, one plain line per log step elsewhere (CI logs, nohup)."""

    def __init__(self, start: int, total: int, enabled: bool) -> None:
        self.bar = None
        self.enabled = enabled
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="it", file=sys.stderr, dynamic_ncols=True)

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def log(self, it: int, total: int, values: dict[str, float]) -> None:
        text = " ".join(f"{k}={v:.4g}" for k, v in values.items())
        if self.bar is not None:
            self.bar.set_postfix_str(text)
        elif self.enabled:
            print(f"[{it}/{total}] {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def prepare_run_dir(out: Path, resume: str | None) -> Path | None:
    """The state file to resume from (None for a fresh run); refuses to overwrite an earlier run."""
    ckpt_dir = out / "checkpoints"
    if resume is None:
        if latest_state(ckpt_dir) is not None:
            raise TrainingError(f"{out} holds a training run already: add --resume to continue it, or use --out")
        return None
    if resume == "latest":
        path = latest_state(ckpt_dir)
        if path is None:
            raise TrainingError(f"nothing to resume: no state_<iteration>.pt in {ckpt_dir}")
        return path
    path = Path(resume)
    if not path.is_file():
        raise TrainingError(f"--resume: file not found: {path}")
    return path


def train(
    cfg: Config,
    out: str | Path,
    data_dir: str | Path | None = None,
    resume: str | None = None,
    run_name: str | None = None,
    tracker: Any = None,
    progress: bool = True,
    dist: DistContext | None = None,
) -> TrainResult:
    """Train ``cfg``'s HA-GAN on the volumes in ``data_dir`` (or ``cfg.data.dir``), writing to ``out``.

    ``resume``: None (fresh run), "latest" (the newest state in ``out``) or a state file.
    ``tracker``: a Tracker, or None for no tracking. ``dist``: a DistContext (default: from torchrun's env).
    """
    tc, out = cfg.train, Path(out)

    # ---- initialise: device, processes, seeds --------------------------------------------------------------
    device = resolve_device(cfg.device)
    if dist is None:
        dist, device = init_from_env(device)
    main = dist.is_main
    tracker = tracker if (tracker is not None and main) else NullTracker()
    resume_path = prepare_run_dir(out, resume) if main else None
    resume_path = dist.gather(str(resume_path) if resume_path else None)[0]
    torch.manual_seed(cfg.seed + dist.rank)
    np.random.seed((cfg.seed + dist.rank) % 2**32)
    random.seed(cfg.seed + dist.rank)  # saved and restored with the others: seed it too, for reproducible runs

    # ---- data ---------------------------------------------------------------------------------------------
    data = VolumeFolder.from_config(cfg, data_dir)
    training_set = data.training_record()  # in every snapshot: who the model has seen (augment, evaluate)
    sampler = ShardedSampler(len(data), cfg.seed, dist.rank, dist.world)
    labels_all = None if data.labels is None else torch.tensor(data.labels)

    # ---- networks and optimisers --------------------------------------------------------------------------
    model = HAGAN.from_config(cfg).to(device).train()
    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    ema = copy.deepcopy(model.G).eval().requires_grad_(False) if tc.ema else None
    opts = make_optimizers(model, tc)
    fp16 = tc.precision == "fp16"
    scalers = {p: torch.amp.GradScaler(device.type, enabled=fp16) for p in PHASES}
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + dist.rank)  # z and slab starts, on the CPU
    mcfg = cfg.model

    # ---- resume -------------------------------------------------------------------------------------------
    start, run_id, nonfinite_total, nonfinite_run, window = 0, None, 0, 0, {}
    if resume_path:
        state = load_state(resume_path)
        if state["config"]["model"] != cfg.to_dict()["model"]:
            raise TrainingError(f"{resume_path}: the model config differs from this run's; resume with the same model")
        saved = state.get("training_set")
        now = {k: training_set[k] for k in ("files_sha256", "table_sha256", "n_volumes")}
        if saved is not None and saved != now:  # the record must cover every volume the model has seen
            raise TrainingError(
                f"{resume_path}: this run was trained on other data ({saved['n_volumes']} volumes, table sha256 "
                f"{str(saved['table_sha256'])[:12] or '-'}); resume with the same data and table"
            )
        for p in PHASES:
            getattr(model, p).load_state_dict(state["models"][p])
            opts[p].load_state_dict(state["optimizers"][p])
            scalers[p].load_state_dict(state["scalers"][p])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        sampler.load_state_dict(state["sampler"][dist.rank] if len(state["sampler"]) == dist.world else {})
        rng = state["rng"][dist.rank]
        set_global_rng_state(rng["global"])
        gen.set_state(rng["loop"])
        start, run_id = int(state["iteration"]), state.get("mlflow_run_id")
        nonfinite_total, window = int(state.get("nonfinite_total", 0)), dict(state.get("window", {}))
        nonfinite_run = int(state.get("nonfinite_run", 0))
    else:
        dist.broadcast_state(model)  # identical initial weights on every rank (they are, by seed; cheap insurance)

    if main:
        out.mkdir(parents=True, exist_ok=True)
        _write_text(out / "config.yaml", cfg.to_yaml())
        _truncate_metrics(out / "metrics.jsonl", start)
    preview_z = torch.randn(1, mcfg.latent_dim, generator=torch.Generator().manual_seed(cfg.seed + 7))

    def batch() -> tuple[torch.Tensor, torch.Tensor | None]:
        idx = sampler.next_indices(tc.batch_size)
        x = torch.from_numpy(np.stack([data.load(i) for i in idx]))[:, None].to(device)
        if tc.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        y = None if labels_all is None else labels_all[idx].to(device)
        return x, y

    def snapshot(it: int) -> Path:
        path = out / "checkpoints" / f"snapshot_{it:07d}.pt"
        sampler_model = copy.copy(model)
        sampler_model.parts = ("G", "EH", "EG")
        return sampler_model.save(
            path,
            extra={"iteration": it, "training_set": training_set},
            ema_generator=None if ema is None else ema.state_dict(),
        )

    def save_training_state(it: int, window_now: dict[str, float]) -> None:
        rngs = dist.gather({"global": global_rng_state(), "loop": gen.get_state()})
        samplers = dist.gather(sampler.state_dict())
        if not main:
            return
        save_state(
            out / "checkpoints" / f"state_{it:07d}.pt",
            {
                "iteration": it,
                "config": cfg.to_dict(),
                "models": {p: getattr(model, p).state_dict() for p in PHASES},
                "ema": None if ema is None else ema.state_dict(),
                "optimizers": {p: opts[p].state_dict() for p in PHASES},
                "scalers": {p: scalers[p].state_dict() for p in PHASES},
                "rng": rngs,
                "sampler": samplers,
                "nonfinite_total": nonfinite_total,
                "nonfinite_run": nonfinite_run,
                "window": window_now,
                "mlflow_run_id": tracker.run_id,
                "training_set": {k: training_set[k] for k in ("files_sha256", "table_sha256", "n_volumes")},
            },
        )

    # ---- the loop ------------------------------------------------------------------------------------------
    name = run_name or out.name
    bar = _Progress(start, tc.iterations, progress and main)
    last: dict[str, float] = {}
    snap_path: Path | None = None
    with tracker.run(name, run_id=run_id, tags={"stage": "train"}):
        active_run_id = tracker.run_id  # the tracker forgets it when the run closes
        if active_run_id != run_id:  # a new run (also on resuming a run logged to another store)
            tracker.log_params(cfg.to_dict())
            tracker.set_tags({f"data.{k}": v for k, v in cfg.data_contract().items()})
        if main:
            print(f"training {name}: {data.summary()}; {dist.world} process(es) on {device}", file=sys.stderr)
        t_window = time.perf_counter()
        it = start
        try:
            while it < tc.iterations:
                x, y = batch()
                values, finite = train_step(model, opts, scalers, tc, x, y, gen, dist, ema)
                it += 1
                bar.step()
                nonfinite_run = 0 if finite else nonfinite_run + 1
                nonfinite_total += 0 if finite else 1
                if nonfinite_run >= tc.max_nonfinite:
                    raise TrainingError(
                        f"{nonfinite_run} iterations in a row had a non-finite loss (at iteration {it}: "
                        + ", ".join(f"{k}={v:.3g}" for k, v in values.items() if k.startswith("loss_"))
                        + "); lower the learning rates, or train in fp32 or bf16"
                    )
                for key, v in values.items():
                    if math.isfinite(v):  # a mean over the iterations where the value was finite
                        window[key] = window.get(key, 0.0) + v
                        window[f"_n.{key}"] = window.get(f"_n.{key}", 0.0) + 1
                window["_n"] = window.get("_n", 0.0) + 1

                if it % tc.log_every == 0 or it == tc.iterations:
                    elapsed = time.perf_counter() - t_window
                    n = window.pop("_n", 1.0)
                    last = {k: v / window[f"_n.{k}"] for k, v in window.items() if not k.startswith("_n.")}
                    window = {}
                    metrics = {**last, "it_per_s": n / max(elapsed, 1e-9), "peak_memory_mb": _peak_memory_mb(device)}
                    metrics["nonfinite_skipped"] = nonfinite_total
                    tracker.log_metrics(metrics, step=it)
                    if main:
                        _append_metrics(out / "metrics.jsonl", {"iteration": it, **metrics})
                    bar.log(
                        it,
                        tc.iterations,
                        {k: metrics[k] for k in ("loss_D", "loss_G", "loss_EH", "loss_EG", "it_per_s") if k in metrics},
                    )
                    t_window = time.perf_counter()

                if main and ((tc.image_every and it % tc.image_every == 0) or it == tc.iterations):
                    png = _preview(model, x[:1], y[:1] if y is not None else None, preview_z, out, it)
                    tracker.log_artifact(png, "previews")

                if it % tc.checkpoint_every == 0 or it == tc.iterations:
                    save_training_state(it, window)
                    if main:
                        snap_path = snapshot(it)
                        rotate(out / "checkpoints", tc.keep_last)
                    dist.barrier()
                    if os.environ.get(_FAULT_ENV) == str(it):
                        os.kill(os.getpid(), 9)

            # ---- the end: final snapshot, artifacts, registered model ----------------------------------------
            if main:
                snap_path = _copy_file(snap_path or snapshot(it), out / "model.pt")
                tracker.log_artifact(snap_path, "snapshot")
                tracker.log_artifact(out / "config.yaml")
                tracker.log_artifact(out / "metrics.jsonl")
                if cfg.tracking.register_model:
                    tags = {**cfg.data_contract(), "sha256": file_sha256(snap_path)}  # lets encode name the version
                    tracker.register_model(cfg.tracking.register_model, "snapshot", tags)
        finally:
            bar.close()
    dist.barrier()
    return TrainResult(out, it, snap_path, last, nonfinite_total, active_run_id or run_id)


def train_step(
    model: HAGAN,
    opts: dict[str, torch.optim.Optimizer],
    scalers: dict[str, torch.amp.GradScaler],
    tc: Any,
    x: torch.Tensor,
    y: torch.Tensor | None,
    gen: torch.Generator,
    dist: DistContext | None = None,
    ema: torch.nn.Module | None = None,
    phase_context: Callable[[str], AbstractContextManager] = lambda phase: nullcontext(),
) -> tuple[dict[str, float], bool]:
    """One iteration on the real batch x (N, 1, S, S, S) with labels y: D, G, E^H, E^G updated in turn.

    The slab start r and the two latent batches are drawn from ``gen`` (on the CPU, so runs are reproducible
    across devices). A phase whose loss is not finite on some rank is skipped on every rank. Returns the losses
    by name and whether all four were finite. ``phase_context`` wraps each phase (benchmarks time them).
    """
    dist = dist or DistContext()
    mcfg, device = model.config.model, x.device
    k = int(torch.randint(mcfg.feature_size - mcfg.feature_slab_depth + 1, (1,), generator=gen))
    r = k * mcfg.upsample
    real_slab = model.select_image_slab(x, r)
    real_low = _low_res(x, mcfg.upsample, tc.low_res)
    z_d = torch.randn(x.shape[0], mcfg.latent_dim, generator=gen).to(device)
    z_g = torch.randn(x.shape[0], mcfg.latent_dim, generator=gen).to(device)
    values: dict[str, float] = {}
    finite = True
    for phase in PHASES:
        with phase_context(phase):
            _requires_grad(model, phase)
            opts[phase].zero_grad(set_to_none=True)
            with _autocast(device, tc.precision):
                loss, parts = _phase_loss(phase, model, tc, real_slab, real_low, x, y, z_d, z_g, r)
            ok = dist.all_true(bool(torch.isfinite(loss)), device)
            values[f"loss_{phase}"] = float(loss.detach())
            values.update(parts)
            if not ok:
                finite = False
                continue
            scalers[phase].scale(loss).backward()
            dist.average_gradients(getattr(model, phase))
            scalers[phase].step(opts[phase])
            scalers[phase].update()
    _requires_grad(model, None)
    if ema is not None:
        _ema_update(ema, model.G, tc.ema_decay)
    return values, finite


def make_optimizers(model: HAGAN, tc: Any) -> dict[str, torch.optim.Adam]:
    """One Adam per network, with the fused kernel (one pass over all parameters instead of one per tensor)."""
    lrs = {"D": tc.lr_d, "G": tc.lr_g, "EH": tc.lr_eh, "EG": tc.lr_eg}
    return {
        p: torch.optim.Adam(getattr(model, p).parameters(), lr=lrs[p], betas=tc.betas, eps=tc.eps, fused=True)
        for p in PHASES
    }


def _phase_loss(
    phase: str,
    model: HAGAN,
    tc: Any,
    real_slab: torch.Tensor,
    real_low: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor | None,
    z_d: torch.Tensor,
    z_g: torch.Tensor,
    r: int,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one phase (its own network is the only one with requires_grad) and its named parts."""
    parts: dict[str, float] = {}
    if phase == "D":
        with torch.no_grad():
            fake_slab, fake_low = model.G(z_d, r, y)
        if tc.r1_gamma > 0:
            real_slab = real_slab.detach().requires_grad_(True)
            real_low = real_low.detach().requires_grad_(True)
        real = model.D(real_slab, real_low, r)
        fake = model.D(fake_slab, fake_low, r)
        loss = losses.discriminator_loss(real, fake, tc)
        cls = losses.class_loss(real, y)
        if cls is not None:
            parts["loss_D_class"] = float(cls.detach())
            loss = loss + cls
        if tc.r1_gamma > 0:
            r1 = losses.r1_penalty(real, (real_slab, real_low), tc)
            parts["loss_D_r1"] = float(r1.detach())
            loss = loss + r1
        return loss, parts
    if phase == "G":
        fake_slab, fake_low = model.G(z_g, r, y)
        out = model.D(fake_slab, fake_low, r)
        loss = losses.generator_loss(out, tc)
        cls = losses.class_loss(out, y)
        if cls is not None:
            parts["loss_G_class"] = float(cls.detach())
            loss = loss + tc.class_weight_g * cls
        return loss, parts
    if phase == "EH":
        recon = model.G.high(model.EH(real_slab))
        return tc.encoder_weight * losses.l1(recon, real_slab), parts
    # E^G: E^H of every slab without gradient, as the reference computes them
    with torch.no_grad():
        d = model.config.model.slab_depth
        feats = torch.cat([model.EH(x[:, :, i * d : (i + 1) * d]) for i in range(NUM_SLABS)], dim=2)
    z_hat = model.EG(feats)
    fake_slab, fake_low = model.G(z_hat, r, y)
    rec = (losses.l1(fake_slab, real_slab) + losses.l1(fake_low, real_low)) / 2
    return tc.encoder_weight * rec, parts


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, live: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), live.parameters()):
        e.lerp_(p, 1.0 - decay)
    for e, b in zip(ema.buffers(), live.buffers()):
        e.copy_(b)


@torch.no_grad()
def _preview(model: HAGAN, x: torch.Tensor, y: torch.Tensor | None, z: torch.Tensor, out: Path, it: int) -> Path:
    from ..plots import mid_slices_png

    was_training = model.training
    model.eval()
    try:
        z_hat = model.EG(model.encode_features(x.float()))
        recon = model.generate(z_hat, y)
        fake = model.generate(z.to(x.device), y)
    finally:
        model.train(was_training)
    rows = [("real", x[0, 0]), ("reconstruction", recon[0, 0]), ("generated", fake[0, 0])]
    rows = [(k, v.float().cpu().numpy()) for k, v in rows]
    return mid_slices_png(rows, out / "previews" / f"iter_{it:07d}.png", f"iteration {it}")


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _copy_file(src: Path, dst: Path) -> Path:
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.write_bytes(src.read_bytes())
    os.replace(tmp, dst)
    return dst


def _append_metrics(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, iteration: int) -> None:
    """On resume, drop log lines past the resumed iteration (the run repeats them exactly)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["iteration"] <= iteration]
    _write_text(path, "".join(line + "\n" for line in keep))
