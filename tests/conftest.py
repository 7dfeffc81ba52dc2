"""Shared fixtures: tiny configs and models, and an MLflow store in a temporary folder."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from hagan_clinic.config import load_config
from hagan_clinic.io import logs
from hagan_clinic.models.hagan import HAGAN

_PRISTINE_LOG_STATE = dict(logs._state)  # before any command ran in this process


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.manual_seed(0)
    yield


def _project_logger_pristine() -> None:
    """The project's logger as no command has touched it: no handler of its own, propagating to the root logger
    (where ``caplog`` listens on every pytest version), level unset, normal verbosity."""
    import logging

    root = logging.getLogger(logs.LOGGER)
    for handler in [h for h in root.handlers if isinstance(h, logs._CurrentStderr)]:
        root.removeHandler(handler)
    root.propagate = True
    root.setLevel(logging.NOTSET)
    logs._state.clear()
    logs._state.update(_PRISTINE_LOG_STATE)


@pytest.fixture(autouse=True)
def _project_logger_pristine_around_each_test():
    """An in-process command configures the project's logger (its own stderr handler, no propagation), and a module
    or session fixture may run one before this fixture starts; so each test begins and ends with the pristine
    logger, and a later test's ``caplog`` sees the project's records whatever ran first."""
    _project_logger_pristine()
    yield
    _project_logger_pristine()


@pytest.fixture(autouse=True)
def _isolated_mlflow(tmp_path, monkeypatch):
    """No test ever writes to the repository's mlruns/."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)


def tiny_config(*overrides: str):
    return load_config("tiny", overrides)


@pytest.fixture
def tiny_model():
    return HAGAN.from_config(tiny_config()).eval()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """An untrained tiny model file (32^3 grid of 12 mm, latent 32), shared by the tests that read it: the features
    are arbitrary but deterministic. Tests must not write beside it."""
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    HAGAN.from_config(tiny_config()).save(path)
    return path


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """``hagan-clinic ARGS`` in this process: (exit status, stdout, stderr)."""
    from hagan_clinic.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line(err: str, *needles: str) -> None:
    """A refusal as the CLI must print it: one line of at most 300 characters, no traceback, naming ``needles``."""
    assert err.startswith("hagan-clinic: error:"), err
    assert err.strip().count("\n") == 0 and len(err.strip()) <= 300, err
    assert "Traceback" not in err and "internal error" not in err
    for needle in needles:
        assert needle in err, err


def assert_refused(code: int, err: str, *needles: str) -> None:
    """Exit status 2 (the input's fault) with a one-line message naming ``needles``."""
    assert code == 2, err
    assert_one_line(err, *needles)


def ellipsoid_hu(shape, seed: int) -> np.ndarray:
    """An ellipsoid body of noisy soft tissue in air, integer HU float32 (D, H, W)."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape).astype(np.float32)
    r2 = sum(((g - (n - 1) / 2) / (0.4 * n)) ** 2 for g, n in zip(grid, shape))
    return np.where(r2 < 1.0, rng.integers(-100, 200, shape), -1024).astype(np.float32)


def write_volumes(folder, n: int = 4, size: int = 32, seed: int = 0) -> list:
    """``n`` synthetic training volumes: a bright Gaussian blob in noise, float16 in [-1, 1], as .npy."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    grid = np.mgrid[:size, :size, :size].astype(np.float32)
    paths = []
    for i in range(n):
        centre = rng.uniform(size * 0.3, size * 0.7, 3)
        r2 = sum((grid[k] - centre[k]) ** 2 for k in range(3))
        vol = 1.6 * np.exp(-r2 / (2 * (size / 8) ** 2)) - 0.8 + rng.normal(0.0, 0.1, grid.shape[1:])
        path = folder / f"vol_{i:02d}.npy"
        np.save(path, np.clip(vol, -1.0, 1.0).astype(np.float16))
        paths.append(path)
    return paths


@pytest.fixture
def volume_dir(tmp_path):
    """A folder of four 32^3 training volumes (the tiny config's size)."""
    folder = tmp_path / "volumes"
    write_volumes(folder)
    return folder


@pytest.fixture(scope="session")
def make_volumes():
    """``write_volumes`` for tests that need more folders or other sizes."""
    return write_volumes


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def benchmark_module(name: str) -> ModuleType:
    """benchmarks/NAME.py as a module, imported as the script imports its neighbours (benchmarks/ on sys.path):
    benchmarks/ is a folder of scripts, not a package."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module(name)
