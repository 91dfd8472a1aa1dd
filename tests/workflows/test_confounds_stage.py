"""Beyond the covariates, end to end: a confounded null and a real effect through ``dfrn run``.

The cohort (``conftest.confound_cohort``): age shrinks the whole brain, a local score darkens
one blob. ``age_only`` is age plus noise (the brain carries nothing else); ``local`` is the
local score plus an age confound.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import NARROW, confound_cohort

from dfrn.cli import main
from dfrn.config import config_from_dict
from dfrn.evaluation.confounds import CONFOUND_COLUMNS
from dfrn.targets.providers import ConfoundFit
from dfrn.workflows.run import run_study


def _config(table: Path, targets: list[str], target: str, **over):
    raw = {
        "cohort": {"table": str(table), "targets": targets, "covariates": ["age", "sex"]},
        "model": {"widen_factor": NARROW},
        "training": {"epochs": 10, "val_fraction": 0.0, "batch_size": 8},
        "cv": {"n_folds": 3, "n_repeats": 1},
        "confounds": {"target": target, "n_permutations": 1000},
        "baseline": {"enabled": False},
        "attention": {"enabled": False},
        "final": {"enabled": False},
    }
    for section, values in over.items():
        raw.setdefault(section, {}).update(values)
    return config_from_dict(raw, table.parent)


@pytest.fixture(scope="module")
def cohort_table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return confound_cohort(tmp_path_factory.mktemp("confounds") / "cohort")


@pytest.fixture(scope="module")
def null_run(cohort_table: Path):
    import torch

    torch.manual_seed(0)
    out = cohort_table.parent.parent / "null"
    logs: list[str] = []
    res = run_study(_config(cohort_table, ["age_only"], "none"), out, progress=False,
                    log=logs.append)
    return out, res, logs


@pytest.fixture(scope="module")
def residual_run(cohort_table: Path):
    import torch

    torch.manual_seed(0)
    out = cohort_table.parent.parent / "residual"
    logs: list[str] = []
    res = run_study(_config(cohort_table, ["local"], "residualize", final={"enabled": True}),
                    out, progress=False, log=logs.append)
    return out, res, logs


def test_confounded_null_is_called_nothing_detectable(null_run) -> None:
    """What the network adds beyond age and sex is a null draw, and the host's rounding
    redraws it: trained on other instruction sets and thread counts, its partial r went from
    -0.23 to 0.10 and its p from 0.12 to 0.98. p is uniform under the null, so one host in 20
    gets p < 0.05 and the rule's other verdict. On any host: p is not 1/1001 (the least p of
    1,000 permutations: a 1-in-1,000 null draw, and what a test blind to the covariates gives
    for r = 0.7 on 48 subjects), ΔR² = (1 - R²_cov)·r_partial² stays below 0.1 (a null partial
    r beyond 0.56, 3.7 sd on 48 subjects), and the verdict follows p. The test's calibration
    (5% false positives) is tests/evaluation/test_confounds.py's."""
    out, res, logs = null_run
    r = float(res.metrics["pearson_r"].iloc[0])
    assert r > 0.4, r  # the network reads age from the atrophy: Table 1 alone would say "works"
    table = pd.read_csv(out / "cv/confounds.tsv", sep="\t")
    assert list(table.columns) == CONFOUND_COLUMNS
    net = table[table.model == "dfrn"].iloc[0]
    assert net["r"] == pytest.approx(r, abs=1e-6)  # raw target: the same r as Table 1
    assert net["p_delta_r2_permutation"] > 1.5 / 1001, net.to_dict()  # 2/1001 or more
    assert abs(net["delta_r2"]) < 0.1, net.to_dict()
    cov = table[table.model == "covariates"].iloc[0]
    assert cov["r"] > 0.5 and np.isnan(cov["delta_r2"])  # the bar, not judged against itself
    summary = pd.read_csv(out / "cv/confounds_summary.tsv", sep="\t")
    row = summary[summary.model == "dfrn"].iloc[0]
    called_null = "add nothing detectable beyond age and sex" in row["verdict"]
    assert called_null == (row["p_delta_r2_permutation"] >= 0.05), row.to_dict()
    assert f"  age_only: {row['verdict']}" in logs
    assert any("Table 1" in line and "raw targets" in line for line in logs)


