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
from pathlib import Path
from typing import Any

import torch

from .config import Config, ConfigError
from .errors import HaganError
from .io.files import publish
from .models.hagan import HAGAN, PARTS

FORMAT = "hagan-clinic"
VERSION = 1


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
        raise CheckpointError(f"{path}: checkpoint version {payload.get('version')} is not supported")
    return payload


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", ema: bool = True) -> HAGAN:
    """A HAGAN in eval mode with the checkpoint's config and weights, on ``device``.

    When the checkpoint carries an exponential moving average of G (training with ``train.ema``), G gets those
    weights unless ``ema=False``. The encoders were trained against the raw G; for the closest reconstructions
    through encode-then-generate, load with ``ema=False``.
    """
    payload = read_checkpoint(path)
    try:
        config = Config.from_dict(payload["config"], source=f"{Path(path).name} config")
    except ConfigError as err:
        raise CheckpointError(str(err)) from None
    model = HAGAN(config)
    parts = [p for p in payload.get("parts", []) if p in PARTS]
    if "G" not in parts:
        raise CheckpointError(f"{path}: checkpoint holds no generator")
    for name in parts:
        try:
            getattr(model, name).load_state_dict(payload["state_dicts"][name])
        except (KeyError, RuntimeError) as err:
            raise CheckpointError(f"{path}: {name} weights do not fit the config ({_first_line(err)})") from None
    if ema and "G_ema" in payload["state_dicts"]:
        try:
            model.G.load_state_dict(payload["state_dicts"]["G_ema"])
        except RuntimeError as err:
            raise CheckpointError(f"{path}: G_ema weights do not fit the config ({_first_line(err)})") from None
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
    record = read_checkpoint(path).get("extra", {}).get("training_set")
    return record if isinstance(record, dict) else None


def describe_checkpoint(path: str | Path) -> dict[str, Any]:
    """What ``hagan-clinic info`` prints: identity, config, data contract, parameters, training set, provenance."""
    payload = read_checkpoint(path)
    extra = dict(payload.get("extra", {}))
    record = extra.pop("training_set", None)
    params = {
        part: int(sum(t.numel() for t in sd.values() if isinstance(t, torch.Tensor)))
        for part, sd in payload.get("state_dicts", {}).items()
    }
    training: dict[str, Any] | None = None
    if isinstance(record, dict):
        training = {k: record.get(k) for k in ("n_volumes", "data_dir", "table", "table_sha256", "files_sha256")}
        training["patients"] = len(record.get("patient_ids", []))
        training["series"] = len(record.get("series_uids", []))
    return {
        "file": str(path),
        "sha256": file_sha256(path),
        "format": f"{payload.get('format')}/{payload.get('version')}",
        "parts": list(payload.get("parts", [])),
        "parameters": params,
        "data_contract": payload.get("data_contract"),
        "config": payload.get("config"),
        "training_set": training,
        "provenance": extra,
    }
