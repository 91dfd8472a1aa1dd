"""Ridge baseline: sklearn parity, per-fold fitting (no leakage), CV output, permutations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import RidgeCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from dfrn.errors import DfrnInputError
from dfrn.evaluation.folds import make_fold_plan
from dfrn.evaluation.metrics import PREDICTION_COLUMNS, compute_metrics
from dfrn.evaluation.permutation import (
    PERMUTATION_COLUMNS,
    permutation_indices,
    permutation_test,
    permutation_test_generic,
    permute_targets,
    write_permutation_table,
)
from dfrn.models.ridge import (
    DEFAULT_ALPHAS,
    RidgeBaseline,
    cross_validate_baseline,
    plot_fig3,
    write_baseline_outputs,
)


def _cohort(n: int = 40, p: int = 12, seed: int = 0, signal: float = 1.0):
    rng = np.random.default_rng(seed)
    ids = [f"sub-{i:03d}" for i in range(n)]
    index = pd.Index(ids, name="participant_id")
    x = pd.DataFrame(rng.normal(size=(n, p)), index=index, columns=[f"roi_{j}" for j in range(p)])
    strong = x.iloc[:, :3].sum(axis=1) * signal + 0.1 * rng.normal(size=n)
    targets = pd.DataFrame({"strong": strong, "noise": rng.normal(size=n)}, index=index)
    cov = pd.DataFrame(
        {"age": rng.normal(50, 10, n), "sex": rng.choice(["F", "M"], n)}, index=index
    )
    return ids, x, targets, cov


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

    # covariates named as DataFrame columns: same model
    frame = pd.DataFrame(x, columns=list("abcd")).assign(age=c[:, 0], sex=c[:, 1])
    named = RidgeBaseline(inner_cv=5, covariates=["age", "sex"]).fit(frame[:40], y[:40])
    np.testing.assert_allclose(named.predict(frame[40:]), expected, atol=1e-10)


def test_fold_parameters_do_not_see_test_subjects() -> None:
    """Changing a test subject's data leaves every parameter of its test folds unchanged."""
    ids, x, targets, cov = _cohort(n=40, p=12, seed=2)
    plan = make_fold_plan(ids, n_folds=5, n_repeats=2, seed=0)
    pred_a, models_a = cross_validate_baseline(x, targets, plan, cov, return_models=True)

    victim = ids[7]
    x_b, cov_b = x.copy(), cov.copy()
    x_b.loc[victim] = x_b.loc[victim] * 50 + 100  # wildly different features
    cov_b.loc[victim, "age"] = 500.0
    pred_b, models_b = cross_validate_baseline(x_b, targets, plan, cov_b, return_models=True)

    test_folds = set(
        plan.loc[plan["participant_id"] == victim, ["repeat", "fold"]].itertuples(
            index=False, name=None
        )
    )
    n_checked = n_changed = 0
    for key, ma in models_a.items():
        mb = models_b[key]
        same = (
            ma.alpha_ == mb.alpha_
            and np.array_equal(ma.scaler_.mean_, mb.scaler_.mean_)
            and np.array_equal(ma.scaler_.scale_, mb.scaler_.scale_)
            and np.array_equal(ma.coef_, mb.coef_)
            and np.array_equal(ma.covariate_coef_, mb.covariate_coef_)
            and ma.intercept_ == mb.intercept_
        )
        if key[:2] in test_folds:
            assert same, f"fold {key} changed although {victim} is a test subject there"
            n_checked += 1
        else:
            n_changed += not same
    assert n_checked == 2 * 2  # 2 repeats × 2 factors
    assert n_changed == len(models_a) - n_checked  # the check is sensitive
    # other test subjects of the victim's folds keep their predictions
    merged = pred_a.merge(pred_b, on=["participant_id", "repeat", "fold", "factor"])
    others = merged[merged["participant_id"] != victim]
    others = others[
        [(r, f) in test_folds for r, f in zip(others["repeat"], others["fold"], strict=True)]
    ]
    assert len(others) > 0
    np.testing.assert_array_equal(others["y_pred_x"], others["y_pred_y"])


