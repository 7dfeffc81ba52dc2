"""The command line: help, config checking, generation to NIfTI, and one-line errors with exit status 2."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from hagan_clinic.cli import main
from hagan_clinic.config import load_config
from hagan_clinic.io.files import LEDGER_NAME
from hagan_clinic.models.hagan import HAGAN

from conftest import assert_refused, run_cli


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
    assert (out_dir / "samples.csv").read_text().splitlines()[0] == "file,index,seed,label,model"
    sha = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert img.header["descrip"].item().decode().startswith(f"hagan-clinic model={sha[:12]}; seed=0 index=0")
    assert [p.name for p in out_dir.glob(".*")] == [LEDGER_NAME]  # no temporary files left, only the ledger


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_demo_fast_logs_nested_runs(capsys, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the demo's default store: under --out, not the current folder
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    code, out, err = run(capsys, "demo", "--fast", "--out", str(tmp_path / "demo"))
    assert code == 0, err
    assert not any(cwd.iterdir())
    assert (tmp_path / "demo" / "generated.png").stat().st_size > 0
    assert (tmp_path / "demo" / "run" / "model.pt").is_file()
    assert "Nothing was tuned" in out
    for stage in ("data", "train", "generate", "encode", "regress", "augment", "evaluate"):
        assert any(line.startswith(stage) for line in out.splitlines()), stage  # the summary table
    demo = tmp_path / "demo"
    assert (demo / "features.parquet").is_file() and (demo / "regress" / "metrics.json").is_file()
    assert (demo / "evaluate" / "metrics.json").is_file()
    store = demo / "mlruns" / "mlflow.db"
    assert store.is_file()
    client = MlflowClient(f"sqlite:///{store}")
    (experiment,) = [e for e in client.search_experiments() if e.name != "Default"]
    assert experiment.tags.get("mlflow.experimentKind") == "custom_model_development"
    runs = client.search_runs([experiment.experiment_id])
    # the printed summary opens the UI on this store and this experiment's runs
    assert f"mlflow ui --backend-store-uri sqlite:///{store.resolve()}" in out
    runs_page = f"then open http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs"
    assert out.rstrip().endswith(f"{runs_page}?workflowType=machine_learning")  # the model-training view
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
    samples = [a.path for a in client.list_artifacts(generate_run.info.run_id, "generated")]
    assert len([p for p in samples if p.endswith(".nii.gz")]) == 2, samples  # --fast makes two
    # every run says its stage; the parent holds the summary table and the headline figures
    stage_of = {r.info.run_name: r.data.tags.get("stage") for r in runs}
    assert all(stage_of[name] == name for name in ["demo", *stages]) and all(stage_of[a] == "augment" for a in arms)
    assert "summary.json" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    figures = parent.data.metrics
    assert "fid" in figures and any(k.startswith("r2_") for k in figures), sorted(figures)
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
    assert len(client.search_runs([experiment.experiment_id])) == len(runs) and not any(cwd.iterdir())


# ---------------------------------------------------------------- flags that mean the same everywhere
WRITES = {"generate", "import-reference", "train", "preprocess", "qct", "encode", "regress", "predict", "evaluate",
          "augment", "phantoms", "demo"}  # fmt: skip
COMPUTE = {"generate", "train", "encode", "evaluate", "augment"}
SETTINGS = {"train", "preprocess", "qct", "encode", "regress", "evaluate", "augment"}
COUNTED = {"generate", "evaluate", "phantoms"}
TABLES = {"qct", "encode", "regress", "predict"}


def test_every_command_takes_the_shared_flags_alike(capsys):
    from hagan_clinic.cli import cli
    from hagan_clinic.cli.options import WORKERS_HELP

    assert {"-q", "--quiet", "-v", "--verbose"} <= {o for p in cli.params for o in p.opts}
    for name, cmd in cli.commands.items():
        opts = {o for p in cmd.params for o in p.opts}
        assert {"-q", "--quiet", "-v", "--verbose"} <= opts, name
        assert ("--out" in opts) == (name in WRITES), name
        assert ("--device" in opts) == (name in COMPUTE), name
        assert ({"--config", "--set"} <= opts) == (name in SETTINGS), name
        assert ({"-n", "--n"} <= opts) == (name in COUNTED), name
        assert ("--format" in opts) == (name in TABLES), name
        for p in cmd.params:
            if "--workers" in p.opts:  # one default rule, said once
                assert (p.help, p.default) == (WORKERS_HELP, None), name
            if "--format" in p.opts:
                assert list(p.type.choices) == ["csv", "parquet"], name
        code, out, _ = run(capsys, name, "--help")
        assert code == 0 and "--quiet" in out and "--verbose" in out, name


def test_the_default_number_of_workers_is_one_rule():
    from hagan_clinic.cli.options import default_workers

    assert [default_workers(cores) for cores in (1, 2, 3, 4, 8, 64)] == [0, 0, 1, 2, 4, 4]


def test_encode_readers_leave_the_encoder_the_other_cores(capsys, monkeypatch, tmp_path):
    """With one reader on two cores the encoder runs on one thread while the reader works (two encoder threads
    beside a reader contend for both cores); the thread count is restored afterwards."""
    import hagan_clinic.pipelines.encode as encode_pipeline
    from hagan_clinic.errors import HaganError

    seen = {}
    real = encode_pipeline.encoder_threads

    def watching(readers, device):
        seen.update(readers=readers, previous=torch.get_num_threads())
        return real(readers, device)

    def encoding(model, grids, device, precision):
        seen["threads"] = torch.get_num_threads()
        raise HaganError("stop here")

    monkeypatch.setattr(encode_pipeline, "encoder_threads", watching)
    monkeypatch.setattr(encode_pipeline, "encode_batch", encoding)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        from hagan_clinic.phantoms import write_cohort

        src = tmp_path / "cohort"
        write_cohort(src, 1, seed=0, shape=(24, 48, 48), progress=False)
        model = HAGAN.from_config(load_config("tiny")).save(tmp_path / "m.pt")
        args = ("--checkpoint", model, "--workers", "1", "--no-tracking")
        code, _, err = run_cli(capsys, "encode", src, "--out", tmp_path / "t.csv", *args)
        assert code == 2 and "stop here" in err
        assert seen == {"readers": 1, "threads": 1, "previous": 2}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("command", ["preprocess", "qct", "encode"])
def test_every_workers_flag_defaults_to_the_rule(capsys, monkeypatch, tmp_path, command):
    from hagan_clinic.errors import HaganError

    seen = {}

    def fake_run(src, *args, **kwargs):
        seen["workers"] = args[0].workers if command == "encode" else kwargs["workers"]
        raise HaganError("stop here")

    monkeypatch.setattr(f"hagan_clinic.pipelines.{command}.run", fake_run)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)), raising=False)
    extra = ["--checkpoint", "m.pt", "--no-tracking"] if command == "encode" else []
    code, _, err = run_cli(capsys, command, tmp_path, "--out", "t.csv" if command != "preprocess" else "c", *extra)
    assert code == 2 and "stop here" in err
    assert seen["workers"] == 4


def test_encode_settings_come_from_the_config_and_flags_override_them(capsys, monkeypatch, tmp_path):
    from hagan_clinic.config import CONFIG_DIR
    from hagan_clinic.errors import HaganError

    seen = []

    def fake_run(src, opts, tracker):
        seen.append(opts)
        raise HaganError("stop here")

    monkeypatch.setattr("hagan_clinic.pipelines.encode.run", fake_run)
    config = tmp_path / "encode.yaml"
    config.write_text(
        f"extends: {CONFIG_DIR / 'base.yaml'}\nencode:\n  batch_size: 4\n  precision: bf16\n  workers: 3\n"
    )
    args = ["encode", tmp_path, "--checkpoint", "m.pt", "--out", "f.parquet", "--no-tracking", "--config", config]
    run_cli(capsys, *args)
    assert (seen[-1].batch_size, seen[-1].precision, seen[-1].workers, seen[-1].fmt) == (4, "bf16", 3, "parquet")
    run_cli(capsys, *args, "--set", "encode.batch_size=5")
    assert seen[-1].batch_size == 5
    run_cli(capsys, *args, "--batch-size", "1", "--workers", "0", "--precision", "fp32")
    assert (seen[-1].batch_size, seen[-1].precision, seen[-1].workers) == (1, "fp32", 0)
    code, _, err = run_cli(capsys, *args, "--set", "encode.batch_size=0")
    assert_refused(code, err, "encode.batch_size")
    code, _, err = run_cli(capsys, *args[:5], "f.parquet", "--format", "csv")  # the name says parquet
    assert_refused(code, err, "f.parquet", "--format")
    assert len(seen) == 3


def test_evaluate_settings_come_from_the_config_and_flags_override_them(capsys, monkeypatch):
    from hagan_clinic.errors import HaganError

    seen = []

    def fake_run(opts, tracker):
        seen.append(opts)
        raise HaganError("stop here")

    monkeypatch.setattr("hagan_clinic.pipelines.evaluate.run", fake_run)
    args = ["evaluate", "--checkpoint", "m.pt", "--real", "r", "--out", "o", "--no-tracking"]
    run_cli(capsys, *args)
    assert (seen[-1].n, seen[-1].measure, seen[-1].batch_size, seen[-1].seed) == (512, "laa950_pct", 4, 0)
    run_cli(capsys, *args, "--set", "evaluate.n=7", "--set", "evaluate.measure=mean_hu", "--set", "seed=3")
    assert (seen[-1].n, seen[-1].measure, seen[-1].seed) == (7, "mean_hu", 3)
    run_cli(capsys, *args, "--set", "evaluate.n=7", "-n", "9", "--seed", "4")
    assert (seen[-1].n, seen[-1].seed) == (9, 4)


def test_check_config_shows_the_command_sections(capsys):
    code, out, _ = run(capsys, "check-config", "base", "--set", "encode.batch_size=4")
    assert code == 0
    doc = yaml.safe_load(out)  # the derived line is a YAML comment
    assert doc["encode"] == {"batch_size": 4, "workers": None, "precision": "fp32"}
    assert doc["regress"]["targets"] == ["fev1pp", "fev1_fvc", "pct_emphysema"] and doc["regress"]["folds"] == 5
    assert doc["evaluate"]["n"] == 512


@pytest.mark.slow
def test_train_device_overrides_the_config(capsys, volume_dir, tmp_path):
    args = ["train", "--config", "tiny", "--data", volume_dir, "--no-tracking"]
    code, out, err = run_cli(capsys, *args, "--set", "device=cuda:7", "--device", "cpu", "--dry-run")
    assert code == 0, err
    assert yaml.safe_load(out)["device"] == "cpu"
    code, _, err = run_cli(capsys, *args, "--device", "tpu")
    assert_refused(code, err, "--device", "tpu")
    # a run that the config would send to a GPU this machine lacks trains where --device says
    steps = ["--set", "train.iterations=1", "--set", "train.checkpoint_every=1", "--set", "train.image_every=0"]
    code, out, err = run_cli(
        capsys, *args, *steps, "--set", "device=cuda:7", "--device", "cpu", "--out", tmp_path / "r"
    )
    assert code == 0, err
    assert "trained to iteration 1" in out


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal: progress bars show there unless --quiet."""

    def isatty(self) -> bool:
        return True


