"""Correctness of every number a study produces: each test fails on dfrn 0.1.0.

Batches that lose subjects, binary images trained as zeros, finished work that is not
verified, stale results after an input changed, and one-line errors where tracebacks were.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import NARROW, study_config

from dfrn.cli import main
from dfrn.config import config_from_dict
from dfrn.data.images import VolumeCache
from dfrn.data.synth import make_demo_atlases, make_synthetic_cohort
from dfrn.errors import DfrnInputError, ResultsFolderError, ResultsIntegrityError
from dfrn.evaluation.tasks import collect_predictions, plan_tasks
from dfrn.io import write_manifest
from dfrn.models.regressor import DFRNRegressor
from dfrn.workflows.run import run_study

QUIET = {"progress": False, "log": lambda s: None}


# -- 1. batches ---------------------------------------------------------------------------




@pytest.fixture(scope="module")
def cohort15(tmp_path_factory):
    """15 subjects: 3 folds of 5 (= 4k + 1) test subjects, 10 training subjects."""
    return make_synthetic_cohort(
        tmp_path_factory.mktemp("c15"), n_subjects=15, voxel_size=8.0, effect=0.4, radius=14.0,
        seed=5,
    )


def test_each_prediction_belongs_to_its_subject(cohort15, tmp_path: Path) -> None:
    """Predict every test subject alone from its saved fold model; compare with the TSV."""
    cfg = study_config(cohort15, cv={"n_folds": 3, "n_repeats": 1}, training={"epochs": 2})
    out = tmp_path / "res"
    res = run_study(cfg, out, **QUIET)
    pred = pd.read_csv(out / "cv/predictions.tsv", sep="\t", dtype={"participant_id": str})
    for factor, g in pred.groupby("factor"):
        assert sorted(g["participant_id"]) == sorted(res.cohort.participant_ids), factor
    volumes = res.study.volumes
    checked = 0
    for task in plan_tasks(res.plan, ["anhedonia", "sleep"]):
        assert len(task.test_ids) == 5
        model = DFRNRegressor.load(out / "cv/tasks" / task.name / "model.pt")
        rows = pred[(pred.fold == task.fold) & (pred.factor == task.factor)]
        for pid, y_pred in zip(rows["participant_id"], rows["y_pred"], strict=True):
            alone = model.predict([volumes[volumes.index_of([pid])[0]]])[0]
            assert alone == pytest.approx(y_pred, rel=1e-4, abs=1e-5), (task.name, pid)
            checked += 1
    assert checked == 30


# -- 2. binary images ---------------------------------------------------------------------
def _lesion_cohort(root: Path, n: int = 36, size: int = 16) -> tuple[Path, Path]:
    """Binary lesion maps whose lesion load drives the target."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    zz, yy, xx = np.mgrid[:size, :size, :size]
    brain = ((zz - 7.5) ** 2 + (yy - 7.5) ** 2 + (xx - 7.5) ** 2) < 7.5**2
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    nib.save(nib.Nifti1Image(brain.astype(np.uint8), affine), root / "mask.nii.gz")
    rows = []
    for i in range(n):
        radius = rng.uniform(0.5, 4.5)
        c = rng.uniform(5, 10, size=3)
        lesion = ((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) < radius**2
        lesion &= brain
        name = f"sub-{i:02d}_lesion.nii.gz"
        nib.save(nib.Nifti1Image(lesion.astype(np.float32), affine), root / name)
        load = float(lesion.sum())
        rows.append({"participant_id": f"sub-{i:02d}", "t1": name,
                     "load": load / 100 + 0.1 * rng.standard_normal()})
    pd.DataFrame(rows).to_csv(root / "cohort.tsv", sep="\t", index=False)
    return root / "cohort.tsv", root / "mask.nii.gz"


def test_binary_lesion_maps_predict_their_load(tmp_path: Path) -> None:
    table, mask = _lesion_cohort(tmp_path / "lesions")
    raw = {
        "cohort": {"table": str(table), "targets": ["load"], "mask": str(mask),
                   "intensity": "none"},
        "model": {"widen_factor": NARROW},
        "training": {"epochs": 12, "val_fraction": 0.0},
        "cv": {"n_folds": 3, "n_repeats": 1},
        "baseline": {"enabled": False},
        "attention": {"enabled": False},
        "final": {"enabled": False},
    }
    torch.manual_seed(0)
    res = run_study(config_from_dict(raw, tmp_path), tmp_path / "res", **QUIET)
    r = float(res.metrics["pearson_r"].iloc[0])
    assert r > 0.5, r
    # the same maps under the old rule (z-score of non-zero voxels inside the mask) were all 0;
    # now z-scoring uses every mask voxel and keeps the lesion
    vs = VolumeCache(tmp_path / "cache").prepare(
        ["a"], [tmp_path / "lesions/sub-00_lesion.nii.gz"], mask_path=mask, progress=False,
        intensity="zscore",
    )
    assert np.ptp(np.asarray(vs[0], dtype=np.float32)) > 0


# -- 3. finished tasks are verified -------------------------------------------------------
def test_damaged_tasks_are_rerun_and_collection_is_complete(cohort_copy, tmp_path: Path) -> None:
    out = tmp_path / "res"
    first = run_study(study_config(cohort_copy), out, **QUIET)
    tasks = out / "cv/tasks"
    (tasks / "repeat-0_fold-0_anhedonia/predictions.tsv").unlink()
    (tasks / "repeat-0_fold-1_sleep/model.pt").unlink()
    edited = tasks / "repeat-0_fold-1_anhedonia/predictions.tsv"
    df = pd.read_csv(edited, sep="\t", dtype={"participant_id": str})
    df.loc[0, "y_pred"] += 1.0
    df.to_csv(edited, sep="\t", index=False)
    untouched = (tasks / "repeat-0_fold-0_sleep/model.pt").stat().st_mtime_ns
    logs: list[str] = []
    second = run_study(study_config(cohort_copy), out, progress=False, log=logs.append)
    failed = [line for line in logs if "failed its check" in line]
    assert len(failed) == 3, logs
    assert any("repeat-0_fold-0_anhedonia" in f and "predictions.tsv is missing" in f for f in failed)
    assert any("repeat-0_fold-1_anhedonia" in f and "changed" in f for f in failed)
    assert "resuming: 1 of 4 tasks already finished, skipped" in logs
    assert (tasks / "repeat-0_fold-0_sleep/model.pt").stat().st_mtime_ns == untouched
    pd.testing.assert_frame_equal(first.predictions, second.predictions)
    assert len(second.predictions) == 24

    # a planned subject without a prediction (even with a consistent manifest) is an error
    folder = tasks / "repeat-0_fold-0_sleep"
    df = pd.read_csv(folder / "predictions.tsv", sep="\t", dtype={"participant_id": str})
    dropped = df["participant_id"].iloc[0]
    df.iloc[1:].to_csv(folder / "predictions.tsv", sep="\t", index=False)
    write_manifest(folder)
    with pytest.raises(ResultsIntegrityError, match=f"no prediction for {dropped}"):
        collect_predictions(plan_tasks(second.plan, ["anhedonia", "sleep"]), out / "cv",
                            second.targets)


def test_attention_on_a_deleted_model_is_one_line(cohort_copy, tmp_path: Path, capsys) -> None:
    out = tmp_path / "res"
    run_study(study_config(cohort_copy), out, **QUIET)
    (out / "cv/tasks/repeat-0_fold-1_sleep/model.pt").unlink()
    assert main(["attention", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "repeat-0_fold-1_sleep" in err[-1] and "model.pt is missing" in err[-1]


# -- 4. changed inputs --------------------------------------------------------------------
def test_changed_image_refuses_resume_and_later_stages(cohort_copy, tmp_path: Path) -> None:
    out = tmp_path / "res"
    run_study(study_config(cohort_copy), out, **QUIET)
    img_path = cohort_copy.root / "sub-0003_T1w.nii.gz"
    img = nib.load(img_path)
    data = np.asarray(img.dataobj, dtype=np.float32) * 1.5
    nib.save(nib.Nifti1Image(data, img.affine), img_path)
    with pytest.raises(ResultsFolderError, match=r"participant sub-0003 T1 changed .*sub-0003_T1w"):
        run_study(study_config(cohort_copy), out, **QUIET)
    with pytest.raises(ResultsFolderError, match="participant sub-0003 T1 changed"):
        from dfrn.workflows.attention import run_attention_stage

        run_attention_stage(out, **QUIET)


# -- 5. targets ---------------------------------------------------------------------------
def _table_with(cohort, tmp_path: Path, **columns) -> Path:
    df = pd.read_csv(cohort.table, sep="\t")
    for col in ("t1", "gm"):
        df[col] = [str(cohort.root / p) for p in df[col]]
    for name, values in columns.items():
        df[name] = values
    path = tmp_path / "table.tsv"
    df.to_csv(path, sep="\t", index=False)
    return path


def _run_cli(cfg_text: str, tmp_path: Path, capsys) -> tuple[int, list[str]]:
    (tmp_path / "s.toml").write_text(cfg_text)
    rc = main(["run", str(tmp_path / "s.toml"), "--out", str(tmp_path / "o"), "--no-progress"])
    return rc, capsys.readouterr().err.strip().splitlines()


BASE = '[cohort]\ntable = "table.tsv"\nmask = "{mask}"\n{extra}\n[cv]\nn_folds = 2\nn_repeats = 1\n' \
       '[model]\nwiden_factor = 0.125\n[training]\nepochs = 1\n[baseline]\nenabled = false\n[attention]\nenabled = false\n'


def test_constant_target_is_one_line(tiny_cohort, tmp_path: Path, capsys) -> None:
    _table_with(tiny_cohort, tmp_path, flat=[3.0] * 12)
    rc, err = _run_cli(BASE.format(mask=tiny_cohort.brain_mask, extra='targets = ["sleep", "flat"]'),
                       tmp_path, capsys)
    assert rc == 2 and len(err) == 1 and "factor 'flat' is constant" in err[0]
    assert not (tmp_path / "o").exists()  # a failed input check leaves nothing behind


def test_infinite_target_is_one_line(tiny_cohort, tmp_path: Path, capsys) -> None:
    values = [1.0] * 12
    values[4] = "inf"
    _table_with(tiny_cohort, tmp_path, bad=values)
    rc, err = _run_cli(BASE.format(mask=tiny_cohort.brain_mask, extra='targets = ["bad"]'),
                       tmp_path, capsys)
    assert rc == 2 and len(err) == 1
    assert "infinite value 'inf' for participant sub-0005" in err[0]


def test_too_few_training_values_in_a_fold(tiny_cohort, tmp_path: Path, capsys) -> None:
    values = [np.nan] * 12
    values[0], values[1] = 1.0, 2.0
    _table_with(tiny_cohort, tmp_path, sparse=values)
    rc, err = _run_cli(BASE.format(mask=tiny_cohort.brain_mask, extra='targets = ["sparse"]'),
                       tmp_path, capsys)
    assert rc == 2 and err[0].startswith("dfrn: warning: target 'sparse': 10 of 12")
    assert len(err) == 2 and err[1].startswith("dfrn: error: factor 'sparse' has")
    assert "in the training part of repeat 0, fold" in err[1]




@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_checked_before_caching(tiny_cohort, tmp_path: Path, capsys) -> None:
    with pytest.raises(DfrnInputError, match="'cuda:banana' is not valid"):
        study_config(tiny_cohort, training={"device": "cuda:banana"})
    cfg = study_config(tiny_cohort, training={"device": "cuda"})
    with pytest.raises(DfrnInputError, match="CUDA is not available on this machine"):
        run_study(cfg, tmp_path / "o", **QUIET)
    assert not (tmp_path / "o").exists()  # nothing cached, nothing written


# -- robustness ---------------------------------------------------------------------------
def test_failed_input_check_leaves_no_identity(cohort_copy, tmp_path: Path) -> None:
    """A refused run does not block the fixed one (the cache may stay: it is content keyed)."""
    bad = cohort_copy.root / "sub-0002_T1w.nii.gz"
    good = bad.read_bytes()
    img = nib.load(bad)
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.float32), img.affine), bad)
    out = tmp_path / "res"
    with pytest.raises(DfrnInputError, match="participant sub-0002"):
        run_study(study_config(cohort_copy), out, **QUIET)
    assert not (out / "run.json").exists()
    assert {p.name for p in out.iterdir()} <= {"cache"}
    bad.write_bytes(good)
    res = run_study(study_config(cohort_copy), out, **QUIET)
    assert not res.resumed and len(res.predictions) == 24


