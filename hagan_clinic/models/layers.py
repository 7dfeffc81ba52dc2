"""Building blocks shared by the HA-GAN networks.

The reference generator upsamples by nearest neighbour and then applies a 3x3x3 convolution. :class:`UpConv3d`
computes exactly that function without materialising the upsampled tensor: along each axis, output voxel 2i+p
of "upsample then convolve" only ever sees two distinct input voxels, so the 3-tap kernel folds into a 2-tap
kernel per output phase p. The eight phases of a 3D output become 8 x C_out channels of one 2x2x2 convolution
on the (zero-padded) low-resolution input, which are then interleaved. This needs 8/27 of the multiply-adds
and never allocates the C_in x (2n)^3 upsampled tensor that dominates the reference's memory at 256^3. The
parameters are an ordinary Conv3d's, so state dicts stay interchangeable with the reference's.

The interleaving is one autograd function (:class:`_Interleave`): its backward gathers the eight phases' gradients
from the output's strided views into one buffer. Written as eight slice assignments instead, autograd would make a
zero-filled gradient of the whole 8-phase tensor for each phase and add them up, which costs more than the
convolution's own backward at 128^3 and above. (One stride-2 transposed convolution with the folded 4-tap kernel
computes the same function; oneDNN runs its forward 1.5-2.5x slower than this, so it is not used.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

# _FOLD[p] maps the three taps (k = 0, 1, 2) of a kernel axis to the two taps seen by output phase p:
# phase 0 reads input voxels (i-1, i) with weights (w0, w1 + w2); phase 1 reads (i, i+1) with (w0 + w1, w2).
_FOLD = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])


class UpConv3d(nn.Conv3d):
    """Nearest-neighbour x2 upsampling followed by Conv3d(k=3, padding=1): (N, Ci, D, H, W) -> (N, Co, 2D, 2H, 2W).

    Set ``phase_decomposed = False`` to run the literal upsample-then-convolve (same function, for comparison).
    """

    phase_decomposed: bool = True

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, kernel_size=3, stride=1, padding=1, bias=bias)

    def folded_weight(self) -> torch.Tensor:
        """The (8 * Co, Ci, 2, 2, 2) kernel of the eight output phases, phase-major (p_d, p_h, p_w)."""
        a = _FOLD.to(self.weight)
        w = torch.einsum("pak,qbl,rcm,oiklm->pqroiabc", a, a, a, self.weight)
        return w.reshape(8 * self.out_channels, self.in_channels, 2, 2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.phase_decomposed:
            return super().forward(F.interpolate(x, scale_factor=2, mode="nearest"))
        n, _, d, h, w = x.shape
        bias = None if self.bias is None else self.bias.repeat(8)
        # padding=1 with a 2-tap kernel: output j sees inputs (j-1, j), without a padded copy of x
        y = F.conv3d(x, self.folded_weight(), bias, padding=1)  # (N, 8Co, d+1, h+1, w+1)
        return _Interleave.apply(y.view(n, 2, 2, 2, self.out_channels, d + 1, h + 1, w + 1))


#: The eight output phases (pd, ph, pw) of a x2 upsampling, in the order of UpConv3d's phase-major channels.
_PHASES = [(pd, ph, pw) for pd in (0, 1) for ph in (0, 1) for pw in (0, 1)]


class _Interleave(torch.autograd.Function):
    """(N, 2, 2, 2, Co, d+1, h+1, w+1) phase outputs -> (N, Co, 2d, 2h, 2w): output voxel (2i+pd, 2j+ph, 2k+pw)
    is phase (pd, ph, pw) at (i+pd, j+ph, k+pw)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        n, _, _, _, co, d1, h1, w1 = y.shape
        d, h, w = d1 - 1, h1 - 1, w1 - 1
        ctx.shape = y.shape
        out = y.new_empty((n, co, 2 * d, 2 * h, 2 * w))
        for pd, ph, pw in _PHASES:
            out[:, :, pd::2, ph::2, pw::2] = y[:, pd, ph, pw, :, pd : pd + d, ph : ph + h, pw : pw + w]
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        n, _, _, _, co, d1, h1, w1 = ctx.shape
        d, h, w = d1 - 1, h1 - 1, w1 - 1
        g = grad.new_empty(ctx.shape)
        for pd, ph, pw in _PHASES:
            phase = g[:, pd, ph, pw]
            phase[:, :, pd : pd + d, ph : ph + h, pw : pw + w] = grad[:, :, pd::2, ph::2, pw::2]
            # the one border slice per axis that no output voxel reads gets no gradient
            phase[:, :, d if pd == 0 else 0].zero_()
            phase[:, :, :, h if ph == 0 else 0].zero_()
            phase[:, :, :, :, w if pw == 0 else 0].zero_()
        return g


class ConvNormAct(nn.Module):
    """conv -> GroupNorm -> ReLU, the unit of G and of both encoders."""

    def __init__(self, conv: nn.Conv3d, groups: int) -> None:
        super().__init__()
        self.conv = conv
        self.norm = nn.GroupNorm(groups, conv.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in place: GroupNorm's backward needs its input, not its output, so this is safe under autograd too
        return F.relu(self.norm(self.conv(x)), inplace=True)


def outside_autocast(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` in the layer's own dtype, autocast or not: for a layer whose weights are large next to its
    output (a fully connected layer on N vectors, a convolution that leaves one voxel), autocast would cast the
    weights to bf16 on every forward pass, which costs more than the arithmetic it speeds up."""
    weight = next(layer.parameters())
    if x.device.type not in ("cpu", "cuda"):  # no autocast there (older torch refuses even a disabled one)
        return layer(x)
    with torch.autocast(x.device.type, enabled=False):
        return layer(x.to(weight.dtype))


def conv3(cin: int, cout: int) -> nn.Conv3d:
    return nn.Conv3d(cin, cout, kernel_size=3, stride=1, padding=1)


def down4(cin: int, cout: int) -> nn.Conv3d:
    """Conv k4 s2 p1: halves every spatial axis."""
    return nn.Conv3d(cin, cout, kernel_size=4, stride=2, padding=1)


def sn(module: nn.Module) -> nn.Module:
    """Spectral normalisation with one power iteration per training step, as in the reference."""
    return spectral_norm(module, n_power_iterations=1, eps=1e-12)


def check_input(x: torch.Tensor, expected: tuple[int | None, ...], what: str) -> None:
    """Raise ValueError unless x has len(expected) dims matching expected (None = any size)."""
    shape = tuple(x.shape)
    if len(shape) != len(expected) or any(e is not None and e != s for e, s in zip(expected, shape, strict=True)):
        want = "(" + ", ".join("N" if e is None else str(e) for e in expected) + ")"
        raise ValueError(f"{what}: expected shape {want}, got {shape}")
