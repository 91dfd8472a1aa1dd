"""Statistics of out-of-fold predictions: Pearson r and p, R², MAE, RMSE, and Table 1.

All functions take a *predictions* table in the long format every evaluation stage of
dfrn writes: one row per (participant_id, repeat, fold, factor) with ``y_true`` and
``y_pred``. Metrics are computed per (repeat, factor) over the pooled out-of-fold
predictions of that repeat, as in the method's Table 1.

Note that the parametric p-value of a Pearson r on pooled out-of-fold predictions is not
strictly valid (the folds' models are not independent); a permutation test
(:mod:`dfrn.models.ridge`) gives a valid one.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats as sps

from dfrn.errors import DfrnInputError
from dfrn.evaluation.bootstrap import Bootstrap, repeat_r_ci

__all__ = [
    "PREDICTION_COLUMNS",
    "METRIC_COLUMNS",
    "compute_metrics",
    "table1",
    "format_r_p",
    "format_ci",
    "format_p",
    "format_sd",
    "readable",
    "mean_r",
    "fold_r",
    "fold_r_summary",
]

PREDICTION_COLUMNS = ["participant_id", "repeat", "fold", "factor", "y_true", "y_pred"]
METRIC_COLUMNS = ["repeat", "factor", "n", "pearson_r", "p_value", "r2", "mae", "rmse"]


def _metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    n = len(y_true)
    if n >= 3 and np.std(y_true) > 0 and np.std(y_pred) > 0:
        res = sps.pearsonr(y_true, y_pred)
        r, p = float(res.statistic), float(res.pvalue)
    else:  # undefined for constant predictions: report it honestly, not as 0
        r, p = float("nan"), float("nan")
    err = y_pred - y_true
    ss_tot = float(np.sum((y_true - y_true.mean()) ** 2))
    r2 = 1.0 - float(np.sum(err**2)) / ss_tot if ss_tot > 0 else float("nan")
    return {
        "n": n,
        "pearson_r": r,
        "p_value": p,
        "r2": r2,
        "mae": float(np.mean(np.abs(err))),
        "rmse": float(np.sqrt(np.mean(err**2))),
    }


def compute_metrics(predictions: pd.DataFrame, boot: Bootstrap | None = None) -> pd.DataFrame:
    """Metrics per (repeat, factor) from a long predictions table.

    With ``boot``, ``ci_low`` and ``ci_high`` give each r's percentile bootstrap CI over
    subjects (:func:`dfrn.evaluation.bootstrap.repeat_r_ci`).
    """
    missing = [c for c in PREDICTION_COLUMNS if c not in predictions.columns]
    if missing:
        raise DfrnInputError(f"predictions table lacks the column(s) {', '.join(missing)}")
    rows = []
    factor_order = list(dict.fromkeys(predictions["factor"]))
    for (repeat, factor), g in predictions.groupby(["repeat", "factor"], sort=False):
        m = _metrics(g["y_true"].to_numpy(float), g["y_pred"].to_numpy(float))
        rows.append({"repeat": int(repeat), "factor": factor, **m})
    out = pd.DataFrame(rows, columns=METRIC_COLUMNS)
    out["factor"] = pd.Categorical(out["factor"], categories=factor_order, ordered=True)
    out = out.sort_values(["repeat", "factor"]).reset_index(drop=True)
    out["factor"] = out["factor"].astype(str)
    if boot is not None:
        out = out.merge(repeat_r_ci(predictions, boot), on=["repeat", "factor"], how="left")
    return out


def format_p(p: float) -> str:
    """A p-value as Table 1 prints it: ``0.012``, ``1.7e-19``, or ``< 1e-300`` for 0.

    A parametric p of exactly 0 is below the smallest double, not zero.
    """
    if not np.isfinite(p):
        return "—"
    if p == 0.0:
        return "< 1e-300"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def format_sd(sd: float) -> str:
    """A standard deviation over repeats, ``—`` when undefined (one repeat)."""
    return f"{sd:.2f}" if np.isfinite(sd) else "—"


def readable(df: pd.DataFrame, digits: int | None = 3) -> pd.DataFrame:
    """A table for reading (the log, the report): p-value columns as :func:`format_p` prints
    them, sd columns as :func:`format_sd`, other numbers rounded to ``digits``.

    Rounding alone would print a p of 1.7e-19 as 0.0, and an undefined sd as nan.
    """
    df = df.copy()
    for col in df.columns:
        name = str(col)
        if name.startswith("p_") or name == "p_value":
            df[col] = [format_p(float(v)) for v in df[col]]
        elif name == "sd" or name.endswith("_sd") or name.startswith("sd_"):
            df[col] = [format_sd(float(v)) for v in df[col]]
    return df.round(digits) if digits is not None else df


def format_r_p(r: float, p: float) -> str:
    """Format a correlation and its p-value as in the paper: ``0.23 (0.012)``."""
    if not np.isfinite(r):
        return "nan"
    return f"{r:.2f} ({format_p(p)})"


def format_ci(low: float, high: float) -> str:
    """A 95% CI as Table 1 prints it: ``[0.12, 0.34]``; empty when undefined."""
    if not (np.isfinite(low) and np.isfinite(high)):
        return ""
    return f" [{low:.2f}, {high:.2f}]"


def table1(metrics: pd.DataFrame, mean_ci: pd.DataFrame | None = None) -> pd.DataFrame:
    """Table 1: one row per repeat plus a ``mean ± sd`` row; one column per factor.

    Each cell of a repeat row is ``"r (p)"``, followed by r's 95% bootstrap CI ``[low,
    high]`` when ``metrics`` has ``ci_low``/``ci_high``; the last row gives the mean ± sd of
    r over repeats, followed by the CI of the mean from ``mean_ci``
    (:func:`dfrn.evaluation.bootstrap.mean_r_ci`).
    """
    factors = list(dict.fromkeys(metrics["factor"]))
    has_ci = {"ci_low", "ci_high"} <= set(metrics.columns)
    rows = []
    for repeat, g in metrics.groupby("repeat", sort=True):
        g = g.set_index("factor")
        row = {"repeat": str(int(repeat))}
        for f in factors:
            cell = format_r_p(g.at[f, "pearson_r"], g.at[f, "p_value"]) if f in g.index else ""
            if cell and has_ci:
                cell += format_ci(g.at[f, "ci_low"], g.at[f, "ci_high"])
            row[f] = cell
        rows.append(row)
    summary = {"repeat": "mean ± sd" + (" [95% CI]" if mean_ci is not None else "")}
    means = mean_r(metrics)
    for f in factors:
        summary[f] = f"{means.at[f, 'mean_r']:.2f} ± {format_sd(means.at[f, 'sd_r'])}"
        if mean_ci is not None and f in mean_ci.index:
            summary[f] += format_ci(mean_ci.at[f, "ci_low"], mean_ci.at[f, "ci_high"])
    rows.append(summary)
    return pd.DataFrame(rows, columns=["repeat", *factors])


def mean_r(metrics: pd.DataFrame) -> pd.DataFrame:
    """Mean and sd over repeats of Pearson r per factor, in the factors' first-seen order.

    The one place that summarises a metrics table (Table 1's last row, Figure 3, the
    ridge-vs-DFRN table, the demo's summary and the permutation tests all use it).

    Parameters
    ----------
    metrics : DataFrame
        Output of :func:`compute_metrics` (``repeat``, ``factor``, ``n``, ``pearson_r``, ...).

    Returns
    -------
    DataFrame
        Indexed by factor, with ``mean_r``, ``sd_r`` (ddof 1; NaN with one repeat: undefined), ``n_repeats``
        and ``n`` (subjects in the first repeat).
    """
    factors = list(dict.fromkeys(metrics["factor"]))
    rows = []
    for f in factors:
        g = metrics[metrics["factor"] == f]
        r = g["pearson_r"].to_numpy(float)
        finite = r[np.isfinite(r)]
        rows.append(
            {
                "factor": f,
                "mean_r": float(finite.mean()) if len(finite) else float("nan"),
                "sd_r": float(finite.std(ddof=1)) if len(finite) > 1 else float("nan"),
                "n_repeats": len(r),
                "n": int(g["n"].iloc[0]),
            }
        )
    return pd.DataFrame(rows).set_index("factor")


FOLD_R_COLUMNS = ["factor", "repeat", "fold", "n", "r"]


def fold_r(predictions: pd.DataFrame) -> pd.DataFrame:
    """Pearson r of each fold's own out-of-fold predictions (its test subjects only).

    Pooled r (:func:`compute_metrics`) correlates all folds' predictions at once, so fold
    models that are offset from one another pull it below every per-fold r; this table
    shows that miscalibration.

    Parameters
    ----------
    predictions : DataFrame
        Long predictions table (:data:`PREDICTION_COLUMNS`), one row per (participant,
        repeat, fold, factor).

    Returns
    -------
    DataFrame
        Columns ``factor, repeat, fold, n, r``, in the factors' first-seen order, then
        repeat and fold. ``r`` is NaN where it is undefined (under 3 test subjects, or
        constant truth or predictions), as in :func:`compute_metrics`.

    Raises
    ------
    DfrnInputError
        When a column is missing.
    """
    missing = [c for c in PREDICTION_COLUMNS if c not in predictions.columns]
    if missing:
        raise DfrnInputError(f"predictions table lacks the column(s) {', '.join(missing)}")
    order = {f: k for k, f in enumerate(dict.fromkeys(predictions["factor"]))}
    rows = []
    for (factor, repeat, fold), g in predictions.groupby(["factor", "repeat", "fold"]):
        m = _metrics(g["y_true"].to_numpy(float), g["y_pred"].to_numpy(float))
        rows.append({"factor": factor, "repeat": int(repeat), "fold": int(fold), "n": m["n"],
                     "r": m["pearson_r"]})
    out = pd.DataFrame(rows, columns=FOLD_R_COLUMNS)
    out = out.assign(rank=out["factor"].map(order)).sort_values(["rank", "repeat", "fold"])
    return out.drop(columns="rank").reset_index(drop=True)


def fold_r_summary(folds: pd.DataFrame, metrics: pd.DataFrame) -> pd.DataFrame:
    """Per factor: pooled r (mean over repeats) beside the per-fold r (mean, min, max).

    Parameters
    ----------
    folds : DataFrame
        Output of :func:`fold_r`.
    metrics : DataFrame
        Output of :func:`compute_metrics` (the pooled r per repeat).

    Returns
    -------
    DataFrame
        One row per factor: ``factor, pooled_r, fold_r_mean, fold_r_min, fold_r_max,
        n_folds`` (folds with a defined r, over all repeats).
    """
    pooled = mean_r(metrics)["mean_r"]
    rows = []
    for factor in dict.fromkeys([*pooled.index, *folds["factor"]]):
        r = folds.loc[folds["factor"] == factor, "r"].to_numpy(float)
        r = r[np.isfinite(r)]
        rows.append({
            "factor": factor,
            "pooled_r": float(pooled.get(factor, np.nan)),
            "fold_r_mean": float(r.mean()) if r.size else np.nan,
            "fold_r_min": float(r.min()) if r.size else np.nan,
            "fold_r_max": float(r.max()) if r.size else np.nan,
            "n_folds": int(r.size),
        })
    return pd.DataFrame(rows, columns=["factor", "pooled_r", "fold_r_mean", "fold_r_min",
                                       "fold_r_max", "n_folds"])
