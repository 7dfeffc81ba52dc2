"""The training loop on tiny 32^3 volumes: run folder, phase isolation, exact resume, MLflow, options, errors.

Runs are a handful of iterations of configs/tiny.yaml on CPU. Subprocess tests run the real command line
(``python -m hagan_clinic.cli``), the resume test SIGKILLs it mid-run through HAGAN_CLINIC_KILL_AFTER_ITERATION.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from hagan_clinic.cli import main
from hagan_clinic.config import Config, load_config
from hagan_clinic.models.hagan import HAGAN, load_checkpoint
from hagan_clinic.training import loop, losses
from hagan_clinic.training.loop import TrainingError, train
from hagan_clinic.training.losses import PHASES
from hagan_clinic.training.state import MetricsLog, load_state

LOSSES = ("loss_D", "loss_G", "loss_EH", "loss_EG")
#: a short run: 4 iterations, logs and states every 2, one preview at the end
SHORT = ("train.iterations=4", "train.log_every=2", "train.checkpoint_every=2", "train.image_every=0")


def tiny(*overrides: str) -> Config:
    return load_config("tiny", [*SHORT, *overrides])


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, needle: str) -> None:
    assert code == 2, err
    assert err.startswith("hagan-clinic: error:"), err
    assert err.strip().count("\n") == 0, err
    assert "Traceback" not in err
    assert needle in err, err


def assert_same(a, b, where: str = "state") -> None:
    """Exact equality of nested state (tensors bit for bit, with dtype)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


