"""benchmarks/loss_curve.py: the within-noise rule on synthetic curves, and the quick run end to end (the structure and
consistency of what it writes; never a timing value, never the verdict's outcome on real training)."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import benchmark_module

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "loss_curve.py"
LOSSES = ("loss_D", "loss_G", "loss_EH", "loss_EG")


@pytest.fixture(scope="module")
def lc():
    return benchmark_module("loss_curve")


def noisy(level: float, seed: int, n: int = 40) -> list[float]:
    """A decaying curve towards ``level`` with a deterministic wiggle (no RNG: the same on every machine)."""
    return [level + 0.5 * math.exp(-i / 8) + 0.05 * math.sin(1.7 * i + seed) for i in range(n)]


# ---- smoothing and the figure ------------------------------------------------------------------------------------
def test_smooth_is_a_trailing_moving_average(lc):
    assert lc.smooth([1.0, 2.0, 3.0, 4.0], window=2) == [1.0, 1.5, 2.5, 3.5]
    assert lc.smooth([1.0, 2.0, 3.0, 4.0], window=10) == [1.0, 1.5, 2.0, 2.5]  # the start averages what there is
    assert lc.smooth([], window=3) == []
    nan = lc.smooth([1.0, math.nan, 3.0, 4.0, 5.0], window=2)
    assert math.isnan(nan[1]) and math.isnan(nan[2]) and nan[3:] == [3.5, 4.5]


def test_figure_is_the_mean_of_the_last_quarter_of_the_smoothed_curve(lc):
    assert lc.figure([2.0] * 40) == pytest.approx(2.0)
    # window 1 (no smoothing): the last ceil(10 / 4) = 3 values
    assert lc.figure([0.0] * 7 + [3.0, 6.0, 9.0], window=1) == pytest.approx(6.0)
    assert lc.figure([0.0] * 8 + [3.0, 6.0, 9.0], window=1) == pytest.approx(6.0)  # ceil(11 / 4) = 3
    assert lc.figure([5.0], window=20) == 5.0
    assert math.isnan(lc.figure([]))


# ---- the verdict ------------------------------------------------------------------------------------------------
def shaped(level: float, n: int = 40) -> list[float]:
    """A decaying curve that settles on ``level``: every run's figure is ``level`` plus one common offset, so the
    differences between figures are the differences between levels (to rounding)."""
    return [level + 0.5 * math.exp(-i / 8) for i in range(n)]


def runs_at(*levels: float) -> dict[int, list[float]]:
    """{seed: curve} with seed k at ``levels[k]``."""
    return {k: shaped(level) for k, level in enumerate(levels)}


def old_band(v: dict) -> list[float]:
    """The range rule this verdict replaced: the fp32 figures' [min - spread, max + spread], spread = max - min."""
    figures = list(v["baseline_figures"].values())
    lo, hi = min(figures), max(figures)
    return [lo - (hi - lo), hi + (hi - lo)]


def test_pooled_sd_pools_each_group_about_its_own_mean(lc):
    assert lc.pooled_sd([[1.0, 2.0, 3.0], [11.0, 12.0, 13.0]]) == pytest.approx(1.0)  # the means' gap is no noise
    assert lc.pooled_sd([[0.0, 2.0], [5.0, 5.0]]) == pytest.approx(math.sqrt(2 / 2))  # squares 2 + 0 over 4 - 2
    assert math.isnan(lc.pooled_sd([[1.0], [2.0]]))  # no degree of freedom
    assert math.isnan(lc.pooled_sd([]))


def test_identical_curves_are_within_noise(lc):
    fp32 = {s: noisy(1.0 + 0.1 * s, s) for s in (0, 1, 2)}
    v = lc.verdict(fp32, {s: list(c) for s, c in fp32.items()})
    assert v["within_noise"] is True and v["mean_within"] is True and v["paired_within"] is True
    assert v["finite"] is True and v["difference"] == 0.0
    assert v["paired_differences"] == {"0": 0.0, "1": 0.0, "2": 0.0}
    assert v["baseline_figures"] == v["candidate_figures"]
    assert v["n_baseline"] == v["n_candidate"] == 3
    figures = list(v["baseline_figures"].values())
    sd = statistics.stdev(figures)  # both groups alike: the pooled SD is each one's
    assert v["pooled_sd"] == pytest.approx(sd) and sd > 0
    assert v["bound"] == pytest.approx(2 * sd * math.sqrt(2 / 3))
    assert len(v["seed_to_seed_differences"]) == 3  # pairs (0,1), (0,2), (1,2)
    assert v["seed_to_seed_max_abs"] == pytest.approx(max(figures) - min(figures))


