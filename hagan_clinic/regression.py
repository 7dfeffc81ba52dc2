"""Clinical measures and GOLD stage from latent features: grouped cross-validation with baselines. No torch here.

The input is the feature table of ``hagan-clinic encode`` (any table with an ID column and feature columns works)
and a clinical table keyed by the same ID. Rows are series; a patient with several series is one group, so no
patient ever sits in both a training and a test fold. Hyper-parameters (PCA or none, the ridge penalty, the
logistic C) are chosen by an inner grouped cross-validation inside each training fold only, so the outer folds
score a procedure that never saw their patients.

Every target is scored on the same folds by the model and by its baselines: the training-fold mean, and (when the
feature table has them) the QCT columns alone. A user sees at once whether the deep features add anything.
"""

from __future__ import annotations

import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .errors import HaganError

QCT_COLUMNS = ("laa950_pct", "perc15_hu", "lung_volume_ml")
RIDGE_ALPHAS = tuple(10.0 ** np.arange(-3, 4.5, 0.5))
LOGISTIC_CS = (0.001, 0.01, 0.1, 1.0, 10.0)
BOOTSTRAP = 1000


@contextmanager
def _quiet():
    """Small folds make sklearn warn (classes absent from a fold, slow convergence); the scores say it all."""
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


class RegressionError(HaganError):
    """Unusable tables or options; the message names the column, file or count."""


def gold_from_spirometry(fev1pp, fev1_fvc) -> np.ndarray:
    """GOLD grade 0-4 by the spirometric rules: 0 when FEV1/FVC >= 0.70; else 1..4 by FEV1 % predicted
    (>= 80, >= 50, >= 30, < 30)."""
    fev1pp, ratio = np.asarray(fev1pp, float), np.asarray(fev1_fvc, float)
    grade = np.select([fev1pp >= 80, fev1pp >= 50, fev1pp >= 30], [1, 2, 3], 4)
    return np.where(ratio >= 0.70, 0, grade).astype(int)


@dataclass
class Dataset:
    """Features joined to the clinical table: one row per series."""

    ids: np.ndarray
    features: np.ndarray  # (N, D) float
    feature_columns: list[str]
    clinical: pd.DataFrame  # aligned with ids
    qct: np.ndarray | None  # (N, k) QCT columns of the feature table, when present
    qct_columns: list[str]
    join: dict = field(default_factory=dict)


def feature_columns(table: pd.DataFrame, pattern: str) -> list[str]:
    cols = [c for c in table.columns if re.fullmatch(pattern, str(c))]
    if not cols:
        raise RegressionError(f"no feature columns match '{pattern}' (give --feature-regex)")
    return cols


def join_tables(features: pd.DataFrame, clinical: pd.DataFrame, id_column: str, pattern: str) -> Dataset:
    for name, table in (("features", features), ("clinical", clinical)):
        if id_column not in table.columns:
            raise RegressionError(f"{name} table has no ID column '{id_column}' (give --id-column)")
    cols = feature_columns(features, pattern)
    feats = features.copy()
    feats[id_column] = feats[id_column].astype(str)
    clin = clinical.copy()
    clin[id_column] = clin[id_column].astype(str)
    if clin[id_column].duplicated().any():
        dup = clin.loc[clin[id_column].duplicated(), id_column].iloc[0]
        raise RegressionError(f"clinical table lists ID '{dup}' more than once")
    f_ids, c_ids = set(feats[id_column]), set(clin[id_column])
    join = {
        "matched_ids": len(f_ids & c_ids),
        "features_only": sorted(f_ids - c_ids),
        "clinical_only": sorted(c_ids - f_ids),
    }
    merged = feats[feats[id_column].isin(c_ids)].merge(clin, on=id_column, how="left", suffixes=("", "_clinical"))
    if merged.empty:
        raise RegressionError(f"no ID of the feature table is in the clinical table (column '{id_column}')")
    x = merged[cols].apply(pd.to_numeric, errors="coerce").to_numpy(float)
    keep = np.isfinite(x).all(axis=1)
    join["feature_rows_dropped"] = int((~keep).sum())  # non-numeric or missing features
    merged, x = merged[keep].reset_index(drop=True), x[keep]
    qcols = [c for c in QCT_COLUMNS if c in features.columns]
    qct = merged[qcols].apply(pd.to_numeric, errors="coerce").to_numpy(float) if qcols else None
    return Dataset(merged[id_column].to_numpy(str), x, cols, merged, qct, qcols, join)


