"""The HA-GAN training loop: per iteration, one update each of D, G, E^H and E^G, then the EMA generator.

The maths of each phase live in :class:`~hagan_clinic.training.losses.HAGANLoss`; the loop owns their order, which
network has gradients, the optimiser steps and grad scalers, non-finite losses, logging, snapshots and state dumps.

Run folder: ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one line per log step),
``checkpoints/`` (``snapshot_<it>.pt`` for sampling, ``state_<it>.pt`` for resuming; the last ``keep_last`` of
each), ``previews/`` (PNG mid-slices) and ``model.pt`` (the final snapshot). Every file is written atomically.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
import random
import resource
import shutil
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import Config
from ..data import ShardedSampler, VolumeFolder
from ..devices import resolve_device, torch_dtype
from ..io.files import atomic_target, make_folder, write_text
from ..io.logs import progress_bar, quiet
from ..io.torch_files import file_sha256
from ..models.hagan import HAGAN
from ..tracking import NullTracker
from .build import Trainables, build
from .distributed import DistContext, init_from_env
from .losses import PHASES
from .state import (
    MetricsLog,
    TrainingError,
    global_rng_state,
    latest_state,
    load_state,
    rotate,
    save_state,
    set_global_rng_state,
)

_FAULT_ENV = "HAGAN_CLINIC_KILL_AFTER_ITERATION"  # tests: SIGKILL this process right after that iteration
#: what a training state records of the data, to refuse resuming on other data
_DATA_KEYS = ("files_sha256", "table_sha256", "n_volumes")
log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    iteration: int
    snapshot: Path | None
    last_losses: dict[str, float] = field(default_factory=dict)
    nonfinite_skipped: int = 0
    run_id: str | None = None

    def summary(self) -> str:
        """What ``hagan-clinic train`` prints: where the trained model is (nothing on ranks that write none)."""
        if self.snapshot is None:
            return ""
        skipped = f" ({self.nonfinite_skipped} non-finite iterations skipped)" if self.nonfinite_skipped else ""
        return f"trained to iteration {self.iteration}: {self.snapshot}{skipped}"


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """The forward passes' autocast for ``train.precision`` (none for fp32)."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch_dtype(precision))


