"""Executors without Ray: the local executor, the storage probe, a missing Ray install."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import study_config


def test_local_executor_runs_in_order() -> None:
    from dfrn.evaluation.executors import LocalExecutor

    seen = []
    keys = list(LocalExecutor().map(lambda c, i: seen.append((c, i)) or f"k{i}", "c", [2, 0, 1]))
    assert keys == ["k2", "k0", "k1"] and seen == [("c", 2), ("c", 0), ("c", 1)]


def test_storage_probe_refuses_a_worker_that_cannot_see_the_folder(tmp_path: Path) -> None:
    from dfrn.errors import DfrnInputError
    from dfrn.evaluation.executors import (
        check_storage_probe,
        remove_storage_probe,
        write_storage_probe,
    )

    path, token = write_storage_probe(tmp_path / "cv")
    check_storage_probe(path, token)  # the driver's own view
    with pytest.raises(DfrnInputError, match="storage that every Ray worker shares"):
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
