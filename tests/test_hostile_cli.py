"""The command line under hostile arguments and a hostile machine: seeds out of range, absurd phantom shapes, full
or read-only disks, memory running out, bytes that are no UTF-8, and messages that would be megabytes long.

Exit status 2 with one line of at most 300 characters for the user's or the machine's fault; never a traceback.
"""

from __future__ import annotations

import errno
import os

import pytest

from hagan_clinic.cli import cli
from hagan_clinic.errors import HaganError

from conftest import assert_one_line, run_cli

# ---------------------------------------------------------------- seeds
SEEDED = {
    "generate": ["generate", "--checkpoint", "m.pt", "--out", "o"],
    "regress": ["regress", "--features", "f.csv", "--clinical", "c.csv", "--out", "o"],
    "evaluate": ["evaluate", "--checkpoint", "m.pt", "--real", "r", "--out", "o"],
    "phantoms": ["phantoms", "o"],
}


def test_every_seed_option_is_covered():
    # a command given a --seed later must be added to SEEDED (and so to the range check below)
    seeded = {name for name, cmd in cli.commands.items() if any("--seed" in p.opts for p in cmd.params)}
    assert seeded == set(SEEDED)


@pytest.mark.parametrize("command", sorted(SEEDED))
@pytest.mark.parametrize("seed", ["-3", "4294967296", "99999999999999999999999"])
def test_seeds_out_of_range_are_refused_by_every_command(capsys, command, seed):
    code, _, err = run_cli(capsys, *SEEDED[command][:1], "--seed", seed, *SEEDED[command][1:])
    assert code == 2
    assert_one_line(err, "--seed", seed, "0<=x<=4294967295")


# ---------------------------------------------------------------- phantoms: shape and seed
@pytest.mark.parametrize(
    ("shape", "needle"),
    [
        ("100000,100000,100000", "from 16 to 2048"),
        ("2048,2048,2048", "voxels per series"),
        ("8,8,8", "from 16 to 2048"),
        ("9" * 5000 + ",16,16", "expected three integers"),
        ("²,16,16", "expected three integers"),
        ("16,16", "expected three integers"),
    ],
    ids=["huge", "too-many-voxels", "tiny", "thousands-of-digits", "superscript", "two"],
)
def test_a_phantom_shape_out_of_bounds_is_refused_with_advice_that_fits(capsys, tmp_path, shape, needle):
    code, _, err = run_cli(capsys, "phantoms", tmp_path / "o", "--shape", shape)
    assert code == 2
    assert_one_line(err, "--shape", needle)
    assert "--slab" not in err
    assert not (tmp_path / "o").exists()


def test_the_phantom_library_refuses_a_negative_seed(tmp_path):
    from hagan_clinic.phantoms import PhantomError, write_cohort

    with pytest.raises(PhantomError, match="seed must be an integer from 0 to 4294967295"):
        write_cohort(tmp_path / "o", n=1, seed=-3, shape=(16, 16, 16), progress=False)


# ---------------------------------------------------------------- full, read-only and forbidden disks
@pytest.mark.parametrize(
    ("code", "verb", "text"),
    [
        (errno.ENOSPC, "write", "No space left on device"),
        (errno.EDQUOT, "write", "Disk quota exceeded"),
        (errno.EROFS, "write", "Read-only file system"),
        (errno.EFBIG, "write", "File too large"),
        (errno.EACCES, "access", "Permission denied"),
        (errno.EPERM, "access", "Operation not permitted"),
        (errno.ENAMETOOLONG, "access", "File name too long"),
    ],
)
def test_a_refused_file_is_exit_2_naming_the_file(capsys, monkeypatch, tmp_path, code, verb, text):
    def refuse(out, **kwargs):
        raise OSError(code, os.strerror(code), str(out / "PH0001" / "STUDY_1" / "slice_0001.dcm"))

    monkeypatch.setattr("hagan_clinic.phantoms.write_cohort", refuse)
    status, out, err = run_cli(capsys, "phantoms", tmp_path / "o", "--n", "1")
    assert status == 2
    assert_one_line(err, f"cannot {verb} slice_0001.dcm: {text}")
    assert str(tmp_path) not in err  # the file's name, not its folders
    assert out == ""