def test_real_effect_with_residualised_targets_is_found(residual_run, cohort_table) -> None:
    out, res, logs = residual_run
    table = pd.read_csv(out / "cv/confounds.tsv", sep="\t")
    net = table[table.model == "dfrn"].iloc[0]
    assert net["p_delta_r2_permutation"] < 0.05 and net["delta_r2"] > 0.05, net.to_dict()
    assert net["r_partial"] > 0.3
    summary = pd.read_csv(out / "cv/confounds_summary.tsv", sep="\t")
    verdict = summary.loc[summary.model == "dfrn", "verdict"].iloc[0]
    assert verdict.startswith("the network's predictions add ΔR² = ") and "nothing" not in verdict
    assert any("Table 1" in line and "residualised on age and sex" in line for line in logs)
    # the models were evaluated on fold residuals, the analysis on the raw target
    pred = pd.read_csv(out / "cv/predictions.tsv", sep="\t", dtype={"participant_id": str})
    raw = pd.read_csv(cohort_table, sep="\t", dtype={"participant_id": str}).set_index(
        "participant_id")
    resid = pred.set_index("participant_id")["y_true"]
    assert not np.allclose(resid, raw.loc[resid.index, "local"])
    assert abs(np.corrcoef(resid, raw.loc[resid.index, "age"])[0, 1]) < 0.2


def test_task_residuals_use_the_training_fold_fit(residual_run, cohort_table) -> None:
    out, res, _ = residual_run
    raw = pd.read_csv(cohort_table, sep="\t", dtype={"participant_id": str}).set_index(
        "participant_id")
    design = pd.DataFrame({"age": raw["age"], "sex_M": (raw["sex"] == "M").astype(float)})
    pred = pd.read_csv(out / "cv/predictions.tsv", sep="\t", dtype={"participant_id": str})
    for task in sorted((out / "cv/tasks").iterdir()):
        meta = json.loads((task / "task.json").read_text())
        fit = ConfoundFit.from_dict(meta["confound_fit"])
        train = [p for p in raw.index if p not in set(meta["test_ids"])]
        # the fit is OLS on the training subjects only (statsmodels as the reference)
        import statsmodels.api as sm

        ols = sm.OLS(raw.loc[train, "local"], sm.add_constant(design.loc[train])).fit()
        np.testing.assert_allclose([fit.intercept, *fit.coef], ols.params.to_numpy(), rtol=1e-8)
        rows = pred[pred.fold == meta["fold"]].set_index("participant_id")
        expected = raw.loc[rows.index, "local"] - fit.fitted(design.loc[rows.index])
        np.testing.assert_allclose(rows["y_true"], expected, rtol=1e-6, atol=1e-6)


def test_predict_writes_residual_and_full_predictions(residual_run, cohort_table,
                                                      tmp_path: Path) -> None:
    out, res, _ = residual_run
    meta = json.loads((out / "models/local/metadata.json").read_text())
    assert meta["target"]["adjustment"]["covariates"] == {
        "columns": ["age", "sex"], "levels": {"sex": ["F", "M"]}}
    assert "residualised on age, sex" in (out / "models/local/README.md").read_text()
    pred_dir = tmp_path / "p"
    assert main(["predict", str(out), "--cohort", str(cohort_table), "--out", str(pred_dir),
                 "--allow-training-subjects", "--no-progress"]) == 0
    pred = pd.read_csv(pred_dir / "predictions.tsv", sep="\t", dtype={"participant_id": str})
    raw = pd.read_csv(cohort_table, sep="\t", dtype={"participant_id": str}).set_index(
        "participant_id")
    design = pd.DataFrame({"age": raw["age"], "sex_M": (raw["sex"] == "M").astype(float)})
    part = np.mean([ConfoundFit.from_dict(m["confound_fit"]).fitted(design.loc[pred.participant_id])
                    for m in meta["models"]], axis=0)
    np.testing.assert_allclose(pred["prediction_full"] - pred["prediction"], part, atol=1e-5)
    assert (pred["adjusted_for"] == "age and sex").all()
    # the full prediction tracks the raw target better than the residual one does
    y = raw.loc[pred.participant_id, "local"]
    assert np.corrcoef(y, pred["prediction_full"])[0, 1] > np.corrcoef(y, pred["prediction"])[0, 1]

    # a cohort without the age column: residual only, and the log names the column
    no_age = tmp_path / "no_age.tsv"
    raw.drop(columns=["age"]).reset_index().to_csv(no_age, sep="\t", index=False)
    for name in raw["t1"]:
        (tmp_path / name).symlink_to(cohort_table.parent / name)
    logs: list[str] = []
    from dfrn.workflows.predict import predict_cohort

    table = predict_cohort(out, no_age, tmp_path / "p2", allow_training_subjects=True,
                           progress=False, log=logs.append)
    assert table["prediction_full"].isna().all() and table["prediction"].notna().all()
    assert any("no 'age' column" in line for line in logs)
    # a sex level the model never saw: one line naming the subject
    odd = tmp_path / "odd.tsv"
    raw.assign(sex=["X"] + list(raw["sex"].iloc[1:])).reset_index().to_csv(odd, sep="\t",
                                                                           index=False)
    with pytest.raises(Exception, match=r"subject sub-00: covariate 'sex' is 'X'"):
        predict_cohort(out, odd, tmp_path / "p3", allow_training_subjects=True, progress=False,
                       log=logs.append)


