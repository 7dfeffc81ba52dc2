"""Several processes (torchrun): one context object, so the loop reads the same with one process or many.

We average gradients ourselves after each phase's backward instead of wrapping the networks in
DistributedDataParallel: each of the four phases updates one network while others are frozen or run without
gradients, which DDP's fixed bucket plan handles only with find_unused_parameters and its costs. Averaging the
phase's gradients in one flat all-reduce keeps every rank's weights identical, and is a plain function that is
testable without starting processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..devices import Torchrun, torchrun_env


@dataclass(frozen=True)
class DistContext(Torchrun):
    """This process's place among torchrun's processes (:class:`~hagan_clinic.devices.Torchrun`), with the
    collective operations training needs; every one is a no-op in a single process."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def average_gradients(self, module: nn.Module) -> None:
        """Make every parameter's .grad the mean over ranks (one flat all-reduce)."""
        if not self.active:
            return
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def all_true(self, flag: bool, device: torch.device) -> bool:
        """True when ``flag`` holds on every rank (so that all ranks take the same branch)."""
        if not self.active:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        return bool(t.item() > 0)

    def broadcast_state(self, module: nn.Module) -> None:
        """Copy rank 0's parameters and buffers to every rank."""
        if not self.active:
            return
        for t in list(module.parameters()) + list(module.buffers()):
            torch.distributed.broadcast(t.data, src=0)

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (on every rank)."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.active and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def init_from_env(device: torch.device) -> tuple[DistContext, torch.device]:
    """The context torchrun describes (one process without torchrun), with its process group set up.

    NCCL on CUDA, gloo on CPU; each rank takes GPU LOCAL_RANK.
    """
    env = torchrun_env()
    if not env.active:
        return DistContext(), device
    if device.type == "cuda":
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=backend)
    return DistContext(rank=env.rank, world=env.world, local_rank=env.local_rank), device
