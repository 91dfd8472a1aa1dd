"""The ridge-regression baseline on atlas gray-matter volumes, and Figure 3.

Every step that learns from data is fitted on the outer training fold only and applied,
frozen, to the test fold, in this order:

1. **Covariates** (optional; e.g. age, sex, TIV). For each feature ``j`` an ordinary least
   squares regression with intercept ``x_j ≈ b0_j + C @ b_j`` is fitted on the training
   subjects; the residuals ``x_j - b0_j - C @ b_j`` replace the feature, and the *same*
   ``b0_j, b_j`` are applied to the test subjects' covariates and features. The targets are
   not adjusted. Categorical covariates are one-hot coded (first level dropped) on the
   whole cohort before splitting; coding uses no target information.
2. **Scaling**: a ``StandardScaler`` fitted on the (residualised) training features.
3. **Ridge with inner CV**: the penalty is chosen among ``alphas`` by ``inner_cv``-fold
   (unshuffled ``KFold``) cross-validation *within* the training fold, maximising the mean
   R² over inner folds (first best alpha on ties), then ridge is refitted on the whole
   training fold with it. This is exactly scikit-learn's ``RidgeCV(alphas, cv=inner_cv)``
   on the scaled training data (checked by the tests), computed from one SVD per inner fold
   so that many targets — e.g. 1,000 permuted copies, see :mod:`dfrn.evaluation.permutation` — are
   solved at the cost of one.

:func:`cross_validate_baseline` runs this on the same fold plan as the network and returns
out-of-fold predictions in the long format of :mod:`dfrn.evaluation.metrics`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal, overload

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.model_selection import KFold
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from dfrn.errors import DfrnInputError
from dfrn.evaluation.folds import iter_splits
from dfrn.evaluation.metrics import PREDICTION_COLUMNS, compute_metrics
from dfrn.io import atomic_write, atomic_write_tsv

__all__ = [
    "DEFAULT_ALPHAS",
    "RidgeBaseline",
    "cross_validate_baseline",
    "encode_covariates",
    "write_baseline_outputs",
    "plot_fig3",
]

DEFAULT_ALPHAS: tuple[float, ...] = tuple(float(a) for a in np.logspace(-3, 5, 17))


# --------------------------------------------------------------------------------------
# numerical core: ridge for many alphas and many target columns at once


class _RidgePath:
    """Ridge (with intercept) on a fixed design for all alphas and many targets at once.

    With the centred design ``Xc = U diag(s) Vt``, the ridge coefficients for penalty ``a``
    are ``V diag(s / (s² + a)) Uᵀ (y - ȳ)``; only ``Uᵀ y`` depends on the target.
    """

    def __init__(self, x_fit: np.ndarray, x_eval: np.ndarray | None = None) -> None:
        self.x_mean = x_fit.mean(axis=0)
        u, s, vt = np.linalg.svd(x_fit - self.x_mean, full_matrices=False)
        self.u, self.s, self.vt = u, s, vt
        self.m_eval = None if x_eval is None else (x_eval - self.x_mean) @ vt.T

    def _shrink(self, alphas: np.ndarray) -> np.ndarray:
        return self.s / (self.s**2 + np.asarray(alphas, dtype=float)[:, None])  # (A, k)

    def predict_eval(self, y: np.ndarray, alphas: np.ndarray) -> np.ndarray:
        """Predictions on ``x_eval`` for every alpha and target column: (A, n_eval, B)."""
        y_mean = y.mean(axis=0)
        uty = self.u.T @ (y - y_mean)  # (k, B)
        assert self.m_eval is not None
        return (self.m_eval[None, :, :] * self._shrink(alphas)[:, None, :]) @ uty + y_mean

    def coef(self, y: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
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


class _SplitEngine:
    """Inner-CV alpha selection and refit for one (scaled) training set; reusable for any y."""

    def __init__(
        self,
        z_train: np.ndarray,
        z_eval: np.ndarray | None,
        alphas: Sequence[float],
        inner_cv: int,
    ) -> None:
        self.alphas = np.asarray(alphas, dtype=float)
        n = len(z_train)
        if inner_cv < 2 or n < inner_cv:
            raise DfrnInputError(
                f"ridge inner CV needs 2 <= inner_cv <= training subjects, got inner_cv={inner_cv} "
                f"with {n} training subjects"
            )
        self.inner = [
            (tr, va, _RidgePath(z_train[tr], z_train[va]))
            for tr, va in KFold(n_splits=inner_cv).split(z_train)
        ]
        self.full = _RidgePath(z_train, z_eval)

    def cv_scores(self, y: np.ndarray) -> np.ndarray:
        """Mean inner-CV R² per (alpha, target column): (A, B)."""
        scores = [
            _r2_columns(y[va], path.predict_eval(y[tr], self.alphas)) for tr, va, path in self.inner
        ]
        return np.mean(scores, axis=0)

    def predict(self, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Test predictions (n_eval, B) and the chosen alpha index per column (B,)."""
        best = np.argmax(self.cv_scores(y), axis=0)
        pred_all = self.full.predict_eval(y, self.alphas)  # (A, n_eval, B)
        pred = np.take_along_axis(pred_all, best[None, None, :], axis=0)[0]
        return pred, best


