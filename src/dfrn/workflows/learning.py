"""``cv/learning.tsv``: whether each CV network learned, and the log's warnings.

Reads each finished task's ``history.tsv`` and ``task.json`` (verified), judges it with
:func:`dfrn.evaluation.learning.check_learning`, writes one row per (task, factor) and logs
one warning per factor whose networks did not learn, saying what to try.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

from dfrn.evaluation.learning import LEARNING_COLUMNS, check_learning, learning_warnings
from dfrn.evaluation.tasks import Task
from dfrn.io import atomic_write_tsv
from dfrn.workflows.results import ResultsFolder

__all__ = ["write_learning_table", "learning_rows", "train_sizes"]


def learning_rows(tasks: Sequence[Task], tasks_dir: Path, epochs: int,
                  mean_loss: float | None = 1.0) -> pd.DataFrame:
    """One row per (task, factor) with the learning verdict (:data:`LEARNING_COLUMNS`).

    ``mean_loss`` is the training loss of predicting the mean: 1.0 for z-scored targets
    (the default scaling), None when the targets are not scaled.
    """
    rows = []
    for task in tasks:
        folder = tasks_dir / task.name
        meta = json.loads((folder / "task.json").read_text(encoding="utf-8"))
        history = pd.read_csv(folder / "history.tsv", sep="\t")
        losses = history["train_loss"].to_numpy(float)
        best = int(meta.get("best_epoch", len(losses) - 1))
        verdict = check_learning(losses, best, epochs, mean_loss)
        stopping = meta.get("stopping", {})
        for factor in task.targets:
            rows.append({
                "factor": factor, "repeat": task.repeat, "fold": task.fold,
                "seed": task.seed_index, "task": task.name, "epochs": epochs,
                "epochs_trained": len(losses), "best_epoch": best,
                "first_train_loss": losses[0] if len(losses) else float("nan"),
                "kept_train_loss": losses[min(best, len(losses) - 1)] if len(losses) else
                float("nan"),
                "stopping": stopping.get("rule", ""), "learned": verdict.learned,
                "warning": verdict.warning,
            })
    return pd.DataFrame(rows, columns=list(LEARNING_COLUMNS))


def write_learning_table(folder: ResultsFolder, tasks: Sequence[Task], epochs: int,
                         log: Callable[[str], None], zscored: bool = True) -> pd.DataFrame:
    """Write ``cv/learning.tsv`` and log a warning per factor whose networks did not learn."""
    table = learning_rows(tasks, folder.tasks, epochs, 1.0 if zscored else None)
    atomic_write_tsv(table, folder.cv / "learning.tsv")
    for factor, text in learning_warnings(table).items():
        log(f"warning: {factor}: {text}")
    return table


def train_sizes(tasks: Sequence[Task], targets: pd.DataFrame) -> list[int]:
    """The training-set size of each task: the subjects with a value it trains on."""
    sizes = []
    for task in tasks:
        values = targets.loc[list(task.train_ids), list(task.targets)]
        sizes.append(int(values.notna().any(axis=1).sum() if task.joint
                         else values.iloc[:, 0].notna().sum()))
    return sizes
