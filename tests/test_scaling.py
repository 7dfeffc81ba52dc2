"""benchmarks/scaling.py: the slope analysis and the budget on synthetic points, and tiny sweeps end to end (the
structure and consistency of what they write; never timing values)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import benchmark_module

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "scaling.py"


@pytest.fixture(scope="module")
def scaling():
    return benchmark_module("scaling")


def point(task="generate", size=64, batch=1, s=1.0, gflop=1.0, peak_mb=100.0, status="ok", **kw) -> dict:
    return {"task": task, "size": size, "batch": batch, "s": s, "gflop": gflop, "peak_mb": peak_mb, "status": status,
            "base_mb": 500.0, **kw}  # fmt: skip


def run_sweep(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict, str]:
    cmd = [sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--out-dir", str(tmp_path), *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "scaling_quick.json").read_text())
    md = (tmp_path / "scaling_quick.md").read_text()
    assert (tmp_path / "scaling_quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return proc, data, md


# ---- slopes ------------------------------------------------------------------------------------------------------
def test_loglog_slope_is_the_power_law_exponent(scaling):
    xs = [1.0, 2.0, 4.0, 8.0]
    assert scaling.loglog_slope(xs, [3 * x for x in xs]) == pytest.approx(1.0, abs=1e-12)
    assert scaling.loglog_slope(xs, [0.5 * x**3 for x in xs]) == pytest.approx(3.0, abs=1e-12)
    # non-positive readings (a zero memory rise) carry no slope; one distinct x has none
    assert scaling.loglog_slope([1.0, 2.0, 4.0], [0.0, 2.0, 4.0]) == pytest.approx(1.0)
    assert scaling.loglog_slope([2.0, 2.0], [1.0, 3.0]) is None
    assert scaling.loglog_slope([2.0], [1.0]) is None


def test_analyse_flags_the_size_where_time_outgrows_the_flops(scaling):
    points = [
        point(size=32, gflop=1, s=1, peak_mb=10),
        point(size=64, gflop=8, s=8, peak_mb=80),  # slope 1 against 32: in step with the work
        point(size=128, gflop=64, s=128, peak_mb=640),  # slope 4/3 against 64: superlinear
        point(size=256, gflop=None, s=None, peak_mb=None, status="skipped", reason="predicted 900 s > budget 120 s"),
        point(size=512, status="failed", reason="exit -9: Killed", gflop=1e6, s=1e-3),  # must not enter any fit
    ]
    a = scaling.analyse(points)
    (row,) = a["by_batch"]
    assert row["sizes"] == [32, 64, 128]
    assert [loc["superlinear"] for loc in row["local"]] == [False, True]
    assert row["local"][0]["time_vs_gflop"] == pytest.approx(1.0)
    assert row["local"][1]["time_vs_gflop"] == pytest.approx(4 / 3)
    assert row["peak_vs_voxels"] == pytest.approx(1.0)
    assert a["superlinear"] == [
        {"task": "generate", "size": 128, "batch": 1, "from_size": 64, "slope": pytest.approx(4 / 3)}
    ]
    md = scaling.markdown(points, a, {"cpu": "X", "threads": 2, "matmul_gflops": {"fp32": 80.0}})
    rows = [line for line in md.splitlines() if line.startswith("| generate | ") and "^3" in line]
    assert len(rows) == len(points)  # every point, skipped and failed included, has its row
    assert "superlinear" in rows[2] and "superlinear" not in rows[1]
    assert "skipped: predicted 900 s > budget 120 s" in rows[3] and "failed: exit -9" in rows[4]
    # the memory column is the rise above the post-build mark, and the notes say what the FLOP count includes
    assert "| peak rise MB |" in md.splitlines()[0] and "above the high-water mark just after" in md
    assert "(d+1)^3 outputs per phase of which d^3 are kept" in md


def test_analyse_time_against_batch(scaling):
    points = [point(task="encode", size=64, batch=b, s=0.5 * b, gflop=2.0 * b) for b in (1, 2, 4)]
    (row,) = scaling.analyse(points)["by_size"]
    assert row["batches"] == [1, 2, 4]
    assert row["time_vs_batch"] == pytest.approx(1.0) and row["gflop_vs_batch"] == pytest.approx(1.0)
    assert row["s_per_volume"] == pytest.approx([0.5, 0.5, 0.5])


# ---- budget ------------------------------------------------------------------------------------------------------
def test_a_point_predicted_over_the_budget_is_skipped(scaling):
    done = [point(task="train", size=64, s=10.0, gflop=100.0, peak_mb=1000.0)]
    big = {"task": "train", "size": 128, "batch": 1, "gflop_planned": 1000.0}
    assert scaling.predict([], big) is None  # the first point of a task always runs
    assert scaling.over_budget(None, 1.0, 1.0) is None
    pred = scaling.predict(done, big)
    assert pred["s"] == pytest.approx(100.0)  # time scales with the FLOPs
    assert pred["mem_gb"] == pytest.approx((500 + 1000 * 8) / 1024)  # the rise with the voxels, over the base
    assert pred["from"] == [64, 1]
    assert scaling.over_budget(pred, 120.0, 18.0) is None
    assert scaling.over_budget(pred, 60.0, 18.0) == "predicted 100 s > budget 60 s"
    assert scaling.over_budget(pred, 120.0, 4.0) == "predicted 8.3 GB > limit 4 GB"
    # another task's points, and this task's larger ones, do not inform the prediction
    assert scaling.predict([point(task="encode", size=32)], big) is None
    assert scaling.predict([point(task="train", size=256)], big) is None
    # a trend steeper than the FLOPs (time ~ FLOPs^1.5) is carried on
    done.insert(0, point(task="train", size=32, s=10.0 / 8**1.5, gflop=100.0 / 8, peak_mb=125.0))
    assert scaling.predict(done, big)["s"] == pytest.approx(10.0 * 10**1.5)


def test_the_memory_slope_comes_only_from_rises_above_the_noise_floor(scaling):
    """Two small rises (allocator noise) say nothing of the trend: the memory is scaled by the work, to the power 1;
    rises above the floor carry their slope on (clamped to 2)."""
    big = {"task": "encode", "size": 128, "batch": 1, "gflop_planned": 64.0}
    noisy = [point(task="encode", size=32, peak_mb=5.0), point(task="encode", size=64, gflop=8.0, peak_mb=150.0)]
    assert scaling.predict(noisy, big)["mem_gb"] == pytest.approx((500 + 150 * 8) / 1024)
    steep = [point(task="encode", size=32, peak_mb=300.0), point(task="encode", size=64, peak_mb=300.0 * 8**1.5)]
    assert scaling.predict(steep, big)["mem_gb"] == pytest.approx((500 + 300 * 8**3) / 1024)


def test_the_precision_each_task_measures_is_named(scaling):
    assert "precision='bf16'" in scaling.precision_path("encode", "bf16", True)
    assert "autocast(bf16) around the fp32 model" in scaling.precision_path("encode", "bf16", False)
    assert "autocast(bf16) around the fp32 model" in scaling.precision_path("generate", "bf16", True)
    assert "train.precision=bf16" in scaling.precision_path("train", "bf16", True)


def test_sweep_skips_a_point_over_budget(tmp_path):
    """The first point of a task runs; the next, predicted over a tiny budget, is recorded as skipped, not run."""
    _, data, md = run_sweep(tmp_path, "--tasks", "encode", "--batches", "1", "--budget-s", "1e-9")
    first, second = data["points"]
    assert (first["size"], first["status"]) == (32, "ok") and first["gflop"] > 0
    assert (second["size"], second["status"]) == (64, "skipped")
    assert second["reason"].startswith("predicted ") and "> budget" in second["reason"]
    assert second["prediction"]["s"] > 0 and "s" not in second
    assert "| encode | 64^3 | 1 |" in md and "skipped: predicted" in md
    assert data["settings"]["force"] is False


def test_force_runs_the_points_predicted_over_budget(tmp_path):
    """--force runs what the prediction would skip (the prediction is still recorded); bf16 encode runs the model's
    own bf16 encoders, and the JSON and the table say so."""
    args = ("--tasks", "encode", "--batches", "1", "--budget-s", "1e-9", "--force", "--precision", "bf16")
    _, data, md = run_sweep(tmp_path, *args)
    assert [(p["size"], p["status"]) for p in data["points"]] == [(32, "ok"), (64, "ok")]
    assert data["points"][1]["prediction"]["s"] > 1e-9 and data["settings"]["force"] is True
    path = data["settings"]["precision_paths"]["encode"]
    assert "HAGAN.encode(x, precision='bf16')" in path and f"- encode at bf16: {path}." in md


# ---- the quick sweep ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_quick_sweep_measures_every_point(tmp_path, scaling):
    _, data, md = run_sweep(tmp_path)
    required = benchmark_module("machine").REQUIRED
    assert all(k in data for k in (*required, "settings", "points", "analysis"))
    assert data["machine"]["matmul_gflops"]["fp32"] > 0
    pts = {(p["task"], p["size"], p["batch"]): p for p in data["points"]}
    assert sorted(pts) == sorted((t, s, b) for t in ("train", "generate", "encode") for s in (32, 64) for b in (1, 2))
    for (task, size, batch), p in pts.items():
        assert p["status"] == "ok", p
        assert p["gflop"] > 0 and p["s"] > 0 and p["matmul_gflops"] > 0
        assert p["gflop"] == pytest.approx(p["gflop_planned"], rel=0.05)  # the planner's meta count is the real one
        assert f"| {task} | {size}^3 | {batch} |" in md
        if size == 64:
            assert p["gflop"] > pts[task, 32, batch]["gflop"]
        if batch == 2:
            assert p["gflop"] > pts[task, size, 1]["gflop"]
    for size in (32, 64):  # a train step's FLOPs are per volume: twice the batch, twice the work
        assert pts["train", size, 2]["gflop"] / pts["train", size, 1]["gflop"] == pytest.approx(2.0, rel=0.1)
    assert len(data["analysis"]["by_batch"]) == 6 and len(data["analysis"]["by_size"]) == 6
