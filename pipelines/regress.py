"""``hagan-clinic regress`` and ``predict``: grouped cross-validated regression of clinical measures, GOLD stage,
and the fitted models applied to new feature tables. Imports no torch (see hagan_clinic.regression).

Outputs in DIR: metrics.json, predictions.csv (out-of-fold), pred_vs_true_<target>.png, gold_confusion.png,
model.joblib (every model refitted on all rows; a pickle: load only files you made).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from hagan_clinic.regression import (
    Dataset,
    MeanModel,
    RegressionError,
    check_patients,
    fit_classifier,
    fit_regressor,
    gold_from_spirometry,
    gold_scores,
    join_tables,
    outer_folds,
    regression_scores,
    target_values,
)

from .cohort import atomic_write_text


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


def read_table(path: str | Path, what: str, id_column: str | None = None) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise RegressionError(f"{what} table not found: {path}")
    try:
        if path.suffix.lower() == ".parquet":
            return pd.read_parquet(path)
        head = pd.read_csv(path, nrows=0).columns
        return pd.read_csv(path, dtype={id_column: str} if id_column in head else None)  # IDs keep leading zeros
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


def _scatter(path: Path, name: str, y: np.ndarray, pred: np.ndarray, r2: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4))
    ax.scatter(y, pred, s=12, alpha=0.7)
    lo, hi = float(min(y.min(), pred.min())), float(max(y.max(), pred.max()))
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    ax.set(xlabel=f"{name} (true)", ylabel=f"{name} (out-of-fold prediction)", title=f"{name}: R$^2$ = {r2:.2f}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _confusion_png(path: Path, scores: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(scores), figsize=(4 * len(scores), 3.6), squeeze=False)
    for ax, (name, s) in zip(axes[0], scores.items()):
        m = np.asarray(s["confusion"])
        ax.imshow(m, cmap="Blues")
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=8)
        ax.set(xlabel="predicted GOLD", ylabel="true GOLD", xticks=range(5), yticks=range(5),
               title=f"{name}: kappa {s['quadratic_kappa']:.2f}")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def cross_validate(data: Dataset, opts: RegressOptions) -> tuple[dict, pd.DataFrame, dict]:
    """Scores, out-of-fold predictions and the final models (refitted on all rows)."""
    groups, x, seed = data.ids, data.features, opts.seed
    fold = outer_folds(groups, opts.folds, seed)
    preds = pd.DataFrame({opts.id_column: data.ids, "fold": fold})
    metrics: dict = {"targets": {}, "baselines": {"mean": {}}, "gold": {}, "dropped_rows": {}}
    if data.qct is not None:
        metrics["baselines"]["qct"] = {}
    models: dict = {}
    for name in opts.targets:
        y, rows, dropped = target_values(data, name)
        metrics["dropped_rows"][name] = dropped
        check_patients(len(np.unique(groups[rows])), opts.folds, f"'{name}' is known for")
        log = name in opts.log_targets
        if log and (y[rows] <= 0).any():
            raise RegressionError(f"'{name}' has values <= 0: it cannot be log-transformed")
        y_fit = np.where(rows, np.log(np.where(rows & (y > 0), y, 1.0)) if log else y, np.nan)
        back = np.exp if log else (lambda v: v)
        pred = back(_cv_predict(fit_regressor, x, y_fit, fold, groups, rows, seed))
        metrics["targets"][name] = regression_scores(y[rows], pred[rows], fold[rows], groups[rows], seed)
        base = back(_cv_predict(_fit_mean, x, y_fit, fold, groups, rows, seed))
        metrics["baselines"]["mean"][name] = regression_scores(y[rows], base[rows], fold[rows], groups[rows], seed)
        qrows = rows & np.isfinite(data.qct).all(axis=1) if data.qct is not None else None
        if qrows is not None and len(np.unique(groups[qrows])) >= max(opts.folds, 3):
            qpred = back(_cv_predict(fit_regressor, data.qct, y_fit, fold, groups, qrows, seed))
            scores = regression_scores(y[qrows], qpred[qrows], fold[qrows], groups[qrows], seed)
            metrics["baselines"]["qct"][name] = {**scores, "columns": data.qct_columns}
        elif qrows is not None:  # QCT failed for most series (an MR cohort): no baseline rather than a bad one
            metrics["baselines"]["qct"][name] = {"skipped": "too few series with QCT values", "n": int(qrows.sum())}
        preds[f"{name}_true"], preds[f"{name}_pred"] = np.where(rows, y, np.nan), pred
        models[name] = fit_regressor(x[rows], y_fit[rows], groups[rows], seed)
    _gold(data, opts, fold, preds, metrics, models)
    return metrics, preds, models


def _gold(data: Dataset, opts: RegressOptions, fold, preds: pd.DataFrame, metrics: dict, models: dict) -> None:
    groups, x, seed = data.ids, data.features, opts.seed
    column = opts.gold_column
    if column and column in data.clinical.columns:
        g, rows, dropped = target_values(data, column)
        rows &= np.isin(g, [0, 1, 2, 3, 4])
        metrics["dropped_rows"][column] = int(len(g) - rows.sum())
        g = np.where(rows, g, -1).astype(int)
        pred = np.full(len(g), -1)
        for k in np.unique(fold[rows]):
            train, test = rows & (fold != k), rows & (fold == k)
            if len(np.unique(g[train])) < 2:
                raise RegressionError("a training fold holds only one GOLD stage; use fewer --folds")
            pred[test] = fit_classifier(x[train], g[train], groups[train], seed).predict(x[test])
        metrics["gold"]["classifier"] = gold_scores(g[rows], pred[rows])
        majority = np.full(len(g), -1)
        for k in np.unique(fold[rows]):
            train, test = rows & (fold != k), rows & (fold == k)
            majority[test] = np.bincount(g[train]).argmax()
        metrics["gold"]["majority_baseline"] = gold_scores(g[rows], majority[rows])
        preds["gold_true"], preds["gold_pred"] = np.where(rows, g, np.nan), np.where(rows, pred, np.nan)
        models["gold"] = fit_classifier(x[rows], g[rows], groups[rows], seed)
        if {"fev1pp", "fev1_fvc"} <= set(opts.targets):
            both = rows & preds["fev1pp_pred"].notna().to_numpy() & preds["fev1_fvc_pred"].notna().to_numpy()
            rules = gold_from_spirometry(preds["fev1pp_pred"].fillna(0), preds["fev1_fvc_pred"].fillna(1))
            metrics["gold"]["from_predicted_spirometry"] = gold_scores(g[both], rules[both])
            preds["gold_rules_pred"] = np.where(both, rules, np.nan)
    elif opts.gold_required:
        raise RegressionError(f"clinical table has no column '{column}'")


def run(features_path, clinical_path, opts: RegressOptions, tracker=None) -> dict:
    import joblib

    from hagan_clinic.tracking import NullTracker

    tracker = tracker or NullTracker()
    if not opts.targets:
        raise RegressionError("no --targets given")
    if opts.folds < 2:
        raise RegressionError("--folds must be at least 2")
    features = read_table(features_path, "feature", opts.id_column)
    clinical = read_table(clinical_path, "clinical", opts.id_column)
    data = join_tables(features, clinical, opts.id_column, opts.feature_regex)
    for name in opts.targets:  # every column checked before hours of fitting, not after
        target_values(data, name)
    if opts.gold_required:
        target_values(data, opts.gold_column)
    out = opts.out
    out.mkdir(parents=True, exist_ok=True)
    with tracker.run("regress", tags={"stage": "regress"}):
        tracker.log_params({
            "targets": ",".join(opts.targets), "log_targets": ",".join(opts.log_targets), "folds": opts.folds,
            "seed": opts.seed, "id_column": opts.id_column, "n_rows": len(data.ids),
            "n_patients": len(np.unique(data.ids)), "n_features": len(data.feature_columns),
            "qct_baseline": ",".join(data.qct_columns) or "none",
        })  # fmt: skip
        metrics, preds, models = cross_validate(data, opts)
        metrics["join"] = data.join
        metrics["features"] = {"columns": len(data.feature_columns), "rows": len(data.ids),
                               "patients": int(len(np.unique(data.ids)))}  # fmt: skip
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        preds.to_csv(out / "predictions.csv", index=False)
        for name, s in metrics["targets"].items():
            rows = preds[f"{name}_true"].notna()
            _scatter(out / f"pred_vs_true_{name}.png", name, preds.loc[rows, f"{name}_true"].to_numpy(),
                     preds.loc[rows, f"{name}_pred"].to_numpy(), s["r2"])  # fmt: skip
        gold_plots = {k: v for k, v in metrics["gold"].items() if k != "majority_baseline"}
        if gold_plots:
            _confusion_png(out / "gold_confusion.png", gold_plots)
        bundle = {"models": models, "feature_columns": data.feature_columns, "id_column": opts.id_column,
                  "log_targets": opts.log_targets, "targets": opts.targets}  # fmt: skip
        joblib.dump(bundle, out / "model.joblib")
        flat = {}
        for name, s in metrics["targets"].items():
            flat.update({f"{name}.r2": s["r2"], f"{name}.mae": s["mae"], f"{name}.pearson_r": s["pearson_r"]})
        for base, per in metrics["baselines"].items():
            flat.update({f"{name}.r2_{base}": s["r2"] for name, s in per.items() if "r2" in s})
        for kind, s in metrics["gold"].items():
            flat.update({f"gold.{kind}.{k}": s[k] for k in ("accuracy", "within_one", "balanced_accuracy",
                                                             "quadratic_kappa")})  # fmt: skip
        tracker.log_metrics(flat)
        for path in sorted(out.iterdir()):
            if path.is_file():
                tracker.log_artifact(path, "regress")
    return metrics


def predict(model_path: str | Path, features_path: str | Path, out: str | Path) -> pd.DataFrame:
    """Apply a model.joblib written by ``regress`` to a feature table; writes CSV with one prediction per target."""
    import joblib

    model_path = Path(model_path)
    if not model_path.is_file():
        raise RegressionError(f"model not found: {model_path}")
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
    ok = np.isfinite(x).all(axis=1)
    result = pd.DataFrame({id_column: table[id_column].astype(str)})
    for name, model in models.items():
        pred = np.full(len(table), np.nan)
        if ok.any():
            pred[ok] = model.predict(x[ok])
        if name in bundle["log_targets"]:
            pred = np.exp(pred)
        result[f"{name}_pred"] = pred
    if {"fev1pp", "fev1_fvc"} <= set(models):
        rules = gold_from_spirometry(result["fev1pp_pred"].fillna(0), result["fev1_fvc_pred"].fillna(1))
        result["gold_rules_pred"] = np.where(ok, rules, np.nan)
    out = Path(out)
    atomic_write_text(out, result.to_csv(index=False))
    return result
