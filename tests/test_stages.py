"""The factor, baseline and attention stages inside a study run (tiny synthetic cohort)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import NARROW

from dfrn.cli import main
from dfrn.config import config_from_dict
from dfrn.data.synth import make_demo_atlases
from dfrn.workflows.run import run_study


def _with_items(cohort, tmp: Path, n_items: int = 8) -> Path:
    """The tiny cohort's table plus rating items driven by two of its factors."""
    df = pd.read_csv(cohort.table, sep="\t")
    rng = np.random.default_rng(0)
    for j in range(n_items):
        driver = "anhedonia" if j < n_items // 2 else "sleep"
        df[f"item_{j + 1}"] = np.round(2 + df[driver] + 0.4 * rng.standard_normal(len(df)), 2)
    for col in ("t1", "gm"):
        df[col] = [str(cohort.root / p) for p in df[col]]
    path = tmp / "cohort_items.tsv"
    df.to_csv(path, sep="\t", index=False)
    return path


@pytest.mark.parametrize("fit_on", ["all", "train", "all-no-stability"])
def test_study_with_factors_section(tiny_cohort, tmp_path: Path, fit_on: str) -> None:
    resamples = 0 if fit_on == "all-no-stability" else 50
    fit_on = fit_on.removesuffix("-no-stability")
    table = _with_items(tiny_cohort, tmp_path)
    raw = {
        "cohort": {"table": str(table), "mask": str(tiny_cohort.brain_mask)},
        "factors": {
            "items": [f"item_{j}" for j in range(1, 9)],
            "n_factors": 2,
            "fit_on": fit_on,
            "n_resamples": resamples,
            "names": {"anhedonia": ["item_1", "item_2"], "sleep": ["item_7", "item_8"]},
        },
        "model": {"widen_factor": NARROW},
        "training": {"epochs": 1, "val_fraction": 0.0},
        "cv": {"n_folds": 2, "n_repeats": 1},
        "baseline": {"enabled": False},
        "attention": {"enabled": False},
        "final": {"enabled": False},
    }
    cfg = config_from_dict(raw, tmp_path)
    res = run_study(cfg, tmp_path / "out", progress=False, log=lambda s: None)
    out = tmp_path / "out"
    for rel in ["factors/loadings.tsv", "factors/scores.tsv", "factors/variance.tsv",
                "figures/factor_loadings.png"]:
        assert (out / rel).is_file(), rel
    assert sorted(res.predictions["factor"].unique()) == ["anhedonia", "sleep"]
    if resamples == 0:  # [factors] n_resamples = 0 skips the estimate, like --resamples 0
        assert not (out / "factors/stability.tsv").exists()
        return
    stability = pd.read_csv(out / "factors/stability.tsv", sep="\t")
    assert sorted(stability["factor"].unique()) == ["anhedonia", "sleep"]
    assert stability["congruence"].between(0, 1).all()
    if fit_on == "train":  # one row per (fold, factor) of the plan
        assert sorted(stability["resample"].unique()) == ["repeat-0_fold-0", "repeat-0_fold-1"]
    else:  # split-half resamples
        assert len(stability) == 2 * 50
    scores = pd.read_csv(out / "factors/scores.tsv", sep="\t").set_index("participant_id")
    truth = pd.read_csv(tiny_cohort.table, sep="\t").set_index("participant_id")
    # the named factor tracks the score that drove its items
    assert np.corrcoef(scores["anhedonia"], truth.loc[scores.index, "anhedonia"])[0, 1] > 0.9
    y_true = res.predictions.set_index("participant_id")
    ah = y_true[y_true["factor"] == "anhedonia"]["y_true"]
    r = np.corrcoef(ah, scores.loc[ah.index, "anhedonia"])[0, 1]
    if fit_on == "all":
        assert r == pytest.approx(1.0)
    else:  # projected by training-fold fits: close to, not equal to, the full fit
        assert 0.9 < r


