"""Symptom factors: principal components of questionnaire items with a varimax rotation.

:class:`SymptomFactors` reproduces R's ``psych::principal(x, nfactors, rotate="varimax")``:

1. every item is standardised with its mean and its sample standard deviation (``ddof=1``,
   as R's ``scale``);
2. the correlation matrix ``R`` of the items is eigen-decomposed and the unrotated loadings
   of the top ``n_factors`` components are ``eigenvectors * sqrt(eigenvalues)``;
3. the loadings are rotated with R's ``stats::varimax`` (Kaiser normalisation, the same
   update and the same stopping rule ``d < d_past * (1 + eps)``, ``eps = tol``);
4. factor scores use the regression method: ``weights = R^-1 @ loadings`` and
   ``scores = standardised_items @ weights``.

Unlike psych, whose column signs follow the eigen solver, the output is made deterministic:
factors are ordered by the variance they explain after rotation (descending) and each one is
signed so that its largest absolute loading is positive.

Fold-wise (leak-free) use: fit one model on a training fold, then :func:`align_factors` it to
a reference fit (usually the full cohort) so that factor ``k`` means the same thing in every
fold; :func:`fold_factor_scores` does both and scores the held-out participants.

Every bad input a user can cause raises :class:`dfrn.errors.DfrnInputError` with a one-line
message that names the participant, item or column at fault.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from scipy.linalg import orthogonal_procrustes
from scipy.optimize import linear_sum_assignment
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.validation import check_is_fitted

from dfrn.data.cohort import read_delimited
from dfrn.errors import DfrnInputError

__all__ = [
    "ID_COLUMN",
    "FewParticipantsWarning",
    "SymptomFactors",
    "VarimaxResult",
    "align_factors",
    "assign_factor_names",
    "check_complete",
    "default_factor_names",
    "factor_congruence",
    "fold_factor_scores",
    "read_items_table",
    "varimax",
]

ID_COLUMN = "participant_id"
_ROTATIONS = ("varimax", "none")
_IMPUTE = (None, "median")
#: Column names (lower case, letters and digits only) that hold participant IDs, not items.
_ID_LIKE = {"id", "participant", "participants", "participantid", "subject", "subjects",
            "subjectid", "subj", "subjid", "sub", "subid", "pid", "sid", "record", "recordid"}


class FewParticipantsWarning(UserWarning):
    """A fit on fewer participants than items: the correlation matrix is singular."""


# --------------------------------------------------------------------------------------------
# Input checking
# --------------------------------------------------------------------------------------------


def _one_line(value: object, limit: int = 40) -> str:
    """``repr`` of a cell value, shortened, safe to put in a one-line message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _as_items_frame(items: pd.DataFrame) -> pd.DataFrame:
    """Participants x items as float, indexed by ``participant_id``; NaN marks a missing cell.

    A ``participant_id`` column, when present, becomes the index. Non-numeric and infinite
    cells raise :class:`DfrnInputError`; missing cells are left as NaN for the caller.
    """
    if not isinstance(items, pd.DataFrame):
        raise DfrnInputError(
            f"items must be a pandas DataFrame (participants x items), got {type(items).__name__}"
        )
    frame = items
    if ID_COLUMN in frame.columns:
        ids = frame[ID_COLUMN]
        missing_id = ids.isna() | (ids.astype(str).str.strip() == "")
        if missing_id.any():
            row = int(np.flatnonzero(missing_id.to_numpy())[0])
            raise DfrnInputError(f"the {ID_COLUMN} column is empty in row {row + 1}")
        frame = frame.set_index(ID_COLUMN)
    frame = frame.copy()
    frame.index = pd.Index([str(i) for i in frame.index], name=ID_COLUMN)
    frame.columns = pd.Index([str(c) for c in frame.columns])
    if frame.shape[1] == 0:
        raise DfrnInputError("the items table has no item columns")
    if frame.shape[0] == 0:
        raise DfrnInputError("the items table has no participants")
    dup_items = frame.columns[frame.columns.duplicated()]
    if len(dup_items):
        raise DfrnInputError(f"item {dup_items[0]!r} appears more than once in the items table")
    dup_ids = frame.index[frame.index.duplicated()]
    if len(dup_ids):
        raise DfrnInputError(
            f"participant {dup_ids[0]!r} appears more than once in the items table"
        )

    columns: dict[str, np.ndarray] = {}
    for item in frame.columns:
        col = frame[item]
        if pd.api.types.is_bool_dtype(col.dtype):
            values = col.astype(float).to_numpy()
        elif pd.api.types.is_numeric_dtype(col.dtype):
            values = col.to_numpy(dtype=float, na_value=np.nan)
        else:
            coerced = pd.to_numeric(col, errors="coerce")
            bad = col.notna().to_numpy() & coerced.isna().to_numpy()
            if bad.any():
                row = int(np.flatnonzero(bad)[0])
                raise DfrnInputError(
                    f"item {item!r} of participant {frame.index[row]!r} is not numeric: "
                    f"{_one_line(col.iloc[row])}"
                )
            values = coerced.to_numpy(dtype=float, na_value=np.nan)
        infinite = np.isinf(values)
        if infinite.any():
            row = int(np.flatnonzero(infinite)[0])
            raise DfrnInputError(
                f"item {item!r} of participant {frame.index[row]!r} is infinite: {values[row]}"
            )
        columns[item] = values
    return pd.DataFrame(columns, index=frame.index)


