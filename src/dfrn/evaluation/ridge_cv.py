"""Cross-validation of the ridge baseline on the study's fold plan: the one ridge CV loop.

:func:`cross_validate_ridge` fits one :class:`dfrn.models.ridge.RidgeBaseline` per
(repeat, fold, factor) on the training subjects of the network's fold plan and predicts
the test subjects. Targets come either fixed before cross-validation (a DataFrame, or a
:class:`dfrn.targets.providers.StaticTargets`) or from any
:class:`dfrn.targets.providers.TargetProvider`, which is asked for each split's training
and test targets (e.g. factors refitted on the training fold); a fixed table is simply a
provider whose answer does not depend on the fold. A subject whose target is missing
(NaN) is left out of that factor's training and test sets; other factors keep it.

The helpers below (:func:`align_ridge_inputs`, :func:`align_targets`, :func:`split_rows`,
:func:`prepare_split_engine`) are shared with the fast ridge permutation test of
:mod:`dfrn.evaluation.permutation`.

The same loop, the same helpers and the same permutation test run the **voxel ridge**:
given :class:`GramInputs` (the linear Gram matrix of the network's inputs, see
:func:`dfrn.models.ridge.voxel_gram`) instead of an ROI table, each split is solved in the
dual by :class:`dfrn.models.ridge.KernelRidgeCV` (features centred on the training
subjects, penalty chosen by inner CV on them); it takes no covariates (the study's
residualised targets, from the target provider, are how it adjusts).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Literal, overload

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from dfrn.errors import DfrnInputError
from dfrn.evaluation.folds import iter_splits
from dfrn.evaluation.metrics import PREDICTION_COLUMNS
from dfrn.models.ridge import (
    DEFAULT_ALPHAS,
    KernelRidgeCV,
    MultiTargetRidgeCV,
    RidgeBaseline,
    apply_preprocess,
    encode_covariates,
    fit_preprocess,
    index_by_participant,
)
from dfrn.targets.providers import StaticTargets, TargetProvider

__all__ = [
    "RidgeInputs",
    "GramInputs",
    "align_ridge_inputs",
    "align_targets",
    "split_rows",
    "prepare_split_engine",
    "cross_validate_ridge",
]

ModelKey = tuple[int, int, str]


class _SubjectRows:
    """Row positions of participants in ``ids`` (shared by the two kinds of inputs)."""

    ids: list[str]

    @cached_property
    def _positions(self) -> dict[str, int]:
        return {p: i for i, p in enumerate(self.ids)}

    def rows(self, labels: Sequence[str]) -> np.ndarray:
        """Row positions of participant ``labels`` (strings) in :attr:`ids`."""
        pos = self._positions
        missing = [p for p in labels if p not in pos]
        if missing:
            raise DfrnInputError(f"subject {missing[0]} is not in the fold plan")
        return np.array([pos[p] for p in labels], dtype=int)


@dataclass(frozen=True)
class GramInputs(_SubjectRows):
    """The voxel ridge's inputs: the subjects' linear Gram matrix over the network's voxels.

    Attributes
    ----------
    ids : list of str
        The subjects, in row order of ``gram``.
    gram : ndarray of shape (n, n)
        :func:`dfrn.models.ridge.voxel_gram` of their network inputs.
    """

    ids: list[str]
    gram: np.ndarray

    def subset(self, ids: Sequence[str]) -> GramInputs:
        """The inputs of subjects ``ids``, in that order.

        Raises
        ------
        DfrnInputError
            When a subject has no network input here.
        """
        pos = self._positions
        missing = [p for p in ids if p not in pos]
        if missing:
            raise DfrnInputError(
                f"subject {missing[0]} of the fold plan has no network input "
                f"({len(missing)} subject(s) missing)"
            )
        idx = np.array([pos[p] for p in ids], dtype=int)
        return GramInputs(list(ids), self.gram[np.ix_(idx, idx)])


@dataclass(frozen=True)
class RidgeInputs(_SubjectRows):
    """The plan's subjects with their features and covariates as arrays.

    Attributes
    ----------
    ids : list of str
        The fold plan's subjects, in order of first appearance.
    x : ndarray of shape (n, p)
        ROI features, finite.
    covariates : ndarray of shape (n, q) or None
        Encoded covariates (see :func:`dfrn.models.ridge.encode_covariates`).
    sites : ndarray of str, shape (n,), or None
        Site labels: ComBat harmonises the features across them inside each split.
    preserve : ndarray of shape (n, k) or None
        The covariates whose effects ComBat keeps (those of ``covariates`` that are not
        site dummies).
    """

    ids: list[str]
    x: np.ndarray
    covariates: np.ndarray | None
    sites: np.ndarray | None = None
    preserve: np.ndarray | None = None

    def split_features(self, tr: np.ndarray, te: np.ndarray, where: str = "") -> tuple[
            np.ndarray, np.ndarray]:
        """The features of rows ``tr`` and ``te``, ComBat-harmonised when sites are set.

        ComBat is learned on rows ``tr`` only and applied to both (see
        :class:`dfrn.models.harmonize.ComBatHarmonizer`); ``where`` names the split in
        messages.
        """
        if self.sites is None:
            return self.x[tr], self.x[te]
        from dfrn.models.harmonize import ComBatHarmonizer

        p = self.preserve
        try:
            h = ComBatHarmonizer().fit(self.x[tr], self.sites[tr], None if p is None else p[tr])
            return (h.transform(self.x[tr], self.sites[tr], None if p is None else p[tr]),
                    h.transform(self.x[te], self.sites[te], None if p is None else p[te]))
        except DfrnInputError as exc:
            raise DfrnInputError(f"{where}: {exc}" if where else str(exc)) from None


def _first_bad(df: pd.DataFrame, bad: np.ndarray) -> tuple[str, str]:
    i, j = np.argwhere(bad)[0]
    return str(df.index[i]), str(df.columns[j])


def _plan_ids(plan: pd.DataFrame) -> list[str]:
    return [str(p) for p in dict.fromkeys(plan["participant_id"].astype(str))]


def _require(ids: list[str], table: pd.DataFrame, what: str) -> None:
    missing = [p for p in ids if p not in table.index]
    if missing:
        raise DfrnInputError(
            f"subject {missing[0]} of the fold plan has no {what} "
            f"({len(missing)} subject(s) missing)"
        )


def _float_targets(targs: pd.DataFrame, what: str) -> pd.DataFrame:
    """Numeric target columns as floats; NaN allowed (missing), infinity refused."""
    non_numeric = [c for c in targs.columns if not pd.api.types.is_numeric_dtype(targs[c])]
    if non_numeric:
        raise DfrnInputError(f"{what} column '{non_numeric[0]}' is not numeric")
    targs = targs.astype(float)
    if np.isinf(targs.to_numpy()).any():
        pid, col = _first_bad(targs, np.isinf(targs.to_numpy()))
        raise DfrnInputError(f"target '{col}' is infinite for subject {pid}")
    return targs


def align_ridge_inputs(
    features: pd.DataFrame | GramInputs,
    plan: pd.DataFrame,
    covariates: pd.DataFrame | None = None,
    sites: pd.Series | None = None,
    preserve: pd.DataFrame | None = None,
) -> RidgeInputs | GramInputs:
    """Features and covariates of the plan's subjects, checked and in plan order.

    Parameters
    ----------
    features : DataFrame or GramInputs
        ROI features, indexed by ``participant_id`` (or holding it as a column); or the
        voxel ridge's Gram matrix (then without covariates or sites).
    plan : DataFrame
        The fold plan (``participant_id``, ``repeat``, ``fold``).
    covariates : DataFrame, optional
        Raw covariates; encoded with :func:`dfrn.models.ridge.encode_covariates`.
    sites : Series, optional
        Site labels indexed by participant_id: ComBat harmonisation inside each split.
    preserve : DataFrame, optional
        Encoded covariates whose effects ComBat keeps (with ``sites``).

    Returns
    -------
    RidgeInputs or GramInputs

    Raises
    ------
    DfrnInputError
        When a plan subject lacks features or covariates, or a feature is non-numeric,
        missing or infinite (naming the column and subject).
    """
    ids = _plan_ids(plan)
    if isinstance(features, GramInputs):
        if covariates is not None or sites is not None:
            raise ValueError("the voxel ridge takes no covariates or sites (residualise y)")
        return features.subset(ids)
    feats = index_by_participant(features, "ROI feature table")
    _require(ids, feats, "ROI features")
    cov = None
    if covariates is not None:
        cov = encode_covariates(covariates)
        _require(ids, cov, "covariates")
    feats = feats.loc[ids]
    non_numeric = [c for c in feats.columns if not pd.api.types.is_numeric_dtype(feats[c])]
    if non_numeric:
        raise DfrnInputError(f"ROI feature column '{non_numeric[0]}' is not numeric")
    x = feats.to_numpy(dtype=float)
    if not np.all(np.isfinite(x)):
        pid, col = _first_bad(feats, ~np.isfinite(x))
        raise DfrnInputError(f"ROI feature '{col}' is missing or infinite for subject {pid}")
    c = None if cov is None else cov.loc[ids].to_numpy(dtype=float)
    return RidgeInputs(ids, x, c, *_combat_inputs(ids, sites, preserve))


def _combat_inputs(ids: list[str], sites: pd.Series | None, preserve: pd.DataFrame | None
                   ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """ComBat's site labels and kept covariates of subjects ``ids`` (None without sites)."""
    if sites is None:
        return None, None
    by_id = sites.set_axis(sites.index.astype(str))
    _require(ids, by_id.to_frame(), "site")
    k = None
    if preserve is not None:
        keep = index_by_participant(preserve, "ComBat covariates")
        _require(ids, keep, "ComBat covariates")
        k = keep.loc[ids].to_numpy(dtype=float)
    return by_id.loc[ids].astype(str).to_numpy(), k


