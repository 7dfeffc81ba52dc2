"""An independent, functional re-implementation of the reference HA-GAN forward passes, for parity tests.

Everything here works on raw reference-format state dicts (the key names of the reference's ``G``, ``D``,
``E`` and ``Sub_E`` checkpoints, with or without DataParallel's ``module.`` prefix, bare or wrapped as
``{"model": ..., "optimizer": ...}``) and is written directly with ``torch.nn.functional``. It deliberately
imports nothing from ``hagan_clinic``: the point is to check our networks against a second, literal reading
of the reference maths (upsample *then* convolve, the reference's own spectral-norm estimate, the reference's
layer numbering), so that a mistake shared by the two would have to be made twice.

Widths are read from the tensors' shapes; the output size S (128 or 256) is an argument, because G's and E's
tensors are the same at both sizes and only the layer numbering / upsampling pattern differs.

Also here: :func:`reference_shapes`, the key -> shape table of a reference checkpoint for a given geometry
(at the default widths it must reproduce ``fixtures/reference_state_dict_keys.json``), and
:func:`random_reference_state_dicts`, which fills such a table with sensibly scaled random tensors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

GROUPS = 8  # the reference's GroupNorm(8, C) everywhere in G, E and Sub_E
NUM_SLABS = 8  # the volume is 8 slabs of S/8 slices
GN_EPS = 1e-5  # nn.GroupNorm's default, which the reference uses
NETWORKS = ("G", "D", "E", "Sub_E")


# --------------------------------------------------------------------------------------------------------------
# state-dict plumbing


def unwrap(obj: Mapping) -> dict[str, torch.Tensor]:
    """A reference checkpoint ({'model': sd, ...}) or state dict -> state dict without the 'module.' prefix."""
    if "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    return {(k[7:] if k.startswith("module.") else k): v for k, v in obj.items()}


def wrap(sd: Mapping[str, torch.Tensor]) -> dict:
    """A state dict as the reference saves it: DataParallel prefix, inside {'model', 'optimizer'}."""
    return {"model": {"module." + k: v for k, v in sd.items()}, "optimizer": {}}


def _first_layer(size: int) -> int:
    """The reference numbers D's and Sub_E's layers so that the 128^3 models simply lack conv1."""
    if size not in (128, 256):
        raise ValueError(f"the reference exists at 128 and 256, not {size}")
    return 1 if size == 256 else 2


# --------------------------------------------------------------------------------------------------------------
# primitives


def _conv(x: torch.Tensor, sd: Mapping, name: str, stride=1, padding=0) -> torch.Tensor:
    return F.conv3d(x, sd[f"{name}.weight"], sd[f"{name}.bias"], stride=stride, padding=padding)


def _gn_relu(x: torch.Tensor, sd: Mapping, name: str) -> torch.Tensor:
    return F.relu(F.group_norm(x, GROUPS, sd[f"{name}.weight"], sd[f"{name}.bias"], eps=GN_EPS))


def _up(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="nearest")


def _lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.2)


def sn_weight(sd: Mapping, name: str) -> torch.Tensor:
    """The reference spectral norm in eval mode: one power step from the stored u0, weight / sigma.

    W = weight viewed (out, -1); v = normalise(u0 W); u = normalise(v W^T); sigma = (v W^T) u^T.
    u0 is not updated (eval mode).
    """
    weight = sd[f"{name}.weight"]
    u0 = sd[f"{name}.u0"]
    w = weight.reshape(weight.shape[0], -1)
    v = F.normalize(u0 @ w, dim=1)  # (1, in)
    wv = v @ w.t()  # (1, out)
    u = F.normalize(wv, dim=1)
    sigma = (wv @ u.t()).reshape(())
    return weight / sigma


def _sn_conv(x: torch.Tensor, sd: Mapping, name: str, stride=1, padding=0) -> torch.Tensor:
    return F.conv3d(x, sn_weight(sd, name), sd[f"{name}.bias"], stride=stride, padding=padding)


def _sn_linear(x: torch.Tensor, sd: Mapping, name: str) -> torch.Tensor:
    return F.linear(x, sn_weight(sd, name), sd[f"{name}.bias"])


# --------------------------------------------------------------------------------------------------------------
# G


def g_latent(g: Mapping, z: torch.Tensor, size: int, labels: torch.Tensor | None = None) -> torch.Tensor:
    """G^A: z (N, L) [+ one-hot labels] -> h_latent (N, 2c, S/4, S/4, S/4)."""
    g = unwrap(g)
    _first_layer(size)
    n_classes = g["fc1.weight"].shape[1] - z.shape[1]
    if n_classes:
        z = torch.cat([z, F.one_hot(torch.as_tensor(labels).long(), n_classes).to(z.dtype)], dim=1)
    h = F.linear(z, g["fc1.weight"], g["fc1.bias"])
    h = h.view(z.shape[0], g["tp_conv1.weight"].shape[1], 4, 4, 4)
    h = _gn_relu(_conv(h, g, "tp_conv1", padding=1), g, "bn1")
    upsampled = (2, 3, 4, 5) if size == 256 else (2, 3, 4)  # at 128 tp_conv5 keeps the 32^3 grid
    for i in (2, 3, 4, 5):
        if i in upsampled:
            h = _up(h)
        h = _gn_relu(_conv(h, g, f"tp_conv{i}", padding=1), g, f"bn{i}")
    return h


def g_high(g: Mapping, h: torch.Tensor) -> torch.Tensor:
    """G^H on a feature map (whole or a slab of it): up, tp_conv6, bn6, relu, up, tp_conv7, tanh."""
    g = unwrap(g)
    h = _gn_relu(_conv(_up(h), g, "tp_conv6", padding=1), g, "bn6")
    return torch.tanh(_conv(_up(h), g, "tp_conv7", padding=1))


def g_low(g: Mapping, h: torch.Tensor) -> torch.Tensor:
    """G^L (sub_G), no upsampling: (N, 2c, F, F, F) -> (N, 1, F, F, F)."""
    g = unwrap(g)
    h = _gn_relu(_conv(h, g, "sub_G.tp_conv1", padding=1), g, "sub_G.bn1")
    h = _gn_relu(_conv(h, g, "sub_G.tp_conv2", padding=1), g, "sub_G.bn2")
    return torch.tanh(_conv(h, g, "sub_G.tp_conv3", padding=1))


def g_generate(g: Mapping, z: torch.Tensor, size: int, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Inference: the whole volume (N, 1, S, S, S)."""
    return g_high(g, g_latent(g, z, size, labels))


