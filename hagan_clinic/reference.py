"""Import checkpoints of the reference HA-GAN implementation (the published COPDGene and GSP weights).

The reference saves four files per snapshot, ``G_iterN.pth``, ``D_iterN.pth``, ``E_iterN.pth`` (E^H) and
``Sub_E_iterN.pth`` (E^G), each ``{"model": state_dict, "optimizer": ...}`` with DataParallel's ``module.``
prefix. Its spectral norm is its own layer: ``weight`` is stored un-normalised, ``u0`` (1 x out) is the
power-iteration vector and ``sv0`` the last singular value. Our D uses torch's spectral-norm parametrization,
which keeps both power-iteration vectors; we derive them from ``u0`` exactly as the reference's forward does
(v = normalise(u0 W), u = normalise(W v)), so the imported D computes the same normalised weight in eval mode.

Geometry (latent size, widths, number of classes) is read from the tensors' shapes; the output size is
given, and checked against the layers present.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import Config, ConfigError, apply_overrides
from .errors import HaganError
from .io.torch_files import CheckpointError, load_untrusted
from .models.hagan import HAGAN

# (our module path, reference module path, spectral-normalised?) per network, generated from the geometry
_Pairs = list[tuple[str, str, bool]]


class ReferenceImportError(HaganError):
    """Reference weights that cannot be converted; the message names the keys at fault."""


def read_reference_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A reference .pth file's model state dict, without DataParallel's ``module.`` prefix."""
    try:
        obj = load_untrusted(path, what="reference checkpoint")
    except CheckpointError as err:
        raise ReferenceImportError(str(err)) from None
    return strip_reference_state_dict(obj, str(path))


def strip_reference_state_dict(obj: object, what: str = "state dict") -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ReferenceImportError(f"{what}: expected a state dict of tensors (or {{'model': state_dict}})")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _pairs_G(model: HAGAN) -> _Pairs:
    pairs = [("trunk.fc", "fc1", False)]
    for i in range(len(model.G.trunk.blocks)):
        pairs += [
            (f"trunk.blocks.{i}.conv", f"tp_conv{i + 1}", False),
            (f"trunk.blocks.{i}.norm", f"bn{i + 1}", False),
        ]
    n = len(model.G.trunk.blocks)  # G^H's layers continue the trunk's numbering (tp_conv6, bn6, tp_conv7)
    for i, stage in enumerate(model.G.high.stages):
        pairs.append((f"high.stages.{i}.conv", f"tp_conv{n + i + 1}", False))
        if stage.norm is not None:
            pairs.append((f"high.stages.{i}.norm", f"bn{n + i + 1}", False))
    for i in range(len(model.G.low.blocks)):
        pairs += [
            (f"low.blocks.{i}.conv", f"sub_G.tp_conv{i + 1}", False),
            (f"low.blocks.{i}.norm", f"sub_G.bn{i + 1}", False),
        ]
    pairs.append(("low.out", f"sub_G.tp_conv{len(model.G.low.blocks) + 1}", False))
    return pairs


def _pairs_D(model: HAGAN) -> _Pairs:
    high, low = model.D.high.convs, model.D.low.convs
    # the reference numbers D^H's convs so that the last is conv7 and D^L's so that the last is conv5
    pairs = [(f"high.convs.{j}", f"conv{j + 8 - len(high)}", True) for j in range(len(high))]
    pairs += [("high.fc1", "fc1", True), ("high.fc2", "fc2", True)]
    if model.D.high.fc_class is not None:
        pairs.append(("high.fc_class", "fc2_class", True))
    pairs += [(f"low.convs.{j}", f"sub_D.conv{j + 6 - len(low)}", True) for j in range(len(low))]
    return pairs


def _pairs_EH(model: HAGAN) -> _Pairs:
    pairs = []
    for i in range(len(model.EH.blocks)):
        pairs += [(f"blocks.{i}.conv", f"conv{i + 1}", False), (f"blocks.{i}.norm", f"bn{i + 1}", False)]
    return pairs