def train_only(model: HAGAN, part: str | None) -> None:
    """Let only network ``part`` (None: none) take gradients, so that a phase never updates another network."""
    for name in PHASES:
        getattr(model, name).requires_grad_(name == part)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Progress:
    """A progress bar on a terminal, one plain log line per log step elsewhere (CI logs, nohup); neither under
    ``--quiet``."""

    def __init__(self, start: int, total: int, enabled: bool) -> None:
        self.enabled = enabled and not quiet()
        self.bar = progress_bar(total, "train", "it", initial=start, dynamic_ncols=True) if self.enabled else None
        if self.bar is not None and self.bar.disable:  # stderr is not a terminal
            self.bar = None

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def log(self, it: int, total: int, values: dict[str, float]) -> None:
        text = " ".join(f"{k}={v:.4g}" for k, v in values.items())
        if self.bar is not None:
            self.bar.set_postfix_str(text)
        elif self.enabled:
            log.info("[%d/%d] %s", it, total, text)

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
    ``progress``: a progress bar (or, off a terminal, a log line per log step) unless ``--quiet``.
    """
    tc, out = cfg.train, Path(out)

    # ---- initialise: device, processes, seeds --------------------------------------------------------------
    device = resolve_device(cfg.device, what="device")
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

    # ---- networks, optimisers, grad scalers, loss ---------------------------------------------------------
    parts = build(cfg, device)
    model, ema = parts.model, parts.ema
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + dist.rank)  # z and slab starts, on the CPU

    # ---- resume -------------------------------------------------------------------------------------------
    start, run_id, nonfinite_total, nonfinite_run, window = 0, None, 0, 0, {}
    if resume_path:
        state = load_state(resume_path)
        if state["config"]["model"] != cfg.to_dict()["model"]:
            raise TrainingError(f"{resume_path}: the model config differs from this run's; resume with the same model")
        saved = state.get("training_set")
        if saved is not None and saved != {k: training_set[k] for k in _DATA_KEYS}:  # who the model has seen
            raise TrainingError(
                f"{resume_path}: this run was trained on other data ({saved['n_volumes']} volumes, table sha256 "
                f"{str(saved['table_sha256'])[:12] or '-'}); resume with the same data and table"
            )
        parts.load_state_dict(state)
        sampler.load_state_dict(state["sampler"][dist.rank] if len(state["sampler"]) == dist.world else {})
        rng = state["rng"][dist.rank]
        set_global_rng_state(rng["global"])
        gen.set_state(rng["loop"])
        start, run_id = int(state["iteration"]), state.get("mlflow_run_id")
        nonfinite_total, window = int(state.get("nonfinite_total", 0)), dict(state.get("window", {}))
        nonfinite_run = int(state.get("nonfinite_run", 0))
        log.debug("resuming %s at iteration %d (%d non-finite so far)", resume_path, start, nonfinite_total)
    else:
        dist.broadcast_state(model)  # identical initial weights on every rank (they are, by seed; cheap insurance)

    metrics_file = None
    if main:
        make_folder(out)
        write_text(out / "config.yaml", cfg.to_yaml())
        metrics_file = MetricsLog(out / "metrics.jsonl", start)
    preview_z = torch.randn(1, cfg.model.latent_dim, generator=torch.Generator().manual_seed(cfg.seed + 7))

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
                **parts.state_dict(),
                "rng": rngs,
                "sampler": samplers,
                "nonfinite_total": nonfinite_total,
                "nonfinite_run": nonfinite_run,
                "window": window_now,
                "mlflow_run_id": tracker.run_id,
                "training_set": {k: training_set[k] for k in _DATA_KEYS},
            },
        )

    # ---- the loop ------------------------------------------------------------------------------------------
    name = run_name or out.name
    bar = _Progress(start, tc.iterations, progress and main)
    last: dict[str, float] = {}
    snap_path: Path | None = None
    with tracker.run(name, run_id=run_id, tags={"stage": "train"}, system_metrics=True):
        active_run_id = tracker.run_id  # the tracker forgets it when the run closes
        if active_run_id != run_id:  # a new run (also on resuming a run logged to another store)
            tracker.log_params(cfg.to_dict())
            tracker.set_tags({f"data.{k}": v for k, v in cfg.data_contract().items()})
            # the training set: its folder's name, a digest of its file list and table, and its size
            digest = hashlib.sha256(f"{training_set['files_sha256']} {training_set['table_sha256']}".encode())
            tracker.log_input(data.root.resolve().name, digest.hexdigest(), training_set["n_volumes"],
                              training_set["data_dir"], "training")  # fmt: skip
        if main:
            log.info("training %s: %s; %d process(es) on %s", name, data.summary(), dist.world, device)
        t_window = time.perf_counter()
        it = start
        try:
            while it < tc.iterations:
                # ---- the four phases and the EMA ----------------------------------------------------------
                x, y = batch()
                values, finite = train_step(parts, x, y, gen, dist)
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

                # ---- tick: log ----------------------------------------------------------------------------
                if it % tc.log_every == 0 or it == tc.iterations:
                    elapsed = time.perf_counter() - t_window
                    n = window.pop("_n", 1.0)
                    last = {k: v / window[f"_n.{k}"] for k, v in window.items() if not k.startswith("_n.")}
                    window = {}
                    metrics = {**last, "it_per_s": n / max(elapsed, 1e-9), "peak_memory_mb": _peak_memory_mb(device)}
                    metrics["nonfinite_skipped"] = nonfinite_total
                    tracker.log_metrics(metrics, step=it)
                    if metrics_file is not None:
                        metrics_file.append({"iteration": it, **metrics})
                    if main:  # every value of the step, not only the bar's few (one process says it)
                        log.debug("iteration %d: %s", it, " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
                    shown = ("loss_D", "loss_G", "loss_EH", "loss_EG", "it_per_s")
                    bar.log(it, tc.iterations, {k: metrics[k] for k in shown if k in metrics})
                    t_window = time.perf_counter()

                if main and ((tc.image_every and it % tc.image_every == 0) or it == tc.iterations):
                    png = _preview(model, x[:1], y[:1] if y is not None else None, preview_z, out, it)
                    tracker.log_artifact(png, "previews")

                # ---- tick: training state and snapshot ----------------------------------------------------
                if it % tc.checkpoint_every == 0 or it == tc.iterations:
                    t_save = time.perf_counter()
                    save_training_state(it, window)
                    if main:
                        snap_path = snapshot(it)
                        rotate(out / "checkpoints", tc.keep_last)
                        log.debug(
                            "iteration %d: state and snapshot written in %.2f s", it, time.perf_counter() - t_save
                        )
                    dist.barrier()
                    if os.environ.get(_FAULT_ENV) == str(it):
                        os.kill(os.getpid(), 9)

            # ---- the end: final snapshot, artifacts, registered model ----------------------------------------
            if main:
                snap_path = _copy_file(snap_path or snapshot(it), out / "model.pt")
                tracker.log_artifact(snap_path, "snapshot")
                tracker.log_artifact(out / "config.yaml")
                tracker.log_artifact(out / "metrics.jsonl")
                if cfg.tracking.register_model:  # the encoder and the generator as served models
                    sha = {"sha256": file_sha256(snap_path)}  # lets a command that reads the file name its version
                    tracker.register_model(cfg.tracking.register_model, snap_path, cfg.to_dict(), sha)
        finally:
            bar.close()
    dist.barrier()
    return TrainResult(out, it, snap_path, last, nonfinite_total, active_run_id or run_id)


def train_step(
    parts: Trainables,
    x: torch.Tensor,
    y: torch.Tensor | None,
    gen: torch.Generator,
    dist: DistContext | None = None,
    phase_context: Callable[[str], AbstractContextManager] = lambda phase: nullcontext(),
) -> tuple[dict[str, float], bool]:
    """One iteration on the real batch x (N, 1, S, S, S) with labels y (N,) or None: D, G, E^H, E^G updated in turn,
    then the EMA generator.

    The slab start and the latents are drawn from ``gen`` (see HAGANLoss.draw). A phase whose loss is not finite on
    some rank is skipped on every rank. Returns the losses by name and whether all four were finite.
    ``phase_context`` wraps each phase (benchmarks time them).
    """
    dist = dist or DistContext()
    model, loss, precision = parts.model, parts.loss, parts.loss.tc.precision
    inputs = loss.draw(x, y, gen)
    values: dict[str, float] = {}
    finite = True
    for phase in PHASES:
        with phase_context(phase):
            train_only(model, phase)
            opt, scaler = parts.optimizers[phase], parts.scalers[phase]
            opt.zero_grad(set_to_none=True)
            with autocast(x.device, precision):
                value, extra = loss.phase(phase, inputs)
            ok = dist.all_true(bool(torch.isfinite(value)), x.device)  # every rank takes the same branch
            values[f"loss_{phase}"] = float(value.detach())
            values.update(extra)
            if not ok:
                finite = False
                continue
            scaler.scale(value).backward()
            dist.average_gradients(getattr(model, phase))
            scaler.step(opt)
            scaler.update()
    train_only(model, None)
    if parts.ema is not None:
        loss.update_ema(parts.ema)
    return values, finite


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
    volumes = [("real", x[0, 0]), ("reconstruction", recon[0, 0]), ("generated", fake[0, 0])]
    rows = [(k, v.float().cpu().numpy()) for k, v in volumes]
    return mid_slices_png(rows, out / "previews" / f"iter_{it:07d}.png", f"iteration {it}")


def _copy_file(src: Path, dst: Path) -> Path:
    with atomic_target(dst) as tmp:
        shutil.copyfile(src, tmp)
    return dst
