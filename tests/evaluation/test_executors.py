"""Executors without Ray: the local executor, the storage probe, a missing Ray install."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import study_config


def test_local_executor_runs_in_order() -> None:
    from dfrn.executors import LocalExecutor

    seen = []
    keys = list(LocalExecutor().map(lambda c, i: seen.append((c, i)) or f"k{i}", "c", [2, 0, 1]))
    assert keys == ["k2", "k0", "k1"] and seen == [("c", 2), ("c", 0), ("c", 1)]


def test_storage_probe_refuses_a_worker_that_cannot_see_the_folder(tmp_path: Path) -> None:
    from dfrn.errors import DfrnInputError
    from dfrn.executors import (
        check_storage_probe,
        remove_storage_probe,
        write_storage_probe,
    )

    path, token = write_storage_probe(tmp_path / "cv")
    check_storage_probe(path, token)  # the driver's own view
    with pytest.raises(DfrnInputError, match="storage that every worker node shares"):
        check_storage_probe(path, "another-token")
    remove_storage_probe(path, token)
    with pytest.raises(DfrnInputError, match=r"cannot see the results folder .*cv \(no "):
        check_storage_probe(path, token)


def test_task_job_checks_the_probe_before_training(tiny_cohort, tmp_path: Path) -> None:
    from dfrn.errors import DfrnInputError
    from dfrn.evaluation.tasks import Task, TaskJob, run_task_job

    job = TaskJob([], None, None, 0, tmp_path / "tasks",  # type: ignore[arg-type]
                  (str(tmp_path / "elsewhere/.storage-check"), "t"))
    with pytest.raises(DfrnInputError, match="cannot see the results folder"):
        run_task_job(job, Task(0, 0, "sleep", 0, ("a",), ("b",)))
    assert not (tmp_path / "tasks").exists()


def test_executor_config_does_not_change_the_fingerprint(tiny_cohort) -> None:
    a = study_config(tiny_cohort)
    b = study_config(tiny_cohort, executor={"kind": "ray", "address": "auto",
                                            "gpus_per_task": 0.2, "max_retries": 1},
                     training={"data": "prefetch"})
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != study_config(
        tiny_cohort, training={"channels_last_3d": True}
    ).fingerprint()


def test_missing_ray_is_one_line(tiny_cohort, tmp_path, monkeypatch, capsys) -> None:
    import builtins

    from dfrn.cli import main

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    cfg = tmp_path / "study.toml"
    cfg.write_text(study_config(tiny_cohort).to_toml())
    rc = main(["run", str(cfg), "--out", str(tmp_path / "res"), "--no-progress",
               "--executor", "ray"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and "pip install 'dfrn[distributed]'" in err[0], err
    assert not (tmp_path / "res").exists()


class _FakeEstimator:
    """Writes a model file whose bytes carry ``tag``; predicts zeros."""

    def __init__(self, tag: bytes) -> None:
        self.tag = tag
        self.y_mean_, self.y_std_, self.best_epoch_ = 0.0, 1.0, 0

    def fit(self, volumes, y):
        import pandas as pd

        self.history_ = pd.DataFrame({"epoch": [0], "train_loss": [1.0]})
        return self

    def predict(self, volumes):
        import numpy as np

        return np.zeros(len(volumes))

    def save(self, path) -> None:
        Path(path).write_bytes(self.tag)


def test_a_task_folder_is_placed_once(tmp_path: Path) -> None:
    """A retried task that finishes after an intact folder is in place keeps that folder; a
    broken one is replaced; no temporary folder is left."""
    import numpy as np
    import pandas as pd

    from dfrn.evaluation.tasks import Task, run_task
    from dfrn.targets.providers import StaticTargets

    ids = ["a", "b", "c", "d"]
    targets = StaticTargets(pd.DataFrame({"sleep": [1.0, 2.0, 3.0, 4.0]}, index=ids))
    vols = [np.zeros((2, 2, 2))] * 4
    task = Task(0, 0, "sleep", 0, ("a", "b"), ("c", "d"))
    tasks_dir = tmp_path / "tasks"

    def run(tag: bytes) -> Path:
        return run_task(task, vols, lambda xs: [ids.index(x) for x in xs], targets,
                        lambda seed, desc: _FakeEstimator(tag), 0, tasks_dir)

    final = run(b"first")
    inode = final.stat().st_ino
    # a duplicate run that trains and then finds the intact folder in place keeps it
    from dfrn.evaluation import tasks as tasks_module

    real_verify = tasks_module.verify_task
    calls = []

    def verify_later(folder, t):  # the duplicate's first check runs before the folder existed
        calls.append(folder)
        return "its folder is missing" if len(calls) == 1 else real_verify(folder, t)

    tasks_module.verify_task = verify_later
    try:
        run(b"second")
    finally:
        tasks_module.verify_task = real_verify
    assert final.stat().st_ino == inode and (final / "model.pt").read_bytes() == b"first"
    assert sorted(p.name for p in tasks_dir.iterdir()) == [task.name]
    (final / "model.pt").unlink()  # broken: replaced by the next run
    run(b"third")
    assert (final / "model.pt").read_bytes() == b"third"
    assert sorted(p.name for p in tasks_dir.iterdir()) == [task.name]
