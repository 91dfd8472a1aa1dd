"""When to stop training: the validation loss watched raw, smoothed, or not at all.

The inner validation split of a small cohort holds 8 to 10 subjects, so its loss jumps from
epoch to epoch; an early lucky epoch can then decide where training stops. And a network
that learns a subtle effect may sit on a plateau (training loss near that of predicting the
mean) for tens of epochs before its loss falls: a rule that counts patience from epoch 0
stops it before it learns. Four rules, chosen by ``[training] early_stopping``:

- ``"auto"`` (the default): when the validation split would hold fewer than
  ``min_val_subjects`` subjects (a training fold under 200 at ``val_fraction = 0.1``),
  no split is held out and the network trains for exactly ``epochs`` epochs (as ``"none"``;
  the log and the Methods say so). Otherwise the ``"smoothed"`` rule below, except that no
  epoch is kept or counted until training has begun: the training loss (mean squared
  error of the z-scored targets, 1.0 for predicting the mean) has fallen below
  ``learning_start``. A network that never begins keeps its last epoch.
- ``"val"`` (the paper's rule; dfrn's default before ``"auto"``): keep the weights of the
  epoch with the lowest raw validation loss; stop after ``patience`` epochs without a new
  lowest.
- ``"smoothed"``: the same on an exponential moving average of the validation loss
  (``s_t = smoothing × s_{t-1} + (1 - smoothing) × m_t``), from epoch ``min_epochs`` on:
  the first ``min_epochs - 1`` epochs are neither kept nor counted (a barely trained
  network that predicts about the mean has a low validation loss on a small split, and
  would otherwise be kept). ``m_t`` is the median of the last three epochs' losses, so one
  outlying epoch, a lucky low or a 35-fold jump, does not enter the average at all: it
  neither stops training nor becomes the kept epoch. Slower noise is damped by the average.
  A new lowest must beat the old by 0.1%, or the average would creep towards a plateau
  forever.
- ``"none"``: train for exactly ``epochs`` epochs and keep the last weights (no
  validation split is held out).

Without a validation split (``val_fraction = 0``, or too few subjects) the regressor uses
``"none"``: it keeps the last epoch's weights. :func:`plan_stopping` says which rule a
training set of a given size gets, and why, before any training (the log and the Methods
use it, so they never claim early stopping that did not happen).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

__all__ = ["EARLY_STOPPING_MODES", "EarlyStopping", "StopStep", "StoppingPlan", "plan_stopping",
           "SMOOTHED_MARGIN"]

#: A smoothed loss must beat the best so far by this fraction to count as a new best.
SMOOTHED_MARGIN = 1e-3

#: Valid ``[training] early_stopping`` values.
EARLY_STOPPING_MODES = ("auto", "val", "smoothed", "none")


@dataclass(frozen=True)
class StoppingPlan:
    """The rule one training set gets: :func:`plan_stopping`'s answer."""

    rule: str
    """The rule that runs: ``"auto"``, ``"val"``, ``"smoothed"`` or ``"none"``."""
    n_val: int
    """Inner validation subjects held out (0 for ``"none"``)."""
    reason: str = ""
    """Why the asked-for rule became ``"none"`` (empty when it did not)."""


def plan_stopping(mode: str, n_train: int, val_fraction: float,
                  min_val_subjects: int = 20) -> StoppingPlan:
    """The stopping rule and validation split for ``n_train`` training subjects.

    Parameters
    ----------
    mode : {"auto", "val", "smoothed", "none"}
        ``[training] early_stopping``.
    n_train : int
        Subjects the network is fitted on (the fold's training part).
    val_fraction : float
        ``[training] val_fraction``; the split holds ``floor(n_train * val_fraction)``.
    min_val_subjects : int, default 20
        ``"auto"`` only: the smallest split that may stop training.

    Returns
    -------
    StoppingPlan
        ``"none"`` with the reason when no split can be held out: under
        ``min_val_subjects`` for ``"auto"``, under 2 (or fewer than 2 left to train on) for
        ``"val"`` and ``"smoothed"``.
    """
    if mode not in EARLY_STOPPING_MODES:
        raise ValueError(f"early_stopping {mode!r} is not one of {', '.join(EARLY_STOPPING_MODES)}")
    if mode == "none":
        return StoppingPlan("none", 0)
    n_val = int(math.floor(n_train * val_fraction))
    if not val_fraction:
        return StoppingPlan("none", 0, "val_fraction is 0")
    smallest = min_val_subjects if mode == "auto" else 2
    if n_val < smallest or n_train - n_val < 2:
        return StoppingPlan("none", 0, (
            f"a validation split of {val_fraction:g} × {n_train} training subjects holds "
            f"{n_val}, fewer than {smallest}"))
    return StoppingPlan(mode, n_val)


