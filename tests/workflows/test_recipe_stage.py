"""``dfrn run`` with the training recipe's options: joint heads and several seeds through CV,
Table 1, attention, region ablation and model packages; every recipe option end to end."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import NARROW

from dfrn.config import config_from_dict
from dfrn.workflows.report import training_words
from dfrn.workflows.run import run_study

FACTORS = ["anhedonia", "sleep"]


@pytest.fixture(scope="module")
def joint_run(tiny_cohort, tmp_path_factory: pytest.TempPathFactory):
    from dfrn.data.synth import make_demo_atlases

    root = tmp_path_factory.mktemp("joint")
    atlases = make_demo_atlases(tiny_cohort, n_parcels=6, seed=0)
    table = pd.read_csv(tiny_cohort.table, sep="\t")
    for col in ("t1", "gm"):
        table[col] = [str(tiny_cohort.root / f) for f in table[col]]
    table.loc[[0, 5, 9], "sleep"] = np.nan  # sleep is missing for three subjects
    table.to_csv(root / "participants.tsv", sep="\t", index=False)
    raw = {
        "cohort": {"table": str(root / "participants.tsv"), "targets": FACTORS,
                   "mask": str(tiny_cohort.brain_mask)},
        "model": {"heads": "joint", "widen_factor": NARROW},
        "training": {"epochs": 2, "val_fraction": 0.34, "early_stopping": "smoothed",
                     "min_epochs": 1, "augment": "light", "lr_schedule": "cosine",
                     "weight_decay": 0.01, "n_seeds": 2},
        "cv": {"n_folds": 2, "n_repeats": 1, "seed": 1},
        "baseline": {"enabled": False},
        "attention": {"atlas": str(atlases["regions"]),
                      "atlas_labels": str(atlases["regions"].with_name("regions_dseg.tsv")),
                      "template": str(tiny_cohort.template), "sanity": False, "bootstrap": 0},
    }
    out = root / "res"
    logs: list[str] = []
    res = run_study(config_from_dict(raw, tiny_cohort.root), out, progress=False,
                    log=logs.append)
    return out, res, logs


def test_joint_heads_train_one_network_per_fold_and_seed(joint_run) -> None:
    out, res, logs = joint_run
    tasks = sorted(p.name for p in (out / "cv/tasks").iterdir())
    assert tasks == ["repeat-0_fold-0_heads-joint", "repeat-0_fold-0_heads-joint_seed-1",
                     "repeat-0_fold-1_heads-joint", "repeat-0_fold-1_heads-joint_seed-1"]
    history = pd.read_csv(out / "cv/tasks" / tasks[0] / "history.tsv", sep="\t")
    assert {"val_loss", "val_loss_smoothed", "lr"} <= set(history.columns)
    assert np.isfinite(history["val_loss"]).all()  # an inner split was drawn and watched
    assert any("joint heads" in line and "2 seeds per fold" in line for line in logs)
    pred = pd.read_csv(out / "cv/predictions.tsv", sep="\t")
    assert len(pred) == 12 + 9  # every subject once per factor it has: seeds averaged
    assert pred[pred.factor == "sleep"]["y_true"].notna().all()
    # the pooled prediction is the mean of the two seeds' networks
    rows = [pd.read_csv(out / "cv/tasks" / t / "predictions.tsv", sep="\t") for t in tasks[:2]]
    metas = [json.loads((out / "cv/tasks" / t / "task.json").read_text()) for t in tasks[::2]]
    ids = {f: {p for m in metas for p in m["test_ids_by_factor"][f]} for f in FACTORS}
    assert len(ids["sleep"]) == 9 and ids["sleep"] < ids["anhedonia"]
    mean = (rows[0].set_index(["participant_id", "factor"])["y_pred"]
            + rows[1].set_index(["participant_id", "factor"])["y_pred"]) / 2
    got = pred[pred.fold == 0].set_index(["participant_id", "factor"])["y_pred"]
    np.testing.assert_allclose(got.loc[mean.index], mean, rtol=1e-6)  # TSV digits
    assert not np.allclose(rows[0]["y_pred"], rows[1]["y_pred"])  # two different seeds
    t1 = pd.read_csv(out / "cv/table1.tsv", sep="\t")
    assert list(t1.columns) == ["repeat", *FACTORS]


def test_attention_ablation_and_packages_read_each_factors_output(joint_run) -> None:
    from dfrn.models.package import load_package
    from dfrn.models.regressor import DFRNRegressor

    out, _, _ = joint_run
    import nibabel as nib

    maps = [np.asarray(nib.load(out / f"attention/{f}_fam.nii.gz").dataobj) for f in FACTORS]
    assert not np.allclose(maps[0], maps[1])  # each factor's own output is explained
    ablation = pd.read_csv(out / "attention/region_ablation.tsv", sep="\t")
    assert set(ablation["factor"]) == set(FACTORS)
    names = sorted(p.name for p in (out / "attention/ablation").iterdir())
    assert "repeat-0_fold-1_sleep_heads-joint_seed-1" in names and len(names) == 8
    # a package member is the joint network's output for its factor, exactly
    package = load_package(out / "models/sleep")
    members = package.metadata["models"]
    assert len(package.estimators) == 4 and [m["seed_index"] for m in members] == [0, 1, 0, 1]
    joint = DFRNRegressor.load(out / "cv/tasks/repeat-0_fold-1_heads-joint_seed-1/model.pt")
    cache = sorted((out / "cache").rglob("*.npy"))[:3]
    x = [np.load(p).astype(np.float32) for p in cache]
    np.testing.assert_allclose(package.estimators[3].predict(x), joint.predict(x)[:, 1],
                               rtol=1e-5, atol=1e-6)
    meta = json.loads((out / "cv/tasks/repeat-0_fold-1_heads-joint/task.json").read_text())
    assert meta["factors"] == FACTORS and len(meta["y_mean"]) == 2
    # every stage reads a factor through FactorNetwork: its output, scaling and subjects
    from dfrn.evaluation.tasks import factor_networks

    plan = pd.read_csv(out / "cv/folds.tsv", sep="\t", dtype={"participant_id": str})
    nets = factor_networks(plan, "sleep", FACTORS, "joint", 2)
    assert [n.output for n in nets] == [1, 1, 1, 1]
    one = nets[3].load(out / "cv/tasks")
    np.testing.assert_allclose(one.predict(x), joint.predict(x)[:, 1], rtol=1e-5, atol=1e-6)
    seed1 = json.loads((out / "cv/tasks" / nets[3].task.name / "task.json").read_text())
    assert one.y_mean_ == pytest.approx(seed1["y_mean"][1])
    assert nets[3].meta(out / "cv/tasks")["test_ids"] == seed1["test_ids_by_factor"]["sleep"]


def test_the_report_and_the_log_say_which_recipe_was_used(joint_run, tiny_cohort) -> None:
    from conftest import study_config

    from dfrn.workflows.report import training_words


    out, _, _ = joint_run
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "joint heads" in html and "AdamW" in html and "TorchIO" in html
    default = training_words(study_config(tiny_cohort).to_dict(), FACTORS)
    assert "network per symptom factor" in default and "Adam (lr 0.001)" in default
    assert "for 1 epoch (no early stopping)" in default  # val_fraction 0 in the fast config
    assert "channels × 0.125, as MONAI's widen_factor" in default  # the tests' narrow network
    paper = training_words(study_config(tiny_cohort, model={"widen_factor": 1.0}).to_dict(), FACTORS)
    assert "widen_factor" not in paper
    smoothed = training_words(study_config(tiny_cohort, training={
        "val_fraction": 0.1, "early_stopping": "smoothed", "min_epochs": 1}).to_dict(), FACTORS)
    assert "moving average" in smoothed and "stratified on the target" in smoothed


@pytest.mark.parametrize(("training", "sizes", "said", "not_said"), [
    # the paper's rule on training folds of 10: a split of 1 cannot stop anything (issue 26.4)
    ({"early_stopping": "val", "val_fraction": 0.1}, [10, 10],
     "for 5 epochs (no early stopping: a validation split of 0.1 × 10 training subjects "
     "holds 1, fewer than 2)", "early stopping on"),
    # the default on 150 training subjects: 15 < 20 validation subjects, so fixed epochs
    ({"val_fraction": 0.1}, [150, 150], "holds 15, fewer than 20)", "early stopping on"),
    ({"val_fraction": 0.1}, [250, 250], "early stopping on a moving average", "holds 25"),
    ({"early_stopping": "val", "val_fraction": 0.1}, [20, 10],
     "1 of 2 networks trained for 5 epochs without it", "no early stopping"),
])
def test_the_methods_say_whether_early_stopping_ran(tiny_cohort, training, sizes, said,
                                                     not_said) -> None:
    """Early stopping named in the Methods only where a validation split was held out."""
    from conftest import study_config

    cfg = study_config(tiny_cohort, training={"epochs": 5, "bn_stats": "recompute", **training})
    words = training_words(cfg.to_dict(), FACTORS, sizes)
    assert said in words and not_said not in words
    assert "BatchNorm statistics averaged" in words  # the default bn_stats = "recompute"


def test_every_training_key_reaches_the_regressor(tiny_cohort) -> None:
    from conftest import study_config

    from dfrn.workflows.study import make_estimator_factory

    cfg = study_config(tiny_cohort, training={"early_stopping": "smoothed", "min_epochs": 1,
                                              "augment": "light", "lr_schedule": "cosine",
                                              "weight_decay": 0.5, "val_split": "random"})
    params = make_estimator_factory(cfg, False, voxel_mm=8.0)(7, "x").get_params()
    assert params["seed"] == 7 and params["voxel_mm"] == 8.0
    assert params["widen_factor"] == NARROW and params["block_strides"] == (1, 2, 2, 2)
    for key, value in vars(cfg.training).items():
        if key not in ("seed", "n_seeds"):
            assert params[key] == value, key