def test_a_full_disk_under_a_wrapped_error_is_still_named(capsys, monkeypatch, tmp_path):
    # torch.save reports a failed write as a RuntimeError raised while handling the OSError (or the other way)
    def refuse(*args, **kwargs):
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as err:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed") from err

    monkeypatch.setattr("hagan_clinic.phantoms.write_cohort", refuse)
    status, _, err = run_cli(capsys, "phantoms", tmp_path / "o", "--n", "1")
    assert status == 2
    assert_one_line(err, "cannot write: No space left on device")


def test_a_checkpoint_written_to_a_full_disk_names_the_checkpoint(tmp_path, monkeypatch):
    import torch

    from hagan_clinic.io.torch_files import atomic_torch_save

    def full(obj, f, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # what a write through a file object raises

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError) as info:
        atomic_torch_save({"a": 1}, tmp_path / "model.pt")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "model.pt")
    assert list(tmp_path.iterdir()) == []


def test_a_file_that_is_missing_for_no_user_reason_stays_an_internal_error(capsys, monkeypatch, tmp_path):
    def defect(*args, **kwargs):
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), "/tmp/ours.tmp")

    monkeypatch.setattr("hagan_clinic.phantoms.write_cohort", defect)
    status, _, err = run_cli(capsys, "phantoms", tmp_path / "o")
    assert status == 1 and err.startswith("hagan-clinic: internal error: FileNotFoundError")


# ---------------------------------------------------------------- memory
@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "target", "advice"),
    [
        (["generate", "--checkpoint", "m.pt", "--out", "o"], "hagan_clinic.models.hagan.load_checkpoint", "--slab"),
        (["phantoms", "o"], "hagan_clinic.phantoms.write_cohort", "smaller --shape"),
        (["regress", "--features", "f", "--clinical", "c", "--out", "o"], "hagan_clinic.pipelines.regress.run", None),
        (["check-config", "tiny"], "hagan_clinic.config.load_config", None),
    ],
    ids=["generate", "phantoms", "regress", "check-config"],
)
def test_out_of_memory_advice_fits_the_command(capsys, monkeypatch, args, target, advice):
    def exhaust(*a, **k):
        raise MemoryError

    monkeypatch.setattr(target, exhaust)
    code, _, err = run_cli(capsys, *args)
    assert code == 1
    assert err.startswith("hagan-clinic: error: out of memory") and err.count("\n") == 1, err
    if advice is None:
        assert "--slab" not in err and err.strip() == "hagan-clinic: error: out of memory"
    else:
        assert advice in err
        assert "--slab" not in err or args[0] in ("generate", "evaluate")


# ---------------------------------------------------------------- bytes that are no UTF-8
def test_an_argument_with_bytes_that_are_no_utf8_is_printed_not_fatal(capsys, tmp_path):
    # Python hands such bytes over as lone surrogates ('\udcff'); printing them strictly raises UnicodeEncodeError
    name = os.fsdecode(b"cohort_\xff")
    code, out, err = run_cli(capsys, "phantoms", tmp_path / name, "--n", "1", "--shape", "16,16,16")
    assert code == 0, err
    assert "1 patients:" in out and "cohort_" in out
    assert (tmp_path / name / "clinical.csv").is_file()


def test_a_bad_argument_with_bytes_that_are_no_utf8_is_one_line(capsys):
    code, _, err = run_cli(capsys, "check-config", os.fsdecode(b"conf\xfe\xff"))
    assert code == 2
    assert_one_line(err, "config file not found")


def test_a_salt_with_bytes_that_are_no_utf8_reaches_the_pipeline(capsys, monkeypatch, tmp_path):
    seen = {}

    def fake_run(src, opts, tracker):
        seen["salt"] = opts.pseudonymize
        raise HaganError(f"stop here ({opts.pseudonymize})")

    monkeypatch.setattr("hagan_clinic.pipelines.encode.run", fake_run)
    salt = os.fsdecode(b"s\xffalt")
    code, _, err = run_cli(capsys, "encode", tmp_path, "--checkpoint", "m.pt", "--out", "f.csv", "--pseudonymize", salt,
                       "--no-tracking")  # fmt: skip
    assert seen["salt"] == salt
    assert code == 2
    assert_one_line(err, "stop here")


