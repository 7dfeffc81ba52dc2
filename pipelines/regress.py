"""``hagan-clinic regress`` and ``predict``: grouped cross-validated regression of clinical measures, GOLD stage,
and the fitted models applied to new feature tables. Imports no torch (see hagan_clinic.regression).

Outputs in DIR: metrics.json, predictions.csv (out-of-fold), pred_vs_true_<target>.png, gold_confusion.png,
model.joblib (every model refitted on all rows; a pickle: load only files you made).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from hagan_clinic.errors import short_repr
from hagan_clinic.io.files import Outputs, csv_safe_frame, make_folder, read_csv_table, regular_file, write_text
from hagan_clinic.regression import (
    MAX_SEED,
    Dataset,
    MeanModel,
    PairedScorer,
    RegressionError,
    check_magnitude,
    check_patients,
    clinical_target,
    constant,
    first_bad,
    fit_classifier,
    fit_regressor,
    gold_from_spirometry,
    gold_labels,
    gold_scores,
    gold_values,
    join_tables,
    outer_folds,
)


@dataclass
class RegressOptions:
    targets: list[str]
    out: Path
    id_column: str = "patient_id"
    log_targets: list[str] = field(default_factory=list)
    gold_column: str | None = "gold"
    gold_required: bool = False
    folds: int = 5
    seed: int = 0
    feature_regex: str = r"z\d+"
    overwrite: bool = False


def read_table(path: str | Path, what: str, id_column: str | None = None) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise RegressionError(f"{what} table not found: {path}")
    regular_file(path, f"{what} table")
    try:
        if path.suffix.lower() == ".parquet":
            return pd.read_parquet(path)
        head = pd.read_csv(path, nrows=0).columns
        # IDs keep leading zeros; cells neutralised for spreadsheets read back as written
        return read_csv_table(path, f"{what} table", dtype={id_column: str} if id_column in head else None)
    except Exception as err:  # pandas and pyarrow raise many types for damaged files
        raise RegressionError(f"{path}: not a readable table ({' '.join(str(err).split())[:100]})") from None


def _cv_predict(fit, x, y, fold, groups, rows, seed) -> np.ndarray:
    pred = np.full(len(y), np.nan)
    for k in np.unique(fold[rows]):
        train, test = rows & (fold != k), rows & (fold == k)
        pred[test] = fit(x[train], y[train], groups[train], seed).predict(x[test])
    return pred


def _fit_mean(x, y, groups, seed):
    return MeanModel().fit(x, y)


def r2_text(scores: dict, key: str = "r2") -> str:
    """'r2 0.912 [0.850, 0.950]': one R^2 and its interval, as the console and the plot titles show it."""
    low, high = scores[f"{key}_ci"]
    interval = f" [{low:.3f}, {high:.3f}]" if low is not None else ""
    return f"{key} {scores[key]:.3f}{interval}"


def _plot_name(target: str) -> str:
    """The scatter plot's file name: a column name may hold any character, a file name may not."""
    return "pred_vs_true_" + re.sub(r"[^A-Za-z0-9_.-]", "_", target)[:100] + ".png"


def _scatter(path: Path, name: str, y: np.ndarray, pred: np.ndarray, scores: dict, guard: Outputs) -> None:
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


def _confusion_png(path: Path, scores: dict[str, dict], guard: Outputs) -> None:
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


def _qct_rows(data: Dataset, rows: np.ndarray, fold: np.ndarray, folds: int) -> tuple[np.ndarray | None, str]:
    """Rows the QCT baseline can be fitted on, or None and why not (QCT failed for most series: an MR cohort)."""
    groups = data.ids
    qrows = rows & np.isfinite(data.qct).all(axis=1)
    patients = len(np.unique(groups[qrows]))
    if patients < max(folds, 3):
        return None, f"{patients} patients with QCT values; --folds {folds} needs at least {max(folds, 3)}"
    for k in np.unique(fold[qrows]):
        if len(np.unique(groups[qrows & (fold != k)])) < 2:
            return None, f"a training fold holds fewer than two patients with QCT values ({patients} in all)"
    return qrows, ""


