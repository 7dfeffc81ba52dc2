"""The HA-GAN losses (Sun et al. 2022, Sec. III) and the options beyond the reference, as one object.

:class:`HAGANLoss` is built once from the training config and the model. Per iteration, :meth:`HAGANLoss.draw`
makes what the four phases share (one slab start r on the feature grid, so that real and generated slabs cover the
same slices; S^H(x); x_low; two latent batches), then the loop calls one method per phase, each returning the loss
to backpropagate and the extra numbers to log:

1. D:   real (S^H(x), x_low) -> 1, fake G(z_d, r) -> 0 [+ class CE on real] [+ R1 on real]
2. G:   D(G(z_g, r)) -> 1 [+ class_weight_g * class CE]
3. E^H: L1(G^H(E^H(S^H(x))), S^H(x)), G frozen
4. E^G: z_hat = E^G(E^H of all 8 slabs, no grad); (L1(G(z_hat, r) slab) + L1(low-res)) / 2, G frozen

The loop owns the rest: order, which network has gradients, optimiser steps, grad scalers, non-finite losses and
the EMA schedule (:meth:`HAGANLoss.update_ema` is the EMA's maths). Every loss is computed in float32, whatever the
autocast dtype of the forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import NUM_SLABS, TrainConfig
from ..models.discriminator import DiscriminatorOutput
from ..models.hagan import HAGAN

#: The four phases of an iteration, in order; each updates the network of the same name.
PHASES = ("D", "G", "EH", "EG")


def bce(logit: torch.Tensor, target: float) -> torch.Tensor:
    logit = logit.float()
    return F.binary_cross_entropy_with_logits(logit, torch.full_like(logit, target))


def discriminator_loss(real: DiscriminatorOutput, fake: DiscriminatorOutput, tc: TrainConfig) -> torch.Tensor:
    """real -> 1, fake -> 0: on the averaged logit (reference) or on D^H and D^L separately, weighted."""
    if tc.d_loss == "averaged":
        return bce(real.logit, 1.0) + bce(fake.logit, 0.0)
    high = bce(real.high, 1.0) + bce(fake.high, 0.0)
    low = bce(real.low, 1.0) + bce(fake.low, 0.0)
    return tc.d_high_weight * high + tc.d_low_weight * low


def generator_loss(fake: DiscriminatorOutput, tc: TrainConfig) -> torch.Tensor:
    """The non-saturating loss: fake -> 1."""
    if tc.d_loss == "averaged":
        return bce(fake.logit, 1.0)
    return tc.d_high_weight * bce(fake.high, 1.0) + tc.d_low_weight * bce(fake.low, 1.0)


def class_loss(out: DiscriminatorOutput, labels: torch.Tensor | None) -> torch.Tensor | None:
    """Cross-entropy of the averaged class logits (conditional models), else None."""
    if labels is None or out.class_logit is None:
        return None
    return F.cross_entropy(out.class_logit.float(), labels)


def r1_penalty(out: DiscriminatorOutput, inputs: tuple[torch.Tensor, ...], tc: TrainConfig) -> torch.Tensor:
    """gamma / 2 * E ||grad_x D(x)||^2 over the real inputs (slab and low-resolution volume) of D."""
    score = out.logit if tc.d_loss == "averaged" else out.high + out.low
    grads = torch.autograd.grad(score.float().sum(), inputs, create_graph=True)
    sq = sum(g.float().pow(2).flatten(1).sum(1) for g in grads)
    assert isinstance(sq, torch.Tensor)  # a sum over at least one gradient
    return 0.5 * tc.r1_gamma * sq.mean()


def l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.l1_loss(a.float(), b.float())


def low_res(x: torch.Tensor, factor: int, how: str) -> torch.Tensor:
    """x_low: the whole volume (N, C, S, S, S) at the feature grid's resolution, (N, C, S/factor, ...)."""
    if how == "nearest":  # the reference: F.interpolate(scale_factor=1/4), i.e. every 4th voxel
        return x[:, :, ::factor, ::factor, ::factor]
    return F.avg_pool3d(x, kernel_size=factor)


