"""The cross-validation fold plan: subject-level K-fold, repeated, fixed by a seed.

The plan is a table with one row per (participant_id, repeat): the ``fold`` column is the
fold in which that participant is a *test* subject in that repeat.

``groups`` (``[cv] groups``: site, family, a subject with several sessions) keeps each group
inside one test fold, through scikit-learn's shuffled ``GroupKFold`` (one random state per
repeat; its 1.6 algorithm, built on ``KFold`` so that scikit-learn 1.4 and 1.5 give the same
plan) or ``StratifiedGroupKFold``; ``n_folds`` equal to the number of groups is
leave-one-group-out. ``strata`` (``[cv] stratify``) balances a continuous target across
folds: its values are cut into quantile bins holding at least ``n_folds`` subjects each and
scikit-learn's ``StratifiedKFold`` splits within them. Without either, the plan is
``RepeatedKFold``'s, as in every earlier version. Every evaluation stage
(the network, the ridge baseline, permutation tests, attention maps) reads the same plan
from ``cv/folds.tsv``, so they are compared on identical splits.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd
from sklearn.model_selection import (
    KFold,
    RepeatedKFold,
    StratifiedGroupKFold,
    StratifiedKFold,
)

from dfrn.errors import DfrnInputError

__all__ = [
    "FOLD_COLUMNS", "make_fold_plan", "iter_splits", "validate_fold_plan", "check_plan_groups",
    "strata_bins",
]

FOLD_COLUMNS = ["participant_id", "repeat", "fold"]


def strata_bins(values: Sequence[float], n_folds: int) -> np.ndarray:
    """Quantile bins of a continuous target, each with at least ``n_folds`` subjects.

    Subjects without a value (NaN) form a bin of their own.

    Parameters
    ----------
    values : sequence of float
    n_folds : int

    Returns
    -------
    ndarray of int
        A bin label per subject.
    """
    v = np.asarray(values, dtype=float)
    finite = np.isfinite(v)
    n_bins = max(1, int(finite.sum()) // n_folds)
    labels = np.full(len(v), -1, dtype=int)
    if finite.any():
        ranks = pd.Series(v[finite]).rank(method="first").to_numpy()
        labels[finite] = np.minimum(((ranks - 1) * n_bins / finite.sum()).astype(int), n_bins - 1)
    return labels


def _group_labels(groups: Sequence[object], ids: list[str], n_folds: int,
                  column: str) -> np.ndarray:
    labels = pd.Series(list(groups), index=ids)
    missing = labels.index[labels.isna().to_numpy()]
    if len(missing):
        raise DfrnInputError(f"participant {missing[0]}: group column {column!r} is empty")
    labels = labels.astype(str).to_numpy()
    n_groups = len(set(labels))
    if n_groups == 1:
        raise DfrnInputError(
            f"group column {column!r} has a single group ({labels[0]!r}) for all {len(labels)} "
            "subjects, so group folds are impossible: fix the column, or remove [cv] groups"
        )
    if n_groups < n_folds:
        raise DfrnInputError(
            f"group column {column!r} has {n_groups} groups, fewer than cv.n_folds={n_folds}: "
            f"lower n_folds to at most {n_groups} (n_folds = {n_groups} is leave-one-group-out)"
        )
    return labels


class _ShuffledGroupKFold:
    """scikit-learn's ``GroupKFold(shuffle=True)`` (1.6+) on any version: its test folds are
    ``KFold(shuffle=True)``'s folds of the sorted unique groups (one ``RandomState(seed)``
    permutation, split in ``n_splits`` near-equal parts), here taken from ``KFold`` itself."""

    def __init__(self, n_splits: int, random_state: int) -> None:
        self.kfold = KFold(n_splits=n_splits, shuffle=True, random_state=random_state)

    def split(self, x: np.ndarray, y: np.ndarray | None = None,
              groups: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        labels = np.asarray(groups)
        unique = np.unique(labels)
        for _, test_groups in self.kfold.split(np.zeros(len(unique))):
            test = np.isin(labels, unique[test_groups])
            yield np.flatnonzero(~test), np.flatnonzero(test)


def _splitter(n_folds: int, seed: int, grouped: bool, stratified: bool):
    if grouped and stratified:
        return StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    if grouped:
        return _ShuffledGroupKFold(n_splits=n_folds, random_state=seed)
    return StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)


def _repeat_folds(n_folds: int, seed: int, labels: np.ndarray | None,
                  bins: np.ndarray | None) -> np.ndarray:
    """One repeat's test fold per subject, grouped and/or stratified."""
    n = len(labels) if labels is not None else len(bins)  # type: ignore[arg-type]
    fold_of = np.full(n, -1, dtype=int)
    y = bins if bins is not None else np.zeros(n)
    split = _splitter(n_folds, seed, labels is not None, bins is not None)
    for f, (_, test) in enumerate(split.split(np.zeros(n), y, labels)):
        fold_of[test] = f
    if len(np.unique(fold_of)) < n_folds:  # StratifiedGroupKFold can leave one empty
        split = _splitter(n_folds, seed, labels is not None, False)
        for f, (_, test) in enumerate(split.split(np.zeros(n), y, labels)):
            fold_of[test] = f
    return fold_of


