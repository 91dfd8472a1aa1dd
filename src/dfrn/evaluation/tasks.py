"""Repeated cross-validation of the network: one task per (repeat, fold, factor, seed).

Each task trains one :class:`dfrn.models.regressor.DFRNRegressor` on the training subjects of a fold
(those with a value for that factor) and predicts its test subjects. With
``[model] heads = "joint"`` a task trains one network for all factors (one task per fold;
subjects with a value for any factor; a missing factor masks its loss term) and writes one
row per factor and subject. With ``[training] n_seeds`` > 1 each seed is a task of its own
(``…_seed-<s>``; seed 0 keeps the plain name) and the pooled predictions are the seeds' mean.
:class:`FactorNetwork` names one trained network's view of one factor, for the stages that
read the networks back (attention, ablation, model packages). A task writes its
folder ``cv/tasks/repeat-<r>_fold-<f>_<factor>/`` (``model.pt``, ``predictions.tsv``,
``history.tsv``, ``task.json``) under a temporary name and renames it into place when it
is complete, with a ``manifest.json`` (size and SHA-256 of every file). On a re-run, a task
counts as finished only when its folder passes that check; a folder that fails (a missing or
edited file) is re-run, and the log says so. Pooling then fails, naming the task and the
subjects, if any planned (repeat, fold, factor, subject) has no prediction.

Tasks run through an executor (:mod:`dfrn.executors`): in this process, or as
Ray tasks. Each runs :func:`run_task_job` on a :class:`TaskJob` (paths of the cached
volumes, the targets, the estimator's settings, the tasks folder) and writes only its own
folder; a retried task whose folder is already in place and intact counts as done, and two
workers never rename into one final folder twice.

Targets come from a :class:`TargetProvider`, so derived targets that must be fitted inside
the training fold (``[factors] fit_on = "train"``) plug in without leaking test subjects.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from dfrn.data.cohort import read_delimited
from dfrn.errors import ResultsIntegrityError
from dfrn.evaluation.folds import iter_splits
from dfrn.evaluation.metrics import PREDICTION_COLUMNS
from dfrn.io import (
    atomic_write_json,
    atomic_write_tsv,
    check_safe_id,
    make_temp_dir,
    verify_manifest,
    write_manifest,
)
from dfrn.targets.providers import TargetProvider

if TYPE_CHECKING:
    from dfrn.executors import Executor

__all__ = [
    "Task",
    "plan_tasks",
    "run_task",
    "run_cv",
    "collect_predictions",
    "verify_task",
    "read_task_meta",
    "task_seed",
    "TaskJob",
    "run_task_job",
    "FactorNetwork",
    "factor_networks",
    "network_factors",
]


@dataclass(frozen=True)
class Task:
    """One network to train: a fold of a repeat, its factor (or all, jointly) and its seed."""

    repeat: int
    fold: int
    factor: str
    factor_index: int
    train_ids: tuple[str, ...]
    test_ids: tuple[str, ...]
    factors: tuple[str, ...] = ()
    """The factors of a joint network, in output order (empty: one network, one factor)."""
    seed_index: int = 0

    @property
    def joint(self) -> bool:
        return bool(self.factors)

    @property
    def targets(self) -> tuple[str, ...]:
        """The factors this task's network predicts, in output order."""
        return self.factors if self.factors else (self.factor,)

    @property
    def name(self) -> str:
        head = "heads-joint" if self.joint else check_safe_id(self.factor, "factor name")
        seed = f"_seed-{self.seed_index}" if self.seed_index else ""
        return f"repeat-{self.repeat}_fold-{self.fold}_{head}{seed}"


JOINT = "joint"  # the ``factor`` of a joint task


def task_seed(base_seed: int, repeat: int, fold: int, factor_index: int,
              seed_index: int = 0) -> int:
    """A distinct, reproducible seed per task (seed 0 keeps the seed of earlier versions)."""
    key = [base_seed, repeat, fold, factor_index] + ([seed_index] if seed_index else [])
    ss = np.random.SeedSequence(key)
    return int(ss.generate_state(1)[0] & 0x7FFFFFFF)


