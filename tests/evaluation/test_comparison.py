"""The model comparison: the corrected resampled t-test, the paired bootstrap CI of Δr and
the verdict, with planted effects and planted nulls."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from dfrn.evaluation.bootstrap import Bootstrap, mean_r_ci, repeat_r_ci
from dfrn.evaluation.comparison import (
    COMPARISON_COLUMNS,
    CorrectedTTest,
    ModelPair,
    compare_models,
    comparison_verdict,
    corrected_resampled_ttest,
    fold_mse,
)
from dfrn.evaluation.metrics import compute_metrics, table1

PAIR = ModelPair("a", "b", "model a", "model b")


def _julearn_scores() -> np.ndarray:
    """MSE_b − MSE_a of 5 repeats × 10 folds, as closed-form numbers (the same on any host)."""
    j = np.arange(50)
    a = 1.0 + 0.05 * np.sin(j) + 0.01 * np.cos(3 * j)
    b = 1.02 + 0.05 * np.sin(1.3 * j) + 0.015 * np.cos(2 * j)
    return b - a


def test_corrected_t_matches_julearn() -> None:
    """julearn 0.3.4's ``corrected_ttest(scores_b, scores_a)`` on these 50 fold scores, with
    ``n_train`` 108 and ``n_test`` 12 (120 subjects, 10 folds), gave t-stat
    1.1132433428959339 and p-val 0.27103538803749494. julearn pins scikit-learn < 1.6, so it
    cannot be a test dependency beside dfrn's; the numbers were computed once in a separate
    environment (Nadeau & Bengio 2003, eq. for the corrected resampled t; Bouckaert & Frank
    2004 for repeated k-fold)."""
    res = corrected_resampled_ttest(_julearn_scores(), n_train=108, n_test=12)
    assert res.t == pytest.approx(1.1132433428959339, abs=1e-10)
    assert res.p == pytest.approx(0.27103538803749494, abs=1e-10)
    assert (res.df, res.n_scores) == (49, 50)
    # the correction matters: the plain paired t-test over folds is far more confident
    plain = stats.ttest_1samp(_julearn_scores(), 0.0)
    assert plain.pvalue < res.p / 5


def test_corrected_t_edge_cases() -> None:
    two = corrected_resampled_ttest(np.array([0.1, 0.2]), 10, 2)
    assert np.isnan(two.t) and np.isnan(two.p) and two.n_scores == 2
    assert "2 fold score(s), it needs ≥ 3" in two.note
    same = corrected_resampled_ttest(np.zeros(10), 90, 10)
    assert (same.t, same.p) == (0.0, 1.0)


def _cv_predictions(y: np.ndarray, preds: list[np.ndarray], n_folds: int = 10,
                    seed: int = 0) -> list[pd.DataFrame]:
    """Long predictions tables of one factor, one repeat per entry of each model's list."""
    rng = np.random.default_rng(seed)
    ids = [f"sub-{i:03d}" for i in range(len(y))]
    folds = rng.permutation(np.arange(len(y)) % n_folds)
    return [pd.DataFrame({"participant_id": ids, "repeat": 0, "fold": folds, "factor": "f",
                          "y_true": y, "y_pred": p}) for p in preds]


