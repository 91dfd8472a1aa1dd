"""The ridge CV loop: per-fold fitting (no leakage), output format, parity, providers, errors."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import pytest
from conftest import roi_cohort
from sklearn.linear_model import LinearRegression, RidgeCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from dfrn.errors import DfrnInputError
from dfrn.evaluation.folds import iter_splits, make_fold_plan
from dfrn.evaluation.metrics import PREDICTION_COLUMNS, compute_metrics
from dfrn.evaluation.ridge_cv import cross_validate_ridge
from dfrn.models.ridge import DEFAULT_ALPHAS
from dfrn.targets.providers import StaticTargets


def _parity_data():
    """The seeded dataset the pre-refactor outputs were recorded on (NaNs in one target)."""
    rng = np.random.default_rng(20240611)
    n, p = 36, 9
    ids = [f"sub-{i:03d}" for i in range(n)]
    index = pd.Index(ids, name="participant_id")
    x = pd.DataFrame(rng.normal(size=(n, p)), index=index, columns=[f"roi_{j}" for j in range(p)])
    targets = pd.DataFrame(
        {"mood": x.iloc[:, :2].sum(axis=1) + 0.5 * rng.normal(size=n), "sleep": rng.normal(size=n)},
        index=index,
    )
    targets.loc[[ids[1], ids[5], ids[17], ids[30]], "sleep"] = np.nan
    cov = pd.DataFrame(
        {"age": rng.normal(50, 10, n), "sex": rng.choice(["F", "M"], n)}, index=index
    )
    plan = make_fold_plan(ids, n_folds=4, n_repeats=2, seed=3)
    return ids, x, targets, cov, plan


class FoldZScore:
    """A fold-dependent provider: targets z-scored with the training fold's mean and sd."""

    def __init__(self, targets: pd.DataFrame) -> None:
        self.targets = targets
        self.calls: list[tuple[int, int]] = []

    def __call__(
        self, repeat: int, fold: int, train_ids: Sequence[str], test_ids: Sequence[str]
    ) -> tuple[pd.DataFrame, pd.DataFrame]:
        self.calls.append((repeat, fold))
        tr = self.targets.loc[list(train_ids)]
        te = self.targets.loc[list(test_ids)]
        mu, sd = tr.mean(), tr.std()
        return (tr - mu) / sd, (te - mu) / sd


def _sklearn_reference(x, provider, plan, cov) -> pd.DataFrame:
    """The same CV written with scikit-learn: OLS residualisation, scaler, RidgeCV(cv=5)."""
    c = None if cov is None else pd.get_dummies(cov, drop_first=True, dtype=float)
    rows = []
    for repeat, fold, train, test in iter_splits(plan):
        y_train, y_test = provider(repeat, fold, train, test)
        for factor in y_train.columns:
            ytr, yte = y_train[factor].dropna(), y_test[factor].dropna()
            x_tr, x_te = x.loc[ytr.index].to_numpy(), x.loc[yte.index].to_numpy()
            if c is not None:
                ols = LinearRegression().fit(c.loc[ytr.index], x_tr)
                x_tr = x_tr - ols.predict(c.loc[ytr.index])
                x_te = x_te - ols.predict(c.loc[yte.index])
            ref = make_pipeline(StandardScaler(), RidgeCV(alphas=np.array(DEFAULT_ALPHAS), cv=5))
            ref.fit(x_tr, ytr.to_numpy())
            rows.append(pd.DataFrame({
                "participant_id": yte.index, "repeat": repeat, "fold": fold, "factor": factor,
                "y_true": yte.to_numpy(), "y_pred": ref.predict(x_te),
            }))
    return pd.concat(rows, ignore_index=True)[PREDICTION_COLUMNS]


# Recorded before the refactor from models.ridge.cross_validate_baseline (static targets)
# and workflows.baseline._predict_with_provider (FoldZScore provider), covariates given.
_RECORDED = {
    "static": {
        "head": [0.12039283430447278, -0.5809433914786425, -0.7205124851905823,
                 0.3056382740630983],
        "sum": {"mood": 2.63851693577527, "sleep": -9.942074085582686},
        "sumsq": {"mood": 55.25375573565359, "sleep": 6.55600034811131},
    },
    "provider": {
        "head": [-0.007848093823457932, -0.6254677820992718, -0.7483769046888744,
                 0.15528511754101468],
        "sum": {"mood": -1.4495056745150414, "sleep": -2.5162011894314134},
        "sumsq": {"mood": 38.422841620563844, "sleep": 3.5863639497258073},
    },
}


