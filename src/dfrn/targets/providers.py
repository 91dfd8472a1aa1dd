"""Targets derived from rating-scale items: the ``[factors]`` section of a study.

Two modes (``fit_on``):

* ``"all"`` — the paper's way: one PCA + varimax fit on the whole cohort; its factor scores
  are the targets of every fold. Simple, but the test subjects' items shape the factors
  their scores are measured on (a mild leak).
* ``"train"`` — leak-free: inside each (repeat, fold) the factors are fitted on the
  training subjects only and the test subjects are projected with those weights. Fold fits
  are aligned to the full-cohort fit (Hungarian matching of loadings, then sign) only to
  name and orient them consistently; their loadings, means and SDs come from the training
  fold.

Either way the full-cohort fit is written to ``factors/`` (loadings, scores, variance) with
the loadings heatmap ``figures/factor_loadings.png`` (by :mod:`dfrn.workflows.factors`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import pandas as pd

from dfrn.config import FactorsConfig
from dfrn.data.cohort import Cohort
from dfrn.errors import DfrnInputError
from dfrn.io import check_safe_id
from dfrn.targets.factors import (
    FewParticipantsWarning,
    SymptomFactors,
    check_complete,
    fold_factor_scores,
)
from dfrn.targets.retention import resolve_n_factors

__all__ = [
    "TargetProvider",
    "StaticTargets",
    "factor_targets",
    "fit_factor_model",
    "FoldFactorTargets",
    "ResidualizedTargets",
    "ConfoundFit",
    "fit_confounds",
]


class TargetProvider(Protocol):
    """Gives the training and test targets of one split (index participant_id)."""

    def __call__(
        self, repeat: int, fold: int, train_ids: Sequence[str], test_ids: Sequence[str]
    ) -> tuple[pd.DataFrame, pd.DataFrame]: ...


@dataclass
class StaticTargets:
    """Targets fixed before cross-validation (a score column, or factors fitted on all)."""

    targets: pd.DataFrame

    def __call__(
        self, repeat: int, fold: int, train_ids: Sequence[str], test_ids: Sequence[str]
    ) -> tuple[pd.DataFrame, pd.DataFrame]:
        return self.targets.loc[list(train_ids)], self.targets.loc[list(test_ids)]


@dataclass
class FoldFactorTargets:
    """Factor scores refitted inside each training fold (``fit_on = "train"``).

    A training fold smaller than the number of items is not warned about here, fold by fold
    in the fold's count: the study's stability estimate warns once, in the user's terms
    (:func:`dfrn.targets.stability.fold_stability`).
    """

    items: pd.DataFrame
    reference: SymptomFactors
    method: str = "hungarian"
    _cache: dict[tuple[int, int], pd.DataFrame] = field(default_factory=dict)

    def __call__(
        self, repeat: int, fold: int, train_ids: Sequence[str], test_ids: Sequence[str]
    ) -> tuple[pd.DataFrame, pd.DataFrame]:
        key = (repeat, fold)
        if key not in self._cache:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FewParticipantsWarning)
                self._cache[key] = fold_factor_scores(
                    self.items, list(train_ids), list(test_ids), self.reference,
                    include_train=True, method=self.method,
                )
        scores = self._cache[key]
        return scores.loc[list(train_ids)], scores.loc[list(test_ids)]


def fit_factor_model(cohort: Cohort, cfg: FactorsConfig) -> tuple[SymptomFactors, pd.DataFrame]:
    """Check the ``[factors]`` items and fit the full-cohort model; return it and the items."""
    if not cfg.items:
        raise DfrnInputError("config [factors] items is empty: list the item columns")
    missing = [c for c in cfg.items if c not in cohort.table.columns]
    if missing:
        raise DfrnInputError(
            f"item column {missing[0]!r} is not in the cohort table "
            f"(available: {', '.join(map(str, cohort.table.columns))})"
        )
    for name in cfg.names:
        check_safe_id(name, "factor name")
    items = cohort.table[list(cfg.items)]
    if not cfg.impute:
        check_complete(items, 'set [factors] impute = "median"')
    n_factors = resolve_n_factors(items, cfg.n_factors, option="[factors] n_factors = N")
    reference = SymptomFactors(
        n_factors=n_factors,
        names=dict(cfg.names) or None,
        impute=cfg.impute or None,
        tol=cfg.tol,
    )
    reference.fit(items)
    return reference, items


def factor_targets(
    cohort: Cohort,
    cfg: FactorsConfig,
    plan: pd.DataFrame | None = None,
    log: Callable[[str], None] = print,
) -> tuple[pd.DataFrame, TargetProvider]:
    """Fit the factors and return (full-cohort scores, target provider). Writes nothing."""
    reference, items = fit_factor_model(cohort, cfg)
    scores = reference.scores_.copy()
    var = reference.variance_table()
    where = "all subjects" if cfg.fit_on == "all" else "per training fold, aligned to the full fit"
    log(
        f"factors fitted on {len(items)} subjects ({where}); variance explained: "
        + ", ".join(f"{r.factor} {100 * r.proportion:.1f}%" for r in var.itertuples())
    )
    if cfg.fit_on == "all":
        return scores, StaticTargets(scores)
    log(f"fold fits are aligned to the full fit by {cfg.align} matching")
    return scores, FoldFactorTargets(items, reference, cfg.align)


@dataclass(frozen=True)
class ConfoundFit:
    """One factor's target regression on the covariates, fitted on a training fold.

    ``residual = y - (intercept + C @ coef)``; ``columns`` name the encoded covariates.
    """

    intercept: float
    coef: tuple[float, ...]
    columns: tuple[str, ...]

    def fitted(self, design: pd.DataFrame) -> np.ndarray:
        """``intercept + C @ coef`` for the rows of ``design`` (encoded covariates)."""
        return self.intercept + design[list(self.columns)].to_numpy(float) @ np.asarray(self.coef)

    def to_dict(self) -> dict[str, object]:
        return {"intercept": self.intercept, "coef": list(self.coef), "columns": list(self.columns)}

    @classmethod
    def from_dict(cls, d: dict) -> ConfoundFit:
        return cls(float(d["intercept"]), tuple(float(c) for c in d["coef"]),
                   tuple(str(c) for c in d["columns"]))


def fit_confounds(y: pd.Series, design: pd.DataFrame) -> ConfoundFit:
    """Ordinary least squares ``y ~ 1 + C`` on the subjects of ``y`` that have a value.

    Uses scikit-learn's ``LinearRegression`` (minimum-norm solution where a column is constant
    in these subjects, e.g. a site with no training subject).
    """
    from sklearn.linear_model import LinearRegression

    y = y.dropna()
    x = design.loc[list(y.index)].to_numpy(float)
    lr = LinearRegression().fit(x, y.to_numpy(float))
    return ConfoundFit(float(lr.intercept_), tuple(float(c) for c in lr.coef_),
                       tuple(map(str, design.columns)))


@dataclass
class ResidualizedTargets:
    """Targets with the covariates regressed out inside each training fold.

    For every split and factor, ``y ~ 1 + C`` is fitted on the training subjects only
    (:func:`fit_confounds`) and its fitted values are subtracted from the training *and* the
    test subjects' targets, so a test subject's residual never depends on its own target.

    Parameters
    ----------
    base : TargetProvider
        The raw targets (a score table, or per-fold factor fits).
    design : DataFrame
        Encoded covariates, indexed by participant_id (every study subject).
    """

    base: TargetProvider
    design: pd.DataFrame
    _fits: dict[tuple[int, int], dict[str, ConfoundFit]] = field(default_factory=dict)

    def __call__(
        self, repeat: int, fold: int, train_ids: Sequence[str], test_ids: Sequence[str]
    ) -> tuple[pd.DataFrame, pd.DataFrame]:
        y_train, y_test = self.base(repeat, fold, train_ids, test_ids)
        fits = self.fits(repeat, fold, train_ids, test_ids)
        r_train, r_test = y_train.copy(), y_test.copy()
        for factor, fit in fits.items():
            r_train[factor] = y_train[factor] - fit.fitted(self.design.loc[list(y_train.index)])
            r_test[factor] = y_test[factor] - fit.fitted(self.design.loc[list(y_test.index)])
        return r_train, r_test

    def fits(
        self, repeat: int, fold: int, train_ids: Sequence[str], test_ids: Sequence[str]
    ) -> dict[str, ConfoundFit]:
        """The split's fitted regression of each factor (fitted on ``train_ids`` only)."""
        key = (repeat, fold)
        if key not in self._fits:
            y_train, _ = self.base(repeat, fold, train_ids, test_ids)
            self._fits[key] = {f: fit_confounds(y_train[f], self.design) for f in y_train.columns}
        return self._fits[key]