def test_a_bias_of_three_pooled_sds_is_not_within_noise(lc):
    # fp32 seeds 0.1 apart; bf16 seeds half as spread, all 3 pooled SDs higher: far beyond the 2 s sqrt(2/3) bound,
    # yet inside the range rule's band (which let it pass)
    s = math.sqrt((0.1**2 + 0.05**2) / 2)
    fp32 = runs_at(0.9, 1.0, 1.1)
    bf16 = runs_at(*(1.0 + 3 * s + x for x in (-0.05, 0.0, 0.05)))
    v = lc.verdict(fp32, bf16)
    assert v["pooled_sd"] == pytest.approx(s)
    assert v["difference"] == pytest.approx(3 * s)
    assert v["bound"] == pytest.approx(2 * s * math.sqrt(2 / 3))
    assert v["mean_within"] is False and v["within_noise"] is False and v["finite"] is True
    lo, hi = old_band(v)
    assert lo < v["candidate_mean"] < hi - 0.05  # the old rule passed it with room to spare


def test_a_paired_difference_beyond_the_seed_to_seed_spread_is_not_within_noise(lc):
    # the seeds' order reversed and stretched: the means agree, but seed 0 and seed 2 each moved by 0.25 while
    # no two fp32 seeds are more than 0.2 apart
    fp32 = runs_at(1.0, 1.1, 1.2)
    bf16 = runs_at(1.225, 1.1, 0.975)
    v = lc.verdict(fp32, bf16)
    assert v["difference"] == pytest.approx(0.0, abs=1e-12) and v["mean_within"] is True
    assert v["paired_max_abs"] == pytest.approx(0.225) and v["seed_to_seed_max_abs"] == pytest.approx(0.2)
    assert v["paired_within"] is False and v["within_noise"] is False
    lo, hi = old_band(v)
    assert lo <= v["candidate_mean"] <= hi  # the range rule did not look at pairs


def test_a_shift_beyond_the_seed_spread_fails_both_tests(lc):
    fp32 = {s: noisy(1.0 + 0.1 * s, s) for s in (0, 1, 2)}
    spread = lc.verdict(fp32, fp32)["seed_to_seed_max_abs"]
    shifted = {s: [x + 10 * spread for x in c] for s, c in fp32.items()}
    v = lc.verdict(fp32, shifted)
    assert v["within_noise"] is False and v["mean_within"] is False and v["paired_within"] is False
    assert v["finite"] is True and v["difference"] == pytest.approx(10 * spread)
    for d in v["paired_differences"].values():
        assert d == pytest.approx(10 * spread)


def test_a_non_finite_value_fails_the_verdict_and_one_seed_leaves_it_open(lc):
    fp32 = {s: noisy(1.0, s) for s in (0, 1)}
    broken = {s: list(c) for s, c in fp32.items()}
    broken[1][3] = math.nan
    v = lc.verdict(fp32, broken)
    assert v["finite"] is False and v["within_noise"] is False
    assert v["mean_within"] is False and v["paired_within"] is False
    assert lc.verdict({0: fp32[0]}, {0: broken[1]})["within_noise"] is False  # a NaN decides even with one seed
    assert lc.verdict(fp32, {})["within_noise"] is False  # a loss the candidate never logged
    one = lc.verdict({0: noisy(1.0, 0)}, {0: noisy(1.0, 0)})
    assert one["within_noise"] is None and one["mean_within"] is None and one["paired_within"] is None
    assert math.isnan(one["pooled_sd"])
    # two fp32 seeds are not enough when the candidate has one: no spread of its own to pool
    assert lc.verdict(fp32, {0: fp32[0]})["within_noise"] is None
    # two seeds each but none run in both: nothing to pair
    assert lc.verdict(fp32, {5: fp32[0], 6: fp32[1]})["within_noise"] is None


# ---- the JSON after every run (the training replaced by synthetic runs) ------------------------------------------
def fake_runs(lc, monkeypatch, stop_after: int | None = None) -> list[tuple[str, int]]:
    """Make ``main`` train nothing: each run returns synthetic curves at once; with ``stop_after``, the run after
    that many raises (a run killed midway). Returns the (precision, seed) of each run started."""
    started: list[tuple[str, int]] = []

    def train_run(cache, out, precision, seed, iterations):
        started.append((precision, seed))
        if stop_after is not None and len(started) > stop_after:
            raise KeyboardInterrupt
        curves = {k: shaped(1.0 + 0.1 * seed + 0.01 * (precision == "bf16"), iterations) for k in LOSSES}
        return {"wall_s": 0.0, "nonfinite_skipped": 0, "error": None, "curves": curves}

    monkeypatch.setattr(lc, "record", lambda *a, **k: {"matmul_gflops": {"fp32": 1.0, "bf16": 1.0}})
    monkeypatch.setattr(lc, "prepare_cache", lambda work: work)
    monkeypatch.setattr(lc, "train_run", train_run)
    monkeypatch.setattr(lc, "plot", lambda runs, losses, path: None)
    return started


