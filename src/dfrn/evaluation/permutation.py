"""Permutation tests of cross-validated prediction accuracy.

The statistic
-------------
For each factor, ``r`` is the Pearson correlation between true and predicted values of the
pooled out-of-fold predictions of one repeat (as in :func:`dfrn.evaluation.metrics.compute_metrics`),
averaged over the repeats of the fold plan — the "mean" row of Table 1. Each permutation
re-runs the *whole* cross-validation (every in-fold fitting step, same folds) on permuted
targets and computes the same statistic; the one-sided permutation p-value is

    p_permutation = (1 + #{r_perm >= r}) / (1 + n_perm)

so it is never below ``1 / (n_perm + 1)``. Permutations whose statistic is undefined
(constant predictions) are dropped and ``n_perm`` reports the ones used.

``p_parametric`` is the usual two-sided Pearson p-value of ``r`` with ``n`` = the number of
subjects with a value for that factor (``scipy.stats.pearsonr``'s t-test); it ignores the
dependence between folds and repeats and is given for comparison only.

The permutation scheme
----------------------
One permutation of the subjects is drawn per permutation round and used for every factor
and every repeat: subject ``i`` receives the target row of subject ``perm[i]`` (joint row
permutation, keeping the correlation between factors, as a multi-output network needs).
Where a factor has missing values its missingness is kept fixed: its observed values are
permuted among the subjects that have one, in the order induced by the same ``perm``
(identical to the joint row permutation when nothing is missing). See
:func:`permute_targets`.

:func:`permutation_test_generic` drives any cross-validated predictor (e.g. the network with
``--permutations N``, possibly on a one-repeat plan to save time, in which case the
statistic is that repeat's pooled r): it calls back ``cv_predict(index, targets)`` with the
permutation's number, so a caller can keep each permutation's work apart.
:func:`permutation_test` is the ridge baseline's version: numerically the same as the
generic test driving :func:`dfrn.evaluation.ridge_cv.cross_validate_ridge`, but all
permutations are solved together from one SVD per (inner) fold.

This module computes and returns tables; writing them is the workflows' job.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from dfrn.evaluation.folds import iter_splits
from dfrn.evaluation.metrics import compute_metrics, mean_r
from dfrn.evaluation.ridge_cv import (
    GramInputs,
    RidgeInputs,
    align_ridge_inputs,
    align_targets,
    prepare_split_engine,
    split_rows,
)
from dfrn.models.ridge import DEFAULT_ALPHAS, MultiTargetRidgeCV

__all__ = [
    "PERMUTATION_COLUMNS",
    "permutation_indices",
    "permute_targets",
    "permutation_test_generic",
    "permutation_test",
]

PERMUTATION_COLUMNS = ["factor", "n", "r", "p_parametric", "p_permutation", "n_perm"]

_TIE_TOL = 1e-12


def permutation_indices(n_subjects: int, n_perm: int, seed: int = 0) -> np.ndarray:
    """The subject permutations used for a given seed.

    Parameters
    ----------
    n_subjects : int
    n_perm : int
    seed : int, default 0

    Returns
    -------
    ndarray of int, shape (n_perm, n_subjects)
        Row ``k`` is permutation ``k``.
    """
    rng = np.random.default_rng(seed)
    if n_perm == 0:
        return np.empty((0, n_subjects), dtype=np.int64)
    return np.stack([rng.permutation(n_subjects) for _ in range(n_perm)])


def _induced_order(perm: np.ndarray, observed: np.ndarray) -> np.ndarray:
    """Observed subjects in the order they appear in ``perm``."""
    return perm[observed[perm]]


def permute_targets(targets: pd.DataFrame, perm: np.ndarray) -> pd.DataFrame:
    """Permuted copy of ``targets`` (same index): row ``i`` gets the values of row ``perm[i]``.

    Per column, missing values stay where they are and the observed values are permuted
    among the observed rows in the order induced by ``perm``.

    Parameters
    ----------
    targets : DataFrame
        One column per factor; NaN marks a missing value.
    perm : ndarray of int, shape (len(targets),)
        A permutation of ``range(len(targets))``.

    Returns
    -------
    DataFrame
    """
    perm = np.asarray(perm)
    if sorted(perm.tolist()) != list(range(len(targets))):
        raise ValueError("perm is not a permutation of the targets' rows")
    out = targets.copy()
    for col in targets.columns:
        y = targets[col].to_numpy(dtype=float)
        observed = np.isfinite(y)
        new = y.copy()
        new[np.flatnonzero(observed)] = y[_induced_order(perm, observed)]
        out[col] = new
    return out


def _statistic(predictions: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """Mean over repeats of the pooled Pearson r per factor, and n (subjects in repeat 0)."""
    metrics = compute_metrics(predictions)
    if metrics.empty:
        return pd.Series(dtype=float), pd.Series(dtype=int)
    summary = mean_r(metrics)
    return summary["mean_r"], summary["n"]


def _p_parametric(r: float, n: int) -> float:
    if not np.isfinite(r) or n < 3:
        return float("nan")
    if abs(r) >= 1.0:
        return 0.0
    t = r * np.sqrt((n - 2) / (1.0 - r * r))
    return float(2.0 * sps.t.sf(abs(t), n - 2))


def _table(
    factors: list[str],
    r_obs: dict[str, float],
    n_obs: dict[str, int],
    null: dict[str, np.ndarray],
) -> pd.DataFrame:
    rows = []
    for f in factors:
        r, perm_r = r_obs[f], null[f]
        valid = perm_r[np.isfinite(perm_r)]
        if np.isfinite(r):
            exceed = int(np.sum(valid >= r - _TIE_TOL))
            p_perm = (1.0 + exceed) / (1.0 + len(valid))
        else:
            p_perm = float("nan")
        rows.append(
            {
                "factor": f,
                "n": int(n_obs[f]),
                "r": r,
                "p_parametric": _p_parametric(r, int(n_obs[f])),
                "p_permutation": p_perm,
                "n_perm": len(valid),
            }
        )
    out = pd.DataFrame(rows, columns=PERMUTATION_COLUMNS)
    out.attrs["null_r"] = {f: null[f] for f in factors}
    return out


CVPredict = Callable[[int | None, pd.DataFrame], pd.DataFrame]
"""``cv_predict(index, targets) -> predictions``: one full cross-validation on ``targets``."""


def permutation_test_generic(
    cv_predict: CVPredict, targets: pd.DataFrame, n_perm: int = 1000, seed: int = 0, *,
    observed: pd.DataFrame | None = None, n_jobs: int = 1, progress: bool = True,
) -> pd.DataFrame:
    """Permutation test of any cross-validated predictor.

    Parameters
    ----------
    cv_predict : callable ``(index: int | None, targets: DataFrame) -> DataFrame``
        Runs the full cross-validation (fixed folds, every fitting step inside the training
        folds) on the given targets table — same index and columns as ``targets``, values
        permuted — and returns long predictions
        (:data:`dfrn.evaluation.metrics.PREDICTION_COLUMNS`). ``index`` is the permutation's
        number, ``0 … n_perm - 1`` (row ``index`` of :func:`permutation_indices`), or None
        for the unpermuted targets when ``observed`` is not given. Calls may come in any
        order, and from joblib workers when ``n_jobs > 1``.
    targets : DataFrame
        The unpermuted targets, one row per subject and one column per factor.
    n_perm : int, default 1000
        Number of permutations, ``permutation_indices(len(targets), n_perm, seed)``, applied
        with :func:`permute_targets`.
    seed : int, default 0
    observed : DataFrame, optional
        The predictions on the unpermuted targets (saves one run).
    n_jobs : int, default 1
        Permutations run in this many joblib workers.
    progress : bool, default True
        Show a progress bar.

    Returns
    -------
    DataFrame
        One row per factor with :data:`PERMUTATION_COLUMNS`; the statistic is
        :func:`dfrn.evaluation.metrics.mean_r` of the predictions' metrics. The null
        distribution of each factor is in ``result.attrs["null_r"][factor]``.
    """
    if observed is None:
        observed = cv_predict(None, targets)
    r_obs, n_obs = _statistic(observed)
    factors = [str(f) for f in r_obs.index]
    perms = permutation_indices(len(targets), n_perm, seed)
    one = partial(_permuted_statistic, cv_predict, targets)
    results = list(_map_with_progress(one, list(enumerate(perms)), n_jobs, "permutations",
                                      progress))
    null = {
        f: np.array([float(res.get(f, np.nan)) for res in results], dtype=float) for f in factors
    }
    return _table(
        factors,
        {f: float(r_obs[f]) for f in factors},
        {f: int(n_obs[f]) for f in factors},
        null,
    )


def _permuted_statistic(cv_predict: CVPredict, targets: pd.DataFrame,
                        item: tuple[int, np.ndarray]) -> pd.Series:
    """The statistic of one permutation ``item = (index, perm)``: a full cross-validation."""
    index, perm = item
    return _statistic(cv_predict(index, permute_targets(targets, perm)))[0]


def _map_with_progress(fn: Callable[[Any], Any], items: Sequence[Any], n_jobs: int, desc: str,
                       progress: bool, prefer: str | None = None) -> Iterator[Any]:
    """``fn(item)`` for each item, in order, in this process or ``n_jobs`` joblib workers
    (``prefer``: joblib's backend hint), advancing a progress bar as each result is used."""
    bar = tqdm(total=len(items), desc=desc, disable=not progress)
    if n_jobs == 1:
        results = (fn(item) for item in items)
    else:
        from joblib import Parallel, delayed

        hint = {"prefer": prefer} if prefer is not None else {}
        results = Parallel(n_jobs=n_jobs, return_as="generator", **hint)(
            delayed(fn)(item) for item in items
        )
    for res in results:
        yield res
        bar.update()
    bar.close()


def _columnwise_r(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r of each column pair; NaN where either column is constant or n < 3."""
    ac = a - a.mean(axis=0)
    bc = b - b.mean(axis=0)
    num = np.sum(ac * bc, axis=0)
    den = np.sqrt(np.sum(ac * ac, axis=0) * np.sum(bc * bc, axis=0))
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(den > 0, num / den, np.nan)
    if len(a) < 3:
        r[:] = np.nan
    return np.clip(r, -1.0, 1.0)


def permutation_test(
    features: pd.DataFrame, targets: pd.DataFrame, plan: pd.DataFrame, n_perm: int = 1000,
    seed: int = 0, covariates: pd.DataFrame | None = None, n_jobs: int = 1,
    progress: bool = True, *, sites: pd.Series | None = None,
    preserve: pd.DataFrame | None = None, alphas: Sequence[float] = DEFAULT_ALPHAS,
    inner_cv: int = 5,
) -> pd.DataFrame:
    """Permutation test of the ridge baseline on the fold plan (all repeats).

    Gives the same result as ``permutation_test_generic(lambda i, t:
    cross_validate_ridge(features, t, plan, covariates), targets_of_the_plan_subjects,
    n_perm, seed)``, but, as covariate regression and scaling do not depend on the target,
    each fold's design is prepared once and all ``n_perm + 1`` target vectors are solved
    together (``n_jobs`` threads share the folds; BLAS runs single-threaded inside). The
    statistic is computed for all permutations at once, as the NaN-skipping mean over
    repeats of each repeat's pooled r — what :func:`dfrn.evaluation.metrics.mean_r` gives
    per permutation (the tests check the two agree). Permutations are drawn over the plan's
    subjects in their order of first appearance in ``plan``. Memory grows with
    ``n_perm × subjects × len(alphas)`` per fold (about 30 MB for 1,000 × 116 × 17).

    Parameters
    ----------
    features : DataFrame
        ROI features, indexed by ``participant_id``.
    targets : DataFrame
        Targets fixed before cross-validation, one column per factor (NaN: missing).
    plan : DataFrame
        The fold plan.
    n_perm : int, default 1000
    seed : int, default 0
    covariates : DataFrame, optional
        Raw covariates (see :func:`dfrn.evaluation.ridge_cv.cross_validate_ridge`).
    sites, preserve : optional
        ComBat inside each split (see :func:`dfrn.evaluation.ridge_cv.cross_validate_ridge`).
    n_jobs : int, default 1
        Threads sharing the folds.
    progress : bool, default True
    alphas : sequence of float, default DEFAULT_ALPHAS
    inner_cv : int, default 5

    Returns
    -------
    DataFrame
        As :func:`permutation_test_generic`.
    """
    inputs = align_ridge_inputs(features, plan, covariates, sites, preserve)
    targs = align_targets(targets, inputs.ids)
    permuted = _permuted_targets(targs, permutation_indices(len(inputs.ids), n_perm, seed))
    splits = list(iter_splits(plan))
    job = _RidgeSplitJob(inputs, permuted, alphas, inner_cv)
    return _ridge_table(permuted, _pooled_predictions(job, splits, n_jobs, progress))


@dataclass(frozen=True)
class _PermutedTarget:
    """One factor's targets: column 0 unpermuted, then one column per permutation."""

    matrix: np.ndarray
    """Shape (n_subjects, 1 + n_perm); NaN where the subject has no value."""
    observed: np.ndarray
    """Whether each subject has a value (the same in every column)."""


def _permuted_targets(targs: pd.DataFrame, perms: np.ndarray) -> dict[str, _PermutedTarget]:
    """Each factor's target matrix, missingness kept fixed as in :func:`permute_targets`."""
    all_perms = np.concatenate([np.arange(len(targs))[None, :], perms])  # row 0 = observed
    permuted: dict[str, _PermutedTarget] = {}
    for f in [str(f) for f in targs.columns]:
        y = targs[f].to_numpy(dtype=float)
        obs = np.isfinite(y)
        order = all_perms[obs[all_perms]].reshape(len(all_perms), int(obs.sum()))
        mat = np.full((len(targs), len(all_perms)), np.nan)
        mat[np.flatnonzero(obs)] = y[order].T
        permuted[f] = _PermutedTarget(mat, obs)
    return permuted


@dataclass(frozen=True)
class _RidgeSplitJob:
    """What every split of :func:`permutation_test` shares."""

    inputs: RidgeInputs | GramInputs
    permuted: dict[str, _PermutedTarget]
    alphas: Sequence[float]
    inner_cv: int


def _solve_split(job: _RidgeSplitJob, split: tuple[int, int, list[str], list[str]]
                 ) -> list[tuple[int, str, np.ndarray, np.ndarray]]:
    """One split's test predictions of every factor and permutation, as
    ``(repeat, factor, test rows, predictions)``; one engine per missingness pattern."""
    repeat, fold, train, test = split
    engines: dict[bytes, tuple[np.ndarray, np.ndarray, MultiTargetRidgeCV | None]] = {}
    out = []
    for f, target in job.permuted.items():
        key = target.observed.tobytes()
        if key not in engines:
            tr, te = split_rows(job.inputs.ids, train, test, target.observed)
            engines[key] = (tr, te, None if len(te) == 0 else prepare_split_engine(
                job.inputs, tr, te, job.alphas, job.inner_cv, f"repeat {repeat} fold {fold}"))
        tr, te, engine = engines[key]
        if engine is not None:
            pred, _ = engine.predict(target.matrix[tr])
            out.append((repeat, f, te, pred))
    return out


def _pooled_predictions(job: _RidgeSplitJob, splits: list[tuple[int, int, list[str], list[str]]],
                        n_jobs: int, progress: bool) -> dict[int, dict[str, np.ndarray]]:
    """Per repeat and factor, the out-of-fold predictions of every permutation (NaN: untested)."""
    repeats = sorted({s[0] for s in splits})
    pooled = {r: {f: np.full_like(t.matrix, np.nan) for f, t in job.permuted.items()}
              for r in repeats}
    solve = partial(_solve_split, job)
    with threadpool_limits(limits=1, user_api="blas"):  # parallelism comes from n_jobs
        for res in _map_with_progress(solve, splits, n_jobs, "ridge permutations (folds)",
                                      progress, prefer="threads"):
            for repeat, f, te, pred in res:
                pooled[repeat][f][te] = pred
    return pooled


def _repeat_mean_r(y: np.ndarray, pooled_by_repeat: list[np.ndarray]) -> np.ndarray:
    """Per column (observed, then each permutation): the NaN-skipping mean over repeats of the
    pooled r, i.e. :func:`_statistic` for all permutations at once."""
    per_repeat = np.stack([_columnwise_r(y, p) for p in pooled_by_repeat])  # (n_repeats, cols)
    finite = np.isfinite(per_repeat)
    with np.errstate(invalid="ignore"):
        return np.where(finite, per_repeat, 0.0).sum(axis=0) / finite.sum(axis=0)


def _ridge_table(permuted: dict[str, _PermutedTarget],
                 pooled: dict[int, dict[str, np.ndarray]]) -> pd.DataFrame:
    """The result table of :func:`permutation_test` from its pooled predictions."""
    r_obs, n_obs, null = {}, {}, {}
    for f, t in permuted.items():
        obs = t.observed
        stat = _repeat_mean_r(t.matrix[obs], [by_factor[f][obs] for by_factor in pooled.values()])
        r_obs[f], null[f], n_obs[f] = float(stat[0]), stat[1:], int(obs.sum())
    return _table(list(permuted), r_obs, n_obs, null)
