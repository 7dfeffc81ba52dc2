"""Hostile configs: out-of-range numbers, binary files, bad 'extends', YAML alias bombs, huge values.

Every refusal is a ConfigError (exit 2 through the command line) in one line of at most 300 characters that names
the key or the file, and comes back fast.
"""

from __future__ import annotations

import time

import pytest

from hagan_clinic.cli import main
from hagan_clinic.config import MAX_YAML_VALUES, ConfigError, load_config

from conftest import assert_refused


def check_config(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["check-config", *args])
    out, err = capsys.readouterr()
    return code, out, err


def billion_laughs(levels: int = 9, width: int = 9) -> str:
    """A YAML document of a few hundred bytes whose aliases stand for width**levels strings."""
    lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels + 1)]
    return "\n".join(lines)


# ---------------------------------------------------------------- numbers: finite, within documented ranges
@pytest.mark.parametrize(
    ("override", "key", "shown"),
    [
        ("model.latent_dim=100000000000000000000000000000", "model.latent_dim", "100000000000000000000000000000"),
        ("model.latent_dim=1.0e+29", "model.latent_dim", "1e+29"),
        ("model.latent_dim=65537", "model.latent_dim", "65537"),
        ("model.size=2048", "model.size", "2048"),
        ("model.g_width=1024", "model.g_width", "1024"),
        ("model.d_high_width=1048576", "model.d_high_width", "1048576"),
        ("model.num_classes=100000", "model.num_classes", "100000"),
        ("model.high_stages=1000", "model.high_stages", "1000"),
        ("data.spacing_mm=[.inf, 1, 1]", "data.spacing_mm", "inf"),
        ("data.spacing_mm=[.nan, 1, 1]", "data.spacing_mm", "nan"),
        ("data.spacing_mm=[101, 1, 1]", "data.spacing_mm", "101"),
        ("data.spacing_mm=[0.001, 1, 1]", "data.spacing_mm", "0.001"),
        ("data.window=[-.inf, 600]", "data.window", "inf"),
        ("data.window=[600, 600]", "data.window", "600"),
        ("data.body_threshold=.nan", "data.body_threshold", "nan"),
        ("data.body_threshold=1.0e+30", "data.body_threshold", "1e+30"),
        ("data.min_slices=1000000", "data.min_slices", "1000000"),
        ("train.lr_g=.inf", "train.lr_g", "inf"),
        ("train.lr_d=.nan", "train.lr_d", "nan"),
        ("train.lr_eh=0", "train.lr_eh", "0"),
        ("train.lr_eg=-1e-4", "train.lr_eg", "-1e-4"),
        ("train.eps=.nan", "train.eps", "nan"),
        ("train.betas=[.nan, 0.9]", "train.betas", "nan"),
        ("train.betas=[0.5, 1.0]", "train.betas", "1.0"),
        ("train.iterations=1.0e+300", "train.iterations", "1e+300"),
        ("train.batch_size=1000000", "train.batch_size", "1000000"),
        ("train.keep_last=1000000", "train.keep_last", "1000000"),
        ("train.r1_gamma=.inf", "train.r1_gamma", "inf"),
        ("train.encoder_weight=1.0e+300", "train.encoder_weight", "1e+300"),
        ("train.ema_decay=.nan", "train.ema_decay", "nan"),
        ("seed=-5", "seed", "-5"),
        ("seed=4294967296", "seed", "4294967296"),
        ("augment.seeds=[-1]", "augment.seeds", "-1"),
        ("augment.seeds=[]", "augment.seeds", "[]"),
        ("augment.split_seed=-1", "augment.split_seed", "-1"),
        ("augment.lr=.inf", "augment.lr", "inf"),
        ("augment.epochs=1000000000000", "augment.epochs", "1000000000000"),
        ("augment.synthetic_ratio=.inf", "augment.synthetic_ratio", "inf"),
        ("augment.classical.rotate_deg=.nan", "augment.classical.rotate_deg", "nan"),
        ("augment.classical.elastic_sigma=[7, 5]", "augment.classical.elastic_sigma", "[7.0, 5.0]"),
        ("augment.classical.elastic_magnitude=[0, .inf]", "augment.classical.elastic_magnitude", "inf"),
    ],
)
def test_out_of_range_numbers_are_refused_naming_key_and_value(capsys, override, key, shown):
    code, _, err = check_config(capsys, "tiny", "--set", override)
    assert_refused(code, err, key, shown)


