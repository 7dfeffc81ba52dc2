"""The HA-GAN model object: the four networks, and generate / encode for whole volumes.

Encoding runs E^H on each of the 8 slabs separately and concatenates the results along D before E^G
(``model.encode_mode: slabs``, the default). That is exactly what E^G sees in training, where E^H's outputs
of the 8 slabs are computed one slab at a time; GroupNorm statistics and zero padding at slab borders then
match training. ``encode_mode: whole`` runs E^H once over the whole volume, as the paper's inference figure
draws it; the two differ at the slab borders and in E^H's normalisation statistics.

The model owns its file format, ``hagan-clinic/1``: one ``torch.save`` dict holding the resolved config, the data
contract and the state dicts of its parts::

    {"format": "hagan-clinic", "version": 1,
     "config": {...resolved config...}, "data_contract": {modality, window, spacing_mm, size},
     "parts": ["G", "EH", "EG", ...], "state_dicts": {"G": {...}, ...}, "extra": {...}}

Only plain containers, strings, numbers and tensors are stored, so every checkpoint loads with
``torch.load(weights_only=True)``: a checkpoint is untrusted input and must never be able to run code.
Files are written to a temporary name in the target folder and renamed into place, so a crash never leaves
a half-written checkpoint under the real name.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import NUM_SLABS, Config, ConfigError
from ..devices import torch_dtype
from ..errors import one_line, short_repr
from ..io.torch_files import CheckpointError, atomic_torch_save, check_expanded_size, file_sha256, load_untrusted
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
        #: inference copies of E^H and E^G per precision, with the weights' identity they were made from (a plain
        #: dict: not submodules, so never in a state dict, a checkpoint or a .to())
        self._inference: dict[str, tuple[tuple, nn.Module, nn.Module]] = {}

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

    def encode_features(self, x: torch.Tensor, mode: str | None = None, eh: nn.Module | None = None) -> torch.Tensor:
        """E^H of a whole volume (N, 1, S, S, S) -> (N, 2c, F, F, F), per slab or in one go (see module doc).
        ``eh``: the E^H to run (default the model's own; :meth:`encode` passes an inference copy)."""
        eh = self.EH if eh is None else eh
        s = self.config.model.size
        check_input(x, (None, 1, s, s, s), "volume")
        mode = mode or self.config.model.encode_mode
        if mode == "whole":
            return eh(x)
        if mode != "slabs":
            raise ValueError(f"encode mode must be 'slabs' or 'whole', got {mode!r}")
        # the slabs of all volumes become one batch, run two slabs per call: the same maths as one call per slab
        # (GroupNorm and padding act per sample), ~4x faster on CPU at 128^3 than single slabs, and the peak
        # memory stays two slabs' activations
        n, s, d = x.shape[0], self.config.model.size, self.config.model.slab_depth
        slabs = x.reshape(n, 1, NUM_SLABS, d, s, s).transpose(1, 2).reshape(n * NUM_SLABS, 1, d, s, s)
        h = torch.cat([eh(slabs[i : i + SLABS_PER_CALL]) for i in range(0, n * NUM_SLABS, SLABS_PER_CALL)])
        c, f, side = h.shape[1], h.shape[2], h.shape[3]
        return h.reshape(n, NUM_SLABS, c, f, side, side).transpose(1, 2).reshape(n, c, NUM_SLABS * f, side, side)

    def inference_encoders(self, precision: str = "fp32") -> tuple[nn.Module, nn.Module]:
        """E^H and E^G ready for inference at ``precision`` (fp32 or bf16): copies with the weights cast once and
        stored channels-last 3D, the layout in which oneDNN's and cuDNN's 3D convolutions run fastest; bf16 then runs
        without autocast's per-call casts of weights and activations, GroupNorm included.

        The copies are made at the first call and made again when the model's encoder weights change (a loaded
        state dict, an optimiser step, a move to another device). The model's own E^H and E^G are never touched, so
        a later fp32 caller, a saved checkpoint or a registered model sees the trained fp32 weights.
        """
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"encoder precision must be 'fp32' or 'bf16', got {precision!r}")
        dtype = torch_dtype(precision)
        params = [*self.EH.parameters(), *self.EG.parameters()]
        key = (str(self.device), tuple(p._version for p in params), tuple(p.data_ptr() for p in params))
        cached = self._inference.get(precision)
        if cached is None or cached[0] != key:
            parts = []
            for part in (self.EH, self.EG):
                twin = copy.deepcopy(part).eval().requires_grad_(False)
                # Module.to takes memory_format at run time, but torch's overloads do not declare it
                parts.append(twin.to(dtype=dtype, memory_format=torch.channels_last_3d))  # type: ignore[call-overload]
            cached = self._inference[precision] = (key, parts[0], parts[1])
        return cached[1], cached[2]

    @torch.no_grad()
    def encode(self, x: torch.Tensor, mode: str | None = None, precision: str | None = None) -> torch.Tensor:
        """z_hat = E^G(E^H(x)) for volumes x (N, 1, S, S, S) in [-1, 1]; returns (N, L).

        ``precision``: None runs the model's own encoders (their dtype, under the caller's autocast if any);
        "fp32" or "bf16" runs :meth:`inference_encoders` (the result is then in that dtype).
        """
        missing = {"EH", "EG"} - set(self.parts)
        if missing:
            raise ValueError(f"this model has no trained {' or '.join(sorted(missing))}: it cannot encode")
        eh, eg = (self.EH, self.EG) if precision is None else self.inference_encoders(precision)
        x = x.to(self.device, next(eh.parameters()).dtype)
        return eg(self.encode_features(x, mode, eh))

    def part_state_dicts(self) -> dict[str, dict[str, torch.Tensor]]:
        return {name: getattr(self, name).state_dict() for name in self.parts}

    def save(self, path: str | Path, extra: dict | None = None, ema_generator: dict | None = None) -> Path:
        """Write a checkpoint (config, data contract, the state dicts of ``parts``) atomically."""
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


