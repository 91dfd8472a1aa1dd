"""The pipeline end to end on a tiny synthetic cohort: outputs, resume, refusal, leakage."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import study_config

from dfrn.config import load_config
from dfrn.errors import DfrnInputError, ResultsFolderError
from dfrn.workflows.run import run_study


def test_pipeline_outputs_resume_and_refusal(tiny_cohort, tmp_path: Path) -> None:
    out = tmp_path / "res"
    logs: list[str] = []
    res = run_study(study_config(tiny_cohort), out, progress=False, log=logs.append)
    for rel in ["cv/folds.tsv", "cv/predictions.tsv", "cv/metrics.tsv", "cv/table1.tsv",
                "figures/fig2_scatter.png", "config.toml", "environment.json", "run.json"]:
        assert (out / rel).is_file(), rel
    pred = pd.read_csv(out / "cv/predictions.tsv", sep="\t")
    assert list(pred.columns) == ["participant_id", "repeat", "fold", "factor", "y_true", "y_pred"]
    assert len(pred) == 12 * 2  # every subject once per factor and repeat
    metrics = pd.read_csv(out / "cv/metrics.tsv", sep="\t")
    assert list(metrics.columns) == ["repeat", "factor", "n", "pearson_r", "p_value", "r2", "mae",
                                     "rmse", "ci_low", "ci_high"]
    t1 = pd.read_csv(out / "cv/table1.tsv", sep="\t")
    assert list(t1.columns) == ["repeat", "anhedonia", "sleep"]
    assert t1["repeat"].iloc[-1] == "mean ± sd [95% CI]"
    assert any("Table 1" in line for line in logs)
    # the resolved config reloads to the same fingerprint
    assert load_config(out / "config.toml").fingerprint() == study_config(tiny_cohort).fingerprint()
    tasks = sorted(p.name for p in (out / "cv/tasks").iterdir())
    assert tasks == [
        "repeat-0_fold-0_anhedonia", "repeat-0_fold-0_sleep",
        "repeat-0_fold-1_anhedonia", "repeat-0_fold-1_sleep",
    ]
    # interrupt: one task lost, plus a half-written temporary folder
    shutil.rmtree(out / "cv/tasks/repeat-0_fold-1_sleep")
    (out / "cv/tasks/.repeat-0_fold-1_sleep.abc.tmp").mkdir()
    mtime = (out / "cv/tasks/repeat-0_fold-0_sleep/model.pt").stat().st_mtime_ns
    logs.clear()
    res2 = run_study(study_config(tiny_cohort), out, progress=False, log=logs.append)
    assert res2.resumed
    assert "resuming: 3 of 4 tasks already finished, skipped" in logs
    assert (out / "cv/tasks/repeat-0_fold-0_sleep/model.pt").stat().st_mtime_ns == mtime
    assert not list((out / "cv/tasks").glob(".*.tmp"))
    pd.testing.assert_frame_equal(res.predictions, res2.predictions)  # identical after resume

    # a different config must not touch this folder
    with pytest.raises(ResultsFolderError, match="holds a run of a different config"):
        run_study(study_config(tiny_cohort, training={"epochs": 2}), out, progress=False, log=logs.append)


def test_refuses_non_empty_foreign_folder(tiny_cohort, tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("precious")
    with pytest.raises(ResultsFolderError, match="not empty and holds no dfrn run"):
        run_study(study_config(tiny_cohort), tmp_path, progress=False, log=lambda s: None)
    assert (tmp_path / "mine.txt").read_text() == "precious"


def test_fewer_subjects_than_folds(tiny_cohort, tmp_path: Path) -> None:
    with pytest.raises(DfrnInputError, match=r"12 subjects, fewer than cv.n_folds=20"):
        run_study(study_config(tiny_cohort, cv={"n_folds": 20}), tmp_path / "o", progress=False)










def test_na_like_participant_ids_survive_the_whole_run(cohort_copy, tmp_path: Path) -> None:
    """IDs "NA" and "None" are IDs in every table dfrn writes and reads back."""
    from dfrn.data.cohort import read_delimited

    df = pd.read_csv(cohort_copy.table, sep="\t", dtype=str, keep_default_na=False)
    df.loc[:1, "participant_id"] = ["NA", "None"]
    df.to_csv(cohort_copy.table, sep="\t", index=False)
    out = tmp_path / "res"
    run_study(study_config(cohort_copy), out, progress=False, log=lambda _m: None)
    pred = read_delimited(out / "cv/predictions.tsv")
    assert {"NA", "None"} <= set(pred["participant_id"])
    assert pred.groupby("factor")["participant_id"].nunique().eq(12).all()
    truth = df.set_index("participant_id")["sleep"].astype(float)
    sleep = pred[pred["factor"] == "sleep"].set_index("participant_id")["y_true"]
    pd.testing.assert_series_equal(sleep.sort_index(), truth.loc[sleep.index].sort_index(),
                                   check_names=False)
