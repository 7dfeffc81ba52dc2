"""The HA-GAN generator: common trunk G^A, low-resolution branch G^L, high-resolution branch G^H.

Shapes, with S the output edge, F = S / 2^stages the feature edge (S/4 in the reference), c = ``g_width``:

    z (N, L [+ C one-hot]) --G^A--> features (N, 2c, F, F, F)
    features --G^L--> low-resolution volume (N, 1, F, F, F) in [-1, 1]
    features[:, :, k : k + F/8] --G^H--> slab (N, 1, S/8, S, S) in [-1, 1]   (training)
    features --G^H--> volume (N, 1, S, S, S) in [-1, 1]                         (inference)

G^A: Linear to 16c x 4^3, then five conv blocks 16c, 16c, 8c, 4c, 2c; x2 upsampling precedes the first
log2(F/4) blocks after the first. G^H: ``stages`` blocks of (x2 upsample, conv3), halving the width, the last to
one channel with tanh. G^L: three conv3 blocks 2c -> c -> c/2 -> 1 with tanh, no upsampling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .layers import ConvNormAct, UpConv3d, check_input, conv3, outside_autocast


class Trunk(nn.Module):
    """G^A: (N, L + C) -> (N, 2c, F, F, F)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        c = cfg.g_width
        self.base_channels = 16 * c
        self.fc = nn.Linear(cfg.latent_dim + cfg.num_classes, self.base_channels * 4**3)
        widths = [16 * c, 16 * c, 8 * c, 4 * c, 2 * c]
        blocks = []
        cin = self.base_channels
        for i, cout in enumerate(widths):
            upsample = 1 <= i <= cfg.trunk_upsamplings
            blocks.append(ConvNormAct(UpConv3d(cin, cout) if upsample else conv3(cin, cout), cfg.norm_groups))
            cin = cout
        self.blocks = nn.ModuleList(blocks)

    def forward(self, zc: torch.Tensor) -> torch.Tensor:
        h = outside_autocast(self.fc, zc).view(zc.shape[0], self.base_channels, 4, 4, 4)
        for block in self.blocks:
            h = block(h)
        return h


