"""The SLURM executor through submitit's local cluster: parity, a killed driver, a killed job.

``[executor] kind = "slurm"`` with ``cluster = "local"`` runs the exact code path of a SLURM
run (submitit pickles, job array, result files, cancel, resubmission), with each job a local
process. No timing asserts: waits poll for a state with a generous deadline.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import one_thread_run, study_config

pytest.importorskip("submitit")

DEADLINE = 300.0
TASKS = ["repeat-0_fold-0_sleep", "repeat-0_fold-1_sleep"]


def _config(cohort, **executor):
    """One factor, two folds: two jobs (each a process that imports torch)."""
    return study_config(cohort, cohort={"targets": ["sleep"]},
                        executor={"kind": "slurm", "cluster": "local", "cpus_per_task": 1,
                                  **executor})


def _predictions(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "cv/predictions.tsv", sep="\t", dtype={"participant_id": str})


def _jobs(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "logs/slurm/jobs.tsv", sep="\t", dtype=str)


def _assert_same(a: pd.DataFrame, b: pd.DataFrame) -> None:
    cols = ["participant_id", "repeat", "fold", "factor", "y_true"]
    pd.testing.assert_frame_equal(a[cols], b[cols])
    np.testing.assert_allclose(a["y_pred"], b["y_pred"], rtol=0, atol=1e-6)


def _assert_tasks_intact(out: Path) -> None:
    from dfrn.io import verify_manifest

    tasks = out / "cv/tasks"
    assert sorted(p.name for p in tasks.iterdir()) == TASKS  # no temp, stale or duplicate
    assert all(verify_manifest(tasks / name) is None for name in TASKS)
    assert not list((out / "cv").glob(".storage-check*"))


@pytest.fixture(scope="module")
def local_run(tiny_cohort, tmp_path_factory):
    """The reference: the local executor with 1 torch thread, as each job gets."""
    return one_thread_run(study_config(tiny_cohort, cohort={"targets": ["sleep"]}),
                          tmp_path_factory.mktemp("slurm_local") / "res")


def _task_processes(folder: Path) -> list[int]:
    """PIDs of submitit job processes (not their controllers) working for ``folder``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"submitit.core._submit" in cmd and str(folder).encode() in cmd:
            pids.append(int(proc.name))
    return pids


def _handles_usr2(pid: int) -> bool:
    """Whether submitit's preemption handler (SIGUSR2) is installed in ``pid`` yet."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = int(next(ln for ln in status.splitlines() if ln.startswith("SigCgt:")).split()[1], 16)
    return bool(caught >> (signal.SIGUSR2 - 1) & 1)


def test_slurm_jobs_give_the_local_predictions_a_preempted_job_is_requeued_and_a_killed_job_resubmitted(
    tiny_cohort, local_run, tmp_path
) -> None:
    """One job gets SIGUSR2, SLURM's time-limit signal (with timeout_min = 1 submitit takes
    any USR2 for the time limit): submitit requeues it, as the task is checkpointable.
    Another job's process is SIGKILLed: the driver resubmits its task."""
    from dfrn.workflows.run import run_study

    out = tmp_path / "res"
    logs: list[str] = []
    preempted: list[int] = []
    killed: list[int] = []
    stop = threading.Event()

    def killer() -> None:
        end = time.monotonic() + DEADLINE
        while not stop.is_set() and time.monotonic() < end and not killed:
            for pid in _task_processes(out / "logs/slurm"):
                if not preempted and _handles_usr2(pid):
                    os.kill(pid, signal.SIGUSR2)
                    preempted.append(pid)
                elif preempted and pid != preempted[0]:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    return
            time.sleep(0.01)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        with pytest.warns(UserWarning, match=r"ended without a result .*; resubmitting it"):
            run_study(_config(tiny_cohort, array_parallelism=2, timeout_min=1), out,
                      progress=False, log=logs.append)
    finally:
        stop.set()
        thread.join()
    assert preempted and killed, "no job process was seen"
    logs_text = "".join(p.read_text() for p in (out / "logs/slurm").glob("*_log.*"))
    assert "this job is timed-out" in logs_text and "Requeued job" in logs_text
    _assert_same(_predictions(out), _predictions(local_run))
    _assert_tasks_intact(out)
    jobs = _jobs(out)
    assert sorted(jobs.loc[jobs["attempt"] == "0", "item"]) == TASKS
    retried = jobs[jobs["attempt"] == "1"]
    assert len(retried) == 1  # the killed job's task, once more, with a job of its own
    assert retried["job_id"].iloc[0] not in set(jobs.loc[jobs["attempt"] == "0", "job_id"])
    assert any(line.startswith("SLURM: submitted") for line in logs)
    assert not _task_processes(out / "logs/slurm")  # nothing left running