def _on_a_terminal(monkeypatch, *args) -> tuple[int, str]:
    term = _Terminal()
    with monkeypatch.context() as m:
        m.setattr(sys, "stderr", term)
        code = main([str(a) for a in args])
    return code, term.getvalue()


def test_quiet_silences_progress_and_keeps_results(capsys, monkeypatch, tmp_path):
    phantom = ["-n", "1", "--shape", "16,16,16"]
    code, err = _on_a_terminal(monkeypatch, "phantoms", "--out", tmp_path / "a", *phantom)
    assert code == 0 and "phantoms" in err  # the progress bar
    code, err = _on_a_terminal(monkeypatch, "qct", tmp_path / "a", "--out", tmp_path / "a.csv")
    assert code == 0 and "qct" in err
    for flags in (["--quiet", "phantoms"], ["phantoms", "-q"]):  # on the group or on the command
        target = tmp_path / flags[0].strip("-")
        code, err = _on_a_terminal(monkeypatch, *flags, target, *phantom)
        assert code == 0 and err == ""
        assert (target / "clinical.csv").is_file()
    code, err = _on_a_terminal(monkeypatch, "qct", tmp_path / "a", "--out", tmp_path / "b.csv", "--quiet")
    assert code == 0 and err == ""
    out, _ = capsys.readouterr()
    assert out.count("1 patients:") == 3 and out.count("b.csv") == 1  # results still on stdout