def target_values(data: Dataset, name: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(values, mask of usable rows, rows dropped) for a clinical column; non-numeric and NaN rows drop."""
    # a clinical column that shares its name with a feature-table column was suffixed by the join
    column = f"{name}_clinical" if f"{name}_clinical" in data.clinical.columns else name
    if column not in data.clinical.columns:
        raise RegressionError(f"clinical table has no column '{name}'")
    values = pd.to_numeric(data.clinical[column], errors="coerce").to_numpy(float)
    mask = np.isfinite(values)
    return values, mask, int((~mask).sum())


def check_patients(n_groups: int, folds: int, what: str) -> None:
    """Every outer training fold needs two patients for the inner search, and every fold one test patient."""
    if n_groups < folds or n_groups - -(-n_groups // folds) < 2:
        need = max(folds, 3)
        raise RegressionError(f"{what}: {n_groups} patients; --folds {folds} needs at least {need}")


def outer_folds(groups: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold number per row; all rows of a group share a fold."""
    from sklearn.model_selection import GroupKFold

    check_patients(len(np.unique(groups)), folds, "the joined tables")
    fold = np.empty(len(groups), int)
    for k, (_, test) in enumerate(GroupKFold(folds, shuffle=True, random_state=seed).split(groups, groups=groups)):
        fold[test] = k
    return fold


def _inner_cv(groups: np.ndarray, seed: int):
    from sklearn.model_selection import GroupKFold

    return GroupKFold(min(3, len(np.unique(groups))), shuffle=True, random_state=seed)


def fit_regressor(x: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int):
    """Scaling, optional PCA and ridge, hyper-parameters chosen by grouped inner CV on (x, y) only."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    pipe = Pipeline([("scale", StandardScaler()), ("pca", "passthrough"), ("model", Ridge())])
    n_comp = max(1, min(x.shape[1], len(np.unique(groups)) // 2) // 2)
    grid = [{"pca": ["passthrough"], "model__alpha": RIDGE_ALPHAS}]
    if x.shape[1] > 2 and n_comp < x.shape[1]:
        grid.append({"pca": [PCA(n_comp, random_state=seed)], "model__alpha": RIDGE_ALPHAS})
    search = GridSearchCV(pipe, grid, cv=_inner_cv(groups, seed), scoring="neg_mean_squared_error")
    with _quiet():
        return search.fit(x, y, groups=groups).best_estimator_


def fit_classifier(x: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int):
    """Scaling and multinomial logistic regression, C chosen by grouped inner CV."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    pipe = Pipeline([("scale", StandardScaler()), ("model", LogisticRegression(max_iter=2000))])
    search = GridSearchCV(pipe, {"model__C": LOGISTIC_CS}, cv=_inner_cv(groups, seed), scoring="balanced_accuracy")
    with _quiet():
        return search.fit(x, y, groups=groups).best_estimator_


class MeanModel:
    """The baseline that predicts the training mean."""

    def fit(self, x, y, groups=None):
        self.mean_ = float(np.mean(y))
        return self

    def predict(self, x):
        return np.full(len(x), self.mean_)


def regression_scores(y: np.ndarray, pred: np.ndarray, fold: np.ndarray, groups: np.ndarray, seed: int) -> dict:
    """R^2 (mean and sd over folds, 95 % patient-bootstrap interval over out-of-fold predictions), MAE, r, n."""
    from sklearn.metrics import r2_score

    if len(y) < 2:
        raise RegressionError("fewer than two predictions to score")
    per_fold = [r2_score(y[fold == k], pred[fold == k]) for k in np.unique(fold) if (fold == k).sum() > 1]
    rng = np.random.default_rng(seed)
    uniq, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(uniq))]
    boot = []
    for _ in range(BOOTSTRAP):  # resample patients, not rows: rows of one patient are not independent
        rows = np.concatenate([members[g] for g in rng.integers(0, len(uniq), len(uniq))])
        if np.ptp(y[rows]) > 0:
            boot.append(r2_score(y[rows], pred[rows]))
    r = float(np.corrcoef(y, pred)[0, 1]) if np.std(pred) > 0 and np.std(y) > 0 else 0.0
    return {
        "r2": float(np.mean(per_fold)),
        "r2_sd": float(np.std(per_fold, ddof=1)) if len(per_fold) > 1 else 0.0,
        "r2_ci": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))] if boot else [None, None],
        "r2_pooled": float(r2_score(y, pred)),  # over all out-of-fold predictions at once: steadier on small folds
        "mae": float(np.mean(np.abs(y - pred))),
        "pearson_r": r,
        "n": int(len(y)),
    }


def gold_scores(true: np.ndarray, pred: np.ndarray) -> dict:
    from sklearn.metrics import balanced_accuracy_score, cohen_kappa_score, confusion_matrix

    true, pred = np.asarray(true, int), np.asarray(pred, int)
    with _quiet():
        balanced = float(balanced_accuracy_score(true, pred))
        kappa = float(cohen_kappa_score(true, pred, weights="quadratic", labels=list(range(5))))
    return {
        "accuracy": float(np.mean(true == pred)),
        "within_one": float(np.mean(np.abs(true - pred) <= 1)),
        "balanced_accuracy": balanced,
        "quadratic_kappa": kappa if np.isfinite(kappa) else 0.0,
        "confusion": confusion_matrix(true, pred, labels=list(range(5))).tolist(),
        "n": int(len(true)),
    }
