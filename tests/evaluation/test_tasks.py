"""CV tasks: task seeds, verified task folders and complete pooling (no cohort needed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dfrn.errors import ResultsIntegrityError
from dfrn.evaluation.folds import make_fold_plan
from dfrn.evaluation.tasks import collect_predictions, plan_tasks, run_cv, task_seed, verify_task
from dfrn.targets.providers import StaticTargets


class _Mean:
    """A stand-in estimator: predicts the training mean (fit/predict/save like DFRNRegressor)."""

    def __init__(self, seed: int, desc: str) -> None:
        self.seed = seed

    def fit(self, volumes, y):
        self.y_mean_, self.y_std_ = float(np.mean(y)), 1.0
        self.history_ = pd.DataFrame({"epoch": [0], "train_loss": [0.0]})
        return self

    def predict(self, volumes):
        return np.full(len(volumes), self.y_mean_)

    def save(self, path: Path) -> None:
        Path(path).write_bytes(b"weights")


def _study(tmp_path: Path):
    ids = [f"s{i:02d}" for i in range(9)]
    targets = pd.DataFrame({"a": np.arange(9.0), "b": [1.0, np.nan, 3, 4, 5, 6, 7, 8, 9]},
                           index=ids)
    plan = make_fold_plan(ids, 3, 1, seed=0)
    tasks = plan_tasks(plan, ["a", "b"])
    volumes = [np.zeros((2, 2, 2))] * 9
    pred = run_cv(tasks, volumes, lambda x: [ids.index(i) for i in x], StaticTargets(targets),
                  _Mean, 0, tmp_path / "cv", progress=False, log=lambda s: None, expected=targets)
    return ids, targets, tasks, pred


def test_every_planned_prediction_once(tmp_path: Path) -> None:
    ids, targets, tasks, pred = _study(tmp_path)
    assert sorted(pred[pred.factor == "a"].participant_id) == ids
    assert sorted(pred[pred.factor == "b"].participant_id) == [i for i in ids if i != "s01"]
    seeds = {task_seed(0, t.repeat, t.fold, t.factor_index) for t in tasks}
    assert len(seeds) == len(tasks)  # one seed per task


def test_pooling_names_what_is_missing_or_foreign(tmp_path: Path) -> None:
    ids, targets, tasks, _ = _study(tmp_path)
    more = targets.copy()
    more.loc["s01", "b"] = 2.0  # s01 now has a value, but no task predicted it
    with pytest.raises(ResultsIntegrityError, match="no prediction for s01"):
        collect_predictions(tasks, tmp_path / "cv", more)
    fewer = targets.copy()
    fewer.loc["s00", "a"] = np.nan
    with pytest.raises(ResultsIntegrityError, match="unexpected subjects s00"):
        collect_predictions(tasks, tmp_path / "cv", fewer)


def test_task_json_of_another_task_fails_the_check(tmp_path: Path) -> None:
    _, _, tasks, _ = _study(tmp_path)
    folder = tmp_path / "cv/tasks" / tasks[0].name
    assert verify_task(folder, tasks[0]) is None
    assert verify_task(folder, tasks[1]) == "task.json describes another task"
    meta = json.loads((folder / "task.json").read_text())
    meta["fold"] = 99
    (folder / "task.json").write_text(json.dumps(meta))
    assert "task.json has changed" in verify_task(folder, tasks[0])
