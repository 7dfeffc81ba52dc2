"""The HA-GAN model object: the four networks, and generate / encode for whole volumes.

Encoding runs E^H on each of the 8 slabs separately and concatenates the results along D before E^G
(``model.encode_mode: slabs``, the default). That is exactly what E^G sees in training, where E^H's outputs
of the 8 slabs are computed one slab at a time; GroupNorm statistics and zero padding at slab borders then
match training. ``encode_mode: whole`` runs E^H once over the whole volume, as the paper's inference figure
draws it; the two differ at the slab borders and in E^H's normalisation statistics.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..config import NUM_SLABS, Config
from .discriminator import Discriminator
from .encoder import GroundEncoder, SlabEncoder
from .generator import Generator, select_feature_slab, select_image_slab
from .layers import check_input

#: Names of the networks, as they appear in checkpoints.
PARTS = ("G", "D", "EH", "EG")


SLABS_PER_CALL = 2


class HAGAN(nn.Module):
    """Generator G (G^A, G^L, G^H), discriminator D (D^H, D^L), encoders E^H and E^G, and their config."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        cfg = config.model
        self.G = Generator(cfg)
        self.D = Discriminator(cfg)
        self.EH = SlabEncoder(cfg)
        self.EG = GroundEncoder(cfg)
        #: parts whose weights are meaningful (trained or loaded); a sampling checkpoint may lack D
        self.parts: tuple[str, ...] = PARTS

    @classmethod
    def from_config(cls, config: Config) -> HAGAN:
        """A freshly initialised model; the initial weights depend only on ``config.seed``."""
        with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG stream untouched
            torch.manual_seed(config.seed)
            return cls(config)

    @property
    def device(self) -> torch.device:
        return self.G.trunk.fc.weight.device

    def select_feature_slab(self, h: torch.Tensor, slab_start: int) -> torch.Tensor:
        return select_feature_slab(h, slab_start, self.config.model)

    def select_image_slab(self, x: torch.Tensor, slab_start: int) -> torch.Tensor:
        return select_image_slab(x, slab_start, self.config.model)

    @torch.no_grad()
    def generate(self, z: torch.Tensor, labels: torch.Tensor | None = None, slab: int | None = None) -> torch.Tensor:
        """Whole volumes from latent vectors.

        z: (N, L) float. labels: (N,) int class indices for a conditional model, else None.
        slab: None for one pass of G^H over the full feature map; k to run G^H k feature slices at a time
        (k x S/F output slices), with the same result and a fraction of the peak memory.
        Returns (N, 1, S, S, S) in [-1, 1].
        """
        z = z.to(self.device, self.G.trunk.fc.weight.dtype)
        return self.G.high.consume([self.G.features(z, labels)], None if slab is None else int(slab))

    @torch.no_grad()
    def generate_low(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The low-resolution branch only: (N, L) -> (N, 1, F, F, F) in [-1, 1]."""
        z = z.to(self.device, self.G.trunk.fc.weight.dtype)
        return self.G.low(self.G.features(z, labels))

    def encode_features(self, x: torch.Tensor, mode: str | None = None) -> torch.Tensor:
        """E^H of a whole volume (N, 1, S, S, S) -> (N, 2c, F, F, F), per slab or in one go (see module doc)."""
        s = self.config.model.size
        check_input(x, (None, 1, s, s, s), "volume")
        mode = mode or self.config.model.encode_mode
        if mode == "whole":
            return self.EH(x)
        if mode != "slabs":
            raise ValueError(f"encode mode must be 'slabs' or 'whole', got {mode!r}")
        # the slabs of all volumes become one batch, run two slabs per call: the same maths as one call per slab
        # (GroupNorm and padding act per sample), ~4x faster on CPU at 128^3 than single slabs, and the peak
        # memory stays two slabs' activations
        n, s, d = x.shape[0], self.config.model.size, self.config.model.slab_depth
        slabs = x.reshape(n, 1, NUM_SLABS, d, s, s).transpose(1, 2).reshape(n * NUM_SLABS, 1, d, s, s)
        h = torch.cat([self.EH(slabs[i : i + SLABS_PER_CALL]) for i in range(0, n * NUM_SLABS, SLABS_PER_CALL)])
        c, f, side = h.shape[1], h.shape[2], h.shape[3]
        return h.reshape(n, NUM_SLABS, c, f, side, side).transpose(1, 2).reshape(n, c, NUM_SLABS * f, side, side)

    @torch.no_grad()
    def encode(self, x: torch.Tensor, mode: str | None = None) -> torch.Tensor:
        """z_hat = E^G(E^H(x)) for volumes x (N, 1, S, S, S) in [-1, 1]; returns (N, L)."""
        missing = {"EH", "EG"} - set(self.parts)
        if missing:
            raise ValueError(f"this model has no trained {' or '.join(sorted(missing))}: it cannot encode")
        x = x.to(self.device, self.EG.out.weight.dtype)
        return self.EG(self.encode_features(x, mode))

    def part_state_dicts(self) -> dict[str, dict[str, torch.Tensor]]:
        return {name: getattr(self, name).state_dict() for name in self.parts}

    def save(self, path: str | Path, extra: dict | None = None, ema_generator: dict | None = None) -> Path:
        """Write a checkpoint (config, data contract, the state dicts of ``parts``) atomically."""
        from ..checkpoint import save_checkpoint

        return save_checkpoint(self, path, extra=extra, ema_generator=ema_generator)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameter_table(model: HAGAN) -> dict[str, int]:
    """Trainable parameters per block (G^A, G^L, G^H, D^H, D^L, E^H, E^G) and per network, and the total."""
    blocks = {
        "G^A": model.G.trunk,
        "G^L": model.G.low,
        "G^H": model.G.high,
        "D^H": model.D.high,
        "D^L": model.D.low,
        "E^H": model.EH,
        "E^G": model.EG,
    }
    table = {name: count_parameters(m) for name, m in blocks.items()}
    table.update({name: count_parameters(getattr(model, name)) for name in PARTS})
    table["total"] = sum(table[name] for name in PARTS)
    return table