def test_an_infinite_spacing_in_a_file_is_refused(capsys, tmp_path):
    (tmp_path / "inf.yaml").write_text("extends: base.yaml\ndata:\n  spacing_mm: [.inf, 1, 1]\n")
    (tmp_path / "base.yaml").write_text("model:\n  size: 64\n")
    code, _, err = check_config(capsys, str(tmp_path / "inf.yaml"))
    assert_refused(code, err, "inf.yaml", "data.spacing_mm")


def test_the_shipped_configs_stay_within_the_bounds():
    for name in ("base", "tiny", "paper_128", "paper_256", "demo"):
        load_config(name)
    load_config("paper_256", ["model.size=512", "model.size=1024", "data.spacing_mm=[0.1, 100, 1]"])


# ---------------------------------------------------------------- files that are no YAML config
def test_a_binary_config_file_is_not_a_text_yaml_file(capsys, tmp_path):
    path = tmp_path / "model.yaml"
    path.write_bytes(bytes(range(256)) * 4)
    code, _, err = check_config(capsys, str(path))
    assert_refused(code, err, "model.yaml: not a text YAML file")


def test_a_config_with_nul_bytes_is_not_a_text_yaml_file(capsys, tmp_path):
    (tmp_path / "nul.yaml").write_text("seed: 0\x00\n")
    code, _, err = check_config(capsys, str(tmp_path / "nul.yaml"))
    assert_refused(code, err, "nul.yaml: not a text YAML file")


@pytest.mark.parametrize("parent", ["5", "[a.yaml]", "{a: 1}", "''", "true"])
def test_extends_must_be_a_config_file_name(capsys, tmp_path, parent):
    (tmp_path / "child.yaml").write_text(f"extends: {parent}\nseed: 1\n")
    code, _, err = check_config(capsys, str(tmp_path / "child.yaml"))
    assert_refused(code, err, "child.yaml", "extends must be a config file name")


def test_extends_of_a_folder_is_refused(capsys, tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "child.yaml").write_text("extends: sub\n")
    code, _, err = check_config(capsys, str(tmp_path / "child.yaml"))
    assert_refused(code, err, "child.yaml", "'sub'", "not a file")


def test_a_config_file_over_one_mib_is_refused_unread(capsys, tmp_path):
    (tmp_path / "big.yaml").write_text("seed: 0\n#" + "x" * (1 << 20) + "\n")
    code, _, err = check_config(capsys, str(tmp_path / "big.yaml"))
    assert_refused(code, err, "big.yaml", "MiB")


def test_a_config_name_too_long_for_the_file_system_is_not_found(capsys):
    code, _, err = check_config(capsys, "c" * 100_000)
    assert_refused(code, err, "config file not found")


# ---------------------------------------------------------------- YAML bombs
def test_a_billion_laughs_config_is_refused_in_well_under_a_second(capsys, tmp_path):
    (tmp_path / "bomb.yaml").write_text(billion_laughs() + "\nseed: *l9\n")
    start = time.perf_counter()
    code, out, err = check_config(capsys, str(tmp_path / "bomb.yaml"))
    assert time.perf_counter() - start < 1.0
    assert_refused(code, err, "bomb.yaml", "too many YAML aliases", str(MAX_YAML_VALUES))
    assert out == ""