def make_fold_plan(
    participant_ids: Sequence[str],
    n_folds: int = 10,
    n_repeats: int = 5,
    seed: int = 0,
    *,
    groups: Sequence[object] | None = None,
    strata: Sequence[float] | None = None,
    group_column: str = "groups",
) -> pd.DataFrame:
    """Assign every participant to a test fold in each repeat.

    Parameters
    ----------
    participant_ids : sequence of str
    n_folds, n_repeats, seed : int
    groups : sequence, optional
        A group label per participant: each group stays inside one test fold per repeat.
    strata : sequence of float, optional
        A continuous target per participant, balanced across folds (:func:`strata_bins`).
    group_column : str
        The groups' column name, for messages.

    Returns
    -------
    DataFrame
        Columns ``participant_id, repeat, fold``. Without ``groups`` and ``strata`` it is
        scikit-learn ``RepeatedKFold``'s plan (unchanged from earlier versions); repeat ``r``
        otherwise uses the splitter's ``random_state = seed + r``. A repeat in which
        ``StratifiedGroupKFold`` leaves a fold empty is split by ``GroupKFold`` instead, so
        every plan has ``n_folds`` folds.

    Raises
    ------
    DfrnInputError
        For fewer subjects (or groups) than folds, or a participant without a group.
    """
    ids = list(participant_ids)
    if n_folds < 2:
        raise DfrnInputError(f"cv.n_folds must be at least 2, got {n_folds}")
    if len(ids) < n_folds:
        raise DfrnInputError(
            f"the cohort has {len(ids)} subjects, fewer than cv.n_folds={n_folds}: "
            "lower n_folds or add subjects"
        )
    fold_of = np.full((n_repeats, len(ids)), -1, dtype=int)
    if groups is None and strata is None:
        splitter = RepeatedKFold(n_splits=n_folds, n_repeats=n_repeats, random_state=seed)
        for k, (_, test) in enumerate(splitter.split(np.zeros(len(ids)))):
            fold_of[k // n_folds, test] = k % n_folds
    else:
        labels = None if groups is None else _group_labels(groups, ids, n_folds, group_column)
        bins = None if strata is None else strata_bins(strata, n_folds)
        for r in range(n_repeats):
            fold_of[r] = _repeat_folds(n_folds, seed + r, labels, bins)
    rows = [
        (pid, r, int(fold_of[r, i])) for r in range(n_repeats) for i, pid in enumerate(ids)
    ]
    return pd.DataFrame(rows, columns=FOLD_COLUMNS)


def validate_fold_plan(plan: pd.DataFrame, participant_ids: Sequence[str]) -> None:
    """Check that a saved plan covers exactly these participants once per repeat."""
    missing = [c for c in FOLD_COLUMNS if c not in plan.columns]
    if missing:
        raise DfrnInputError(f"fold plan lacks columns {missing}")
    ids = set(participant_ids)
    for r, g in plan.groupby("repeat"):
        if set(g["participant_id"]) != ids or g["participant_id"].duplicated().any():
            raise DfrnInputError(
                f"fold plan repeat {r} does not cover the cohort's participants exactly once"
            )


def check_plan_groups(plan: pd.DataFrame, groups: pd.Series, column: str) -> None:
    """Refuse a fold plan in which a group spans two test folds of a repeat.

    Parameters
    ----------
    plan : DataFrame
        The fold plan (e.g. a saved ``cv/folds.tsv``).
    groups : Series
        Group labels indexed by participant_id.
    column : str
        The group column's name, for the message.

    Raises
    ------
    DfrnInputError
        Naming the group, the repeat and two of its folds.
    """
    labelled = plan.assign(_group=plan["participant_id"].astype(str).map(
        groups.set_axis(groups.index.astype(str)).astype(str)))
    for (repeat, group), g in labelled.groupby(["repeat", "_group"], sort=True):
        folds = sorted(g["fold"].unique())
        if len(folds) > 1:
            raise DfrnInputError(
                f"the fold plan puts {column} {group!r} in folds {folds[0]} and {folds[1]} of "
                f"repeat {repeat}: its subjects must share a fold; start a new results folder "
                "(the plan was made without [cv] groups)"
            )


def iter_splits(plan: pd.DataFrame) -> Iterator[tuple[int, int, list[str], list[str]]]:
    """Yield ``(repeat, fold, train_ids, test_ids)`` in a fixed order."""
    for r in sorted(plan["repeat"].unique()):
        g = plan[plan["repeat"] == r]
        for f in sorted(g["fold"].unique()):
            test = g.loc[g["fold"] == f, "participant_id"].tolist()
            train = g.loc[g["fold"] != f, "participant_id"].tolist()
            yield int(r), int(f), train, test
