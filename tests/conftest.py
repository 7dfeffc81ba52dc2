"""Shared fixtures: tiny configs and models, and an MLflow store in a temporary folder."""

from __future__ import annotations

import pytest
import torch

from hagan_clinic.config import load_config
from hagan_clinic.models.hagan import HAGAN


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.manual_seed(0)
    yield


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