# --------------------------------------------------------------------------------------
# preprocessing fitted on the training fold


def _fit_covariates(x: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    design = np.column_stack([np.ones(len(c)), c])
    beta, *_ = np.linalg.lstsq(design, x, rcond=None)
    return beta[0], beta[1:]  # intercept (p,), coef (q, p)


def _fit_preprocess(
    x: np.ndarray, c: np.ndarray | None
) -> tuple[np.ndarray | None, np.ndarray | None, StandardScaler]:
    """Covariate regression (if any) and scaler, fitted on training rows only."""
    if c is None:
        return None, None, StandardScaler().fit(x)
    b0, b = _fit_covariates(x, c)
    return b0, b, StandardScaler().fit(x - b0 - c @ b)


def _apply_preprocess(
    x: np.ndarray,
    c: np.ndarray | None,
    b0: np.ndarray | None,
    b: np.ndarray | None,
    scaler: StandardScaler,
) -> np.ndarray:
    if b is not None:
        assert b0 is not None and c is not None
        x = x - b0 - c @ b
    return scaler.transform(x)


def _prepare_split_engine(
    x: np.ndarray,
    c: np.ndarray | None,
    tr: np.ndarray,
    te: np.ndarray,
    alphas: Sequence[float],
    inner_cv: int,
) -> _SplitEngine:
    """The target-independent part of :class:`RidgeBaseline` for one fold, with test rows."""
    c_tr = None if c is None else c[tr]
    c_te = None if c is None else c[te]
    b0, b, scaler = _fit_preprocess(x[tr], c_tr)
    z_train = _apply_preprocess(x[tr], c_tr, b0, b, scaler)
    z_test = _apply_preprocess(x[te], c_te, b0, b, scaler)
    return _SplitEngine(z_train, z_test, alphas, inner_cv)


def _as_2d_float(a: object, what: str) -> np.ndarray:
    arr = np.asarray(a, dtype=float)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"{what} must be 2-D, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} holds NaN or infinite values")
    return arr