def _regress_target(data: Dataset, opts: RegressOptions, name: str, fold: np.ndarray, metrics: dict):
    """Fit and score one target: (model predictions on every row with a value, values, rows with a value, rows
    scored, the final model refitted on every row with a value)."""
    groups, x, seed = data.ids, data.features, opts.seed
    y, rows, dropped, note = clinical_target(data, name)
    metrics["dropped_rows"][name] = dropped
    if note:
        metrics["notes"][name] = note
    check_patients(len(np.unique(groups[rows])), opts.folds, f"'{name}' is known for")
    log = name in opts.log_targets
    if log and (y[rows] <= 0).any():
        raise RegressionError(f"'{name}' has values <= 0: it cannot be log-transformed")
    scored, scored_on, qrows = rows, "every row with a value", None
    if data.qct is not None:
        qrows, why = _qct_rows(data, rows, fold, opts.folds)
        if qrows is None:
            metrics["baselines"]["qct"][name] = {"skipped": why, "n": int((rows & np.isfinite(data.qct).all(1)).sum())}
        else:
            scored, scored_on = qrows, "rows with a value and every QCT column (those the QCT baseline can score)"
    if constant(y[scored]):
        raise RegressionError(
            f"'{name}' is a constant target on the {int(scored.sum())} rows scored: R^2 is undefined "
            "(leave it out of --targets)"
        )

    # the model and every baseline are fitted on the model's scale and scored on both; the mean baseline of the
    # original scale is the arithmetic training mean of y (the exp of a log-scale mean would be a geometric mean)
    y_fit = np.where(rows, np.log(np.where(rows & (y > 0), y, 1.0)) if log else y, np.nan)
    fit_scale = _cv_predict(fit_regressor, x, y_fit, fold, groups, rows, seed)
    predictions = {"model": (np.exp(fit_scale) if log else fit_scale, fit_scale)}
    mean = _cv_predict(_fit_mean, x, np.where(rows, y, np.nan), fold, groups, rows, seed)
    predictions["mean"] = (mean, _cv_predict(_fit_mean, x, y_fit, fold, groups, rows, seed) if log else mean)
    if qrows is not None:
        qfit = _cv_predict(fit_regressor, data.qct, y_fit, fold, groups, qrows, seed)
        predictions["qct"] = (np.exp(qfit) if log else qfit, qfit)
    scorer = PairedScorer(y[scored], fold[scored], groups[scored], seed, log=log)
    results = {kind: scorer.score(pred[scored], pred_log[scored]) for kind, (pred, pred_log) in predictions.items()}
    model = results.pop("model")
    if model[0]["r2_fold_mean"] is None:  # e.g. as many folds as patients: one patient per fold
        metrics["notes"][f"{name}.r2_fold_mean"] = (
            f"'{name}': R^2 per fold is undefined (no fold holds two distinct values; --folds {opts.folds}); "
            "the pooled R^2 of all out-of-fold predictions is reported"
        )
    target = {**model[0], "n_with_value": int(rows.sum()), "scored_on": scored_on}
    for kind, result in results.items():
        gain, ci, gain_note = PairedScorer.gain(model, result)
        target[f"r2_gain_over_{kind}"], target[f"r2_gain_over_{kind}_ci"] = gain, ci
        if gain_note:
            target[f"r2_gain_over_{kind}_ci_note"] = gain_note
        extra = {"columns": data.qct_columns} if kind == "qct" else {}
        metrics["baselines"][kind][name] = {**result[0], **extra}
    metrics["targets"][name] = target
    final = fit_regressor(x[rows], y_fit[rows], groups[rows], seed)
    return np.where(rows, predictions["model"][0], np.nan), y, rows, scored, final


def cross_validate(data: Dataset, opts: RegressOptions) -> tuple[dict, pd.DataFrame, dict, dict]:
    """Scores, out-of-fold predictions, the final models (refitted on all rows) and the rows scored per target."""
    fold = outer_folds(data.ids, opts.folds, opts.seed)
    preds = pd.DataFrame({opts.id_column: data.ids, "fold": fold})
    metrics: dict = {"targets": {}, "baselines": {"mean": {}}, "gold": {}, "dropped_rows": {}, "notes": {}}
    if data.qct is not None:
        metrics["baselines"]["qct"] = {}
    models: dict = {}
    scored: dict = {}
    for name in opts.targets:
        pred, y, rows, scored[name], models[name] = _regress_target(data, opts, name, fold, metrics)
        preds[f"{name}_true"], preds[f"{name}_pred"] = np.where(rows, y, np.nan), pred
    _gold(data, opts, fold, preds, metrics, models)
    return metrics, preds, models, scored


