"""Percentile bootstrap over subjects for Pearson r of pooled out-of-fold predictions.

One set of resamples serves every r of a factor: each repeat of a model, every model of a
study (paired: the same resampled subjects for all of them) and every CI that dfrn reports
(Table 1, ``cv/metrics.tsv``, Figure 3 and ``cv/comparison.tsv``). The resamples are drawn
from ``[cv] seed``, so a rerun gives the same intervals (Efron & Tibshirani 1993).

What it can show: how much r would vary over cohorts drawn like this one, with the trained
fold models held fixed. What it cannot: the variation from retraining the networks, which the
repeats' sd shows, nor whether a parametric p is valid for pooled out-of-fold predictions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

__all__ = ["Bootstrap", "AlignedPredictions", "align_predictions", "bootstrap_r",
           "repeat_r_ci", "mean_r_ci"]


@dataclass(frozen=True)
class Bootstrap:
    """The resampling plan: ``n_resamples`` draws of the subjects, seeded by ``seed``.

    ``n_resamples = 0`` gives no intervals (NaN bounds).
    """

    n_resamples: int = 2000
    seed: int = 0
    level: float = 0.95

    def indices(self, n_subjects: int) -> np.ndarray:
        """``(n_resamples, n_subjects)`` subject indices, the same for every call with the
        same ``n_subjects``: every model and repeat of a factor shares them."""
        rng = np.random.default_rng(self.seed)
        return rng.integers(0, n_subjects, size=(self.n_resamples, n_subjects))

    def interval(self, values: np.ndarray) -> tuple[float, float]:
        """The percentile interval of a bootstrap distribution (NaN draws left out; NaN
        bounds when fewer than half the draws are defined)."""
        finite = values[np.isfinite(values)]
        if self.n_resamples == 0 or finite.size < max(1, values.size // 2):
            return float("nan"), float("nan")
        tail = 100 * (1 - self.level) / 2
        lo, hi = np.percentile(finite, [tail, 100 - tail])
        return float(lo), float(hi)


@dataclass(frozen=True)
class AlignedPredictions:
    """One factor's pooled out-of-fold predictions, the same subjects in the same order in
    every repeat: arrays of shape ``(n_repeats, n_subjects)``."""

    ids: list[str]
    repeats: list[int]
    y_true: np.ndarray
    y_pred: np.ndarray


def align_predictions(predictions: pd.DataFrame, factor: str,
                      ids: Sequence[str] | None = None) -> AlignedPredictions:
    """``factor``'s rows of a long predictions table, subjects sorted (or in ``ids``' order)
    and aligned across repeats; subjects missing from a repeat (or NaN there) are left out."""
    rows = predictions[predictions["factor"].astype(str) == factor]
    pid = rows["participant_id"].astype(str).to_numpy()
    rep = rows["repeat"].to_numpy(int)
    y_true, y_pred = rows["y_true"].to_numpy(float), rows["y_pred"].to_numpy(float)
    ok = np.isfinite(y_true) & np.isfinite(y_pred)
    repeats = sorted(set(rep.tolist()))
    where = [dict(zip(pid[(rep == r) & ok], np.flatnonzero((rep == r) & ok), strict=True))
             for r in repeats]
    common = set.intersection(*(set(w) for w in where)) if where else set()
    order = sorted(common) if ids is None else [i for i in ids if i in common]
    pos = np.array([[w[i] for i in order] for w in where], dtype=int).reshape(len(where),
                                                                              len(order))
    return AlignedPredictions(order, repeats, y_true[pos], y_pred[pos])


def bootstrap_r(y_true: np.ndarray, y_pred: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Pearson r of each resample (rows of ``idx``); NaN where a resample is constant (all
    values equal: centring would leave rounding residue, not an r)."""
    a = y_true[idx]
    b = y_pred[idx]
    constant = (a.max(axis=1) == a.min(axis=1)) | (b.max(axis=1) == b.min(axis=1))
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    den = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a * b).sum(axis=1) / den
    return np.where(constant | (den == 0), np.nan, r)


def _repeat_draws(aligned: AlignedPredictions, boot: Bootstrap) -> np.ndarray:
    """``(n_repeats, n_resamples)`` bootstrap r of each repeat, on shared resamples."""
    idx = boot.indices(len(aligned.ids))
    return np.stack([bootstrap_r(t, p, idx)
                     for t, p in zip(aligned.y_true, aligned.y_pred, strict=True)])


def repeat_r_ci(predictions: pd.DataFrame, boot: Bootstrap) -> pd.DataFrame:
    """The CI of each repeat's pooled r: columns ``repeat, factor, ci_low, ci_high``."""
    rows = []
    for factor in dict.fromkeys(predictions["factor"].astype(str)):
        aligned = align_predictions(predictions, factor)
        draws = (_repeat_draws(aligned, boot) if boot.n_resamples and aligned.ids
                 else np.full((len(aligned.repeats), 0), np.nan))
        for repeat, d in zip(aligned.repeats, draws, strict=True):
            lo, hi = boot.interval(d)
            rows.append({"repeat": repeat, "factor": factor, "ci_low": lo, "ci_high": hi})
    return pd.DataFrame(rows, columns=["repeat", "factor", "ci_low", "ci_high"])


def mean_r_ci(predictions: pd.DataFrame, boot: Bootstrap) -> pd.DataFrame:
    """The CI of the mean r over repeats (Table 1's last row, Figure 3's error bars).

    Returns
    -------
    DataFrame
        Indexed by factor: ``ci_low``, ``ci_high``.
    """
    rows = []
    for factor in dict.fromkeys(predictions["factor"].astype(str)):
        aligned = align_predictions(predictions, factor)
        lo = hi = float("nan")
        if boot.n_resamples and aligned.ids:
            lo, hi = boot.interval(_repeat_draws(aligned, boot).mean(axis=0))
        rows.append({"factor": factor, "ci_low": lo, "ci_high": hi})
    return pd.DataFrame(rows, columns=["factor", "ci_low", "ci_high"]).set_index("factor")
