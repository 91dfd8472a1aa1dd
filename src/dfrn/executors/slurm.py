"""Tasks as SLURM jobs, through submitit: ``[executor] kind = "slurm"``.

Each pending item (a CV task, a network-permutation task, a ``dfrn prep`` subject) becomes
one element of a SLURM job array (submitit's ``map_array``; ``array_parallelism`` caps how
many run at once). The driver (``dfrn run``, holding the results folder's lock) waits with a
progress bar, then reads and verifies the task folders exactly as after Ray or a local run:
a job returns only its key.

* **Logs.** submitit's pickles and each job's stdout and stderr go to
  ``RESULTS/logs/slurm/``, with ``jobs.tsv`` listing every submission (item, job ID, attempt,
  and the PID of the driver that submitted it).
* **Lost jobs.** A job that reaches its time limit is requeued by submitit (the task is
  checkpointable: it restarts from scratch), up to ``max_retries`` times; a preempted job
  is requeued by SLURM. A job that ends without a result otherwise (killed, its node lost)
  is resubmitted by the driver, up to ``max_retries`` times; so is a transient error
  (:data:`~dfrn.errors.TRANSIENT_ERRORS`). A user error (:class:`~dfrn.errors.DfrnError`)
  stops the run with its one-line message, the job ID and its log; so do a crash (its last
  line), running out of memory (naming ``mem_gb``) and a cancel from outside dfrn.
* **Resume.** Jobs a killed driver left running are cancelled by the next driver that takes
  the folder's lock (:meth:`SlurmExecutor.attach`); it then resubmits only the tasks that
  have no verified folder.
* **Without a cluster.** ``cluster = "local"`` runs the same code path through submitit's
  ``LocalExecutor`` (one local process per job), for tests and trials.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from dfrn import errors
from dfrn.errors import DfrnError, DfrnInputError, listed

__all__ = ["SlurmExecutor", "SLURM_INSTALL_HINT", "SlurmSettings"]

#: What to install for ``kind = "slurm"``.
SLURM_INSTALL_HINT = "pip install 'dfrn[slurm]'"
_JOBS = "jobs.tsv"
_COLUMNS = ("item", "job_id", "attempt", "driver", "ended")
#: Elements per submitted array (SLURM's default MaxArraySize is 1001).
_MAX_ARRAY = 1000


@dataclass(frozen=True)
class SlurmSettings:
    """What each job asks SLURM for (``[executor]``; see :class:`dfrn.config.ExecutorConfig`)."""

    cluster: str = "slurm"
    partition: str = ""
    cpus_per_task: int = 1
    gpus_per_task: int = 0
    mem_gb: float = 0.0
    timeout_min: int = 720
    array_parallelism: int = 32
    additional: tuple[tuple[str, Any], ...] = ()
    max_retries: int = 3


class _InJob:
    """One item inside a job: a user or transient error comes back as a value, not a crash.

    It has submitit's ``checkpoint`` method, so a job that reaches its time limit is
    requeued by submitit (up to ``max_retries`` times) instead of failing; a task restarts
    from scratch, which is safe because it is idempotent. A preempted job is requeued by
    SLURM in any case.
    """

    def __call__(self, fn: Callable[[Any, Any], str], threads: int, common: Any,
                 item: Any) -> tuple[str, str, str]:
        import torch

        from dfrn.errors import TRANSIENT_ERRORS

        torch.set_num_threads(max(1, threads))
        try:
            return ("ok", "", fn(common, item))
        except DfrnError as exc:
            return ("user", type(exc).__name__, str(exc))
        except TRANSIENT_ERRORS as exc:
            return ("transient", type(exc).__name__, str(exc))

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)


def item_label(item: Any) -> str:
    """A task's name, or a prep job's ``sub-<label>``, for messages and ``jobs.tsv``."""
    name = getattr(item, "name", None)
    if isinstance(name, str):
        return name
    subject = item.get("subject") if isinstance(item, dict) else None
    return str(getattr(subject, "stem", item))


@dataclass
class _Submission:
    item: Any
    label: str
    attempt: int
    job: Any


class SlurmExecutor:
    """Each item as one SLURM job (an element of a job array), through submitit.

    Parameters
    ----------
    settings : SlurmSettings
        Partition, resources per job, time limit, array parallelism, retries.

    Raises
    ------
    DfrnInputError
        When submitit is not installed (naming ``pip install 'dfrn[slurm]'``), or
        ``cluster = "slurm"`` and SLURM's ``sbatch`` is not on ``PATH``.
    """

    name = "slurm"

    def __init__(self, settings: SlurmSettings) -> None:
        try:
            import submitit
        except ImportError:
            raise DfrnInputError(
                f"[executor] kind = 'slurm' needs submitit, which is not installed: "
                f"{SLURM_INSTALL_HINT}"
            ) from None
        if settings.cluster == "slurm" and shutil.which("sbatch") is None:
            raise DfrnInputError(
                "[executor] kind = 'slurm' needs SLURM's sbatch, which is not on PATH: run dfrn "
                "on a SLURM login node (or in a job), or set [executor] cluster = 'local' to "
                "run the jobs as local processes"
            )
        self._submitit = submitit
        self.settings = settings
        #: Seconds between looks at the jobs (submitit caches SLURM's own answers).
        self.poll_s = 0.2 if settings.cluster == "local" else 5.0
        self.folder: Path | None = None
        self._log: Callable[[str], None] = print
        self._live: list[_Submission] = []

    # -- the results folder ----------------------------------------------------------
    def attach(self, folder: Path, log: Callable[[str], None] = print) -> None:
        """Use ``folder`` (``RESULTS/logs/slurm``) for submitit; cancel a killed driver's jobs.

        Call it while holding the results folder's lock: jobs listed in ``jobs.tsv`` that
        still run belong to a driver that is gone, and their tasks are resubmitted.
        """
        self.folder = Path(folder).resolve()  # created at the first submission
        self._log = log
        table = self._jobs_table()
        open_rows = table[table["ended"] != "1"]
        left = [(str(r.job_id), str(r.item)) for r in open_rows.itertuples()
                if not self._ended(str(r.job_id))]
        for job_id, _ in left:
            self._cancel_id(job_id)
        if left:
            log(f"SLURM: cancelled {len(left)} job(s) a killed run left running: "
                + listed([f"{item} (job {job_id})" for job_id, item in left], 10))
        if len(open_rows):
            self._mark_ended(table)

    def _jobs_table(self) -> pd.DataFrame:
        path = self._folder() / _JOBS
        if not path.is_file():
            return pd.DataFrame(columns=list(_COLUMNS))
        return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)

    def _mark_ended(self, table: pd.DataFrame) -> None:
        """Mark every listed job as over (a later driver then leaves them alone)."""
        from dfrn.io import atomic_write_tsv

        atomic_write_tsv(table.assign(ended="1"), self._folder() / _JOBS)

    def _folder(self) -> Path:
        if self.folder is None:
            raise RuntimeError("SlurmExecutor.attach(folder) must be called before map()")
        return self.folder

    def _ended(self, job_id: str) -> bool:
        """Whether a job of an earlier driver is over (its result written, or not running)."""
        if self.settings.cluster == "local":
            return not _local_controller_alive(job_id, self._folder())
        job = self._submitit.SlurmJob(self._folder(), job_id)
        return job.done(force_check=True)

    def _cancel_id(self, job_id: str) -> None:
        if self.settings.cluster == "local":
            _stop_local_controller(job_id, self._folder())
        else:
            self._submitit.SlurmJob(self._folder(), job_id).cancel(check=False)

    # -- running ---------------------------------------------------------------------
    def _executor(self) -> Any:
        s = self.settings
        # a job that reaches its time limit is requeued (max_retries times): see _InJob
        ex = self._submitit.AutoExecutor(
            folder=self._folder(), cluster=s.cluster, slurm_max_num_timeout=s.max_retries,
            local_max_num_timeout=s.max_retries,
        )
        params: dict[str, Any] = {
            "name": "dfrn", "timeout_min": s.timeout_min, "cpus_per_task": s.cpus_per_task,
            "slurm_array_parallelism": s.array_parallelism,
        }
        if s.gpus_per_task:
            params["gpus_per_node"] = s.gpus_per_task
        if s.mem_gb:
            params["mem_gb"] = s.mem_gb
        if s.partition:
            params["slurm_partition"] = s.partition
        if s.additional:
            params["slurm_additional_parameters"] = dict(s.additional)
        ex.update_parameters(**params)
        return ex

    def map(
        self, fn: Callable[[Any, Any], str], common: Any, items: Iterable[Any]
    ) -> Iterator[str]:
        """Submit the items as job arrays; yield keys as jobs finish (completion order).

        Jobs still queued or running when this generator stops early (an error, Ctrl-C,
        SIGTERM) are cancelled.
        """
        ex = self._executor()
        queue = [(item, 0) for item in items]
        self._live = []
        try:
            while queue or self._live:
                queue = self._submit_some(ex, fn, common, queue)
                finished = [s for s in self._live if s.job.done()]
                if not finished:
                    time.sleep(self.poll_s)
                    continue
                for sub in finished:
                    self._live.remove(sub)
                    key = self._outcome(sub, queue)
                    if key is not None:
                        yield key
        finally:
            self._cancel_live()
            if (self._folder() / _JOBS).is_file():
                self._mark_ended(self._jobs_table())

    def _submit_some(self, ex: Any, fn: Callable[[Any, Any], str], common: Any,
                     queue: list[tuple[Any, int]]) -> list[tuple[Any, int]]:
        """Submit queued items: to SLURM in arrays of at most 1000 (SLURM throttles each
        with ``array_parallelism``); locally up to ``array_parallelism`` processes at once."""
        room = min(len(queue), _MAX_ARRAY)
        if self.settings.cluster == "local":
            room = max(0, min(room, self.settings.array_parallelism - len(self._live)))
        batch, rest = queue[:room], queue[room:]
        if not batch:
            return rest
        n = len(batch)
        self._folder().mkdir(parents=True, exist_ok=True)
        try:
            with _clean_env(self._submitit):
                jobs = ex.map_array(_InJob(), [fn] * n, [self.settings.cpus_per_task] * n,
                                    [common] * n, [item for item, _ in batch])
        except Exception as exc:  # noqa: BLE001 - sbatch's refusals come in several types
            first = next((ln for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
            raise DfrnInputError(
                f"SLURM refused the job array: {first.strip()}; check [executor] partition, "
                "cpus_per_task, gpus_per_task, mem_gb, timeout_min and "
                "slurm_additional_parameters"
            ) from None
        subs = [_Submission(item, item_label(item), attempt, job)
                for (item, attempt), job in zip(batch, jobs, strict=True)]
        self._live.extend(subs)
        self._record(subs)
        ids = [str(sub.job.job_id) for sub in subs]
        self._log(f"SLURM: submitted {n} job(s) ({ids[0]}" + (f" … {ids[-1]}" if n > 1 else "")
                  + f"; logs in {self._folder()})")
        return rest

    def _record(self, subs: list[_Submission]) -> None:
        from dfrn.io import atomic_write_tsv

        rows = pd.DataFrame([{"item": s.label, "job_id": s.job.job_id, "attempt": s.attempt,
                              "driver": os.getpid(), "ended": "0"} for s in subs])
        table = pd.concat([self._jobs_table(), rows.astype(str)], ignore_index=True)
        atomic_write_tsv(table, self._folder() / _JOBS)

    def _outcome(self, sub: _Submission, queue: list[tuple[Any, int]]) -> str | None:
        """The key of a job that ended well; else queue a retry, or raise a one-line error."""
        utils = self._submitit.core.utils
        where = f"task {sub.label} (SLURM job {sub.job.job_id}, log {sub.job.paths.stderr})"
        try:
            kind, cls, value = sub.job.result()
        except utils.FailedJobError as exc:
            raise DfrnError(f"{where} {_failure(str(exc), self.settings)}") from None
        except utils.UncompletedJobError:
            kind, cls, value = "lost", "", _lost(sub.job.state, where, self.settings)
        if kind == "ok":
            return value
        if kind == "user":
            raise getattr(errors, cls, DfrnError)(f"{where}: {value}")
        if sub.attempt >= self.settings.max_retries:
            raise DfrnError(f"{where} {value}, {sub.attempt + 1} time(s) ([executor] max_retries "
                            f"= {self.settings.max_retries}); see its log")
        warnings.warn(f"SLURM: {where} {value}; resubmitting it (retry {sub.attempt + 1} of "
                      f"{self.settings.max_retries})", UserWarning, stacklevel=2)
        # a job SLURM merely suspended counts as done for submitit: cancel it first, so that
        # no two jobs ever work on one task
        self._cancel_id(str(sub.job.job_id))
        queue.append((sub.item, sub.attempt + 1))
        return None

    def _cancel_live(self) -> None:
        for sub in self._live:
            try:
                self._cancel_id(str(sub.job.job_id))
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
        self._live = []

    def close(self) -> None:
        self._cancel_live()


def _failure(trace: str, settings: SlurmSettings) -> str:
    """What a job's error result says, in one line."""
    if "timed-out too many times" in trace:
        return (f"reached its time limit ([executor] timeout_min = {settings.timeout_min}) "
                f"{settings.max_retries + 1} time(s); raise timeout_min")
    lines = [ln.strip() for ln in trace.splitlines()
             if ln.strip() and not ln.startswith(("-", "You can", "or at", "  - "))]
    return f"crashed: {lines[-1] if lines else 'no message'}"


