"""How many factors rating-scale items support: Kaiser, parallel analysis and Velicer's MAP.

Three criteria, each computed on the items' Pearson correlation matrix (complete rows,
items standardised), as ``psych`` computes them for principal components:

* **Kaiser**: the number of eigenvalues greater than 1. Known to over-extract with many
  items; reported for reference.
* **Horn's parallel analysis** (``psych::fa.parallel(x, fa = "pc")``): the observed
  eigenvalues are compared, in order, with the **95th percentile** of the eigenvalues of
  ``n_iter`` random normal data sets of the same size (psych 2.2.9 compares with
  ``quant = 0.95``, not with the mean; ``quantile=None`` uses the mean, a laxer rule that
  is reported beside it). The number of components is the count of leading observed
  eigenvalues that exceed their random counterpart. ``n_iter = 20`` (psych's default) and
  ``seed = 0``.
* **Velicer's MAP** (minimum average partial, ``psych::VSS``): for m = 1, 2, ... components,
  the average squared partial correlation of the items after removing the first m principal
  components; the number of components is the m with the smallest average. As in Velicer
  (1976) and O'Connor (2000), step m = 0 (nothing removed: the average squared correlation)
  takes part: when it is the smallest, the items share no component and MAP gives 0.
  ``psych::VSS`` starts at m = 1 and cannot give 0; on items with any structure the two agree.

Parallel analysis and MAP can both retain 0 factors (uncorrelated items: noise).
:func:`resolve_n_factors` then refuses to choose a number rather than fit a factor the
criterion rejected.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

from dfrn.errors import DfrnInputError

__all__ = [
    "ParallelAnalysis",
    "VelicerMAP",
    "item_correlation",
    "kaiser_criterion",
    "parallel_analysis",
    "velicer_map",
    "suggest_n_factors",
    "resolve_n_factors",
    "CRITERIA",
]

#: ``[factors] n_factors`` values that choose the number by a criterion.
CRITERIA = ("parallel", "map")


def item_correlation(items: pd.DataFrame) -> np.ndarray:
    """Pearson correlation of the item columns (rows with a missing item are dropped).

    Raises
    ------
    DfrnInputError
        For fewer than 3 complete rows or 2 items, or a constant item (named).
    """
    x = items.dropna().to_numpy(dtype=float)
    if x.shape[0] < 3 or x.shape[1] < 2:
        raise DfrnInputError(
            f"need at least 3 complete participants and 2 items, got {x.shape[0]} x {x.shape[1]}"
        )
    sd = x.std(axis=0, ddof=1)
    if np.any(sd == 0):
        raise DfrnInputError(f"item {items.columns[int(np.argmin(sd))]!r} is constant")
    return np.corrcoef(x, rowvar=False)


def _eigenvalues(corr: np.ndarray) -> np.ndarray:
    return np.sort(np.linalg.eigvalsh((corr + corr.T) / 2))[::-1]


def kaiser_criterion(eigenvalues: np.ndarray) -> int:
    """The number of eigenvalues greater than 1."""
    return int(np.sum(np.asarray(eigenvalues) > 1.0))


@dataclass(frozen=True)
class ParallelAnalysis:
    """Result of :func:`parallel_analysis`.

    Attributes
    ----------
    observed : ndarray
        Eigenvalues of the items' correlation matrix, descending.
    random_mean : ndarray
        Mean eigenvalues of the random data sets.
    random_quantile : ndarray
        Their ``quantile`` percentile.
    threshold : ndarray
        What each observed eigenvalue is compared with (the mean, or the quantile).
    n_components : int
        Leading observed eigenvalues above their threshold.
    n_iter, seed : int
        The simulation's size and seed.
    """

    observed: np.ndarray
    random_mean: np.ndarray
    random_quantile: np.ndarray
    threshold: np.ndarray
    n_components: int
    n_iter: int
    seed: int


def parallel_analysis(
    items: pd.DataFrame, n_iter: int = 20, seed: int = 0, quantile: float | None = 0.95
) -> ParallelAnalysis:
    """Horn's parallel analysis on principal components.

    Parameters
    ----------
    items : DataFrame
        Participants × items.
    n_iter : int
        Random normal data sets of the same shape (psych's default 20).
    seed : int
        Seed of the random data.
    quantile : float or None
        Compare with this percentile of the random eigenvalues (0.95, psych's ``quant``), or
        with their mean when None.
    """
    corr = item_correlation(items)
    n, p = items.dropna().shape
    if n_iter < 1:
        raise DfrnInputError(f"parallel analysis needs n_iter >= 1, got {n_iter}")
    rng = np.random.default_rng(seed)
    sims = np.empty((n_iter, p))
    for i in range(n_iter):
        sims[i] = _eigenvalues(np.corrcoef(rng.standard_normal((n, p)), rowvar=False))
    observed = _eigenvalues(corr)
    mean = sims.mean(axis=0)
    q = np.quantile(sims, 0.95 if quantile is None else quantile, axis=0)
    threshold = mean if quantile is None else q
    above = observed > threshold
    n_comp = int(np.argmin(above)) if not above.all() else p
    return ParallelAnalysis(observed, mean, q, threshold, n_comp, int(n_iter), int(seed))


@dataclass(frozen=True)
class VelicerMAP:
    """Result of :func:`velicer_map`.

    Attributes
    ----------
    average_partial : ndarray
        Average squared partial correlation after removing m = 1, 2, … components
        (``psych::VSS``'s ``map``).
    n_components : int
        The m with the smallest average, 0 included (see ``average_correlation``).
    average_correlation : float
        Step m = 0: the average squared off-diagonal correlation of the items.
    """

    average_partial: np.ndarray
    n_components: int
    average_correlation: float = np.nan


def velicer_map(corr: np.ndarray, max_components: int | None = None) -> VelicerMAP:
    """Velicer's minimum average partial test, as ``psych::VSS`` computes it.

    Parameters
    ----------
    corr : ndarray
        Item correlation matrix.
    max_components : int, optional
        Largest m tried (default: number of items − 1, at most 8 as in ``psych::VSS``'s
        ``n = 8``).
    """
    corr = np.asarray(corr, dtype=float)
    p = corr.shape[0]
    m_max = min(p - 1, 8) if max_components is None else min(max_components, p - 1)
    values, vectors = np.linalg.eigh((corr + corr.T) / 2)
    order = np.argsort(values)[::-1]
    loadings = vectors[:, order] * np.sqrt(np.clip(values[order], 0, None))
    out = np.full(m_max, np.nan)
    for m in range(1, m_max + 1):
        a = loadings[:, :m]
        partial = corr - a @ a.T
        d = np.sqrt(np.diag(partial))
        with np.errstate(divide="ignore", invalid="ignore"):
            pr = partial / np.outer(d, d)
        out[m - 1] = (np.sum(pr**2) - p) / (p * (p - 1))
    finite = np.where(np.isfinite(out), out, np.inf)
    step0 = float((np.sum(corr**2) - p) / (p * (p - 1)))
    best = int(np.argmin(finite)) + 1
    return VelicerMAP(out, 0 if step0 < finite[best - 1] else best, step0)


def suggest_n_factors(
    items: pd.DataFrame, n_iter: int = 20, seed: int = 0
) -> tuple[pd.DataFrame, ParallelAnalysis, VelicerMAP]:
    """The criteria side by side: one row each with its number and a one-line explanation."""
    pa = parallel_analysis(items, n_iter=n_iter, seed=seed)
    pa_mean = parallel_analysis(items, n_iter=n_iter, seed=seed, quantile=None)
    mp = velicer_map(item_correlation(items))
    table = pd.DataFrame(
        [
            ("kaiser", kaiser_criterion(pa.observed),
             "eigenvalues > 1 (tends to over-extract with many items)"),
            ("parallel", pa.n_components,
             f"eigenvalues above the 95th percentile of {n_iter} random normal data sets "
             f"(psych::fa.parallel, fa = 'pc'; seed {seed})"),
            ("parallel_mean", pa_mean.n_components,
             "eigenvalues above the mean of the same random data (laxer)"),
            ("map", mp.n_components,
             "Velicer's minimum average squared partial correlation (psych::VSS; 0 when "
             "the items' own average squared correlation is lower)"),
        ],
        columns=["criterion", "n_factors", "explanation"],
    )
    return table, pa, mp


def resolve_n_factors(
    items: pd.DataFrame, n_factors: int | str, seed: int = 0, option: str = "n_factors=N"
) -> int:
    """The number of factors to fit: an explicit number, or ``"parallel"`` / ``"map"``.

    An explicit number above what parallel analysis supports gives a one-line warning with
    both numbers.

    Parameters
    ----------
    items : DataFrame
        Participants x items.
    n_factors : int or str
        A positive number, or a criterion in :data:`CRITERIA`.
    seed : int
        Seed of parallel analysis.
    option : str
        How the user sets an explicit number in the command that was run (e.g.
        ``"--n-factors N"``), named when a criterion retains no factor.

    Raises
    ------
    DfrnInputError
        For a value that is neither a positive integer nor a criterion name, and when the
        criterion retains 0 factors (the items look like noise): no factor is fitted then.
    """
    if isinstance(n_factors, str):
        if n_factors not in CRITERIA:
            raise DfrnInputError(
                f"n_factors must be a positive integer or one of {', '.join(CRITERIA)}, "
                f"got {n_factors!r}"
            )
        if n_factors == "parallel":
            k = parallel_analysis(items, seed=seed).n_components
            what = ("parallel analysis retained 0 factors: no eigenvalue of the item "
                    "correlations is above the 95th percentile of random data")
        else:
            k = velicer_map(item_correlation(items)).n_components
            what = ("Velicer's MAP retained 0 factors: removing any component raises the "
                    "average squared partial correlation of the items")
        if k == 0:
            raise DfrnInputError(
                f"{what}, so the {items.shape[1]} items look like noise; to fit factors "
                f"anyway, choose the number yourself ({option})"
            )
        return int(k)
    if isinstance(n_factors, bool) or not isinstance(n_factors, int | np.integer) or n_factors < 1:
        raise DfrnInputError(f"n_factors must be a positive integer, got {n_factors!r}")
    supported = parallel_analysis(items, seed=seed).n_components
    if n_factors > supported:
        warnings.warn(
            f"{n_factors} factors requested but parallel analysis supports {supported} (psych's "
            "rule: eigenvalues above the 95th percentile of random data); the extra factors may "
            "not be reproducible: run 'dfrn factors ITEMS --suggest'",
            UserWarning,
            stacklevel=2,
        )
    return int(n_factors)
