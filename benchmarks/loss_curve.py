"""Does bf16 training follow fp32's loss curve? The tiny config trained in each precision and seed, compared.

    python benchmarks/loss_curve.py                    # 200 iterations, seeds 0 1 2, fp32 and bf16
    python benchmarks/loss_curve.py --quick            # 20 iterations, seeds 0 1 -> loss_curve_quick.json
    python benchmarks/loss_curve.py --threads 1        # on a busy shared host (OpenMP threads spin-wait there)
    python benchmarks/loss_curve.py --iterations 400 --seeds 0 1 2 3 --precisions fp32 bf16 fp16 --out-dir DIR

Each run is the project's own training path: a phantom cohort (8 patients) is written and preprocessed once into a
cache with the ``tiny`` config, then ``hagan_clinic.training.loop.train`` trains on that cache with
``train.precision=P``, ``seed=K``, a log step per iteration (``train.log_every=1``) and tracking off. Every
``loss_*`` value of its ``metrics.jsonl`` is kept per iteration (an iteration whose value was not finite is NaN
there).

The noise is what changing only the seed does to the curves; the seed fixes the initial weights, the data order
and every latent draw, so bf16 seed k against fp32 seed k isolates precision. The rule (:func:`verdict`), per loss:

1. smooth each run's curve with a trailing moving average of ``WINDOW`` (20) iterations (the first points average
   what there is so far);
2. the run's figure f is the mean of the smoothed curve over the last quarter of the iterations (``ceil(n / 4)``);
3. d = mean of the candidate's (bf16's) figures - mean of fp32's figures; s = the pooled standard deviation of the
   figures across seeds (each precision's deviations from its own mean, ddof 1 per precision, both pooled);
4. the mean test: |d| <= 2 s sqrt(1/n_fp32 + 1/n_bf16), i.e. 2 s sqrt(2/n) with n seeds in each: a two-sample
   t-like bound at about 95 % (2 is the normal quantile; a t quantile for so few seeds would be wider, so this
   bound is the stricter one). A range-based band would let a bias of about 3 seed SDs through with 3 seeds;
5. the paired test (``paired_within``): every paired difference f(bf16 seed k) - f(fp32 seed k), over the seeds run
   in both, is at most (in absolute value) the largest fp32 seed-to-seed difference |f(seed i) - f(seed j)|;
6. **within noise** when both tests pass; False when any value of the loss in either precision was not finite (or
   the loss is missing from a run); None (undetermined) with fewer than two seeds in either precision or no seed
   run in both.

Writes ``loss_curve.json`` (``loss_curve_quick.json`` with ``--quick``) under the header of
``machine.write_result`` after every run, so a run killed midway keeps the runs it finished: ``"complete": false``
until the last run, the verdicts over the seeds finished in every precision so far (``seeds_compared``). At the end,
``loss_curve.png`` beside it: a panel per loss, each run's smoothed curve, a colour per precision.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from machine import RESULTS, record, write_result  # benchmarks/ is on sys.path when a script here runs

CONFIG = "tiny"
BASELINE = "fp32"
WINDOW = 20  # iterations in the moving average
LOSS_ORDER = ("loss_D", "loss_G", "loss_EH", "loss_EG")  # the phases' order; other losses follow by name
TAIL = 0.25  # the share of the last iterations whose smoothed mean is a run's figure
COHORT_N, COHORT_SEED = 8, 0  # phantom patients and the cohort seed
COHORT_SHAPE = (48, 64, 64)  # (slices, rows, cols): seconds to write; preprocessing brings it to 32^3 at 12 mm
Z = 2.0  # the bound's multiple of the standard error of d: about a two-sided 95 % level
RULE = {
    "smoothing": f"trailing moving average over {WINDOW} iterations (fewer at the start)",
    "figure": "f: mean of the smoothed curve over the last ceil(n/4) of n iterations, per run",
    "mean_within": "|d| <= bound; d = mean(candidate figures) - mean(fp32 figures); s = pooled standard deviation of "
    "the figures across seeds (each precision about its own mean, ddof 1 per precision); "
    f"bound = {Z:g} * s * sqrt(1/n_fp32 + 1/n_candidate) (= {Z:g} s sqrt(2/n) with n seeds in each)",
    "paired": "candidate seed k - fp32 seed k for seeds run in both, against |fp32 seed i - fp32 seed j| for i < j; "
    "paired_within: max |paired| <= max |seed-to-seed|",
    "within_noise": "mean_within and paired_within; false if any value of the loss is not finite (or the loss is "
    "missing from a run); null with fewer than two seeds in either precision or no seed run in both",
}


# ---- the verdict (pure) ------------------------------------------------------------------------------------------
def smooth(curve: Sequence[float], window: int = WINDOW) -> list[float]:
    """Trailing moving average: point i is the mean of ``curve[max(0, i - window + 1) : i + 1]``; same length.
    A NaN anywhere in a window makes that point NaN."""
    values = [float(v) for v in curve]
    return [statistics.fmean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


def figure(curve: Sequence[float], window: int = WINDOW, tail: float = TAIL) -> float:
    """The run's figure: the mean of the smoothed curve over its last ``ceil(n * tail)`` iterations (NaN if empty)."""
    if not curve:
        return math.nan
    smoothed = smooth(curve, window)
    k = max(1, math.ceil(len(smoothed) * tail))
    return statistics.fmean(smoothed[-k:])


