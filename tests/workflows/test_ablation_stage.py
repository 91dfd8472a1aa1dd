"""Region ablation through ``dfrn run`` and ``dfrn attention --ablation``: the planted
regions come first, tasks resume, the map carries the images' affine, bad input is one line."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import NARROW

from dfrn.cli import main
from dfrn.config import config_from_dict
from dfrn.interpret.ablation import IMPORTANCE_COLUMNS
from dfrn.workflows.run import run_study

FACTORS = ["appetite"]  # one factor keeps the suite quick; the demo check covers four


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory: pytest.TempPathFactory):
    """36 synthetic subjects (8 mm) with planted regions; the attention atlas names them."""
    import torch

    from dfrn.data.synth import make_demo_atlases, make_synthetic_cohort

    root = tmp_path_factory.mktemp("ablation")
    synth = make_synthetic_cohort(root / "synth", n_subjects=36, voxel_size=8.0, effect=0.6,
                                  radius=14.0, seed=5)
    atlases = make_demo_atlases(synth, n_parcels=12, seed=0)
    raw = {
        "cohort": {"table": str(synth.table), "targets": FACTORS, "mask": str(synth.brain_mask)},
        "model": {"widen_factor": NARROW},
        "training": {"epochs": 5, "val_fraction": 0.0, "batch_size": 8},
        "cv": {"n_folds": 3, "n_repeats": 1},
        "baseline": {"enabled": False},
        "attention": {"atlas": str(atlases["regions"]),
                      "atlas_labels": str(atlases["regions"].with_name("regions_dseg.tsv")),
                      "template": str(synth.template), "sanity": False, "bootstrap": 200,
                      "truth": {f: str(synth.truth_masks[f]) for f in FACTORS}},
    }
    torch.manual_seed(0)
    logs: list[str] = []
    out = root / "res"
    res = run_study(config_from_dict(raw, root), out, progress=False, log=logs.append)
    return out, res, logs, atlases


def test_planted_regions_rank_first(planted_run) -> None:
    from dfrn.data.synth import REGIONS

    out, res, logs, _ = planted_run
    table = pd.read_csv(out / "attention/region_ablation.tsv", sep="\t")
    assert list(table.columns) == IMPORTANCE_COLUMNS
    ranks = {f: int(table[(table.factor == f) & (table.region == REGIONS[f][0])]["rank"].iloc[0])
             for f in FACTORS}
    print("planted-region ranks:", ranks)
    assert ranks == {f: 1 for f in FACTORS}, ranks
    top = table[table["rank"] == 1]
    assert (top["ci_low"] > 0).all() and (top["ci_low"] <= top["delta_r"]).all()
    assert any(line.startswith("Where is the signal: region ablation") for line in logs)
    assert ("region ablation ranks the ground-truth region first for 1 of 1 factors: appetite "
            "insula 1/") in "\n".join(logs)
    truth = pd.read_csv(out / "attention/ablation_truth.tsv", sep="\t")
    assert truth["rank"].tolist() == [1]


def test_ablation_map_is_on_the_images_grid(planted_run) -> None:
    out, res, _, atlases = planted_run
    img = nib.load(out / "attention/appetite_ablation_dseg.nii.gz")
    atlas = nib.load(atlases["regions"])
    assert img.shape == atlas.shape
    np.testing.assert_allclose(img.affine, atlas.affine)
    table = pd.read_csv(out / "attention/region_ablation.tsv", sep="\t")
    row = table[(table.factor == "appetite") & (table["rank"] == 1)].iloc[0]
    labels = np.asarray(atlas.dataobj)
    values = np.asarray(img.dataobj)[labels == row["index"]]
    np.testing.assert_allclose(values, row["delta_r"], rtol=1e-6)


def test_attention_ablation_resumes_and_redoes_a_damaged_task(planted_run, capsys) -> None:
    """Also with another map method (issue 26.2): the ablation does not depend on it, so
    ``--ablation --method gradient`` writes the ranking beside the gradient maps."""
    out, _, _, _ = planted_run
    before = pd.read_csv(out / "attention/region_ablation.tsv", sep="\t")
    tasks = out / "attention/ablation"
    kept = tasks / "repeat-0_fold-0_appetite/changes.tsv"
    mtime = kept.stat().st_mtime_ns
    damaged = tasks / "repeat-0_fold-1_appetite/changes.tsv"
    damaged.write_text(damaged.read_text().replace("\t0.", "\t9.", 1))
    (out / "attention/appetite_ablation_dseg.nii.gz").unlink()
    assert main(["attention", str(out), "--ablation", "--method", "gradient",
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "resuming, 2 of 3 tasks done" in printed
    assert "Where is the signal: region ablation" in printed
    assert (out / "attention/method-gradient/appetite_fam_abs.nii.gz").is_file()
    assert (out / "attention/appetite_ablation_dseg.nii.gz").is_file()
    assert kept.stat().st_mtime_ns == mtime
    pd.testing.assert_frame_equal(pd.read_csv(out / "attention/region_ablation.tsv", sep="\t"),
                                  before)


def test_a_study_without_models_and_an_off_grid_atlas_give_one_line(planted_run, tmp_path,
                                                                   capsys) -> None:
    out, _, _, atlases = planted_run
    copy = tmp_path / "res"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "attention/ablation")
    moved = tmp_path / "moved_dseg.nii.gz"
    img = nib.load(atlases["regions"])
    affine = img.affine.copy()
    affine[:3, 3] += 8.0
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), affine), moved)
    labels = str(atlases["regions"].with_name("regions_dseg.tsv"))
    ranked = (copy / "attention/regions.tsv").stat().st_mtime_ns
    assert main(["attention", str(copy), "--ablation", "--atlas", str(moved), "--atlas-labels",
                 labels, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not on the grid of the images" in err[0], err
    assert "fix --atlas" in err[0] and str(moved) in err[0]
    # issue 26.9: refused before the voxel map's region table is resampled onto it
    assert (copy / "attention/regions.tsv").stat().st_mtime_ns == ranked
    (copy / "cv/tasks/repeat-0_fold-0_appetite/model.pt").unlink()
    assert main(["attention", str(copy), "--ablation", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "repeat-0_fold-0_appetite" in err[0], err


def test_predict_regions_gives_individual_sensitivity(planted_run, tmp_path: Path) -> None:
    import torch

    from dfrn.data.synth import REGIONS
    from dfrn.interpret.ablation import RegionGrid, ablation_changes
    from dfrn.models.package import load_package

    out, res, _, _ = planted_run
    rows = pd.read_csv(res.cohort.source, sep="\t").head(8)  # 8 scans keep it quick
    rows["t1"] = [str(res.cohort.source.parent / p) for p in rows["t1"]]
    table = tmp_path / "eight.tsv"
    rows.to_csv(table, sep="\t", index=False)
    assert main(["predict", str(out), "--cohort", str(table), "--out", str(tmp_path / "p"),
                 "--allow-training-subjects", "--regions", "--no-progress"]) == 0
    sens = pd.read_csv(tmp_path / "p/regions.tsv", sep="\t", dtype={"participant_id": str})
    assert list(sens.columns) == ["participant_id", "factor", "region", "abs_change"]
    mean = sens.groupby(["factor", "region"])["abs_change"].mean()
    for f in FACTORS:
        assert mean[f].idxmax() == REGIONS[f][0], mean[f].sort_values().tail(3)
    # parity: the first subject's sensitivity, from the package's networks by hand
    package = load_package(out / "models/appetite")
    labels, regions, baselines = package.regions()
    volumes = res.study.volumes
    pid = volumes.participant_ids[0]
    x = torch.from_numpy(np.asarray(volumes[0], np.float32)[None, None])
    by_hand = np.mean([ablation_changes(est.model_, x, RegionGrid(labels, regions), base)[:, 0]
                       * est.y_std_ for est, base in zip(package.estimators, baselines,
                                                         strict=True)], axis=0)
    got = sens[(sens.participant_id == pid) & (sens.factor == "appetite")]
    np.testing.assert_allclose(got["abs_change"], np.abs(by_hand), rtol=1e-4, atol=1e-6)