# ---- 1. a run folder ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_writes_the_run_folder(volume_dir, tmp_path):
    cfg = load_config(
        "tiny",
        [
            "train.iterations=20",
            "train.log_every=5",
            "train.checkpoint_every=5",
            "train.image_every=10",
            "train.keep_last=2",
        ],
    )
    out = tmp_path / "run"
    result = train(cfg, out, data_dir=volume_dir, progress=False)

    assert result.iteration == 20 and result.run_dir == out
    assert result.snapshot == out / "model.pt"
    assert result.nonfinite_skipped == 0 and result.run_id is None

    lines = metrics(out)
    assert [m["iteration"] for m in lines] == [5, 10, 15, 20]
    for m in lines:
        for key in LOSSES:
            assert math.isfinite(m[key]) and m[key] > 0, (key, m)
        assert m["it_per_s"] > 0 and m["peak_memory_mb"] > 0 and m["nonfinite_skipped"] == 0
    assert result.last_losses == {k: v for k, v in lines[-1].items() if k.startswith("loss_")}

    # rotation keeps the last keep_last of each kind; previews at image_every and at the end
    assert files(out / "checkpoints") == [
        "snapshot_0000015.pt",
        "snapshot_0000020.pt",
        "state_0000015.pt",
        "state_0000020.pt",
    ]
    assert files(out / "previews") == ["iter_0000010.png", "iter_0000020.png"]
    assert (out / "previews" / "iter_0000020.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Config.from_dict(yaml.safe_load((out / "config.yaml").read_text())) == cfg

    # model.pt: a sampling checkpoint (no D) with the weights of the last state
    model = load_checkpoint(out / "model.pt")
    assert model.parts == ("G", "EH", "EG") and model.config == cfg
    state = load_state(out / "checkpoints" / "state_0000020.pt")
    assert state["iteration"] == 20 and state["nonfinite_total"] == 0
    for part in ("G", "EH", "EG"):
        assert_same(getattr(model, part).state_dict(), state["models"][part], part)
    # every network was trained
    init = HAGAN.from_config(cfg)
    for part in PHASES:
        trained = state["models"][part]
        assert any(not torch.equal(v, trained[k]) for k, v in getattr(init, part).state_dict().items()), part
    # the model encodes and generates
    x = torch.from_numpy(np.load(volume_dir / "vol_00.npy").astype(np.float32))[None, None]
    assert torch.isfinite(model.generate(model.encode(x))).all()


@pytest.fixture
def train_log():
    """The training package's log records (conftest makes the project's logger pristine again after)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("hagan_clinic.training")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


@pytest.mark.slow
@pytest.mark.parametrize("verbosity", [0, -1], ids=["normal", "quiet"])
def test_progress_is_a_log_line_per_log_step_off_a_terminal_and_nothing_under_quiet(
    volume_dir, tmp_path, capsys, train_log, verbosity
):
    from hagan_clinic.io import logs

    logs.configure(verbosity)
    train(tiny("train.iterations=2", "train.log_every=1"), tmp_path / "run", volume_dir)  # stderr: not a terminal
    err = capsys.readouterr().err
    lines = [r.getMessage() for r in train_log]
    if verbosity < 0:
        assert lines == [] and err == ""
        return
    assert lines[0] == f"training run: 4 volumes in {volume_dir}; 1 process(es) on cpu"
    assert [line.split(" ")[0] for line in lines[1:]] == ["[1/2]", "[2/2]"]
    assert all(f"{k}=" in lines[-1] for k in (*LOSSES, "it_per_s"))
    assert "\r" not in err  # no progress bar


# ---- 2. one step per network ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_loop_steps_each_network_once_per_iteration(volume_dir, tmp_path):
    train(tiny("train.iterations=3", "train.checkpoint_every=3"), tmp_path / "run", volume_dir, progress=False)
    state = load_state(tmp_path / "run" / "checkpoints" / "state_0000003.pt")
    for part in PHASES:
        steps = {float(s["step"]) for s in state["optimizers"][part]["state"].values()}
        assert steps == {3.0}, part
        # and each optimiser holds exactly its network's parameters
        n_params = len(list(getattr(HAGAN.from_config(load_config("tiny")), part).parameters()))
        assert len(state["optimizers"][part]["state"]) == n_params


# ---- 3. exact resume, and refusals ----------------------------------------------------------------------------


def cli_train(data: Path, out: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    """``python -m hagan_clinic.cli train`` in the background (one thread each, so that two runs share 2 cores)."""
    cmd = [sys.executable, "-m", "hagan_clinic.cli", "train", "--config", "tiny", "--data", str(data)]
    cmd += ["--out", str(out), "--no-tracking", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_exact(volume_dir, tmp_path):
    n = 6
    # log_every 4: the state at 6 holds a half-filled metric window, which the resumed run must complete
    sets = [f"train.iterations={2 * n}", f"train.checkpoint_every={n}", "train.log_every=4", "train.image_every=0"]
    sets += ["train.ema=true", "train.ema_decay=0.9"]
    args = [a for s in sets for a in ("--set", s)]
    straight, broken = tmp_path / "straight", tmp_path / "broken"

    whole_proc = cli_train(volume_dir, straight, *args)
    killed = finish(cli_train(volume_dir, broken, *args, env={"HAGAN_CLINIC_KILL_AFTER_ITERATION": str(n)}))
    assert killed.returncode == -9, killed.stderr
    assert files(broken / "checkpoints") == [f"snapshot_{n:07d}.pt", f"state_{n:07d}.pt"]
    assert not (broken / "model.pt").exists()
    assert [m["iteration"] for m in metrics(broken)] == [4]

    resumed = finish(cli_train(volume_dir, broken, *args, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert f"trained to iteration {2 * n}" in resumed.stdout
    whole = finish(whole_proc)
    assert whole.returncode == 0, whole.stderr

    a = load_state(straight / "checkpoints" / f"state_{2 * n:07d}.pt")
    b = load_state(broken / "checkpoints" / f"state_{2 * n:07d}.pt")
    assert a["ema"] is not None
    assert_same(a, b)
    assert_same(torch.load(straight / "model.pt"), torch.load(broken / "model.pt"))
    ma, mb = metrics(straight), metrics(broken)
    assert [m["iteration"] for m in ma] == [m["iteration"] for m in mb] == [4, 8, 12]
    for la, lb in zip(ma, mb):
        assert {k: la[k] for k in LOSSES} == {k: lb[k] for k in LOSSES}


@pytest.mark.slow
def test_resume_refusals(volume_dir, tmp_path, capsys):
    base = ["train", "--config", "tiny", "--data", str(volume_dir), "--no-tracking", "--out", str(tmp_path / "run")]
    short = ["--set", "train.iterations=2", "--set", "train.image_every=0"]

    code, _, err = run_cli(capsys, *base, *short, "--resume")
    assert_one_line_error(code, err, "nothing to resume")
    code, _, err = run_cli(capsys, *base, *short, "--resume", str(tmp_path / "state_0000002.pt"))
    assert_one_line_error(code, err, "file not found")

    code, out, err = run_cli(capsys, *base, *short)
    assert code == 0, err
    assert "trained to iteration 2" in out

    code, _, err = run_cli(capsys, *base, *short)
    assert_one_line_error(code, err, "holds a training run already")
    code, _, err = run_cli(capsys, *base, *short, "--set", "model.latent_dim=16", "--resume")
    assert_one_line_error(code, err, "model config differs")
    # --resume in the middle of the options takes no value
    code, out, err = run_cli(capsys, *base[:-2], "--resume", "--out", str(tmp_path / "run"), *short)
    assert code == 0, err
    assert "trained to iteration 2" in out
    # --resume STATE: from a given state file, here one iteration further
    state = tmp_path / "run" / "checkpoints" / "state_0000002.pt"
    code, out, err = run_cli(capsys, *base, "--resume", str(state), "--set", "train.iterations=3")
    assert code == 0, err
    assert "trained to iteration 3" in out
    assert [m["iteration"] for m in metrics(tmp_path / "run")] == [2, 3]


# ---- 4. MLflow ----------------------------------------------------------------------------------------------


def mlflow_client():
    from mlflow import MlflowClient

    return MlflowClient(os.environ["MLFLOW_TRACKING_URI"])


@pytest.mark.slow
def test_tracked_run_params_metrics_artifacts_and_registered_model(volume_dir, tmp_path):
    from hagan_clinic.tracking import Tracker

    tracker = Tracker()
    cfg = tiny()
    out = tmp_path / "run"
    result = train(cfg, out, volume_dir, tracker=tracker, progress=False)
    assert result.run_id is not None
    client = mlflow_client()
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"

    p = run.data.params
    assert p["train.batch_size"] == "2" and p["model.size"] == "32" and p["seed"] == "0"
    assert p["data.window"] == "[-1024.0, 600.0]" and p["train.precision"] == "fp32"
    tags = run.data.tags
    assert tags["stage"] == "train" and tags["data.modality"] == "CT" and tags["data.size"] == "32"

    lines = metrics(out)
    for key in (*LOSSES, "it_per_s", "peak_memory_mb", "nonfinite_skipped"):
        history = client.get_metric_history(result.run_id, key)
        assert [m.step for m in history] == [2, 4], key
        for m, line in zip(history, lines):
            assert m.value == pytest.approx(line[key], rel=1e-6), key

    top = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"snapshot", "previews", "config.yaml", "metrics.jsonl"} <= top
    assert [a.path for a in client.list_artifacts(result.run_id, "snapshot")] == ["snapshot/model.pt"]
    assert [a.path for a in client.list_artifacts(result.run_id, "previews")] == ["previews/iter_0000004.png"]

    name = cfg.tracking.register_model
    assert name == "hagan-clinic"
    versions = client.search_model_versions(f"name='{name}'")
    assert len(versions) == 1
    version = versions[0]
    assert version.run_id == result.run_id
    contract = cfg.data_contract()
    assert {k: version.tags[f"data.{k}"] for k in contract} == {k: str(v) for k, v in contract.items()}
    # the registered version serves the snapshot: its checkpoint artifact is that file
    from hagan_clinic.tracking.registry import resolve_checkpoint

    found = resolve_checkpoint(f"models:/{name}/{version.version}", os.environ["MLFLOW_TRACKING_URI"])
    registered = load_checkpoint(found.path)
    assert_same(registered.G.state_dict(), load_checkpoint(out / "model.pt").G.state_dict())

    # resuming continues the same MLflow run and registers a new version
    more = train(tiny("train.iterations=6"), out, volume_dir, resume="latest", tracker=tracker, progress=False)
    assert more.run_id == result.run_id
    assert [m.step for m in client.get_metric_history(result.run_id, "loss_D")] == [2, 4, 6]
    assert client.get_run(result.run_id).info.status == "FINISHED"
    assert sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'")) == [1, 2]


@pytest.mark.slow
def test_resume_logged_elsewhere_opens_a_complete_new_run(volume_dir, tmp_path, monkeypatch):
    from hagan_clinic.tracking import Tracker

    out = tmp_path / "run"
    first = train(tiny(), out, volume_dir, tracker=Tracker(), progress=False)
    # the run folder moves to a machine with another MLflow store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'other' / 'mlflow.db'}")
    second = train(tiny("train.iterations=6"), out, volume_dir, resume="latest", tracker=Tracker(), progress=False)
    assert second.run_id is not None and second.run_id != first.run_id
    run = mlflow_client().get_run(second.run_id)
    assert run.data.params["train.iterations"] == "6"
    assert run.data.tags["data.modality"] == "CT"
    assert [m.step for m in mlflow_client().get_metric_history(second.run_id, "loss_D")] == [6]


@pytest.mark.slow
def test_crashing_run_is_marked_failed(volume_dir, tmp_path, monkeypatch):
    from hagan_clinic.tracking import Tracker

    calls = []
    real_l1 = losses.l1

    def l1_then_crash(a, b):
        calls.append(1)
        if len(calls) > 3 * 3:  # three calls per iteration (E^H once, E^G twice): crash in iteration 4
            raise RuntimeError("injected failure")
        return real_l1(a, b)

    monkeypatch.setattr(losses, "l1", l1_then_crash)
    tracker = Tracker()
    with pytest.raises(RuntimeError, match="injected failure"):
        train(tiny("train.iterations=10"), tmp_path / "run", volume_dir, tracker=tracker, progress=False)
    client = mlflow_client()
    runs = client.search_runs([tracker.experiment_id])
    assert len(runs) == 1
    assert runs[0].info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss_D")] == [2]
    assert len(client.search_model_versions("name='hagan-clinic'")) == 0
    assert files(tmp_path / "run" / "checkpoints") == ["snapshot_0000002.pt", "state_0000002.pt"]


# ---- 5. precision -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("precision", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_autocast_runs_convolutions_in_the_chosen_dtype(precision, dtype):
    conv = torch.nn.Conv3d(2, 2, 3)
    x = torch.randn(1, 2, 6, 6, 6)
    with loop.autocast(torch.device("cpu"), precision):
        assert conv(x).dtype == dtype
    with loop.autocast(torch.device("cpu"), "fp32"):
        assert conv(x).dtype == torch.float32


@pytest.fixture(scope="module")
def fp32_reference(tmp_path_factory, make_volumes):
    """Losses of the first two iterations in fp32 (the baseline of the precision options)."""
    root = tmp_path_factory.mktemp("fp32")
    make_volumes(root / "volumes")
    cfg = tiny("train.iterations=2", "train.log_every=1")
    train(cfg, root / "run", root / "volumes", progress=False)
    return root / "volumes", metrics(root / "run")


# Tolerances from a measured spread: 20 seeds x 1 and 2 threads (fp16: 6 seeds x 2 threads) on an AVX-512 Xeon with
# AMX (native bf16 and fp16), plus one report from another x86-64 machine; each is at least 5x the worst seen.
# - first: iteration 1's loss_D, computed before any optimiser step, so only the arithmetic differs. Worst seen:
#   channels_last 1.7e-7 (a float32 rounding or two), bf16 8e-4, fp16 4.1e-5.
# - every other logged loss comes after at least one Adam step. With beta1 = 0 (the reference's) every step moves
#   each weight by about lr whatever the size of its gradient, so a weight whose gradient is within rounding noise of
#   zero moves one way or the other by chance: any difference in arithmetic (memory layout, thread count, CPU) can
#   grow to a fair part of one step's effect on the loss (5-10% here). Worst seen: channels_last 1.7e-3 here and
#   2.8e-4 on the other machine (median 3e-6), bf16 3.9e-2, fp16 7.1e-3; fp32 itself, 1 vs 2 threads: 3.3e-6.
@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "first", "rel"),
    [
        (("train.precision=bf16",), 1e-2, 0.2),
        (("train.precision=fp16",), 1e-3, 0.05),
        (("train.channels_last=true",), 1e-5, 1e-2),
    ],
    ids=["bf16", "fp16", "channels_last"],
)
def test_precision_options_train_close_to_fp32(fp32_reference, tmp_path, overrides, first, rel):
    data, reference = fp32_reference
    cfg = tiny("train.iterations=2", "train.log_every=1", *overrides)
    out = tmp_path / "run"
    result = train(cfg, out, data, progress=False)
    assert result.nonfinite_skipped == 0
    lines = metrics(out)
    assert lines[0]["loss_D"] == pytest.approx(reference[0]["loss_D"], rel=first)
    for line, ref in zip(lines, reference):
        for key in LOSSES:
            assert math.isfinite(line[key])
            assert line[key] == pytest.approx(ref[key], rel=rel), (key, line["iteration"])
    state = load_state(out / "checkpoints" / "state_0000002.pt")
    for part in PHASES:
        assert all(v.dtype == torch.float32 for k, v in state["models"][part].items() if v.is_floating_point())
        if cfg.train.precision == "fp16":  # a live grad scaler per phase
            assert state["scalers"][part]["scale"] > 0
        else:
            assert state["scalers"][part] == {}
    assert load_checkpoint(out / "model.pt").generate(torch.zeros(1, 32)).isfinite().all()


# ---- 6. non-finite losses -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_nonfinite_losses_are_skipped_and_counted(volume_dir, tmp_path, monkeypatch):
    recorded: list[float] = []
    real_l1 = losses.l1
    nan_iterations = {1, 3}  # 0-based

    def sometimes_nan(a, b):
        value = real_l1(a, b)
        iteration = len(recorded) // 3  # E^H calls l1 once per iteration, E^G twice
        recorded.append(float(value.detach()))
        return value * float("nan") if iteration in nan_iterations else value

    monkeypatch.setattr(losses, "l1", sometimes_nan)
    out = tmp_path / "run"
    cfg = tiny("train.log_every=4", "train.checkpoint_every=4", "train.max_nonfinite=2")
    result = train(cfg, out, volume_dir, progress=False)
    assert result.iteration == 4 and result.nonfinite_skipped == 2
    (line,) = metrics(out)
    assert line["nonfinite_skipped"] == 2
    # the logged E^H loss is the mean over the iterations where it was finite
    eh = [recorded[3 * i] for i in range(4) if i not in nan_iterations]
    eg = [(recorded[3 * i + 1] + recorded[3 * i + 2]) / 2 for i in range(4) if i not in nan_iterations]
    assert line["loss_EH"] == pytest.approx(sum(eh) / len(eh), rel=1e-6)
    assert line["loss_EG"] == pytest.approx(sum(eg) / len(eg), rel=1e-6)
    assert all(math.isfinite(line[k]) for k in LOSSES)
    state = load_state(out / "checkpoints" / "state_0000004.pt")
    assert state["nonfinite_total"] == 2
    # the skipped phases took no optimiser step; the others took all four
    for part, steps in {"D": 4, "G": 4, "EH": 2, "EG": 2}.items():
        assert {float(s["step"]) for s in state["optimizers"][part]["state"].values()} == {steps}, part


@pytest.mark.slow
def test_too_many_nonfinite_iterations_in_a_row_abort(volume_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(losses, "l1", lambda a, b: (a.float() - b.float()).abs().mean() * float("nan"))
    cfg = tiny("train.iterations=10", "train.max_nonfinite=3", "train.log_every=2")
    with pytest.raises(TrainingError) as info:
        train(cfg, tmp_path / "run", volume_dir, progress=False)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("3 iterations in a row had a non-finite loss (at iteration 3:")
    assert "loss_EH=nan" in message and "loss_EG=nan" in message and "loss_D=" in message
    (line,) = metrics(tmp_path / "run")  # logged at iteration 2, before the abort
    assert line["nonfinite_skipped"] == 2 and math.isfinite(line["loss_D"])
    assert "loss_EH" not in line  # no finite value to average in that window

    # through the command line: exit 2, one line
    args = ["train", "--config", "tiny", "--data", str(volume_dir), "--out", str(tmp_path / "cli"), "--no-tracking"]
    code, _, err = run_cli(capsys, *args, "--set", "train.max_nonfinite=2", "--set", "train.image_every=0")
    assert_one_line_error(code, err.splitlines()[-1] + "\n", "2 iterations in a row had a non-finite loss")


# ---- 7. options ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ema_generator_is_saved_and_selectable(volume_dir, tmp_path):
    out = tmp_path / "run"
    train(tiny("train.iterations=3", "train.ema=true", "train.ema_decay=0.5"), out, volume_dir, progress=False)
    payload = torch.load(out / "model.pt")
    assert "G_ema" in payload["state_dicts"]
    state = load_state(out / "checkpoints" / "state_0000003.pt")
    with_ema, raw = load_checkpoint(out / "model.pt"), load_checkpoint(out / "model.pt", ema=False)
    assert_same(with_ema.G.state_dict(), state["ema"])
    assert_same(raw.G.state_dict(), state["models"]["G"])
    assert any(not torch.equal(a, b) for a, b in zip(with_ema.G.parameters(), raw.G.parameters()))
    assert_same(with_ema.EH.state_dict(), raw.EH.state_dict())
    assert_same(with_ema.EG.state_dict(), raw.EG.state_dict())


@pytest.mark.slow
def test_separate_d_loss_with_r1_trains(volume_dir, tmp_path):
    out = tmp_path / "run"
    train(
        tiny("train.d_loss=separate", "train.r1_gamma=1.0", "train.d_low_weight=0.5"), out, volume_dir, progress=False
    )
    for line in metrics(out):
        assert all(math.isfinite(line[k]) for k in LOSSES)
        assert math.isfinite(line["loss_D_r1"]) and line["loss_D_r1"] > 0


def test_the_loop_makes_x_low_as_configured(volume_dir, tmp_path, monkeypatch):
    seen = []
    real = losses.low_res

    def spy(x, factor, how):
        seen.append((factor, how))
        return real(x, factor, how)

    monkeypatch.setattr(losses, "low_res", spy)
    train(tiny("train.iterations=1", "train.low_res=nearest"), tmp_path / "run", volume_dir, progress=False)
    assert seen == [(4, "nearest")]


# ---- 8. conditional training --------------------------------------------------------------------------------


@pytest.mark.slow
def test_conditional_training_from_a_label_table(volume_dir, tmp_path, capsys):
    table = tmp_path / "labels.csv"
    table.write_text("path,label\nvol_00.npy,0\nvol_01.npy,1\nvol_02.npy,-1\nvol_03.npy,\n")
    sets = ["model.num_classes=2", f"data.table={table}", "data.label_column=label"]
    out = tmp_path / "run"
    result = train(tiny(*sets), out, volume_dir, progress=False)
    line = metrics(out)[-1]
    assert math.isfinite(line["loss_D_class"]) and math.isfinite(line["loss_G_class"])
    model = load_checkpoint(result.snapshot)
    assert model.config.model.num_classes == 2
    assert model.generate(torch.zeros(2, 32), torch.tensor([0, 1])).isfinite().all()

    code, out_text, err = run_cli(
        capsys,
        "train",
        "--config",
        "tiny",
        "--data",
        str(volume_dir),
        "--dry-run",
        *[x for s in sets for x in ("--set", s)],
    )
    assert code == 0, err
    assert "# data: 2 volumes in" in out_text and "labels 0: 1, 1: 1" in out_text


def test_conditional_label_out_of_range_is_a_one_line_cli_error(volume_dir, tmp_path, capsys):
    table = tmp_path / "labels.csv"
    table.write_text("path,label\nvol_00.npy,0\nvol_01.npy,2\n")
    code, _, err = run_cli(
        capsys,
        "train",
        "--config",
        "tiny",
        "--data",
        str(volume_dir),
        "--no-tracking",
        *("--set", "model.num_classes=2", "--set", f"data.table={table}", "--set", "data.label_column=label"),
    )
    assert_one_line_error(code, err, "label 2 in 'label' is not a class in [0, 1]")
    assert not Path("runs").exists()


# ---- 9. data and config errors through the command line --------------------------------------------------------


@pytest.mark.parametrize("problem", ["missing", "wrong_shape", "empty", "bad_key", "no_data"])
def test_train_input_errors_are_one_line(volume_dir, tmp_path, capsys, problem):
    data, extra, needle = volume_dir, [], ""
    if problem == "missing":
        data, needle = tmp_path / "nope", "data folder not found"
    elif problem == "wrong_shape":
        np.save(volume_dir / "small.npy", np.zeros((16, 16, 16), np.float16))
        needle = "small.npy: shape (16, 16, 16), but the model needs 32^3 volumes"
    elif problem == "empty":
        data, needle = tmp_path / "empty", "no volumes"
        data.mkdir()
    elif problem == "bad_key":
        extra, needle = ["--set", "train.itertions=3"], "unknown key 'train.itertions'"
    data_args = [] if problem == "no_data" else ["--data", str(data)]
    if problem == "no_data":
        needle = "give --data DIR or data.dir"
    out = tmp_path / "run"
    code, stdout, err = run_cli(
        capsys, "train", "--config", "tiny", *data_args, "--out", str(out), "--no-tracking", *extra
    )
    assert_one_line_error(code, err, needle)
    assert stdout == ""
    assert not out.exists()


@pytest.mark.slow
def test_data_error_with_tracking_on_is_one_line_and_leaves_no_run(tmp_path, capfd):
    code = main(["train", "--config", "tiny", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "run")])
    out, err = capfd.readouterr()  # file descriptors: MLflow's own logging would show here too
    assert_one_line_error(code, err, "data folder not found")
    assert out == ""
    client = mlflow_client()
    experiments = client.search_experiments()
    assert experiments and all(not client.search_runs([e.experiment_id]) for e in experiments)


def test_dry_run_prints_config_and_data_summary(volume_dir, capsys):
    code, out, err = run_cli(
        capsys, "train", "--config", "tiny", "--data", str(volume_dir), "--dry-run", "--set", "train.batch_size=3"
    )
    assert code == 0, err
    config = yaml.safe_load(out)  # the '#' lines are YAML comments
    assert config["model"]["size"] == 32 and config["train"]["batch_size"] == 3
    assert f"# data: 4 volumes in {volume_dir}" in out
    assert "# run folder: runs/tiny" in out
    assert not Path("runs").exists() and not Path("mlruns").exists()


# ---- 10. two processes (gloo) ---------------------------------------------------------------------------------

DRIVER = '''
"""torchrun driver: the command line, plus each rank's final weights and the volumes it read (for the test)."""
import os, sys, torch
from hagan_clinic.cli import main
from hagan_clinic.data import VolumeFolder
from hagan_clinic.models.hagan import HAGAN

models, seen = [], []
_from_config = HAGAN.from_config.__func__

def from_config(cls, config):
    model = _from_config(cls, config)
    models.append(model)
    return model

HAGAN.from_config = classmethod(from_config)
_load = VolumeFolder.load
def load(self, index):
    seen.append(int(index))
    return _load(self, index)
VolumeFolder.load = load

code = main(sys.argv[1:])
rank = int(os.environ["RANK"])
out = sys.argv[sys.argv.index("--out") + 1]
torch.save({"params": {n: p.detach() for n, p in models[0].named_parameters()}, "seen": seen},
           os.path.join(out, f"rank{rank}.pt"))
sys.exit(code)
'''


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and its descendants (torchrun starts each worker in a session of its own)."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        with contextlib.suppress(OSError):
            todo += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


@pytest.mark.slow
def test_two_process_gloo_training(volume_dir, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    out = tmp_path / "run"
    iterations, batch = 4, 2
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(driver)]
    cmd += ["train", "--config", "tiny", "--data", str(volume_dir), "--out", str(out), "--no-tracking"]
    cmd += ["--set", f"train.iterations={iterations}", "--set", "train.checkpoint_every=2"]
    cmd += ["--set", "train.log_every=2", "--set", "train.image_every=0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        log = proc.communicate(timeout=120)[0][-3000:]
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        log = "(timed out after 120 s) " + proc.communicate()[0][-3000:]
    state_path = out / "checkpoints" / f"state_{iterations:07d}.pt"
    if not state_path.exists():  # not on the return code: two-process CPU gloo may abort at exit after finishing
        if not (out / "checkpoints").exists():
            pytest.skip(f"two-process training wrote no state in time:\n{log}")
        pytest.fail(f"no final state:\n{log}")

    # rank 0 alone wrote the run folder
    assert files(out / "checkpoints") == [
        "snapshot_0000002.pt",
        "snapshot_0000004.pt",
        "state_0000002.pt",
        "state_0000004.pt",
    ]
    assert [m["iteration"] for m in metrics(out)] == [2, 4]
    assert (out / "model.pt").exists()

    state = load_state(state_path)
    assert len(state["rng"]) == 2 and len(state["sampler"]) == 2
    assert not torch.equal(state["rng"][0]["loop"], state["rng"][1]["loop"])  # seeded per rank
    assert not torch.equal(state["rng"][0]["global"]["torch"], state["rng"][1]["global"]["torch"])
    for rank, s in enumerate(state["sampler"]):
        assert s["world"] == 2 and s["n"] == 4
        # 2 items per rank and epoch, 2 per iteration: every iteration ends an epoch
        assert (s["epoch"], s["position"]) == (iterations - 1, 2), rank

    # both ranks hold identical weights, equal to the saved ones (averaged gradients, same initial weights)
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(2)] if (out / "rank1.pt").exists() else None
    if ranks is None:
        pytest.skip(f"the ranks finished training but did not report their weights:\n{log}")
    assert_same(ranks[0]["params"], ranks[1]["params"], "rank0 vs rank1")
    saved = {f"{part}.{k}": v for part in PHASES for k, v in state["models"][part].items()}
    for name, value in ranks[0]["params"].items():
        assert torch.equal(value, saved[name]), name

    # the ranks read disjoint shards that together cover each epoch
    seen0, seen1 = ranks[0]["seen"], ranks[1]["seen"]
    assert len(seen0) == len(seen1) == iterations * batch
    for it in range(iterations):
        a, b = set(seen0[it * batch : (it + 1) * batch]), set(seen1[it * batch : (it + 1) * batch])
        assert a.isdisjoint(b) and a | b == {0, 1, 2, 3}


def test_train_result_summary_is_what_the_command_prints(tmp_path):
    from hagan_clinic.training.loop import TrainResult

    snap = tmp_path / "model.pt"
    assert TrainResult(tmp_path, 4, snap).summary() == f"trained to iteration 4: {snap}"
    skipped = TrainResult(tmp_path, 4, snap, nonfinite_skipped=2).summary()
    assert skipped.endswith("(2 non-finite iterations skipped)")
    assert TrainResult(tmp_path, 4, None).summary() == ""  # a rank that writes no model says nothing


# ---- 9. metrics.jsonl of an older version, and what --verbose shows ------------------------------------------


def test_metrics_file_drops_a_cut_last_line_only(tmp_path, train_log):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"iteration": i, "loss_D": 0.5}) for i in (2, 4, 6)]
    path.write_text("\n".join(lines) + "\n" + '{"iteration": 8, "loss_D": 0.4')  # killed while appending
    metrics_file = MetricsLog(path, 4)
    assert path.read_text() == "".join(line + "\n" for line in lines[:2])  # past 4 and the cut line: gone
    assert [r.levelno for r in train_log] == [logging.WARNING] and "incomplete" in train_log[0].getMessage()
    metrics_file.append({"iteration": 6, "loss_D": 0.3})
    assert [json.loads(line)["iteration"] for line in path.read_text().splitlines()] == [2, 4, 6]
    for damaged in ('{"iteration": 4, "loss_D"', "[4]", '{"iteration": "4"}', "\x00\xff"):
        path.write_text("\n".join([lines[0], damaged, lines[2]]) + "\n")
        with pytest.raises(TrainingError, match=f"{path}: line 2 is not a metrics record") as err:
            MetricsLog(path, 6)
        assert "\n" not in str(err.value)
        assert path.read_text().splitlines()[1] == damaged  # a refused file is left as it was


@pytest.mark.slow
def test_resume_after_a_cut_metrics_line_and_verbose_log_steps(volume_dir, tmp_path, capsys, train_log):
    """A run killed mid-line by a version that appended resumes; -v shows every value of each log step; a damaged
    line before the last is a one-line error."""
    base = ["train", "--config", "tiny", "--data", str(volume_dir), "--no-tracking", "--out", str(tmp_path / "run")]
    short = ["--set", "train.log_every=1", "--set", "train.image_every=0", "--set", "train.checkpoint_every=2"]
    code, _, err = run_cli(capsys, *base, *short, "--set", "train.iterations=2")
    assert code == 0, err
    path = tmp_path / "run" / "metrics.jsonl"
    with path.open("a") as f:
        f.write('{"iteration": 3, "loss_D": 0.6')
    code, out, err = run_cli(capsys, *base, *short, "--set", "train.iterations=3", "--resume", "-v")
    assert code == 0 and "trained to iteration 3" in out, err
    assert any("its last line is incomplete" in r.getMessage() for r in train_log if r.levelno == logging.WARNING)
    assert [m["iteration"] for m in metrics(tmp_path / "run")] == [1, 2, 3]
    debug = [r.getMessage() for r in train_log if r.levelno == logging.DEBUG]
    assert any(line.startswith("resuming ") and "at iteration 2" in line for line in debug), debug
    (step,) = [line for line in debug if line.startswith("iteration 3: ") and "loss_D=" in line]
    assert all(f"{k}=" in step for k in (*LOSSES, "it_per_s", "peak_memory_mb", "nonfinite_skipped"))
    assert any(line.startswith("iteration 3: state and snapshot written") for line in debug)
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], lines[1][:20], lines[2]]) + "\n")
    code, _, err = run_cli(capsys, *base, *short, "--set", "train.iterations=4", "--resume")
    assert_one_line_error(code, err, "line 2 is not a metrics record")
