"""The HA-GAN losses (Sun et al. 2022, Sec. III) and the options beyond the reference.

Every loss is computed in float32, whatever the autocast dtype of the forward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import TrainConfig
from ..models.discriminator import DiscriminatorOutput


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
    return 0.5 * tc.r1_gamma * sq.mean()


def l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.l1_loss(a.float(), b.float())