def plan_tasks(plan: pd.DataFrame, factors: Sequence[str], heads: str = "separate",
               n_seeds: int = 1) -> list[Task]:
    """All tasks in a fixed order: repeat, fold, factor (one joint task), seed."""
    for f in factors:
        check_safe_id(f, "factor name")
    tasks = []
    for r, f, train, test in iter_splits(plan):
        groups = [(JOINT, 0, tuple(factors))] if heads == "joint" else [
            (factor, k, ()) for k, factor in enumerate(factors)]
        for factor, k, joint in groups:
            for s in range(n_seeds):
                tasks.append(Task(r, f, factor, k, tuple(train), tuple(test), joint, s))
    return tasks


@dataclass(frozen=True)
class FactorNetwork:
    """One trained network's view of one factor: a task, and which output is the factor."""

    task: Task
    factor: str

    @property
    def output(self) -> int | None:
        """The factor's output of a joint network (None for a network of its own)."""
        return self.task.targets.index(self.factor) if self.task.joint else None

    @property
    def name(self) -> str:
        """A folder name unique per (repeat, fold, factor, seed)."""
        t = self.task
        if not t.joint:
            return t.name
        seed = f"_seed-{t.seed_index}" if t.seed_index else ""
        return f"repeat-{t.repeat}_fold-{t.fold}_{self.factor}_heads-joint{seed}"

    def load(self, tasks_dir: Path, device: str = "cpu") -> Any:
        """The network as a one-output :class:`~dfrn.models.regressor.DFRNRegressor`."""
        from dfrn.models.regressor import DFRNRegressor

        return DFRNRegressor.load(Path(tasks_dir) / self.task.name / "model.pt", device=device,
                                  output=self.output)

    def meta(self, tasks_dir: Path) -> dict:
        """The task's verified ``task.json``, with this factor's scaling and covariate fit."""
        meta = read_task_meta(Path(tasks_dir) / self.task.name, self.task)
        k = self.output
        if k is None:
            return meta
        fits = meta.get("confound_fit") or {}
        return {**meta, "factor": self.factor, "y_mean": meta["y_mean"][k],
                "y_std": meta["y_std"][k], "confound_fit": fits.get(self.factor),
                "test_ids": meta["test_ids_by_factor"][self.factor]}


def network_factors(tasks_dir: Path, plan: pd.DataFrame, factors: Sequence[str],
                    heads: str = "separate") -> list[str]:
    """The study's factors in the order its tasks were planned (a joint network's outputs).

    ``factors`` are the study's factors in any order (e.g. as they appear in the pooled
    predictions, where a factor with no test subject in the first fold comes later). For
    joint heads the order is read from the first fold's verified ``task.json``.
    """
    if heads != "joint":
        return list(factors)
    r, f, train, test = next(iter(iter_splits(plan)))
    probe = Task(r, f, JOINT, 0, tuple(train), tuple(test), factors=tuple(factors))
    folder = Path(tasks_dir) / probe.name
    reason = verify_manifest(folder, required=TASK_FILES) if folder.is_dir() else "it is missing"
    if reason:
        raise ResultsIntegrityError(
            f"task {probe.name} in {tasks_dir} is not intact ({reason}); rerun 'dfrn run' with "
            "the same config and --out to redo it"
        )
    order = [str(x) for x in json.loads((folder / "task.json").read_text("utf-8"))["factors"]]
    if sorted(order) != sorted(map(str, factors)):
        raise ResultsIntegrityError(
            f"task {probe.name} predicts {', '.join(order)} but the study's predictions hold "
            f"{', '.join(sorted(map(str, factors)))}; rerun 'dfrn run' into a new --out"
        )
    return order


def factor_networks(plan: pd.DataFrame, factor: str, factors: Sequence[str],
                    heads: str = "separate", n_seeds: int = 1) -> list[FactorNetwork]:
    """Every trained network of ``factor``: one per (repeat, fold, seed), in plan order."""
    return [FactorNetwork(t, factor) for t in plan_tasks(plan, factors, heads, n_seeds)
            if factor in t.targets]