def test_a_billion_laughs_in_a_set_value_is_refused(capsys):
    value = "[&a [1,1,1,1,1,1,1,1,1,1], " + ", ".join(
        f"&{b} [{', '.join([f'*{a}'] * 10)}]" for a, b in zip("abcdef", "bcdefg")
    )
    start = time.perf_counter()
    code, _, err = check_config(capsys, "tiny", "--set", f"train.betas={value}]")
    assert time.perf_counter() - start < 1.0
    assert_refused(code, err, "--set train.betas", "too many YAML aliases")


def test_a_bomb_in_an_unused_section_is_refused_too(tmp_path):
    # the aliases are counted before anything is built or validated, wherever they sit
    (tmp_path / "bomb.yaml").write_text(billion_laughs(levels=6, width=10) + "\n")
    with pytest.raises(ConfigError, match="too many YAML aliases"):
        load_config(tmp_path / "bomb.yaml")


@pytest.mark.slow
def test_a_list_of_too_many_values_without_aliases_says_so(tmp_path):
    (tmp_path / "long.yaml").write_text("augment:\n  seeds: [" + "0," * MAX_YAML_VALUES + "0]\n")
    with pytest.raises(ConfigError, match=f"long.yaml: too many YAML values: over {MAX_YAML_VALUES}"):
        load_config(tmp_path / "long.yaml")


def test_a_few_aliases_are_still_fine(tmp_path):
    (tmp_path / "use.yaml").write_text("data:\n  window: &w [1, 99]\n  mr_percentiles: *w\n")
    assert load_config(tmp_path / "use.yaml").data.mr_percentiles == (1.0, 99.0)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("seed: &r [*r]\n", "alias refers to a node that contains it"),
        ("seed: " + "[" * 100_000 + "]" * 100_000 + "\n", "nested too deeply"),
        ("seed: " + "9" * 6000 + "\n", "cannot be read"),
    ],
    ids=["self-reference", "deep", "long-integer"],
)
def test_pathological_yaml_is_one_line(capsys, tmp_path, text, needle):
    (tmp_path / "bad.yaml").write_text(text)
    code, _, err = check_config(capsys, str(tmp_path / "bad.yaml"))
    assert_refused(code, err, "bad.yaml", needle)


# ---------------------------------------------------------------- messages stay short
def test_a_huge_value_is_quoted_short(capsys, tmp_path):
    (tmp_path / "v.yaml").write_text("model:\n  size: " + "k" * 200_000 + "\n")
    code, _, err = check_config(capsys, str(tmp_path / "v.yaml"))
    assert_refused(code, err, "model.size", "kkk...")


def test_a_huge_unknown_key_is_quoted_short(capsys, tmp_path):
    (tmp_path / "k.yaml").write_text("model:\n  ? " + "k" * 200_000 + "\n  : 1\n")
    code, _, err = check_config(capsys, str(tmp_path / "k.yaml"))
    assert_refused(code, err, "unknown key 'model.kkk")


def test_a_huge_set_item_is_quoted_short(capsys):
    code, _, err = check_config(capsys, "tiny", "--set", "x" * 100_000)
    assert_refused(code, err, "--set", "expected section.key=value")


# ---------------------------------------------------------------- the reader on its own (io: no config needed)
def test_the_yaml_reader_merges_extends_and_refuses_in_its_own_terms(tmp_path):
    import subprocess
    import sys

    from hagan_clinic.io.yaml_file import YamlFileError, read_yaml

    (tmp_path / "parent.yaml").write_text("a: {x: 1, y: 2}\nb: [1, 2]\n")
    (tmp_path / "child.yaml").write_text("extends: parent.yaml\na: {y: 3}\nb: [4]\n")
    assert read_yaml(tmp_path / "child.yaml") == {"a": {"x": 1, "y": 3}, "b": [4]}  # mappings merge, lists replace
    (tmp_path / "bomb.yaml").write_text(billion_laughs() + "\n")
    with pytest.raises(YamlFileError, match="bomb.yaml: too many YAML aliases"):
        read_yaml(tmp_path / "bomb.yaml")
    # the reader sits below the config: importing it loads no config model
    code = "import sys, hagan_clinic.io.yaml_file; print('hagan_clinic.config' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
