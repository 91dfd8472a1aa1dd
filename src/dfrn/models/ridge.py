"""The ridge-regression baseline estimator on ROI features, and its numerical core.

:class:`RidgeBaseline` fits, on the data it is given (a training fold), in this order:

1. **Covariates** (optional; e.g. age, sex, TIV). For each feature ``j`` an ordinary least
   squares regression with intercept ``x_j ≈ b0_j + C @ b_j`` is fitted on the training
   subjects; the residuals ``x_j - b0_j - C @ b_j`` replace the feature, and the *same*
   ``b0_j, b_j`` are applied to the test subjects' covariates and features. The targets are
   not adjusted. Categorical covariates are one-hot coded (first level dropped) on the
   whole cohort before splitting by :func:`encode_covariates`; coding uses no target
   information.
2. **Scaling**: a ``StandardScaler`` fitted on the (residualised) training features.
3. **Ridge with inner CV**: the penalty is chosen among ``alphas`` by ``inner_cv``-fold
   (unshuffled ``KFold``) cross-validation *within* the training data, maximising the mean
   R² over inner folds (first best alpha on ties), then ridge is refitted on all of it.
   This is exactly scikit-learn's ``RidgeCV(alphas, cv=inner_cv)`` on the scaled training
   data (checked by the tests), computed from one SVD per inner fold by
   :class:`MultiTargetRidgeCV`, so that many target columns — e.g. 1,000 permuted copies,
   see :mod:`dfrn.evaluation.permutation` — are solved at the cost of one.

The cross-validation of this estimator on the study's fold plan is
:func:`dfrn.evaluation.ridge_cv.cross_validate_ridge`.

**The voxel ridge** (``[baseline] models = ["voxel_ridge"]``) is ridge on the network's own
inputs, where voxels far outnumber subjects, so it is solved in the dual: from the linear
Gram matrix ``K = X Xᵀ`` of the subjects (:func:`voxel_gram`, built blockwise over voxels),
centred with the training subjects' mean (:func:`center_gram`), one eigendecomposition per
(inner) training set gives every alpha and every target column at once
(:class:`KernelRidgePath`, :class:`KernelRidgeCV`). Its predictions are those of
scikit-learn's primal ``Ridge(alpha)`` (with intercept, unpenalised) on the same voxels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.model_selection import KFold
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted

from dfrn.errors import DfrnInputError

__all__ = [
    "DEFAULT_ALPHAS",
    "voxel_gram",
    "center_gram",
    "KernelRidgePath",
    "KernelRidgeCV",
    "GRAM_BLOCK_VALUES",
    "RidgeBaseline",
    "RidgePath",
    "MultiTargetRidgeCV",
    "fit_preprocess",
    "apply_preprocess",
    "encode_covariates",
    "index_by_participant",
]

DEFAULT_ALPHAS: tuple[float, ...] = tuple(float(a) for a in np.logspace(-3, 5, 17))
"""The default candidate penalties, ``np.logspace(-3, 5, 17)``."""


# --------------------------------------------------------------------------------------
# numerical core: ridge for many alphas and many target columns at once


def _path_predictions(m_eval: np.ndarray, shrink: np.ndarray, basis: np.ndarray,
                      y: np.ndarray) -> np.ndarray:
    """``(A, n_eval, B)`` predictions of a ridge path in an orthonormal ``basis`` of the
    fit rows (the primal SVD's ``U`` or the Gram matrix's eigenvectors): the centred targets
    projected on it, shrunk per penalty, mapped to the eval rows, plus the targets' mean."""
    y_mean = y.mean(axis=0)
    projected = basis.T @ (y - y_mean)  # (k, B)
    return (m_eval[None, :, :] * shrink[:, None, :]) @ projected + y_mean


