"""Did a network learn? Plain-words checks of each trained network's history.

A network whose kept epoch comes in the first 10% of its epochs, or whose training loss at
the kept epoch is still above 80% of its first epoch's (or of the loss of predicting the
mean, 1.0 for z-scored targets, when that is lower: an untrained network's first epoch is
inflated by its random offset), has not learned anything from the images: its out-of-fold r then says nothing about the brain, and "nothing detectable"
would be the tool's fault, not the cohort's. :func:`check_learning` says so for one
network, :func:`learning_table` for every CV task, and :func:`learning_warnings` sums it up
per factor for the log and the report.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

__all__ = ["LearningCheck", "check_learning", "learning_warnings", "LEARNING_COLUMNS",
           "EARLY_FRACTION", "FALL_FRACTION"]

#: A kept epoch before this fraction of the epochs counts as "stopped before learning".
EARLY_FRACTION = 0.1
#: The kept epoch's training loss must be below this fraction of the first epoch's.
FALL_FRACTION = 0.8
#: Columns of ``cv/learning.tsv``.
LEARNING_COLUMNS = ("factor", "repeat", "fold", "seed", "task", "epochs", "epochs_trained",
                    "best_epoch", "first_train_loss", "kept_train_loss", "stopping",
                    "learned", "warning")

_ADVICE = ("try more epochs (the paper's 50), early_stopping = 'none' or 'auto', a narrower "
           "network (widen_factor = 0.25) or a coarser input (downsample); until then its "
           "out-of-fold r says nothing about the brain")


@dataclass(frozen=True)
class LearningCheck:
    """:func:`check_learning`'s verdict on one network."""

    learned: bool
    warning: str
    """Empty when the network learned; otherwise what went wrong and what to try."""


def check_learning(train_loss: Sequence[float], best_epoch: int, epochs: int,
                   mean_loss: float | None = None) -> LearningCheck:
    """Whether a network's history shows that it learned.

    Parameters
    ----------
    train_loss : sequence of float
        The training loss of each epoch trained (``history.tsv``'s ``train_loss``).
    best_epoch : int
        The kept epoch (0-based).
    epochs : int
        The epochs allowed (``[training] epochs``).
    mean_loss : float, optional
        The training loss of predicting the mean (1.0 for z-scored targets); the reference
        is the lower of it and the first epoch's loss.

    Returns
    -------
    LearningCheck
        Not learned when the kept epoch is in the first :data:`EARLY_FRACTION` of
        ``epochs``, or its training loss is at least :data:`FALL_FRACTION` of the
        reference (NaN losses count as not learned).
    """
    losses = np.asarray(train_loss, dtype=float)
    if not len(losses):
        return LearningCheck(False, "no epoch was trained; " + _ADVICE)
    kept = min(max(int(best_epoch), 0), len(losses) - 1)
    first, at_kept = float(losses[0]), float(losses[kept])
    if mean_loss is not None:
        first = min(first, float(mean_loss))
    problems = []
    if kept < EARLY_FRACTION * epochs:
        problems.append(f"the kept epoch is {kept + 1} of {epochs}")
    if not at_kept < FALL_FRACTION * first or math.isnan(at_kept):
        problems.append(f"its training loss fell only from {first:.3g} to {at_kept:.3g} "
                        f"(not below {FALL_FRACTION:.0%} of the first epoch's or the mean's)")
    if not problems:
        return LearningCheck(True, "")
    return LearningCheck(False, "did not learn: " + " and ".join(problems) + "; " + _ADVICE)


def learning_warnings(table: pd.DataFrame) -> dict[str, str]:
    """One sentence per factor with networks that did not learn (``cv/learning.tsv`` rows).

    Returns
    -------
    dict
        ``factor -> "3 of 10 fold networks did not learn: <the first one's reason>"``;
        factors whose networks all learned are absent.
    """
    out: dict[str, str] = {}
    for factor, rows in table.groupby("factor", sort=False):
        bad = rows[~rows["learned"].astype(bool)]
        if len(bad):
            first = str(bad["warning"].iloc[0]).removeprefix("did not learn: ")
            out[str(factor)] = (f"{len(bad)} of {len(rows)} fold network(s) did not learn "
                                f"(e.g. {bad['task'].iloc[0]}: {first})")
    return out
