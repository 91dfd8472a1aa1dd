"""The fold plan: seeded, subject-level, balanced."""

from __future__ import annotations

import pytest

from dfrn.errors import DfrnInputError
from dfrn.evaluation.folds import check_plan_groups, make_fold_plan, strata_bins


def test_fold_plan_is_seeded_and_subject_level() -> None:
    ids = [f"s{i}" for i in range(23)]
    a = make_fold_plan(ids, 5, 3, seed=7)
    assert a.equals(make_fold_plan(ids, 5, 3, seed=7))
    assert not a.equals(make_fold_plan(ids, 5, 3, seed=8))
    for _, g in a.groupby("repeat"):
        assert sorted(g["participant_id"]) == sorted(ids)
        assert g["fold"].value_counts().max() - g["fold"].value_counts().min() <= 1
    assert not a[a.repeat == 0]["fold"].equals(a[a.repeat == 1]["fold"].reset_index(drop=True))


def test_plans_without_groups_or_strata_are_those_of_earlier_versions() -> None:
    """Pinned from dfrn before [cv] groups and stratify existed (RepeatedKFold)."""
    plan = make_fold_plan([f"s{i}" for i in range(9)], 3, 2, seed=4)
    assert plan["fold"].tolist() == [1, 2, 1, 0, 0, 2, 0, 2, 1, 1, 1, 0, 0, 1, 2, 2, 2, 0]


def _sites(n: int = 60, n_groups: int = 12):
    import numpy as np

    rng = np.random.default_rng(0)
    ids = [f"s{i:02d}" for i in range(n)]
    return ids, [f"site{g}" for g in rng.integers(0, n_groups, n)]


def test_no_group_spans_two_folds_for_any_seed() -> None:
    import pandas as pd

    ids, groups = _sites()
    for seed in range(20):
        plan = make_fold_plan(ids, 5, 2, seed=seed, groups=groups)
        labelled = plan.assign(group=plan["participant_id"].map(dict(zip(ids, groups, strict=True))))
        assert (labelled.groupby(["repeat", "group"])["fold"].nunique() == 1).all(), seed
        assert sorted(plan["fold"].unique()) == [0, 1, 2, 3, 4]
        check_plan_groups(plan, pd.Series(groups, index=ids), "site")  # accepted
    a, b = (make_fold_plan(ids, 5, 2, seed=s, groups=groups) for s in (0, 1))
    assert not a.equals(b)
    # repeats differ from each other
    assert not a[a.repeat == 0]["fold"].reset_index(drop=True).equals(
        a[a.repeat == 1]["fold"].reset_index(drop=True))


def test_leave_one_group_out_and_too_few_groups() -> None:
    ids, groups = _sites(n=30, n_groups=3)
    plan = make_fold_plan(ids, 3, 1, seed=0, groups=groups, group_column="site")
    by_fold = plan.assign(g=groups).groupby("fold")["g"].nunique()
    assert (by_fold == 1).all()
    with pytest.raises(DfrnInputError, match=r"group column 'site' has 3 groups, fewer than "
                                              r"cv.n_folds=5: lower n_folds to at most 3"):
        make_fold_plan(ids, 5, 1, groups=groups, group_column="site")
    with pytest.raises(DfrnInputError, match="participant s01: group column 'site' is empty"):
        make_fold_plan(ids, 3, 1, groups=[groups[0], None] + groups[2:], group_column="site")


def test_a_plan_that_splits_a_group_is_refused() -> None:
    import pandas as pd

    ids, groups = _sites(n=30, n_groups=6)
    plan = make_fold_plan(ids, 3, 1, seed=0)  # made without groups
    with pytest.raises(DfrnInputError, match=r"the fold plan puts site 'site\d' in folds \d and "
                                              r"\d of repeat 0"):
        check_plan_groups(plan, pd.Series(groups, index=ids), "site")


def test_stratified_plans_balance_a_skewed_target() -> None:
    import numpy as np

    rng = np.random.default_rng(1)
    ids = [f"s{i:02d}" for i in range(50)]
    spread = {True: [], False: []}
    for seed in range(30):
        y = rng.gamma(2.0, 1.0, 50)  # skewed
        for strat in (True, False):
            plan = make_fold_plan(ids, 5, 1, seed=seed, strata=y if strat else None)
            means = plan.assign(y=y).groupby("fold")["y"].mean()
            spread[strat].append(means.std())
    assert np.mean(spread[True]) < 0.5 * np.mean(spread[False])
    assert strata_bins([1.0, np.nan, 2.0, 3.0, 4.0], 2).tolist() == [0, -1, 0, 1, 1]


def test_a_stratified_group_split_with_an_empty_fold_falls_back_to_group_kfold(monkeypatch) -> None:
    import numpy as np

    import dfrn.evaluation.folds as folds

    class _LeavesOneEmpty:
        """Puts every group into folds 0 and 1 of 3 (what StratifiedGroupKFold can do)."""

        def split(self, x, y, groups):
            labels = np.unique(groups)
            first = np.isin(groups, labels[: len(labels) // 2])
            yield np.flatnonzero(~first), np.flatnonzero(first)
            yield np.flatnonzero(first), np.flatnonzero(~first)

    real = folds._splitter
    monkeypatch.setattr(folds, "_splitter", lambda n, seed, grouped, stratified:
                        _LeavesOneEmpty() if stratified else real(n, seed, grouped, stratified))
    ids, groups = _sites(n=30, n_groups=6)
    plan = folds.make_fold_plan(ids, 3, 1, seed=0, groups=groups, strata=np.arange(30.0))
    assert sorted(plan["fold"].unique()) == [0, 1, 2]
    labelled = plan.assign(group=groups)
    assert (labelled.groupby("group")["fold"].nunique() == 1).all()


def test_a_single_group_says_group_folds_are_impossible() -> None:
    ids = [f"s{i}" for i in range(10)]
    with pytest.raises(DfrnInputError) as err:
        make_fold_plan(ids, 2, 1, groups=["A"] * 10, group_column="site")
    assert str(err.value) == (
        "group column 'site' has a single group ('A') for all 10 subjects, so group folds are "
        "impossible: fix the column, or remove [cv] groups")


def test_group_folds_are_scikit_learn_1_6s_shuffled_group_kfold_on_any_version() -> None:
    """scikit-learn 1.6's ``GroupKFold(shuffle=True)``: one ``RandomState(seed)`` permutation
    of the sorted groups, split by ``np.array_split``; 1.4 and 1.5 have no ``shuffle``."""
    import inspect

    import numpy as np
    from sklearn.model_selection import GroupKFold

    ids, groups = _sites(n=60, n_groups=12)
    labels = np.asarray(groups)
    for seed in (0, 5):
        plan = make_fold_plan(ids, 5, 2, seed=seed, groups=groups)
        for r in (0, 1):
            order = np.random.RandomState(seed + r).permutation(np.unique(labels))
            expect = np.empty(len(ids), int)
            for f, part in enumerate(np.array_split(order, 5)):
                expect[np.isin(labels, part)] = f
            assert plan.loc[plan.repeat == r, "fold"].tolist() == expect.tolist()
            if "shuffle" in inspect.signature(GroupKFold).parameters:  # scikit-learn >= 1.6
                ref = GroupKFold(n_splits=5, shuffle=True, random_state=seed + r)
                for f, (_, test) in enumerate(ref.split(np.zeros(len(ids)), groups=labels)):
                    assert (expect[test] == f).all()
