"""What out-of-fold predictions add beyond the covariates (age, sex, site, head size …).

A model that predicts a symptom score from a scan may only be reading the covariates from
the scan: T1 images encode age, sex, site and head size strongly, and symptom scores
correlate with them in most cohorts. Following Dinga et al. (2020) and More et al. (2021),
each model's pooled out-of-fold predictions ``ŷ`` of one repeat are judged against the
covariates ``C`` (encoded, with an intercept) on the target ``y``:

* **partial r** ``r(y, ŷ | C)``: the correlation of the residuals of ``y ~ C`` and ``ŷ ~ C``,
  with its parametric p (t-test with ``n - 2 - rank(C)`` degrees of freedom; equal to the
  p of ``ŷ``'s coefficient in the OLS fit ``y ~ C + ŷ``);
* **ΔR²**: the R² of ``y ~ C + ŷ`` minus that of ``y ~ C``;
* **a permutation p for ΔR²** by Freedman–Lane (Freedman & Lane 1983; Winkler et al. 2014):
  the residuals of ``y ~ C`` are permuted and added back to its fitted values, both models
  are refitted, and ΔR² is recomputed. No network is retrained, so 1,000 permutations cost
  seconds.

What this can show: whether ``ŷ`` carries information about ``y`` that a *linear* function
of the covariates does not, in this cohort. What it cannot show: that the information is
free of covariate effects the linear model misses (non-linear age effects, site × age), or
that it generalises to other sites. The covariates-only model (:func:`cross_validate_covariates`)
is cross-validated in the same folds; its r is the bar the brain has to clear.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats as sps

from dfrn.evaluation.folds import iter_splits
from dfrn.evaluation.metrics import PREDICTION_COLUMNS, format_p

__all__ = [
    "CONFOUND_COLUMNS",
    "IncrementalValue",
    "incremental_value",
    "confound_table",
    "summarise_confounds",
    "cross_validate_covariates",
    "raw_target_predictions",
    "verdict",
    "ALPHA",
]

CONFOUND_COLUMNS = [
    "repeat", "factor", "model", "n", "r", "r_partial", "p_partial", "delta_r2",
    "p_delta_r2_permutation",
]
#: The significance level of the plain-words verdicts.
ALPHA = 0.05


@dataclass(frozen=True)
class IncrementalValue:
    """What one prediction vector adds beyond the covariates (see the module docstring)."""

    n: int
    r: float
    r_partial: float
    p_partial: float
    delta_r2: float
    p_delta_r2_permutation: float


def _basis(c: np.ndarray) -> np.ndarray:
    """An orthonormal basis of the column space of ``[1, C]`` (rank-revealing SVD)."""
    design = np.column_stack([np.ones(len(c)), c])
    u, s, _ = np.linalg.svd(design, full_matrices=False)
    return u[:, s > s[0] * max(design.shape) * np.finfo(float).eps]


def _residual(q: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Residuals of ``y`` (one or many columns) after projecting on the basis ``q``."""
    return y - q @ (q.T @ y)


def _delta_r2(q_red: np.ndarray, q_full: np.ndarray, y: np.ndarray) -> np.ndarray:
    """ΔR² of the full over the reduced model for each column of ``y``."""
    centred = y - y.mean(axis=0)
    tss = np.sum(centred**2, axis=0)
    rss_red = np.sum(_residual(q_red, y) ** 2, axis=0)
    rss_full = np.sum(_residual(q_full, y) ** 2, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tss > 0, (rss_red - rss_full) / tss, np.nan)


