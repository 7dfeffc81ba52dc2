"""Where computation runs: ``--device`` names to torch devices, and torchrun's environment, each refused in one line
when it makes no sense on this machine. GPUs are simulated (monkeypatched torch), so these run on any CPU."""

from __future__ import annotations

import pytest
import torch

from hagan_clinic.devices import Torchrun, resolve_device, torchrun_env
from hagan_clinic.errors import HaganError

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@pytest.fixture(autouse=True)
def _no_torchrun(monkeypatch):
    """Each test starts outside torchrun, whatever the shell that runs the tests set."""
    for var in TORCHRUN_VARS:
        monkeypatch.delenv(var, raising=False)


def fake_gpus(monkeypatch, count: int, current: int = 0) -> None:
    """A machine with ``count`` CUDA GPUs (none: CUDA not available), as torch.cuda reports it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)


def refused(name: str, *needles: str) -> str:
    with pytest.raises(HaganError) as err:
        resolve_device(name)
    message = str(err.value)
    assert "\n" not in message and len(message) < 200, message
    for needle in needles:
        assert needle in message, message
    return message


def test_cpu_and_auto_without_a_gpu(monkeypatch):
    fake_gpus(monkeypatch, 0)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" cpu ") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")


def test_auto_takes_cuda_when_there_is_one(monkeypatch):
    fake_gpus(monkeypatch, 2, current=1)
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda", 1)  # plain cuda: torch's current GPU
    assert resolve_device("cuda:0") == torch.device("cuda", 0)


def test_cuda_without_cuda_is_refused(monkeypatch):
    fake_gpus(monkeypatch, 0)
    refused("cuda", "--device cuda", "CUDA is not available")
    refused("cuda:1", "CUDA is not available")


def test_a_gpu_index_beyond_the_count_is_refused(monkeypatch):
    fake_gpus(monkeypatch, 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    refused("cuda:2", "cuda:2", "2 GPU(s)")
    with pytest.raises(HaganError, match="^device cuda:7"):  # the name of the setting, as the caller gives it
        resolve_device("cuda:7", what="device")


def test_mps_when_available(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("mps") == torch.device("mps")


def test_mps_when_not_available_is_refused(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    refused("mps", "--device mps", "MPS", "not available on this machine")


@pytest.mark.parametrize("name", ["gpu", "", "cuda:x", "cuda:-1", "garbage" * 40, "cpu cuda"])
def test_unknown_names_are_refused(name):
    message = refused(name, "unknown device", "mps")
    assert len(message) < 150  # a long name is cut, not echoed whole


@pytest.mark.parametrize("name", ["meta", "xla", "hip"])
def test_devices_torch_knows_but_the_project_does_not_run_on_are_refused(name):
    refused(name, "not supported", "cpu, cuda, cuda:N, mps or auto")


def test_torchrun_env_without_torchrun():
    assert torchrun_env() == Torchrun(rank=0, world=1, local_rank=0)
    assert not torchrun_env().active


def test_torchrun_env_reads_torchrun(monkeypatch):
    for var, value in zip(TORCHRUN_VARS, ("3", "4", "1")):
        monkeypatch.setenv(var, value)
    env = torchrun_env()
    assert env == Torchrun(rank=3, world=4, local_rank=1) and env.active


@pytest.mark.parametrize(
    ("rank", "world", "local", "needle"),
    [
        ("one", "2", "0", "must be integers"),
        ("0", "2.0", "0", "must be integers"),
        ("0", "2", "", "must be integers"),
        ("2", "2", "0", "out of range"),  # rank must be below the world size
        ("-1", "2", "0", "out of range"),
        ("0", "0", "0", "out of range"),
        ("0", "2", "-1", "out of range"),
    ],
)
def test_torchrun_env_refuses_values_that_make_no_sense(monkeypatch, rank, world, local, needle):
    for var, value in zip(TORCHRUN_VARS, (rank, world, local)):
        monkeypatch.setenv(var, value)
    with pytest.raises(HaganError, match=needle) as err:
        torchrun_env()
    assert "\n" not in str(err.value)


def test_plain_cuda_under_torchrun_is_the_local_rank_gpu(monkeypatch):
    fake_gpus(monkeypatch, 4, current=0)
    for var, value in zip(TORCHRUN_VARS, ("5", "8", "2")):  # the second node's third process
        monkeypatch.setenv(var, value)
    assert resolve_device("cuda") == torch.device("cuda", 2)
    assert resolve_device("auto") == torch.device("cuda", 2)
    assert resolve_device("cuda:3") == torch.device("cuda", 3)  # an explicit GPU is taken as given
    monkeypatch.setenv("LOCAL_RANK", "4")  # more processes on this node than GPUs
    refused("cuda", "4 GPU(s)")
