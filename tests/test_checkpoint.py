from __future__ import annotations

import pickle

import pytest
import torch

from hagan_clinic.config import load_config
from hagan_clinic.io.torch_files import CheckpointError
from hagan_clinic.models.hagan import HAGAN, load_checkpoint, read_checkpoint


def test_round_trip_restores_config_weights_and_outputs(tmp_path):
    cfg = load_config("tiny", ["model.num_classes=2", "data.modality=MR", "data.window=[0, 1]"])
    model = HAGAN.from_config(cfg).eval()
    path = model.save(tmp_path / "ckpt" / "model.pt")
    loaded = load_checkpoint(path)
    assert loaded.config == cfg
    assert not loaded.training
    for name in ("G", "D", "EH", "EG"):
        ours, theirs = getattr(model, name).state_dict(), getattr(loaded, name).state_dict()
        assert ours.keys() == theirs.keys()
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0)
    z, y = torch.randn(2, cfg.model.latent_dim), torch.tensor([1, 0])
    torch.testing.assert_close(loaded.generate(z, y), model.generate(z, y), rtol=0, atol=0)
    vol = model.generate(z, y)
    torch.testing.assert_close(loaded.encode(vol), model.encode(vol), rtol=0, atol=0)


def test_checkpoint_is_plain_data_with_the_data_contract(tmp_path):
    model = HAGAN.from_config(load_config("tiny"))
    path = model.save(tmp_path / "m.pt")
    payload = torch.load(path, weights_only=True)  # no pickled code anywhere
    assert payload["data_contract"] == {
        "modality": "CT",
        "window": [-1024.0, 600.0],
        "spacing_mm": [12.0, 12.0, 12.0],
        "size": 32,
        "resize": "spacing",
    }
    assert payload["config"]["model"]["size"] == 32
    assert sorted(payload["state_dicts"]) == ["D", "EG", "EH", "G"]


def test_save_is_atomic(tmp_path, monkeypatch):
    model = HAGAN.from_config(load_config("tiny"))
    path = model.save(tmp_path / "m.pt")
    before = path.read_bytes()

    def crash(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        model.save(path)
    assert path.read_bytes() == before  # the old file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # and no temp file is left behind


def test_sampling_checkpoint_without_discriminator(tmp_path):
    model = HAGAN.from_config(load_config("tiny"))
    model.parts = ("G", "EH", "EG")
    loaded = load_checkpoint(model.save(tmp_path / "m.pt"))
    assert loaded.parts == ("G", "EH", "EG")
    vol = loaded.generate(torch.randn(1, 32))
    assert loaded.encode(vol).shape == (1, 32)
    model.parts = ("G",)
    gen_only = load_checkpoint(model.save(tmp_path / "g.pt"))
    with pytest.raises(ValueError, match="cannot encode"):
        gen_only.encode(vol)


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_untrusted_and_foreign_files_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "text.pt")
    with (tmp_path / "evil.pt").open("wb") as f:
        pickle.dump({"format": "hagan-clinic", "x": _Evil()}, f)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        read_checkpoint(tmp_path / "evil.pt")
    torch.save({"model": {"fc1.weight": torch.zeros(1)}}, tmp_path / "ref.pth")
    with pytest.raises(CheckpointError, match="import-reference"):
        load_checkpoint(tmp_path / "ref.pth")


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    path = HAGAN.from_config(load_config("tiny")).save(tmp_path / "m.pt")
    payload = torch.load(path, weights_only=True)
    payload["config"]["model"]["g_width"] = 16
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(path)
    payload["config"]["model"]["colour"] = "blue"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="unknown key 'model.colour'"):
        load_checkpoint(path)


def test_a_checkpoint_carries_the_model_config_without_command_settings(tmp_path):
    """encode/regress/evaluate settings set up commands, not the model: a checkpoint that carried them could not be
    read by versions that predate those sections (their configs refuse unknown keys)."""
    cfg = load_config("tiny", ["encode.batch_size=4", "regress.folds=3", "evaluate.n=8"])
    path = HAGAN.from_config(cfg).save(tmp_path / "m.pt")
    stored = read_checkpoint(path)["config"]
    assert sorted(stored) == ["augment", "data", "device", "model", "seed", "tracking", "train"]
    loaded = load_checkpoint(path)
    assert loaded.config.model == cfg.model and loaded.config.data == cfg.data and loaded.config.train == cfg.train
    assert loaded.config.encode == load_config("tiny").encode  # the defaults, whatever the saving run had set
