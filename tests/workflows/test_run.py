"""The pipeline end to end on a tiny synthetic cohort: outputs, resume, refusal, leakage."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dfrn.config import config_from_dict, load_config
from dfrn.errors import DfrnInputError, ResultsFolderError
from dfrn.evaluation.folds import make_fold_plan
from dfrn.models.regressor import DFRNRegressor
from dfrn.workflows.run import run_study


def _cfg(cohort, **over):
    raw = {
        "cohort": {
            "table": str(cohort.table),
            "targets": ["anhedonia", "sleep"],
            "mask": str(cohort.brain_mask),
        },
        "training": {"epochs": 1, "val_fraction": 0.0},
        "cv": {"n_folds": 2, "n_repeats": 1, "seed": 1},
        "baseline": {"enabled": False},
        "attention": {"enabled": False},
    }
    for section, values in over.items():
        raw.setdefault(section, {}).update(values)
    return config_from_dict(raw, cohort.root)


def test_pipeline_outputs_resume_and_refusal(tiny_cohort, tmp_path: Path) -> None:
    out = tmp_path / "res"
    logs: list[str] = []
    res = run_study(_cfg(tiny_cohort), out, progress=False, log=logs.append)
    for rel in ["cv/folds.tsv", "cv/predictions.tsv", "cv/metrics.tsv", "cv/table1.tsv",
                "figures/fig2_scatter.png", "config.toml", "environment.json", "run.json"]:
        assert (out / rel).is_file(), rel
    pred = pd.read_csv(out / "cv/predictions.tsv", sep="\t")
    assert list(pred.columns) == ["participant_id", "repeat", "fold", "factor", "y_true", "y_pred"]
    assert len(pred) == 12 * 2  # every subject once per factor and repeat
    metrics = pd.read_csv(out / "cv/metrics.tsv", sep="\t")
    assert list(metrics.columns) == ["repeat", "factor", "n", "pearson_r", "p_value", "r2", "mae", "rmse"]
    t1 = pd.read_csv(out / "cv/table1.tsv", sep="\t")
    assert list(t1.columns) == ["repeat", "anhedonia", "sleep"] and t1["repeat"].iloc[-1] == "mean ± sd"
    assert any("Table 1" in line for line in logs)
    # the resolved config reloads to the same fingerprint
    assert load_config(out / "config.toml").fingerprint() == _cfg(tiny_cohort).fingerprint()
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
    res2 = run_study(_cfg(tiny_cohort), out, progress=False, log=logs.append)
    assert res2.resumed
    assert "resuming: 3 of 4 tasks already finished, skipped" in logs
    assert (out / "cv/tasks/repeat-0_fold-0_sleep/model.pt").stat().st_mtime_ns == mtime
    assert not list((out / "cv/tasks").glob(".*.tmp"))
    pd.testing.assert_frame_equal(res.predictions, res2.predictions)  # identical after resume

    # a different config must not touch this folder
    with pytest.raises(ResultsFolderError, match="holds a run of a different config"):
        run_study(_cfg(tiny_cohort, training={"epochs": 2}), out, progress=False, log=logs.append)


def test_refuses_non_empty_foreign_folder(tiny_cohort, tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("precious")
    with pytest.raises(ResultsFolderError, match="not empty and holds no dfrn run"):
        run_study(_cfg(tiny_cohort), tmp_path, progress=False, log=lambda s: None)
    assert (tmp_path / "mine.txt").read_text() == "precious"


def test_fewer_subjects_than_folds(tiny_cohort, tmp_path: Path) -> None:
    with pytest.raises(DfrnInputError, match=r"12 subjects, fewer than cv.n_folds=20"):
        run_study(_cfg(tiny_cohort, cv={"n_folds": 20}), tmp_path / "o", progress=False)


def test_unknown_section_and_bad_values(tiny_cohort) -> None:
    with pytest.raises(DfrnInputError, match=r"unknown config section \[trainig\]"):
        config_from_dict({"cohort": {"table": "x", "targets": ["a"]}, "trainig": {}}, Path("."))
    with pytest.raises(DfrnInputError, match=r"\[training\] epochs must be an integer"):
        _cfg(tiny_cohort, training={"epochs": "ten"})


def test_training_is_reproducible_and_fold_local(tiny_cohort) -> None:
    """Same seed, same model; test subjects' volumes are never read while fitting."""
    vols = [np.random.default_rng(i).standard_normal((16, 16, 16)).astype(np.float32) for i in range(10)]
    y = np.arange(10, dtype=float)

    class Spy(list):
        seen: set[int] = set()

        def __getitem__(self, i):
            Spy.seen.add(i)
            return super().__getitem__(i)

    train = Spy(vols[:8])
    a = DFRNRegressor(epochs=1, seed=5, val_fraction=0.25).fit(train, y[:8])
    b = DFRNRegressor(epochs=1, seed=5, val_fraction=0.25).fit(vols[:8], y[:8])
    assert Spy.seen <= set(range(8))
    np.testing.assert_allclose(a.predict(vols[8:]), b.predict(vols[8:]), rtol=1e-5)
    assert a.y_mean_ == pytest.approx(np.mean(y[:8][np.setdiff1d(range(8), a.val_ids_)]))
    c = DFRNRegressor(epochs=1, seed=6, val_fraction=0.25).fit(vols[:8], y[:8])
    assert not np.allclose(a.predict(vols[8:]), c.predict(vols[8:]))


def test_checkpoint_roundtrip(tmp_path: Path) -> None:
    vols = [np.random.default_rng(i).standard_normal((16, 16, 16)).astype(np.float32) for i in range(6)]
    est = DFRNRegressor(epochs=1, seed=0, val_fraction=0.0).fit(vols, np.arange(6.0))
    est.save(tmp_path / "m.pt")
    back = DFRNRegressor.load(tmp_path / "m.pt")
    np.testing.assert_allclose(back.predict(vols), est.predict(vols), rtol=1e-6)


def test_fold_plan_is_seeded_and_subject_level() -> None:
    ids = [f"s{i}" for i in range(23)]
    a = make_fold_plan(ids, 5, 3, seed=7)
    assert a.equals(make_fold_plan(ids, 5, 3, seed=7))
    assert not a.equals(make_fold_plan(ids, 5, 3, seed=8))
    for _, g in a.groupby("repeat"):
        assert sorted(g["participant_id"]) == sorted(ids)
        assert g["fold"].value_counts().max() - g["fold"].value_counts().min() <= 1
    assert not a[a.repeat == 0]["fold"].equals(a[a.repeat == 1]["fold"].reset_index(drop=True))
