"""What training updates, built from a config in one place: the training loop and benchmarks/train_speed.py both
call :func:`build`, so a benchmark times the very model, optimisers and grad scalers that a run trains."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import Config, TrainConfig
from ..models.hagan import HAGAN
from .losses import PHASES, HAGANLoss


@dataclass
class Trainables:
    """The model, its EMA generator (None without ``train.ema``), one Adam and one grad scaler per phase, and the
    loss object; :meth:`state_dict` / :meth:`load_state_dict` are their part of a training-state file."""

    model: HAGAN
    ema: nn.Module | None
    optimizers: dict[str, torch.optim.Adam]
    scalers: dict[str, torch.amp.GradScaler]
    loss: HAGANLoss

    def state_dict(self) -> dict[str, Any]:
        return {
            "models": {p: getattr(self.model, p).state_dict() for p in PHASES},
            "ema": None if self.ema is None else self.ema.state_dict(),
            "optimizers": {p: self.optimizers[p].state_dict() for p in PHASES},
            "scalers": {p: self.scalers[p].state_dict() for p in PHASES},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load what :meth:`state_dict` saved (an EMA generator only when both sides have one)."""
        for p in PHASES:
            getattr(self.model, p).load_state_dict(state["models"][p])
            self.optimizers[p].load_state_dict(state["optimizers"][p])
            self.scalers[p].load_state_dict(state["scalers"][p])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])


def make_optimizers(model: HAGAN, tc: TrainConfig) -> dict[str, torch.optim.Adam]:
    """One Adam per network, with the fused kernel (one pass over all parameters instead of one per tensor)."""
    lrs = {"D": tc.lr_d, "G": tc.lr_g, "EH": tc.lr_eh, "EG": tc.lr_eg}
    return {
        p: torch.optim.Adam(getattr(model, p).parameters(), lr=lrs[p], betas=tc.betas, eps=tc.eps, fused=True)
        for p in PHASES
    }


def build(cfg: Config, device: torch.device) -> Trainables:
    """``cfg``'s freshly initialised model (weights from ``cfg.seed``) on ``device`` in training mode, channels-last
    when ``train.channels_last``, with its EMA copy, optimisers, grad scalers (live only for fp16) and loss."""
    tc = cfg.train
    model = HAGAN.from_config(cfg).to(device).train()
    if tc.channels_last:
        # Module.to takes memory_format at run time, but torch's overloads do not declare it
        model = model.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
    ema = copy.deepcopy(model.G).eval().requires_grad_(False) if tc.ema else None
    scalers = {p: torch.amp.GradScaler(device.type, enabled=tc.precision == "fp16") for p in PHASES}
    return Trainables(model, ema, make_optimizers(model, tc), scalers, HAGANLoss(model, tc))