def _gold(data: Dataset, opts: RegressOptions, fold, preds: pd.DataFrame, metrics: dict, models: dict) -> None:
    """GOLD classifier, majority baseline and the rules on predicted spirometry; GOLD codes as in regression."""
    groups, x, seed = data.ids, data.features, opts.seed
    column = opts.gold_column
    if not (column and column in data.clinical.columns):
        if opts.gold_required:
            raise RegressionError(f"clinical table has no column '{column}'")
        return
    codes, metrics["dropped_rows"][column] = gold_values(data, column)
    rows = np.isfinite(codes)
    example = first_bad(data.clinical[column], ~rows)
    if not rows.any():
        raise RegressionError(f"'{column}' holds no GOLD stage (0-4, PRISm or -1) on any row{example}")
    dropped = metrics["dropped_rows"][column]
    if dropped:  # rows lost to values that are no GOLD stage must be seen, not just counted
        metrics["notes"][column] = (
            f"{dropped} of {len(codes)} rows of '{column}' hold no GOLD stage (0-4, PRISm or -1){example} and are "
            "left out of the GOLD scores"
        )
    check_patients(len(np.unique(groups[rows])), opts.folds, f"'{column}' is known for")
    if len(np.unique(codes[rows])) < 2:
        raise RegressionError(f"'{column}' holds one GOLD stage on every usable row: there is nothing to classify")
    g = np.where(rows, codes, 0).astype(int)
    pred, majority = np.full(len(g), np.nan), np.full(len(g), np.nan)
    for k in np.unique(fold[rows]):
        train, test = rows & (fold != k), rows & (fold == k)
        if len(np.unique(g[train])) < 2:
            raise RegressionError("a training fold holds only one GOLD stage; use fewer --folds")
        try:
            pred[test] = fit_classifier(x[train], g[train], groups[train], seed).predict(x[test])
        except ValueError:  # sklearn: every inner fit failed (an inner fold with one stage): too few patients
            raise RegressionError(
                f"'{column}': too few patients per GOLD stage to fit the classifier in every fold; use fewer --folds"
            ) from None
        stages, counts = np.unique(g[train], return_counts=True)
        majority[test] = stages[counts.argmax()]
    metrics["gold"]["classifier"] = gold_scores(g[rows], pred[rows])
    metrics["gold"]["majority_baseline"] = gold_scores(g[rows], majority[rows])
    preds["gold_true"], preds["gold_pred"] = gold_labels(np.where(rows, g, np.nan)), gold_labels(pred)
    models["gold"] = fit_classifier(x[rows], g[rows], groups[rows], seed)
    if {"fev1pp", "fev1_fvc"} <= set(opts.targets):
        both = rows & preds["fev1pp_pred"].notna().to_numpy() & preds["fev1_fvc_pred"].notna().to_numpy()
        rules = gold_from_spirometry(preds["fev1pp_pred"].fillna(0), preds["fev1_fvc_pred"].fillna(1))
        metrics["gold"]["from_predicted_spirometry"] = gold_scores(g[both], rules[both])
        preds["gold_rules_pred"] = gold_labels(np.where(both, rules, np.nan))


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