class RidgeBaseline(RegressorMixin, BaseEstimator):
    """Covariate regression → standard scaling → ridge with alpha chosen by inner CV.

    All three steps are fitted in :meth:`fit` on the data it is given (the training fold)
    and applied unchanged in :meth:`predict`; see the module docstring for the exact
    procedure. Numerically identical to ``RidgeCV(alphas, cv=inner_cv)`` on the scaled,
    residualised features.

    Parameters
    ----------
    alphas
        Candidate ridge penalties (default ``np.logspace(-3, 5, 17)``).
    inner_cv
        Number of unshuffled inner ``KFold`` folds for choosing alpha.
    covariates
        Optional names of columns of a DataFrame ``X`` to use as (numeric) covariates
        instead of features, so the estimator works in plain scikit-learn code. Covariates
        may instead be passed to :meth:`fit` and :meth:`predict` directly.

    Attributes
    ----------
    alpha_ : float — the chosen penalty.
    cv_scores_ : ndarray (n_alphas,) — mean inner-CV R² per candidate alpha.
    covariate_intercept_, covariate_coef_ : ndarray (p,), (q, p) or None — the per-feature
        OLS fit on the covariates (None without covariates).
    scaler_ : StandardScaler — fitted on the (residualised) training features.
    coef_, intercept_ : ridge coefficients on the scaled features, and intercept.
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
                raise ValueError("covariates given both as column names and as an argument")
            if not isinstance(x, pd.DataFrame):
                raise ValueError("covariates given as column names need X as a DataFrame")
            names = list(self.covariates)
            covariates = x[names]
            x = x.drop(columns=names)
        xa = _as_2d_float(x, "X")
        ca = None if covariates is None else _as_2d_float(covariates, "covariates")
        if ca is not None and len(ca) != len(xa):
            raise ValueError(f"covariates have {len(ca)} rows but X has {len(xa)}")
        return xa, ca

    def _transform(self, x: np.ndarray, c: np.ndarray | None) -> np.ndarray:
        if self.covariate_coef_ is not None and c is None:
            raise ValueError("this model was fitted with covariates: pass them to predict")
        return _apply_preprocess(
            x, c, self.covariate_intercept_, self.covariate_coef_, self.scaler_
        )

    def fit(self, X: object, y: object, covariates: object = None) -> RidgeBaseline:  # noqa: N803
        x, c = self._split_xc(X, covariates)
        yv = np.asarray(y, dtype=float).ravel()
        if len(yv) != len(x):
            raise ValueError(f"y has {len(yv)} values but X has {len(x)} rows")
        if not np.all(np.isfinite(yv)):
            raise ValueError("y holds NaN or infinite values")
        self.n_features_in_ = x.shape[1]
        self.covariate_intercept_, self.covariate_coef_, self.scaler_ = _fit_preprocess(x, c)
        z = self._transform(x, c)
        engine = _SplitEngine(z, None, self.alphas, self.inner_cv)
        self.cv_scores_ = engine.cv_scores(yv[:, None])[:, 0]
        self.alpha_ = float(engine.alphas[int(np.argmax(self.cv_scores_))])
        self.coef_, self.intercept_ = engine.full.coef(yv, self.alpha_)
        return self

    def predict(self, X: object, covariates: object = None) -> np.ndarray:  # noqa: N803
        x, c = self._split_xc(X, covariates)
        return self._transform(x, c) @ self.coef_ + self.intercept_


# --------------------------------------------------------------------------------------
# cross-validation on the shared fold plan


def _indexed(df: pd.DataFrame, what: str) -> pd.DataFrame:
    if "participant_id" in df.columns:
        df = df.set_index("participant_id")
    df = df.copy()
    df.index = df.index.astype(str)
    df.index.name = "participant_id"
    dup = df.index[df.index.duplicated()].unique().tolist()
    if dup:
        raise DfrnInputError(f"{what} has duplicated participant_id {dup[:5]}")
    return df


def _first_bad(df: pd.DataFrame, bad: np.ndarray) -> tuple[str, str]:
    i, j = np.argwhere(bad)[0]
    return str(df.index[i]), str(df.columns[j])


def encode_covariates(covariates: pd.DataFrame) -> pd.DataFrame:
    """Numeric covariates as floats; text/categorical/bool ones one-hot coded, first level dropped."""
    cov = _indexed(covariates, "covariates table")
    if cov.isna().to_numpy().any():
        pid, col = _first_bad(cov, cov.isna().to_numpy())
        raise DfrnInputError(f"covariate '{col}' is missing for subject {pid}")
    categorical = [c for c in cov.columns if not pd.api.types.is_numeric_dtype(cov[c])]
    categorical += [c for c in cov.columns if pd.api.types.is_bool_dtype(cov[c])]
    out = pd.get_dummies(cov, columns=categorical, drop_first=True, dtype=float)
    return out.astype(float)


def _align_inputs(
    features: pd.DataFrame,
    targets: pd.DataFrame,
    plan: pd.DataFrame,
    covariates: pd.DataFrame | None,
) -> tuple[list[str], np.ndarray, pd.DataFrame, np.ndarray | None]:
    """Subjects of the plan (first-appearance order), their X, targets and covariates."""
    ids = [str(p) for p in dict.fromkeys(plan["participant_id"].astype(str))]
    feats = _indexed(features, "ROI feature table")
    targs = _indexed(targets, "targets table")
    tables = [("ROI features", feats), ("targets", targs)]
    cov = None
    if covariates is not None:
        cov = encode_covariates(covariates)
        tables.append(("covariates", cov))
    for what, table in tables:
        missing = [p for p in ids if p not in table.index]
        if missing:
            raise DfrnInputError(
                f"subject {missing[0]} of the fold plan has no {what} "
                f"({len(missing)} subject(s) missing)"
            )
    feats = feats.loc[ids]
    non_numeric = [c for c in feats.columns if not pd.api.types.is_numeric_dtype(feats[c])]
    if non_numeric:
        raise DfrnInputError(f"ROI feature column '{non_numeric[0]}' is not numeric")
    x = feats.to_numpy(dtype=float)
    if not np.all(np.isfinite(x)):
        pid, col = _first_bad(feats, ~np.isfinite(x))
        raise DfrnInputError(f"ROI feature '{col}' is missing or infinite for subject {pid}")
    targs = targs.loc[ids]
    non_numeric = [c for c in targs.columns if not pd.api.types.is_numeric_dtype(targs[c])]
    if non_numeric:
        raise DfrnInputError(f"target column '{non_numeric[0]}' is not numeric")
    targs = targs.astype(float)
    if np.isinf(targs.to_numpy()).any():
        pid, col = _first_bad(targs, np.isinf(targs.to_numpy()))
        raise DfrnInputError(f"target '{col}' is infinite for subject {pid}")
    c = None if cov is None else cov.loc[ids].to_numpy(dtype=float)
    return ids, x, targs, c


def _split_rows(
    ids: list[str], train: list[str], test: list[str], observed: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    pos = {p: i for i, p in enumerate(ids)}
    tr = np.array([pos[p] for p in train], dtype=int)
    te = np.array([pos[p] for p in test], dtype=int)
    return tr[observed[tr]], te[observed[te]]


@overload
def cross_validate_baseline(
    features: pd.DataFrame,
    targets: pd.DataFrame,
    plan: pd.DataFrame,
    covariates: pd.DataFrame | None = ...,
    *,
    alphas: Sequence[float] = ...,
    inner_cv: int = ...,
    return_models: Literal[False] = ...,
) -> pd.DataFrame: ...


@overload
def cross_validate_baseline(
    features: pd.DataFrame,
    targets: pd.DataFrame,
    plan: pd.DataFrame,
    covariates: pd.DataFrame | None = ...,
    *,
    alphas: Sequence[float] = ...,
    inner_cv: int = ...,
    return_models: Literal[True],
) -> tuple[pd.DataFrame, dict[tuple[int, int, str], RidgeBaseline]]: ...


def cross_validate_baseline(
    features: pd.DataFrame,
    targets: pd.DataFrame,
    plan: pd.DataFrame,
    covariates: pd.DataFrame | None = None,
    *,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    inner_cv: int = 5,
    return_models: bool = False,
) -> pd.DataFrame | tuple[pd.DataFrame, dict[tuple[int, int, str], RidgeBaseline]]:
    """Out-of-fold ridge predictions for every factor on the network's fold plan.

    ``features``, ``targets`` and ``covariates`` are indexed by ``participant_id`` (or hold
    it as a column); ``targets`` has one column per factor and may hold NaN: a subject with
    a missing value is left out of that factor's training and test sets (other factors
    keep it). One :class:`RidgeBaseline` is fitted per (repeat, fold, factor). The result
    is deterministic and has the columns of :data:`dfrn.evaluation.metrics.PREDICTION_COLUMNS`, one row
    per (repeat, test subject, factor). With ``return_models=True`` the fitted models,
    keyed by ``(repeat, fold, factor)``, are returned too. BLAS runs single-threaded inside
    (the matrices are small; threads only add overhead on a busy machine).
    """
    ids, x, targs, c = _align_inputs(features, targets, plan, covariates)
    with threadpool_limits(limits=1, user_api="blas"):  # small matrices: threads only cost
        return _cross_validate(ids, x, targs, c, plan, alphas, inner_cv, return_models)


def _cross_validate(
    ids: list[str],
    x: np.ndarray,
    targs: pd.DataFrame,
    c: np.ndarray | None,
    plan: pd.DataFrame,
    alphas: Sequence[float],
    inner_cv: int,
    return_models: bool,
) -> pd.DataFrame | tuple[pd.DataFrame, dict[tuple[int, int, str], RidgeBaseline]]:
    frames: list[pd.DataFrame] = []
    models: dict[tuple[int, int, str], RidgeBaseline] = {}
    for repeat, fold, train, test in iter_splits(plan):
        for factor in targs.columns:
            y = targs[factor].to_numpy(dtype=float)
            tr, te = _split_rows(ids, train, test, np.isfinite(y))
            if len(te) == 0:
                continue
            if len(tr) < inner_cv:
                raise DfrnInputError(
                    f"factor '{factor}': repeat {repeat} fold {fold} has {len(tr)} training "
                    f"subjects with a value, fewer than the ridge inner_cv={inner_cv}"
                )
            model = RidgeBaseline(alphas=alphas, inner_cv=inner_cv)
            model.fit(x[tr], y[tr], None if c is None else c[tr])
            pred = model.predict(x[te], None if c is None else c[te])
            if return_models:
                models[(repeat, fold, str(factor))] = model
            frames.append(
                pd.DataFrame(
                    {
                        "participant_id": [ids[i] for i in te],
                        "repeat": repeat,
                        "fold": fold,
                        "factor": str(factor),
                        "y_true": y[te],
                        "y_pred": pred,
                    }
                )
            )
    out = (
        pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=PREDICTION_COLUMNS)
    )
    out = out[PREDICTION_COLUMNS]
    return (out, models) if return_models else out


def write_baseline_outputs(predictions: pd.DataFrame, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``baseline/predictions.tsv`` and ``baseline/metrics.tsv`` under ``out_dir``."""
    folder = Path(out_dir) / "baseline"
    folder.mkdir(parents=True, exist_ok=True)
    pred_path, metrics_path = folder / "predictions.tsv", folder / "metrics.tsv"
    atomic_write_tsv(predictions[PREDICTION_COLUMNS], pred_path, float_format=None)
    atomic_write_tsv(compute_metrics(predictions), metrics_path, float_format=None)
    return pred_path, metrics_path


