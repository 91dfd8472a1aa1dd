"""Is one model better than another on the same folds? Δr with a paired bootstrap CI, and
the corrected resampled t-test on the folds' errors.

Two models cross-validated on the same (repeat, fold) plan are compared twice:

* **Δr** = r_a − r_b of the pooled out-of-fold predictions (mean over repeats, as Table 1),
  with a paired percentile bootstrap CI over subjects (:mod:`dfrn.evaluation.bootstrap`:
  the same resampled subjects for both models and every repeat).
* **The corrected resampled t-test** (Nadeau & Bengio 2003; Bouckaert & Frank 2004 for
  repeated k-fold) on d_j = MSE_b − MSE_a over the J = repeats × folds test folds:
  t = mean(d) / sqrt((1/J + n_test/n_train) · var(d, ddof=1)), df = J − 1, two-sided. The
  folds' training sets overlap, so their scores are not independent and a plain paired
  t-test over folds is anti-conservative (Dietterich 1998); the n_test/n_train term corrects
  for that. It equals ``julearn.stats.corrected_ttest`` (with unequal folds dfrn uses the
  mean sizes where julearn rounds them).

The verdict needs both: "a beats b" when the CI of Δr excludes 0 and the corrected p is
below 0.05 in the same direction. Neither test says why a model is better, and "no
detectable difference" is not evidence that the models are equal.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import special

from dfrn.evaluation.bootstrap import AlignedPredictions, Bootstrap, align_predictions, bootstrap_r

__all__ = ["COMPARISON_COLUMNS", "CorrectedTTest", "ModelPair", "corrected_resampled_ttest", "fold_mse",
           "compare_models", "comparison_verdict"]

COMPARISON_COLUMNS = ["factor", "model_a", "model_b", "n", "r_a", "r_b", "delta_r", "ci_low",
                      "ci_high", "n_scores", "t_corrected", "df", "p_corrected", "verdict"]

#: The fewest (repeat, fold) scores the corrected t-test runs on.
MIN_SCORES = 3


@dataclass(frozen=True)
class CorrectedTTest:
    """The corrected resampled t-test of one pair (NaN with a ``note`` when it cannot run)."""

    t: float
    df: float
    p: float
    n_scores: int
    note: str = ""


def corrected_resampled_ttest(differences: np.ndarray, n_train: float,
                              n_test: float) -> CorrectedTTest:
    """Nadeau & Bengio's corrected resampled t-test of the mean of ``differences``.

    Parameters
    ----------
    differences : array of shape (J,)
        Per-(repeat, fold) score differences, positive where model a is better.
    n_train, n_test : float
        Training and test set sizes (the means over the J splits).

    Returns
    -------
    CorrectedTTest
        Two-sided; ``t = 0, p = 1`` when every difference is 0; NaN (with the reason) for
        fewer than 3 scores.
    """
    d = np.asarray(differences, float)
    j = d.size
    if j < MIN_SCORES:
        return CorrectedTTest(np.nan, np.nan, np.nan, j,
                              f"no corrected t-test: {j} fold score(s), it needs ≥ {MIN_SCORES}")
    mean, var = float(d.mean()), float(d.var(ddof=1))
    if var == 0:
        t = 0.0 if mean == 0 else float(np.copysign(np.inf, mean))
    else:
        t = mean / np.sqrt((1 / j + n_test / n_train) * var)
    p = float(special.stdtr(j - 1, -abs(t)) * 2)
    return CorrectedTTest(float(t), float(j - 1), p, j)


def fold_mse(predictions: pd.DataFrame, factor: str) -> pd.DataFrame:
    """Each (repeat, fold)'s MSE on its test subjects for ``factor``, in target units.

    Returns
    -------
    DataFrame
        Indexed by (repeat, fold): ``mse``, ``n_test`` and ``n_train`` (the repeat's other
        subjects with the factor).
    """
    rows = predictions[predictions["factor"].astype(str) == factor]
    err = (rows["y_pred"].to_numpy(float) - rows["y_true"].to_numpy(float)) ** 2
    splits = np.stack([rows["repeat"].to_numpy(int), rows["fold"].to_numpy(int)], axis=1)
    keys, inverse = np.unique(splits, axis=0, return_inverse=True)
    inverse = inverse.ravel()
    n_test = np.bincount(inverse, minlength=len(keys))
    _, repeat_of = np.unique(keys[:, 0], return_inverse=True)
    per_repeat = np.bincount(repeat_of.ravel(), n_test)[repeat_of.ravel()]
    return pd.DataFrame({"mse": np.bincount(inverse, err, len(keys)) / n_test,
                         "n_test": n_test, "n_train": (per_repeat - n_test).astype(int)},
                        index=pd.MultiIndex.from_arrays(keys.T.reshape(2, -1),
                                                        names=["repeat", "fold"]))


def _delta_r(a: AlignedPredictions, b: AlignedPredictions, boot: Bootstrap
             ) -> tuple[float, float, float, float, float]:
    """r_a, r_b (means over repeats), Δr and its paired bootstrap CI."""
    def r(t: np.ndarray, p: np.ndarray) -> float:
        return float(bootstrap_r(t, p, np.arange(t.size)[None, :])[0])

    r_a = float(np.mean([r(t, p) for t, p in zip(a.y_true, a.y_pred, strict=True)]))
    r_b = float(np.mean([r(t, p) for t, p in zip(b.y_true, b.y_pred, strict=True)]))
    lo = hi = float("nan")
    if boot.n_resamples and np.isfinite(r_a - r_b):
        idx = boot.indices(len(a.ids))
        draws = np.mean([bootstrap_r(ta, pa, idx) - bootstrap_r(tb, pb, idx)
                         for ta, pa, tb, pb in zip(a.y_true, a.y_pred, b.y_true, b.y_pred,
                                                   strict=True)], axis=0)
        lo, hi = boot.interval(draws)
    return r_a, r_b, r_a - r_b, lo, hi


def _mse_test(a: pd.DataFrame, b: pd.DataFrame, factor: str) -> CorrectedTTest:
    """The corrected t on MSE_b − MSE_a over the (repeat, fold) splits both models have."""
    fa, fb = fold_mse(a, factor), fold_mse(b, factor)
    both = fa.index.intersection(fb.index)
    d = (fb.loc[both, "mse"] - fa.loc[both, "mse"]).to_numpy(float)
    return corrected_resampled_ttest(d, float(fa.loc[both, "n_train"].mean()),
                                     float(fa.loc[both, "n_test"].mean()))


@dataclass(frozen=True)
class ModelPair:
    """Two models to compare: their names in the table and in the verdicts' words."""

    a: str
    b: str
    words_a: str
    words_b: str