def _pairs_EG(model: HAGAN) -> _Pairs:
    first = 5 - len(model.EG.blocks)
    pairs = []
    for i in range(len(model.EG.blocks)):
        pairs += [
            (f"blocks.{i}.conv", f"conv{i + first}", False),
            (f"blocks.{i}.norm", f"bn{i + first}", False),
        ]
    pairs.append(("out", "conv5", False))
    return pairs


_PAIRS = {"G": _pairs_G, "D": _pairs_D, "EH": _pairs_EH, "EG": _pairs_EG}
_FILE_NAMES = {"G": "generator", "D": "discriminator", "EH": "encoder (E)", "EG": "sub-encoder (Sub_E)"}


def infer_config(sds: Mapping[str, Mapping[str, torch.Tensor]], size: int, overrides: tuple[str, ...] = ()) -> Config:
    """The config whose networks have the reference tensors' shapes (norm groups: the reference's 8)."""

    def shape(part: str, key: str) -> tuple[int, ...]:
        try:
            return tuple(sds[part][key].shape)
        except KeyError:
            raise ReferenceImportError(f"{_FILE_NAMES[part]}: missing key '{key}'") from None

    latent = shape("EG", "conv5.weight")[0]
    fc_in = shape("G", "fc1.weight")[1]
    if fc_in < latent:
        raise ReferenceImportError(
            f"generator: fc1.weight has shape {shape('G', 'fc1.weight')}: {fc_in} inputs, fewer than the latent size"
            f" {latent} (the outputs of Sub_E conv5.weight)"
        )
    model = {
        "size": size,
        "latent_dim": latent,
        "num_classes": fc_in - latent,
        "g_width": shape("G", "bn1.weight")[0] // 16,
        "e_ground_width": shape("EG", "conv5.weight")[1],
        "norm_groups": 8,
    }
    if "D" in sds:
        model["d_high_width"] = shape("D", "conv6.weight")[0]
        model["d_low_width"] = shape("D", "sub_D.conv5.weight")[1]
    # the published weights were trained on the reference's preprocessing, whose grid has no defined spacing;
    # the user's --set overrides come after these defaults
    defaults = ("data.resize=reference", "data.spacing_mm=null")
    data = apply_overrides({"model": model}, (*defaults, *overrides))
    try:
        return Config.from_dict(data, source="reference geometry")
    except ConfigError as err:
        raise ReferenceImportError(str(err)) from None


