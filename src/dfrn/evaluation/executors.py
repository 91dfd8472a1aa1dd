"""Where a study's units of work run: in this process, or as Ray tasks on cores, GPUs, machines.

Every unit of work (a CV task, a network-permutation task, and later a ``dfrn prep``
subject) is a pure, idempotent function ``fn(common, item) -> key``: its inputs are paths and
settings (``common``, shared by all items, plus the item's own spec), its output is its own
folder, written under a temporary name and renamed into place when complete. It returns only
its key; the driver then verifies and reads the folders. So resume, refusal and identical
results hold whatever the executor, and no array travels through Ray's object store.

:class:`LocalExecutor` runs the items one after another in this process (the default).
:class:`RayExecutor` runs each item as a plain Ray task (``ray.remote`` with ``num_cpus``,
``num_gpus``, ``max_retries`` and ``retry_exceptions`` for transient errors only): Ray
re-runs a task whose worker died. The results folder must be on storage that every worker
sees; :func:`write_storage_probe` and :func:`check_storage_probe` check it, so a worker that
cannot see it fails with a one-line error instead of writing elsewhere.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

from dfrn.errors import DfrnError, DfrnInputError

__all__ = [
    "Executor",
    "LocalExecutor",
    "RayExecutor",
    "make_executor",
    "write_storage_probe",
    "check_storage_probe",
    "remove_storage_probe",
    "TRANSIENT_ERRORS",
    "RAY_INSTALL_HINT",
]

#: What to install for ``--executor ray``.
RAY_INSTALL_HINT = "pip install 'dfrn[distributed]'"
#: Exceptions a Ray task is retried on (besides its worker dying); user errors never are.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError)
_PROBE = ".storage-check"


class Executor(Protocol):
    """Runs ``fn(common, item)`` for each item; yields each item's key as it completes."""

    name: str

    def map(
        self, fn: Callable[[Any, Any], str], common: Any, items: Iterable[Any]
    ) -> Iterator[str]: ...

    def close(self) -> None: ...


class LocalExecutor:
    """Today's behaviour: every item in this process, one after another, in order."""

    name = "local"

    def map(
        self, fn: Callable[[Any, Any], str], common: Any, items: Iterable[Any]
    ) -> Iterator[str]:
        for item in items:
            yield fn(common, item)

    def close(self) -> None:
        pass


def _in_worker(fn: Callable[[Any, Any], str], threads: int, common: Any, item: Any) -> str:
    """Run one item inside a Ray worker, with ``threads`` torch threads."""
    import torch

    torch.set_num_threads(max(1, threads))
    return fn(common, item)


class RayExecutor:
    """Each item as one Ray task; Ray places them by ``cpus_per_task`` and ``gpus_per_task``.

    Parameters
    ----------
    address : str, default ""
        Empty starts a local Ray (unless this process already joined one); ``"auto"`` or
        ``"ray://host:port"`` joins a cluster.
    num_cpus : int, default 0
        CPUs a local Ray may use (0: all). Ignored when joining a cluster.
    cpus_per_task : float, default 1
        CPUs reserved per task; also its torch threads (at least 1).
    gpus_per_task : float, default 0
        GPUs reserved per task; fractions put several tasks on one GPU.
    max_retries : int, default 3
        Re-runs of a task whose worker died or that raised a transient error
        (:data:`TRANSIENT_ERRORS`).

    Raises
    ------
    DfrnInputError
        When Ray is not installed (naming ``pip install 'dfrn[distributed]'``), or cannot
        be started or reached.
    """

    name = "ray"

    def __init__(
        self,
        address: str = "",
        num_cpus: int = 0,
        cpus_per_task: float = 1.0,
        gpus_per_task: float = 0.0,
        max_retries: int = 3,
    ) -> None:
        try:
            import ray
        except ImportError:
            raise DfrnInputError(
                f"--executor ray needs Ray, which is not installed: {RAY_INSTALL_HINT}"
            ) from None
        self._ray = ray
        self.cpus_per_task = cpus_per_task
        self.gpus_per_task = gpus_per_task
        self.max_retries = max_retries
        self._started = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {
                "include_dashboard": False,
                "log_to_driver": False,
                "configure_logging": False,
            }
            if address:
                kwargs["address"] = address
            else:  # always a new local instance, never a cluster found by chance
                kwargs["address"] = "local"
                if num_cpus:
                    kwargs["num_cpus"] = num_cpus
            try:
                ray.init(**kwargs)
            except Exception as exc:  # noqa: BLE001 - Ray raises many types here
                where = f"the Ray cluster at {address!r}" if address else "a local Ray"
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise DfrnInputError(
                    f"cannot start or join {where} ([executor] address): {first}"
                ) from None
            self._started = True
        self._remote = ray.remote(
            num_cpus=cpus_per_task,
            num_gpus=gpus_per_task,
            max_retries=max_retries,
            retry_exceptions=list(TRANSIENT_ERRORS),
        )(_in_worker)

    def map(
        self, fn: Callable[[Any, Any], str], common: Any, items: Iterable[Any]
    ) -> Iterator[str]:
        """Submit every item at once; yield keys as tasks finish (completion order).

        A task's user error (a :class:`dfrn.errors.DfrnError`) is re-raised here as itself;
        the tasks still running are cancelled.
        """
        ray = self._ray
        common_ref = ray.put(common)
        threads = int(max(1, round(self.cpus_per_task)))
        pending = [self._remote.remote(fn, threads, common_ref, item) for item in items]
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                yield ray.get(done[0])
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, DfrnError):
                raise cause from None
            raise
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)

    def close(self) -> None:
        """Shut down the local Ray this executor started (a joined cluster stays up)."""
        if self._started and self._ray.is_initialized():
            self._ray.shutdown()
        self._started = False


def make_executor(
    kind: str,
    address: str = "",
    num_cpus: int = 0,
    cpus_per_task: float = 1.0,
    gpus_per_task: float = 0.0,
    max_retries: int = 3,
) -> Executor:
    """The executor for an ``[executor] kind`` (``"local"`` or ``"ray"``)."""
    if kind == "local":
        return LocalExecutor()
    if kind == "ray":
        return RayExecutor(address, num_cpus, cpus_per_task, gpus_per_task, max_retries)
    raise DfrnInputError(f"executor {kind!r} is not one of local, ray")


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
            f"{Path(path).parent} ({why}); with --executor ray the results folder must be on "
            "storage that every Ray worker shares, at the same path"
        )


def remove_storage_probe(path: str, token: str) -> None:
    """Remove the probe written by :func:`write_storage_probe` (when it is still ours)."""
    try:
        if Path(path).read_text(encoding="utf-8") == token:
            Path(path).unlink()
    except OSError:
        pass
