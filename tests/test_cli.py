"""The command line: help, config checking, generation to NIfTI, and one-line errors with exit status 2."""

from __future__ import annotations

import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from hagan_clinic.cli import main
from hagan_clinic.config import load_config
from hagan_clinic.io.files import LEDGER_NAME
from hagan_clinic.models.hagan import HAGAN


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, needle: str) -> None:
    assert code == 2
    assert err.strip().count("\n") == 0, err
    assert err.startswith("hagan-clinic: error:")
    assert needle in err
    assert "Traceback" not in err


@pytest.fixture
def checkpoint(tmp_path):
    return HAGAN.from_config(load_config("tiny")).save(tmp_path / "tiny.pt")


@pytest.fixture
def conditional_checkpoint(tmp_path):
    return HAGAN.from_config(load_config("tiny", ["model.num_classes=2"])).save(tmp_path / "cond.pt")


def test_help_lists_the_commands(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for command in ("check-config", "generate", "import-reference", "demo"):
        assert command in out
    for command in ("check-config", "generate", "import-reference", "demo"):
        code, out, _ = run(capsys, command, "--help")
        assert code == 0 and "Usage:" in out


def test_console_script_answers_help():
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from hagan_clinic.cli import main; sys.exit(main(['--help']))"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0
    assert "torch" not in proc.stderr
    # --help must not pay for torch or mlflow
    probe = "import sys; from hagan_clinic.cli import main; main(['--help']); print('torch' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip().endswith("False")
    )


def test_check_config_prints_resolved_config(capsys):
    code, out, _ = run(capsys, "check-config", "tiny", "--set", "model.size=64")
    assert code == 0
    assert "size: 64" in out
    assert "feature map 16ch x 16^3" in out


def test_check_config_rejects_unknown_key(capsys):
    code, _, err = run(capsys, "check-config", "tiny", "--set", "model.wdith=3")
    assert_one_line_error(code, err, "model.wdith")


def test_generate_writes_nifti_in_hu_with_spacing(capsys, checkpoint, tmp_path):
    out_dir = tmp_path / "gen"
    code, out, _ = run(capsys, "generate", "--checkpoint", str(checkpoint), "-n", "2", "--out", str(out_dir))
    assert code == 0, out
    files = sorted(out_dir.glob("*.nii.gz"))
    assert [f.name for f in files] == ["sample_0000.nii.gz", "sample_0001.nii.gz"]
    img = nib.load(str(files[0]))
    assert img.shape == (32, 32, 32)
    np.testing.assert_allclose(np.diag(img.affine)[:3], [-12.0, -12.0, 12.0])  # (D, H, W) is LPS: x and y reversed
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
    assert img.get_data_dtype() == np.int16
    data = np.asarray(img.dataobj)
    assert data.min() >= -1024 and data.max() <= 600
    assert (out_dir / "samples.csv").read_text().splitlines()[0] == "file,index,seed,label"
    assert [p.name for p in out_dir.glob(".*")] == [LEDGER_NAME]  # no temporary files left, only the ledger


def test_generate_same_seed_same_volumes_and_slab_matches(capsys, checkpoint, tmp_path):
    def volumes(folder, *extra):
        assert run(capsys, "generate", "--checkpoint", str(checkpoint), "-n", "2", "--out", str(folder), *extra)[0] == 0
        return [np.asarray(nib.load(str(p)).dataobj) for p in sorted(folder.glob("*.nii.gz"))]

    a = volumes(tmp_path / "a", "--seed", "7")
    b = volumes(tmp_path / "b", "--seed", "7")
    c = volumes(tmp_path / "c", "--seed", "8")
    d = volumes(tmp_path / "d", "--seed", "7", "--slab", "1")
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])
    assert not np.array_equal(a[0], a[1])
    # slab generation equals one pass to 1e-5 in [-1, 1]; after rounding to whole HU at most 1 HU apart
    assert all(np.abs(x.astype(int) - y.astype(int)).max() <= 1 for x, y in zip(a, d))
    # sample i does not depend on how many samples were asked for
    e = volumes(tmp_path / "e", "--seed", "7", "-n", "1")
    assert np.array_equal(a[0], e[0])