def align_targets(targets: pd.DataFrame, ids: list[str]) -> pd.DataFrame:
    """Targets of subjects ``ids`` (in that order) as floats; NaN marks a missing value.

    Parameters
    ----------
    targets : DataFrame
        One column per factor, indexed by ``participant_id`` (or holding it as a column).
    ids : list of str
        The subjects, e.g. :attr:`RidgeInputs.ids`.

    Returns
    -------
    DataFrame

    Raises
    ------
    DfrnInputError
        When a subject has no row, a column is not numeric or a value is infinite.
    """
    targs = index_by_participant(targets, "targets table")
    _require(ids, targs, "targets")
    return _float_targets(targs.loc[ids], "target")


def split_rows(
    ids: list[str], train: Sequence[str], test: Sequence[str], observed: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Row positions of one split's training and test subjects that have a target value.

    Parameters
    ----------
    ids : list of str
        All subjects (row order of ``observed``).
    train, test : sequence of str
        The split's subjects.
    observed : ndarray of bool, shape (len(ids),)
        Whether each subject has a value.

    Returns
    -------
    tr, te : ndarray of int
        In the order of ``train`` and ``test``.
    """
    pos = {p: i for i, p in enumerate(ids)}
    tr = np.array([pos[str(p)] for p in train], dtype=int)
    te = np.array([pos[str(p)] for p in test], dtype=int)
    return tr[observed[tr]], te[observed[te]]


def prepare_split_engine(
    inputs: RidgeInputs | GramInputs,
    tr: np.ndarray,
    te: np.ndarray,
    alphas: Sequence[float],
    inner_cv: int,
    where: str = "",
) -> MultiTargetRidgeCV:
    """The target-independent part of :class:`RidgeBaseline` for one split, with test rows.

    ComBat (when ``inputs`` has sites), covariate regression and scaling are fitted on rows
    ``tr`` and applied to ``tr`` and ``te``; the returned engine then solves any number of
    target columns on ``tr`` and predicts ``te`` (the same numbers as fitting
    ``RidgeBaseline`` per column). For :class:`GramInputs` it is the voxel ridge's
    :class:`dfrn.models.ridge.KernelRidgeCV` (centring and scale fitted on ``tr``).

    Parameters
    ----------
    inputs : RidgeInputs or GramInputs
    tr, te : ndarray of int
        Training and test rows.
    alphas : sequence of float
    inner_cv : int

    Returns
    -------
    MultiTargetRidgeCV
    """
    if isinstance(inputs, GramInputs):
        return KernelRidgeCV(inputs.gram, tr, te, alphas, inner_cv)
    c = inputs.covariates
    c_tr = None if c is None else c[tr]
    c_te = None if c is None else c[te]
    x_tr, x_te = inputs.split_features(tr, te, where)
    b0, b, scaler = fit_preprocess(x_tr, c_tr)
    z_train = apply_preprocess(x_tr, c_tr, b0, b, scaler)
    z_test = apply_preprocess(x_te, c_te, b0, b, scaler)
    return MultiTargetRidgeCV(z_train, z_test, alphas, inner_cv)


def _fold_targets(
    table: pd.DataFrame, allowed: set[str], part: str, repeat: int, fold: int
) -> pd.DataFrame:
    """A provider's answer for one split, checked: its subjects belong to that part."""
    table = table.copy()
    table.index = table.index.astype(str)
    table = _float_targets(table, "target")
    outside = [p for p in table.index if p not in allowed]
    if outside:
        raise DfrnInputError(
            f"the target provider gave {part} targets for subject {outside[0]}, who is not a "
            f"{part} subject of repeat {repeat} fold {fold}"
        )
    return table


@overload
def cross_validate_ridge(
    features: pd.DataFrame | GramInputs,
    targets: pd.DataFrame | TargetProvider,
    plan: pd.DataFrame,
    covariates: pd.DataFrame | None = ...,
    *,
    sites: pd.Series | None = ...,
    preserve: pd.DataFrame | None = ...,
    alphas: Sequence[float] = ...,
    inner_cv: int = ...,
    return_models: Literal[False] = ...,
) -> pd.DataFrame: ...


@overload
def cross_validate_ridge(
    features: pd.DataFrame | GramInputs,
    targets: pd.DataFrame | TargetProvider,
    plan: pd.DataFrame,
    covariates: pd.DataFrame | None = ...,
    *,
    sites: pd.Series | None = ...,
    preserve: pd.DataFrame | None = ...,
    alphas: Sequence[float] = ...,
    inner_cv: int = ...,
    return_models: Literal[True],
) -> tuple[pd.DataFrame, dict[ModelKey, RidgeBaseline]]: ...


def cross_validate_ridge(
    features: pd.DataFrame | GramInputs,
    targets: pd.DataFrame | TargetProvider,
    plan: pd.DataFrame,
    covariates: pd.DataFrame | None = None,
    *,
    sites: pd.Series | None = None,
    preserve: pd.DataFrame | None = None,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    inner_cv: int = 5,
    return_models: bool = False,
) -> pd.DataFrame | tuple[pd.DataFrame, dict[ModelKey, RidgeBaseline]]:
    """Out-of-fold ridge predictions for every factor on the fold plan.

    Parameters
    ----------
    features : DataFrame or GramInputs
        ROI features, indexed by ``participant_id`` (or holding it as a column); or the
        voxel ridge's Gram matrix (no covariates, sites or ``return_models`` then).
    targets : DataFrame or TargetProvider
        Either the targets fixed before cross-validation (one column per factor, NaN for a
        missing value; a :class:`dfrn.targets.providers.StaticTargets` is unwrapped to its
        table), or a provider called as ``targets(repeat, fold, train_ids, test_ids)`` that
        returns that split's training and test targets (indexed by ``participant_id``).
    plan : DataFrame
        The fold plan (``participant_id``, ``repeat``, ``fold``).
    covariates : DataFrame, optional
        Raw covariates of the plan's subjects, encoded with
        :func:`dfrn.models.ridge.encode_covariates` and regressed out of the features inside
        each training fold.
    sites, preserve : Series, DataFrame, optional
        Site labels and the encoded covariates ComBat keeps: the features are harmonised in
        each split, learned on its training subjects (:class:`RidgeInputs`).
    alphas : sequence of float, default DEFAULT_ALPHAS
        Candidate penalties.
    inner_cv : int, default 5
        Inner folds for choosing the penalty.
    return_models : bool, default False
        Also return the fitted ROI models, keyed by ``(repeat, fold, factor)``.

    Returns
    -------
    DataFrame or (DataFrame, dict)
        The predictions (:data:`dfrn.evaluation.metrics.PREDICTION_COLUMNS`), one row per
        (repeat, test subject with a value, factor), in (repeat, fold, factor) order, and
        with ``return_models`` the models. Deterministic; BLAS single-threaded inside.

    Raises
    ------
    DfrnInputError
        For a subject lacking features, targets or covariates, a bad value, a provider
        answering with subjects outside the split, or too few training subjects.
    """
    if return_models and isinstance(features, GramInputs):
        raise ValueError("return_models is for the ROI ridge; the voxel ridge keeps no models")
    inputs = align_ridge_inputs(features, plan, covariates, sites, preserve)
    provider = _as_provider(targets, inputs.ids)
    with threadpool_limits(limits=1, user_api="blas"):  # small matrices: threads only cost
        return _cross_validate(inputs, provider, plan, alphas, inner_cv, return_models)


def _as_provider(targets: pd.DataFrame | TargetProvider, ids: list[str]) -> TargetProvider:
    """A fixed table (or ``StaticTargets``) as a provider of the plan's subjects; else as is."""
    if isinstance(targets, StaticTargets):
        targets = targets.targets
    if isinstance(targets, pd.DataFrame):
        return StaticTargets(align_targets(targets, ids))
    return targets


def _fit_predict(
    inputs: RidgeInputs | GramInputs, tr: np.ndarray, te: np.ndarray, y_tr: np.ndarray,
    alphas: Sequence[float], inner_cv: int, where: str,
) -> tuple[np.ndarray, RidgeBaseline | None]:
    """One split of one factor: fit on rows ``tr``, predict rows ``te`` (and the ROI model)."""
    if isinstance(inputs, GramInputs):
        pred, _ = KernelRidgeCV(inputs.gram, tr, te, alphas, inner_cv).predict(y_tr[:, None])
        return pred[:, 0], None
    c = inputs.covariates
    x_tr, x_te = inputs.split_features(tr, te, where)
    model = RidgeBaseline(alphas=alphas, inner_cv=inner_cv)
    model.fit(x_tr, y_tr, None if c is None else c[tr])
    return model.predict(x_te, None if c is None else c[te]), model


def _cross_validate(
    inputs: RidgeInputs | GramInputs,
    provider: TargetProvider,
    plan: pd.DataFrame,
    alphas: Sequence[float],
    inner_cv: int,
    return_models: bool,
) -> pd.DataFrame | tuple[pd.DataFrame, dict[ModelKey, RidgeBaseline]]:
    frames: list[pd.DataFrame] = []
    models: dict[ModelKey, RidgeBaseline] = {}
    for repeat, fold, train, test in iter_splits(plan):
        train, test = [str(p) for p in train], [str(p) for p in test]
        y_train, y_test = provider(repeat, fold, train, test)
        y_train = _fold_targets(y_train, set(train), "training", repeat, fold)
        y_test = _fold_targets(y_test, set(test), "test", repeat, fold)
        for factor in y_train.columns:
            if factor not in y_test.columns:
                raise DfrnInputError(
                    f"the target provider gave no test targets for factor '{factor}' "
                    f"(repeat {repeat} fold {fold})"
                )
            ytr = y_train[factor][np.isfinite(y_train[factor].to_numpy())]
            yte = y_test[factor][np.isfinite(y_test[factor].to_numpy())]
            if len(yte) == 0:
                continue
            if len(ytr) < inner_cv:
                raise DfrnInputError(
                    f"factor '{factor}': repeat {repeat} fold {fold} has {len(ytr)} training "
                    f"subjects with a value, fewer than the ridge inner_cv={inner_cv}"
                )
            tr, te = inputs.rows(list(ytr.index)), inputs.rows(list(yte.index))
            pred, model = _fit_predict(inputs, tr, te, ytr.to_numpy(), alphas, inner_cv,
                                       f"repeat {repeat} fold {fold}")
            if return_models and model is not None:
                models[(repeat, fold, str(factor))] = model
            frames.append(
                pd.DataFrame(
                    {
                        "participant_id": [inputs.ids[i] for i in te],
                        "repeat": repeat,
                        "fold": fold,
                        "factor": str(factor),
                        "y_true": yte.to_numpy(),
                        "y_pred": pred,
                    }
                )
            )
    out = (
        pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=PREDICTION_COLUMNS)
    )
    out = out[PREDICTION_COLUMNS]
    return (out, models) if return_models else out