def check_complete(frame: pd.DataFrame, remedy: str = "use impute='median'") -> None:
    """Raise on the first missing cell (row-major order), naming participant and item.

    ``remedy`` is the second half of the message, worded for the interface in use: the
    default names :class:`SymptomFactors`'s parameter; ``dfrn factors`` passes
    ``"use --impute median"`` and ``dfrn run`` the ``[factors] impute`` key.
    """
    missing = frame.isna().to_numpy()
    if missing.any():
        rows, cols = np.nonzero(missing)
        others = len(rows) - 1
        more = f" (and {others} other missing cell{'s' if others != 1 else ''})" if others else ""
        raise DfrnInputError(
            f"item {frame.columns[cols[0]]!r} is missing for participant "
            f"{frame.index[rows[0]]!r}{more}; complete it or {remedy}"
        )


def _column_list(columns: Sequence[str], limit: int = 10) -> str:
    """``a, b, c`` for a message; long lists are cut and their length given."""
    names = ", ".join(columns[:limit])
    return names if len(columns) <= limit else f"{names}, ... ({len(columns)} in all)"


def _id_column_suspect(raw: pd.DataFrame) -> str | None:
    """In a table without ``participant_id``: a column that holds IDs rather than an item.

    That is a column named like an ID (``subject``, ``ID``, ``Participant_ID``, ...) or one
    whose every value is text.
    """
    for col in raw.columns:
        if "".join(ch for ch in str(col).lower() if ch.isalnum()) in _ID_LIKE:
            return str(col)
    for col in raw.columns:
        values = raw[col].dropna()
        if len(values) and pd.to_numeric(values, errors="coerce").isna().all():
            return str(col)
    return None


