"""What ``hagan-clinic regress`` and ``predict`` report: the result objects and their console summaries, the
figures (out-of-fold scatter per target, GOLD confusion matrices), and the numbers as MLflow sees them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from hagan_clinic.io.files import Outputs
from hagan_clinic.regression import RegressionError


@dataclass
class RegressResult:
    """What ``regress`` found: ``metrics`` as in metrics.json, written to the folder ``out``."""

    metrics: dict
    out: Path

    def summary(self) -> str:
        """What ``hagan-clinic regress`` prints: notes, then per target the model's R^2 with its interval, the
        per-fold R^2 and each baseline; then GOLD; the names and numbers of metrics.json and the MLflow run."""
        m = self.metrics
        lines = [f"note: {note}" for note in m["notes"].values()]
        for name, s in m["targets"].items():
            fold = (
                f"r2_fold_mean {s['r2_fold_mean']:.3f} +- {s['r2_fold_sd']:.3f}"
                if s["r2_fold_mean"] is not None
                else ""
            )
            parts = [r2_text(s), *([r2_text(s, "r2_log")] if "r2_log" in s else []), fold]
            for kind, per_target in m["baselines"].items():
                b = per_target[name]
                parts.append(
                    f"baseline_{kind}.{r2_text(b)}" if "r2" in b else f"baseline_{kind} skipped ({b['skipped']})"
                )
            lines.append(f"{name}: {'; '.join(p for p in parts if p)}; n {s['n']} ({s['n_patients']} patients)")
        for kind, s in m["gold"].items():
            lines.append(f"GOLD {kind}: accuracy {s['accuracy']:.3f}, quadratic_kappa {s['quadratic_kappa']:.3f}")
        lines.append(f"written to {self.out}")
        return "\n".join(lines)


@dataclass
class PredictResult:
    """The predictions of ``predict`` (one row per feature row), the table written, and notes for the user."""

    table: pd.DataFrame
    out: Path
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return "\n".join([*(f"note: {note}" for note in self.notes), f"{len(self.table)} rows: {self.out}"])


def unchecked_encoder(features: str | Path, checkpoint: str | None, trained: str | None) -> str:
    """Why the encoder of the feature table ``features`` (made by the checkpoint whose SHA-256 is ``checkpoint``)
    could not be checked against that of the models' training features (``trained``): one of them is None, not
    known. One line, for the warning of ``predict``."""
    reasons = [] if checkpoint else ["the table names no encoder (no provenance in it, nor a .provenance.json beside)"]
    if trained is None:
        reasons.append("the models do not record the encoder of their training features")
    known = f" (checkpoint {trained[:12]})" if trained else ""
    return (
        f"the encoder of {features} could not be checked: {' and '.join(reasons)}; the predictions hold only if it "
        f"is the encoder of the models' training features{known}"
    )


def r2_text(scores: dict, key: str = "r2") -> str:
    """'r2 0.912 [0.850, 0.950]': one R^2 and its interval, as the console and the plot titles show it."""
    low, high = scores[f"{key}_ci"]
    interval = f" [{low:.3f}, {high:.3f}]" if low is not None else ""
    return f"{key} {scores[key]:.3f}{interval}"


def plot_name(target: str) -> str:
    """The scatter plot's file name: a column name may hold any character, a file name may not."""
    return "pred_vs_true_" + re.sub(r"[^A-Za-z0-9_.-]", "_", target)[:100] + ".png"


def write_scatter(path: Path, name: str, y: np.ndarray, pred: np.ndarray, scores: dict, guard: Outputs) -> None:
    """Out-of-fold predictions ``pred`` against the truth ``y`` (both (N,), the rows scored), titled with the R^2
    of ``scores``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    title = f"{name}: {r2_text(scores)}"
    fig, ax = plt.subplots(figsize=(4.4, 4.4))
    ax.scatter(y, pred, s=12, alpha=0.7)
    lo, hi = float(min(y.min(), pred.min())), float(max(y.max(), pred.max()))
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    ax.set(xlabel=f"{name} (true)", ylabel=f"{name} (out-of-fold prediction)", title=title)
    ax.text(0.02, 0.98, f"n {scores['n']}, {scores['n_patients']} patients", transform=ax.transAxes, va="top")
    fig.tight_layout()
    with guard.target(path, ".png") as tmp:  # the title in the file too, for anyone checking it
        fig.savefig(tmp, format="png", dpi=100, metadata={"Title": title})
    plt.close(fig)


def write_confusion(path: Path, scores: dict[str, dict], guard: Outputs) -> None:
    """One confusion matrix per GOLD scorer in ``scores`` (name -> gold_scores), side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(scores), figsize=(4.4 * len(scores), 4), squeeze=False)
    for ax, (name, s) in zip(axes[0], scores.items()):
        m, labels = np.asarray(s["confusion"]), s["labels"]
        ax.imshow(m, cmap="Blues")
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=8)
        ax.set(xlabel="predicted GOLD", ylabel="true GOLD", xticks=range(len(labels)), yticks=range(len(labels)),
               xticklabels=labels, yticklabels=labels, title=f"{name}: kappa {s['quadratic_kappa']:.2f}")  # fmt: skip
    fig.tight_layout()
    with guard.target(path, ".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def mlflow_metrics(metrics: dict) -> dict[str, float]:
    """The numbers of metrics.json under the same names: NAME.KEY, NAME.baseline_KIND.KEY, gold.KIND.KEY; an
    interval KEY_ci becomes KEY_ci_low and KEY_ci_high."""
    flat: dict[str, float] = {}

    def add(prefix: str, scores: dict) -> None:
        for key, value in scores.items():
            if key.endswith("_ci") and value[0] is not None:
                flat[f"{prefix}.{key}_low"], flat[f"{prefix}.{key}_high"] = value
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                flat[f"{prefix}.{key}"] = value

    for name, scores in metrics["targets"].items():
        add(name, scores)
    for kind, per_target in metrics["baselines"].items():
        for name, scores in per_target.items():
            add(f"{name}.baseline_{kind}", scores)
    for kind, scores in metrics["gold"].items():
        add(f"gold.{kind}", scores)
    return flat


def check_finite(value: object, where: str = "metrics") -> None:
    """No NaN or inf in a result that is written as ok (json.dumps would write NaN, which is no JSON): an
    undefined score is refused with its name instead of being printed as a number."""
    if isinstance(value, dict):
        for key, item in value.items():
            check_finite(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for item in value:
            check_finite(item, where)
    elif isinstance(value, float) and not np.isfinite(value):
        raise RegressionError(f"{where} is {value}: the values are too extreme or too few to score")
