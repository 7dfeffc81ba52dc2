"""The HA-GAN discriminators: D^H on a high-resolution slab, D^L on the low-resolution whole volume.

D^H, with w = ``d_high_width`` (512 in the reference) and a slab of S/8 x S x S:
    log2(S/32) spectral-norm convs k4 s2 p1 ending at w/8 channels  -> (w/8, 4, 32, 32)
    k(2,4,4) s2 p(0,1,1): w/8 -> w/4 -> w/2                          -> (w/2, 1, 8, 8)
    k(1,4,4) s(1,2,2) p(0,1,1): w/2 -> w                              -> (w, 1, 4, 4)
    k(1,4,4) valid: w -> w/4                                          -> (w/4,)
    append the slab position r / (S - S/8); SN-Linear w/4+1 -> w/8 -> 1 (and w/8 -> C class logits)
LeakyReLU(0.2) after every layer but the last.

D^L, with w = ``d_low_width`` (256): log2(F/4) SN convs k4 s2 p1 ending at w channels (F^3 -> 4^3), then an SN
conv k4 valid to 1 logit (+ C class logits).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .layers import check_input, sn


def _lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, negative_slope=0.2)


class HighDiscriminator(nn.Module):
    """D^H: (slab (N, 1, S/8, S, S), position (N,) in [0, 1]) -> (logit (N, 1), class logits (N, C) or None)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        w = cfg.d_high_width
        n_down = int(math.log2(cfg.size // 32))
        widths = [w // 2 ** (3 + n_down - 1 - j) for j in range(n_down)]
        convs: list[nn.Module] = []
        cin = 1
        for cout in widths:
            convs.append(sn(nn.Conv3d(cin, cout, kernel_size=4, stride=2, padding=1)))
            cin = cout
        convs += [
            sn(nn.Conv3d(cin, w // 4, kernel_size=(2, 4, 4), stride=2, padding=(0, 1, 1))),
            sn(nn.Conv3d(w // 4, w // 2, kernel_size=(2, 4, 4), stride=2, padding=(0, 1, 1))),
            sn(nn.Conv3d(w // 2, w, kernel_size=(1, 4, 4), stride=(1, 2, 2), padding=(0, 1, 1))),
            sn(nn.Conv3d(w, w // 4, kernel_size=(1, 4, 4), stride=1, padding=0)),
        ]
        self.convs = nn.ModuleList(convs)
        self.fc1 = sn(nn.Linear(w // 4 + 1, w // 8))
        self.fc2 = sn(nn.Linear(w // 8, 1))
        self.fc_class = sn(nn.Linear(w // 8, cfg.num_classes)) if cfg.num_classes else None
        self.slab_shape = (cfg.slab_depth, cfg.size, cfg.size)

    def forward(self, slab: torch.Tensor, position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        check_input(slab, (None, 1, *self.slab_shape), "D^H input")
        h = slab
        for conv in self.convs:
            h = _lrelu(conv(h))
        position = torch.as_tensor(position, dtype=h.dtype, device=h.device).reshape(-1, 1)
        h = torch.cat([h.flatten(1), position.expand(h.shape[0], 1)], dim=1)
        h = _lrelu(self.fc1(h))
        return self.fc2(h), (self.fc_class(h) if self.fc_class is not None else None)


class LowDiscriminator(nn.Module):
    """D^L: low-resolution volume (N, 1, F, F, F) -> (logit (N, 1), class logits (N, C) or None)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        w = cfg.d_low_width
        n_down = cfg.trunk_upsamplings  # F -> 4
        widths = [w // 2 ** (n_down - 1 - j) for j in range(n_down)]
        convs: list[nn.Module] = []
        cin = 1
        for cout in widths:
            convs.append(sn(nn.Conv3d(cin, cout, kernel_size=4, stride=2, padding=1)))
            cin = cout
        convs.append(sn(nn.Conv3d(cin, 1 + cfg.num_classes, kernel_size=4, stride=1, padding=0)))
        self.convs = nn.ModuleList(convs)
        self.num_classes = cfg.num_classes
        self.edge = cfg.feature_size

    def forward(self, low: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        e = self.edge
        check_input(low, (None, 1, e, e, e), "D^L input")
        h = low
        for conv in self.convs[:-1]:
            h = _lrelu(conv(h))
        h = self.convs[-1](h).flatten(1)
        return h[:, :1], (h[:, 1:] if self.num_classes else None)


class DiscriminatorOutput(NamedTuple):
    high: torch.Tensor
    low: torch.Tensor
    high_class: torch.Tensor | None
    low_class: torch.Tensor | None

    @property
    def logit(self) -> torch.Tensor:
        """The reference's single logit: the mean of D^H's and D^L's, (N, 1)."""
        return (self.high + self.low) / 2

    @property
    def class_logit(self) -> torch.Tensor | None:
        if self.high_class is None or self.low_class is None:
            return None
        return (self.high_class + self.low_class) / 2


class Discriminator(nn.Module):
    """D = (D^H, D^L), judging a slab at output slice ``slab_start`` and the matching low-resolution volume."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.high = HighDiscriminator(cfg)
        self.low = LowDiscriminator(cfg)

    def forward(self, slab: torch.Tensor, low: torch.Tensor, slab_start: int | torch.Tensor) -> DiscriminatorOutput:
        position = torch.as_tensor(slab_start, dtype=torch.float32) / self.cfg.max_slab_start
        high, high_class = self.high(slab, position)
        low_logit, low_class = self.low(low)
        return DiscriminatorOutput(high, low_logit, high_class, low_class)