def read_items_table(path: str | Path) -> pd.DataFrame:
    """Read a participants x items table (TSV, or CSV when the name ends in ``.csv``).

    The table is read by :func:`dfrn.data.cohort.read_delimited`: the separator is checked
    against the header line, and IDs such as ``NA`` stay IDs.

    The ``participant_id`` column, if present, becomes the index (ids are read as text, so
    ``001`` stays ``001``). A table without it is read only when every column is an item:
    participants are then numbered ``p0001``, ``p0002``, ... in row order, with a warning;
    a column that looks like IDs (named like one, or all text) is refused with a message
    that names the missing column and lists the columns found. Every other column is an item
    and must be numeric; empty cells are returned as NaN and are dealt with by
    :meth:`SymptomFactors.fit` (error, or ``impute="median"``).
    """
    path = Path(path)
    raw = read_delimited(path, "items table")
    numbered = ID_COLUMN not in raw.columns
    if numbered:
        suspect = _id_column_suspect(raw)
        if suspect is not None:
            raise DfrnInputError(
                f"{path.name} has no {ID_COLUMN} column (columns found: "
                f"{_column_list([str(c) for c in raw.columns])}); column {suspect!r} looks like "
                f"the participant IDs: rename it to {ID_COLUMN}"
            )
        width = max(4, len(str(len(raw))))
        raw.index = pd.Index([f"p{i + 1:0{width}d}" for i in range(len(raw))], name=ID_COLUMN)
    try:
        items = _as_items_frame(raw)
    except DfrnInputError as exc:
        raise DfrnInputError(f"{path.name}: {exc}") from None
    if numbered:
        warnings.warn(
            f"{path.name} has no {ID_COLUMN} column: participants are numbered "
            f"{items.index[0]}, {items.index[min(1, len(items) - 1)]}, ... in row order; add a "
            f"{ID_COLUMN} column to keep your own IDs",
            UserWarning,
            stacklevel=2,
        )
    return items


# --------------------------------------------------------------------------------------------
# Rotation and naming helpers
# --------------------------------------------------------------------------------------------


class VarimaxResult(NamedTuple):
    """Output of :func:`varimax`: ``loadings = x @ rotation``."""

    loadings: np.ndarray
    rotation: np.ndarray
    n_iter: int
    converged: bool


def varimax(
    x: np.ndarray, normalize: bool = True, eps: float = 1e-5, max_iter: int = 1000
) -> VarimaxResult:
    """R's ``stats::varimax``, line for line.

    With ``normalize`` the rows of ``x`` are divided by their communality's square root
    before rotating and multiplied back after (Kaiser normalisation). Iteration stops when
    the criterion ``d`` (sum of singular values) grows by less than a factor ``1 + eps``.
    A single column is returned unrotated, as R does.
    """
    x = np.asarray(x, dtype=float)
    p, nc = x.shape
    if nc < 2:
        return VarimaxResult(x.copy(), np.eye(nc), 0, True)
    sc = np.ones(p)
    if normalize:
        sc = np.sqrt(np.sum(x**2, axis=1))
        sc[sc == 0] = 1.0
        x = x / sc[:, None]
    tt = np.eye(nc)
    d = 0.0
    n_iter = 0
    converged = False
    for n_iter in range(1, max_iter + 1):  # noqa: B007 - n_iter is reported
        z = x @ tt
        b = x.T @ (z**3 - z * (np.sum(z**2, axis=0) / p))
        u, s, vt = np.linalg.svd(b)
        tt = u @ vt
        dpast = d
        d = float(np.sum(s))
        if d < dpast * (1 + eps):
            converged = True
            break
    z = (x @ tt) * sc[:, None]
    return VarimaxResult(z, tt, n_iter, converged)


def default_factor_names(n_factors: int) -> list[str]:
    """``["factor_1", ..., "factor_k"]``."""
    return [f"factor_{k + 1}" for k in range(n_factors)]


def assign_factor_names(
    loadings: pd.DataFrame, names: Mapping[str, Sequence[str] | str]
) -> list[str]:
    """Name the columns of ``loadings`` (items x factors) from marker items.

    ``names`` maps a factor name to its marker items, e.g. ``{"anhedonia": ["hamd_1",
    "hamd_7"]}``. Each name goes to a distinct factor by Hungarian assignment
    (:func:`scipy.optimize.linear_sum_assignment`) maximising the summed *absolute* loadings of
    the markers; absolute values make the match independent of the sign convention and of
    reverse-keyed items. Signs are not changed. Factors not named keep their current names.
    """
    if not isinstance(names, Mapping):
        raise DfrnInputError(
            f"names must map a factor name to its marker items, got {type(names).__name__}"
        )
    labels = [str(n) for n in names]
    current = [str(c) for c in loadings.columns]
    if len(labels) > len(current):
        raise DfrnInputError(
            f"names gives {len(labels)} factor names but there are only {len(current)} factors"
        )
    if not labels:
        return current
    items = set(map(str, loadings.index))
    score = np.zeros((len(labels), len(current)))
    abs_loadings = loadings.abs()
    for i, (label, markers) in enumerate(names.items()):
        marker_list = [markers] if isinstance(markers, str) else list(markers)
        if not marker_list:
            raise DfrnInputError(f"factor name {label!r} has no marker items")
        for marker in marker_list:
            if str(marker) not in items:
                raise DfrnInputError(
                    f"marker item {str(marker)!r} of factor name {label!r} is not an item"
                )
        score[i] = abs_loadings.loc[[str(m) for m in marker_list]].sum(axis=0).to_numpy()
    rows, cols = linear_sum_assignment(score, maximize=True)
    result = list(current)
    for r, c in zip(rows, cols, strict=True):
        result[c] = labels[r]
    seen: set[str] = set()
    for name in result:
        if name in seen:
            raise DfrnInputError(f"factor name {name!r} would be used twice; pick another name")
        seen.add(name)
    return result