def test_phantoms_take_out_as_a_flag_or_positionally(capsys, tmp_path):
    for args in (["--out", tmp_path / "flag"], [tmp_path / "positional"]):
        code, out, err = run_cli(capsys, "phantoms", *args, "-n", "1", "--shape", "16,16,16")
        assert code == 0 and err == "", err  # no progress bar in a stderr that is no terminal
        assert out.strip().endswith(f"{args[-1] / 'clinical.csv'}") and (args[-1] / "clinical.csv").is_file()
    code, _, err = run_cli(capsys, "phantoms", tmp_path / "a", "--out", tmp_path / "b", "-n", "1")
    assert code == 2 and "--out" in err and not (tmp_path / "a").exists()
    code, _, err = run_cli(capsys, "phantoms", "-n", "1")
    assert code == 2 and "--out" in err


@pytest.fixture
def log_to_stderr():
    """The project's logging configured as the command line does (the handler writes to each test's captured
    stderr: see test_log_lines_go_to_the_stderr_of_the_moment); conftest makes the logger pristine again after."""
    from hagan_clinic.io import logs

    logs.configure(0)
    yield


@pytest.fixture(scope="module")
def command_run_by_a_module_fixture():
    """A command run in this process before any function fixture starts, as the cohort tests' fixtures do."""
    assert main(["--verbose", "check-config", "tiny"]) == 0