def incremental_value(
    y: np.ndarray, y_hat: np.ndarray, c: np.ndarray, n_perm: int = 1000, seed: int = 0
) -> IncrementalValue:
    """Partial r, ΔR² and the Freedman–Lane permutation p of ``y_hat`` beyond ``c``.

    Parameters
    ----------
    y, y_hat : ndarray of shape (n,)
        Target and out-of-fold predictions.
    c : ndarray of shape (n, q)
        Encoded covariates (an intercept is added).
    n_perm : int, default 1000
        Permutations (0: no permutation p, NaN).
    seed : int, default 0

    Returns
    -------
    IncrementalValue
        NaN statistics when they are undefined (constant ``y`` or ``y_hat``, or ``y_hat`` a
        linear function of the covariates).
    """
    y, y_hat = np.asarray(y, float), np.asarray(y_hat, float)
    n = len(y)
    r = float(np.corrcoef(y, y_hat)[0, 1]) if np.std(y) > 0 and np.std(y_hat) > 0 else np.nan
    q_red = _basis(np.asarray(c, float).reshape(n, -1))
    e_y, e_hat = _residual(q_red, y), _residual(q_red, y_hat)
    df = n - q_red.shape[1] - 1
    if df < 1 or np.sum(e_hat**2) <= 1e-12 * max(np.sum((y_hat - y_hat.mean()) ** 2), 1e-300):
        return IncrementalValue(n, r, np.nan, np.nan, np.nan, np.nan)
    r_partial = float(np.dot(e_y, e_hat) / np.sqrt(np.dot(e_y, e_y) * np.dot(e_hat, e_hat)))
    t = r_partial * np.sqrt(df / max(1.0 - r_partial**2, 1e-300))
    p_partial = float(2 * sps.t.sf(abs(t), df))
    q_full = _basis(np.column_stack([c, y_hat]) if np.size(c) else y_hat[:, None])
    observed = float(_delta_r2(q_red, q_full, y[:, None])[0])
    p_perm = np.nan
    if n_perm > 0:
        rng = np.random.default_rng(seed)
        fitted = y - e_y
        perms = np.stack([rng.permutation(n) for _ in range(n_perm)], axis=1)
        y_star = fitted[:, None] + e_y[perms]  # (n, n_perm)
        null = _delta_r2(q_red, q_full, y_star)
        p_perm = float((1 + np.sum(null >= observed - 1e-12)) / (n_perm + 1))
    return IncrementalValue(n, r, r_partial, p_partial, observed, p_perm)