@torch.no_grad()
def ema_update(ema: nn.Module, live: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * live for parameters; buffers are copied."""
    for e, p in zip(ema.parameters(), live.parameters()):
        e.lerp_(p, 1.0 - decay)
    for eb, b in zip(ema.buffers(), live.buffers()):
        eb.copy_(b)


@dataclass(frozen=True)
class PhaseInputs:
    """What the four phases of one iteration share.

    x: the real batch (N, 1, S, S, S) in [-1, 1]; y: (N,) class labels or None; r: the slab start in image slices
    (a multiple of the upsampling factor S/F); real_slab: S^H(x), (N, 1, S/8, S, S); real_low: x_low,
    (N, 1, F, F, F); z_d, z_g: (N, L) latents for D's fakes and for G's phase.
    """

    x: torch.Tensor
    y: torch.Tensor | None
    r: int
    real_slab: torch.Tensor
    real_low: torch.Tensor
    z_d: torch.Tensor
    z_g: torch.Tensor


Phase = tuple[torch.Tensor, dict[str, float]]


class HAGANLoss:
    """Each phase's maths for ``model`` under the training options ``tc`` (stylegan2-ada's loss object, for HA-GAN).

    Each phase method expects that only its own network has ``requires_grad`` (the loop arranges it) and returns
    (the loss, a 0-d float32 tensor; its named parts as floats, e.g. ``loss_D_r1``).
    """

    def __init__(self, model: HAGAN, tc: TrainConfig) -> None:
        self.model, self.tc = model, tc
        self.mcfg = model.config.model

    def draw(self, x: torch.Tensor, y: torch.Tensor | None, gen: torch.Generator) -> PhaseInputs:
        """The slab start and both latent batches from ``gen`` (on the CPU, so runs are reproducible across devices),
        S^H(x) and x_low. x: (N, 1, S, S, S); y: (N,) or None."""
        mcfg = self.mcfg
        k = int(torch.randint(mcfg.feature_size - mcfg.feature_slab_depth + 1, (1,), generator=gen))
        r = k * mcfg.upsample
        real_slab = self.model.select_image_slab(x, r)
        real_low = low_res(x, mcfg.upsample, self.tc.low_res)
        z_d = torch.randn(x.shape[0], mcfg.latent_dim, generator=gen).to(x.device)
        z_g = torch.randn(x.shape[0], mcfg.latent_dim, generator=gen).to(x.device)
        return PhaseInputs(x, y, r, real_slab, real_low, z_d, z_g)

    def phase(self, name: str, inputs: PhaseInputs) -> Phase:
        """The loss of phase ``name`` (one of PHASES)."""
        method = {"D": self.discriminator, "G": self.generator, "EH": self.encoder_high, "EG": self.encoder_global}
        return method[name](inputs)

    def discriminator(self, b: PhaseInputs) -> Phase:
        model, tc, parts = self.model, self.tc, {}
        with torch.no_grad():
            fake_slab, fake_low = model.G(b.z_d, b.r, b.y)
        real_slab, real_low = b.real_slab, b.real_low
        if tc.r1_gamma > 0:  # R1 differentiates D's score with respect to its real inputs
            real_slab = real_slab.detach().requires_grad_(True)
            real_low = real_low.detach().requires_grad_(True)
        real = model.D(real_slab, real_low, b.r)
        fake = model.D(fake_slab, fake_low, b.r)
        loss = discriminator_loss(real, fake, tc)
        cls = class_loss(real, b.y)
        if cls is not None:
            parts["loss_D_class"] = float(cls.detach())
            loss = loss + cls
        if tc.r1_gamma > 0:
            r1 = r1_penalty(real, (real_slab, real_low), tc)
            parts["loss_D_r1"] = float(r1.detach())
            loss = loss + r1
        return loss, parts

    def generator(self, b: PhaseInputs) -> Phase:
        model, tc, parts = self.model, self.tc, {}
        fake_slab, fake_low = model.G(b.z_g, b.r, b.y)
        out = model.D(fake_slab, fake_low, b.r)
        loss = generator_loss(out, tc)
        cls = class_loss(out, b.y)
        if cls is not None:
            parts["loss_G_class"] = float(cls.detach())
            loss = loss + tc.class_weight_g * cls
        return loss, parts

    def encoder_high(self, b: PhaseInputs) -> Phase:
        recon = self.model.G.high(self.model.EH(b.real_slab))
        return self.tc.encoder_weight * l1(recon, b.real_slab), {}

    def encoder_global(self, b: PhaseInputs) -> Phase:
        model, d = self.model, self.mcfg.slab_depth
        with torch.no_grad():  # E^H of every slab without gradient, as the reference computes them
            feats = torch.cat([model.EH(b.x[:, :, i * d : (i + 1) * d]) for i in range(NUM_SLABS)], dim=2)
        z_hat = model.EG(feats)
        fake_slab, fake_low = model.G(z_hat, b.r, b.y)
        rec = (l1(fake_slab, b.real_slab) + l1(fake_low, b.real_low)) / 2
        return self.tc.encoder_weight * rec, {}

    def update_ema(self, ema: nn.Module) -> None:
        """Move the EMA generator ``ema`` towards the live G by 1 - ``train.ema_decay``."""
        ema_update(ema, self.model.G, self.tc.ema_decay)