@pytest.mark.parametrize("kind", ["static", "provider"])
def test_cross_validate_ridge_reproduces_the_two_former_loops(kind: str) -> None:
    ids, x, targets, cov, plan = _parity_data()
    source = targets if kind == "static" else FoldZScore(targets)
    pred = cross_validate_ridge(x, source, plan, cov)
    expected = _RECORDED[kind]
    assert len(pred) == 136
    assert pred["participant_id"].head(4).tolist() == ["sub-004", "sub-013", "sub-015", "sub-017"]
    np.testing.assert_allclose(pred["y_pred"].head(4), expected["head"], rtol=1e-10)
    by_factor = pred.groupby("factor", sort=False)["y_pred"]
    for f in ("mood", "sleep"):
        np.testing.assert_allclose(by_factor.sum()[f], expected["sum"][f], rtol=1e-10)
        sumsq = float((pred.loc[pred["factor"] == f, "y_pred"] ** 2).sum())
        np.testing.assert_allclose(sumsq, expected["sumsq"][f], rtol=1e-10)
    # and every prediction equals the scikit-learn pipeline fitted on the same rows
    ref = _sklearn_reference(x, StaticTargets(targets) if kind == "static" else source, plan, cov)
    pd.testing.assert_frame_equal(
        pred, ref, check_exact=False, rtol=1e-10, atol=1e-10, check_dtype=False
    )


def test_static_table_static_provider_and_constant_provider_agree() -> None:
    ids, x, targets, cov, plan = _parity_data()
    table = cross_validate_ridge(x, targets, plan, cov)
    wrapped = cross_validate_ridge(x, StaticTargets(targets), plan, cov)
    pd.testing.assert_frame_equal(table, wrapped)

    def plain(repeat, fold, train, test):  # a provider that is not a StaticTargets
        return targets.loc[train], targets.loc[test]

    pd.testing.assert_frame_equal(table, cross_validate_ridge(x, plain, plan, cov))


def test_provider_is_asked_once_per_split_and_may_not_leak() -> None:
    ids, x, targets, _, plan = _parity_data()
    provider = FoldZScore(targets)
    cross_validate_ridge(x, provider, plan)
    assert provider.calls == [(r, f) for r in (0, 1) for f in range(4)]

    def leaky(repeat, fold, train, test):
        return targets.loc[list(train) + list(test[:1])], targets.loc[test]

    with pytest.raises(DfrnInputError, match="not a training subject of repeat 0 fold 0"):
        cross_validate_ridge(x, leaky, plan)


def test_fold_parameters_do_not_see_test_subjects() -> None:
    """Changing a test subject's data leaves every parameter of its test folds unchanged."""
    ids, x, targets, cov = roi_cohort(n=40, p=12, seed=2)
    plan = make_fold_plan(ids, n_folds=5, n_repeats=2, seed=0)
    pred_a, models_a = cross_validate_ridge(x, targets, plan, cov, return_models=True)

    victim = ids[7]
    x_b, cov_b = x.copy(), cov.copy()
    x_b.loc[victim] = x_b.loc[victim] * 50 + 100  # wildly different features
    cov_b.loc[victim, "age"] = 500.0
    pred_b, models_b = cross_validate_ridge(x_b, targets, plan, cov_b, return_models=True)

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


def test_cross_validate_format_nan_drop_and_determinism() -> None:
    ids, x, targets, cov = roi_cohort(n=30, p=6, seed=3)
    targets.loc[ids[:4], "noise"] = np.nan
    plan = make_fold_plan(ids, n_folds=5, n_repeats=2, seed=1)
    pred = cross_validate_ridge(x, targets, plan, cov)
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
    pd.testing.assert_frame_equal(pred, cross_validate_ridge(x, targets, plan, cov))
    metrics = compute_metrics(pred)
    assert metrics.loc[metrics["factor"] == "strong", "pearson_r"].min() > 0.9


def test_cross_validate_input_errors() -> None:
    ids, x, targets, cov = roi_cohort(n=20, p=4)
    plan = make_fold_plan(ids, n_folds=4, n_repeats=1, seed=0)
    with pytest.raises(DfrnInputError, match="sub-005"):
        cross_validate_ridge(x.drop(index="sub-005"), targets, plan)
    bad = x.copy()
    bad.iloc[3, 2] = np.nan
    with pytest.raises(DfrnInputError, match="roi_2.*sub-003"):
        cross_validate_ridge(bad, targets, plan)
    bad_cov = cov.copy()
    bad_cov.loc["sub-002", "age"] = np.nan
    with pytest.raises(DfrnInputError, match="sub-002: covariate 'age' is missing"):
        cross_validate_ridge(x, targets, plan, bad_cov)
    with pytest.raises(DfrnInputError, match="sub-011 of the fold plan has no targets"):
        cross_validate_ridge(x, targets.drop(index="sub-011"), plan)
    inf = targets.copy()
    inf.loc["sub-004", "noise"] = np.inf
    with pytest.raises(DfrnInputError, match="'noise' is infinite for subject sub-004"):
        cross_validate_ridge(x, inf, plan)
    sparse = targets.copy()
    sparse.loc[ids[:14], "noise"] = np.nan
    with pytest.raises(DfrnInputError, match="factor 'noise'.*fewer than the ridge inner_cv"):
        cross_validate_ridge(x, sparse, plan)


