from __future__ import annotations

import pytest
import yaml
from pydantic import ValidationError

from hagan_clinic.config import CONFIG_DIR, Config, ConfigError, load_config


@pytest.mark.parametrize("name", ["base", "tiny", "paper_128", "paper_256", "demo"])
def test_shipped_configs_load(name):
    cfg = load_config(CONFIG_DIR / f"{name}.yaml")
    assert isinstance(cfg, Config)


def test_paper_geometry_derives_reference_constants():
    m256 = load_config("paper_256").model
    assert (m256.feature_size, m256.slab_depth, m256.feature_slab_depth, m256.max_slab_start) == (
        64,
        32,
        8,
        224,
    )
    assert (m256.feature_channels, 16 * m256.g_width) == (64, 512)
    m128 = load_config("paper_128").model
    assert (m128.feature_size, m128.slab_depth, m128.feature_slab_depth, m128.max_slab_start) == (
        32,
        16,
        4,
        112,
    )
    m512 = load_config("paper_256", ["model.size=512"]).model
    assert (m512.stages, m512.feature_size, m512.slab_depth) == (3, 64, 64)


def test_overlay_merges_sections(tmp_path):
    (tmp_path / "parent.yaml").write_text("seed: 3\nmodel:\n  size: 64\n  latent_dim: 16\n")
    (tmp_path / "child.yaml").write_text("extends: parent.yaml\nmodel:\n  latent_dim: 8\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.seed, cfg.model.size, cfg.model.latent_dim) == (3, 64, 8)
    assert cfg.model.g_width == 32  # untouched keys keep their defaults


def test_set_overrides_are_typed():
    cfg = load_config("tiny", ["model.size=64", "data.window=[-1000, 400]", "data.modality=MR", "seed=7"])
    assert cfg.model.size == 64
    assert cfg.data.window == (-1000.0, 400.0)
    assert cfg.data.modality == "MR"
    assert cfg.seed == 7


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["model.sizee=64"], "model.sizee"),
        (["bogus.key=1"], "bogus"),
        (["model.size=abc"], "model.size"),
        (["model.size=96"], "model.size"),
        (["model.g_width=6"], "model.g_width"),
        (["data.window=[600, -1024]"], "data.window"),
        (["data.modality=PET"], "data.modality"),
        (["model.encode_mode=fast"], "model.encode_mode"),
        (["model.high_stages=4"], "model.high_stages"),
        (["size=64"], "size"),
        (["novalue"], "novalue"),
    ],
)
def test_bad_values_are_rejected_with_the_key_named(overrides, needle):
    with pytest.raises(ConfigError) as info:
        load_config("tiny", overrides)
    message = str(info.value)
    assert needle in message
    assert "\n" not in message


def test_unknown_key_in_file_is_rejected(tmp_path):
    (tmp_path / "bad.yaml").write_text("model:\n  size: 64\n  widht: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'model.widht'"):
        load_config(tmp_path / "bad.yaml")


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "broken.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(tmp_path / "loop.yaml")


def test_config_is_frozen_and_round_trips():
    cfg = load_config("tiny")
    with pytest.raises(ValidationError):
        cfg.model.size = 64  # type: ignore[misc]
    again = Config.from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg
    assert cfg.data_contract() == {
        "modality": "CT",
        "window": [-1024.0, 600.0],
        "spacing_mm": [12.0, 12.0, 12.0],
        "size": 32,
        "resize": "spacing",
    }


# ---------------------------------------------------------------- defaults said once
def test_the_defaults_are_the_base_config():
    assert Config() == load_config("base")


def test_base_yaml_states_every_key():
    from hagan_clinic.config import config_keys

    def keys(node: dict, prefix: str = "") -> set[str]:
        out: set[str] = set()
        for k, v in node.items():
            out |= keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k}
        return out

    stated = keys(yaml.safe_load((CONFIG_DIR / "base.yaml").read_text()))
    assert stated == {key for key, _, _ in config_keys()}


def test_the_readme_key_table_is_generated_from_the_config():
    from pathlib import Path

    from hagan_clinic.config import markdown_table

    readme = (Path(__file__).parents[1] / "README.md").read_text().splitlines()
    start = readme.index("| key | default | meaning |")
    end = next(i for i in range(start, len(readme)) if not readme[i].startswith("|"))
    assert "\n".join(readme[start:end]) == markdown_table(), "run: python -m hagan_clinic.config --markdown"


def test_command_flags_pass_through_the_config_validation():
    from hagan_clinic.config import ConfigError

    cfg = load_config("base").with_values({"n": 7, "slab": None}, "evaluate").with_values({"seed": 3})
    assert (cfg.evaluate.n, cfg.evaluate.slab, cfg.seed) == (7, None, 3)
    with pytest.raises(ConfigError, match="regress.log_targets"):
        load_config("base").with_values({"targets": ["a"], "log_targets": ["b"]}, "regress")


@pytest.mark.parametrize("parent", ["tiny", "tiny.yaml", "base.yaml"])
def test_a_users_config_extends_a_shipped_one_by_name_from_anywhere(tmp_path, parent):
    """Installed from a wheel, the shipped configs live in site-packages: a user's config names them, not a path."""
    (tmp_path / "mine.yaml").write_text(f"extends: {parent}\ntrain:\n  iterations: 7\n")
    cfg = load_config(tmp_path / "mine.yaml")
    assert cfg.train.iterations == 7
    assert cfg.model == load_config(parent.removesuffix(".yaml")).model


def test_a_file_beside_the_config_comes_before_a_shipped_one(tmp_path):
    (tmp_path / "tiny.yaml").write_text("extends: base.yaml\nmodel:\n  size: 64\n")
    (tmp_path / "mine.yaml").write_text("extends: tiny.yaml\n")
    assert load_config(tmp_path / "mine.yaml").model.size == 64  # the local tiny.yaml, over the shipped base
    (tmp_path / "lost.yaml").write_text("extends: no_such_config\n")
    with pytest.raises(ConfigError, match="extends 'no_such_config', which is not a file"):
        load_config(tmp_path / "lost.yaml")


def test_a_local_config_named_like_a_shipped_one_extends_the_shipped_one(tmp_path):
    (tmp_path / "tiny.yaml").write_text("extends: ' tiny.yaml '\ntrain:\n  iterations: 3\n")
    cfg = load_config(tmp_path / "tiny.yaml")
    assert cfg.train.iterations == 3 and cfg.model == load_config("tiny").model
    (tmp_path / "lost.yaml").write_text("extends: nothing_here\n")
    with pytest.raises(ConfigError, match="nor a shipped config"):
        load_config(tmp_path / "lost.yaml")
