"""The cross-validation fold plan: subject-level K-fold, repeated, fixed by a seed.

The plan is a table with one row per (participant_id, repeat): the ``fold`` column is the
fold in which that participant is a *test* subject in that repeat. Every evaluation stage
(the network, the ridge baseline, permutation tests, attention maps) reads the same plan
from ``cv/folds.tsv``, so they are compared on identical splits.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd
from sklearn.model_selection import RepeatedKFold

from dfrn.errors import DfrnInputError

__all__ = ["FOLD_COLUMNS", "make_fold_plan", "iter_splits", "validate_fold_plan"]

FOLD_COLUMNS = ["participant_id", "repeat", "fold"]


def make_fold_plan(
    participant_ids: Sequence[str], n_folds: int = 10, n_repeats: int = 5, seed: int = 0
) -> pd.DataFrame:
    """Assign every participant to a test fold in each repeat (scikit-learn ``RepeatedKFold``)."""
    ids = list(participant_ids)
    if n_folds < 2:
        raise DfrnInputError(f"cv.n_folds must be at least 2, got {n_folds}")
    if len(ids) < n_folds:
        raise DfrnInputError(
            f"the cohort has {len(ids)} subjects, fewer than cv.n_folds={n_folds}: "
            "lower n_folds or add subjects"
        )
    splitter = RepeatedKFold(n_splits=n_folds, n_repeats=n_repeats, random_state=seed)
    fold_of = np.full((n_repeats, len(ids)), -1, dtype=int)
    for k, (_, test) in enumerate(splitter.split(np.zeros(len(ids)))):
        fold_of[k // n_folds, test] = k % n_folds
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


def iter_splits(plan: pd.DataFrame) -> Iterator[tuple[int, int, list[str], list[str]]]:
    """Yield ``(repeat, fold, train_ids, test_ids)`` in a fixed order."""
    for r in sorted(plan["repeat"].unique()):
        g = plan[plan["repeat"] == r]
        for f in sorted(g["fold"].unique()):
            test = g.loc[g["fold"] == f, "participant_id"].tolist()
            train = g.loc[g["fold"] != f, "participant_id"].tolist()
            yield int(r), int(f), train, test
