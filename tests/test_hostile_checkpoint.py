"""Hostile checkpoints: no config, a config for a giant model, non-finite weights, missing encoders, pickled bombs.

Each is refused with a one-line HaganError (exit 2) before anything large is allocated or any data is read.
"""

from __future__ import annotations

import pytest
import torch

from hagan_clinic.cli import main
from hagan_clinic.config import load_config
from hagan_clinic.io.torch_files import CheckpointError
from hagan_clinic.models.hagan import HAGAN, load_checkpoint

from conftest import assert_refused, run_cli


@pytest.fixture
def payload(tmp_path):
    """The plain dict of a tiny checkpoint with every part and an EMA generator."""
    model = HAGAN.from_config(load_config("tiny"))
    path = model.save(tmp_path / "ok.pt", ema_generator=model.G.state_dict())
    return torch.load(path, weights_only=True)


def write(path, payload: dict, **changes):
    data = {**payload, **changes}
    torch.save({k: v for k, v in data.items() if v is not None}, path)
    return path


def test_a_checkpoint_without_a_config_is_refused(capsys, tmp_path, payload):
    path = write(tmp_path / "noconfig.pt", payload, config=None)
    code, _, err = run_cli(capsys, "generate", "--checkpoint", path, "--out", tmp_path / "o")
    assert_refused(code, err, "carries no config")


@pytest.mark.parametrize("config", [[1, 2], "model: {size: 32}", 5])
def test_a_config_that_is_no_mapping_is_refused(capsys, tmp_path, payload, config):
    path = write(tmp_path / "odd.pt", payload, config=config)
    code, _, err = run_cli(capsys, "generate", "--checkpoint", path, "--out", tmp_path / "o")
    assert_refused(code, err, "mapping of sections")


def test_a_config_for_a_giant_model_is_refused_before_allocating_it(capsys, tmp_path, payload):
    # a width within the config's bounds that makes 4.9 billion parameters (20 GB): HAGAN(config) would die
    config = dict(payload["config"])
    config["model"] = dict(config["model"], g_width=512)
    path = write(tmp_path / "giant.pt", payload, config=config)
    code, _, err = run_cli(capsys, "generate", "--checkpoint", path, "--out", tmp_path / "o")
    assert_refused(code, err, "billion parameters")


def test_a_config_with_a_huge_number_is_refused_with_its_key(capsys, tmp_path, payload):
    config = dict(payload["config"])
    config["model"] = dict(config["model"], latent_dim=10**30)
    path = write(tmp_path / "huge.pt", payload, config=config)
    code, _, err = run_cli(capsys, "generate", "--checkpoint", path, "--out", tmp_path / "o")
    assert_refused(code, err, "huge.pt config", "model.latent_dim", "1000000000000000000000000000000")


def test_weights_that_do_not_fit_the_config_are_found_without_building_them(tmp_path, payload):
    config = dict(payload["config"])
    config["model"] = dict(config["model"], latent_dim=64)
    path = write(tmp_path / "wrong.pt", payload, config=config)
    with pytest.raises(CheckpointError, match="generator weights do not fit the config"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("part", "name", "bad"),
    [
        ("G", "generator", float("nan")),
        ("D", "discriminator", float("inf")),
        ("EH", "encoder E^H", float("nan")),
        ("EG", "encoder E^G", float("-inf")),
        ("G_ema", "EMA generator", float("nan")),
    ],
)
def test_non_finite_weights_are_refused_naming_the_part(capsys, tmp_path, payload, part, name, bad):
    states = {k: dict(v) for k, v in payload["state_dicts"].items()}
    key = next(k for k, t in states[part].items() if t.is_floating_point() and t.numel() > 1)
    states[part][key] = states[part][key].clone()
    states[part][key].view(-1)[1] = bad
    path = write(tmp_path / "nan.pt", payload, state_dicts=states)
    code, _, err = run_cli(capsys, "generate", "--checkpoint", path, "--out", tmp_path / "o")
    assert_refused(code, err, f"{name} weights are not finite")
    assert not (tmp_path / "o").exists()


def test_non_finite_ema_weights_do_not_matter_when_the_raw_generator_is_loaded(tmp_path, payload):
    states = {k: dict(v) for k, v in payload["state_dicts"].items()}
    states["G_ema"] = {k: torch.full_like(t, float("nan")) if t.is_floating_point() else t
                       for k, t in states["G_ema"].items()}  # fmt: skip
    path = write(tmp_path / "ema.pt", payload, state_dicts=states)
    assert load_checkpoint(path, ema=False).parts == ("G", "D", "EH", "EG")
    with pytest.raises(CheckpointError, match="EMA generator weights are not finite"):
        load_checkpoint(path)


@pytest.mark.parametrize("weights", [[1, 2], {"trunk.fc.weight": "text"}, None])
def test_weights_that_are_not_tensors_are_refused(capsys, tmp_path, payload, weights):
    states = {**payload["state_dicts"], "G": weights}
    path = write(tmp_path / "odd.pt", payload, state_dicts=states)
    code, _, err = run_cli(capsys, "generate", "--checkpoint", path, "--out", tmp_path / "o")
    assert_refused(code, err, "generator weights are missing or not tensors")


def test_encode_refuses_a_checkpoint_without_encoders(capsys, tmp_path, payload):
    states = {"G": payload["state_dicts"]["G"]}
    path = write(tmp_path / "sampler.pt", payload, state_dicts=states, parts=["G"])
    (tmp_path / "scans").mkdir()
    code, _, err = run_cli(capsys, "encode", tmp_path / "scans", "--checkpoint", path, "--out", tmp_path / "f.csv",
                    "--no-tracking", "--workers", "0")  # fmt: skip
    assert_refused(code, err, "this checkpoint has no encoder (E^H, E^G)")
    assert load_checkpoint(path).parts == ("G",)  # generate can still use it
    with pytest.raises(CheckpointError, match="no encoder"):
        load_checkpoint(path, require=("EH", "EG"))


def test_a_pickled_alias_bomb_is_refused_quickly(capsys, tmp_path, payload):
    # shared lists: a small file that unfolds into 9**9 values as soon as anything prints or walks it
    bomb: list = ["lol"] * 9
    for _ in range(9):
        bomb = [bomb] * 9
    path = write(tmp_path / "bomb.pt", payload, extra={"note": bomb})
    assert path.stat().st_size - (tmp_path / "ok.pt").stat().st_size < 10_000
    for command in (["info", path], ["info", path, "--json"], ["generate", "--checkpoint", path, "--out", "o"]):
        code, _, err = run_cli(capsys, *command)
        assert_refused(code, err, "unfolds into over")


def test_info_survives_odd_optional_fields(capsys, tmp_path, payload):
    path = write(tmp_path / "odd.pt", payload, extra=[1], state_dicts=[1], parts="G")
    code = main(["info", str(path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "odd.pt" in out


def test_checkpoints_are_still_read_with_weights_only(tmp_path, monkeypatch, payload):
    seen = []
    real = torch.load

    def spy(*args, **kwargs):
        seen.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    load_checkpoint(write(tmp_path / "m.pt", payload))
    assert seen == [True]
