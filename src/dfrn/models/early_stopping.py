"""When to stop training: the validation loss watched raw, smoothed, or not at all.

The inner validation split of a small cohort holds 8 to 10 subjects, so its loss jumps from
epoch to epoch; an early lucky epoch can then decide where training stops. Three rules,
chosen by ``[training] early_stopping``:

- ``"val"`` (the default, as before): keep the weights of the epoch with the lowest raw
  validation loss; stop after ``patience`` epochs without a new lowest.
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
``"none"``: it keeps the last epoch's weights.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

__all__ = ["EARLY_STOPPING_MODES", "EarlyStopping", "StopStep"]

#: Valid ``[training] early_stopping`` values.
EARLY_STOPPING_MODES = ("val", "smoothed", "none")


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
    mode : {"val", "smoothed", "none"}
    patience : int
        Epochs without a new lowest watched loss before stopping.
    min_epochs : int
        ``"smoothed"`` only: the first epoch that may be kept (1-based); none stops earlier.
    smoothing : float
        ``"smoothed"`` only: weight of the past in the moving average, in [0, 1).

    Attributes
    ----------
    best_epoch_ : int
        The epoch whose weights are kept (-1 while there is none: keep the last).
    """

    mode: str = "val"
    patience: int = 10
    min_epochs: int = 10
    smoothing: float = 0.8
    best_epoch_: int = field(default=-1, init=False)
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

    def update(self, val_loss: float) -> StopStep:
        """Record the next epoch's validation loss and decide."""
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
        if self.mode == "smoothed" and self._epoch + 1 < self.min_epochs:
            return StopStep(self._average, self._average, False, False)  # not a candidate yet
        if math.isnan(val_loss):  # a diverged network: never the one to keep
            self._stale += 1
            return StopStep(math.nan, self._average, False, self._stale >= self.patience)
        watched = self._average if self.mode == "smoothed" else val_loss
        # the average approaches a plateau forever: count only a gain of 0.1% or more
        margin = 1e-3 * abs(self._best) if self.mode == "smoothed" and self._best < math.inf else 0
        improved = watched < self._best - margin
        if improved:
            self._best, self.best_epoch_, self._stale = watched, self._epoch, 0
        else:
            self._stale += 1
        stop = self._stale >= self.patience
        return StopStep(watched, self._average, improved, stop)
