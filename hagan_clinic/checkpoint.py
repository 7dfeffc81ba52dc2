"""Checkpoint files: one ``torch.save`` dict holding the resolved config, the data contract and state dicts.

Layout (format ``hagan-clinic/1``)::

    {"format": "hagan-clinic", "version": 1,
     "config": {...resolved config...}, "data_contract": {modality, window, spacing_mm, size},
     "parts": ["G", "EH", "EG", ...], "state_dicts": {"G": {...}, ...}, "extra": {...}}

Only plain containers, strings, numbers and tensors are stored, so every checkpoint loads with
``torch.load(weights_only=True)``: a checkpoint is untrusted input and must never be able to run code.
Files are written to a temporary name in the target folder and renamed into place, so a crash never leaves
a half-written checkpoint under the real name.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from .config import Config, ConfigError
from .errors import HaganError, short_repr
from .io.files import publish
from .models.hagan import HAGAN, PARTS

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
#: Values in a checkpoint's plain data (config, record, the keys of its state dicts) with shared containers expanded.
MAX_PAYLOAD_VALUES = 1_000_000


class CheckpointError(HaganError):
    """A file that is not a readable hagan-clinic checkpoint; the message is one line."""


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        if err.filename is None and err.errno is not None:  # a failed write through a file object names no file
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: t.detach().cpu() for n, t in state.items()}


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
        "config": model.config.to_dict(),
        "data_contract": model.config.data_contract(),
        "parts": list(model.parts),
        "state_dicts": state_dicts,
        "extra": dict(extra or {}),
    }
    return atomic_torch_save(payload, path)


def load_untrusted(path: str | Path, what: str = "checkpoint") -> Any:
    """``torch.load(weights_only=True)`` of a file from anywhere: tensors and plain data, never code.

    Raises CheckpointError with one line for a missing file, a pickle with code, a truncated or foreign file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    try:
        with warnings.catch_warnings():  # foreign pickles make torch warn before it refuses them
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        first = " ".join(str(err).split()) or type(err).__name__
        raise CheckpointError(f"{path}: not a readable {what} ({first[:200]})") from None


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw checkpoint dict, validated for format; raises CheckpointError (one line) otherwise."""
    payload = load_untrusted(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not a hagan-clinic checkpoint (reference .pth files are converted with import-reference)"
        )
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {short_repr(payload.get('version'))} is not supported")
    _check_expanded_size(payload, path)
    return payload


def _check_expanded_size(payload: Any, path: str | Path) -> None:
    """Refuse a payload whose plain data stands for more than MAX_PAYLOAD_VALUES values.

    A pickle can share one list between many places, so a small file can unfold into billions of values as soon
    as something prints or validates it (the "billion laughs"). Counting with every sharing expanded costs one
    visit per distinct container.
    """
    sizes: dict[int, int] = {}

    def size(value: Any) -> int:
        if not isinstance(value, (dict, list, tuple)):
            return 1
        key = id(value)
        if key not in sizes:
            sizes[key] = MAX_PAYLOAD_VALUES + 1  # a container that contains itself counts as too many
            items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
            total = 1
            for item in items:
                total += size(item)
                if total > MAX_PAYLOAD_VALUES:
                    break
            sizes[key] = total
        return sizes[key]

    try:
        too_many = size(payload) > MAX_PAYLOAD_VALUES
    except RecursionError:
        too_many = True
    if too_many:
        raise CheckpointError(f"{path}: its plain data unfolds into over {MAX_PAYLOAD_VALUES} values (damaged?)")


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
            raise CheckpointError(f"{path}: {name} weights do not fit the config ({_first_line(err)})") from None
    model.parts = tuple(parts)
    return model.to(device).eval()


def _first_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:300]


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file: the identity of a checkpoint in reports and MLflow."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
