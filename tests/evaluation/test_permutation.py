"""Permutation tests: the permutation scheme, p-values, the generic driver's callback."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import roi_cohort

from dfrn.evaluation.folds import make_fold_plan
from dfrn.evaluation.metrics import compute_metrics, mean_r
from dfrn.evaluation.permutation import (
    PERMUTATION_COLUMNS,
    permutation_indices,
    permutation_test,
    permutation_test_generic,
    permute_targets,
)
from dfrn.evaluation.ridge_cv import cross_validate_ridge


def test_permute_targets_keeps_missingness() -> None:
    t = pd.DataFrame(
        {"a": [1.0, 2.0, 3.0, 4.0], "b": [10.0, np.nan, 30.0, 40.0]}, index=list("wxyz")
    )
    perm = np.array([3, 1, 0, 2])
    out = permute_targets(t, perm)
    assert out["a"].tolist() == [4.0, 2.0, 1.0, 3.0]  # row i gets row perm[i]
    assert np.isnan(out.at["x", "b"])  # missing stays put
    assert sorted(out["b"].dropna()) == [10.0, 30.0, 40.0]
    assert out["b"].dropna().tolist() == [40.0, 10.0, 30.0]  # order induced by perm
    perms = permutation_indices(4, 5, seed=1)
    assert perms.shape == (5, 4)
    np.testing.assert_array_equal(perms, permutation_indices(4, 5, seed=1))


def test_permutation_p_values_noise_and_signal() -> None:
    ids, x, targets, _ = roi_cohort(n=40, p=10, seed=4)
    plan = make_fold_plan(ids, n_folds=5, n_repeats=2, seed=0)
    res = permutation_test(x, targets, plan, n_perm=99, seed=0, progress=False)
    assert list(res.columns) == PERMUTATION_COLUMNS
    res = res.set_index("factor")
    assert res.at["strong", "p_permutation"] == pytest.approx(1 / 100)
    assert res.at["noise", "p_permutation"] > 0.05
    assert (res["n_perm"] == 99).all()
    # r is the mean over repeats of the pooled r of the baseline's own predictions
    summary = mean_r(compute_metrics(cross_validate_ridge(x, targets, plan)))
    np.testing.assert_allclose(res.loc[summary.index, "r"], summary["mean_r"], atol=1e-10)
    assert res.loc[summary.index, "n"].tolist() == summary["n"].tolist()


def test_fast_ridge_permutations_equal_generic_driver() -> None:
    ids, x, targets, cov = roi_cohort(n=30, p=8, seed=5, signal=0.2)
    targets.loc[ids[:3], "noise"] = np.nan
    plan = make_fold_plan(ids, n_folds=5, n_repeats=1, seed=2)

    def cv_predict(index: int | None, t: pd.DataFrame) -> pd.DataFrame:
        return cross_validate_ridge(x, t, plan, cov)

    generic = permutation_test_generic(
        cv_predict, targets.loc[ids], n_perm=9, seed=7, progress=False
    )
    fast = permutation_test(
        x, targets, plan, n_perm=9, seed=7, covariates=cov, progress=False, n_jobs=2
    )
    pd.testing.assert_frame_equal(generic, fast, atol=1e-10)
    for f in ("strong", "noise"):
        np.testing.assert_allclose(generic.attrs["null_r"][f], fast.attrs["null_r"][f], atol=1e-10)


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_generic_callback_gets_each_permutation_index(n_jobs: int) -> None:
    ids, x, targets, _ = roi_cohort(n=20, p=4, seed=6)
    plan = make_fold_plan(ids, n_folds=4, n_repeats=1, seed=0)
    perms = permutation_indices(len(ids), 5, seed=3)
    seen: dict[int | None, pd.DataFrame] = {}

    def cv_predict(index: int | None, t: pd.DataFrame) -> pd.DataFrame:
        seen[index] = t
        return cross_validate_ridge(x, t, plan)

    res = permutation_test_generic(
        cv_predict, targets, n_perm=5, seed=3, n_jobs=n_jobs, progress=False
    )
    if n_jobs == 1:  # joblib workers are other processes: only the main one is seen
        assert sorted(seen, key=lambda k: -1 if k is None else k) == [None, 0, 1, 2, 3, 4]
        pd.testing.assert_frame_equal(seen[None], targets)
        for k in range(5):  # index k gets permutation k
            pd.testing.assert_frame_equal(seen[k], permute_targets(targets, perms[k]))
    assert res["n_perm"].tolist() == [5, 5]

    # with the observed predictions given, the unpermuted CV is not asked for again
    seen.clear()
    permutation_test_generic(
        cv_predict, targets, n_perm=2, seed=3, observed=cross_validate_ridge(x, targets, plan),
        progress=False,
    )
    assert sorted(seen) == [0, 1]