# ---------------------------------------------------------------- messages stay one short line
def test_a_huge_bad_value_gives_a_short_usage_error(capsys):
    code, _, err = run_cli(capsys, "phantoms", "o", "--n", "x" * 100_000)
    assert code == 2
    assert_one_line(err, "--n")


def test_a_huge_error_message_is_cut(capsys, monkeypatch):
    def shout(*args, **kwargs):
        raise HaganError("bad value " + "v" * 1_000_000)

    monkeypatch.setattr("hagan_clinic.config.load_config", shout)
    code, _, err = run_cli(capsys, "check-config", "tiny")
    assert code == 2
    assert_one_line(err, "bad value vvv", "...")


def test_a_huge_internal_error_is_cut_and_keeps_its_hint(capsys, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("x\n" * 1_000_000)

    monkeypatch.setattr("hagan_clinic.config.load_config", crash)
    code, _, err = run_cli(capsys, "check-config", "tiny")
    assert code == 1
    assert err.count("\n") == 1 and len(err.strip()) <= 300, err
    assert err.startswith("hagan-clinic: internal error: RuntimeError") and "HAGAN_CLINIC_DEBUG=1" in err


def test_click_usage_errors_keep_their_hint(capsys):
    code, _, err = run_cli(capsys, "phantoms", "o", "--shape", "1" * 200 + ",1")
    assert code == 2
    assert_one_line(err, "(see 'hagan-clinic phantoms --help')")


def test_one_helper_makes_an_exception_one_line():
    from hagan_clinic.errors import describe

    assert describe(HaganError("bad\n  value")) == "bad value"  # the user's message as it is
    assert describe(KeyError("x\ny")) == "KeyError: 'x\\ny'"
    assert describe(ValueError("v" * 1000), 40) == "ValueError: " + "v" * 25 + "..."


@pytest.mark.parametrize(
    "argv, key",
    [
        (["encode", "src", "--checkpoint", "m.pt", "--out", "f.csv", "--set", "data.window=[-500,500]"], "data.window"),
        (["encode", "src", "--checkpoint", "m.pt", "--out", "f.csv", "--set", "model.size=64"], "model.size"),
        (["evaluate", "--checkpoint", "m.pt", "--real", "r", "--out", "o", "--set", "data.spacing_mm=2"], "data."),
    ],
)
def test_a_setting_the_checkpoint_decides_is_refused_not_ignored(argv, key, tmp_path, monkeypatch, capsys):
    """encode and evaluate take the model and the data contract from the checkpoint: a --set of them used to run
    and change nothing, silently."""
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert_one_line(err, key, "from its checkpoint")


def test_the_settings_a_checkpoint_command_does_use_are_taken(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    seen = {}

    def fake_run(src, opts, tracker):
        seen.update(batch_size=opts.batch_size, device=opts.device)
        raise HaganError("stop here")

    monkeypatch.setattr("hagan_clinic.pipelines.encode.run", fake_run)
    argv = ["encode", "src", "--checkpoint", "m.pt", "--out", "f.csv", "--set", "encode.batch_size=3"]
    code, _, err = run_cli(capsys, *argv, "--set", "device=cpu")
    assert code == 2 and "stop here" in err and seen == {"batch_size": 3, "device": "cpu"}


@pytest.mark.parametrize("argv", [["-q", "phantoms", "x", "-v"], ["phantoms", "--out", "x", "-v", "-q"]])
def test_quiet_and_verbose_together_are_refused(argv, tmp_path, monkeypatch, capsys):
    """Both used to be accepted, the last one silently winning."""
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and not (tmp_path / "x").exists()
    assert_one_line(err, "--quiet and --verbose contradict each other")


def test_a_set_without_a_key_says_what_is_expected_on_every_command(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "encode", "src", "--checkpoint", "m.pt", "--out", "f.csv", "--set", "=1")
    assert code == 2
    assert_one_line(err, "expected section.key=value")
