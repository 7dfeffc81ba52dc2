"""Clinical measures and GOLD stage from latent features: grouped cross-validation with baselines. No torch here.

The input is the feature table of ``hagan-clinic encode`` (any table with an ID column and feature columns works)
and a clinical table keyed by the same ID. Rows are series; a patient with several series is one group, so no
patient ever sits in both a training and a test fold. Hyper-parameters (PCA or none, the ridge penalty, the
logistic C) are chosen by an inner grouped cross-validation inside each training fold only, so the outer folds
score a procedure that never saw their patients.

Every target is scored on the same folds and the same rows by the model and by its baselines: the training-fold
mean, and (when the feature table has them) the QCT columns alone. The headline R^2 is the pooled R^2 of all
out-of-fold predictions, its interval a percentile bootstrap of patients drawn alike for the model and every
baseline (:class:`PairedScorer`). A user sees at once whether the deep features add anything.
"""

from __future__ import annotations

import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .errors import HaganError, short_repr

QCT_COLUMNS = ("laa950_pct", "perc15_hu", "lung_volume_ml")
RIDGE_ALPHAS = tuple(10.0 ** np.arange(-3, 4.5, 0.5))
LOGISTIC_CS = (0.001, 0.01, 0.1, 1.0, 10.0)
BOOTSTRAP = 1000
# Targets that are ratios in [0, 1] (FEV1/FVC); given in percent (every value in (1.5, 150]) they are divided by 100
# with a note, and a mix of the two is refused.
RATIO_TARGETS = ("fev1_fvc",)
# GOLD codes: stages 0-4 and PRISm (preserved ratio, impaired spirometry: FEV1/FVC >= 0.70 with FEV1 % predicted
# < 80), which is no GOLD stage. A clinical GOLD column may hold PRISm as -1 or as the text "PRISm".
PRISM = -1
GOLD_CODES = (0, 1, 2, 3, 4, PRISM)
GOLD_LABELS = ("0", "1", "2", "3", "4", "PRISm")
# Feature and target values beyond this magnitude are refused: no clinical measure or latent feature comes near it,
# and squares of larger values (R^2, scaling, ridge) overflow or swamp float64.
MAX_ABS_VALUE = 1e12
MAX_SEED = 2**32 - 1  # sklearn's random_state and numpy's legacy seeding take 32-bit seeds


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
    """GOLD code by the spirometric rules: FEV1/FVC (a ratio) < 0.70 is obstruction, graded 1..4 by FEV1 % predicted
    (>= 80, >= 50, >= 30, < 30); without obstruction, 0 when FEV1 % predicted >= 80, else PRISM."""
    fev1pp, ratio = np.asarray(fev1pp, float), np.asarray(fev1_fvc, float)
    grade = np.select([fev1pp >= 80, fev1pp >= 50, fev1pp >= 30], [1, 2, 3], 4)
    return np.where(ratio >= 0.70, np.where(fev1pp >= 80, 0, PRISM), grade).astype(int)


def gold_labels(codes) -> np.ndarray:
    """GOLD codes (NaN = none) as a table column: 0-4 as integers, PRISM as "PRISm", NaN kept."""
    codes = np.asarray(codes, float)
    out = np.full(len(codes), np.nan, dtype=object)
    known = np.isfinite(codes)
    out[known] = [GOLD_LABELS[-1] if c == PRISM else int(c) for c in codes[known]]
    return out


def as_ratio(name: str, values: np.ndarray) -> tuple[np.ndarray, str | None]:
    """A ratio target (RATIO_TARGETS) as a ratio: (values, note). Every finite value in (1.5, 150] means percent
    (divided by 100, with a note); values on both sides of 1.5, or above 150, are refused."""
    finite = values[np.isfinite(values)]
    if not finite.size or finite.max() <= 1.5:
        return values, None
    if finite.max() > 150:
        raise RegressionError(f"'{name}' has values up to {finite.max():g}: neither a ratio nor a percentage")
    if finite.min() <= 1.5:
        raise RegressionError(f"'{name}' mixes ratios (<= 1.5) and percentages (> 1.5): give one or the other")
    return values / 100.0, f"{name} was given in percent ({finite.min():g} to {finite.max():g}): divided by 100"


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