def _check_finite(value, where: str = "metrics") -> None:
    """No NaN or inf in a result that is written as ok (json.dumps would write NaN, which is no JSON): an
    undefined score is refused with its name instead of being printed as a number."""
    if isinstance(value, dict):
        for key, item in value.items():
            _check_finite(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for item in value:
            _check_finite(item, where)
    elif isinstance(value, float) and not np.isfinite(value):
        raise RegressionError(f"{where} is {value}: the values are too extreme or too few to score")


def run(features_path, clinical_path, opts: RegressOptions, tracker=None) -> dict:
    import joblib

    from hagan_clinic.tracking import NullTracker

    tracker = tracker or NullTracker()
    if not opts.targets:
        raise RegressionError("no --targets given")
    if opts.folds < 2:
        raise RegressionError("--folds must be at least 2")
    if not 0 <= opts.seed <= MAX_SEED:
        raise RegressionError(f"--seed must be from 0 to {MAX_SEED}, got {opts.seed}")
    features = read_table(features_path, "feature", opts.id_column)
    clinical = read_table(clinical_path, "clinical", opts.id_column)
    data = join_tables(features, clinical, opts.id_column, opts.feature_regex)
    for name in opts.targets:  # every column checked before hours of fitting, not after
        clinical_target(data, name)
    if opts.gold_required:
        gold_values(data, opts.gold_column)
    out = opts.out
    guard = Outputs("regress", [features_path, clinical_path], opts.overwrite)
    names = ["metrics.json", "predictions.csv", "model.joblib", "gold_confusion.png"]
    names += [_plot_name(name) for name in opts.targets]
    for name in names:  # before hours of fitting
        guard.check(out / name)
    make_folder(out)
    with tracker.run("regress", tags={"stage": "regress"}):
        tracker.log_params({
            "targets": ",".join(opts.targets), "log_targets": ",".join(opts.log_targets), "folds": opts.folds,
            "seed": opts.seed, "id_column": opts.id_column, "n_rows": len(data.ids),
            "n_patients": len(np.unique(data.ids)), "n_features": len(data.feature_columns),
            "qct_baseline": ",".join(data.qct_columns) or "none",
        })  # fmt: skip
        metrics, preds, models, scored = cross_validate(data, opts)
        metrics["join"] = data.join
        metrics["features"] = {"columns": len(data.feature_columns), "rows": len(data.ids),
                               "patients": int(len(np.unique(data.ids)))}  # fmt: skip
        _check_finite(metrics)
        write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n", guard)
        write_text(out / "predictions.csv", csv_safe_frame(preds).to_csv(index=False), guard)
        for name, s in metrics["targets"].items():  # the rows the title's R^2 is computed on
            _scatter(out / _plot_name(name), name, preds.loc[scored[name], f"{name}_true"].to_numpy(),
                     preds.loc[scored[name], f"{name}_pred"].to_numpy(), s, guard)  # fmt: skip
        gold_plots = {k: v for k, v in metrics["gold"].items() if k != "majority_baseline"}
        if gold_plots:
            _confusion_png(out / "gold_confusion.png", gold_plots, guard)
        bundle = {"models": models, "feature_columns": data.feature_columns, "id_column": opts.id_column,
                  "log_targets": opts.log_targets, "targets": opts.targets}  # fmt: skip
        with guard.target(out / "model.joblib", ".joblib") as tmp:
            joblib.dump(bundle, tmp)
        tracker.log_metrics(mlflow_metrics(metrics))
        for name in names:  # what this run wrote, never other files in the folder
            if (out / name).is_file():
                tracker.log_artifact(out / name, "regress")
    return metrics


def predict(
    model_path: str | Path, features_path: str | Path, out: str | Path, overwrite: bool = False
) -> tuple[pd.DataFrame, list[str]]:
    """Apply a model.joblib written by ``regress`` to a feature table; writes CSV with one prediction per target.

    Returns the table and notes: a ratio target (FEV1/FVC) predicted in percent, by a model fitted on percentages,
    is divided by 100 before the GOLD rules (PRISm as its own category) read it."""
    import joblib

    model_path = Path(model_path)
    if not model_path.is_file():
        raise RegressionError(f"model not found: {model_path}")
    guard = Outputs("predict", [model_path, features_path], overwrite)
    guard.check(out)
    try:
        bundle = joblib.load(model_path)
        models, columns, id_column = bundle["models"], bundle["feature_columns"], bundle["id_column"]
    except Exception as err:  # not a bundle written by regress
        raise RegressionError(
            f"{model_path}: not a model written by hagan-clinic regress ({type(err).__name__})"
        ) from None
    table = read_table(features_path, "feature", id_column)
    missing = [c for c in [id_column, *columns] if c not in table.columns]
    if missing:
        raise RegressionError(f"feature table lacks column '{missing[0]}' ({len(missing)} missing)")
    x = table[columns].apply(pd.to_numeric, errors="coerce").to_numpy(float)
    for k, column in enumerate(columns):
        check_magnitude(x[:, k], f"feature column {short_repr(str(column))}")
    ok = np.isfinite(x).all(axis=1)
    result, notes = pd.DataFrame({id_column: table[id_column].astype(str)}), []
    for name, model in models.items():
        pred = np.full(len(table), np.nan)
        if ok.any():
            pred[ok] = model.predict(x[ok])
        if name in bundle["log_targets"]:
            pred = np.exp(pred)
        # predictions stay on the scale the model was fitted on (regress fits ratio targets as ratios): a unit
        # guess on predictions would rescale an outlier prediction silently
        result[f"{name}_pred"] = gold_labels(pred) if name == "gold" else pred
    if {"fev1pp", "fev1_fvc"} <= set(models):
        rules = gold_from_spirometry(result["fev1pp_pred"].fillna(0), result["fev1_fvc_pred"].fillna(1))
        result["gold_rules_pred"] = gold_labels(np.where(ok, rules, np.nan))
    write_text(Path(out), csv_safe_frame(result).to_csv(index=False), guard)
    return result, notes