def test_killed_driver_resumes_and_resubmits_only_the_unfinished(tiny_cohort, local_run,
                                                                 tmp_path) -> None:
    """The driver is SIGKILLed once the first task is done and the second job runs (held
    still with SIGSTOP, so that it cannot finish on its own). The rerun cancels that job and
    resubmits its task only."""
    cfg = tmp_path / "study.toml"
    cfg.write_text(_config(tiny_cohort, array_parallelism=1).to_toml())
    out = tmp_path / "res"
    env = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", "import sys; from dfrn.cli import main; sys.exit(main())",
           "run", str(cfg), "--out", str(out), "--no-progress"]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env)
    held: list[int] = []
    try:
        end = time.monotonic() + DEADLINE
        while not held:
            if first.poll() is not None:
                pytest.fail(f"driver ended (rc {first.returncode}) early: {first.communicate()}")
            assert time.monotonic() < end, "the second job never ran"
            jobs = _jobs(out) if (out / "logs/slurm/jobs.tsv").is_file() else pd.DataFrame()
            if len(jobs) == 2 and (pids := _task_processes(out / "logs/slurm")):
                os.kill(pids[0], signal.SIGSTOP)
                held.append(pids[0])
            time.sleep(0.01)
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=DEADLINE)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert not (out / "cv/predictions.tsv").exists()
    done = [t for t in TASKS if (out / "cv/tasks" / t).is_dir()]
    assert len(done) == 1
    inode = (out / "cv/tasks" / done[0]).stat().st_ino
    left = [t for t in TASKS if t not in done]

    again = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env)
    stdout, stderr = again.communicate(timeout=DEADLINE)
    assert again.returncode == 0, stderr
    first_job = _jobs(out).set_index("item").loc[left[0], "job_id"].iloc[0]
    assert (f"SLURM: cancelled 1 job(s) a killed run left running: {left[0]} (job "
            f"{first_job})") in stdout
    assert not Path(f"/proc/{held[0]}").exists()
    assert "resuming: 1 of 2 tasks already finished, skipped" in stdout
    jobs = _jobs(out)
    assert list(jobs.loc[jobs["driver"] == str(again.pid), "item"]) == left  # only that one
    assert (out / "cv/tasks" / done[0]).stat().st_ino == inode  # the finished task was kept
    _assert_tasks_intact(out)
    _assert_same(_predictions(out), _predictions(local_run))
    assert not _task_processes(out / "logs/slurm")


def test_a_user_error_in_a_job_is_one_line_naming_the_task_and_its_log(
    tiny_cohort, tmp_path, monkeypatch, capfd
) -> None:
    """A node that cannot see the results folder (the storage probe is not there for it)."""
    from dfrn.cli import main
    from dfrn.executors import base as executors

    monkeypatch.setattr(executors, "write_storage_probe",
                        lambda folder: (str(folder / ".storage-check"), "not-there"))
    cfg = tmp_path / "study.toml"
    cfg.write_text(_config(tiny_cohort, array_parallelism=2).to_toml())
    out = tmp_path / "res"
    rc = main(["run", str(cfg), "--out", str(out), "--no-progress"])
    err = capfd.readouterr().err.strip().splitlines()  # the job processes' stderr too
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("dfrn: error: task repeat-0_fold-")
    assert "(SLURM job " in err[0] and f"log {out}/logs/slurm/" in err[0]
    assert "cannot see the results folder" in err[0] and "on host " in err[0]
    log = Path(err[0].split(", log ")[1].split(")")[0])
    assert log.is_file()
    assert not _task_processes(out / "logs/slurm")  # the other jobs were cancelled