def check_magnitude(values: np.ndarray, what: str) -> None:
    """Refuse finite values beyond +-MAX_ABS_VALUE in ``values`` (N,) or (N, k), naming ``what`` and one value.
    Non-finite values are missing values and are left to the caller (dropped and counted)."""
    big = np.isfinite(values) & (np.abs(np.nan_to_num(values)) > MAX_ABS_VALUE)
    if big.any():
        raise RegressionError(
            f"{what} holds {values[big].flat[0]:g}, beyond +-{MAX_ABS_VALUE:g}: correct or remove such values"
        )


def constant(values: np.ndarray) -> bool:
    """True when ``values`` (finite) have no spread that float64 arithmetic can score: R^2 is then undefined."""
    values = np.asarray(values, float)
    if values.size < 2:
        return True
    spread = float(np.ptp(values))
    return spread == 0 or spread <= 1e-12 * float(np.max(np.abs(values)))


def first_bad(column: pd.Series, bad: np.ndarray) -> str:
    """A short quote of the first present value of ``column`` flagged in ``bad``, for a message ('' if none)."""
    present = bad & column.notna().to_numpy()
    if not present.any():
        return ""
    value = column.to_numpy()[present][0]
    return f" (e.g. {short_repr(value.item() if isinstance(value, np.generic) else value, 30)})"


def feature_columns(table: pd.DataFrame, pattern: str) -> list[str]:
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise RegressionError(f"--feature-regex {short_repr(pattern)} is not a regular expression ({err})") from None
    cols = [c for c in table.columns if regex.fullmatch(str(c))]
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
    for k, col in enumerate(cols):
        check_magnitude(x[:, k], f"feature column {short_repr(str(col))}")
    keep = np.isfinite(x).all(axis=1)
    join["feature_rows_dropped"] = int((~keep).sum())  # non-numeric or missing features
    merged, x = merged[keep].reset_index(drop=True), x[keep]
    qcols = [c for c in QCT_COLUMNS if c in features.columns]
    qct = None
    if qcols:
        qct = merged[qcols].apply(pd.to_numeric, errors="coerce").to_numpy(float)
        for k, col in enumerate(qcols):
            check_magnitude(qct[:, k], f"QCT column '{col}'")
    return Dataset(merged[id_column].to_numpy(str), x, cols, merged, qct, qcols, join)


def _clinical_column(data: Dataset, name: str) -> pd.Series:
    # a clinical column that shares its name with a feature-table column was suffixed by the join
    column = f"{name}_clinical" if f"{name}_clinical" in data.clinical.columns else name
    if column not in data.clinical.columns:
        raise RegressionError(f"clinical table has no column '{name}'")
    return data.clinical[column]