def _draw(rng: np.random.Generator, n: int, rho_a: float, rho_b: float
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A target and two independent predictions whose population r are rho_a and rho_b."""
    y = rng.standard_normal(n)
    a = rho_a * y + np.sqrt(1 - rho_a**2) * rng.standard_normal(n)
    b = rho_b * y + np.sqrt(1 - rho_b**2) * rng.standard_normal(n)
    return y, a, b


def test_delta_r_ci_covers_the_true_difference() -> None:
    """200 simulated cohorts of 150 subjects with population r 0.5 and 0.3: the 95% paired
    bootstrap CI of Δr covers the true 0.2 in 90–99% of them."""
    boot = Bootstrap(500, seed=0)
    covered = 0
    for seed in range(200):
        y, a, b = _draw(np.random.default_rng(seed), 150, 0.5, 0.3)
        pa, pb = _cv_predictions(y, [a, b], seed=seed)
        row = compare_models(pa, pb, PAIR, boot, ["f"]).iloc[0]
        covered += row["ci_low"] <= 0.2 <= row["ci_high"]
    assert 180 <= covered <= 198, covered


def test_equal_skill_is_no_difference_and_clear_skill_wins() -> None:
    """Two models of equal skill (population r 0.4 each): "no detectable difference" in at
    least 90 of 100 cohorts. r 0.7 against 0.1: the better model beats the other."""
    boot = Bootstrap(500, seed=1)
    calls = []
    for seed in range(100):
        y, a, b = _draw(np.random.default_rng(1000 + seed), 100, 0.4, 0.4)
        pa, pb = _cv_predictions(y, [a, b], seed=seed)
        calls.append(compare_models(pa, pb, PAIR, boot, ["f"]).iloc[0]["verdict"])
    same = sum(v.startswith("no detectable difference") for v in calls)
    assert same >= 90, same
    y, a, b = _draw(np.random.default_rng(7), 100, 0.7, 0.1)
    pa, pb = _cv_predictions(y, [a, b])
    row = compare_models(pa, pb, PAIR, boot, ["f"]).iloc[0]
    assert row["verdict"] == "model a beats model b", row.to_dict()
    assert row["delta_r"] > 0 and row["ci_low"] > 0 and row["p_corrected"] < 0.05
    back = compare_models(pb, pa, ModelPair("b", "a", "model b", "model a"), boot, ["f"]).iloc[0]
    assert back["verdict"] == "model a beats model b"  # the same verdict from the other side
    assert back["t_corrected"] == pytest.approx(-row["t_corrected"], abs=1e-12)


def test_the_comparison_row_is_computed_as_documented() -> None:
    """r_a and r_b are Table 1's mean r over repeats; the t-test runs on the folds' MSE
    (recomputed here by hand) with n_test/n_train from the folds."""
    rng = np.random.default_rng(3)
    y, a, b = _draw(rng, 60, 0.6, 0.3)
    a2, b2 = a + 0.1 * rng.standard_normal(60), b + 0.1 * rng.standard_normal(60)
    pa = pd.concat([p.assign(repeat=r) for r, p in enumerate(_cv_predictions(y, [a, a2], 6))])
    pb = pd.concat([p.assign(repeat=r) for r, p in enumerate(_cv_predictions(y, [b, b2], 6))])
    boot = Bootstrap(300, seed=5)
    row = compare_models(pa, pb, PAIR, boot, ["f"]).iloc[0]
    assert list(row.index) == COMPARISON_COLUMNS
    metrics_a, metrics_b = compute_metrics(pa), compute_metrics(pb)
    assert row["r_a"] == pytest.approx(metrics_a["pearson_r"].mean(), abs=1e-12)
    assert row["r_b"] == pytest.approx(metrics_b["pearson_r"].mean(), abs=1e-12)
    assert row["delta_r"] == pytest.approx(row["r_a"] - row["r_b"], abs=1e-12)
    d, ratios = [], []
    for (_, fold), g in pa.groupby(["repeat", "fold"]):
        h = pb[(pb["repeat"] == g["repeat"].iloc[0]) & (pb["fold"] == fold)]
        d.append(np.mean((h.y_pred - h.y_true) ** 2) - np.mean((g.y_pred - g.y_true) ** 2))
        ratios.append(len(g) / (60 - len(g)))
    t = np.mean(d) / np.sqrt((1 / 12 + 10 / 50) * np.var(d, ddof=1))
    assert np.allclose(ratios, 10 / 50) and row["n_scores"] == 12 and row["df"] == 11
    assert row["t_corrected"] == pytest.approx(t, rel=1e-10)
    assert row["p_corrected"] == pytest.approx(2 * stats.t.sf(abs(t), 11), rel=1e-8)
    assert fold_mse(pa, "f")["n_train"].tolist() == [50] * 12


def test_bootstrap_r_intervals_match_a_loop_over_resamples() -> None:
    rng = np.random.default_rng(11)
    y, a, _ = _draw(rng, 40, 0.5, 0.0)
    pred = _cv_predictions(y, [a], 5)[0]
    boot = Bootstrap(200, seed=2)
    idx = boot.indices(40)  # subjects in sorted-ID order: sub-000 ... sub-039
    rs = [stats.pearsonr(y[i], a[i]).statistic for i in idx]
    lo, hi = np.percentile(rs, [2.5, 97.5])
    ci = repeat_r_ci(pred, boot).iloc[0]
    assert (ci["ci_low"], ci["ci_high"]) == pytest.approx((lo, hi), abs=1e-12)
    assert mean_r_ci(pred, boot).loc["f"].tolist() == pytest.approx([lo, hi], abs=1e-12)
    metrics = compute_metrics(pred, boot)
    assert metrics[["ci_low", "ci_high"]].iloc[0].tolist() == pytest.approx([lo, hi], abs=1e-12)
    assert lo < metrics["pearson_r"].iloc[0] < hi
    t1 = table1(metrics, mean_r_ci(pred, boot))
    assert t1["f"].iloc[0].endswith(f" [{lo:.2f}, {hi:.2f}]")
    assert t1["repeat"].iloc[-1] == "mean ± sd [95% CI]"
    assert t1["f"].iloc[-1].endswith(f" [{lo:.2f}, {hi:.2f}]")


def test_verdicts_say_when_the_tests_disagree_or_cannot_run() -> None:
    test = CorrectedTTest(3.0, 9, 0.01, 10)
    assert comparison_verdict(0.1, (0.02, 0.2), test, PAIR) == "model a beats model b"
    assert comparison_verdict(-0.1, (-0.2, -0.02), CorrectedTTest(-3.0, 9, 0.01, 10), PAIR) == \
        "model b beats model a"
    assert comparison_verdict(0.1, (-0.01, 0.2), test, PAIR) == (
        "no detectable difference (the tests disagree: the corrected t-test rejects, the Δr "
        "CI includes 0)")
    assert "the Δr CI excludes 0, the corrected t-test does not reject" in comparison_verdict(
        0.1, (0.02, 0.2), CorrectedTTest(1.0, 9, 0.3, 10), PAIR)
    assert "Δr favours model a, the fold errors model b" in comparison_verdict(
        0.1, (0.02, 0.2), CorrectedTTest(-3.0, 9, 0.01, 10), PAIR)
    assert comparison_verdict(0.1, (0.02, 0.2), corrected_resampled_ttest(np.ones(2), 9, 1), PAIR) == (
        "no verdict: no corrected t-test: 2 fold score(s), it needs ≥ 3")


def test_constant_predictions_give_no_verdict() -> None:
    y, a, _ = _draw(np.random.default_rng(4), 30, 0.5, 0.0)
    pa, pb = _cv_predictions(y, [a, np.full(30, 0.3)], 5)
    row = compare_models(pa, pb, PAIR, Bootstrap(100), ["f"]).iloc[0]
    assert np.isnan(row["r_b"]) and np.isnan(row["delta_r"]) and np.isnan(row["ci_low"])
    assert row["verdict"] == ("no verdict: r is undefined for model b (constant predictions or "
                              "fewer than 3 subjects)")
    assert np.isfinite(row["p_corrected"])  # the MSE test still runs
