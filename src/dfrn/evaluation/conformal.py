"""Conformal prediction intervals from cross-validation: CV+ (Barber et al. 2021).

For a new input x, fold networks mu_{-k} (each trained without fold k) and, for every
training subject i, its out-of-fold absolute residual R_i = |y_i - mu_{-k(i)}(x_i)|:

* lower = the floor(alpha (n + 1))-th smallest of {mu_{-k(i)}(x) - R_i} (-inf when that
  rank is below 1);
* upper = the ceil((1 - alpha)(n + 1))-th smallest of {mu_{-k(i)}(x) + R_i} (+inf when that
  rank is above n);

with alpha = 1 - coverage. The interval covers a new exchangeable subject's y with
probability at least 1 - 2 alpha, and about 1 - alpha in practice (Barber, Candès, Ramdas &
Tibshirani, "Predictive inference with the jackknife+", Ann. Statist. 2021, Theorem 4).
This is MAPIE's cross-conformal "plus" method.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from dfrn.errors import DfrnInputError

__all__ = ["check_coverage", "cv_plus_interval", "cv_plus_ranks"]


def check_coverage(coverage: float, option: str = "--coverage") -> float:
    """``coverage`` as a float in (0, 1); a one-line error otherwise."""
    value = float(coverage)
    if not 0.0 < value < 1.0:
        raise DfrnInputError(
            f"{option} must be between 0 and 1 (exclusive), e.g. 0.9; got {coverage:g}"
        )
    return value


def cv_plus_ranks(n: int, coverage: float) -> tuple[int, int]:
    """The 1-based ranks ``(lo, hi)`` of CV+'s bounds among ``n`` residuals.

    ``lo = floor(alpha (n + 1))`` and ``hi = ceil((1 - alpha)(n + 1))`` with alpha =
    1 - coverage; products within 1e-9 of an integer count as that integer (so 0.9 × 10 is
    9, not 10 by floating-point error).
    """
    alpha = 1.0 - check_coverage(coverage)
    lo_x, hi_x = alpha * (n + 1), (1.0 - alpha) * (n + 1)
    lo = math.floor(lo_x + 1e-9)
    hi = math.ceil(hi_x - 1e-9)
    return lo, hi


def cv_plus_interval(fold_predictions: Sequence[np.ndarray], residuals: Sequence[np.ndarray],
                     coverage: float) -> tuple[np.ndarray, np.ndarray]:
    """CV+ bounds for new inputs (module docstring).

    Parameters
    ----------
    fold_predictions : sequence of array (m,)
        Per fold k, mu_{-k} of the m new inputs.
    residuals : sequence of array (n_k,)
        Per fold k, the absolute residuals of its held-out subjects under mu_{-k}.
    coverage : float
        1 - alpha, in (0, 1).

    Returns
    -------
    (lower, upper) : arrays (m,)
        Infinite where the calibration set is too small for the coverage.
    """
    if len(fold_predictions) != len(residuals) or not fold_predictions:
        raise ValueError("one residual array per fold prediction is needed")
    mu = [np.asarray(p, dtype=np.float64) for p in fold_predictions]
    res = [np.abs(np.asarray(r, dtype=np.float64)) for r in residuals]
    low = np.concatenate([m[:, None] - r[None, :] for m, r in zip(mu, res, strict=True)], axis=1)
    high = np.concatenate([m[:, None] + r[None, :] for m, r in zip(mu, res, strict=True)], axis=1)
    n = low.shape[1]
    lo, hi = cv_plus_ranks(n, coverage)
    m = low.shape[0]
    lower = np.sort(low, axis=1)[:, lo - 1] if lo >= 1 else np.full(m, -np.inf)
    upper = np.sort(high, axis=1)[:, hi - 1] if hi <= n else np.full(m, np.inf)
    return lower, upper