@dataclass(frozen=True)
class StopStep:
    """What :meth:`EarlyStopping.update` decided for one epoch."""

    watched: float
    """The loss the rule watches (the smoothed one for ``"smoothed"``; NaN for ``"none"``)."""
    smoothed: float
    """The moving average of the (median-filtered) validation loss, logged in every mode."""
    improved: bool
    """This epoch's weights are the best so far (keep them)."""
    stop: bool
    """Stop after this epoch."""


@dataclass
class EarlyStopping:
    """An early-stopping rule fed one validation loss per epoch.

    Parameters
    ----------
    mode : {"auto", "val", "smoothed", "none"}
    patience : int
        Epochs without a new lowest watched loss before stopping.
    min_epochs : int
        ``"smoothed"`` only: the first epoch that may be kept (1-based); none stops earlier.
    smoothing : float
        ``"smoothed"`` and ``"auto"``: weight of the past in the moving average, in [0, 1).
    learning_start : float
        ``"auto"`` only: epochs are candidates (kept or counted) once the training loss
        passed to :meth:`update` is below this.

    Attributes
    ----------
    best_epoch_ : int
        The epoch whose weights are kept (-1 while there is none: keep the last).
    """

    mode: str = "val"
    patience: int = 10
    min_epochs: int = 10
    smoothing: float = 0.8
    learning_start: float = 0.8
    best_epoch_: int = field(default=-1, init=False)
    started_epoch_: int = field(default=-1, init=False)
    _best: float = field(default=math.inf, init=False, repr=False)
    _average: float = field(default=math.nan, init=False, repr=False)
    _recent: list[float] = field(default_factory=list, init=False, repr=False)
    _stale: int = field(default=0, init=False, repr=False)
    _epoch: int = field(default=-1, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in EARLY_STOPPING_MODES:
            raise ValueError(
                f"early_stopping {self.mode!r} is not one of {', '.join(EARLY_STOPPING_MODES)}"
            )
        if not 0.0 <= self.smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {self.smoothing}")

    def _waiting(self, train_loss: float) -> bool:
        """Whether this epoch comes before the rule may keep or count one."""
        if self.mode == "smoothed":
            return self._epoch + 1 < self.min_epochs
        if self.mode == "auto" and self.started_epoch_ < 0:
            if not train_loss < self.learning_start:
                return True
            self.started_epoch_ = self._epoch
        return False

    def update(self, val_loss: float, train_loss: float = math.nan) -> StopStep:
        """Record the next epoch's validation (and, for ``"auto"``, training) loss; decide."""
        self._epoch += 1
        if not math.isnan(val_loss):
            self._recent = [*self._recent[-2:], val_loss]
            level = float(statistics.median(self._recent))
            self._average = level if math.isnan(self._average) else (
                self.smoothing * self._average + (1.0 - self.smoothing) * level
            )
        if self.mode == "none":
            self.best_epoch_ = self._epoch
            return StopStep(math.nan, self._average, True, False)
        if self._waiting(train_loss):
            return StopStep(self._average, self._average, False, False)  # not a candidate yet
        if math.isnan(val_loss):  # a diverged network: never the one to keep
            self._stale += 1
            return StopStep(math.nan, self._average, False, self._stale >= self.patience)
        smoothed = self.mode in ("smoothed", "auto")
        watched = self._average if smoothed else val_loss
        # the average approaches a plateau forever: count only a gain of 0.1% or more
        margin = SMOOTHED_MARGIN * abs(self._best) if smoothed and self._best < math.inf else 0
        improved = watched < self._best - margin
        if improved:
            self._best, self.best_epoch_, self._stale = watched, self._epoch, 0
        else:
            self._stale += 1
        stop = self._stale >= self.patience
        return StopStep(watched, self._average, improved, stop)