def _voxel_study(n: int = 30, seed: int = 4):
    """Flattened volumes with a latent score in a block of voxels, targets and a plan."""
    from dfrn.evaluation.ridge_cv import GramInputs
    from dfrn.models.ridge import voxel_gram

    rng = np.random.default_rng(seed)
    ids = [f"sub-{i:03d}" for i in range(n)]
    score = rng.normal(size=n)
    x = 2.0 + rng.normal(size=(n, 300))
    x[:, :60] += score[:, None]
    targets = pd.DataFrame({"mood": score + 0.5 * rng.normal(size=n), "noise": rng.normal(size=n)},
                           index=pd.Index(ids, name="participant_id"))
    plan = make_fold_plan(ids, n_folds=3, n_repeats=2, seed=0)
    return x, GramInputs(ids, voxel_gram(list(x))), targets, plan


def test_voxel_ridge_cross_validation_is_sklearn_ridgecv_per_split() -> None:
    """Every split: RidgeCV(alphas, cv=5) on the voxels divided by the training subjects'
    RMS distance from their mean; the test subjects only predicted."""
    x, gram, targets, plan = _voxel_study()
    alphas = DEFAULT_ALPHAS[::4]  # 1e-3 … 1e5, fewer refits of the reference
    shuffled = gram.subset(gram.ids[::-1])  # any row order: aligned to the plan by id
    pred = cross_validate_ridge(shuffled, targets, plan, alphas=alphas)
    assert list(pred.columns) == PREDICTION_COLUMNS and len(pred) == 2 * 2 * 30
    pos = {p: i for i, p in enumerate(gram.ids)}
    for (repeat, fold, factor), got in pred.groupby(["repeat", "fold", "factor"]):
        test = got["participant_id"].tolist()
        train = plan.loc[(plan["repeat"] == repeat) & (plan["fold"] != fold), "participant_id"]
        tr, te = [pos[p] for p in train], [pos[p] for p in test]
        scale = np.sqrt(((x[tr] - x[tr].mean(0)) ** 2).sum() / len(tr))
        ref = RidgeCV(alphas=np.array(alphas), cv=5)
        ref.fit(x[tr] / scale, targets.loc[list(train), factor].to_numpy())
        np.testing.assert_allclose(got["y_pred"], ref.predict(x[te] / scale), atol=1e-6)
    assert compute_metrics(pred).query("factor == 'mood'")["pearson_r"].min() > 0.6
    with pytest.raises(DfrnInputError, match="sub-003 of the fold plan has no network input"):
        cross_validate_ridge(gram.subset([p for p in gram.ids if p != "sub-003"]), targets, plan,
                             alphas=alphas)


def test_voxel_ridge_permutation_test_is_the_generic_test_with_p_on_the_grid() -> None:
    from dfrn.evaluation.permutation import permutation_test, permutation_test_generic

    _, gram, targets, plan = _voxel_study(n=24, seed=5)
    fast = permutation_test(gram, targets, plan, n_perm=9, seed=3, progress=False)
    slow = permutation_test_generic(lambda i, t: cross_validate_ridge(gram, t, plan), targets,
                                    n_perm=9, seed=3, progress=False)
    pd.testing.assert_frame_equal(fast, slow, atol=1e-9)
    assert fast["n_perm"].tolist() == [9, 9]
    k = fast["p_permutation"].to_numpy() * 10  # p = (1 + #exceeding) / (n_perm + 1)
    np.testing.assert_allclose(k, np.round(k), atol=1e-9)
    assert fast.set_index("factor").loc["mood", "p_permutation"] == pytest.approx(1 / 10)
    metrics = compute_metrics(cross_validate_ridge(gram, targets, plan))
    np.testing.assert_allclose(fast["r"], metrics.groupby("factor", sort=False)["pearson_r"]
                               .mean().loc[fast["factor"]], atol=1e-12)
