"""RidgeBaseline: parity with scikit-learn, covariates fitted on training rows, input errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import RidgeCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from dfrn.errors import DfrnInputError
from dfrn.models.ridge import (
    DEFAULT_ALPHAS,
    MultiTargetRidgeCV,
    RidgeBaseline,
    encode_covariates,
)


def test_ridge_baseline_equals_sklearn_ridgecv() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 30))
    y = x[:, 0] - 0.5 * x[:, 1] + rng.normal(size=60)
    x_new = rng.normal(size=(7, 30))
    ours = RidgeBaseline().fit(x, y)
    ref = make_pipeline(StandardScaler(), RidgeCV(alphas=np.array(DEFAULT_ALPHAS), cv=5))
    ref.fit(x, y)
    assert ours.alpha_ == ref[-1].alpha_
    np.testing.assert_allclose(ours.coef_, ref[-1].coef_, atol=1e-10)
    np.testing.assert_allclose(ours.predict(x_new), ref.predict(x_new), atol=1e-10)
    assert ours.cv_scores_.max() == pytest.approx(ref[-1].best_score_, abs=1e-10)


def test_multi_target_engine_equals_one_model_per_column() -> None:
    rng = np.random.default_rng(3)
    z = StandardScaler().fit_transform(rng.normal(size=(40, 6)))
    z_new = rng.normal(size=(5, 6))
    y = np.column_stack([z[:, 0] + rng.normal(size=40), rng.normal(size=40)])
    pred, best = MultiTargetRidgeCV(z, z_new, DEFAULT_ALPHAS, 5).predict(y)
    for j in range(2):
        ref = RidgeCV(alphas=np.array(DEFAULT_ALPHAS), cv=5).fit(z, y[:, j])
        assert DEFAULT_ALPHAS[best[j]] == ref.alpha_
        np.testing.assert_allclose(pred[:, j], ref.predict(z_new), atol=1e-10)


def test_covariate_regression_fitted_on_training_rows_only() -> None:
    rng = np.random.default_rng(1)
    n = 50
    c = np.column_stack([rng.normal(50, 10, n), rng.integers(0, 2, n)])
    x = 0.3 * c[:, :1] + 2.0 * c[:, 1:] + rng.normal(size=(n, 4))
    y = x[:, 0] - 0.3 * c[:, 0] + 0.1 * rng.normal(size=n)
    model = RidgeBaseline(inner_cv=5).fit(x[:40], y[:40], covariates=c[:40])

    design = np.column_stack([np.ones(40), c[:40]])
    beta = np.linalg.lstsq(design, x[:40], rcond=None)[0]
    np.testing.assert_allclose(model.covariate_intercept_, beta[0], atol=1e-8)
    np.testing.assert_allclose(model.covariate_coef_, beta[1:], atol=1e-8)
    resid_train = x[:40] - design @ beta
    np.testing.assert_allclose(model.scaler_.mean_, resid_train.mean(0), atol=1e-10)
    # residualised training features are uncorrelated with the covariates
    assert np.abs(c[:40].T @ (resid_train - resid_train.mean(0))).max() < 1e-6

    # test rows: the training coefficients are applied, not refitted
    resid_test = x[40:] - np.column_stack([np.ones(10), c[40:]]) @ beta
    expected = model.scaler_.transform(resid_test) @ model.coef_ + model.intercept_
    np.testing.assert_allclose(model.predict(x[40:], covariates=c[40:]), expected, atol=1e-10)
    with pytest.raises(ValueError, match="covariates"):
        model.predict(x[40:])
    with pytest.raises(DfrnInputError, match="covariates"):
        model.predict(x[40:])

    # covariates named as DataFrame columns: same model
    frame = pd.DataFrame(x, columns=list("abcd")).assign(age=c[:, 0], sex=c[:, 1])
    named = RidgeBaseline(inner_cv=5, covariates=["age", "sex"]).fit(frame[:40], y[:40])
    np.testing.assert_allclose(named.predict(frame[40:]), expected, atol=1e-10)


def test_user_errors_are_one_line_input_errors_naming_the_culprit() -> None:
    rng = np.random.default_rng(2)
    ids = pd.Index([f"sub-{i:02d}" for i in range(20)], name="participant_id")
    x = pd.DataFrame(rng.normal(size=(20, 3)), index=ids, columns=["roi_a", "roi_b", "roi_c"])
    y = pd.Series(rng.normal(size=20), index=ids, name="mood")

    bad = x.copy()
    bad.loc["sub-07", "roi_b"] = np.nan
    with pytest.raises(DfrnInputError, match="roi_b.*sub-07") as info:
        RidgeBaseline().fit(bad, y)
    assert "\n" not in str(info.value)
    bad_y = y.copy()
    bad_y["sub-03"] = np.inf
    with pytest.raises(DfrnInputError, match="mood.*sub-03"):
        RidgeBaseline().fit(x, bad_y)
    with pytest.raises(DfrnInputError, match="'roi_a' is not numeric"):
        RidgeBaseline().fit(x.assign(roi_a="high"), y)
    with pytest.raises(DfrnInputError, match="19 values but X has 20"):
        RidgeBaseline().fit(x, y.iloc[:-1])
    with pytest.raises(DfrnInputError, match="covariate column 'age' is not in X"):
        RidgeBaseline(covariates=["age"]).fit(x, y)
    with pytest.raises(DfrnInputError, match="inner_cv"):
        RidgeBaseline(inner_cv=30).fit(x, y)
    with pytest.raises(DfrnInputError, match="alphas"):
        RidgeBaseline(alphas=[]).fit(x, y)
    with pytest.raises(NotFittedError):
        RidgeBaseline().predict(x)
    fitted = RidgeBaseline().fit(x, y)
    with pytest.raises(DfrnInputError, match="2 features but the model was fitted on 3"):
        fitted.predict(x.iloc[:, :2])


def test_encode_covariates() -> None:
    cov = pd.DataFrame(
        {
            "participant_id": [1, 2, 3],
            "age": [30, 40, 50],
            "sex": ["F", "M", "F"],
            "smoker": [True, False, True],
        }
    )
    out = encode_covariates(cov)
    assert list(out.index) == ["1", "2", "3"] and out.index.name == "participant_id"
    assert list(out.columns) == ["age", "sex_M", "smoker_True"]
    assert all(pd.api.types.is_float_dtype(t) for t in out.dtypes)
    assert out["sex_M"].tolist() == [0.0, 1.0, 0.0]
    with pytest.raises(DfrnInputError, match="subject 2: covariate 'sex' is missing"):
        encode_covariates(cov.assign(sex=["F", None, "M"]))
    with pytest.raises(DfrnInputError, match="duplicated participant_id"):
        encode_covariates(cov.assign(participant_id=[1, 1, 2]))


# --------------------------------------------------------------------------------------
# the voxel ridge: the dual (kernel) form


def _voxels(n: int = 30, shape: tuple[int, int, int] = (6, 7, 8), seed: int = 0):
    """Volumes with a large common offset (as z-scored brains have) and a planted signal."""
    rng = np.random.default_rng(seed)
    score = rng.normal(size=n)
    vols = 3.0 + rng.normal(size=(n, *shape))
    vols[:, :3] += score[:, None, None, None]  # a latent score written into 168 voxels
    y = score + 0.3 * rng.normal(size=n)
    return vols, vols.reshape(n, -1), y


def test_voxel_ridge_equals_sklearn_primal_ridge() -> None:
    from sklearn.linear_model import Ridge

    from dfrn.models.ridge import KernelRidgeCV, KernelRidgePath, voxel_gram

    vols, x, y = _voxels()
    tr, te = np.arange(22), np.arange(22, 30)
    gram = voxel_gram(list(vols), block_values=500)  # 17 blocks of voxels
    np.testing.assert_allclose(gram, (x - x.mean(0)) @ (x - x.mean(0)).T, atol=1e-8)
    alphas = np.array([1e-2, 1.0, 30.0, 1e3])
    path = KernelRidgePath(gram, tr, te)
    pred = path.predict_eval(y[tr, None], alphas)
    for k, a in enumerate(alphas):
        ref = Ridge(alpha=a).fit(x[tr], y[tr])  # primal, with an unpenalised intercept
        np.testing.assert_allclose(pred[k, :, 0], ref.predict(x[te]), atol=1e-6)
        coef, intercept = path.dual_coef(y[tr], a)
        np.testing.assert_allclose(path.m_eval @ path.q.T @ coef + intercept, ref.predict(x[te]),
                                   atol=1e-6)
    # with the inner-CV alpha: RidgeCV on the features divided by the training scale
    engine = KernelRidgeCV(gram, tr, te, DEFAULT_ALPHAS, 5)
    centred = x[tr] - x[tr].mean(0)
    assert engine.scale == pytest.approx((centred**2).sum() / len(tr), rel=1e-12)
    got, best = engine.predict(y[tr, None])
    z = x / np.sqrt(engine.scale)
    ref_cv = RidgeCV(alphas=np.array(DEFAULT_ALPHAS), cv=5).fit(z[tr], y[tr])
    assert DEFAULT_ALPHAS[best[0]] == ref_cv.alpha_
    np.testing.assert_allclose(got[:, 0], ref_cv.predict(z[te]), atol=1e-6)
    assert np.corrcoef(got[:, 0], y[te])[0, 1] > 0.5  # the planted signal is found


def test_voxel_ridge_centring_and_fit_use_training_subjects_only() -> None:
    """A change planted in the test subjects' inputs alone leaves the training side as it
    was: centring (training means), scale, chosen alpha and the fitted function."""
    from sklearn.linear_model import Ridge

    from dfrn.models.ridge import KernelRidgeCV, center_gram, voxel_gram

    vols, x, y = _voxels(seed=1)
    tr, te = np.arange(22), np.arange(22, 30)
    changed = vols.copy()
    changed[te] = 10.0 * changed[te] + 7.0  # a wildly different test fold
    x2 = changed.reshape(len(changed), -1)
    gram_a, gram_b = voxel_gram(list(vols)), voxel_gram(list(changed))
    k_fit, k_eval = center_gram(gram_b, tr, te)
    m = x2[tr].mean(axis=0)  # the training subjects' mean, not everyone's
    np.testing.assert_allclose(k_fit, (x2[tr] - m) @ (x2[tr] - m).T, atol=1e-6)
    np.testing.assert_allclose(k_eval, (x2[te] - m) @ (x2[tr] - m).T, atol=1e-6)
    a = KernelRidgeCV(gram_a, tr, te, DEFAULT_ALPHAS, 5)
    b = KernelRidgeCV(gram_b, tr, te, DEFAULT_ALPHAS, 5)
    assert b.scale == pytest.approx(a.scale, rel=1e-10)
    pred_a, best_a = a.predict(y[tr, None])
    pred_b, best_b = b.predict(y[tr, None])
    assert best_a[0] == best_b[0]
    np.testing.assert_allclose(b.cv_scores(y[tr, None]), a.cv_scores(y[tr, None]), atol=1e-9)
    # the same training fit, applied to the changed test inputs
    fit = Ridge(alpha=DEFAULT_ALPHAS[best_a[0]] * a.scale).fit(x[tr], y[tr])
    np.testing.assert_allclose(pred_a[:, 0], fit.predict(x[te]), atol=1e-6)
    np.testing.assert_allclose(pred_b[:, 0], fit.predict(x2[te]), atol=1e-6)
    assert not np.allclose(pred_a, pred_b)  # the test inputs did change
