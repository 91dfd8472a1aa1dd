"""Repeated cross-validation of the network: one task per (repeat, fold, factor).

Each task trains one :class:`dfrn.training.DFRNRegressor` on the training subjects of a fold
(those with a value for that factor) and predicts its test subjects. A task writes its
folder ``cv/tasks/repeat-<r>_fold-<f>_<factor>/`` (``model.pt``, ``predictions.tsv``,
``history.tsv``, ``task.json``) under a temporary name and renames it into place when it
is complete, so a folder that exists is a finished task. A re-run skips finished tasks
and gives identical pooled predictions.

Targets come from a :class:`TargetProvider`, so derived targets that must be fitted inside
the training fold (``[factors] fit_on = "train"``) plug in without leaking test subjects.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd

from dfrn.folds import iter_splits
from dfrn.io import atomic_write_tsv, check_safe_id
from dfrn.stats import PREDICTION_COLUMNS

__all__ = [
    "Task",
    "TargetProvider",
    "StaticTargets",
    "plan_tasks",
    "run_task",
    "run_cv",
    "collect_predictions",
    "task_seed",
]


class TargetProvider(Protocol):
    """Gives the training and test targets of one split (index participant_id)."""

    def __call__(
        self, repeat: int, fold: int, train_ids: Sequence[str], test_ids: Sequence[str]
    ) -> tuple[pd.DataFrame, pd.DataFrame]: ...


@dataclass
class StaticTargets:
    """Targets fixed before cross-validation (a score column, or factors fitted on all)."""

    targets: pd.DataFrame

    def __call__(
        self, repeat: int, fold: int, train_ids: Sequence[str], test_ids: Sequence[str]
    ) -> tuple[pd.DataFrame, pd.DataFrame]:
        return self.targets.loc[list(train_ids)], self.targets.loc[list(test_ids)]


@dataclass(frozen=True)
class Task:
    repeat: int
    fold: int
    factor: str
    factor_index: int
    train_ids: tuple[str, ...]
    test_ids: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"repeat-{self.repeat}_fold-{self.fold}_{check_safe_id(self.factor, 'factor name')}"


def task_seed(base_seed: int, repeat: int, fold: int, factor_index: int) -> int:
    """A distinct, reproducible seed per task."""
    ss = np.random.SeedSequence([base_seed, repeat, fold, factor_index])
    return int(ss.generate_state(1)[0] & 0x7FFFFFFF)


def plan_tasks(plan: pd.DataFrame, factors: Sequence[str]) -> list[Task]:
    """All tasks in a fixed order: repeat, fold, factor."""
    tasks = []
    for r, f, train, test in iter_splits(plan):
        for k, factor in enumerate(factors):
            tasks.append(Task(r, f, factor, k, tuple(train), tuple(test)))
    return tasks


def run_task(
    task: Task,
    volumes: Sequence[np.ndarray],
    index_of: Callable[[Sequence[str]], list[int]],
    targets: TargetProvider,
    make_estimator: Callable[[int, str], object],
    base_seed: int,
    tasks_dir: Path,
) -> Path:
    """Train and evaluate one task; write its folder atomically; return the folder."""
    final = tasks_dir / task.name
    if final.is_dir():
        return final
    y_train_all, y_test_all = targets(task.repeat, task.fold, task.train_ids, task.test_ids)
    y_train = y_train_all[task.factor].dropna()
    y_test = y_test_all[task.factor].dropna()
    seed = task_seed(base_seed, task.repeat, task.fold, task.factor_index)
    est = make_estimator(seed, f"r{task.repeat} f{task.fold} {task.factor}")
    tr = index_of(list(y_train.index))
    te = index_of(list(y_test.index))
    est.fit(_Subset(volumes, tr), y_train.to_numpy())  # type: ignore[attr-defined]
    pred = est.predict(_Subset(volumes, te)) if te else np.zeros(0)  # type: ignore[attr-defined]
    tmp = Path(tempfile.mkdtemp(prefix=f".{task.name}.", suffix=".tmp", dir=tasks_dir))
    try:
        est.save(tmp / "model.pt")  # type: ignore[attr-defined]
        atomic_write_tsv(est.history_, tmp / "history.tsv")  # type: ignore[attr-defined]
        df = pd.DataFrame(
            {
                "participant_id": list(y_test.index),
                "repeat": task.repeat,
                "fold": task.fold,
                "factor": task.factor,
                "y_true": y_test.to_numpy(float),
                "y_pred": np.asarray(pred, dtype=float),
            },
            columns=PREDICTION_COLUMNS,
        )
        atomic_write_tsv(df, tmp / "predictions.tsv")
        meta = {
            "repeat": task.repeat,
            "fold": task.fold,
            "factor": task.factor,
            "seed": seed,
            "n_train": len(tr),
            "n_test": len(te),
            "best_epoch": int(getattr(est, "best_epoch_", -1)),
            "y_mean": float(est.y_mean_),  # type: ignore[attr-defined]
            "y_std": float(est.y_std_),  # type: ignore[attr-defined]
            "test_ids": list(y_test.index),
        }
        (tmp / "task.json").write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


class _Subset:
    """A view of some volumes, by position."""

    def __init__(self, volumes: Sequence[np.ndarray], idx: Sequence[int]) -> None:
        self.volumes = volumes
        self.idx = list(idx)

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.volumes[self.idx[i]]


def run_cv(
    tasks: Sequence[Task],
    volumes: Sequence[np.ndarray],
    index_of: Callable[[Sequence[str]], list[int]],
    targets: TargetProvider,
    make_estimator: Callable[[int, str], object],
    base_seed: int,
    cv_dir: Path,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> pd.DataFrame:
    """Run every unfinished task in order, then pool the predictions.

    Finished tasks (an existing task folder) are skipped and reported. Leftover temporary
    folders from an interrupted run are removed first.
    """
    from tqdm.auto import tqdm

    tasks_dir = cv_dir / "tasks"
    tasks_dir.mkdir(parents=True, exist_ok=True)
    for stale in tasks_dir.glob(".*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    done = [t for t in tasks if (tasks_dir / t.name).is_dir()]
    todo = [t for t in tasks if not (tasks_dir / t.name).is_dir()]
    if done:
        log(f"resuming: {len(done)} of {len(tasks)} tasks already finished, skipped")
    for t in tqdm(todo, desc="cv tasks", unit="task", disable=not progress):
        run_task(t, volumes, index_of, targets, make_estimator, base_seed, tasks_dir)
    return collect_predictions(tasks, cv_dir)


def collect_predictions(tasks: Sequence[Task], cv_dir: Path) -> pd.DataFrame:
    """Pool the predictions of finished tasks, in task order."""
    frames = []
    for t in tasks:
        p = cv_dir / "tasks" / t.name / "predictions.tsv"
        if p.is_file():
            frames.append(pd.read_csv(p, sep="\t", dtype={"participant_id": str}))
    if not frames:
        return pd.DataFrame(columns=PREDICTION_COLUMNS)
    return pd.concat(frames, ignore_index=True)[PREDICTION_COLUMNS]