def g_train(
    g: Mapping, z: torch.Tensor, crop_idx: int, size: int, labels: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training mode: (slab (N, 1, S/8, S, S) for feature slices [crop_idx//4, +F/8), low-res (N, 1, F, F, F))."""
    h = g_latent(g, z, size, labels)
    k = crop_idx // 4
    depth = h.shape[2] // NUM_SLABS
    return g_high(g, h[:, :, k : k + depth]), g_low(g, h)


# --------------------------------------------------------------------------------------------------------------
# E (E^H) and Sub_E (E^G)


def e_high(e: Mapping, slab: torch.Tensor) -> torch.Tensor:
    """E^H on one slab (N, 1, S/8, S, S) -> (N, 2c, F/8, F, F)."""
    e = unwrap(e)
    h = _gn_relu(_conv(slab, e, "conv1", stride=2, padding=1), e, "bn1")
    h = _gn_relu(_conv(h, e, "conv2", padding=1), e, "bn2")
    return _gn_relu(_conv(h, e, "conv3", stride=2, padding=1), e, "bn3")


def e_ground(sub_e: Mapping, h: torch.Tensor, size: int) -> torch.Tensor:
    """E^G: (N, 2c, F, F, F) -> (N, L); flatten, not squeeze, so that N = 1 works."""
    sub_e = unwrap(sub_e)
    for i in range(_first_layer(size), 5):
        h = _gn_relu(_conv(h, sub_e, f"conv{i}", stride=2, padding=1), sub_e, f"bn{i}")
    return _conv(h, sub_e, "conv5").flatten(1)


def encode(e: Mapping, sub_e: Mapping, x: torch.Tensor, size: int) -> torch.Tensor:
    """z_hat of whole volumes (N, 1, S, S, S): E^H per slab, concatenated along D, then E^G."""
    d = x.shape[2] // NUM_SLABS
    feats = torch.cat([e_high(e, x[:, :, i * d : (i + 1) * d]) for i in range(NUM_SLABS)], dim=2)
    return e_ground(sub_e, feats, size)


# --------------------------------------------------------------------------------------------------------------
# D


def d_high(d: Mapping, slab: torch.Tensor, crop_idx: int, size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """D^H on a slab (N, 1, S/8, S, S) at output slice crop_idx -> (logit (N, 1), class logits (N, C) or None)."""
    d = unwrap(d)
    h = slab
    for i in range(_first_layer(size), 4):
        h = _lrelu(_sn_conv(h, d, f"conv{i}", stride=2, padding=1))
    h = _lrelu(_sn_conv(h, d, "conv4", stride=2, padding=(0, 1, 1)))
    h = _lrelu(_sn_conv(h, d, "conv5", stride=2, padding=(0, 1, 1)))
    h = _lrelu(_sn_conv(h, d, "conv6", stride=(1, 2, 2), padding=(0, 1, 1)))
    h = _lrelu(_sn_conv(h, d, "conv7"))
    h = h.flatten(1)
    position = torch.full((h.shape[0], 1), crop_idx / (size * 7 // 8), dtype=h.dtype)  # 224 or 112
    h = _lrelu(_sn_linear(torch.cat([h, position], dim=1), d, "fc1"))
    logit = _sn_linear(h, d, "fc2")
    class_logit = _sn_linear(h, d, "fc2_class") if "fc2_class.weight" in d else None
    return logit, class_logit


def d_low(d: Mapping, low: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """D^L (sub_D) on the low-resolution volume (N, 1, F, F, F) -> (logit (N, 1), class logits or None)."""
    d = unwrap(d)
    h = low
    for i in range(_first_layer(size), 5):
        h = _lrelu(_sn_conv(h, d, f"sub_D.conv{i}", stride=2, padding=1))
    h = _sn_conv(h, d, "sub_D.conv5").flatten(1)
    return h[:, :1], (h[:, 1:] if h.shape[1] > 1 else None)


def discriminate(d: Mapping, slab: torch.Tensor, low: torch.Tensor, crop_idx: int, size: int) -> dict:
    """D in eval mode: the D^H and D^L outputs and their averages ('logit', 'class_logit')."""
    high, high_class = d_high(d, slab, crop_idx, size)
    low_logit, low_class = d_low(d, low, size)
    class_logit = None if high_class is None else (high_class + low_class) / 2
    return {
        "high": high,
        "low": low_logit,
        "high_class": high_class,
        "low_class": low_class,
        "logit": (high + low_logit) / 2,
        "class_logit": class_logit,
    }


# --------------------------------------------------------------------------------------------------------------
# the reference checkpoint format: shapes and random weights


def reference_shapes(
    size: int,
    latent: int = 1024,
    num_classes: int = 0,
    g_width: int = 32,
    d_high_width: int = 512,
    d_low_width: int = 256,
    e_width: int = 256,
) -> dict[str, dict[str, tuple[int, ...]]]:
    """Key -> shape of the four reference checkpoints for a geometry (the defaults are the published one)."""
    first = _first_layer(size)
    k3, k4 = (3, 3, 3), (4, 4, 4)

    def conv(out: dict, name: str, cout: int, cin: int, kernel: tuple[int, ...]) -> None:
        out[f"{name}.weight"] = (cout, cin, *kernel)
        out[f"{name}.bias"] = (cout,)

    def norm(out: dict, name: str, ch: int) -> None:
        out[f"{name}.weight"] = (ch,)
        out[f"{name}.bias"] = (ch,)

    def sn(out: dict, name: str, cout: int, cin: int, kernel: tuple[int, ...] = ()) -> None:
        out[f"{name}.weight"] = (cout, cin, *kernel)
        out[f"{name}.bias"] = (cout,)
        out[f"{name}.u0"] = (1, cout)
        out[f"{name}.sv0"] = (1,)

    c = g_width
    G: dict[str, tuple[int, ...]] = {}
    G["fc1.weight"] = (16 * c * 4**3, latent + num_classes)
    G["fc1.bias"] = (16 * c * 4**3,)
    widths = [16 * c, 16 * c, 16 * c, 8 * c, 4 * c, 2 * c, c]  # input of tp_conv1, outputs of tp_conv1..6
    for i in range(1, 7):
        conv(G, f"tp_conv{i}", widths[i], widths[i - 1], k3)
        norm(G, f"bn{i}", widths[i])
    conv(G, "tp_conv7", 1, c, k3)
    conv(G, "sub_G.tp_conv1", c, 2 * c, k3)
    norm(G, "sub_G.bn1", c)
    conv(G, "sub_G.tp_conv2", c // 2, c, k3)
    norm(G, "sub_G.bn2", c // 2)
    conv(G, "sub_G.tp_conv3", 1, c // 2, k3)

    E: dict[str, tuple[int, ...]] = {}
    conv(E, "conv1", c, 1, k4)
    norm(E, "bn1", c)
    conv(E, "conv2", c, c, k3)
    norm(E, "bn2", c)
    conv(E, "conv3", 2 * c, c, k4)
    norm(E, "bn3", 2 * c)

    Sub_E: dict[str, tuple[int, ...]] = {}
    cin = 2 * c
    for i in range(first, 5):
        cout = e_width // 2 ** (4 - i)
        conv(Sub_E, f"conv{i}", cout, cin, k4)
        norm(Sub_E, f"bn{i}", cout)
        cin = cout
    conv(Sub_E, "conv5", latent, cin, k4)

    w = d_high_width
    D: dict[str, tuple[int, ...]] = {}
    cin = 1
    for i in range(first, 4):
        cout = w // 2 ** (6 - i)  # conv1 w/32, conv2 w/16, conv3 w/8
        sn(D, f"conv{i}", cout, cin, k4)
        cin = cout
    sn(D, "conv4", w // 4, cin, (2, 4, 4))
    sn(D, "conv5", w // 2, w // 4, (2, 4, 4))
    sn(D, "conv6", w, w // 2, (1, 4, 4))
    sn(D, "conv7", w // 4, w, (1, 4, 4))
    sn(D, "fc1", w // 8, w // 4 + 1)
    sn(D, "fc2", 1, w // 8)
    if num_classes:
        sn(D, "fc2_class", num_classes, w // 8)
    cin = 1
    for i in range(first, 5):
        cout = d_low_width // 2 ** (4 - i)
        sn(D, f"sub_D.conv{i}", cout, cin, k4)
        cin = cout
    sn(D, "sub_D.conv5", 1 + num_classes, cin, k4)
    return {"G": G, "D": D, "E": E, "Sub_E": Sub_E}


def random_reference_state_dicts(
    shapes: Mapping[str, Mapping[str, tuple[int, ...]]], seed: int = 0
) -> dict[str, dict[str, torch.Tensor]]:
    """Random tensors for a shape table, scaled like a default PyTorch init (std 1/sqrt(fan_in)).

    Norm layers (``bn*``) get weights near 1 and small biases; ``u0`` is a random, not normalised, row vector
    (the estimate is scale-free in u0); ``sv0`` a positive scalar (the forward never reads it).
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, generator=gen)

    out: dict[str, dict[str, torch.Tensor]] = {}
    for net, table in shapes.items():
        sd: dict[str, torch.Tensor] = {}
        for key, shape in table.items():
            layer, _, kind = key.rpartition(".")
            is_norm = layer.rpartition(".")[2].startswith("bn")
            if kind == "u0":  # un-normalised, as a freshly built reference layer stores it; the forward normalises
                sd[key] = randn(shape) * (0.5 + torch.rand((), generator=gen))
            elif kind == "sv0":
                sd[key] = 1.0 + torch.rand(shape, generator=gen)
            elif is_norm and kind == "weight":
                sd[key] = 1.0 + 0.1 * randn(shape)
            elif is_norm:
                sd[key] = 0.1 * randn(shape)
            else:
                fan_in = math.prod(table[f"{layer}.weight"][1:])
                sd[key] = randn(shape) * (1.0 if kind == "weight" else 0.5) / math.sqrt(fan_in)
        out[net] = sd
    return out