# ---------------------------------------------------------------- the checkpoint file format
FORMAT = "hagan-clinic"
VERSION = 1
#: What each stored part is called in messages.
PART_NAMES = {
    "G": "generator",
    "D": "discriminator",
    "EH": "encoder E^H",
    "EG": "encoder E^G",
    "G_ema": "EMA generator",
}
#: A model over ten times the published one (80M parameters) is no checkpoint of ours: its config is refused
#: before anything is allocated for it.
MAX_PARAMETERS = 10**9


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: t.detach().cpu() for n, t in state.items()}


#: Config sections that set up commands (encode, regress, evaluate), not the model: a checkpoint does not carry them
#: (they take their defaults when it is read), so that it reads the same wherever it goes, also in versions that
#: predate these sections.
COMMAND_SECTIONS = ("encode", "regress", "evaluate")


def stored_config(config: Config) -> dict[str, Any]:
    """The config as a checkpoint stores it: everything but :data:`COMMAND_SECTIONS`."""
    return {k: v for k, v in config.to_dict().items() if k not in COMMAND_SECTIONS}


def save_checkpoint(
    model: HAGAN,
    path: str | Path,
    extra: dict[str, Any] | None = None,
    ema_generator: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write config, data contract and the state dicts of ``model.parts`` (plus an EMA generator) atomically."""
    state_dicts = {k: _cpu(v) for k, v in model.part_state_dicts().items()}
    if ema_generator is not None:
        state_dicts["G_ema"] = _cpu(ema_generator)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "config": stored_config(model.config),
        "data_contract": model.config.data_contract(),
        "parts": list(model.parts),
        "state_dicts": state_dicts,
        "extra": dict(extra or {}),
    }
    return atomic_torch_save(payload, path)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw checkpoint dict, validated for format; raises CheckpointError (one line) otherwise."""
    payload = load_untrusted(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not a hagan-clinic checkpoint (reference .pth files are converted with import-reference)"
        )
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {short_repr(payload.get('version'))} is not supported")
    check_expanded_size(payload, path)
    return payload


def _checkpoint_config(payload: dict[str, Any], path: str | Path) -> Config:
    if "config" not in payload:
        raise CheckpointError(f"{path}: the checkpoint carries no config (was it written by hagan-clinic?)")
    try:
        return Config.from_dict(payload["config"], source=f"{Path(path).name} config")
    except ConfigError as err:
        raise CheckpointError(str(err)) from None


def _state_dict(payload: dict[str, Any], part: str, path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of ``part``, checked to be tensors and finite: NaN or inf weights would only show as
    blank volumes or NaN features much later."""
    state_dicts = payload.get("state_dicts")
    state = state_dicts.get(part) if isinstance(state_dicts, dict) else None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise CheckpointError(f"{path}: the {PART_NAMES[part]} weights are missing or not tensors")
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(
                f"{path}: {PART_NAMES[part]} weights are not finite (NaN or inf in {short_repr(key)}); the file is "
                "damaged or its training diverged"
            )
    return state


def _check_fits(config: Config, states: dict[str, dict[str, torch.Tensor]], path: str | Path) -> None:
    """The model the config describes, built without memory ('meta' tensors), is bounded in size and every
    stored part has its keys and shapes, so that no config makes HAGAN(config) allocate more than the file holds."""
    with torch.device("meta"):
        skeleton = HAGAN(config)
    count = sum(p.numel() for p in skeleton.parameters())
    if count > MAX_PARAMETERS:
        raise CheckpointError(
            f"{path}: its config describes {count / 1e9:.1f} billion parameters, more than the "
            f"{MAX_PARAMETERS / 1e9:g} billion a checkpoint may have"
        )
    for part, state in states.items():
        expected = getattr(skeleton, part.removesuffix("_ema")).state_dict()
        wrong = next((k for k in expected if k not in state or state[k].shape != expected[k].shape), None)
        wrong = wrong or next((k for k in state if k not in expected), None)
        if wrong is not None:
            raise CheckpointError(f"{path}: {PART_NAMES[part]} weights do not fit the config (at {short_repr(wrong)})")


def load_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", ema: bool = True, require: Iterable[str] = ()
) -> HAGAN:
    """A HAGAN in eval mode with the checkpoint's config and weights, on ``device``.

    When the checkpoint carries an exponential moving average of G (training with ``train.ema``), G gets those
    weights unless ``ema=False``. The encoders were trained against the raw G; for the closest reconstructions
    through encode-then-generate, load with ``ema=False``. ``require``: parts the caller needs besides G (e.g.
    ``("EH", "EG")`` to encode); a checkpoint without them is refused before any data is read.
    """
    payload = read_checkpoint(path)
    config = _checkpoint_config(payload, path)
    listed = payload.get("parts", [])
    parts = [p for p in PARTS if isinstance(listed, (list, tuple)) and p in listed]
    if "G" not in parts:
        raise CheckpointError(f"{path}: checkpoint holds no generator")
    missing = [p for p in require if p not in parts]
    if {"EH", "EG"} & set(missing):
        raise CheckpointError(
            f"{path}: this checkpoint has no encoder (E^H, E^G): it can generate but not encode; use one written by "
            "train or import-reference"
        )
    if missing:
        raise CheckpointError(f"{path}: this checkpoint has no {PART_NAMES[missing[0]]}")
    use_ema = ema and isinstance(payload.get("state_dicts"), dict) and "G_ema" in payload["state_dicts"]
    states = {name: _state_dict(payload, name, path) for name in [*parts, *(["G_ema"] if use_ema else [])]}
    _check_fits(config, states, path)
    model = HAGAN(config)
    for name, state in states.items():
        try:
            getattr(model, name.removesuffix("_ema")).load_state_dict(state)
        except (KeyError, RuntimeError) as err:
            raise CheckpointError(f"{path}: {name} weights do not fit the config ({one_line(err)})") from None
    model.parts = tuple(parts)
    return model.to(device).eval()


def training_record(path: str | Path) -> dict[str, Any] | None:
    """The training record a checkpoint carries (what it was trained on; see data.VolumeFolder.training_record),
    or None for a checkpoint without one (imported weights, or written before checkpoints carried it)."""
    record = _mapping(read_checkpoint(path).get("extra")).get("training_set")
    return record if isinstance(record, dict) else None


def _mapping(value: Any) -> dict:
    """``value`` if it is a dict, else an empty one: optional parts of a foreign file may hold anything."""
    return value if isinstance(value, dict) else {}


def _count(value: Any) -> int:
    return len(value) if isinstance(value, (list, tuple)) else 0


def describe_checkpoint(path: str | Path) -> dict[str, Any]:
    """What ``hagan-clinic info`` prints: identity, config, data contract, parameters, training set, provenance."""
    payload = read_checkpoint(path)
    extra = dict(_mapping(payload.get("extra")))
    record = extra.pop("training_set", None)
    params = {
        str(part): int(sum(t.numel() for t in _mapping(sd).values() if isinstance(t, torch.Tensor)))
        for part, sd in _mapping(payload.get("state_dicts")).items()
    }
    training: dict[str, Any] | None = None
    if isinstance(record, dict):
        training = {k: record.get(k) for k in ("n_volumes", "data_dir", "table", "table_sha256", "files_sha256")}
        training["patients"] = _count(record.get("patient_ids"))
        training["series"] = _count(record.get("series_uids"))
    return {
        "file": str(path),
        "sha256": file_sha256(path),
        "format": f"{payload.get('format')}/{payload.get('version')}",
        "parts": [str(p) for p in payload.get("parts", [])] if isinstance(payload.get("parts"), list) else [],
        "parameters": params,
        "data_contract": payload.get("data_contract"),
        "config": payload.get("config"),
        "training_set": training,
        "provenance": extra,
    }