def _finite(curves: Mapping[int, Sequence[float]]) -> bool:
    return all(c and all(math.isfinite(float(v)) for v in c) for c in curves.values())


def pooled_sd(groups: Sequence[Sequence[float]]) -> float:
    """The pooled standard deviation: each group's squared deviations from its own mean, summed over the groups,
    over (total count - number of groups) degrees of freedom (ddof 1 per group). NaN without a degree of freedom."""
    groups = [list(g) for g in groups if g]
    dof = sum(len(g) for g in groups) - len(groups)
    if dof < 1:
        return math.nan
    squares = sum((x - statistics.fmean(g)) ** 2 for g in groups for x in g)
    return math.sqrt(squares / dof)


def verdict(
    baseline: Mapping[int, Sequence[float]],
    candidate: Mapping[int, Sequence[float]],
    window: int = WINDOW,
    tail: float = TAIL,
) -> dict[str, Any]:
    """Whether ``candidate``'s curves of one loss ({seed: per-iteration values}) stay within the seed-to-seed noise
    of ``baseline``'s (the rule in the module docstring). Seeds become string keys (JSON)."""
    base = {s: figure(c, window, tail) for s, c in sorted(baseline.items())}
    cand = {s: figure(c, window, tail) for s, c in sorted(candidate.items())}
    finite = _finite(baseline) and _finite(candidate) and bool(base) and bool(cand)
    n_base, n_cand = len(base), len(cand)
    base_mean = statistics.fmean(base.values()) if base else math.nan
    cand_mean = statistics.fmean(cand.values()) if cand else math.nan
    d = cand_mean - base_mean
    s = pooled_sd([list(base.values()), list(cand.values())])
    bound = Z * s * math.sqrt(1 / n_base + 1 / n_cand) if n_base and n_cand else math.nan
    enough = n_base >= 2 and n_cand >= 2  # a standard deviation in each precision
    mean_within = (finite and abs(d) <= bound) if enough or not finite else None

    paired = {s: cand[s] - base[s] for s in cand if s in base}
    seeds = sorted(base)
    seed_to_seed = [abs(base[a] - base[b]) for i, a in enumerate(seeds) for b in seeds[i + 1 :]]
    paired_max = max((abs(v) for v in paired.values()), default=math.nan)
    seed_max = max(seed_to_seed, default=math.nan)
    paired_within = (finite and paired_max <= seed_max) if (paired and seed_to_seed) or not finite else None

    within: bool | None
    if not finite:  # a diverged run decides, however few seeds there are
        within = False
    elif mean_within is None or paired_within is None:
        within = None
    else:
        within = mean_within and paired_within
    return {
        "baseline_figures": {str(k): v for k, v in base.items()},
        "candidate_figures": {str(k): v for k, v in cand.items()},
        "n_baseline": n_base,
        "n_candidate": n_cand,
        "baseline_mean": base_mean,
        "candidate_mean": cand_mean,
        "difference": d,
        "pooled_sd": s,
        "bound": bound,
        "mean_within": mean_within,
        "paired_differences": {str(k): v for k, v in paired.items()},
        "paired_max_abs": paired_max,
        "seed_to_seed_differences": seed_to_seed,
        "seed_to_seed_max_abs": seed_max,
        "paired_within": paired_within,
        "finite": finite,
        "within_noise": within,
    }