def confound_table(
    predictions: dict[str, pd.DataFrame],
    design: pd.DataFrame,
    n_perm: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """The ``cv/confounds.tsv`` table: every model's value beyond the covariates.

    Parameters
    ----------
    predictions : dict of str to DataFrame
        Per model (``dfrn``, ``ridge``, ``covariates``), pooled out-of-fold predictions in the
        long format, with ``y_true`` the *raw* target (see :func:`raw_target_predictions`).
    design : DataFrame
        Encoded covariates indexed by participant_id.
    n_perm : int, default 1000
    seed : int, default 0
        The same permutations are used for every model and factor of a repeat.

    Returns
    -------
    DataFrame
        Columns :data:`CONFOUND_COLUMNS`, one row per (repeat, factor, model). For the
        covariates-only model the beyond-the-covariates columns are NaN: its inputs *are*
        the covariates.
    """
    rows = []
    for model, pred in predictions.items():
        for (repeat, factor), g in pred.groupby(["repeat", "factor"], sort=False):
            y, y_hat = g["y_true"].to_numpy(float), g["y_pred"].to_numpy(float)
            c = design.loc[g["participant_id"].astype(str)].to_numpy(float)
            if model == "covariates":
                value = incremental_value(y, y_hat, c[:, :0], 0)
                value = IncrementalValue(value.n, value.r, np.nan, np.nan, np.nan, np.nan)
            else:
                value = incremental_value(y, y_hat, c, n_perm, seed + int(repeat))
            rows.append({"repeat": int(repeat), "factor": str(factor), "model": model,
                         **value.__dict__})
    return pd.DataFrame(rows, columns=CONFOUND_COLUMNS)


def summarise_confounds(table: pd.DataFrame) -> pd.DataFrame:
    """Per (factor, model): means over repeats and the median permutation p.

    Returns
    -------
    DataFrame
        Columns ``factor, model, n_repeats, r, r_partial, delta_r2, sd_delta_r2, p_partial,
        p_delta_r2_permutation`` (means of r, partial r and ΔR²; sd of ΔR² with ddof 1, NaN
        over one repeat; medians of the p-values over repeats), in the factors' and models'
        first-seen order.
    """
    rows = []
    factors = list(dict.fromkeys(table["factor"]))
    models = list(dict.fromkeys(table["model"]))
    table = table.assign(_f=table["factor"].map(factors.index), _m=table["model"].map(models.index))
    for (_, _, factor, model), g in table.groupby(["_f", "_m", "factor", "model"], sort=True):
        d = g["delta_r2"].to_numpy(float)
        rows.append({
            "factor": factor, "model": model, "n_repeats": len(g),
            "r": g["r"].mean(), "r_partial": g["r_partial"].mean(), "delta_r2": g["delta_r2"].mean(),
            "sd_delta_r2": float(np.std(d, ddof=1)) if len(d) > 1 else np.nan,
            "p_partial": _median(g["p_partial"]),
            "p_delta_r2_permutation": _median(g["p_delta_r2_permutation"]),
        })
    return pd.DataFrame(rows)


def _median(values: pd.Series) -> float:
    """The median of the values given, NaN when there are none (the covariates-only model has
    no p-values), without NumPy's "Mean of empty slice" warning in the user's log."""
    given = values.dropna()
    return float(given.median()) if len(given) else np.nan


def verdict(row: pd.Series, covariates: str, model: str = "the network") -> str:
    """A plain-words verdict for one row of :func:`summarise_confounds`.

    Parameters
    ----------
    row : Series
        With ``delta_r2``, ``p_delta_r2_permutation``, ``p_partial`` and ``n_repeats``.
    covariates : str
        The covariates in words (``"age, sex and site"``).
    model : str
        Who made the predictions, in words.
    """
    d, p = float(row["delta_r2"]), float(row["p_delta_r2_permutation"])
    which = "permutation p"
    if not np.isfinite(p):
        p, which = float(row["p_partial"]), "parametric p"
    over = f", median over {int(row['n_repeats'])} repeats" if int(row["n_repeats"]) > 1 else ""
    if not np.isfinite(d):
        return f"{model}'s predictions cannot be judged beyond {covariates} (undefined)"
    stats = f"ΔR² = {d:.2f}, {which} = {format_p(p)}{over}"
    if np.isfinite(p) and p < ALPHA:
        return f"{model}'s predictions add {stats} beyond {covariates}"
    return f"{model}'s predictions add nothing detectable beyond {covariates} ({stats})"


def cross_validate_covariates(
    design: pd.DataFrame,
    targets: Callable[[int, int, Sequence[str], Sequence[str]], tuple[pd.DataFrame, pd.DataFrame]],
    plan: pd.DataFrame,
) -> pd.DataFrame:
    """The covariates-only model: OLS ``y ~ 1 + C`` per training fold, in the study's folds.

    Parameters
    ----------
    design : DataFrame
        Encoded covariates indexed by participant_id.
    targets : TargetProvider
        The raw targets of each split.
    plan : DataFrame
        The fold plan.

    Returns
    -------
    DataFrame
        Out-of-fold predictions in the long format (:data:`PREDICTION_COLUMNS`).
    """
    from sklearn.linear_model import LinearRegression

    frames = []
    for repeat, fold, train, test in iter_splits(plan):
        y_train, y_test = targets(repeat, fold, train, test)
        for factor in y_train.columns:
            tr, te = y_train[factor].dropna(), y_test[factor].dropna()
            if not len(te):
                continue
            lr = LinearRegression().fit(design.loc[list(tr.index)].to_numpy(float), tr.to_numpy(float))
            pred = lr.predict(design.loc[list(te.index)].to_numpy(float))
            frames.append(pd.DataFrame({
                "participant_id": list(te.index), "repeat": repeat, "fold": fold,
                "factor": factor, "y_true": te.to_numpy(float), "y_pred": pred,
            }))
    return _ordered(pd.concat(frames, ignore_index=True)) if frames else pd.DataFrame(
        columns=PREDICTION_COLUMNS)


def _ordered(df: pd.DataFrame) -> pd.DataFrame:
    return df[PREDICTION_COLUMNS]


def raw_target_predictions(
    predictions: pd.DataFrame,
    targets: Callable[[int, int, Sequence[str], Sequence[str]], tuple[pd.DataFrame, pd.DataFrame]],
    plan: pd.DataFrame,
) -> pd.DataFrame:
    """``predictions`` with ``y_true`` replaced by each split's raw target.

    With ``[confounds] target = "residualize"`` the models are evaluated on fold residuals;
    the beyond-the-covariates analysis asks about the raw target, so each row's raw value
    is taken from the provider's test targets of its (repeat, fold).

    Raises
    ------
    KeyError
        When a prediction row's subject is not a test subject of its split.
    """
    raw: dict[tuple[int, int, str], float] = {}
    for repeat, fold, train, test in iter_splits(plan):
        _, y_test = targets(repeat, fold, train, test)
        for factor in y_test.columns:
            for pid, v in y_test[factor].items():
                raw[(repeat, fold, f"{factor}\0{pid}")] = float(v)
    out = predictions.copy()
    out["y_true"] = [
        raw[(int(r), int(f), f"{fa}\0{p}")]
        for r, f, fa, p in zip(out["repeat"], out["fold"], out["factor"],
                               out["participant_id"].astype(str), strict=True)
    ]
    return out