def test_generate_with_label_on_conditional_checkpoint(capsys, conditional_checkpoint, tmp_path):
    out_dir = tmp_path / "cond"
    ckpt = str(conditional_checkpoint)
    code, _, err = run(capsys, "generate", "--checkpoint", ckpt, "-n", "2", "--label", "1", "--out", str(out_dir))
    assert code == 0, err
    written = sorted(p.name for p in out_dir.glob("*.nii.gz"))
    assert written == ["sample_0000_label1.nii.gz", "sample_0001_label1.nii.gz"]
    code, _, err = run(
        capsys, "generate", "--checkpoint", str(conditional_checkpoint), "--label", "2", "--out", str(tmp_path / "x")
    )
    assert_one_line_error(code, err, "[0, 1]")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["generate", "--checkpoint", "missing.pt", "--out", "o"], "not found"),
        (["generate", "--checkpoint", "{ckpt}", "--out", "o", "-n", "0"], "-n"),
        (["generate", "--checkpoint", "{ckpt}", "--out", "o", "--label", "1"], "unconditional"),
        (["generate", "--checkpoint", "{ckpt}", "--out", "o", "--device", "tpu"], "device"),
        (["generate", "--checkpoint", "{ckpt}", "--out", "o", "--slab", "0"], "--slab"),
        (["generate", "--out", "o"], "--checkpoint"),
        (["generate", "--checkpoint", "{garbage}", "--out", "o"], "not a readable checkpoint"),
        (["import-reference", "--generator", "g.pth", "--encoder", "e.pth", "--sub-encoder", "s.pth",
          "--size", "256", "--out", "m.pt"], "not found"),
        (["import-reference", "--generator", "g.pth", "--encoder", "e.pth", "--sub-encoder", "s.pth",
          "--size", "64", "--out", "m.pt"], "--size"),
        (["check-config", "nonexistent.yaml"], "not found"),
        (["no-such-command"], "no-such-command"),
    ],
)  # fmt: skip
def test_bad_arguments_give_one_line_and_exit_2(capsys, checkpoint, tmp_path, args, needle):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint")
    args = [a.format(ckpt=checkpoint, garbage=garbage) for a in args]
    code, _, err = run(capsys, *args)
    assert_one_line_error(code, err, needle)


def test_cuda_request_without_cuda_is_a_clear_error(capsys, checkpoint):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, _, err = run(capsys, "generate", "--checkpoint", str(checkpoint), "--out", "o", "--device", "cuda")
    assert_one_line_error(code, err, "CUDA is not available")


def test_demo_fast_logs_nested_runs(capsys, tmp_path):
    import mlflow

    code, out, err = run(capsys, "demo", "--fast", "--out", str(tmp_path / "demo"))
    assert code == 0, err
    assert (tmp_path / "demo" / "generated.png").stat().st_size > 0
    assert (tmp_path / "demo" / "run" / "model.pt").is_file()
    assert "Nothing was tuned" in out
    for stage in ("data", "train", "generate", "encode", "regress", "augment", "evaluate"):
        assert any(line.startswith(stage) for line in out.splitlines()), stage  # the summary table
    demo = tmp_path / "demo"
    assert (demo / "features.parquet").is_file() and (demo / "regress" / "metrics.json").is_file()
    assert (demo / "evaluate" / "metrics.json").is_file()
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    stages = ["augment", "data", "encode", "evaluate", "generate", "regress", "train"]
    arms = sorted(f"{arm} seed {seed}" for arm in ("real", "real+synthetic", "real+classical") for seed in (0, 1))
    assert sorted(r.info.run_name for r in runs) == sorted(["demo", *stages, *arms])
    assert all(r.info.status == "FINISHED" for r in runs)
    parent = next(r for r in runs if r.info.run_name == "demo")
    augment = next(r for r in runs if r.info.run_name == "augment")
    for r in runs:  # every stage is a child of the demo run, every arm a child of the augment run
        if r.info.run_name in stages:
            assert r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
        elif r.info.run_name in arms:
            assert r.data.tags.get("mlflow.parentRunId") == augment.info.run_id
    train_run = next(r for r in runs if r.info.run_name == "train")
    assert train_run.data.params["model.size"] == "32"
    assert train_run.data.params["train.iterations"] == "60"
    generate_run = next(r for r in runs if r.info.run_name == "generate")
    assert generate_run.data.metrics["slab_vs_one_pass_max_abs_diff"] <= 1e-5
    # the clean path: the GAN saw the training patients of the augmentation split only
    import json

    import pandas as pd

    from hagan_clinic.models.hagan import training_record

    split = pd.read_csv(demo / "augment" / "split.csv", dtype={"patient_id": str})
    seen = set(training_record(demo / "run" / "model.pt")["patient_ids"])
    assert seen == set(split.loc[split["split"] == "train", "patient_id"])
    # what the grid resolves is scored too, and the summary says why %emphysema needs a finer grid
    metrics = json.loads((demo / "regress" / "metrics.json").read_text())
    assert {"lung_volume_ml", "grid_lung_density_hu"} <= set(metrics["targets"])
    assert "wants a finer grid" in out and "explains r^2 =" in out
    memorisation = json.loads((demo / "evaluate" / "metrics.json").read_text())["memorisation"]
    assert "skipped" not in memorisation and memorisation["n_train"] == len(seen)
    # run again into the same folder: its own outputs are replaced without --overwrite, the phantom cohort is not
    # written again (new modification times would make every series new to the cache and the training data other)
    first_slice = next((demo / "cohort").rglob("*.dcm"))
    mtime = first_slice.stat().st_mtime_ns
    code, _, err = run(capsys, "demo", "--fast", "--out", str(tmp_path / "demo"), "--no-tracking")
    assert code == 0, err
    assert first_slice.stat().st_mtime_ns == mtime
