"""ComBat inside the folds: parity with neuroCombat, training-fold only, a planted site
shift removed with the covariate effect kept, and one-line errors."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pandas as pd
import pytest

from dfrn.errors import DfrnInputError
from dfrn.evaluation.folds import make_fold_plan
from dfrn.evaluation.ridge_cv import cross_validate_ridge
from dfrn.models.harmonize import ComBatHarmonizer, check_combat_plan

SHIFT = {"A": 0.0, "B": 2.0, "C": -1.0}
SCALE = {"A": 1.0, "B": 2.0, "C": 0.5}


def _sites_cohort(n: int = 90, p: int = 15, seed: int = 0):
    """Features with a planted additive and multiplicative site effect and an age effect."""
    rng = np.random.default_rng(seed)
    ids = [f"s{i:02d}" for i in range(n)]
    site = pd.Series(np.tile(["A", "B", "C"], n // 3), index=ids)
    age = rng.normal(50, 10, n)
    sex = rng.integers(0, 2, n).astype(float)
    noise = rng.normal(size=(n, p)) * site.map(SCALE).to_numpy()[:, None]
    x = noise + site.map(SHIFT).to_numpy()[:, None] + 0.08 * (age[:, None] - 50)
    return ids, site, age, sex, x


def test_training_rows_equal_neurocombat_called_directly() -> None:
    from neuroCombat import neuroCombat

    _, site, age, sex, x = _sites_cohort()
    h = ComBatHarmonizer().fit(x, site.to_numpy(), np.column_stack([age, sex]))
    covars = pd.DataFrame({"site": site.to_numpy(), "age": age, "sex": sex})
    with contextlib.redirect_stdout(io.StringIO()):
        ref = neuroCombat(dat=x.T, covars=covars, batch_col="site", categorical_cols=["sex"],
                          continuous_cols=["age"])["data"].T
    got = h.transform(x, site.to_numpy(), np.column_stack([age, sex]))
    np.testing.assert_allclose(got, ref, atol=1e-6)  # same estimates, same adjustment


def test_a_planted_site_shift_is_removed_and_the_age_effect_kept() -> None:
    _, site, age, _, x = _sites_cohort(n=300)
    s = site.to_numpy()
    z = ComBatHarmonizer().fit(x, s, age[:, None]).transform(x, s, age[:, None])
    means = pd.DataFrame(x).groupby(s).mean().mean(axis=1)
    assert means.max() - means.min() > 2.5  # before: the planted shift
    resid = z - 0.08 * (age[:, None] - 50)
    after_means = pd.DataFrame(resid).groupby(s).mean().mean(axis=1)
    after_sd = pd.DataFrame(resid).groupby(s).std().mean(axis=1)
    assert after_means.max() - after_means.min() < 0.1
    assert after_sd.max() / after_sd.min() < 1.15  # scales 0.5 to 2 before
    r_age = np.mean([np.corrcoef(age, z[:, j])[0, 1] for j in range(z.shape[1])])
    assert r_age > 0.3  # the covariate's effect survives harmonisation


def test_it_is_learned_on_the_training_rows_only() -> None:
    _, site, age, _, x = _sites_cohort()
    s = site.to_numpy()
    tr, te = np.arange(60), np.arange(60, 90)
    h = ComBatHarmonizer().fit(x[tr], s[tr], age[tr, None])
    before = h.transform(x[te], s[te], age[te, None])
    changed = x.copy()
    changed[te[0]] += 10.0  # a test subject's features change
    h2 = ComBatHarmonizer().fit(changed[tr], s[tr], age[tr, None])
    after = h2.transform(changed[te], s[te], age[te, None])
    np.testing.assert_allclose(h2.transform(x[tr], s[tr], age[tr, None]),
                               h.transform(x[tr], s[tr], age[tr, None]))
    np.testing.assert_allclose(after[1:], before[1:])
    assert not np.allclose(after[0], before[0])


def test_unseen_and_single_subject_sites_and_the_missing_extra_give_one_line(monkeypatch) -> None:
    _, site, age, _, x = _sites_cohort()
    s = site.to_numpy()
    h = ComBatHarmonizer().fit(x[s != "C"], s[s != "C"])
    with pytest.raises(DfrnInputError, match="site 'C' of 30 test subject\\(s\\) has no training "
                                              "subject"):
        h.transform(x, s)
    lone = s.copy()
    lone[0] = "D"
    with pytest.raises(DfrnInputError, match="site 'D' has 1 training subject\\(s\\): ComBat "
                                              "needs at least 2"):
        ComBatHarmonizer().fit(x, lone)
    import builtins

    real_import = builtins.__import__

    def no_neurocombat(name, *args, **kwargs):
        if name == "neuroCombat":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_neurocombat)
    with pytest.raises(DfrnInputError, match=r"pip install 'dfrn\[harmonize\]'"):
        ComBatHarmonizer().fit(x, s)


def test_ridge_with_combat_in_the_folds() -> None:
    """A target that differs by site only through the features' site shift: without
    harmonisation the ridge reads the site; with ComBat learned per training fold it cannot.
    Leave-one-site-out with ComBat is refused, naming the site and the split."""
    ids, site, age, _, x = _sites_cohort(n=90, p=15, seed=2)
    feats = pd.DataFrame(x, index=pd.Index(ids, name="participant_id"))
    target = pd.DataFrame({"t": site.map(SHIFT).to_numpy() + 0.3 * np.random.default_rng(3)
                           .normal(size=90)}, index=feats.index)
    plan = make_fold_plan(ids, 3, 1, seed=0)
    plain = cross_validate_ridge(feats, target, plan)
    harmonised = cross_validate_ridge(feats, target, plan, sites=site)
    r_plain = np.corrcoef(plain["y_true"], plain["y_pred"])[0, 1]
    r_harm = np.corrcoef(harmonised["y_true"], harmonised["y_pred"])[0, 1]
    assert r_plain > 0.7 and abs(r_harm) < 0.3, (r_plain, r_harm)
    by_site = make_fold_plan(ids, 3, 1, seed=0, groups=site.tolist())
    with pytest.raises(DfrnInputError, match=r"repeat 0 fold \d: site '[ABC]' of 30 test "
                                              "subject\\(s\\) has no training subject"):
        cross_validate_ridge(feats, target, by_site, sites=site)


def test_a_plan_with_a_small_site_in_a_training_fold_is_refused_up_front() -> None:
    """``check_combat_plan`` refuses what the ridge's ComBat would refuse mid-CV: a site with
    1 training subject, or test subjects whose site has none (counting subjects with a value)."""
    ids = [f"s{i:02d}" for i in range(12)]
    sites = pd.Series(["A"] * 5 + ["B"] * 5 + ["C"] * 2, index=ids)
    fold = [0, 0, 0, 1, 1, 0, 0, 0, 1, 1, 0, 1]  # C: s10 in fold 0, s11 in fold 1
    plan = pd.DataFrame({"participant_id": ids, "repeat": 0, "fold": fold})
    with pytest.raises(DfrnInputError) as err:
        check_combat_plan(plan, sites)
    assert str(err.value) == (
        "repeat 0 fold 0: site 'C' has 1 training subject: ComBat ([baseline] harmonize = "
        '"combat") needs at least 2 per site in every training fold; merge small sites, add '
        'subjects, or set [baseline] harmonize = "none"')
    together = plan.assign(fold=[0, 0, 0, 1, 1, 1, 1, 0, 0, 1, 1, 1])  # both C in fold 1
    with pytest.raises(DfrnInputError, match=r"^repeat 0 fold 1: site 'C' has no training "
                       r"subject, so ComBat cannot harmonise its 2 test subject\(s\)"):
        check_combat_plan(together, sites)
    check_combat_plan(together, sites.replace("C", "A"))  # every site twice in every fold
    # only subjects with a value count: s01 and s02 lack one, leaving A once in fold 1's training
    targets = pd.DataFrame({"t": np.arange(12.0)}, index=ids)
    targets.loc[["s01", "s02"], "t"] = np.nan
    with pytest.raises(DfrnInputError, match=r"^repeat 0 fold 1: site 'A' has 1 training "
                                              r"subject with a value of factor 't'"):
        check_combat_plan(together, sites.replace("C", "A"), targets)
    # what the ridge itself refuses, mid-CV
    feats = pd.DataFrame(np.random.default_rng(0).normal(size=(12, 3)),
                         index=pd.Index(ids, name="participant_id"))
    with pytest.raises(DfrnInputError, match=r"site 'A' has 1 training subject"):
        cross_validate_ridge(feats, targets, together, sites=sites.replace("C", "A"),
                             inner_cv=2)