def factor_congruence(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """Tucker's congruence between the columns of two loading tables (rows = same items)."""
    x = a.to_numpy(dtype=float)
    y = b.loc[a.index].to_numpy(dtype=float)
    num = x.T @ y
    den = np.sqrt(np.outer(np.sum(x**2, axis=0), np.sum(y**2, axis=0)))
    with np.errstate(invalid="ignore", divide="ignore"):
        phi = np.where(den > 0, num / den, 0.0)
    return pd.DataFrame(phi, index=a.columns, columns=b.columns)


# --------------------------------------------------------------------------------------------
# Fitting steps
# --------------------------------------------------------------------------------------------


def _check_participants(n: int, p: int) -> None:
    """Refuse fewer than 2 participants; warn when there are fewer participants than items."""
    if n < 2:
        raise DfrnInputError(f"at least 2 participants are needed to fit factors, got {n}")
    if n < p:
        warnings.warn(
            f"fewer participants ({n}) than items ({p}): the item correlation matrix is "
            "singular and the factors are unreliable",
            FewParticipantsWarning,
            stacklevel=3,
        )


def _item_moments(x: np.ndarray, items: pd.Index) -> tuple[np.ndarray, np.ndarray]:
    """Item means and sample SDs (``ddof=1``); refuses an item with one value for everyone."""
    means = x.mean(axis=0)
    stds = x.std(axis=0, ddof=1)
    constant = np.flatnonzero(~(stds > 1e-12 * np.maximum(1.0, np.abs(means))))
    if len(constant):
        item = items[constant[0]]
        raise DfrnInputError(
            f"item {item!r} has the same value ({x[0, constant[0]]:g}) for every participant"
        )
    return means, stds


def _correlation_eigen(z: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending) and eigenvectors of the items' correlation matrix.

    Refuses ``k`` components when the matrix has rank below ``k``.
    """
    corr = (z.T @ z) / (z.shape[0] - 1)
    corr = (corr + corr.T) / 2
    evals, evecs = np.linalg.eigh(corr)
    evals, evecs = evals[::-1], evecs[:, ::-1]
    if evals[k - 1] <= 1e-10 * max(evals[0], 1.0):
        rank = int(np.sum(evals > 1e-10 * max(evals[0], 1.0)))
        raise DfrnInputError(
            f"n_factors={k} is more than the rank ({rank}) of the item correlation matrix"
        )
    return evals, evecs


def _order_and_sign(rotated: np.ndarray, rot: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic factors: by variance after rotation (descending), largest loading > 0."""
    variance = np.sum(rotated**2, axis=0)
    order = np.argsort(-variance, kind="stable")
    rotated, rot = rotated[:, order], rot[:, order]
    peak = rotated[np.argmax(np.abs(rotated), axis=0), np.arange(rotated.shape[1])]
    signs = np.where(peak < 0, -1.0, 1.0)
    return rotated * signs, rot * signs


# --------------------------------------------------------------------------------------------
# The estimator
# --------------------------------------------------------------------------------------------


class SymptomFactors(TransformerMixin, BaseEstimator):
    """Varimax-rotated principal components of questionnaire items, as ``psych::principal``.

    Parameters
    ----------
    n_factors:
        Number of components kept (at most the number of items).
    rotation:
        ``"varimax"`` (default) or ``"none"``.
    tol:
        ``eps`` of R's ``stats::varimax`` stopping rule; ``1e-5`` reproduces psych, smaller
        values converge more tightly.
    max_iter:
        Maximum varimax iterations (R uses 1000); a :class:`ConvergenceWarning` is issued if
        the stopping rule is not met.
    normalize:
        Kaiser normalisation around the varimax rotation.
    impute:
        ``None``: a missing item value is an error. ``"median"``: missing values are replaced
        by the item's median in the data given to :meth:`fit` (also in :meth:`transform`).
    names:
        Optional mapping ``factor_name -> marker items`` (see :func:`assign_factor_names`);
        unnamed factors are called ``factor_<k>``.

    Fitted attributes
    -----------------
    ``loadings_`` (items x factors), ``explained_variance_`` and ``explained_variance_ratio_``
    (Series per factor: sum of squared rotated loadings, and that over the number of items),
    ``rotation_`` (``n_factors x n_factors``; ``loadings_ = unrotated_loadings_ @ rotation_``,
    including the final order and signs), ``weights_`` (items x factors, score weights
    ``R^-1 @ loadings_``), ``item_means_``, ``item_stds_``, ``item_medians_`` (only with
    ``impute="median"``), ``eigenvalues_`` (of the item correlation matrix, all of them),
    ``unrotated_loadings_``, ``scores_`` (scores of the fitted participants),
    ``feature_names_in_``, ``n_features_in_``, ``factor_names_``, ``n_iter_``.
    """

    def __init__(
        self,
        n_factors: int = 5,
        rotation: str = "varimax",
        tol: float = 1e-5,
        max_iter: int = 1000,
        normalize: bool = True,
        impute: str | None = None,
        names: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self.n_factors = n_factors
        self.rotation = rotation
        self.tol = tol
        self.max_iter = max_iter
        self.normalize = normalize
        self.impute = impute
        self.names = names

    # -- parameters and data ------------------------------------------------------------------

    def _check_params(self, n_items: int) -> None:
        k = self.n_factors
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise DfrnInputError(f"n_factors must be a positive integer, got {k!r}")
        if k > n_items:
            raise DfrnInputError(f"n_factors={k} is more than the number of items ({n_items})")
        if self.rotation not in _ROTATIONS:
            raise DfrnInputError(
                f"rotation must be one of {', '.join(_ROTATIONS)}, got {self.rotation!r}"
            )
        if self.impute not in _IMPUTE:
            raise DfrnInputError(f"impute must be None or 'median', got {self.impute!r}")
        if not (isinstance(self.tol, int | float) and math.isfinite(self.tol) and self.tol >= 0):
            raise DfrnInputError(f"tol must be a non-negative number, got {self.tol!r}")
        if isinstance(self.max_iter, bool) or not isinstance(self.max_iter, int | np.integer):
            raise DfrnInputError(f"max_iter must be a positive integer, got {self.max_iter!r}")
        if self.max_iter < 1:
            raise DfrnInputError(f"max_iter must be a positive integer, got {self.max_iter!r}")

    def _prepare(self, items: pd.DataFrame) -> pd.DataFrame:
        """Validated, imputed items in the fitted item order (for transform)."""
        frame = _as_items_frame(items)
        missing = [i for i in self.feature_names_in_ if i not in frame.columns]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise DfrnInputError(f"item {missing[0]!r} is missing from the items table{more}")
        frame = frame.loc[:, list(self.feature_names_in_)]
        if self.impute == "median":
            frame = frame.fillna(self.item_medians_)
        check_complete(frame)
        return frame

    # -- fitting ------------------------------------------------------------------------------

    def fit(self, items: pd.DataFrame, y: Any = None) -> SymptomFactors:
        """Fit on participants x items (index or ``participant_id`` column = participant)."""
        frame = _as_items_frame(items)
        n, p = frame.shape
        self._check_params(p)
        k = int(self.n_factors)
        frame = self._impute_for_fit(frame)
        check_complete(frame)
        _check_participants(n, p)
        x = frame.to_numpy()
        means, stds = _item_moments(x, frame.columns)
        z = (x - means) / stds
        evals, evecs = _correlation_eigen(z, k)
        top = evals[:k]
        unrotated = evecs[:, :k] * np.sqrt(top)
        rotated, rot = _order_and_sign(*self._rotate(unrotated, k))
        # regression-method weights R^-1 @ L; since R^-1 V_k = V_k / lambda_k this equals
        # V_k diag(lambda_k^-1/2) @ rot exactly, and stays defined when R is singular.
        weights = (evecs[:, :k] / np.sqrt(top)) @ rot

        items_idx = pd.Index(frame.columns)
        self.feature_names_in_ = np.asarray(frame.columns)
        self.n_features_in_ = p
        self.item_means_ = pd.Series(means, index=items_idx)
        self.item_stds_ = pd.Series(stds, index=items_idx)
        self.eigenvalues_ = evals.copy()
        self.rotation_ = rot
        tmp_names = default_factor_names(k)
        loadings = pd.DataFrame(rotated, index=items_idx, columns=tmp_names)
        names = assign_factor_names(loadings, self.names) if self.names else tmp_names
        self._set_names(names, rotated, weights, unrotated)
        self.scores_ = pd.DataFrame(z @ weights, index=frame.index, columns=self.factor_names_)
        return self

    def _impute_for_fit(self, frame: pd.DataFrame) -> pd.DataFrame:
        """With ``impute="median"``: fill missing cells with (and keep) the item medians."""
        if self.impute == "median":
            medians = frame.median(axis=0, skipna=True)
            empty = medians.index[medians.isna()]
            if len(empty):
                raise DfrnInputError(f"item {empty[0]!r} has no values to take a median from")
            frame = frame.fillna(medians)
            self.item_medians_ = medians
        return frame

    def _rotate(self, unrotated: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Rotated loadings and rotation (varimax, or none); sets ``n_iter_``."""
        if self.rotation == "varimax":
            res = varimax(unrotated, self.normalize, float(self.tol), int(self.max_iter))
            if not res.converged:
                warnings.warn(
                    f"varimax did not converge in {self.max_iter} iterations (tol={self.tol})",
                    ConvergenceWarning,
                    stacklevel=3,
                )
            rotated, rot, self.n_iter_ = res.loadings, res.rotation, res.n_iter
        else:
            rotated, rot, self.n_iter_ = unrotated.copy(), np.eye(k), 0
        return rotated, rot

    def _set_names(
        self, names: list[str], rotated: np.ndarray, weights: np.ndarray, unrotated: np.ndarray
    ) -> None:
        items_idx = pd.Index(self.feature_names_in_)
        cols = pd.Index(names)
        self.factor_names_ = list(names)
        self.loadings_ = pd.DataFrame(rotated, index=items_idx, columns=cols)
        self.weights_ = pd.DataFrame(weights, index=items_idx, columns=cols)
        self.unrotated_loadings_ = pd.DataFrame(
            unrotated, index=items_idx, columns=[f"component_{j + 1}" for j in range(len(names))]
        )
        variance = np.sum(rotated**2, axis=0)
        self.explained_variance_ = pd.Series(variance, index=cols, name="variance")
        self.explained_variance_ratio_ = pd.Series(
            variance / len(items_idx), index=cols, name="proportion"
        )

    def fit_transform(self, items: pd.DataFrame, y: Any = None, **fit_params: Any) -> pd.DataFrame:
        """Fit, then return the scores of the fitted participants (``scores_``)."""
        return self.fit(items, y).scores_.copy()

    def transform(self, items: pd.DataFrame) -> pd.DataFrame:
        """Factor scores (index ``participant_id``, one column per factor).

        Items are standardised with the fitted means and standard deviations (and imputed
        with the fitted medians when ``impute="median"``); extra columns are ignored.
        """
        check_is_fitted(self, "loadings_")
        frame = self._prepare(items)
        z = (frame.to_numpy() - self.item_means_.to_numpy()) / self.item_stds_.to_numpy()
        return pd.DataFrame(
            z @ self.weights_.to_numpy(),
            index=frame.index,
            columns=pd.Index(self.factor_names_),
        )

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        """The factor names (scikit-learn output-feature API)."""
        check_is_fitted(self, "loadings_")
        return np.asarray(self.factor_names_)

    # -- reporting ----------------------------------------------------------------------------

    def top_items(self, n: int = 3) -> pd.DataFrame:
        """The ``n`` items with the largest absolute loading on each factor, to help name them.

        Long table with columns ``factor``, ``rank`` (1 = largest), ``item``, ``loading``
        (signed), in factor order.
        """
        check_is_fitted(self, "loadings_")
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
            raise DfrnInputError(f"n must be a positive integer, got {n!r}")
        rows = []
        for factor in self.loadings_.columns:
            col = self.loadings_[factor]
            order = np.argsort(-np.abs(col.to_numpy()), kind="stable")[: int(n)]
            for rank, idx in enumerate(order, start=1):
                rows.append((factor, rank, col.index[idx], float(col.iloc[idx])))
        return pd.DataFrame(rows, columns=["factor", "rank", "item", "loading"])

    def variance_table(self) -> pd.DataFrame:
        """Columns ``factor``, ``variance``, ``proportion``, ``cumulative`` (proportion)."""
        check_is_fitted(self, "loadings_")
        prop = self.explained_variance_ratio_.to_numpy()
        return pd.DataFrame(
            {
                "factor": list(self.factor_names_),
                "variance": self.explained_variance_.to_numpy(),
                "proportion": prop,
                "cumulative": np.cumsum(prop),
            }
        )


# --------------------------------------------------------------------------------------------
# Fold-wise mode
# --------------------------------------------------------------------------------------------


def align_factors(
    model: SymptomFactors, reference: SymptomFactors, method: str = "hungarian"
) -> SymptomFactors:
    """A copy of ``model`` whose factors are matched, in order, name and sign, to ``reference``.

    Both must be fitted on the same items with the same number of factors.

    * ``method="hungarian"`` (default): model factor ``i`` is paired with reference factor
      ``j`` by Hungarian assignment maximising the absolute Tucker congruence of their loading
      columns, and each paired factor is sign-flipped so that its congruence is positive. The
      model's own varimax solution is kept, only permuted, renamed and flipped.
    * ``method="procrustes"``: the model's *unrotated* loadings are rotated by the orthogonal
      matrix that brings them closest (least squares) to the reference loadings, replacing the
      model's varimax rotation. Use it when the varimax solution is unstable between folds
      (near-equal eigenvalues around ``n_factors``): the fold's factor space is kept, but its
      axes are those of the reference.

    Loadings, weights, rotation, explained variance and stored scores change together, and the
    reference's factor names are taken over. The copy records the absolute congruence of each
    factor with its reference factor in ``congruence_``. ``model`` itself is not changed.
    """
    _check_alignable(model, reference, method)
    ref_items = list(reference.feature_names_in_)
    k = len(model.factor_names_)
    names = list(reference.factor_names_)
    order = list(model.feature_names_in_)
    unrotated = model.unrotated_loadings_.loc[order].to_numpy()
    out = copy.deepcopy(model)
    if method == "hungarian":
        change = _hungarian_change(model, reference, ref_items)
    else:
        change = _procrustes_change(model, reference, ref_items)
    rotation = model.rotation_ @ change
    rotated = unrotated @ rotation
    weights = (unrotated / model.eigenvalues_[:k]) @ rotation  # = V_k diag(l^-1/2) @ rotation
    out.rotation_ = rotation
    out._set_names(names, rotated, weights, unrotated)
    if hasattr(model, "scores_"):
        out.scores_ = pd.DataFrame(
            model.scores_.to_numpy() @ change,
            index=model.scores_.index,
            columns=pd.Index(names),
        )
    phi_new = factor_congruence(out.loadings_.loc[ref_items], reference.loadings_).to_numpy()
    out.congruence_ = pd.Series(np.abs(np.diag(phi_new)), index=pd.Index(names))
    return out


def _check_alignable(model: SymptomFactors, reference: SymptomFactors, method: str) -> None:
    """Both fitted, a known method, the same items and the same number of factors."""
    check_is_fitted(model, "loadings_")
    check_is_fitted(reference, "loadings_")
    if method not in ("hungarian", "procrustes"):
        raise DfrnInputError(f"method must be 'hungarian' or 'procrustes', got {method!r}")
    ref_items = list(reference.feature_names_in_)
    ref_set, model_set = set(ref_items), set(model.feature_names_in_)
    for item in ref_items:
        if item not in model_set:
            raise DfrnInputError(f"item {item!r} of the reference fit is not in the fold fit")
    for item in model.feature_names_in_:
        if item not in ref_set:
            raise DfrnInputError(f"item {item!r} of the fold fit is not in the reference fit")
    k = len(model.factor_names_)
    if k != len(reference.factor_names_):
        raise DfrnInputError(
            f"the fold fit has {k} factors but the reference fit has {len(reference.factor_names_)}"
        )


def _hungarian_change(
    model: SymptomFactors, reference: SymptomFactors, ref_items: list[str]
) -> np.ndarray:
    """Permutation and sign flips (old factors -> aligned) maximising |Tucker congruence|."""
    k = len(model.factor_names_)
    phi = factor_congruence(reference.loadings_, model.loadings_.loc[ref_items]).to_numpy()
    rows, cols = linear_sum_assignment(np.abs(phi), maximize=True)
    perm = np.empty(k, dtype=int)
    perm[rows] = cols  # reference factor j <- model factor perm[j]
    signs = np.where(phi[np.arange(k), perm] < 0, -1.0, 1.0)
    return np.eye(k)[:, perm] * signs  # old factors -> aligned factors


def _procrustes_change(
    model: SymptomFactors, reference: SymptomFactors, ref_items: list[str]
) -> np.ndarray:
    """Change of the model's rotation that brings its unrotated loadings closest to the reference."""
    target = reference.loadings_.loc[ref_items].to_numpy()
    change_full, _ = orthogonal_procrustes(
        model.unrotated_loadings_.loc[ref_items].to_numpy(), target
    )
    # express it relative to the model's current rotation: new = old @ change
    return model.rotation_.T @ change_full


def fold_factor_scores(
    items: pd.DataFrame,
    train_ids: Iterable[str],
    test_ids: Iterable[str],
    reference: SymptomFactors,
    *,
    include_train: bool = False,
    method: str = "hungarian",
    **params: Any,
) -> pd.DataFrame:
    """Leak-free factor scores for one cross-validation fold.

    Fits :class:`SymptomFactors` on the ``train_ids`` rows of ``items`` only (means, standard
    deviations, medians and loadings all come from the training fold), aligns it to
    ``reference`` with :func:`align_factors` (``method``), and scores the ``test_ids`` rows. The model
    parameters are the reference's, overridden by ``params``. The result is indexed by
    ``participant_id`` with the reference's factor names as columns; with ``include_train``
    the training participants' scores come first, followed by the test participants'.
    """
    frame = _as_items_frame(items)
    train = [str(i) for i in train_ids]
    test = [str(i) for i in test_ids]
    known = set(frame.index)
    for pid in (*train, *test):
        if pid not in known:
            raise DfrnInputError(f"participant {pid!r} of the fold is not in the items table")
    overlap = set(train).intersection(test)
    if overlap:
        raise DfrnInputError(
            f"participant {sorted(overlap)[0]!r} is in both the training and the test fold"
        )
    settings = {**reference.get_params(), **params, "names": None}
    model = SymptomFactors(**settings).fit(frame.loc[train])
    model = align_factors(model, reference, method=method)
    rows = [*train, *test] if include_train else test
    return model.transform(frame.loc[rows])