def test_moved_folder_resumes_and_serves_later_stages(cohort_copy, tmp_path: Path) -> None:
    out = tmp_path / "res"
    first = run_study(study_config(cohort_copy), out, **QUIET)
    moved = tmp_path / "elsewhere" / "res2"
    moved.parent.mkdir()
    shutil.move(out, moved)
    logs: list[str] = []
    again = run_study(study_config(cohort_copy), moved, progress=False, log=logs.append)
    assert again.resumed and "resuming: 4 of 4 tasks already finished, skipped" in logs
    pd.testing.assert_frame_equal(first.predictions, again.predictions)
    # the cohort moved too: the content is the same, so the run is the same
    shutil.move(cohort_copy.root, tmp_path / "cohort_moved")
    new_root = tmp_path / "cohort_moved"
    moved_cohort = dataclasses.replace(
        cohort_copy, root=new_root, table=new_root / cohort_copy.table.name,
        brain_mask=new_root / cohort_copy.brain_mask.name,
    )
    third = run_study(study_config(moved_cohort), moved, **QUIET)
    assert third.resumed
    # a later stage on the moved folder, reading the moved cohort through its config
    from dfrn.config import load_config
    from dfrn.workflows.baseline import run_baseline_stage

    cfg_text = (moved / "config.toml").read_text().replace(str(cohort_copy.root), str(new_root))
    (moved / "config.toml").write_text(cfg_text)
    assert load_config(moved / "config.toml").fingerprint() == study_config(moved_cohort).fingerprint()
    atlases = make_demo_atlases(moved_cohort, n_parcels=8, seed=0)
    base = run_baseline_stage(
        moved, progress=False, log=lambda s: None, n_permutations=0,
        atlas=str(atlases["parcellation"]),
        atlas_labels=str(atlases["parcellation"].with_name("parcellation_dseg.tsv")),
    )
    assert len(base["predictions"]) == 24