def test_subjects_missing_a_covariate_are_refused_or_dropped(cohort_copy) -> None:
    from conftest import study_config

    from dfrn.errors import DfrnInputError
    from dfrn.workflows.study import load_study_cohort

    table = pd.read_csv(cohort_copy.table, sep="\t")
    table.loc[3, "age"] = np.nan
    table.to_csv(cohort_copy.table, sep="\t", index=False)
    pid = table.loc[3, "participant_id"]
    cfg = study_config(cohort_copy, cohort={"covariates": ["age", "sex"]})
    with pytest.raises(DfrnInputError, match=f"subject {pid}: covariate 'age' is missing"):
        load_study_cohort(cfg)
    cfg = study_config(cohort_copy, cohort={"covariates": ["age", "sex"],
                                            "missing_covariates": "drop"})
    with pytest.warns(UserWarning, match=f"1 subject\\(s\\) left out .*: {pid}"):
        cohort = load_study_cohort(cfg)
    assert pid not in cohort.participant_ids and len(cohort) == len(table) - 1
    assert len(cohort.images) == len(cohort)


def test_cv_groups_keep_each_site_in_one_fold(cohort_copy, tmp_path: Path) -> None:
    from conftest import study_config

    from dfrn.errors import DfrnInputError
    from dfrn.workflows.study import fold_plan_for, load_study_cohort

    table = pd.read_csv(cohort_copy.table, sep="\t")
    table["scanner"] = ["S0", "S1", "S2", "S3"] * 3
    table.to_csv(cohort_copy.table, sep="\t", index=False)
    cfg = study_config(cohort_copy, cv={"groups": "scanner", "n_folds": 4, "n_repeats": 2,
                                        "stratify": True})
    cohort = load_study_cohort(cfg)
    plan = fold_plan_for(cohort, cfg, tmp_path / "out", cohort.targets)
    labelled = plan.assign(site=plan["participant_id"].map(table.set_index("participant_id")
                                                           ["scanner"]))
    assert (labelled.groupby(["repeat", "site"])["fold"].nunique() == 1).all()
    assert (labelled.groupby(["repeat", "fold"])["site"].nunique() == 1).all()  # leave-one-out
    cfg = study_config(cohort_copy, cv={"groups": "scanner", "n_folds": 5})
    with pytest.raises(DfrnInputError, match="group column 'scanner' has 4 groups, fewer than "
                                              "cv.n_folds=5"):
        fold_plan_for(cohort, cfg, tmp_path / "out")
    cfg = study_config(cohort_copy, cv={"groups": "clinic"})
    with pytest.raises(DfrnInputError, match=r"\[cv\] groups names column 'clinic'"):
        fold_plan_for(cohort, cfg, tmp_path / "out")


def test_network_permutations_with_residualised_targets_are_refused_before_training(
        tiny_cohort, tmp_path: Path) -> None:
    from conftest import study_config

    from dfrn.errors import DfrnInputError

    cfg = study_config(tiny_cohort, cohort={"covariates": ["age"]},
                       confounds={"target": "residualize"})
    with pytest.raises(DfrnInputError, match="Freedman-Lane p of cv/confounds.tsv"):
        run_study(cfg, tmp_path / "out", progress=False, log=lambda s: None, permutations=3)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_a_typo_in_a_numeric_covariate_is_refused_unless_declared_categorical(cohort_copy) -> None:
    """Issue 26 item 1: 'forty' in the age column is refused by name; a numeric scanner code
    listed in [cohort] categorical_covariates is one-hot coded."""
    from conftest import study_config

    from dfrn.errors import DfrnInputError
    from dfrn.workflows.study import load_study_cohort, study_covariates

    table = pd.read_csv(cohort_copy.table, sep="\t")
    table["age"] = table["age"].astype(object)
    table.loc[3, "age"] = "forty"
    table["scanner"] = [1, 2, 3] * 4
    table.to_csv(cohort_copy.table, sep="\t", index=False)
    pid = table.loc[3, "participant_id"]
    cfg = study_config(cohort_copy, cohort={"covariates": ["age", "sex"]})
    with pytest.raises(DfrnInputError, match=rf"^covariate column 'age' holds numbers except for "
                       rf"1 value\(s\): subject\(s\) {pid} \('forty'\); correct them, or list 'age'"
                       r" in \[cohort\] categorical_covariates"):
        load_study_cohort(cfg)
    table.loc[3, "age"] = 40
    table.to_csv(cohort_copy.table, sep="\t", index=False)
    cfg = study_config(cohort_copy, cohort={"covariates": ["age", "scanner"],
                                            "categorical_covariates": ["scanner"]})
    selection = study_covariates(load_study_cohort(cfg), cfg)
    assert list(selection.design().columns) == ["age", "scanner_2", "scanner_3"]