class LowBranch(nn.Module):
    """G^L: (N, 2c, F, F, F) -> (N, 1, F, F, F) in [-1, 1]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        c = cfg.g_width
        self.blocks = nn.ModuleList(
            [ConvNormAct(conv3(2 * c, c), cfg.norm_groups), ConvNormAct(conv3(c, c // 2), cfg.norm_groups)]
        )
        self.out = conv3(c // 2, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            h = block(h)
        return torch.tanh(self.out(h))


class HighStage(nn.Module):
    """x2 upsample + conv3, then GroupNorm + ReLU, or tanh for the output stage."""

    def __init__(self, cin: int, cout: int, groups: int, last: bool) -> None:
        super().__init__()
        self.conv = UpConv3d(cin, cout)
        self.norm = None if last else nn.GroupNorm(groups, cout)

    def activate(self, y: torch.Tensor) -> torch.Tensor:
        return torch.tanh_(y) if self.norm is None else F.relu(self.norm(y), inplace=True)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.activate(self.conv(h))


class HighBranch(nn.Module):
    """G^H: (N, 2c, d, F, F) -> (N, 1, d * 2^stages, S, S) in [-1, 1], for a slab (d = F/8) or all of it (d = F)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        c = cfg.g_width
        widths = [c // 2**i for i in range(cfg.stages - 1)] + [1]
        cin = 2 * c
        stages = []
        for i, cout in enumerate(widths):
            stages.append(HighStage(cin, cout, cfg.norm_groups, last=i == len(widths) - 1))
            cin = cout
        self.stages = nn.ModuleList(stages)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            h = stage(h)
        return h

    def consume(self, holder: list[torch.Tensor], chunk: int | None = None) -> torch.Tensor:
        """G^H on the feature map popped from ``holder``, in one pass or ``chunk`` slices at a time.

        Inference helper: taking the map out of a list leaves no reference in the caller's frame, so each
        intermediate volume is freed as soon as the next stage has consumed it.
        """
        if chunk is not None:
            return self._chunked(holder, chunk)
        h = holder.pop()
        for stage in self.stages:
            h = stage(h)
        return h

    def _chunked(self, holder: list[torch.Tensor], chunk: int) -> torch.Tensor:
        """The same function as :meth:`forward` on the whole feature map, ``chunk`` feature slices at a time.

        Each chunk is computed with a one-slice halo on both sides (all a x2-upsample + conv3 needs) and cropped,
        so every output voxel sees exactly the inputs it sees in one pass. GroupNorm statistics are taken over
        the whole intermediate volume, as in one pass, and applied in place chunk by chunk. Peak memory is one
        intermediate volume plus one chunk's work instead of several full-size temporaries.
        """
        if chunk < 1:
            raise ValueError(f"slab must be >= 1 feature slice, got {chunk}")
        h = holder.pop()
        for i, stage in enumerate(self.stages):
            assert isinstance(stage, HighStage)  # ModuleList items are typed as any Module
            step = chunk * 2**i  # the same output slices per chunk at every stage
            depth = h.shape[2]
            out = h.new_empty((h.shape[0], stage.conv.out_channels, 2 * depth, 2 * h.shape[3], 2 * h.shape[4]))
            for a in range(0, depth, step):
                b = min(a + step, depth)
                lo, hi = max(a - 1, 0), min(b + 1, depth)
                y = stage.conv(h[:, :, lo:hi])
                y = y[:, :, 2 * (a - lo) : 2 * (a - lo) + 2 * (b - a)]
                out[:, :, 2 * a : 2 * b] = torch.tanh_(y) if stage.norm is None else y
                del y
            del h  # the previous stage's volume, unless the caller still holds it
            if stage.norm is not None:
                _group_norm_relu_(out, stage.norm, 2 * step)
            h = out
        return h


def _group_norm_relu_(x: torch.Tensor, norm: nn.GroupNorm, step: int) -> None:
    """relu(norm(x)) written into x, statistics over all of x, normalisation applied ``step`` slices at a time."""
    n, ch = x.shape[:2]
    g = norm.num_groups
    var, mean = torch.var_mean(x.view(n, g, -1), dim=2, unbiased=False)
    rstd = torch.rsqrt(var + norm.eps)
    scale = rstd.repeat_interleave(ch // g, dim=1)
    shift = -mean.repeat_interleave(ch // g, dim=1) * scale
    if norm.affine:
        shift = shift * norm.weight + norm.bias
        scale = scale * norm.weight
    scale = scale.view(n, ch, 1, 1, 1)
    shift = shift.view(n, ch, 1, 1, 1)
    for a in range(0, x.shape[2], step):
        part = x[:, :, a : a + step]
        part.mul_(scale).add_(shift).clamp_(min=0)


class Generator(nn.Module):
    """G = (G^A, G^L, G^H). See the module docstring for shapes."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.trunk = Trunk(cfg)
        self.low = LowBranch(cfg)
        self.high = HighBranch(cfg)

    def condition(self, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """z (N, L) with labels (N,) int in [0, C) -> (N, L + C); unconditional models take labels=None."""
        cfg = self.cfg
        check_input(z, (None, cfg.latent_dim), "z")
        if cfg.num_classes == 0:
            if labels is not None:
                raise ValueError("this model is unconditional (num_classes = 0): pass labels=None")
            return z
        if labels is None:
            raise ValueError(f"this model is conditional on {cfg.num_classes} classes: pass labels")
        labels = torch.as_tensor(labels, device=z.device).long().reshape(-1)
        if labels.shape[0] != z.shape[0]:
            raise ValueError(f"got {labels.shape[0]} labels for {z.shape[0]} latent vectors")
        if labels.numel() and (labels.min() < 0 or labels.max() >= cfg.num_classes):
            raise ValueError(f"labels must lie in [0, {cfg.num_classes - 1}], got {labels.tolist()}")
        return torch.cat([z, F.one_hot(labels, cfg.num_classes).to(z.dtype)], dim=1)

    def features(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.trunk(self.condition(z, labels))

    def forward(
        self, z: torch.Tensor, slab_start: int, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training pass: (high-res slab starting at output slice ``slab_start``, low-res whole volume)."""
        h = self.features(z, labels)
        return self.high(select_feature_slab(h, slab_start, self.cfg)), self.low(h)


def _slab_index(slab_start: int, cfg: ModelConfig) -> int:
    if slab_start % cfg.upsample or not 0 <= slab_start <= cfg.max_slab_start:
        raise ValueError(
            f"slab start must be a multiple of {cfg.upsample} in [0, {cfg.max_slab_start}], got {slab_start}"
        )
    return slab_start // cfg.upsample


def select_feature_slab(h: torch.Tensor, slab_start: int, cfg: ModelConfig) -> torch.Tensor:
    """S^L: the F/8 feature slices that G^H turns into output slices [slab_start, slab_start + S/8)."""
    k = _slab_index(slab_start, cfg)
    return h[:, :, k : k + cfg.feature_slab_depth]


def select_image_slab(x: torch.Tensor, slab_start: int, cfg: ModelConfig) -> torch.Tensor:
    """S^H: the S/8 slices of a full-resolution volume (N, 1, S, S, S) aligned with :func:`select_feature_slab`.

    Slab starts lie on the feature grid (multiples of S/F), so real and generated slabs cover the same slices;
    the reference drew any start for the real slab and rounded the generated one down.
    """
    _slab_index(slab_start, cfg)
    return x[:, :, slab_start : slab_start + cfg.slab_depth]