def test_a_killed_run_keeps_the_runs_it_finished(lc, monkeypatch, tmp_path):
    started = fake_runs(lc, monkeypatch, stop_after=3)  # fp32 0, bf16 0, fp32 1 done; bf16 1 killed
    with pytest.raises(KeyboardInterrupt):
        lc.main(["--iterations", "8", "--seeds", "0", "1", "2", "--out-dir", str(tmp_path)])
    assert started[-1] == ("bf16", 1)
    doc = json.loads((tmp_path / "loss_curve.json").read_text())
    assert doc["complete"] is False and doc["benchmark"] == "loss_curve"
    assert doc["argv"][1:] == ["--iterations", "8", "--seeds", "0", "1", "2", "--out-dir", str(tmp_path)]
    assert {p: sorted(by) for p, by in doc["runs"].items()} == {"fp32": ["0", "1"], "bf16": ["0"]}
    assert doc["seeds_compared"] == [0]  # seed 1 has no bf16 run yet
    assert set(doc["verdicts"]["bf16"]) == set(LOSSES)
    assert all(v["within_noise"] is None for v in doc["verdicts"]["bf16"].values())  # one seed: undetermined


def test_a_finished_run_is_complete_and_compares_every_seed(lc, monkeypatch, tmp_path, capsys):
    started = fake_runs(lc, monkeypatch)
    assert lc.main(["--iterations", "8", "--seeds", "0", "1", "2", "--out-dir", str(tmp_path)]) == 0
    assert len(started) == 6
    doc = json.loads((tmp_path / "loss_curve.json").read_text())
    assert doc["complete"] is True and doc["seeds_compared"] == [0, 1, 2] and doc["all_finite"] is True
    for v in doc["verdicts"]["bf16"].values():
        assert v["difference"] == pytest.approx(0.01) and v["n_baseline"] == v["n_candidate"] == 3
        assert v["within_noise"] is True  # a shift of 0.01 against seeds 0.1 apart
    assert "loss_D bf16: d +0.0100" in capsys.readouterr().out


# ---- the quick run end to end -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_quick_run_writes_curves_verdicts_and_a_plot(lc, tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--out-dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((tmp_path / "loss_curve_quick.json").read_text())
    assert (tmp_path / "loss_curve_quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    for key in ("benchmark", "created", "argv", "machine"):
        assert key in doc
    assert doc["benchmark"] == "loss_curve" and "--quick" in doc["argv"]
    assert set(doc["machine"]["matmul_gflops"]) == {"fp32", "bf16"} and "load" in doc["machine"]
    assert doc["config"] == "tiny" and doc["iterations"] == 20 and doc["seeds"] == [0, 1]
    assert doc["precisions"] == ["fp32", "bf16"] and doc["baseline"] == "fp32"
    assert set(doc["rule"]) == {"smoothing", "figure", "mean_within", "paired", "within_noise"}
    assert doc["complete"] is True and doc["seeds_compared"] == [0, 1]

    # every run, every loss: one finite value per iteration
    assert doc["losses"] == list(LOSSES)
    assert set(doc["runs"]) == {"fp32", "bf16"}
    for by_seed in doc["runs"].values():
        assert set(by_seed) == {"0", "1"}
        for run in by_seed.values():
            assert set(run["curves"]) == set(LOSSES) and run["nonfinite_skipped"] == 0 and run["error"] is None
            for curve in run["curves"].values():
                assert len(curve) == 20 and all(isinstance(x, float) and math.isfinite(x) for x in curve)
    assert doc["all_finite"] is True

    # a verdict per loss, recomputable from the curves in the file
    assert set(doc["verdicts"]) == {"bf16"} and set(doc["verdicts"]["bf16"]) == set(LOSSES)
    for loss, v in doc["verdicts"]["bf16"].items():
        assert isinstance(v["within_noise"], bool) and isinstance(v["paired_within"], bool)
        assert v["within_noise"] == (v["mean_within"] and v["paired_within"])
        assert v["mean_within"] == (abs(v["difference"]) <= v["bound"])
        assert v["bound"] == pytest.approx(2 * v["pooled_sd"] * math.sqrt(2 / 2))
        assert doc["within_noise"]["bf16"][loss] == v["within_noise"]
        again = lc.verdict(
            {int(s): r["curves"][loss] for s, r in doc["runs"]["fp32"].items()},
            {int(s): r["curves"][loss] for s, r in doc["runs"]["bf16"].items()},
        )
        assert again == v  # JSON keeps floats exactly
        assert f"{loss} bf16:" in proc.stdout
    assert "all losses finite: yes" in proc.stdout
