"""ComBat harmonisation of ROI features across sites, learned on a training fold.

The model is learned by ``neuroCombat`` (Fortin et al. 2018; the library behind
neuroHarmonize), with empirical Bayes and parametric priors, keeping the effects of the
covariates it is given. Its fitted parameters (the grand mean, the pooled variance, the
covariate coefficients and each site's shrunken location ``γ*`` and scale ``δ*``) are then
applied to any rows, training or test, with ComBat's adjustment::

    z = (x - mean - C @ B) / sqrt(var)            # standardise, covariate effects kept aside
    x* = (z - γ*[site]) / sqrt(δ*[site]) * sqrt(var) + mean + C @ B

which is what ``neuroCombat`` does to its training data (the tests check it reproduces
``neuroCombat``'s own output exactly) and what neuroHarmonize's ``harmonizationApply`` does to
new data. ``neuroCombatFromTraining`` is not used: it ignores covariates and fails on
NumPy 2. neuroHarmonize itself is not a dependency: it pins NumPy below 2. combatlearn 2.3
was compared and not chosen: on a planted three-site cohort (300 subjects, 100 features,
site scales 1, 2 and 0.5) its harmonised site SDs were 1.30, 1.33 and 1.19, where
neuroCombat's were 1.31, 1.31 and 1.31, and the two outputs differed by up to 0.49.

:func:`check_combat_plan` refuses, before any training, a fold plan in which some site has
fewer than 2 training subjects in some split (the fold plan is known up front).

Install with ``pip install 'dfrn[harmonize]'``.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from dfrn.errors import DfrnInputError

__all__ = ["ComBatHarmonizer", "require_neurocombat", "check_combat_plan"]

#: ComBat's per-site scale needs at least this many training subjects of each site.
MIN_SITE_SUBJECTS = 2


def require_neurocombat():
    """The ``neuroCombat`` function; a one-line error when the extra is not installed."""
    try:
        from neuroCombat import neuroCombat
    except ImportError:
        raise DfrnInputError(
            "[baseline] harmonize = 'combat' needs neuroCombat: pip install 'dfrn[harmonize]'"
        ) from None
    return neuroCombat


@dataclass
class ComBatHarmonizer:
    """ComBat learned with ``neuroCombat`` on some rows, applicable to any rows.

    Attributes
    ----------
    sites_ : list of str
        The training rows' sites (ComBat's batches), in ``neuroCombat``'s order.
    grand_mean_ : ndarray of shape (p,)
    var_pooled_ : ndarray of shape (p,)
    coef_ : ndarray of shape (q, p)
        The covariates' coefficients (their effects are kept).
    gamma_star_, delta_star_ : ndarray of shape (n_sites, p)
        Each site's empirical-Bayes location and scale.
    """

    sites_: list[str] = field(default_factory=list)
    grand_mean_: np.ndarray | None = None
    var_pooled_: np.ndarray | None = None
    coef_: np.ndarray | None = None
    gamma_star_: np.ndarray | None = None
    delta_star_: np.ndarray | None = None

    def fit(self, x: np.ndarray, sites: np.ndarray, covariates: np.ndarray | None = None
            ) -> ComBatHarmonizer:
        """Learn ComBat on ``x`` (rows: subjects), keeping ``covariates``' effects.

        Raises
        ------
        DfrnInputError
            When a site has fewer than 2 training subjects (its scale is undefined).
        """
        neuro_combat = require_neurocombat()
        sites = np.asarray(sites).astype(str)
        levels, counts = np.unique(sites, return_counts=True)
        if (counts < MIN_SITE_SUBJECTS).any():
            small = counts < MIN_SITE_SUBJECTS
            raise DfrnInputError(
                f"site {str(levels[small][0])!r} has {counts[small][0]} training subject(s): "
                "ComBat needs at least 2 per site; merge small sites or use [cv] groups"
            )
        q = 0 if covariates is None else covariates.shape[1]
        cov_names = [f"c{j}" for j in range(q)]
        covars = pd.DataFrame({"site": sites})
        for j, name in enumerate(cov_names):
            covars[name] = np.asarray(covariates, float)[:, j]  # type: ignore[index]
        with contextlib.redirect_stdout(io.StringIO()):  # neuroCombat prints its progress
            out = neuro_combat(dat=np.asarray(x, float).T, covars=covars, batch_col="site",
                               continuous_cols=cov_names or None)
        est = out["estimates"]
        self.sites_ = [str(s) for s in est["batches"]]
        self.grand_mean_ = np.asarray(est["stand.mean"])[:, 0]
        self.var_pooled_ = np.asarray(est["var.pooled"])[:, 0]
        self.gamma_star_ = np.asarray(est["gamma.star"])
        self.delta_star_ = np.asarray(est["delta.star"])
        mod_mean = np.asarray(est["mod.mean"])
        self.coef_ = (np.linalg.lstsq(np.asarray(covariates, float), mod_mean.T, rcond=None)[0]
                      if q else np.zeros((0, x.shape[1])))
        return self

    def transform(self, x: np.ndarray, sites: np.ndarray, covariates: np.ndarray | None = None
                  ) -> np.ndarray:
        """Harmonise rows of ``x`` with the learned parameters.

        Raises
        ------
        DfrnInputError
            When a row's site was not among the training rows' sites (naming it).
        """
        if self.grand_mean_ is None:
            raise RuntimeError("ComBatHarmonizer is not fitted")
        sites = np.asarray(sites).astype(str)
        unseen = sorted(set(sites) - set(self.sites_))
        if unseen:
            n = int(np.sum(sites == unseen[0]))
            raise DfrnInputError(
                f"site {str(unseen[0])!r} of {n} test subject(s) has no training subject, so ComBat "
                "cannot harmonise it; use [cv] groups = <the site column> only without "
                "harmonize, or keep every site in every training fold"
            )
        kept = self.grand_mean_ + (0.0 if covariates is None or not len(self.coef_)  # type: ignore[arg-type]
                                   else np.asarray(covariates, float) @ self.coef_)
        sd = np.sqrt(self.var_pooled_)
        z = (np.asarray(x, float) - kept) / sd
        k = np.array([self.sites_.index(s) for s in sites])
        z = (z - self.gamma_star_[k]) / np.sqrt(self.delta_star_[k])  # type: ignore[index]
        return z * sd + kept


def check_combat_plan(plan: pd.DataFrame, sites: pd.Series,
                      targets: pd.DataFrame | None = None) -> None:
    """Refuse a fold plan on which ComBat cannot be learned, before any training.

    ComBat is learned on each split's training subjects that have a value of the factor,
    and applied to its test subjects with a value: every site of those subjects needs at
    least :data:`MIN_SITE_SUBJECTS` of them in the training part (a split without test
    subjects for a factor is skipped, as the ridge skips it).

    Parameters
    ----------
    plan : DataFrame
        The fold plan (``participant_id``, ``repeat``, ``fold``).
    sites : Series
        Site labels indexed by participant_id.
    targets : DataFrame, optional
        The targets (NaN for a missing value); without them every subject counts.

    Raises
    ------
    DfrnInputError
        One line naming the repeat, the fold, the site (and the factor) and the count.
    """
    ids = plan["participant_id"].astype(str)
    site = ids.map(sites.set_axis(sites.index.astype(str))).astype(str)
    factors = [None] if targets is None else [str(f) for f in targets.columns]
    values = None if targets is None else targets.set_axis(targets.index.astype(str))
    for factor in factors:
        keep = (np.ones(len(plan), bool) if values is None
                else ids.map(values[factor].notna()).fillna(False).to_numpy(bool))
        test = pd.crosstab([plan["repeat"][keep], plan["fold"][keep]], site[keep])
        for (repeat, fold), row in test.iterrows():
            train = test.loc[repeat].sum() - row  # the repeat's subjects outside this fold
            small = train[(train < MIN_SITE_SUBJECTS) & (train + row > 0)]
            if len(small):
                _refuse_small_site(repeat, fold, str(small.index[0]), int(small.iloc[0]),
                                   int(row[small.index[0]]), factor)


def _refuse_small_site(repeat: int, fold: int, site: str, n_train: int, n_test: int,
                       factor: str | None) -> None:
    of = "" if factor is None else f" with a value of factor {factor!r}"
    where = f"repeat {repeat} fold {fold}: site {site!r}"
    if n_train == 0:
        raise DfrnInputError(
            f"{where} has no training subject{of}, so ComBat cannot harmonise its {n_test} test "
            "subject(s) ([baseline] harmonize = \"combat\"); keep every site in every training "
            "fold ([cv] groups on the site column cannot be combined with ComBat)"
        )
    raise DfrnInputError(
        f"{where} has {n_train} training subject{'' if n_train == 1 else 's'}{of}: ComBat "
        f"([baseline] harmonize = \"combat\") needs at least {MIN_SITE_SUBJECTS} per site in "
        "every training fold; merge small sites, add subjects, or set [baseline] harmonize = "
        '"none"'
    )
