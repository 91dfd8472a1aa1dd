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