# ---- the runs ----------------------------------------------------------------------------------------------------
def prepare_cache(work: Path) -> Path:
    """The phantom cohort, preprocessed once with the tiny config's data contract; returns the cache folder."""
    from hagan_clinic.config import load_config
    from hagan_clinic.phantoms import write_cohort
    from hagan_clinic.pipelines.preprocess import run as preprocess

    write_cohort(work / "cohort", n=COHORT_N, seed=COHORT_SEED, shape=COHORT_SHAPE, progress=False)
    preprocess(work / "cohort", work / "cache", load_config(CONFIG), progress=False)
    return work / "cache"


def train_run(cache: Path, out: Path, precision: str, seed: int, iterations: int) -> dict[str, Any]:
    """One training run on ``cache``; its per-iteration losses from metrics.jsonl, wall time and non-finite count.
    A run stopped for diverging keeps what it logged (NaN after it) and says why under ``error``."""
    from hagan_clinic.config import load_config
    from hagan_clinic.training.loop import TrainingError, train

    sets = [f"train.precision={precision}", f"seed={seed}", f"train.iterations={iterations}", "train.log_every=1",
            f"train.checkpoint_every={iterations}", "train.image_every=0", "tracking.enabled=false"]  # fmt: skip
    cfg = load_config(CONFIG, sets)
    start = time.perf_counter()
    error, nonfinite = None, None
    try:
        nonfinite = train(cfg, out, data_dir=cache, progress=False).nonfinite_skipped
    except TrainingError as err:  # too many non-finite iterations in a row: the answer, not a crash
        error = str(err)
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    by_it = {r["iteration"]: r for r in records}
    names = sorted({k for r in records for k in r if k.startswith("loss_")})
    # a value not finite at an iteration leaves no key in that record: NaN marks the hole
    curves = {k: [float(by_it.get(i, {}).get(k, math.nan)) for i in range(1, iterations + 1)] for k in names}
    return {"wall_s": round(wall, 2), "nonfinite_skipped": nonfinite, "error": error, "curves": curves}


# ---- report ------------------------------------------------------------------------------------------------------
Runs = dict[str, dict[str, dict[str, Any]]]  # {precision: {seed: train_run's record}}


def compared_seeds(runs: Runs) -> list[str]:
    """The seeds finished in every precision, in run order: the ones a verdict can pair."""
    first, *rest = runs.values()
    return [s for s in first if all(s in by_seed for by_seed in rest)]


def analyse(runs: Runs) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """The losses logged and, per candidate precision, the verdict per loss against fp32, over the seeds finished in
    every precision (all of them once the sweep is done)."""
    seeds = compared_seeds(runs)
    found = {k for by_seed in runs.values() for s in seeds for k in by_seed[s]["curves"]}
    losses = sorted(found, key=lambda k: (LOSS_ORDER.index(k) if k in LOSS_ORDER else len(LOSS_ORDER), k))

    def curves(precision: str, loss: str) -> dict[int, list[float]]:
        return {int(s): runs[precision][s]["curves"].get(loss, []) for s in seeds}

    verdicts = {
        p: {loss: verdict(curves(BASELINE, loss), curves(p, loss)) for loss in losses} for p in runs if p != BASELINE
    }
    return losses, verdicts


def all_finite(runs: Runs, verdicts: dict[str, dict[str, Any]]) -> bool:
    """Whether every finished run completed with every logged loss finite at every iteration."""
    clean = all(
        r["error"] is None
        and r["nonfinite_skipped"] == 0
        and all(math.isfinite(x) for c in r["curves"].values() for x in c)
        for by_seed in runs.values()
        for r in by_seed.values()
    )
    return clean and all(v["finite"] for by_loss in verdicts.values() for v in by_loss.values())


def summary(verdicts: dict[str, dict[str, Any]], finite: bool) -> list[str]:
    """The lines printed: per candidate precision and loss, d against its bound, the paired test and the verdict."""
    word = {True: "within noise", False: "NOT within noise", None: "undetermined (fewer than two seeds)"}
    lines = []
    for p, by_loss in verdicts.items():
        for loss, v in by_loss.items():
            lines.append(
                f"{loss} {p}: d {v['difference']:+.4f} ({p} {v['candidate_mean']:.4f} - fp32 {v['baseline_mean']:.4f})"
                f" vs bound {v['bound']:.4f} (s {v['pooled_sd']:.4f})"
                f"; paired max |{p}-fp32| {v['paired_max_abs']:.4f} vs seed-to-seed {v['seed_to_seed_max_abs']:.4f}"
                f" -> {word[v['within_noise']]}"
            )
    lines.append(f"all losses finite: {'yes' if finite else 'NO'}")
    return lines


