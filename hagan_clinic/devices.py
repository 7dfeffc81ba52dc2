"""Where computation runs: the one place that turns ``--device`` into a torch device and reads torchrun's
environment (RANK, WORLD_SIZE, LOCAL_RANK).

Every compute command takes ``--device cpu|cuda|cuda:N|mps|auto``; under torchrun each process takes GPU LOCAL_RANK
and its own share of the work. ``mps`` is an Apple GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import HaganError

if TYPE_CHECKING:  # torch only when a device is resolved: --help stays light
    import torch

DEVICE_HELP = "cpu, cuda, cuda:N, mps (Apple GPUs) or auto (cuda when available)."
_NAMES = "cpu, cuda, cuda:N, mps or auto"


@dataclass(frozen=True)
class Torchrun:
    """This process's place among torchrun's processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1


def torchrun_env() -> Torchrun:
    """RANK / WORLD_SIZE / LOCAL_RANK as torchrun sets them; HaganError for values that make no sense."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise HaganError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets them)") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise HaganError(f"torchrun environment out of range: RANK={rank} WORLD_SIZE={world} LOCAL_RANK={local}")
    return Torchrun(rank=rank, world=world, local_rank=local)


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity where the platform reports one (a container or a job
    limited to some cores), else the machine's count; at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def torch_dtype(precision: str) -> torch.dtype:
    """The torch dtype a precision name (fp32, bf16, fp16) stands for; KeyError for another name."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def resolve_device(name: str, what: str = "--device") -> torch.device:
    """``name`` (cpu, cuda, cuda:N, mps or auto) as a ``torch.device``. Under torchrun, plain ``cuda`` means this
    process's GPU (LOCAL_RANK). HaganError (one line) for an unknown name, or a GPU this machine does not have."""
    import torch

    name = str(name).strip()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise HaganError(f"{what}: unknown device '{name[:40]}' (use {_NAMES})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise HaganError(f"{what} {name}: CUDA is not available on this machine")
        if device.index is None:
            env = torchrun_env()
            device = torch.device("cuda", env.local_rank if env.active else torch.cuda.current_device())
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise HaganError(f"{what} {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():  # torch without MPS support, or not an Apple GPU
            raise HaganError(f"{what} {name}: MPS (Apple GPU) is not available on this machine")
    elif device.type != "cpu":
        raise HaganError(f"{what}: device type '{device.type}' is not supported (use {_NAMES})")
    return device