def test_each_test_starts_with_the_project_logger_no_command_touched(command_run_by_a_module_fixture, caplog):
    """Older pytest versions capture only what reaches the root logger: a command that ran in a module fixture
    (its stderr handler, propagation off, debug level) must not hide a later test's records from ``caplog``."""
    import logging

    from hagan_clinic.io import logs

    root = logging.getLogger(logs.LOGGER)
    assert root.propagate and root.level == logging.NOTSET and logs._state == {"verbosity": 0}
    assert not [h for h in root.handlers if isinstance(h, logs._CurrentStderr)]
    with caplog.at_level("WARNING", logger="hagan_clinic.serving"):
        logging.getLogger("hagan_clinic.serving").warning("seen by caplog")
    assert "seen by caplog" in caplog.text


def test_verbose_adds_debug_lines_and_every_level_prints_the_same_results(
    capsys, monkeypatch, checkpoint, tmp_path, log_to_stderr
):
    """-v: one line per series (digest, status, seconds; never a name or path) and per encoded batch, on stderr;
    the default shows none, -q nothing at all; stdout is the same at every level."""
    from hagan_clinic.io.cohort import discover
    from hagan_clinic.phantoms import write_cohort

    cohort = tmp_path / "cohort"
    write_cohort(cohort, n=2, seed=0, shape=(16, 32, 32), progress=False, extras=False)
    digests = [r.digest for r in discover(cohort, "CT").ok]
    outs, errs = {}, {}
    for level in ("-q", "default", "-v"):
        (tmp_path / level).mkdir()
        monkeypatch.chdir(tmp_path / level)  # the same relative --out: the same stdout
        flags = [] if level == "default" else [level]
        prep = run_cli(capsys, "preprocess", cohort, "--out", "cache", "--config", "tiny", "--workers", "0", *flags)
        enc = run_cli(capsys, "encode", cohort, "--checkpoint", checkpoint, "--out", "f.csv", "--workers", "0",
                      "--no-tracking", *flags)  # fmt: skip
        assert prep[0] == 0 and enc[0] == 0, prep[2] + enc[2]
        outs[level], errs[level] = prep[1] + enc[1], prep[2] + enc[2]
    assert outs["-q"] == outs["default"] == outs["-v"] and "2 ok" in outs["-v"]
    assert errs["-q"] == ""
    series = [line for line in errs["-v"].splitlines() if line.startswith("preprocessing ") and " series " in line]
    assert len(series) == 2 and all(" ok in " in line and "read " in line for line in series), errs["-v"]
    assert sorted(line.split(" series ")[1].split()[0] for line in series) == sorted(digests)
    assert "encode batch 0 " in errs["-v"] and "waited" in errs["-v"]
    assert not any(word in errs["-v"] for word in ("PHANTOM", str(cohort), "PH0001"))  # no name, no path
    assert "encode batch" not in errs["default"] and not any(d in errs["default"] for d in digests)


def test_log_lines_go_to_the_stderr_of_the_moment(monkeypatch, capsys):
    """The handler used to keep the stream it was made with: in a test session (or any tool that swaps stderr)
    that is a capture closed long before, and every later log line failed."""
    import io
    import logging

    from hagan_clinic.io import logs

    root = logging.getLogger(logs.LOGGER)
    monkeypatch.setattr(root, "handlers", [])
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    logs.configure(0)
    first.close()  # the stream of the moment the handler was made goes away
    second = io.StringIO()
    monkeypatch.setattr(sys, "stderr", second)
    logging.getLogger("hagan_clinic.pipelines.encode").info("a line")
    assert second.getvalue() == "a line\n"