# --------------------------------------------------------------------------------------
# Figure 3


def _r_summary(metrics: pd.DataFrame, factors: list[str]) -> tuple[np.ndarray, np.ndarray]:
    mean, sd = [], []
    for f in factors:
        r = metrics.loc[metrics["factor"].astype(str) == f, "pearson_r"].to_numpy(float)
        r = r[np.isfinite(r)]
        mean.append(float(r.mean()) if len(r) else np.nan)
        sd.append(float(r.std(ddof=1)) if len(r) > 1 else 0.0)
    return np.array(mean), np.array(sd)


def plot_fig3(
    ridge_metrics: pd.DataFrame,
    dfrn_metrics: pd.DataFrame | None,
    path: str | Path,
) -> Path:
    """Figure 3: mean Pearson r per factor, ridge regression next to DFRN, ± sd over repeats.

    Both inputs are metrics tables of :func:`dfrn.evaluation.metrics.compute_metrics` (one row per
    repeat and factor). ``dfrn_metrics`` may be None to draw the ridge bars alone. Written
    with the Agg canvas (no display needed); the usual path is
    ``figures/fig3_rr_vs_dfrn.png``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tables = [("Ridge regression (ROI volumes)", ridge_metrics, "#8c8c8c")]
    if dfrn_metrics is not None:
        tables.append(("DFRN", dfrn_metrics, "#1f77b4"))
    factors = list(
        dict.fromkeys(
            [str(f) for _, m, _ in tables[::-1] for f in m["factor"]]  # DFRN's order first
        )
    )
    fig = Figure(figsize=(max(4.0, 1.3 * len(factors) + 2.0), 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / len(tables)
    xs = np.arange(len(factors))
    for k, (label, metrics, color) in enumerate(tables):
        mean, sd = _r_summary(metrics, factors)
        offset = (k - (len(tables) - 1) / 2) * width
        ax.bar(xs + offset, mean, width, yerr=sd, capsize=3, label=label, color=color)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(xs, factors, rotation=20 if len(factors) > 4 else 0, ha="center")
    ax.set_ylabel("Pearson r (mean ± sd over repeats)")
    ax.set_title("Out-of-fold prediction of symptom factors")
    ax.legend(frameon=False, fontsize="small")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda p: fig.savefig(p, dpi=150, format="png"))
    return out
