"""Where a study's units of work run: the executor protocol, this process, and the storage probe.

Every unit of work (a CV task, a network-permutation task, a region-ablation task, a
``dfrn prep`` subject) is a pure, idempotent function ``fn(common, item) -> key``: its inputs
are paths and settings (``common``, shared by all items, plus the item's own spec), its output
is its own folder, written under a temporary name and renamed into place when complete. It
returns only its key; the driver then verifies and reads the folders. So resume, refusal and
identical results hold whatever the executor, and no array travels through Ray's object store.

:class:`LocalExecutor` runs the items one after another in this process (the default).
:class:`dfrn.executors.ray_executor.RayExecutor` runs each as a Ray task and
:class:`dfrn.executors.slurm.SlurmExecutor` as one job of a SLURM job array (submitit). The
results folder must be on storage that every worker sees; :func:`write_storage_probe` and
:func:`check_storage_probe` check it, so a worker that cannot see it fails with a one-line
error instead of writing elsewhere.
"""

from __future__ import annotations

import math
import os
import socket
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

from dfrn.config import ExecutorConfig
from dfrn.errors import TRANSIENT_ERRORS, DfrnInputError

__all__ = [
    "Executor",
    "LocalExecutor",
    "make_executor",
    "write_storage_probe",
    "check_storage_probe",
    "remove_storage_probe",
    "TRANSIENT_ERRORS",
]

_PROBE = ".storage-check"


class Executor(Protocol):
    """Runs ``fn(common, item)`` for each item; yields each item's key as it completes."""

    name: str

    def map(
        self, fn: Callable[[Any, Any], str], common: Any, items: Iterable[Any]
    ) -> Iterator[str]: ...

    def attach(self, folder: Path, log: Callable[[str], None] = print) -> None:
        """Called by the driver holding the results folder's lock, before any task is
        checked: ``folder`` is where the executor keeps its own files (``logs/<kind>``)."""
        ...

    def close(self) -> None: ...


class LocalExecutor:
    """Today's behaviour: every item in this process, one after another, in order."""

    name = "local"

    def map(
        self, fn: Callable[[Any, Any], str], common: Any, items: Iterable[Any]
    ) -> Iterator[str]:
        for item in items:
            yield fn(common, item)

    def attach(self, folder: Path, log: Callable[[str], None] = print) -> None:
        pass

    def close(self) -> None:
        pass


def make_executor(kind: str, settings: ExecutorConfig | None = None) -> Executor:
    """The executor for an ``[executor] kind`` (``"local"``, ``"ray"`` or ``"slurm"``).

    ``settings`` (default: :class:`dfrn.config.ExecutorConfig`'s defaults) gives the Ray or
    SLURM options; ``kind`` wins over ``settings.kind`` (the command line's ``--executor``).
    """
    e = settings if settings is not None else ExecutorConfig()
    if kind == "local":
        return LocalExecutor()
    if kind == "ray":
        from dfrn.executors.ray_executor import RayExecutor

        return RayExecutor(e.address, e.num_cpus, e.cpus_per_task, e.gpus_per_task,
                           e.max_retries)
    if kind == "slurm":
        from dfrn.executors.slurm import SlurmExecutor, SlurmSettings

        return SlurmExecutor(SlurmSettings(
            e.cluster, e.partition, math.ceil(e.cpus_per_task), math.ceil(e.gpus_per_task),
            e.mem_gb, e.timeout_min, e.array_parallelism,
            tuple(sorted(e.slurm_additional_parameters.items())), e.max_retries,
        ))
    raise DfrnInputError(f"executor {kind!r} is not one of local, ray, slurm")



def write_storage_probe(folder: Path) -> tuple[str, str]:
    """Write a fresh token into ``folder``; return ``(path, token)`` for the workers to check."""
    folder.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    path = folder / _PROBE
    tmp = folder / f"{_PROBE}.{token}.tmp"
    tmp.write_text(token, encoding="utf-8")
    os.replace(tmp, path)
    return str(path), token


def check_storage_probe(path: str, token: str) -> None:
    """Raise a one-line error when this process does not see the driver's results folder.

    Raises
    ------
    DfrnInputError
        Naming the host and the folder: put the results folder on storage every worker
        shares.
    """
    try:
        seen = Path(path).read_text(encoding="utf-8")
    except OSError:
        seen = None
    if seen != token:
        why = f"no {_PROBE} there" if seen is None else f"its {_PROBE} is another run's"
        raise DfrnInputError(
            f"a worker on host {socket.gethostname()} cannot see the results folder "
            f"{Path(path).parent} ({why}); with Ray or SLURM the results folder must be on "
            "storage that every worker node shares, at the same path"
        )


def remove_storage_probe(path: str, token: str) -> None:
    """Remove the probe written by :func:`write_storage_probe` (when it is still ours)."""
    try:
        if Path(path).read_text(encoding="utf-8") == token:
            Path(path).unlink()
    except OSError:
        pass