class RidgePath:
    """Ridge (with intercept) on a fixed design for all alphas and many targets at once.

    With the centred design ``Xc = U diag(s) Vt``, the ridge coefficients for penalty ``a``
    are ``V diag(s / (s² + a)) Uᵀ (y - ȳ)``; only ``Uᵀ y`` depends on the target.

    Parameters
    ----------
    x_fit : ndarray of shape (n_fit, p)
        The design the ridge is fitted on.
    x_eval : ndarray of shape (n_eval, p), optional
        Rows to predict with :meth:`predict_eval`.
    """

    def __init__(self, x_fit: np.ndarray, x_eval: np.ndarray | None = None) -> None:
        self.x_mean = x_fit.mean(axis=0)
        u, s, vt = np.linalg.svd(x_fit - self.x_mean, full_matrices=False)
        self.u, self.s, self.vt = u, s, vt
        self.m_eval = None if x_eval is None else (x_eval - self.x_mean) @ vt.T

    def _shrink(self, alphas: np.ndarray) -> np.ndarray:
        return self.s / (self.s**2 + np.asarray(alphas, dtype=float)[:, None])  # (A, k)

    def predict_eval(self, y: np.ndarray, alphas: np.ndarray) -> np.ndarray:
        """Predictions on ``x_eval`` for every alpha and target column.

        Parameters
        ----------
        y : ndarray of shape (n_fit, B)
            Target columns.
        alphas : ndarray of shape (A,)
            Penalties.

        Returns
        -------
        ndarray of shape (A, n_eval, B)
        """
        if self.m_eval is None:
            raise RuntimeError("RidgePath was built without x_eval")
        return _path_predictions(self.m_eval, self._shrink(alphas), self.u, y)

    def coef(self, y: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
        """Coefficients and intercept for one target vector and one penalty.

        Parameters
        ----------
        y : ndarray of shape (n_fit,)
        alpha : float

        Returns
        -------
        coef : ndarray of shape (p,)
        intercept : float
        """
        y_mean = float(y.mean())
        w = self.vt.T @ (self._shrink(np.array([alpha]))[0] * (self.u.T @ (y - y_mean)))
        return w, y_mean - float(self.x_mean @ w)


def _r2_columns(y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """R² of each (alpha, column) as scikit-learn's ``r2_score`` (force_finite=True)."""
    ss_res = np.sum((y[None] - pred) ** 2, axis=1)  # (A, B)
    ss_tot = np.sum((y - y.mean(axis=0)) ** 2, axis=0)  # (B,)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = 1.0 - ss_res / ss_tot
    const = ss_tot == 0
    if np.any(const):
        r2[:, const] = np.where(ss_res[:, const] == 0, 1.0, 0.0)
    return r2


def _check_cv_args(alphas: Sequence[float], inner_cv: int, n: int) -> np.ndarray:
    """The penalties as an array; one-line errors for an empty list or a bad ``inner_cv``."""
    arr = np.asarray(alphas, dtype=float)
    if arr.ndim != 1 or len(arr) == 0:
        raise DfrnInputError("ridge alphas must be a non-empty list of penalties")
    if inner_cv < 2 or n < inner_cv:
        raise DfrnInputError(
            f"ridge inner CV needs 2 <= inner_cv <= training subjects, got inner_cv={inner_cv} "
            f"with {n} training subjects"
        )
    return arr


class MultiTargetRidgeCV:
    """Inner-CV alpha selection and refit on one (scaled) training set, for any targets.

    The SVDs depend only on the design, so one instance answers any number of target
    columns (:meth:`predict` takes a matrix).

    Parameters
    ----------
    z_train : ndarray of shape (n, p)
        Scaled training features.
    z_eval : ndarray of shape (m, p), optional
        Scaled features of the rows to predict (the test fold).
    alphas : sequence of float
        Candidate penalties.
    inner_cv : int
        Number of unshuffled inner ``KFold`` folds.

    Raises
    ------
    DfrnInputError
        When ``alphas`` is empty, or ``inner_cv`` is below 2 or above the training subjects.
    """

    def __init__(
        self,
        z_train: np.ndarray,
        z_eval: np.ndarray | None,
        alphas: Sequence[float],
        inner_cv: int,
    ) -> None:
        self.alphas = _check_cv_args(alphas, inner_cv, len(z_train))
        self.inner = [
            (tr, va, RidgePath(z_train[tr], z_train[va]))
            for tr, va in KFold(n_splits=inner_cv).split(z_train)
        ]
        self.full = RidgePath(z_train, z_eval)

    def cv_scores(self, y: np.ndarray) -> np.ndarray:
        """Mean inner-CV R² per alpha and target column.

        Parameters
        ----------
        y : ndarray of shape (n, B)

        Returns
        -------
        ndarray of shape (A, B)
        """
        scores = [
            _r2_columns(y[va], path.predict_eval(y[tr], self.alphas)) for tr, va, path in self.inner
        ]
        return np.mean(scores, axis=0)

    def predict(self, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Predictions on ``z_eval`` with each column's chosen alpha.

        Parameters
        ----------
        y : ndarray of shape (n, B)

        Returns
        -------
        pred : ndarray of shape (m, B)
        best : ndarray of int, shape (B,)
            Index in ``alphas`` of each column's chosen penalty.
        """
        best = np.argmax(self.cv_scores(y), axis=0)
        pred_all = self.full.predict_eval(y, self.alphas)  # (A, n_eval, B)
        pred = np.take_along_axis(pred_all, best[None, None, :], axis=0)[0]
        return pred, best


# --------------------------------------------------------------------------------------
# the voxel ridge: the same ridge, solved in the dual from the subjects' Gram matrix

#: Values held in memory at once while :func:`voxel_gram` reads a block of voxels
#: (float64: 64 MiB).
GRAM_BLOCK_VALUES = 2**23


def voxel_gram(volumes: Sequence[np.ndarray], block_values: int = GRAM_BLOCK_VALUES) -> np.ndarray:
    """The subjects' linear Gram matrix over all voxels, read in blocks of voxels.

    Each volume is flattened; every voxel is shifted by its mean over ``volumes`` before the
    products are summed. That shift uses no target and changes nothing downstream: centring
    with any subset's mean (:func:`center_gram`) undoes a common shift exactly; it only
    keeps the float64 sums small. Voxels constant across subjects (outside the mask) add 0.

    Parameters
    ----------
    volumes : sequence of ndarray
        One array per subject, all of one shape (memory maps are read block by block).
    block_values : int, default GRAM_BLOCK_VALUES
        Subjects × voxels read at once.

    Returns
    -------
    ndarray of shape (n, n), float64
        ``K[i, j] = ⟨x_i - x̄, x_j - x̄⟩``.
    """
    flat = [np.asarray(v).reshape(-1) for v in volumes]
    n = len(flat)
    if n == 0:
        raise DfrnInputError("the voxel ridge needs at least one volume")
    sizes = {f.size for f in flat}
    if len(sizes) != 1:
        raise DfrnInputError(f"the voxel ridge's volumes differ in size: {sorted(sizes)}")
    n_vox = sizes.pop()
    step = max(1, block_values // n)
    gram = np.zeros((n, n))
    for start in range(0, n_vox, step):
        block = np.stack([f[start:start + step] for f in flat]).astype(np.float64)
        block -= block.mean(axis=0)
        gram += block @ block.T
    return gram


def center_gram(
    gram: np.ndarray, fit_rows: np.ndarray, eval_rows: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Gram blocks of features centred with the mean of the ``fit_rows`` subjects only.

    ``Kc[i, j] = ⟨x_i - m, x_j - m⟩`` with ``m`` the mean feature vector of ``fit_rows``:
    ``K[i, j] - mean_t K[i, t] - mean_t K[t, j] + mean_{t, t'} K[t, t']`` (``t`` in
    ``fit_rows``), so no other subject's features enter the centring.

    Parameters
    ----------
    gram : ndarray of shape (n, n)
        Linear Gram matrix of all subjects (:func:`voxel_gram`).
    fit_rows : ndarray of int
        The training subjects.
    eval_rows : ndarray of int, optional
        Subjects to predict.

    Returns
    -------
    k_fit : ndarray of shape (len(fit_rows), len(fit_rows))
    k_eval : ndarray of shape (len(eval_rows), len(fit_rows)) or None
    """
    k_ft = gram[np.ix_(fit_rows, fit_rows)]
    col_mean = k_ft.mean(axis=0)  # ⟨x_t, m⟩ for each training subject t
    grand = float(col_mean.mean())  # ⟨m, m⟩
    k_fit = k_ft - col_mean[:, None] - col_mean[None, :] + grand
    if eval_rows is None:
        return k_fit, None
    k_et = gram[np.ix_(eval_rows, fit_rows)]
    k_eval = k_et - k_et.mean(axis=1, keepdims=True) - col_mean[None, :] + grand
    return k_fit, k_eval


class KernelRidgePath:
    """:class:`RidgePath` in the dual: ridge with intercept from a linear Gram matrix.

    With the training kernel centred on the training mean, ``Kc = Q diag(λ) Qᵀ``, the
    predictions for penalty ``a`` are ``Kc_eval Q diag(1 / (λ + a)) Qᵀ (y - ȳ) + ȳ``: those of
    ``Ridge(alpha=a)`` on the features themselves. Only ``Qᵀ y`` depends on the target, so a
    permutation costs one matrix product.

    Parameters
    ----------
    gram : ndarray of shape (n, n)
        Linear Gram matrix of all subjects.
    fit_rows : ndarray of int
        The subjects the ridge is fitted on.
    eval_rows : ndarray of int, optional
        Subjects to predict with :meth:`predict_eval`.
    """

    def __init__(
        self, gram: np.ndarray, fit_rows: np.ndarray, eval_rows: np.ndarray | None = None
    ) -> None:
        k_fit, k_eval = center_gram(gram, np.asarray(fit_rows), eval_rows)
        lam, self.q = np.linalg.eigh(k_fit)
        self.lam = np.clip(lam, 0.0, None)  # rounding below 0 on the null space
        self.m_eval = None if k_eval is None else k_eval @ self.q

    def _shrink(self, alphas: np.ndarray) -> np.ndarray:
        den = self.lam + np.asarray(alphas, dtype=float)[:, None]  # (A, n_fit)
        return np.divide(1.0, den, out=np.zeros_like(den), where=den > 0)

    def predict_eval(self, y: np.ndarray, alphas: np.ndarray) -> np.ndarray:
        """Predictions on ``eval_rows`` for every alpha and target column.

        Parameters
        ----------
        y : ndarray of shape (n_fit, B)
        alphas : ndarray of shape (A,)

        Returns
        -------
        ndarray of shape (A, n_eval, B)
        """
        if self.m_eval is None:
            raise RuntimeError("KernelRidgePath was built without eval_rows")
        return _path_predictions(self.m_eval, self._shrink(alphas), self.q, y)

    def dual_coef(self, y: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
        """Dual coefficients ``c`` and intercept ``ȳ``: ``ŷ = Kc_eval @ c + ȳ``.

        Parameters
        ----------
        y : ndarray of shape (n_fit,)
        alpha : float

        Returns
        -------
        coef : ndarray of shape (n_fit,)
        intercept : float
        """
        y_mean = float(y.mean())
        shrink = self._shrink(np.array([alpha]))[0]
        return self.q @ (shrink * (self.q.T @ (y - y_mean))), y_mean


class KernelRidgeCV(MultiTargetRidgeCV):
    """:class:`MultiTargetRidgeCV` for features given by their Gram matrix: the voxel ridge.

    The features are divided by one number fitted on the training subjects,
    ``sqrt(trace(Kc) / n_train)`` (the root mean squared distance of a training subject
    from their mean). The scaled training kernel's eigenvalues then sum to ``n_train`` (mean
    1) at any intensity scale and any number of voxels, so the same ``alphas`` span the same
    range, from almost no shrinkage to predicting the mean, at 8 mm and at 1 mm. Then the
    penalty is chosen by inner ``KFold`` CV exactly as for the ROI ridge, which is
    scikit-learn's ``RidgeCV(alphas, cv=inner_cv)`` on the features divided by that number
    (checked by the tests), and ridge is refitted on all training subjects.

    Parameters
    ----------
    gram : ndarray of shape (n, n)
        Linear Gram matrix of all subjects (:func:`voxel_gram`).
    train : ndarray of int
        Training rows of ``gram``.
    test : ndarray of int, optional
        Rows to predict.
    alphas : sequence of float
        Candidate penalties, relative to the training kernel's mean eigenvalue.
    inner_cv : int
        Unshuffled inner ``KFold`` folds.

    Attributes
    ----------
    scale : float
        ``trace(Kc) / n_train``: the penalty ``a`` on the raw features is ``a * scale``.

    Raises
    ------
    DfrnInputError
        For bad ``alphas``/``inner_cv``, or training inputs that are all identical.
    """

    def __init__(self, gram: np.ndarray, train: np.ndarray, test: np.ndarray | None,
                 alphas: Sequence[float], inner_cv: int) -> None:
        train = np.asarray(train)
        self.alphas = _check_cv_args(alphas, inner_cv, len(train))
        k_fit, _ = center_gram(gram, train)
        self.scale = float(np.trace(k_fit)) / len(train)
        if not self.scale > 0:
            raise DfrnInputError(
                f"the voxel ridge's {len(train)} training subjects have identical network "
                "inputs; check the images and [cohort] mask/intensity"
            )
        scaled = gram / self.scale
        self.inner = [
            (tr, va, KernelRidgePath(scaled, train[tr], train[va]))
            for tr, va in KFold(n_splits=inner_cv).split(train)
        ]
        self.full = KernelRidgePath(scaled, train, test)


# --------------------------------------------------------------------------------------
# preprocessing fitted on the training rows


def fit_preprocess(
    x: np.ndarray, c: np.ndarray | None
) -> tuple[np.ndarray | None, np.ndarray | None, StandardScaler]:
    """Fit the covariate regression (if any) and the scaler on training rows only.

    Parameters
    ----------
    x : ndarray of shape (n, p)
        Training features.
    c : ndarray of shape (n, q) or None
        Training covariates.

    Returns
    -------
    intercept : ndarray of shape (p,) or None
    coef : ndarray of shape (q, p) or None
    scaler : StandardScaler
        Fitted on the residualised features.
    """
    if c is None:
        return None, None, StandardScaler().fit(x)
    design = np.column_stack([np.ones(len(c)), c])
    beta, *_ = np.linalg.lstsq(design, x, rcond=None)
    b0, b = beta[0], beta[1:]
    return b0, b, StandardScaler().fit(x - b0 - c @ b)


def apply_preprocess(
    x: np.ndarray,
    c: np.ndarray | None,
    b0: np.ndarray | None,
    b: np.ndarray | None,
    scaler: StandardScaler,
) -> np.ndarray:
    """Residualise on the covariates and scale, with parameters from :func:`fit_preprocess`.

    Parameters
    ----------
    x : ndarray of shape (m, p)
    c : ndarray of shape (m, q) or None
    b0, b : ndarray or None
        The covariate regression's intercept and coefficients (None without covariates).
    scaler : StandardScaler

    Returns
    -------
    ndarray of shape (m, p)
    """
    if b is not None:
        if b0 is None or c is None:
            raise DfrnInputError("covariates are needed: the preprocessing was fitted with them")
        x = x - b0 - c @ b
    return scaler.transform(x)


def _as_2d_float(a: object, what: str) -> np.ndarray:
    """``a`` as a finite float matrix; one-line errors naming the column and row."""
    if isinstance(a, pd.Series):
        a = a.to_frame()
    if isinstance(a, pd.DataFrame):
        non_numeric = [c for c in a.columns if not pd.api.types.is_numeric_dtype(a[c])]
        if non_numeric:
            raise DfrnInputError(f"{what} column '{non_numeric[0]}' is not numeric")
        arr = a.to_numpy(dtype=float)
        rows, cols = [str(r) for r in a.index], [str(c) for c in a.columns]
    else:
        try:
            arr = np.asarray(a, dtype=float)
        except (TypeError, ValueError):
            raise DfrnInputError(f"{what} is not numeric") from None
        rows = cols = None
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise DfrnInputError(f"{what} must be 2-D, got shape {arr.shape}")
    bad = ~np.isfinite(arr)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        if rows is not None and cols is not None:
            raise DfrnInputError(f"{what} column '{cols[j]}' is missing or infinite for {rows[i]}")
        raise DfrnInputError(f"{what} column {j} is missing or infinite in row {i}")
    return arr


class RidgeBaseline(RegressorMixin, BaseEstimator):
    """Covariate regression → standard scaling → ridge with alpha chosen by inner CV.

    All three steps are fitted in :meth:`fit` on the data it is given (the training fold)
    and applied unchanged in :meth:`predict`; see the module docstring for the exact
    procedure. Numerically identical to ``RidgeCV(alphas, cv=inner_cv)`` on the scaled,
    residualised features.

    Parameters
    ----------
    alphas : sequence of float, default DEFAULT_ALPHAS
        Candidate ridge penalties (``np.logspace(-3, 5, 17)``).
    inner_cv : int, default 5
        Number of unshuffled inner ``KFold`` folds for choosing alpha.
    covariates : sequence of str, optional
        Names of columns of a DataFrame ``X`` to use as (numeric) covariates instead of
        features, so the estimator works in plain scikit-learn code. Covariates may instead
        be passed to :meth:`fit` and :meth:`predict` directly.

    Attributes
    ----------
    alpha_ : float
        The chosen penalty.
    cv_scores_ : ndarray of shape (n_alphas,)
        Mean inner-CV R² per candidate alpha.
    covariate_intercept_ : ndarray of shape (p,) or None
        Intercepts of the per-feature OLS fit on the covariates (None without covariates).
    covariate_coef_ : ndarray of shape (q, p) or None
        Coefficients of that fit (None without covariates).
    scaler_ : StandardScaler
        Fitted on the (residualised) training features.
    coef_ : ndarray of shape (p,)
        Ridge coefficients on the scaled features.
    intercept_ : float
        Ridge intercept.
    n_features_in_ : int
        Number of features (covariate columns excluded).
    """

    def __init__(
        self,
        alphas: Sequence[float] = DEFAULT_ALPHAS,
        inner_cv: int = 5,
        covariates: Sequence[str] | None = None,
    ) -> None:
        self.alphas = alphas
        self.inner_cv = inner_cv
        self.covariates = covariates

    def _split_xc(self, x: object, covariates: object) -> tuple[np.ndarray, np.ndarray | None]:
        if self.covariates is not None:
            if covariates is not None:
                raise DfrnInputError("covariates given both as column names and as an argument")
            if not isinstance(x, pd.DataFrame):
                raise DfrnInputError("covariates given as column names need X as a DataFrame")
            names = list(self.covariates)
            missing = [n for n in names if n not in x.columns]
            if missing:
                raise DfrnInputError(f"covariate column '{missing[0]}' is not in X")
            covariates = x[names]
            x = x.drop(columns=names)
        xa = _as_2d_float(x, "X")
        ca = None if covariates is None else _as_2d_float(covariates, "covariates")
        if ca is not None and len(ca) != len(xa):
            raise DfrnInputError(f"covariates have {len(ca)} rows but X has {len(xa)}")
        return xa, ca

    def _transform(self, x: np.ndarray, c: np.ndarray | None) -> np.ndarray:
        if self.covariate_coef_ is not None and c is None:
            raise DfrnInputError("this model was fitted with covariates: pass them to predict")
        if x.shape[1] != self.n_features_in_:
            raise DfrnInputError(
                f"X has {x.shape[1]} features but the model was fitted on {self.n_features_in_}"
            )
        return apply_preprocess(
            x, c, self.covariate_intercept_, self.covariate_coef_, self.scaler_
        )

    def fit(self, X: object, y: object, covariates: object = None) -> RidgeBaseline:  # noqa: N803
        """Fit covariate regression, scaler and ridge (alpha by inner CV) on ``X, y``.

        Parameters
        ----------
        X : array-like or DataFrame of shape (n, p)
            Features (plus the named covariate columns, if ``covariates`` was set).
        y : array-like of shape (n,)
            Target; must be finite.
        covariates : array-like of shape (n, q), optional
            Numeric covariates (see :func:`encode_covariates`).

        Returns
        -------
        RidgeBaseline
            ``self``.

        Raises
        ------
        DfrnInputError
            For missing or non-numeric values, mismatched rows, or too few subjects.
        """
        x, c = self._split_xc(X, covariates)
        yv = _as_2d_float(y, "y")
        if yv.shape[1] != 1:
            raise DfrnInputError(f"y must be one column, got {yv.shape[1]}")
        yv = yv[:, 0]
        if len(yv) != len(x):
            raise DfrnInputError(f"y has {len(yv)} values but X has {len(x)} rows")
        self.n_features_in_ = x.shape[1]
        self.covariate_intercept_, self.covariate_coef_, self.scaler_ = fit_preprocess(x, c)
        z = self._transform(x, c)
        engine = MultiTargetRidgeCV(z, None, self.alphas, self.inner_cv)
        self.cv_scores_ = engine.cv_scores(yv[:, None])[:, 0]
        self.alpha_ = float(engine.alphas[int(np.argmax(self.cv_scores_))])
        self.coef_, self.intercept_ = engine.full.coef(yv, self.alpha_)
        return self

    def predict(self, X: object, covariates: object = None) -> np.ndarray:  # noqa: N803
        """Predict with the parameters fitted in :meth:`fit`.

        Parameters
        ----------
        X : array-like or DataFrame of shape (m, p)
        covariates : array-like of shape (m, q), optional
            Required when the model was fitted with covariates.

        Returns
        -------
        ndarray of shape (m,)
        """
        check_is_fitted(self, "coef_")
        x, c = self._split_xc(X, covariates)
        return self._transform(x, c) @ self.coef_ + self.intercept_


# --------------------------------------------------------------------------------------
# tables indexed by participant


def index_by_participant(df: pd.DataFrame, what: str) -> pd.DataFrame:
    """A copy of ``df`` indexed by ``participant_id`` as strings, checked for duplicates.

    Parameters
    ----------
    df : DataFrame
        Indexed by participant, or holding a ``participant_id`` column.
    what : str
        The table's name, for messages.

    Returns
    -------
    DataFrame

    Raises
    ------
    DfrnInputError
        When a participant appears twice.
    """
    if "participant_id" in df.columns:
        df = df.set_index("participant_id")
    df = df.copy()
    df.index = df.index.astype(str)
    df.index.name = "participant_id"
    dup = df.index[df.index.duplicated()].unique().tolist()
    if dup:
        raise DfrnInputError(f"{what} has duplicated participant_id {dup[:5]}")
    return df


def encode_covariates(covariates: pd.DataFrame) -> pd.DataFrame:
    """Covariates as floats: numeric ones as they are, the others one-hot coded.

    Text, categorical and boolean columns are one-hot coded with the first level (in sorted
    order) dropped, by :class:`dfrn.data.covariates.CovariateEncoder`.

    Parameters
    ----------
    covariates : DataFrame
        Indexed by participant (or with a ``participant_id`` column).

    Returns
    -------
    DataFrame
        Float columns, indexed by ``participant_id`` (strings).

    Raises
    ------
    DfrnInputError
        When a covariate is missing for a participant (naming both).
    """
    from dfrn.data.covariates import CovariateEncoder

    cov = index_by_participant(covariates, "covariates table")
    return CovariateEncoder().fit_transform(cov)
