"""Registered models on the command line: every command that takes a checkpoint takes models:/NAME/VERSION and
models:/NAME@ALIAS, uses that version's checkpoint, and records the version it used; promote moves @champion."""

from __future__ import annotations

import hashlib
import json

import nibabel as nib
import pytest

from hagan_clinic.models.hagan import HAGAN
from hagan_clinic.phantoms import write_cohort
from hagan_clinic.tracking import Tracker

from conftest import run_cli, tiny_config

NAME = "cli-model"


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A store with two checkpoints of the tiny model registered as versions 1 and 2 (different weights)."""
    base = tmp_path_factory.mktemp("registered")
    uri = f"sqlite:///{base / 'store' / 'mlflow.db'}"
    files = []
    for seed in (0, 1):
        path = base / f"model_{seed}.pt"
        HAGAN.from_config(tiny_config(f"seed={seed}")).save(path)
        files.append(path)
        tracker = Tracker(uri, "registry-cli")
        with tracker.run("train"):
            tracker.register_model(NAME, path, tiny_config().to_dict(), {})
    cohort = base / "cohort"
    write_cohort(cohort, 1, seed=0, shape=(24, 48, 48), progress=False)
    return {"uri": uri, "files": files, "cohort": cohort}


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_info_and_promote_take_registry_uris(capsys, registered):
    uri = registered["uri"]
    code, out, err = run_cli(capsys, "info", f"models:/{NAME}@latest", "--tracking-uri", uri)
    assert code == 0, err
    assert f"registered     {NAME}/2" in out and sha(registered["files"][1]) in out
    code, out, err = run_cli(capsys, "promote", f"models:/{NAME}/1", "--tracking-uri", uri)
    assert code == 0 and f"@champion -> {NAME}/1" in out, err
    code, out, _ = run_cli(capsys, "info", f"models:/{NAME}@champion", "--tracking-uri", uri, "--json")
    described = json.loads(out)
    assert described["registered_model"] == f"{NAME}/1" and described["sha256"] == sha(registered["files"][0])


def test_encode_uses_and_records_the_version_it_was_given(capsys, registered, tmp_path):
    from hagan_clinic.io.files import read_provenance

    uri = registered["uri"]
    run_cli(capsys, "promote", f"models:/{NAME}/1", "--tracking-uri", uri)
    tables = {}
    for given in (f"models:/{NAME}@champion", f"models:/{NAME}/2", str(registered["files"][0])):
        out = tmp_path / f"f{len(tables)}.parquet"
        code, _, err = run_cli(capsys, "encode", registered["cohort"], "--checkpoint", given, "--out", out,
                               "--workers", "0", "--tracking-uri", uri)  # fmt: skip
        assert code == 0, err
        tables[given] = read_provenance(out)
    champion, second, plain = tables.values()
    assert (champion["model_version"], champion["checkpoint_sha256"]) == (f"{NAME}/1", sha(registered["files"][0]))
    assert (second["model_version"], second["checkpoint_sha256"]) == (f"{NAME}/2", sha(registered["files"][1]))
    assert plain["model_version"] == f"{NAME}/1"  # a plain file: found in the registry by its sha256


def test_generate_names_the_registered_generator_in_its_files(capsys, registered, tmp_path):
    code, _, err = run_cli(capsys, "generate", "--checkpoint", f"models:/{NAME}@latest", "--out", tmp_path / "g",
                           "--tracking-uri", registered["uri"])  # fmt: skip
    assert code == 0, err
    description = nib.load(tmp_path / "g" / "sample_0000.nii.gz").header["descrip"].item().decode()
    assert description.startswith(f"hagan-clinic model={NAME}-generator/2 {sha(registered['files'][1])[:12]};")


@pytest.mark.parametrize("command", ["evaluate", "augment", "encode", "generate", "info"])
def test_every_checkpoint_argument_reads_the_registry(capsys, registered, tmp_path, command):
    """An unknown version is a one-line registry error, not 'file not found': the URI was looked up."""
    missing = f"models:/{NAME}/9"
    args = {
        "evaluate": ["evaluate", "--checkpoint", missing, "--real", tmp_path, "--out", tmp_path / "e"],
        "augment": ["augment", "--config", "tiny", "--set", f"augment.checkpoint={missing}", "--out", tmp_path / "a"],
        "encode": ["encode", registered["cohort"], "--checkpoint", missing, "--out", tmp_path / "f.parquet"],
        "generate": ["generate", "--checkpoint", missing, "--out", tmp_path / "g"],
        "info": ["info", missing],
    }[command]
    code, _, err = run_cli(capsys, *args, "--tracking-uri", registered["uri"])
    assert code == 2 and f"model '{NAME}' has no version 9" in err and len(err.strip().splitlines()) == 1, err
