"""``hagan-clinic regress`` and ``predict``: grouped cross-validated regression of clinical measures, GOLD stage,
and the fitted models applied to new feature tables. Imports no torch (see hagan_clinic.regression).

Outputs in DIR: metrics.json, predictions.csv or .parquet (out-of-fold), pred_vs_true_<target>.png,
gold_confusion.png, model.skops (every model refitted on all rows, a skops file: see hagan_clinic.io.model_file).
The summaries, figures and MLflow names are made in :mod:`.regress_report`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from hagan_clinic.errors import one_line, short_repr
from hagan_clinic.io.files import (
    Outputs,
    file_sha256,
    is_parquet,
    make_folder,
    read_csv_table,
    regular_file,
    table_format,
    write_table,
    write_text,
)
from hagan_clinic.io.model_file import (
    RegressionBundle,
    check_encoder,
    load_bundle,
    save_bundle,
    table_encoder,
)
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
    gold_scores,
    gold_values,
    join_tables,
    outer_folds,
)
from hagan_clinic.regression import gold_labels as gold_codes

from .regress_report import (
    PredictResult,
    RegressResult,
    check_finite,
    mlflow_metrics,
    plot_name,
    unchecked_encoder,
    write_confusion,
    write_scatter,
)

if TYPE_CHECKING:
    from hagan_clinic.tracking import NullTracker

log = logging.getLogger(__name__)


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
    fmt: str = "csv"  # of the predictions table: csv or parquet

    @property
    def predictions_name(self) -> str:
        return f"predictions.{self.fmt}"


def read_table(path: str | Path, what: str, id_column: str | None = None) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise RegressionError(f"{what} table not found: {path}")
    regular_file(path, f"{what} table")
    try:
        if is_parquet(path):  # by content: encode writes parquet under any name (features, f.pq, f.parquet)
            return pd.read_parquet(path)
        head = pd.read_csv(path, nrows=0).columns
        # IDs keep leading zeros; cells neutralised for spreadsheets read back as written
        return read_csv_table(path, f"{what} table", dtype={id_column: str} if id_column in head else None)
    except Exception as err:  # pandas and pyarrow raise many types for damaged files
        raise RegressionError(f"{path}: not a readable table ({one_line(err, 100)})") from None


def gold_labels(codes: np.ndarray | pd.Series) -> np.ndarray:
    """GOLD codes as text labels ('0'..'4', 'PRISm'; None where unknown): one type per column, so that the table
    is the same as CSV and as parquet (which refuses a column of integers mixed with 'PRISm')."""
    return np.array([None if isinstance(v, float) else str(v) for v in gold_codes(codes)], dtype=object)


def _cv_predict(fit, x, y, fold, groups, rows, seed) -> np.ndarray:
    pred = np.full(len(y), np.nan)
    for k in np.unique(fold[rows]):
        train, test = rows & (fold != k), rows & (fold == k)
        pred[test] = fit(x[train], y[train], groups[train], seed).predict(x[test])
    return pred


def _fit_mean(x, y, groups, seed):
    return MeanModel().fit(x, y)


def _qct_rows(data: Dataset, rows: np.ndarray, fold: np.ndarray, folds: int) -> tuple[np.ndarray | None, str]:
    """Rows the QCT baseline can be fitted on, or None and why not (QCT failed for most series: an MR cohort)."""
    groups = data.ids
    if data.qct is None:
        return None, "the feature table has no QCT columns"
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


def run(
    features_path: str | Path, clinical_path: str | Path, opts: RegressOptions, tracker: NullTracker | None = None
) -> RegressResult:
    """Cross-validate every target of ``opts`` (and GOLD) on the joined tables and write the outputs to
    ``opts.out``; every argument and column is checked before any fitting."""
    from hagan_clinic.tracking import NullTracker

    tracker = tracker or NullTracker()
    if not opts.targets:
        raise RegressionError("no --targets given")
    if opts.folds < 2:
        raise RegressionError("--folds must be at least 2")
    if not 0 <= opts.seed <= MAX_SEED:
        raise RegressionError(f"--seed must be from 0 to {MAX_SEED}, got {opts.seed}")
    unknown = [t for t in opts.log_targets if t not in opts.targets]
    if unknown:
        raise RegressionError(f"--log-targets: '{unknown[0]}' is not one of --targets")
    table_format(opts.predictions_name, opts.fmt)
    features = read_table(features_path, "feature", opts.id_column)
    clinical = read_table(clinical_path, "clinical", opts.id_column)
    data = join_tables(features, clinical, opts.id_column, opts.feature_regex)
    features_sha256 = file_sha256(features_path)  # the table the models are fitted on, named in every output
    checkpoint, contract = table_encoder(features_path)  # its encoder, which predict's tables must share
    for name in opts.targets:  # every column checked before hours of fitting, not after
        clinical_target(data, name)
    if opts.gold_required and opts.gold_column:
        gold_values(data, opts.gold_column)
    out = opts.out
    guard = Outputs("regress", [features_path, clinical_path], opts.overwrite)
    names = ["metrics.json", opts.predictions_name, "model.skops", "gold_confusion.png"]
    names += [plot_name(name) for name in opts.targets]
    for name in names:  # before hours of fitting
        guard.check(out / name)
    make_folder(out)
    with tracker.run("regress", tags={"stage": "regress"}):
        tracker.log_params({
            "targets": ",".join(opts.targets), "log_targets": ",".join(opts.log_targets), "folds": opts.folds,
            "seed": opts.seed, "id_column": opts.id_column, "n_rows": len(data.ids),
            "n_patients": len(np.unique(data.ids)), "n_features": len(data.feature_columns),
            "qct_baseline": ",".join(data.qct_columns) or "none", "features_sha256": features_sha256,
            "checkpoint_sha256": checkpoint or "unknown",
        })  # fmt: skip
        metrics, preds, models, scored = cross_validate(data, opts)
        metrics["join"] = data.join
        metrics["features"] = {"columns": len(data.feature_columns), "rows": len(data.ids),
                               "patients": int(len(np.unique(data.ids))), "sha256": features_sha256,
                               "checkpoint_sha256": checkpoint}  # fmt: skip
        check_finite(metrics)
        write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n", guard)
        write_table(out / opts.predictions_name, preds, opts.fmt, guard)
        for name, s in metrics["targets"].items():  # the rows the title's R^2 is computed on
            write_scatter(out / plot_name(name), name, preds.loc[scored[name], f"{name}_true"].to_numpy(),
                     preds.loc[scored[name], f"{name}_pred"].to_numpy(), s, guard)  # fmt: skip
        gold_plots = {k: v for k, v in metrics["gold"].items() if k != "majority_baseline"}
        if gold_plots:
            write_confusion(out / "gold_confusion.png", gold_plots, guard)
        bundle = RegressionBundle(models, data.feature_columns, opts.id_column, opts.targets, opts.log_targets,
                                  features_sha256, checkpoint_sha256=checkpoint, data_contract=contract)  # fmt: skip
        save_bundle(bundle, out / "model.skops", guard)
        tracker.log_metrics(mlflow_metrics(metrics))
        tracker.log_sklearn_models(models, data.feature_columns, data.features[:2], log_targets=opts.log_targets)
        for name in names:  # what this run wrote, never other files in the folder
            if (out / name).is_file():
                tracker.log_artifact(out / name, "regress")
    return RegressResult(metrics, out)


def predict(
    model_path: str | Path,
    features_path: str | Path,
    out: str | Path,
    overwrite: bool = False,
    fmt: str | None = None,
    tracking_uri: str | None = None,
) -> PredictResult:
    """Apply the models written by ``regress`` to a feature table; writes a table (``fmt`` csv or parquet, default:
    from the name of ``out``, csv when it says neither) with one prediction per target.

    ``model_path``: the model file (DIR/model.skops) or a regress run's model URI, ``runs:/RUN_ID``, in the store
    ``tracking_uri`` (default: MLFLOW_TRACKING_URI, else ./mlruns). Either is read as untrusted input (see
    hagan_clinic.io.model_file). A parquet table carries in its key-value metadata the model's SHA-256 and that of
    the feature table the model was fitted on.

    The feature table must come from the encoder of the training features: when the provenance of both names a
    checkpoint, another checkpoint is refused (EncoderMismatch, before anything is written); when either does not
    say, the predictions are written with a warning on stderr and ``encoder_checked`` false in their provenance.

    Predictions stay on the scale each model was fitted on; the GOLD rules (PRISm as its own category) read the
    predicted spirometry when both fev1pp and fev1_fvc were fitted."""
    from hagan_clinic.tracking.sklearn_models import is_uri

    model, out = str(model_path), Path(out)
    if not is_uri(model) and not Path(model).exists():  # anything else there is refused by the model file's reader
        raise RegressionError(f"model not found: {model}")
    fmt = table_format(out, fmt, "csv")
    guard = Outputs("predict", [features_path, *([] if is_uri(model) else [model])], overwrite)
    guard.check(out)
    bundle = _read_model(model, tracking_uri)
    columns, id_column = bundle.feature_columns, bundle.id_column
    table = read_table(features_path, "feature", id_column)
    missing = [c for c in [id_column, *columns] if c not in table.columns]
    if missing:
        raise RegressionError(f"feature table lacks column '{missing[0]}' ({len(missing)} missing)")
    checkpoint = table_encoder(features_path)[0]
    checked = check_encoder(bundle, features_path, checkpoint)  # same names, another encoder: refused here
    x = table[columns].apply(pd.to_numeric, errors="coerce").to_numpy(float)
    for k, column in enumerate(columns):
        check_magnitude(x[:, k], f"feature column {short_repr(str(column))}")
    ok = np.isfinite(x).all(axis=1)
    result = pd.DataFrame({id_column: table[id_column].astype(str)})
    notes: list[str] = []
    for name, fitted in bundle.models.items():
        pred = np.full(len(table), np.nan)
        if ok.any():
            pred[ok] = fitted.predict(x[ok])
        if name in bundle.log_targets:
            pred = np.exp(pred)
        # predictions stay on the scale the model was fitted on (regress fits ratio targets as ratios): a unit
        # guess on predictions would rescale an outlier prediction silently
        result[f"{name}_pred"] = gold_labels(pred) if name == "gold" else pred
    if {"fev1pp", "fev1_fvc"} <= set(bundle.models):
        rules = gold_from_spirometry(result["fev1pp_pred"].fillna(0), result["fev1_fvc_pred"].fillna(1))
        result["gold_rules_pred"] = gold_labels(np.where(ok, rules, np.nan))
    if not checked:  # said once the table is known to be usable, not before a refusal
        log.warning("warning: %s", unchecked_encoder(features_path, checkpoint, bundle.checkpoint_sha256))
    write_table(out, result, fmt, guard, provenance=_provenance(model, bundle, features_path, checkpoint, checked))
    return PredictResult(result, out, notes)


def _read_model(model: str, tracking_uri: str | None) -> RegressionBundle:
    """The bundle of a model file, or of a regress run's model URI (downloaded to a temporary folder, removed once
    the bundle is read)."""
    import tempfile

    from hagan_clinic.tracking import resolve_uri
    from hagan_clinic.tracking.sklearn_models import download_bundle, is_uri

    if not is_uri(model):
        return load_bundle(model)
    if not model.startswith("runs:"):
        raise RegressionError(
            f"--model {short_repr(model, 80)}: give a model file (DIR/model.skops) or runs:/RUN_ID of a regress run"
        )
    with tempfile.TemporaryDirectory(prefix="hagan-clinic-model-") as tmp:
        return load_bundle(download_bundle(model, resolve_uri(tracking_uri), Path(tmp)), shown_as=model)


def _provenance(
    model: str, bundle: RegressionBundle, features_path: str | Path, checkpoint: str | None, checked: bool
) -> dict:
    """What made a table of predictions: the package, the model (as given, and its SHA-256), the feature table the
    model was fitted on and the one it was applied to (SHA-256 of each, and of the checkpoint that encoded each:
    None when not known), and whether the two checkpoints were checked to be the same."""
    from hagan_clinic import __version__

    return {
        "package": f"hagan-clinic {__version__}",
        "command": "predict",
        "model": model,
        "model_sha256": bundle.sha256,
        "training_features_sha256": bundle.features_sha256,
        "features_sha256": file_sha256(features_path),
        "training_checkpoint_sha256": bundle.checkpoint_sha256,
        "checkpoint_sha256": checkpoint,
        "encoder_checked": checked,
    }
