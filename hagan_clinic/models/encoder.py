"""The HA-GAN encoders: E^H (a slab into G^A's feature space) and E^G (the ground encoder: features to z).

E^H, with c = ``g_width`` and ``stages`` stride-2 steps (2 in the reference):
    slab (N, 1, d, S, S) -> conv k4 s2 p1 1 -> c -> conv3 c -> c -> [conv k4 s2 p1 c -> c]* -> conv k4 s2 p1 -> 2c
    -> (N, 2c, d / 2^stages, F, F); GroupNorm + ReLU after each conv.
E^G, with w = ``e_ground_width`` (256): features (N, 2c, F, F, F) -> log2(F/4) convs k4 s2 p1 ending at w
channels (GroupNorm + ReLU) -> conv k4 valid w -> L -> z_hat (N, L).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .layers import ConvNormAct, check_input, conv3, down4, outside_autocast


class SlabEncoder(nn.Module):
    """E^H: (N, 1, d, S, S) -> (N, 2c, d * F / S, F, F), for a slab (d = S/8) or the whole volume (d = S)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        c, g = cfg.g_width, cfg.norm_groups
        blocks = [ConvNormAct(down4(1, c), g), ConvNormAct(conv3(c, c), g)]
        blocks += [ConvNormAct(down4(c, c), g) for _ in range(cfg.stages - 2)]
        blocks.append(ConvNormAct(down4(c, 2 * c), g))
        self.blocks = nn.ModuleList(blocks)
        self.edge = cfg.size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, (None, 1, None, self.edge, self.edge), "E^H input")
        for block in self.blocks:
            x = block(x)
        return x


class GroundEncoder(nn.Module):
    """E^G: features (N, 2c, F, F, F) -> z_hat (N, L)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        w, g = cfg.e_ground_width, cfg.norm_groups
        n_down = cfg.trunk_upsamplings
        widths = [w // 2 ** (n_down - 1 - j) for j in range(n_down)]
        cin = cfg.feature_channels
        blocks = []
        for cout in widths:
            blocks.append(ConvNormAct(down4(cin, cout), g))
            cin = cout
        self.blocks = nn.ModuleList(blocks)
        self.out = nn.Conv3d(cin, cfg.latent_dim, kernel_size=4, stride=1, padding=0)
        self.in_shape = (cfg.feature_channels, cfg.feature_size, cfg.feature_size, cfg.feature_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        check_input(h, (None, *self.in_shape), "E^G input")
        for block in self.blocks:
            h = block(h)
        return outside_autocast(self.out, h).flatten(1)