def plot(runs: Runs, losses: list[str], path: Path) -> None:
    """A panel per loss: every run's smoothed curve, a colour per precision, the last quarter shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from hagan_clinic.io.files import atomic_target

    cols = min(len(losses), 2) or 1
    rows = max(1, math.ceil(len(losses) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.6 * rows), squeeze=False)
    for ax, loss in zip(axes.flat, losses):
        n = 0
        for k, (precision, by_seed) in enumerate(runs.items()):
            for j, run in enumerate(by_seed.values()):
                curve = run["curves"].get(loss, [])
                n = max(n, len(curve))
                label = f"{precision} (seeds {', '.join(by_seed)})" if j == 0 else None
                ax.plot(range(1, len(curve) + 1), smooth(curve), color=f"C{k}", linewidth=1.2, alpha=0.85, label=label)
        if n:
            ax.axvspan(n - max(1, math.ceil(n * TAIL)) + 0.5, n + 0.5, color="grey", alpha=0.12, linewidth=0)
        ax.set_title(f"{loss} (moving average of {WINDOW})", fontsize=10)
        ax.set_xlabel("iteration")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(losses) :]:
        ax.set_visible(False)
    fig.tight_layout()
    with atomic_target(path, ".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


# ---- main --------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--iterations", type=int, default=200, help="training iterations per run (default 200)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds, each run in every precision")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"],
                    help="precisions (fp32, the baseline, is always run)")  # fmt: skip
    ap.add_argument("--out-dir", type=Path, default=RESULTS, help="folder for the JSON and the PNG")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0: torch's default; 1 on a busy shared host)")  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="20 iterations, seeds 0 1 (a smoke test)")
    args = ap.parse_args(argv)
    if args.quick:
        args.iterations, args.seeds = 20, [0, 1]
    if args.iterations < 1:
        ap.error("--iterations must be at least 1")
    precisions = [BASELINE, *dict.fromkeys(p for p in args.precisions if p != BASELINE)]
    seeds = list(dict.fromkeys(args.seeds))
    stem = "loss_curve_quick" if args.quick else "loss_curve"

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    machine = record("cpu", n=512 if args.quick else 2048)  # before the runs: the load they started under
    t0 = time.perf_counter()
    called = None if argv is None else [__file__, *argv]  # called with arguments: those, not the caller's
    path = args.out_dir / f"{stem}.json"
    runs: Runs = {p: {} for p in precisions}

    def write(complete: bool) -> tuple[list[str], dict[str, dict[str, Any]], bool]:
        losses, verdicts = analyse(runs)
        finite = all_finite(runs, verdicts)
        body: dict[str, Any] = {
            "complete": complete,
            "config": CONFIG,
            "iterations": args.iterations,
            "seeds": seeds,
            "seeds_compared": [int(s) for s in compared_seeds(runs)],
            "precisions": precisions,
            "baseline": BASELINE,
            "cohort": {"n": COHORT_N, "seed": COHORT_SEED, "shape": list(COHORT_SHAPE)},
            "window": WINDOW,
            "tail": TAIL,
            "rule": RULE,
            "losses": losses,
            "all_finite": finite,
            "within_noise": {
                p: {loss: v["within_noise"] for loss, v in by_loss.items()} for p, by_loss in verdicts.items()
            },
            "verdicts": verdicts,
            "wall_s": round(time.perf_counter() - t0, 1),
            "runs": runs,
        }
        write_result(path, "loss_curve", machine, body, called)
        return losses, verdicts, finite

    with tempfile.TemporaryDirectory(prefix="loss_curve_") as tmp:
        cache = prepare_cache(Path(tmp))
        for seed in seeds:  # seed-major: a load change on the host hits both precisions of a seed alike
            for p in precisions:
                runs[p][str(seed)] = train_run(cache, Path(tmp) / f"run_{p}_{seed}", p, seed, args.iterations)
                print(f"{p} seed {seed}: {runs[p][str(seed)]['wall_s']} s", file=sys.stderr, flush=True)
                write(complete=False)  # a run killed later keeps this one
    losses, verdicts, finite = write(complete=True)
    plot(runs, losses, args.out_dir / f"{stem}.png")
    stopped = [f"{p} seed {k} stopped: {r['error']}" for p, by in runs.items() for k, r in by.items() if r["error"]]
    print("\n".join([*stopped, *summary(verdicts, finite), f"wrote {path} and {path.with_suffix('.png')}"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