def test_baseline_and_attention_stages_and_cli(tiny_cohort, tmp_path: Path, capsys) -> None:
    atlases = make_demo_atlases(tiny_cohort, n_parcels=12, seed=0)
    raw = {
        "cohort": {
            "table": str(tiny_cohort.table),
            "targets": ["anhedonia", "sleep"],
            "mask": str(tiny_cohort.brain_mask),
            "covariates": ["age", "sex"],
        },
        "model": {"widen_factor": NARROW},
        "training": {"epochs": 1, "val_fraction": 0.0},
        "cv": {"n_folds": 2, "n_repeats": 1},
        "baseline": {
            "atlas": str(atlases["parcellation"]),
            "atlas_labels": str(atlases["parcellation"].with_suffix("").with_suffix(".tsv")),
            "n_permutations": 19,
        },
        "attention": {
            "atlas": str(atlases["regions"]),
            "atlas_labels": str(atlases["regions"].with_suffix("").with_suffix(".tsv")),
            "template": str(tiny_cohort.template),
            "truth": {f: str(p) for f, p in tiny_cohort.truth_masks.items()},
        },
    }
    cfg = config_from_dict(raw, tmp_path)
    out = tmp_path / "out"
    run_study(cfg, out, progress=False, log=lambda s: None)
    for rel in [
        "baseline/roi_features.tsv", "baseline/predictions.tsv", "baseline/metrics.tsv",
        "baseline/permutation.tsv", "figures/fig3_rr_vs_dfrn.png",
        "attention/anhedonia_fam.nii.gz", "attention/anhedonia_fam_abs.nii.gz",
        "attention/regions.tsv", "attention/localisation.tsv", "attention/sanity.tsv",
        "figures/fig4_fam.png", "figures/attention_sanity.png",
    ]:
        assert (out / rel).is_file(), rel
    feats = pd.read_csv(out / "baseline/roi_features.tsv", sep="\t")
    assert feats.shape == (12, 13) and feats.columns[0] == "participant_id"
    base_pred = pd.read_csv(out / "baseline/predictions.tsv", sep="\t")
    net_pred = pd.read_csv(out / "cv/predictions.tsv", sep="\t")
    key = ["participant_id", "repeat", "fold", "factor"]
    assert base_pred[key].sort_values(key).values.tolist() == net_pred[key].sort_values(key).values.tolist()
    perm = pd.read_csv(out / "baseline/permutation.tsv", sep="\t")
    assert set(perm["n_perm"]) == {19} and perm["p_permutation"].between(0.05, 1).all()
    # maps sit on the input grid with the input affine (not an identity affine)
    t1 = nib.load(tiny_cohort.root / "sub-0001_T1w.nii.gz")
    fam = nib.load(out / "attention/sleep_fam_abs.nii.gz")
    assert fam.shape == t1.shape
    np.testing.assert_allclose(fam.affine, t1.affine)
    regions = pd.read_csv(out / "attention/regions.tsv", sep="\t")
    assert list(regions.columns[:5]) == ["factor", "rank", "region", "label", "mean_attention"]
    sanity = pd.read_csv(out / "attention/sanity.tsv", sep="\t")
    assert set(sanity["method"]) == {"guided_backprop", "gradient"}
    loc = pd.read_csv(out / "attention/localisation.tsv", sep="\t")
    assert loc["roc_auc"].between(0, 1).all()

    # stage CLIs on the finished run: another method, new files only where absent
    capsys.readouterr()
    assert main(["attention", str(out), "--method", "gradient", "--no-progress"]) == 0
    assert "Top" in capsys.readouterr().out
    assert (out / "attention/method-gradient/sleep_fam_abs.nii.gz").is_file()
    assert (out / "figures/fig4_fam_gradient.png").is_file()
    guided = np.asarray(fam.dataobj)
    plain = np.asarray(nib.load(out / "attention/method-gradient/sleep_fam_abs.nii.gz").dataobj)
    assert not np.allclose(guided, plain)
    assert main(["attention", str(tmp_path), "--no-progress"]) == 2
    assert "not a results folder" in capsys.readouterr().err


def test_network_permutation_test(tiny_cohort, tmp_path: Path) -> None:
    raw = {
        "cohort": {"table": str(tiny_cohort.table), "targets": ["sleep"]},
        "model": {"widen_factor": NARROW},
        "training": {"epochs": 1, "val_fraction": 0.0},
        "cv": {"n_folds": 2, "n_repeats": 1},
        "baseline": {"enabled": False},
        "attention": {"enabled": False},
        "final": {"enabled": False},
    }
    cfg = config_from_dict(raw, tmp_path)
    out = tmp_path / "out"
    res = run_study(cfg, out, progress=False, log=lambda s: None, permutations=2)
    table = pd.read_csv(out / "cv/permutation.tsv", sep="\t")
    assert table["n_perm"].tolist() == [2]
    p = table["p_permutation"].iloc[0]
    assert min(abs(p - v) for v in (1 / 3, 2 / 3, 1.0)) < 1e-6
    assert table["r"].iloc[0] == pytest.approx(res.metrics["pearson_r"].iloc[0])
    # each permutation is a resumable run of its own
    assert sorted(p.name for p in (out / "permutations").iterdir()) == ["perm-0000", "perm-0001"]


def test_factors_cli(shared_data: Path, tmp_path: Path, capsys) -> None:
    items = shared_data / "items" / "ehd20.tsv"
    assert main(["factors", str(items), "--n-factors", "5", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "e19 (0.86)" in text and "e5 (0.87)" in text
    loadings = pd.read_csv(tmp_path / "factors/loadings.tsv", sep="\t")
    assert loadings.shape == (20, 6) and loadings.columns[0] == "item"
    var = pd.read_csv(tmp_path / "factors/variance.tsv", sep="\t")
    assert var["proportion"].sum() == pytest.approx(0.6806, abs=1e-4)
    assert (tmp_path / "figures/factor_loadings.png").is_file()
    # never overwritten
    assert main(["factors", str(items), "--out", str(tmp_path)]) == 2
    assert "already exists" in capsys.readouterr().err
    # naming by marker items
    assert main(["factors", str(items), "--out", str(tmp_path / "named"),
                 "--name", "mood=e19,e15", "--name", "somatic=e5,e6"]) == 0
    named = pd.read_csv(tmp_path / "named/factors/loadings.tsv", sep="\t").set_index("item")
    assert named.loc["e19", "mood"] == pytest.approx(0.86, abs=0.005)
    assert named.loc["e5", "somatic"] == pytest.approx(0.87, abs=0.005)


def test_cli_image_error_is_one_line(tiny_cohort, tmp_path: Path, capsys) -> None:
    df = pd.read_csv(tiny_cohort.table, sep="\t")
    df["t1"] = [str(tiny_cohort.root / p) for p in df["t1"]]
    four_d = tmp_path / "four.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4, 2), np.float32), np.eye(4)), four_d)
    df.loc[3, "t1"] = str(four_d)
    df.to_csv(tmp_path / "c.tsv", sep="\t", index=False)
    (tmp_path / "s.toml").write_text('[cohort]\ntable = "c.tsv"\ntargets = ["sleep"]\n')
    assert main(["run", str(tmp_path / "s.toml"), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "participant sub-0004" in err[0] and "3D T1 image is required" in err[0]
