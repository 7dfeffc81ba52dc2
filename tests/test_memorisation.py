"""Memorisation is measured against the model's training set, with held-out real volumes as the yardstick."""

from __future__ import annotations

import json
from itertools import cycle

import numpy as np
import pytest
import torch

import hagan_clinic.models.hagan as checkpoint_module
from hagan_clinic.io.cache import decode_grid
from hagan_clinic.metrics import memorisation_check
from hagan_clinic.models.hagan import HAGAN
from hagan_clinic.pipelines.evaluate import EvaluateOptions, run

from conftest import tiny_config, write_volumes


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("memorisation")
    HAGAN.from_config(tiny_config()).save(root / "tiny.pt")
    return {
        "root": root,
        "train": write_volumes(root / "train", n=10, size=32, seed=1),
        "held": write_volumes(root / "held", n=10, size=32, seed=2),
        "fresh": write_volumes(root / "fresh", n=10, size=32, seed=3),
    }


def _copying_generator(monkeypatch, paths):
    """Make every loaded checkpoint 'generate' the given volumes in turn, whatever the latent."""
    volumes = cycle([torch.from_numpy(decode_grid(np.load(p))) for p in paths])
    load = checkpoint_module.load_checkpoint

    def patched(*args, **kwargs):
        model = load(*args, **kwargs)
        model.generate = lambda z, y=None, slab=None: torch.stack([next(volumes) for _ in range(len(z))])[:, None]
        return model

    monkeypatch.setattr(checkpoint_module, "load_checkpoint", patched)


@pytest.mark.slow
@pytest.mark.parametrize(("source", "flagged"), [("train", True), ("fresh", False)])
def test_a_generator_that_copies_its_training_set_is_flagged(sets, tmp_path, monkeypatch, source, flagged):
    _copying_generator(monkeypatch, sets[source])
    opts = EvaluateOptions(sets["root"] / "tiny.pt", sets["root"] / "held", tmp_path / "eval", n=10,
                           measure="mean_hu", n_recon=1, n_diversity=2, train=sets["root"] / "train")  # fmt: skip
    m = run(opts).metrics["memorisation"]
    assert m["flagged"] is flagged and m["n_train"] == 10 and m["n_heldout"] == 10
    if flagged:
        assert m["median_generated_to_train"] == pytest.approx(0.0, abs=1e-6)
    else:
        assert m["median_ratio"] > 0.5
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["memorisation"]["flagged"] is flagged


@pytest.mark.slow
def test_held_out_volumes_that_are_training_volumes_are_left_out(sets, tmp_path, monkeypatch):
    """--real that overlaps the training set would hide copies: the overlap is excluded and counted."""
    import shutil

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for p in [*sets["held"][:6], *sets["train"][:3]]:
        shutil.copy(p, mixed / f"{p.parent.name}_{p.name}")
    _copying_generator(monkeypatch, sets["fresh"])
    opts = EvaluateOptions(sets["root"] / "tiny.pt", mixed, tmp_path / "eval", n=4, measure="mean_hu", n_recon=1,
                           n_diversity=2, train=sets["root"] / "train")  # fmt: skip
    m = run(opts).metrics["memorisation"]
    assert m["heldout_excluded_as_training"] == 3 and m["n_heldout"] == 6


def test_memorisation_check_on_features():
    rng = np.random.default_rng(0)
    train, held, fresh = rng.normal(size=(40, 8)), rng.normal(size=(40, 8)), rng.normal(size=(40, 8))
    assert memorisation_check(train[:20] + 1e-6, train, held)["flagged"]
    ok = memorisation_check(fresh, train, held)
    assert not ok["flagged"] and 0.7 < ok["median_ratio"] < 1.4
