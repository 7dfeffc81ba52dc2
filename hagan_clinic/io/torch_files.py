"""Torch files from anywhere: written atomically, read as tensors and plain data only, identified by hash.

A checkpoint, a training state or a weights file is untrusted input: ``torch.load(weights_only=True)`` can never
run code, and a payload whose plain data unfolds into millions of values (shared containers in a pickle) is refused
before anything prints or validates it.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import HaganError, one_line
from .files import atomic_target
from .files import file_sha256 as file_sha256  # the identity of a checkpoint, for this module's users

#: Values in a file's plain data (config, record, the keys of its state dicts) with shared containers expanded.
MAX_PAYLOAD_VALUES = 1_000_000


class CheckpointError(HaganError):
    """A file that is not a readable hagan-clinic checkpoint (or state, or weights file); the message is one line."""


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` through the one atomic writer: a crash never leaves a half-written file under ``path``."""
    path = Path(path)
    try:
        with atomic_target(path, ".tmp") as tmp, open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # a checkpoint is worth a flush to disk before it replaces the last one
    except OSError as err:
        if err.filename is None and err.errno is not None:  # a failed write through a file object names no file
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise
    return path


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
        first = one_line(err, 200) or type(err).__name__
        raise CheckpointError(f"{path}: not a readable {what} ({first})") from None


def check_expanded_size(payload: Any, path: str | Path) -> None:
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