def test_a_covariate_that_copies_a_target_is_warned_about(cohort_copy, tmp_path: Path) -> None:
    """Issue 26 item 8: the study preflight warns, naming both columns."""
    import warnings

    from conftest import study_config

    from dfrn.workflows.study import fold_plan_for, load_study_cohort

    table = pd.read_csv(cohort_copy.table, sep="\t")
    table["sleep_copy"] = table["sleep"].round(4)
    table.to_csv(cohort_copy.table, sep="\t", index=False)
    cfg = study_config(cohort_copy, cohort={"covariates": ["age", "sleep_copy"]})
    cohort = load_study_cohort(cfg)
    with pytest.warns(UserWarning, match=r"^covariate 'sleep_copy' is a copy of target 'sleep' "
                      r"\(r = 1.0000 on the 12 subjects with both\)") as record:
        fold_plan_for(cohort, cfg, tmp_path / "out", cohort.targets)
    assert len([w for w in record if "a copy of target" in str(w.message)]) == 1
    cfg = study_config(cohort_copy, cohort={"covariates": ["age", "sex"]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fold_plan_for(cohort, cfg, tmp_path / "out", cohort.targets)


def test_one_group_and_a_small_combat_site_are_refused_before_training(
        cohort_copy, tmp_path: Path) -> None:
    """Issue 26 items 6 and 7, through dfrn run: [cv] groups on a column with one group, and
    ComBat with a site that has under 2 subjects in some training fold, are refused with one
    line before any network is trained."""
    from conftest import study_config

    from dfrn.data.synth import make_demo_atlases
    from dfrn.errors import DfrnInputError

    table = pd.read_csv(cohort_copy.table, sep="\t")
    table["centre"] = "C1"
    table["scanner"] = ["S0", "S1"] * 5 + ["S2", "S0"]  # S2: one subject
    table.to_csv(cohort_copy.table, sep="\t", index=False)
    quiet = {"progress": False, "log": lambda s: None}
    cfg = study_config(cohort_copy, cv={"groups": "centre"})
    with pytest.raises(DfrnInputError) as err:
        run_study(cfg, tmp_path / "one", **quiet)
    assert str(err.value) == (
        "group column 'centre' has a single group ('C1') for all 12 subjects, so group folds "
        "are impossible: fix the column, or remove [cv] groups")
    assert not (tmp_path / "one/cv/tasks").exists()
    atlas = make_demo_atlases(cohort_copy, n_parcels=6)["parcellation"]
    cfg = study_config(cohort_copy, cohort={"site": "scanner"},
                       baseline={"enabled": True, "atlas": str(atlas), "harmonize": "combat",
                                 "atlas_labels": str(atlas.with_name("parcellation_dseg.tsv")),
                                 "n_permutations": 0})
    with pytest.raises(DfrnInputError, match=r"^repeat 0 fold \d: site 'S2' has (no training "
                       r"subject with a value of factor 'anhedonia', so ComBat cannot harmonise "
                       r"its 1 test subject|1 training subject with a value of factor "
                       r"'anhedonia': ComBat)"):
        run_study(cfg, tmp_path / "combat", **quiet)
    assert not (tmp_path / "combat/cv/tasks").exists()  # no network was trained


def _no_atlas(monkeypatch) -> list[str]:
    """No atlas (none configured, none downloadable): the ROI ridge cannot run."""
    import dfrn.workflows.baseline as baseline

    def none(atlas, labels, log):
        log("note: no atlas available (offline); region tables are skipped")

    monkeypatch.setattr(baseline, "load_atlas_for", none)
    return []


def test_voxel_ridge_joins_a_finished_run_without_an_atlas(residual_run, monkeypatch) -> None:
    """``dfrn baseline RESULTS`` on a finished run (residualised targets, no atlas): the ROI
    ridge is skipped, the voxel ridge trains on the network's own residual targets in its
    folds, and cv/confounds.tsv judges it beyond the covariates."""
    from dfrn.workflows.baseline import run_baseline_stage

    out, _, _ = residual_run
    logs = _no_atlas(monkeypatch)
    results = run_baseline_stage(out, progress=False, log=logs.append)
    assert any(line.startswith("ROI ridge skipped: it needs an atlas") for line in logs)
    assert not (out / "baseline/predictions.tsv").exists()  # no ROI ridge rows
    assert set(results) >= {"voxel_ridge_predictions", "voxel_ridge_metrics", "summary"}
    voxel = pd.read_csv(out / "baseline/voxel_ridge_predictions.tsv", sep="\t",
                        dtype={"participant_id": str})
    net = pd.read_csv(out / "cv/predictions.tsv", sep="\t", dtype={"participant_id": str})
    key = ["participant_id", "repeat", "fold", "factor"]
    both = voxel.merge(net, on=key, suffixes=("_voxel", "_net"), validate="one_to_one")
    assert len(both) == len(net) == len(voxel)  # the network's folds and subjects
    np.testing.assert_allclose(both["y_true_voxel"], both["y_true_net"], atol=1e-6)  # residuals
    assert (out / "baseline/voxel_ridge_metrics.tsv").is_file()
    assert any("residualised per fold" in line for line in logs)  # no ridge permutation then
    table = pd.read_csv(out / "cv/confounds.tsv", sep="\t")
    assert set(table["model"]) == {"dfrn", "voxel_ridge", "covariates"}
    row = table[table.model == "voxel_ridge"].iloc[0]
    assert row["r_partial"] > 0.3 and row["p_delta_r2_permutation"] < 0.05, row.to_dict()
    summary = pd.read_csv(out / "cv/confounds_summary.tsv", sep="\t")
    verdict = summary.loc[summary.model == "voxel_ridge", "verdict"].iloc[0]
    assert verdict.startswith("the voxel ridge's predictions add ΔR² = "), verdict
    assert any("Mean Pearson r over repeats" in line and "voxel_ridge_r" in line
               for line in logs)
    # the report says what ran: the voxel ridge (cited), not the ROI ridge of the config
    from dfrn.workflows.report import write_report

    text = write_report(out).read_text(encoding="utf-8")
    methods = text.split('id="methods"', 1)[1].split("</p>", 1)[0]
    assert "A ridge regression on the network&#39;s input voxels (dual form" in methods
    assert "Schulz et al. 2020" in methods and "atlas-region sums" not in methods
    assert "Schulz MA" in text and "Nat Commun 11:4238" in text
    assert "<th>voxel_ridge_r</th>" in text and "<th>ridge_r</th>" not in text
    # the comparison: the network vs the voxel ridge on the same residual targets; neither vs
    # the covariates-only model, which predicts the raw score
    comparison = pd.read_csv(out / "cv/comparison.tsv", sep="\t")
    assert comparison[["model_a", "model_b"]].values.tolist() == [["dfrn", "voxel_ridge"]]
    assert any(line.startswith("comparison: the brain models predict residualised targets")
               for line in logs)
    assert "all were trained on the residualised targets" in text
    assert 'id="comparison-verdicts"><li>DFRN vs voxel ridge, local: ' in text


def test_the_network_is_compared_with_the_covariates_only_model(null_run) -> None:
    """Raw targets: cv/comparison.tsv holds the network vs the covariates-only model on the
    same folds, its r the two models' Table 1 r, and the log gives its verdict sentence."""
    from dfrn.evaluation.comparison import COMPARISON_COLUMNS
    from dfrn.workflows.comparison import verdict_sentence

    out, res, logs = null_run
    table = pd.read_csv(out / "cv/comparison.tsv", sep="\t")
    assert list(table.columns) == COMPARISON_COLUMNS
    assert table[["factor", "model_a", "model_b"]].values.tolist() == [
        ["age_only", "dfrn", "covariates"]]
    row = table.iloc[0]
    cov = pd.read_csv(out / "cv/covariates_metrics.tsv", sep="\t")
    assert row["r_a"] == pytest.approx(res.metrics["pearson_r"].iloc[0], abs=1e-9)
    assert row["r_b"] == pytest.approx(cov["pearson_r"].iloc[0], abs=1e-9)
    assert row["ci_low"] < row["delta_r"] < row["ci_high"]
    assert (row["n_scores"], row["df"]) == (3, 2)  # 1 repeat × 3 folds
    assert f"  dfrn vs covariates, {verdict_sentence(row)}" in logs
    metrics = pd.read_csv(out / "cv/metrics.tsv", sep="\t")
    assert metrics["ci_low"].iloc[0] < metrics["pearson_r"].iloc[0] < metrics["ci_high"].iloc[0]