def test_results_follow_the_umask(cohort_copy, tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        out = tmp_path / "res"
        run_study(study_config(cohort_copy), out, **QUIET)
    finally:
        os.umask(old)
    task = out / "cv/tasks/repeat-0_fold-0_sleep"
    for path in (out / "run.json", out / "cv/predictions.tsv", task / "model.pt",
                 task / "manifest.json", out / "figures/fig2_scatter.png"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    for path in (task, out / "cv/tasks", out / "cache"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o755, path


def test_task_manifest_lists_every_file(cohort_copy, tmp_path: Path) -> None:
    out = tmp_path / "res"
    run_study(study_config(cohort_copy), out, **QUIET)
    folder = out / "cv/tasks/repeat-0_fold-0_anhedonia"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert sorted(manifest["files"]) == ["history.tsv", "model.pt", "predictions.tsv", "task.json"]
    from dfrn.io import file_digest

    for name, entry in manifest["files"].items():
        assert entry["size"] == (folder / name).stat().st_size
        assert entry["sha256"] == file_digest(folder / name)


def test_unexpected_exception_is_one_line_with_a_log(cohort_copy, tmp_path: Path, capsys,
                                                     monkeypatch) -> None:
    import dfrn.workflows.run

    def boom(*a, **k):
        raise ZeroDivisionError("planted bug")

    monkeypatch.setattr(dfrn.workflows.run, "run_study", boom)
    cfg = tmp_path / "s.toml"
    cfg.write_text(study_config(cohort_copy).to_toml())
    (tmp_path / "o").mkdir()
    assert main(["run", str(cfg), "--out", str(tmp_path / "o"), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ZeroDivisionError: planted bug" in err[0]
    log = Path(err[0].split("traceback is in ")[1].split(";")[0])
    assert log.parent == tmp_path / "o" / "logs"
    assert "Traceback" in log.read_text() and "boom" in log.read_text()