def _sn_vectors(weight: torch.Tensor, u0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = weight.reshape(weight.shape[0], -1)
    v = F.normalize(u0.reshape(1, -1) @ w, dim=1, eps=1e-12).reshape(-1)
    u = F.normalize(w @ v, dim=0, eps=1e-12)
    return u, v


def convert_part(part: str, ref: Mapping[str, torch.Tensor], model: HAGAN) -> dict[str, torch.Tensor]:
    """Reference state dict of one network -> our state dict for ``model.<part>``; strict on both sides."""
    target = getattr(model, part).state_dict()
    out: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}  # our key -> the reference key it comes from, for error messages
    spectral_layers: list[tuple[str, str, torch.Tensor, torch.Tensor]] = []
    used: set[str] = set()
    missing: list[str] = []

    def take(key: str) -> torch.Tensor | None:
        if key not in ref:
            missing.append(key)
            return None
        used.add(key)
        return ref[key]

    def put(key: str, tensor: torch.Tensor, their_key: str) -> None:
        out[key] = tensor
        source[key] = their_key

    for ours, theirs, spectral in _PAIRS[part](model):
        bias = take(f"{theirs}.bias")
        if bias is not None:
            put(f"{ours}.bias", bias, f"{theirs}.bias")
        weight = take(f"{theirs}.weight")
        if not spectral:
            if weight is not None:
                put(f"{ours}.weight", weight, f"{theirs}.weight")
            continue
        u0 = take(f"{theirs}.u0")
        used.add(f"{theirs}.sv0")  # a record of the last estimate; the forward recomputes it
        if weight is not None:
            put(f"{ours}.parametrizations.weight.original", weight, f"{theirs}.weight")
            if u0 is not None:  # the power-iteration vectors follow once the weight's shape is known good
                spectral_layers.append((ours, theirs, weight, u0))

    name = _FILE_NAMES[part]
    if missing:
        raise ReferenceImportError(
            f"{name}: missing keys {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else "")
        )
    unknown = sorted(set(ref) - used)
    if unknown:
        raise ReferenceImportError(
            f"{name}: unknown keys {', '.join(unknown[:8])}" + (" ..." if len(unknown) > 8 else "")
        )
    for key, tensor in out.items():
        if key not in target:
            raise ReferenceImportError(f"{name}: no place for key {key} in our {part}")
        if tuple(target[key].shape) != tuple(tensor.shape):
            raise ReferenceImportError(
                f"{name}: {source[key]} has shape {tuple(tensor.shape)}, expected {tuple(target[key].shape)}"
                f" for this geometry (our {key})"
            )
    for ours, theirs, weight, u0 in spectral_layers:
        if u0.numel() != weight.shape[0]:
            raise ReferenceImportError(
                f"{name}: {theirs}.u0 has shape {tuple(u0.shape)}, expected (1, {weight.shape[0]}), one entry per"
                f" output channel of {theirs}.weight"
            )
        u, v = _sn_vectors(weight.float(), u0.float())
        out[f"{ours}.parametrizations.weight.0._u"] = u
        out[f"{ours}.parametrizations.weight.0._v"] = v
    absent = sorted(set(target) - set(out))
    if absent:
        raise ReferenceImportError(f"{name}: the reference weights leave {', '.join(absent[:8])} unset")
    return {k: v.float().clone() for k, v in out.items()}


def import_reference_state_dicts(
    sds: Mapping[str, Mapping[str, torch.Tensor]], size: int, overrides: tuple[str, ...] = ()
) -> HAGAN:
    """Build a HAGAN from reference state dicts keyed 'G', 'EH', 'EG' and optionally 'D'."""
    if size not in (128, 256):
        raise ReferenceImportError(f"the reference implementation exists for sizes 128 and 256, not {size}")
    for need in ("G", "EH", "EG"):
        if need not in sds:
            raise ReferenceImportError(f"the {_FILE_NAMES[need]} weights are required")
    sds = {k: strip_reference_state_dict(v, _FILE_NAMES[k]) for k, v in sds.items()}
    config = infer_config(sds, size, overrides)
    model = HAGAN(config)
    expected_convs = len(model.D.high.convs) if "D" in sds else None
    if expected_convs is not None and (f"conv{7 - expected_convs}.weight" in sds["D"]):
        raise ReferenceImportError(
            f"discriminator: has more layers than the {size}^3 reference"
            f" (conv{7 - expected_convs}.weight; weights for another size?)"
        )
    if f"conv{4 - len(model.EG.blocks)}.weight" in sds["EG"]:
        raise ReferenceImportError(
            f"sub-encoder (Sub_E): has more layers than the {size}^3 reference"
            f" (conv{4 - len(model.EG.blocks)}.weight; weights for another size?)"
        )
    for part, ref in sds.items():
        getattr(model, part).load_state_dict(convert_part(part, ref, model))
    model.parts = tuple(p for p in ("G", "D", "EH", "EG") if p in sds)
    return model.eval()


def import_reference(
    generator: str | Path,
    encoder: str | Path,
    sub_encoder: str | Path,
    size: int,
    discriminator: str | Path | None = None,
    overrides: tuple[str, ...] = (),
) -> HAGAN:
    """Read the reference's .pth files and return the equivalent HAGAN (eval mode)."""
    files = {"G": generator, "EH": encoder, "EG": sub_encoder}
    if discriminator is not None:
        files["D"] = discriminator
    sds = {part: read_reference_file(path) for part, path in files.items()}
    return import_reference_state_dicts(sds, size, overrides)