def target_values(data: Dataset, name: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(values, mask of usable rows, rows dropped) for a clinical column; non-numeric and NaN rows drop. A ratio
    target (RATIO_TARGETS) in percent comes back as a ratio: see :func:`clinical_target` for the note."""
    values, rows, dropped, _ = clinical_target(data, name)
    return values, rows, dropped


def clinical_target(data: Dataset, name: str) -> tuple[np.ndarray, np.ndarray, int, str | None]:
    """(values, mask of usable rows, rows dropped, note on a unit conversion or None)."""
    values = pd.to_numeric(_clinical_column(data, name), errors="coerce").to_numpy(float)
    check_magnitude(values, f"{short_repr(name)}")
    mask = np.isfinite(values)
    note = None
    if name in RATIO_TARGETS:
        values, note = as_ratio(name, values)
    return values, mask, int((~mask).sum()), note


def gold_values(data: Dataset, name: str) -> tuple[np.ndarray, int]:
    """(GOLD codes, NaN where unusable; rows dropped): 0-4, and PRISm written as -1 or "PRISm" (any case)."""
    column = _clinical_column(data, name)
    text = column.astype(str).str.strip().str.lower()
    codes = pd.to_numeric(column, errors="coerce").to_numpy(float, copy=True)
    codes[text.to_numpy() == "prism"] = PRISM
    codes[~np.isin(codes, GOLD_CODES)] = np.nan
    return codes, int(np.isnan(codes).sum())


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
    """The baseline that predicts the training mean (of whatever scale it is fitted on)."""

    def fit(self, x, y, groups=None):
        self.mean_ = float(np.mean(y))
        return self

    def predict(self, x):
        return np.full(len(x), self.mean_)


# ---------------------------------------------------------------- scores of one target
def percentile_interval(estimate: float, draws: np.ndarray) -> tuple[list, str | None]:
    """95 % percentile interval of bootstrap ``draws`` (NaN = unusable resample) and a note when ``estimate`` lies
    outside it (it then sits in an extreme 2.5 % tail of its own resampling distribution: said, never hidden)."""
    valid = draws[np.isfinite(draws)]
    if valid.size < 2:
        return [None, None], f"{valid.size} usable patient resamples: no interval"
    low, high = (float(v) for v in np.percentile(valid, [2.5, 97.5]))
    if low <= estimate <= high:
        return [low, high], None
    share = float(np.mean(valid < estimate) if estimate < low else np.mean(valid > estimate))
    side = "below" if estimate < low else "above"
    return [low, high], f"the estimate lies {side} its interval ({100 * share:.1f} % of resamples lie beyond it)"


class PairedScorer:
    """Scores predictions of one target on fixed rows (pooled R^2, its patient-bootstrap interval, R^2 per fold,
    MAE, Pearson r). Every predictor is resampled with the same patients, so intervals of differences are paired.

    ``y`` (N,) and every prediction are on the target's own scale; ``log`` adds R^2 of the log-scale predictions
    against log(y) (``r2_log``). A resample is a draw of patients with replacement (rows of one patient are not
    independent); resamples whose rows all share one value have no R^2 and are left out.
    """

    def __init__(self, y: np.ndarray, fold: np.ndarray, groups: np.ndarray, seed: int, log: bool = False):
        if constant(y):
            raise RegressionError(f"{len(y)} rows with {len(np.unique(y))} distinct value(s): R^2 is undefined")
        self.y, self.fold, self.log = np.asarray(y, float), np.asarray(fold), log
        _, self.patient = np.unique(groups, return_inverse=True)
        n_patients = int(self.patient.max()) + 1
        drawn = np.random.default_rng(seed).integers(0, n_patients, (BOOTSTRAP, n_patients))
        self.counts = np.zeros((BOOTSTRAP, n_patients))
        np.add.at(self.counts, (np.arange(BOOTSTRAP)[:, None], drawn), 1)

    def _sum(self, values: np.ndarray) -> np.ndarray:
        """(BOOTSTRAP,) sums of per-row ``values`` over each resample."""
        return self.counts @ np.bincount(self.patient, weights=values, minlength=self.counts.shape[1])

    def r2_draws(self, y: np.ndarray, pred: np.ndarray) -> np.ndarray:
        """Pooled R^2 of every resample, from per-patient sums (centred first: no cancellation on large means)."""
        yc = y - y.mean()
        n, sy, syy = self._sum(np.ones_like(y)), self._sum(yc), self._sum(yc**2)
        ss_res, ss_tot = self._sum((y - pred) ** 2), syy - sy**2 / n
        lo, hi = np.full(self.counts.shape[1], np.inf), np.full(self.counts.shape[1], -np.inf)
        np.minimum.at(lo, self.patient, y)
        np.maximum.at(hi, self.patient, y)
        drawn = self.counts > 0  # a resample is constant when its smallest and largest values agree
        constant = np.where(drawn, lo, np.inf).min(axis=1) == np.where(drawn, hi, -np.inf).max(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(constant, np.nan, 1.0 - ss_res / ss_tot)

    def _r2(self, y: np.ndarray, pred: np.ndarray, key: str) -> tuple[dict, np.ndarray]:
        estimate = float(1.0 - np.sum((y - pred) ** 2) / np.sum((y - y.mean()) ** 2))
        draws = self.r2_draws(y, pred)
        ci, note = percentile_interval(estimate, draws)
        return {key: estimate, f"{key}_ci": ci, **({f"{key}_ci_note": note} if note else {})}, draws

    def score(self, pred: np.ndarray, pred_log: np.ndarray | None = None) -> tuple[dict, np.ndarray]:
        """(scores, R^2 of each resample); ``pred_log`` (log-scale predictions) is needed when ``log`` is set.
        Without a fold of two or more distinct values, the per-fold R^2 is undefined: r2_fold_mean and
        r2_fold_sd are then None."""
        from sklearn.metrics import r2_score

        raw = np.asarray(pred, float)
        y, pred = _standardised(self.y, raw)  # R^2 and r are scale-free; squares of 1e-200 would underflow
        scores, draws = self._r2(y, pred, "r2")
        folds = [k for k in np.unique(self.fold) if not constant(y[self.fold == k])]
        per_fold = [float(r2_score(y[self.fold == k], pred[self.fold == k])) for k in folds]
        scores["r2_fold_mean"] = float(np.mean(per_fold)) if per_fold else None
        scores["r2_fold_sd"] = (float(np.std(per_fold, ddof=1)) if len(per_fold) > 1 else 0.0) if per_fold else None
        if self.log:
            scores.update(self._r2(*_standardised(np.log(self.y), np.asarray(pred_log, float)), "r2_log")[0])
        scores["mae"] = float(np.mean(np.abs(self.y - raw)))
        scores["pearson_r"] = float(np.corrcoef(y, pred)[0, 1]) if np.std(pred) > 0 else 0.0
        scores["n"], scores["n_patients"] = int(len(y)), int(self.counts.shape[1])
        return scores, draws

    @staticmethod
    def gain(model: tuple[dict, np.ndarray], baseline: tuple[dict, np.ndarray]) -> tuple[float, list, str | None]:
        """R^2 of the model minus that of a baseline, with the paired interval of the difference."""
        difference = model[0]["r2"] - baseline[0]["r2"]
        ci, note = percentile_interval(difference, model[1] - baseline[1])
        return difference, ci, note


def _standardised(y: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(y, pred) shifted by y's mean and divided by y's largest deviation (no squares, so no underflow)."""
    centre = float(np.mean(y))
    scale = float(np.max(np.abs(y - centre)))
    return (y - centre) / scale, (pred - centre) / scale


# ---------------------------------------------------------------- GOLD
def gold_scores(true: np.ndarray, pred: np.ndarray) -> dict:
    """Exact accuracy, accuracy within one stage, balanced accuracy, quadratic kappa and the confusion matrix of
    GOLD codes (0-4 and PRISM). PRISm is no stage on the 0-4 scale: it is within one stage only of PRISm, and the
    quadratic kappa is computed on the rows where truth and prediction are both GOLD 0-4 (``kappa_n`` of them)."""
    from sklearn.metrics import balanced_accuracy_score, cohen_kappa_score, confusion_matrix

    true, pred = np.asarray(true, int), np.asarray(pred, int)
    staged = (true != PRISM) & (pred != PRISM)
    with _quiet():
        balanced = float(balanced_accuracy_score(true, pred))
        kappa = (
            float(cohen_kappa_score(true[staged], pred[staged], weights="quadratic", labels=list(range(5))))
            if staged.any()
            else 0.0
        )
    return {
        "accuracy": float(np.mean(true == pred)),
        "within_one": float(np.mean(np.where(staged, np.abs(true - pred) <= 1, true == pred))),
        "balanced_accuracy": balanced,
        "quadratic_kappa": kappa if np.isfinite(kappa) else 0.0,
        "kappa_n": int(staged.sum()),
        "labels": list(GOLD_LABELS),
        "confusion": confusion_matrix(true, pred, labels=list(GOLD_CODES)).tolist(),
        "n": int(len(true)),
    }
