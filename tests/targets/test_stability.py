"""Factor stability: Tucker's congruence, the bands, and flags for factors the items lack."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import data_dir
from test_retention import three_factor_items

from dfrn.evaluation.folds import make_fold_plan
from dfrn.targets.factors import SymptomFactors, factor_congruence, read_items_table
from dfrn.targets.stability import (
    congruence_band,
    fold_stability,
    split_half_stability,
    summarise_stability,
)


def test_tucker_congruence_equals_brute_force() -> None:
    rng = np.random.default_rng(1)
    a = pd.DataFrame(rng.standard_normal((9, 3)), columns=["x", "y", "z"])
    b = pd.DataFrame(rng.standard_normal((9, 4)), columns=list("abcd"))
    phi = factor_congruence(a, b)
    for i in a.columns:
        for j in b.columns:
            num = sum(a[i][k] * b[j][k] for k in range(9))
            den = (sum(v * v for v in a[i]) * sum(v * v for v in b[j])) ** 0.5
            assert phi.at[i, j] == pytest.approx(num / den, abs=1e-12)
    assert np.allclose(np.diag(factor_congruence(a, a)), 1.0)


def test_bands() -> None:
    assert [congruence_band(v) for v in (0.99, 0.95, 0.9, 0.85, 0.84, -0.97)] == [
        "equal", "equal", "fair", "fair", "not the same factor", "equal"]


def test_separated_factors_are_equal_and_extra_factors_are_flagged() -> None:
    items = three_factor_items()
    plan = make_fold_plan(list(items.index), 5, 1, seed=0)
    ref3 = SymptomFactors(n_factors=3).fit(items)
    summary3 = summarise_stability(fold_stability(items, plan, ref3))
    assert (summary3["band"] == "equal").all() and (summary3["min_congruence"] > 0.95).all()
    ref5 = SymptomFactors(n_factors=5).fit(items)
    halves = split_half_stability(items, ref5, n_resamples=20, seed=0)
    summary5 = summarise_stability(halves).set_index("factor")
    # the three real factors stay equal; the two made of noise do not
    assert (summary5["median_congruence"] > 0.95).sum() == 3
    assert (summary5["n_below_085"] > 0).sum() >= 2


def test_bdi13_five_factors_warns_and_marks_an_unstable_factor(tmp_path, capsys) -> None:
    path = data_dir() / "items" / "bdi13_wsc.tsv"
    if not path.is_file():
        pytest.skip("shared items not found")
    from dfrn.cli import main

    assert main(["factors", str(path), "--n-factors", "5", "--out", str(tmp_path),
                 "--resamples", "20"]) == 0
    err = capsys.readouterr().err
    assert "5 factors requested but parallel analysis supports 1" in err
    assert "is unstable" in err
    stability = pd.read_csv(tmp_path / "factors/stability.tsv", sep="\t")
    assert any("congruence" in c for c in stability.columns)
    assert (stability["congruence"] < 0.85).any()
    assert (stability.loc[stability["congruence"] < 0.85, "band"] == "not the same factor").all()


def test_bdi13_fold_stability_train_mode() -> None:
    path = data_dir() / "items" / "bdi13_wsc.tsv"
    if not path.is_file():
        pytest.skip("shared items not found")
    items = read_items_table(path)
    ref = SymptomFactors(n_factors=5).fit(items)
    plan = make_fold_plan(list(items.index), 10, 1, seed=0)
    stab = fold_stability(items, plan, ref)
    assert len(stab) == 50 and (stab["congruence"] < 0.85).any()


def test_small_training_folds_warn_once_in_the_users_terms() -> None:
    import warnings

    from dfrn.targets.providers import FoldFactorTargets

    items = three_factor_items(n=12).iloc[:, :10]
    ref = SymptomFactors(n_factors=3).fit(items)
    plan = make_fold_plan(list(items.index), 2, 1, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fold_stability(items, plan, ref)
        test = plan.loc[plan["fold"] == 0, "participant_id"].tolist()
        train = plan.loc[plan["fold"] == 1, "participant_id"].tolist()
        FoldFactorTargets(items, ref)(0, 0, train, test)
    texts = [str(w.message) for w in caught]
    assert texts == ["training folds of 6 of the 12 participants are fewer than the 10 items: "
                     "each of their fits has a singular item correlation matrix, so the "
                     "stability estimates are unreliable"]