def _lost(state: str, where: str, settings: SlurmSettings) -> str:
    """Why a job ended without a result; a cause a retry cannot cure is raised here."""
    if "OUT_OF_MEMORY" in state:
        raise DfrnInputError(f"{where} ran out of memory; raise [executor] mem_gb "
                             f"(now {settings.mem_gb:g}, 0 is the partition's default)")
    if state.startswith("CANCELLED"):
        raise DfrnError(f"{where} was cancelled outside dfrn ({state}); rerun the same "
                        "command to resume")
    return f"ended without a result (state {state})"


@contextlib.contextmanager
def _clean_env(submitit: Any) -> Iterator[None]:
    """Submit without this process's own SLURM job variables (a driver that runs as a job
    would pass them on and clash with the new job's), but with ``SLURM_CONF``."""
    conf = os.environ.get("SLURM_CONF")
    with submitit.helpers.clean_env():
        if conf is not None:
            os.environ["SLURM_CONF"] = conf
        try:
            yield
        finally:
            os.environ.pop("SLURM_CONF", None)  # clean_env puts the saved one back


def _local_controller_alive(job_id: str, folder: Path) -> bool:
    """Whether ``job_id`` (a submitit local job: its controller's PID) still runs for ``folder``."""
    try:
        cmd = Path(f"/proc/{int(job_id)}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return False
    return b"submitit.local._local" in cmd and str(folder).encode() in cmd


def _stop_local_controller(job_id: str, folder: Path, wait_s: float = 30.0) -> None:
    """Cancel a local job: SIGKILL its task process, then wait for its controller to end.

    (submitit's own cancel, SIGINT to the controller, prints a KeyboardInterrupt traceback
    on the driver's terminal; a controller whose task has ended exits quietly.)
    """
    if not _local_controller_alive(job_id, folder):
        return
    pid = int(job_id)
    for child in _children(pid):
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass
    end = time.monotonic() + wait_s
    while _local_controller_alive(job_id, folder) and time.monotonic() < end:
        try:  # reap it when it is this process's child
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.05)
    if _local_controller_alive(job_id, folder):
        os.kill(pid, signal.SIGKILL)


def _children(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (from ``/proc/*/stat``)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(proc.name))
    return found