@pytest.mark.parametrize("missing", ["submitit", "sbatch"])
def test_missing_extra_or_sbatch_is_one_line(tiny_cohort, tmp_path, monkeypatch, capsys,
                                             missing) -> None:
    from dfrn.cli import main

    if missing == "submitit":
        monkeypatch.setitem(sys.modules, "submitit", None)
    else:
        monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    cfg = tmp_path / "study.toml"
    cfg.write_text(study_config(tiny_cohort, executor={"kind": "slurm"}).to_toml())
    rc = main(["run", str(cfg), "--out", str(tmp_path / "res"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    expected = ("pip install 'dfrn[slurm]'" if missing == "submitit"
                else "needs SLURM's sbatch, which is not on PATH")
    assert expected in err[0]
    assert not (tmp_path / "res").exists()


def test_why_a_job_ended_is_said_in_one_line() -> None:
    """Time limit reached too often, out of memory, cancelled: no retry, one line each."""
    from dfrn.errors import DfrnError, DfrnInputError
    from dfrn.executors.slurm import SlurmSettings, _failure, _lost

    s = SlurmSettings(timeout_min=30, max_retries=2, mem_gb=8.0)
    trace = "Job not requeued because: timed-out too many times.\nUncompletedJobError"
    assert _failure(trace, s) == ("reached its time limit ([executor] timeout_min = 30) 3 "
                                  "time(s); raise timeout_min")
    assert _failure("Traceback\n  File x\nValueError: bad\n----\nYou can check", s) == (
        "crashed: ValueError: bad")
    with pytest.raises(DfrnInputError, match=r"task t ran out of memory; raise \[executor\] mem_gb"):
        _lost("OUT_OF_MEMORY", "task t", s)
    with pytest.raises(DfrnError, match="was cancelled outside dfrn"):
        _lost("CANCELLED by 1000", "task t", s)
    assert _lost("NODE_FAIL", "task t", s) == "ended without a result (state NODE_FAIL)"


@pytest.fixture
def fake_slurm(tmp_path: Path, monkeypatch) -> Path:
    """``sbatch``, ``srun``, ``sacct`` and ``scancel`` of ``tests/fake_slurm.py`` on PATH."""
    bin_dir, state = tmp_path / "bin", tmp_path / "slurm-state"
    bin_dir.mkdir()
    state.mkdir()
    script = Path(__file__).resolve().parents[1] / "fake_slurm.py"
    for command in ("sbatch", "srun", "sacct", "scancel"):
        path = bin_dir / command
        path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{script}" {command} "$@"\n')
        path.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_DIR", str(state))
    return state


def test_the_slurm_cluster_path_through_a_stand_in_scheduler(tiny_cohort, local_run, fake_slurm,
                                                             tmp_path, monkeypatch) -> None:
    """``cluster = "slurm"``: sbatch gets the [executor] settings as #SBATCH options and no
    SLURM_* variable of a driver that is itself a job; array elements are ``<job>_<index>``;
    predictions equal the local executor's."""
    from dfrn.workflows.run import run_study

    monkeypatch.setenv("SLURM_JOB_ID", "77")  # the driver runs as a job itself
    monkeypatch.setenv("SLURM_MEM_PER_CPU", "4000")
    cfg = study_config(tiny_cohort, cohort={"targets": ["sleep"]}, executor={
        "kind": "slurm", "cluster": "slurm", "partition": "short", "mem_gb": 2, "timeout_min": 30,
        "cpus_per_task": 1, "array_parallelism": 4,
        "slurm_additional_parameters": {"account": "lab"}})
    out = tmp_path / "res"
    run_study(cfg, out, progress=False, log=lambda s: None)
    _assert_same(_predictions(out), _predictions(local_run))
    _assert_tasks_intact(out)
    jobs = _jobs(out)
    assert sorted(jobs["item"]) == TASKS
    assert all(re.fullmatch(r"\d+_[01]", job_id) for job_id in jobs["job_id"])
    (submitted,) = fake_slurm.glob("*.json")
    sbatch = json.loads(submitted.read_text())
    print(sbatch)
    assert sbatch["inherited"] == []  # submitted outside the driver's own job environment
    options = sbatch["options"]
    assert options["partition"] == "short" and options["account"] == "lab"
    assert options["time"] == "30" and options["array"] == "0-1%2" and options["mem"] == "2GB"
    assert options["cpus-per-task"] == "1" and options["job-name"] == "dfrn"
    assert os.environ["SLURM_JOB_ID"] == "77"  # the driver's environment is back


def test_a_new_driver_cancels_the_jobs_sacct_says_still_run(fake_slurm, tmp_path) -> None:
    """``attach`` asks sacct about the jobs.tsv rows not marked ended, scancels those still
    running (here a sleeping process group), and marks every row ended."""
    from dfrn.config import ExecutorConfig
    from dfrn.executors import make_executor

    sleeper = subprocess.Popen(["sleep", "600"], start_new_session=True)
    try:
        (fake_slurm / "5000_0.state").write_text("RUNNING")
        (fake_slurm / "5000_0.pgid").write_text(str(sleeper.pid))
        (fake_slurm / "5000_1.state").write_text("COMPLETED")
        logs = tmp_path / "logs"
        logs.mkdir()
        pd.DataFrame({"item": ["a", "b", "c"], "job_id": ["5000_0", "5000_1", "4000_0"],
                      "attempt": ["0", "0", "0"], "driver": ["1", "1", "1"],
                      "ended": ["0", "0", "1"]}).to_csv(logs / "jobs.tsv", sep="\t", index=False)
        ex = make_executor("slurm", ExecutorConfig(kind="slurm", cluster="slurm"))
        lines: list[str] = []
        ex.attach(logs, lines.append)
        assert lines == ["SLURM: cancelled 1 job(s) a killed run left running: a (job 5000_0)"]
        assert sleeper.wait(timeout=DEADLINE) == -signal.SIGKILL
        assert (fake_slurm / "5000_0.state").read_text() == "CANCELLED by 0"
        table = pd.read_csv(logs / "jobs.tsv", sep="\t", dtype=str)
        assert set(table["ended"]) == {"1"}
        lines.clear()
        ex.attach(logs, lines.append)  # a later driver leaves ended rows alone
        assert lines == []
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()
