"""Beyond the covariates: partial r, ΔR², Freedman–Lane p, the covariates-only model, and
residualised targets; parity with statsmodels and scikit-learn, planted effects and nulls."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm

from dfrn.data.covariates import CovariateEncoder, select_covariates
from dfrn.errors import DfrnInputError
from dfrn.evaluation.confounds import (
    confound_table,
    cross_validate_covariates,
    incremental_value,
    raw_target_predictions,
    summarise_confounds,
    verdict,
)
from dfrn.evaluation.folds import make_fold_plan
from dfrn.targets.providers import ResidualizedTargets, StaticTargets


def _data(n: int = 120, seed: int = 0):
    rng = np.random.default_rng(seed)
    age = rng.normal(size=n)
    sex = rng.integers(0, 2, n).astype(float)
    c = np.column_stack([age, sex])
    local = rng.normal(size=n)
    return rng, age, c, local


def test_partial_r_and_delta_r2_equal_statsmodels() -> None:
    rng, age, c, local = _data()
    y = local + 0.5 * age + 0.7 * rng.normal(size=len(age))
    y_hat = 0.6 * local + 0.8 * age + 0.5 * rng.normal(size=len(age))
    v = incremental_value(y, y_hat, c, n_perm=0)
    full = sm.OLS(y, sm.add_constant(np.column_stack([c, y_hat]))).fit()
    reduced = sm.OLS(y, sm.add_constant(c)).fit()
    assert v.delta_r2 == pytest.approx(full.rsquared - reduced.rsquared, rel=1e-9)
    assert v.p_partial == pytest.approx(full.pvalues[-1], rel=1e-6)
    e_y = reduced.resid
    e_hat = sm.OLS(y_hat, sm.add_constant(c)).fit().resid
    assert v.r_partial == pytest.approx(np.corrcoef(e_y, e_hat)[0, 1], rel=1e-9)
    assert v.r == pytest.approx(np.corrcoef(y, y_hat)[0, 1])
    assert np.isnan(v.p_delta_r2_permutation)


def test_freedman_lane_equals_an_explicit_refit_loop() -> None:
    rng, age, c, local = _data(n=40, seed=1)
    y = 0.3 * local + age + rng.normal(size=40)
    y_hat = local + age
    n_perm = 60
    v = incremental_value(y, y_hat, c, n_perm=n_perm, seed=7)
    reduced = sm.OLS(y, sm.add_constant(c)).fit()
    perm_rng = np.random.default_rng(7)
    null = []
    for _ in range(n_perm):
        y_star = reduced.fittedvalues + reduced.resid[perm_rng.permutation(40)]
        f = sm.OLS(y_star, sm.add_constant(np.column_stack([c, y_hat]))).fit()
        r = sm.OLS(y_star, sm.add_constant(c)).fit()
        null.append(f.rsquared - r.rsquared)
    expected = (1 + np.sum(np.array(null) >= v.delta_r2 - 1e-12)) / (n_perm + 1)
    assert v.p_delta_r2_permutation == pytest.approx(expected)


def test_planted_confound_is_not_called_an_effect_and_a_planted_effect_is() -> None:
    """Predictions that only copy age: a valid test rejects about 5% of the time; predictions
    that carry the local score are found every time."""
    rejections, found = 0, 0
    for seed in range(100):
        rng, age, c, local = _data(n=80, seed=seed)
        y = 0.7 * age + rng.normal(size=80)
        y_hat = age + 0.3 * rng.normal(size=80)  # r(y, y_hat) is large, but it is only age
        null = incremental_value(y, y_hat, c, n_perm=199, seed=seed)
        assert null.r > 0.3
        rejections += null.p_delta_r2_permutation < 0.05
        y2 = local + 0.7 * age + rng.normal(size=80)
        real = incremental_value(y2, local + 0.5 * rng.normal(size=80), c, n_perm=199, seed=seed)
        found += real.p_delta_r2_permutation < 0.05
    assert rejections <= 12, rejections  # binomial(100, 0.05): P(> 12) < 0.001
    assert found == 100


def test_predictions_that_are_a_function_of_the_covariates_are_undefined() -> None:
    _, age, c, _ = _data()
    v = incremental_value(age * 2 + 1, 3 * age - c[:, 1], c, n_perm=10)
    assert np.isnan(v.r_partial) and np.isnan(v.delta_r2)


def _plan_and_targets(n: int = 60):
    rng, age, c, local = _data(n=n, seed=3)
    ids = [f"s{i:02d}" for i in range(n)]
    design = pd.DataFrame(c, index=ids, columns=["age", "sex_M"])
    targets = pd.DataFrame({"f": local + age, "g": age + rng.normal(size=n)}, index=ids)
    plan = make_fold_plan(ids, n_folds=4, n_repeats=2, seed=0)
    return ids, design, targets, plan


def test_covariates_only_model_equals_scikit_learn_in_the_same_folds() -> None:
    from sklearn.linear_model import LinearRegression

    ids, design, targets, plan = _plan_and_targets()
    pred = cross_validate_covariates(design, StaticTargets(targets), plan)
    assert len(pred) == 2 * 2 * len(ids)
    for (repeat, fold, factor), g in pred.groupby(["repeat", "fold", "factor"]):
        p = plan[plan.repeat == repeat]
        train = p.loc[p.fold != fold, "participant_id"]
        lr = LinearRegression().fit(design.loc[train], targets.loc[train, factor])
        np.testing.assert_allclose(g["y_pred"], lr.predict(design.loc[g.participant_id]))


def test_residuals_are_fitted_on_training_subjects_only() -> None:
    ids, design, targets, plan = _plan_and_targets()
    train = plan.loc[(plan.repeat == 0) & (plan.fold != 0), "participant_id"].tolist()
    test = plan.loc[(plan.repeat == 0) & (plan.fold == 0), "participant_id"].tolist()
    r_train, r_test = ResidualizedTargets(StaticTargets(targets), design)(0, 0, train, test)
    # a test subject's own target moves its residual by exactly that change, and nobody else's
    changed = targets.copy()
    changed.loc[test[0], "f"] += 5.0
    c_train, c_test = ResidualizedTargets(StaticTargets(changed), design)(0, 0, train, test)
    pd.testing.assert_frame_equal(c_train, r_train)
    assert c_test.loc[test[0], "f"] == pytest.approx(r_test.loc[test[0], "f"] + 5.0)
    pd.testing.assert_frame_equal(c_test.drop(index=test[0]), r_test.drop(index=test[0]))
    # a training subject's target does change the fit
    changed = targets.copy()
    changed.loc[train[0], "f"] += 5.0
    _, c_test = ResidualizedTargets(StaticTargets(changed), design)(0, 0, train, test)
    assert not np.allclose(c_test["f"], r_test["f"])
    # the training residuals are uncorrelated with the covariates (OLS)
    assert abs(np.corrcoef(r_train["f"], design.loc[train, "age"])[0, 1]) < 1e-8


def test_confound_table_uses_the_raw_target_and_summarises_over_repeats() -> None:
    ids, design, targets, plan = _plan_and_targets()
    raw = StaticTargets(targets)
    resid = ResidualizedTargets(raw, design)
    rows = []
    from dfrn.evaluation.folds import iter_splits

    for repeat, fold, train, test in iter_splits(plan):
        _, y_test = resid(repeat, fold, train, test)
        for f in y_test.columns:
            for pid, v in y_test[f].items():
                rows.append((pid, repeat, fold, f, v, 0.1 * v))
    pred = pd.DataFrame(rows, columns=["participant_id", "repeat", "fold", "factor", "y_true",
                                       "y_pred"])
    back = raw_target_predictions(pred, raw, plan)
    expected = [targets.at[p, f]
                for p, f in zip(back.participant_id, back.factor, strict=True)]
    np.testing.assert_allclose(back["y_true"], expected)
    table = confound_table({"dfrn": back}, design, n_perm=50)
    assert len(table) == 2 * 2
    summary = summarise_confounds(table)
    assert summary["n_repeats"].tolist() == [2, 2]
    assert summary.loc[0, "delta_r2"] == pytest.approx(table[table.factor == "f"]["delta_r2"].mean())


def test_verdicts_say_what_was_found() -> None:
    row = pd.Series({"delta_r2": 0.123, "p_delta_r2_permutation": 0.003, "p_partial": 0.001,
                     "n_repeats": 5})
    assert verdict(row, "age, sex and site") == (
        "the network's predictions add ΔR² = 0.12, permutation p = 0.003, median over 5 repeats "
        "beyond age, sex and site")
    row = pd.Series({"delta_r2": 0.001, "p_delta_r2_permutation": 0.61, "p_partial": 0.6,
                     "n_repeats": 1})
    assert verdict(row, "age and sex") == (
        "the network's predictions add nothing detectable beyond age and sex (ΔR² = 0.00, "
        "permutation p = 0.610)")


# -- covariates: selection and coding -------------------------------------------------------
def _table() -> pd.DataFrame:
    return pd.DataFrame({"age": [30.0, 40.0, np.nan, 50.0], "sex": ["F", "M", "M", "F"],
                         "site": [1, 2, 2, 1]}, index=pd.Index(["a", "b", "c", "d"],
                                                               name="participant_id"))


def test_missing_covariates_are_refused_by_name_or_dropped() -> None:
    with pytest.raises(DfrnInputError, match="subject c: covariate 'age' is missing .*"
                                              'missing_covariates = "drop"'):
        select_covariates(_table(), ["age", "sex"])
    sel = select_covariates(_table(), ["age", "sex"], site="site", missing="drop")
    assert sel is not None and sel.dropped == ["c"] and list(sel.raw.index) == ["a", "b", "d"]
    # the site is categorical even when it holds numbers
    assert list(sel.design().columns) == ["age", "sex_M", "site_2"]
    assert sel.words() == "age, sex and site"


def test_bad_covariate_columns_give_one_line() -> None:
    with pytest.raises(DfrnInputError, match=r"\[cohort\] covariates names column 'tiv', which "
                                              "is not in the cohort table"):
        select_covariates(_table(), ["tiv"])
    one_site = _table().assign(site=[7, 7, 7, 7])
    with pytest.raises(DfrnInputError, match=r"site column 'site' has a single level \('7'\) "
                                              "for all 4 subjects"):
        select_covariates(one_site, ["sex"], site="site")


def test_encoder_codes_a_new_cohort_with_the_training_levels() -> None:
    train = _table().dropna()
    enc = CovariateEncoder(categorical=("site",)).fit(train)
    again = CovariateEncoder.from_dict(enc.to_dict())
    new = pd.DataFrame({"age": [60.0], "sex": ["M"], "site": [2]}, index=["z"])
    assert again.transform(new).to_dict("records") == [{"age": 60.0, "sex_M": 1.0, "site_2": 1.0}]
    with pytest.raises(DfrnInputError, match="subject z: covariate 'site' is '3', a level the "
                                              "model was not trained with"):
        again.transform(new.assign(site=[3]))
    with pytest.raises(DfrnInputError, match="covariate 'age' is not a column of the cohort"):
        again.transform(new.drop(columns=["age"]))


def test_a_model_without_p_values_summarises_quietly() -> None:
    """The covariates-only model has no p-values: its medians are NaN, with no NumPy
    "Mean of empty slice" warning in the user's log (dfrn run printed four)."""
    import warnings

    table = pd.DataFrame({
        "repeat": [0, 1, 0, 1], "factor": ["a"] * 4,
        "model": ["dfrn", "dfrn", "covariates", "covariates"],
        "r": [0.5, 0.6, 0.3, 0.3], "r_partial": [0.4, 0.5, np.nan, np.nan],
        "delta_r2": [0.1, 0.2, np.nan, np.nan],
        "p_partial": [0.01, 0.03, np.nan, np.nan],
        "p_delta_r2_permutation": [0.002, 0.004, np.nan, np.nan],
    })
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        summary = summarise_confounds(table).set_index("model")
    assert summary.loc["dfrn", "p_partial"] == pytest.approx(0.02)
    assert summary.loc["dfrn", "p_delta_r2_permutation"] == pytest.approx(0.003)
    assert np.isnan(summary.loc["covariates", "p_partial"])
    assert np.isnan(summary.loc["covariates", "p_delta_r2_permutation"])
