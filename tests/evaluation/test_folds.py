"""The fold plan: seeded, subject-level, balanced."""

from __future__ import annotations

from dfrn.evaluation.folds import make_fold_plan


def test_fold_plan_is_seeded_and_subject_level() -> None:
    ids = [f"s{i}" for i in range(23)]
    a = make_fold_plan(ids, 5, 3, seed=7)
    assert a.equals(make_fold_plan(ids, 5, 3, seed=7))
    assert not a.equals(make_fold_plan(ids, 5, 3, seed=8))
    for _, g in a.groupby("repeat"):
        assert sorted(g["participant_id"]) == sorted(ids)
        assert g["fold"].value_counts().max() - g["fold"].value_counts().min() <= 1
    assert not a[a.repeat == 0]["fold"].equals(a[a.repeat == 1]["fold"].reset_index(drop=True))