def test_cross_validate_format_nan_drop_and_determinism(tmp_path: Path) -> None:
    ids, x, targets, cov = _cohort(n=30, p=6, seed=3)
    targets.loc[ids[:4], "noise"] = np.nan
    plan = make_fold_plan(ids, n_folds=5, n_repeats=2, seed=1)
    pred = cross_validate_baseline(x, targets, plan, cov)
    assert list(pred.columns) == PREDICTION_COLUMNS
    counts = pred.groupby(["repeat", "factor"])["participant_id"].agg(["count", "nunique"])
    assert counts.loc[(0, "strong")].tolist() == [30, 30]
    assert counts.loc[(1, "noise")].tolist() == [26, 26]
    assert not set(ids[:4]) & set(pred.loc[pred["factor"] == "noise", "participant_id"])
    assert set(ids[:4]) <= set(pred.loc[pred["factor"] == "strong", "participant_id"])
    check = pred.merge(plan, on=["participant_id", "repeat"], suffixes=("", "_plan"))
    assert (check["fold"] == check["fold_plan"]).all()
    truth = targets.loc[pred["participant_id"]].to_numpy()
    col = pred["factor"].map({"strong": 0, "noise": 1}).to_numpy()
    np.testing.assert_array_equal(pred["y_true"].to_numpy(), truth[np.arange(len(pred)), col])
    pd.testing.assert_frame_equal(pred, cross_validate_baseline(x, targets, plan, cov))
    metrics = compute_metrics(pred)
    assert metrics.loc[metrics["factor"] == "strong", "pearson_r"].min() > 0.9

    pred_path, metrics_path = write_baseline_outputs(pred, tmp_path)
    assert pred_path == tmp_path / "baseline" / "predictions.tsv"
    assert len(pd.read_csv(pred_path, sep="\t")) == len(pred)
    assert list(pd.read_csv(metrics_path, sep="\t")["factor"].unique()) == ["strong", "noise"]
    fig = plot_fig3(
        metrics,
        metrics.assign(pearson_r=metrics["pearson_r"] * 0.5),
        tmp_path / "figures" / "fig3_rr_vs_dfrn.png",
    )
    assert fig.is_file() and fig.stat().st_size > 1000


def test_cross_validate_input_errors() -> None:
    ids, x, targets, cov = _cohort(n=20, p=4)
    plan = make_fold_plan(ids, n_folds=4, n_repeats=1, seed=0)
    with pytest.raises(DfrnInputError, match="sub-005"):
        cross_validate_baseline(x.drop(index="sub-005"), targets, plan)
    bad = x.copy()
    bad.iloc[3, 2] = np.nan
    with pytest.raises(DfrnInputError, match="roi_2.*sub-003"):
        cross_validate_baseline(bad, targets, plan)
    bad_cov = cov.copy()
    bad_cov.loc["sub-002", "age"] = np.nan
    with pytest.raises(DfrnInputError, match="age.*sub-002"):
        cross_validate_baseline(x, targets, plan, bad_cov)


def test_permute_targets_keeps_missingness() -> None:
    t = pd.DataFrame(
        {"a": [1.0, 2.0, 3.0, 4.0], "b": [10.0, np.nan, 30.0, 40.0]}, index=list("wxyz")
    )
    perm = np.array([3, 1, 0, 2])
    out = permute_targets(t, perm)
    assert out["a"].tolist() == [4.0, 2.0, 1.0, 3.0]  # row i gets row perm[i]
    assert np.isnan(out.at["x", "b"])  # missing stays put
    assert sorted(out["b"].dropna()) == [10.0, 30.0, 40.0]
    assert out["b"].dropna().tolist() == [40.0, 10.0, 30.0]  # order induced by perm
    perms = permutation_indices(4, 5, seed=1)
    assert perms.shape == (5, 4)
    np.testing.assert_array_equal(perms, permutation_indices(4, 5, seed=1))


def test_permutation_p_values_noise_and_signal(tmp_path: Path) -> None:
    ids, x, targets, _ = _cohort(n=40, p=10, seed=4)
    plan = make_fold_plan(ids, n_folds=5, n_repeats=2, seed=0)
    res = permutation_test(x, targets, plan, n_perm=99, seed=0, progress=False)
    assert list(res.columns) == PERMUTATION_COLUMNS
    res = res.set_index("factor")
    assert res.at["strong", "p_permutation"] == pytest.approx(1 / 100)
    assert res.at["noise", "p_permutation"] > 0.05
    assert (res["n_perm"] == 99).all()
    # r is the mean over repeats of the pooled r of the baseline's own predictions
    metrics = compute_metrics(cross_validate_baseline(x, targets, plan))
    mean_r = metrics.groupby("factor")["pearson_r"].mean()
    np.testing.assert_allclose(res.loc[mean_r.index, "r"], mean_r, atol=1e-10)
    path = write_permutation_table(res.reset_index(), tmp_path)
    assert path == tmp_path / "baseline" / "permutation.tsv"
    assert list(pd.read_csv(path, sep="\t").columns) == PERMUTATION_COLUMNS


def test_fast_ridge_permutations_equal_generic_driver() -> None:
    ids, x, targets, cov = _cohort(n=30, p=8, seed=5, signal=0.2)
    targets.loc[ids[:3], "noise"] = np.nan
    plan = make_fold_plan(ids, n_folds=5, n_repeats=1, seed=2)

    def cv_predict(t: pd.DataFrame) -> pd.DataFrame:
        return cross_validate_baseline(x, t, plan, cov)

    generic = permutation_test_generic(
        cv_predict, targets.loc[ids], n_perm=9, seed=7, progress=False
    )
    fast = permutation_test(
        x, targets, plan, n_perm=9, seed=7, covariates=cov, progress=False, n_jobs=2
    )
    pd.testing.assert_frame_equal(generic, fast, atol=1e-10)
    for f in ("strong", "noise"):
        np.testing.assert_allclose(generic.attrs["null_r"][f], fast.attrs["null_r"][f], atol=1e-10)
