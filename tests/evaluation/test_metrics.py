"""Metrics of out-of-fold predictions: parity with scipy, Table 1's format, one mean r."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from dfrn.errors import DfrnInputError
from dfrn.evaluation.metrics import compute_metrics, format_r_p, mean_r, table1


def _predictions(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for repeat in range(3):
        for factor in ("sleep", "anxiety"):
            y = rng.standard_normal(20)
            rows.append(pd.DataFrame({
                "participant_id": [f"s{i}" for i in range(20)], "repeat": repeat,
                "fold": np.arange(20) % 4, "factor": factor, "y_true": y,
                "y_pred": y + rng.standard_normal(20),
            }))
    return pd.concat(rows, ignore_index=True)


def test_metrics_match_scipy_and_sklearn() -> None:
    from sklearn.metrics import mean_absolute_error, r2_score

    pred = _predictions()
    m = compute_metrics(pred)
    assert list(m["factor"][:2]) == ["sleep", "anxiety"]  # first-seen order
    for row in m.itertuples():
        g = pred[(pred.repeat == row.repeat) & (pred.factor == row.factor)]
        ref = stats.pearsonr(g.y_true, g.y_pred)
        assert row.pearson_r == pytest.approx(ref.statistic, abs=1e-12)
        assert row.p_value == pytest.approx(ref.pvalue, rel=1e-10)
        assert row.r2 == pytest.approx(r2_score(g.y_true, g.y_pred), abs=1e-12)
        assert row.mae == pytest.approx(mean_absolute_error(g.y_true, g.y_pred), abs=1e-12)


def test_mean_r_and_table1_agree() -> None:
    m = compute_metrics(_predictions())
    summary = mean_r(m)
    for f in ("sleep", "anxiety"):
        r = m.loc[m.factor == f, "pearson_r"].to_numpy()
        assert summary.at[f, "mean_r"] == pytest.approx(r.mean(), abs=1e-12)
        assert summary.at[f, "sd_r"] == pytest.approx(r.std(ddof=1), abs=1e-12)
        assert summary.at[f, "n_repeats"] == 3
    t1 = table1(m)
    assert t1["repeat"].tolist() == ["0", "1", "2", "mean ± sd"]
    assert t1.at[3, "sleep"] == f"{summary.at['sleep', 'mean_r']:.2f} ± {summary.at['sleep', 'sd_r']:.2f}"
    first = m[(m.repeat == 0) & (m.factor == "sleep")].iloc[0]
    assert t1.at[0, "sleep"] == format_r_p(first.pearson_r, first.p_value)


def test_constant_predictions_give_nan_not_zero() -> None:
    pred = _predictions()
    pred["y_pred"] = 1.0
    m = compute_metrics(pred)
    assert m["pearson_r"].isna().all()
    assert format_r_p(float("nan"), float("nan")) == "nan"


def test_missing_columns_are_a_one_line_error() -> None:
    with pytest.raises(DfrnInputError, match="lacks the column"):
        compute_metrics(_predictions().drop(columns="y_pred"))


def test_readable_tables_keep_tiny_p_values_and_undefined_sds() -> None:
    """The log and the report print p as Table 1 does, never a rounded 0.0."""
    from dfrn.evaluation.metrics import readable

    df = pd.DataFrame({"factor": ["a", "b"], "r": [0.91234, 0.1], "p_parametric": [1.7e-19, 0.0],
                       "p_permutation": [0.0123, 0.5], "sd_r": [float("nan"), 0.051]})
    got = readable(df, 2)
    assert list(got["p_parametric"]) == ["1.7e-19", "< 1e-300"]
    assert list(got["p_permutation"]) == ["0.012", "0.500"]
    assert list(got["sd_r"]) == ["—", "0.05"] and list(got["r"]) == [0.91, 0.1]


def test_fold_r_matches_scipy_per_fold_and_sits_beside_pooled_r() -> None:
    """Issue 27.3: the per-fold r, each fold's test subjects against its own predictions."""
    from dfrn.evaluation.metrics import fold_r, fold_r_summary

    pred = _predictions()
    pred.loc[(pred.factor == "anxiety") & (pred.repeat == 1) & (pred.fold == 2), "y_pred"] = 0.5
    folds = fold_r(pred)
    assert list(folds.columns) == ["factor", "repeat", "fold", "n", "r"]
    assert len(folds) == 2 * 3 * 4 and list(folds["factor"][:12]) == ["sleep"] * 12
    for row in folds.itertuples():
        g = pred[(pred.factor == row.factor) & (pred.repeat == row.repeat) & (pred.fold == row.fold)]
        assert row.n == len(g) == 5
        if (row.factor, row.repeat, row.fold) == ("anxiety", 1, 2):
            assert np.isnan(row.r)  # constant predictions: undefined, not 0
        else:
            assert row.r == pytest.approx(stats.pearsonr(g.y_true, g.y_pred).statistic, abs=1e-12)
    summary = fold_r_summary(folds, compute_metrics(pred)).set_index("factor")
    pooled = mean_r(compute_metrics(pred))
    for f in ("sleep", "anxiety"):
        r = folds.loc[folds.factor == f, "r"].dropna()
        assert summary.at[f, "pooled_r"] == pytest.approx(pooled.at[f, "mean_r"], abs=1e-12)
        assert summary.at[f, "fold_r_mean"] == pytest.approx(r.mean(), abs=1e-12)
        assert (summary.at[f, "fold_r_min"], summary.at[f, "fold_r_max"]) == (r.min(), r.max())
    assert summary.at["anxiety", "n_folds"] == 11 and summary.at["sleep", "n_folds"] == 12


def test_fold_r_names_a_missing_column() -> None:
    from dfrn.evaluation.metrics import fold_r

    with pytest.raises(DfrnInputError, match="lacks the column.*fold"):
        fold_r(_predictions().drop(columns="fold"))
