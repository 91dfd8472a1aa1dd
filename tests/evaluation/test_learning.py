"""Did a network learn? The rules of :func:`check_learning` modelled exactly, and the
warning on real networks: one that cannot learn, one that does."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dfrn.evaluation.learning import (
    EARLY_FRACTION,
    FALL_FRACTION,
    check_learning,
    learning_warnings,
)


@pytest.mark.parametrize(("losses", "best", "epochs", "learned", "said"), [
    ([1.0, 0.7, 0.5, 0.4], 3, 4, True, ""),
    # kept in the first 10% of 50 epochs (epochs 1-5): stopped before learning
    ([1.0] + [0.5] * 10, 4, 50, False, "the kept epoch is 5 of 50"),
    ([1.0] + [0.5] * 10, 5, 50, True, ""),
    # the kept epoch's loss still at 80% of the first: a plateau
    ([1.0, 0.9, 0.8, 0.3], 2, 4, False, "fell only from 1 to 0.8"),
    ([1.0, 0.9, 0.79, 0.3], 2, 4, True, ""),
    ([1.0, float("nan")], 1, 2, False, "fell only from 1 to nan"),
    # an untrained network's first epoch is inflated: the mean's loss (1.0) is the reference
    ([1.46, 1.3, 1.08], 2, 3, False, "fell only from 1 to 1.08"),
    ([0.9, 0.75, 0.7], 2, 3, True, ""),  # the lower of the two: 0.7 < 80% of 0.9
])
def test_the_rules_at_their_edges(losses, best, epochs, learned, said) -> None:
    verdict = check_learning(losses, best, epochs, mean_loss=1.0)
    assert verdict.learned is learned and said in verdict.warning
    if not learned:
        assert "widen_factor = 0.25" in verdict.warning  # says what to try
    assert EARLY_FRACTION == 0.1 and FALL_FRACTION == 0.8


def test_warnings_are_one_line_per_factor_with_counts() -> None:
    table = pd.DataFrame({
        "factor": ["a", "a", "a", "b"], "task": ["t0", "t1", "t2", "t3"],
        "learned": [True, False, False, True],
        "warning": ["", "did not learn: x; try", "did not learn: y; try", ""]})
    assert learning_warnings(table) == {"a": "2 of 3 fold network(s) did not learn (e.g. t1: x; try)"}


def test_a_network_that_cannot_learn_is_flagged_one_that_learns_is_not() -> None:
    from dfrn.models.regressor import DFRNRegressor

    rng = np.random.default_rng(0)
    y = rng.standard_normal(16)
    vols = []
    for i in range(16):
        v = 0.5 * rng.standard_normal((12, 12, 12)).astype(np.float32)
        v[3:9, 3:9, 3:9] += np.float32(y[i])
        vols.append(v)
    kw = {"epochs": 6, "early_stopping": "none", "widen_factor": 0.125, "seed": 0}
    stuck = DFRNRegressor(lr=1e-7, **kw).fit(vols, y)  # a learning rate at which nothing moves
    learns = DFRNRegressor(**kw).fit(vols, y)
    for est, learned in ((stuck, False), (learns, True)):
        verdict = check_learning(est.history_["train_loss"], est.best_epoch_, 6, mean_loss=1.0)
        assert verdict.learned is learned, est.history_["train_loss"].tolist()