TASK_FILES = ("model.pt", "history.tsv", "predictions.tsv", "task.json")


def _task_targets(task: Task, targets: TargetProvider) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The task's training and test targets: one column per factor it predicts; the rows
    with a value for at least one of them."""
    y_train_all, y_test_all = targets(task.repeat, task.fold, task.train_ids, task.test_ids)
    cols = list(task.targets)
    return y_train_all[cols].dropna(how="all"), y_test_all[cols].dropna(how="all")


def _prediction_rows(task: Task, y_test: pd.DataFrame, pred: np.ndarray) -> pd.DataFrame:
    """One row per (factor, test subject with a value for that factor)."""
    frames = []
    for k, factor in enumerate(task.targets):
        has = y_test[factor].notna().to_numpy()
        frames.append(pd.DataFrame({
            "participant_id": list(y_test.index[has]), "repeat": task.repeat,
            "fold": task.fold, "factor": factor,
            "y_true": y_test[factor].to_numpy(float)[has], "y_pred": pred[has, k],
        }, columns=PREDICTION_COLUMNS))
    return pd.concat(frames, ignore_index=True)


def _task_meta(task: Task, est: Any, seed: int, n_train: int, y_test: pd.DataFrame,
               targets: TargetProvider) -> dict:
    meta = {
        "repeat": task.repeat, "fold": task.fold, "factor": task.factor, "seed": seed,
        "n_train": n_train, "n_test": len(y_test),
        "best_epoch": int(getattr(est, "best_epoch_", -1)),
        "epochs_trained": len(getattr(est, "history_", ())),
        "y_mean": np.asarray(est.y_mean_).tolist(), "y_std": np.asarray(est.y_std_).tolist(),
        "test_ids": list(y_test.index),
    }
    if task.joint:
        meta.update(factors=list(task.factors), seed_index=task.seed_index,
                    test_ids_by_factor={f: list(y_test.index[y_test[f].notna().to_numpy()])
                                        for f in task.factors})
    elif task.seed_index:
        meta["seed_index"] = task.seed_index
    plan = getattr(est, "stopping_", None)
    if plan is not None:  # the rule that ran, and why it is not the one asked for
        meta["stopping"] = {"rule": plan.rule, "n_val": plan.n_val, "reason": plan.reason}
    fits = getattr(targets, "fits", None)
    if fits is not None:  # residualised targets: the fold's covariate fit, for packages
        fold_fits = fits(task.repeat, task.fold, task.train_ids, task.test_ids)
        meta["confound_fit"] = ({f: fold_fits[f].to_dict() for f in task.factors}
                                if task.joint else fold_fits[task.factor].to_dict())
    return meta


def run_task(
    task: Task,
    volumes: Sequence[np.ndarray],
    index_of: Callable[[Sequence[str]], list[int]],
    targets: TargetProvider,
    make_estimator: Callable[[int, str], object],
    base_seed: int,
    tasks_dir: Path,
) -> Path:
    """Train and evaluate one task; write its folder atomically; return the folder.

    The folder is built under a temporary name, gets a ``manifest.json`` (size and SHA-256
    of every file), and is renamed into place only when complete. An existing folder that
    passes :func:`verify_task` is kept; one that fails is replaced.
    """
    final = tasks_dir / task.name
    if final.is_dir() and verify_task(final, task) is None:
        return final
    y_train, y_test = _task_targets(task, targets)
    seed = task_seed(base_seed, task.repeat, task.fold, task.factor_index, task.seed_index)
    what = "all factors (joint)" if task.joint else f"factor {task.factor}"
    seed_text = f", seed {task.seed_index}" if task.seed_index else ""
    est: Any = make_estimator(seed, f"repeat {task.repeat}, fold {task.fold}, {what}{seed_text}")
    tr, te = index_of(list(y_train.index)), index_of(list(y_test.index))
    y_fit = y_train.to_numpy(float) if task.joint else y_train[task.factor].to_numpy(float)
    est.fit(_Subset(volumes, tr), y_fit)
    pred = np.asarray(est.predict(_Subset(volumes, te)) if te else np.zeros(0), dtype=float)
    if pred.size == len(te) * len(task.targets):
        pred = pred.reshape(len(te), len(task.targets))
    if pred.shape != (len(te), len(task.targets)):
        raise ResultsIntegrityError(
            f"task {task.name}: {pred.shape} predictions for {len(te)} test subjects"
        )
    tmp = make_temp_dir(tasks_dir, task.name)
    try:
        est.save(tmp / "model.pt")
        atomic_write_tsv(est.history_, tmp / "history.tsv")
        atomic_write_tsv(_prediction_rows(task, y_test, pred), tmp / "predictions.tsv")
        atomic_write_json(tmp / "task.json", _task_meta(task, est, seed, len(tr), y_test, targets))
        write_manifest(tmp)
        _place(tmp, final, task, tasks_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _place(tmp: Path, final: Path, task: Task, tasks_dir: Path) -> None:
    """Rename a complete ``tmp`` into ``final``, once.

    When another worker (a retried or duplicated run of the same task) put an intact folder
    there first, that one is kept and ``tmp`` is dropped; a folder that fails its check is
    moved aside and replaced.
    """
    if final.exists():
        if verify_task(final, task) is None:
            shutil.rmtree(tmp, ignore_errors=True)
            return
        stale = make_temp_dir(tasks_dir, f"{task.name}.stale")
        try:
            os.replace(final, stale / task.name)
        except FileNotFoundError:
            pass
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.replace(tmp, final)  # fails on a non-empty folder put there meanwhile
    except OSError:
        if final.is_dir() and verify_task(final, task) is None:
            shutil.rmtree(tmp, ignore_errors=True)
            return
        raise


def verify_task(folder: Path, task: Task) -> str | None:
    """None when ``folder`` is the intact result of ``task``, else the reason it is not.

    Checks every file against the folder's manifest, and that ``task.json`` describes this
    (repeat, fold, factor) with test subjects drawn from this fold's test subjects.
    """
    if not folder.is_dir():
        return "its folder is missing"
    reason = verify_manifest(folder, required=TASK_FILES)
    if reason:
        return reason
    try:
        meta = json.loads((folder / "task.json").read_text(encoding="utf-8"))
    except Exception:
        return "task.json is unreadable"
    if (meta.get("repeat"), meta.get("fold"), meta.get("factor"), meta.get("seed_index", 0)) != (
        task.repeat, task.fold, task.factor, task.seed_index
    ) or meta.get("factors", []) != list(task.factors):
        return "task.json describes another task"
    if not set(meta.get("test_ids", [])) <= set(task.test_ids):
        return "its test subjects are not this fold's"
    return None


def read_task_meta(folder: Path, task: Task) -> dict:
    """``task.json`` of a verified task folder; a one-line error when the task is not intact."""
    reason = verify_task(folder, task)
    if reason:
        raise ResultsIntegrityError(
            f"task {task.name} in {folder.parent} is not intact ({reason}); rerun 'dfrn run' "
            "with the same config and --out to redo it"
        )
    return json.loads((folder / "task.json").read_text(encoding="utf-8"))


class _Subset:
    """A view of some volumes, by position."""

    def __init__(self, volumes: Sequence[np.ndarray], idx: Sequence[int]) -> None:
        self.volumes = volumes
        self.idx = list(idx)

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.volumes[self.idx[i]]


@dataclass(frozen=True)
class TaskJob:
    """What every CV task of one run shares: paths and settings, no training arrays.

    Attributes
    ----------
    volumes : sequence of arrays
        The cohort's network inputs; a :class:`dfrn.data.images.VolumeSet` holds only the
        paths of its cached ``.npy`` files, which a worker memory-maps.
    targets : TargetProvider
        The targets (a table of scores, or the per-fold factor fits).
    make_estimator : callable
        ``make_estimator(seed, desc)`` returns an unfitted estimator (the training config).
    base_seed : int
        ``[training] seed``.
    tasks_dir : Path
        The folder of the task folders (``cv/tasks``), on storage every worker sees.
    probe : tuple of str, optional
        ``(path, token)`` of the driver's storage probe; checked first by each task.
    """

    volumes: Sequence[np.ndarray]
    targets: TargetProvider
    make_estimator: Callable[[int, str], object]
    base_seed: int
    tasks_dir: Path
    probe: tuple[str, str] | None = None


def run_task_job(job: TaskJob, task: Task) -> str:
    """Run one task of ``job`` (pure and idempotent: it writes only the task's folder).

    Returns the task's name; the driver reads the folder. An intact folder already in place
    (a retry after the first run renamed it) is kept as it is.
    """
    if job.probe is not None:
        from dfrn.executors import check_storage_probe

        check_storage_probe(*job.probe)
    index_of = getattr(job.volumes, "index_of", None)
    if index_of is None:
        raise TypeError("TaskJob.volumes needs an index_of(ids) method")
    run_task(task, job.volumes, index_of, job.targets, job.make_estimator, job.base_seed,
             Path(job.tasks_dir))
    return task.name


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
    expected: pd.DataFrame | None = None,
    executor: Executor | None = None,
) -> pd.DataFrame:
    """Run every unfinished task (through ``executor``), then pool and check the predictions.

    A task counts as finished only when its folder passes :func:`verify_task` (every file
    matches the folder's manifest). A folder that fails is re-run, and the log says why.
    Leftover temporary folders from an interrupted run are removed first. ``expected``
    (targets indexed by participant_id, NaN where a subject has no value) is passed to
    :func:`collect_predictions`. ``executor`` (default: a
    :class:`dfrn.executors.LocalExecutor`, in order, in this process) runs the
    unfinished tasks; the predictions are then read from the task folders whatever ran them.
    """
    from tqdm.auto import tqdm

    from dfrn.executors import LocalExecutor

    executor = executor if executor is not None else LocalExecutor()
    tasks_dir = cv_dir / "tasks"
    todo = _unfinished_tasks(tasks, tasks_dir, log)
    if todo and executor.name == "local":
        for t in tqdm(todo, desc="cv tasks", unit="task", disable=not progress):
            run_task(t, volumes, index_of, targets, make_estimator, base_seed, tasks_dir)
    elif todo:
        if getattr(volumes, "index_of", None) is None:
            raise TypeError(f"executor {executor.name!r} needs volumes with an index_of method")
        job = TaskJob(volumes, targets, make_estimator, base_seed, tasks_dir)
        _run_on_executor(executor, job, todo, cv_dir, progress)
    return collect_predictions(tasks, cv_dir, expected)


def _unfinished_tasks(tasks: Sequence[Task], tasks_dir: Path,
                      log: Callable[[str], None]) -> list[Task]:
    """The tasks whose folder is missing or fails :func:`verify_task` (the log says why),
    after removing the temporary folders an interrupted run left."""
    tasks_dir.mkdir(parents=True, exist_ok=True)
    for stale in tasks_dir.glob(".*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    done, todo = [], []
    for t in tasks:
        folder = tasks_dir / t.name
        if not folder.exists():
            todo.append(t)
            continue
        reason = verify_task(folder, t)
        if reason is None:
            done.append(t)
        else:
            log(f"task {t.name} failed its check ({reason}); re-running it")
            todo.append(t)
    if done:
        log(f"resuming: {len(done)} of {len(tasks)} tasks already finished, skipped")
    return todo


def _run_on_executor(executor: Executor, job: TaskJob, todo: list[Task], cv_dir: Path,
                     progress: bool) -> None:
    """Run ``todo`` as ``executor`` tasks of ``job``, behind a storage probe in ``cv_dir``."""
    from tqdm.auto import tqdm

    from dfrn.executors import remove_storage_probe, write_storage_probe

    probe = write_storage_probe(cv_dir)
    job = dataclasses.replace(job, probe=probe)
    try:
        bar = tqdm(total=len(todo), desc=f"cv tasks ({executor.name})", unit="task",
                   disable=not progress)
        with bar:
            for _ in executor.map(run_task_job, job, todo):
                bar.update()
    finally:
        remove_storage_probe(*probe)


def collect_predictions(
    tasks: Sequence[Task], cv_dir: Path, expected: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Pool the predictions of every task, in task order, and check they are complete.

    Parameters
    ----------
    tasks : sequence of Task
        The planned tasks.
    cv_dir : Path
        The folder holding ``tasks/``.
    expected : DataFrame, optional
        Targets indexed by participant_id, one column per factor (NaN: no value). Each
        planned (repeat, fold, factor, subject) with a value must have exactly one finite
        prediction. Without it, the subjects listed in each task's verified ``task.json``
        are expected.

    Raises
    ------
    ResultsIntegrityError
        When a task folder is missing or fails its check, or a planned prediction is
        missing, duplicated, foreign to its fold or not finite. The message names the task
        and the subjects.
    """
    frames = []
    for t in tasks:
        folder = cv_dir / "tasks" / t.name
        meta = read_task_meta(folder, t)
        df = read_delimited(folder / "predictions.tsv", f"predictions of task {t.name}",
                            ("participant_id", "factor"), allow_empty=True)
        problems = [p for factor in t.targets
                    for p in _prediction_problems(t, factor, df, meta, expected)]
        keys = df[["repeat", "fold"]].drop_duplicates()
        if len(df) and (len(keys) != 1 or (int(keys.iloc[0]["repeat"]), int(keys.iloc[0]["fold"]))
                        != (t.repeat, t.fold) or not set(df["factor"]) <= set(t.targets)):
            problems.append("rows of another (repeat, fold, factor)")
        if not np.all(np.isfinite(df["y_pred"].to_numpy(float))):
            problems.append("non-finite predictions")
        if problems:
            raise ResultsIntegrityError(
                f"task {t.name}: {'; '.join(problems)}; rerun 'dfrn run' with the same "
                "config and --out to redo it"
            )
        frames.append(df)
    if not frames:
        return pd.DataFrame(columns=PREDICTION_COLUMNS)
    pooled = pd.concat(frames, ignore_index=True)[PREDICTION_COLUMNS]
    return _mean_over_seeds(pooled)


def _prediction_problems(t: Task, factor: str, df: pd.DataFrame, meta: dict,
                         expected: pd.DataFrame | None) -> list[str]:
    """What is wrong with one factor's rows of a task's predictions (empty: nothing)."""
    if expected is not None:
        col = expected.loc[list(t.test_ids), factor]
        want = [str(p) for p in col.index[col.notna().to_numpy()]]
    elif t.joint:
        want = [str(p) for p in meta["test_ids_by_factor"][factor]]
    else:
        want = [str(p) for p in meta["test_ids"]]
    rows = df[df["factor"].astype(str) == factor]
    got = rows["participant_id"].astype(str).tolist()
    problems = []
    missing = sorted(set(want) - set(got))
    if missing:
        problems.append(f"no prediction for {', '.join(missing[:5])}"
                        + (f" ({factor})" if t.joint else ""))
    extra = sorted(set(got) - set(want))
    if extra:
        problems.append(f"unexpected subjects {', '.join(extra[:5])}")
    dup = sorted(set(rows["participant_id"][rows["participant_id"].duplicated()]))
    if dup:
        problems.append(f"duplicate predictions for {', '.join(map(str, dup[:5]))}")
    return problems


def _mean_over_seeds(pooled: pd.DataFrame) -> pd.DataFrame:
    """One row per (repeat, fold, factor, subject): the mean prediction of its seeds."""
    keys = ["participant_id", "repeat", "fold", "factor"]
    if not pooled.duplicated(keys).any():
        return pooled
    mean = pooled.groupby(keys, sort=False, as_index=False).agg(
        y_true=("y_true", "first"), y_pred=("y_pred", "mean"))
    return mean[PREDICTION_COLUMNS]