def _disagreement(ci_side: int, t_side: int, test: CorrectedTTest, pair: ModelPair) -> str:
    """Why the two tests disagree, in words."""
    if ci_side and not t_side:
        return "the Δr CI excludes 0, the corrected t-test does not reject"
    if t_side and not ci_side:
        return "the corrected t-test rejects, the Δr CI includes 0"
    better = {1: pair.words_a, -1: pair.words_b}
    return f"Δr favours {better[ci_side]}, the fold errors {better[t_side]}"


def comparison_verdict(delta_r: float, ci: tuple[float, float], test: CorrectedTTest,
                       pair: ModelPair, alpha: float = 0.05) -> str:
    """The plain-words verdict of one comparison.

    "a beats b" when the CI of Δr excludes 0 and the corrected p is below ``alpha`` in the
    same direction; "b beats a" for the reverse; else "no detectable difference", saying
    when the two disagree; "no verdict: …" when either cannot be computed.
    """
    lo, hi = ci
    if not np.isfinite(delta_r):
        return "no verdict: r is undefined (constant predictions or fewer than 3 subjects)"
    if not np.isfinite(test.p):
        return f"no verdict: {test.note}"
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "no verdict: no bootstrap CI of Δr ([compare] bootstrap = 0)"
    ci_side = 1 if lo > 0 else -1 if hi < 0 else 0
    t_side = int(np.sign(test.t)) if test.p < alpha else 0
    if ci_side and ci_side == t_side:
        return (f"{pair.words_a} beats {pair.words_b}" if ci_side > 0
                else f"{pair.words_b} beats {pair.words_a}")
    if not ci_side and not t_side:
        return "no detectable difference"
    return f"no detectable difference (the tests disagree: {_disagreement(ci_side, t_side, test, pair)})"


def _undefined(r_a: float, r_b: float, pair: ModelPair) -> str:
    """Which model's r is undefined, for the verdict."""
    which = [w for r, w in ((r_a, pair.words_a), (r_b, pair.words_b)) if not np.isfinite(r)]
    return (f"no verdict: r is undefined for {' and '.join(which)} (constant predictions or "
            "fewer than 3 subjects)")


def compare_models(a: pd.DataFrame, b: pd.DataFrame, pair: ModelPair, boot: Bootstrap,
                   factors: list[str]) -> pd.DataFrame:
    """One row of :data:`COMPARISON_COLUMNS` per factor of ``factors`` for ``pair``.

    Parameters
    ----------
    a, b : DataFrame
        The two models' long out-of-fold predictions (same plan, same targets).
    pair : ModelPair
    boot : Bootstrap
        The study's resamples (shared with Table 1's CIs).
    factors : list of str
        Factors both models predicted.
    """
    rows = []
    for factor in factors:
        pa = align_predictions(a, factor)
        pb = align_predictions(b, factor, pa.ids)
        pa = align_predictions(a, factor, pb.ids)  # the subjects both have, in one order
        r_a, r_b, delta, lo, hi = _delta_r(pa, pb, boot)
        test = _mse_test(a, b, factor)
        words = (comparison_verdict(delta, (lo, hi), test, pair) if np.isfinite(delta)
                 else _undefined(r_a, r_b, pair))
        rows.append({"factor": factor, "model_a": pair.a, "model_b": pair.b, "n": len(pa.ids),
                     "r_a": r_a, "r_b": r_b, "delta_r": delta, "ci_low": lo, "ci_high": hi,
                     "n_scores": test.n_scores, "t_corrected": test.t, "df": test.df,
                     "p_corrected": test.p, "verdict": words})
    return pd.DataFrame(rows, columns=COMPARISON_COLUMNS)
