"""The Ray executor: each unit of work as a plain Ray task, on cores, GPUs or machines.

``ray.remote`` with ``num_cpus``, ``num_gpus``, ``max_retries`` and ``retry_exceptions`` for
transient errors only: Ray re-runs a task whose worker died. See :mod:`dfrn.executors.base`
for the protocol every executor follows.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from dfrn.errors import TRANSIENT_ERRORS, DfrnError, DfrnInputError

__all__ = ["RayExecutor", "RAY_INSTALL_HINT"]

#: What to install for ``--executor ray``.
RAY_INSTALL_HINT = "pip install 'dfrn[distributed]'"
_RAY_TOKEN_LOGGER = "ray._private.authentication.authentication_token_setup"


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
    #: Seconds without a finished task after which :meth:`map` logs the wait.
    pending_log_s: float = 300.0

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
            # Ray's notice that a new local cluster uses token authentication is not for
            # dfrn's users (its stderr carries one line per event); Ray's errors still show.
            logging.getLogger(_RAY_TOKEN_LOGGER).setLevel(logging.ERROR)
            try:
                with _own_signal_handlers():
                    ray.init(**kwargs)
            except Exception as exc:  # noqa: BLE001 - Ray raises many types here
                where = f"the Ray cluster at {address!r}" if address else "a local Ray"
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise DfrnInputError(
                    f"cannot start or join {where} ([executor] address): {first}"
                ) from None
            self._started = True
        self._joined = bool(address)
        try:
            self._check_feasible()
        except DfrnInputError:
            self.close()
            raise
        self._remote = ray.remote(
            num_cpus=cpus_per_task,
            num_gpus=gpus_per_task,
            max_retries=max_retries,
            retry_exceptions=list(TRANSIENT_ERRORS),
        )(_in_worker)

    def _check_feasible(self) -> None:
        """Refuse a per-task request that no node of the cluster can ever hold.

        Ray leaves such a task pending for ever, silently (its own warning goes to the
        worker logs, which are not forwarded). A local Ray cannot grow, so the request is
        refused; a joined cluster may autoscale, so there it is a warning and
        :meth:`map` logs the wait.
        """
        nodes = [n.get("Resources", {}) for n in self._ray.nodes() if n.get("Alive")]
        most_cpu = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
        most_gpu = max((n.get("GPU", 0.0) for n in nodes), default=0.0)
        over = [
            f"[executor] {key} = {want:g} but the largest Ray node has {have:g} {unit}"
            for key, want, have, unit in (
                ("cpus_per_task", self.cpus_per_task, most_cpu, "CPU"),
                ("gpus_per_task", self.gpus_per_task, most_gpu, "GPU"),
            )
            if want > have
        ]
        if not over:
            return
        message = (
            f"{'; '.join(over)} ({_cluster_summary(self._ray)}): no task could ever be "
            "scheduled; lower the request or give Ray more resources ([executor] num_cpus)"
        )
        if not self._joined:
            raise DfrnInputError(message)
        warnings.warn(f"{message}; waiting in case the cluster adds nodes", UserWarning,
                      stacklevel=3)

    def map(
        self, fn: Callable[[Any, Any], str], common: Any, items: Iterable[Any]
    ) -> Iterator[str]:
        """Submit every item at once; yield keys as tasks finish (completion order).

        A task's user error (a :class:`dfrn.errors.DfrnError`) is re-raised here as itself;
        the tasks still running are cancelled. When no task finishes for
        :attr:`pending_log_s` seconds, a warning says how many are waiting, what each asks
        for and what the cluster has free.
        """
        ray = self._ray
        common_ref = ray.put(common)
        threads = int(max(1, round(self.cpus_per_task)))
        pending = [self._remote.remote(fn, threads, common_ref, item) for item in items]
        try:
            waited = 0.0
            while pending:
                done, pending = _wait(ray, pending, self.pending_log_s)
                if not done:
                    waited += self.pending_log_s
                    warnings.warn(self._waiting(len(pending), waited), UserWarning, stacklevel=2)
                    continue
                waited = 0.0
                yield ray.get(done[0])
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, DfrnError):
                raise cause from None
            raise
        finally:
            # A local Ray is shut down by close(), which ends its workers; force-cancelling
            # first races with their replies and trips a check in Ray's core (a C++ crash).
            if not self._started:
                for ref in pending:
                    ray.cancel(ref, force=True)

    def _waiting(self, n: int, seconds: float) -> str:
        """The line logged while tasks wait (see :meth:`map`)."""
        return (
            f"Ray: no task finished for {seconds / 60:.0f} minutes; {n} task(s) still pending or "
            f"running, each asking for {self.cpus_per_task:g} CPU and {self.gpus_per_task:g} "
            f"GPU ({_cluster_summary(self._ray)})"
        )

    def attach(self, folder: Path, log: Callable[[str], None] = print) -> None:
        """Nothing to do: Ray ends a killed driver's tasks itself."""

    def close(self) -> None:
        """Shut down the local Ray this executor started (a joined cluster stays up)."""
        if self._started and self._ray.is_initialized():
            self._ray.shutdown()
        self._started = False


def _wait(ray: Any, pending: list[Any], timeout: float) -> tuple[list[Any], list[Any]]:
    """``ray.wait`` for one task, letting an interrupt through as itself.

    A signal handler that raises (dfrn's SIGTERM and Ctrl-C) while Ray's compiled ``wait``
    runs surfaces as a ``SystemError`` whose cause is the interrupt; re-raise the interrupt.
    """
    try:
        return ray.wait(pending, num_returns=1, timeout=timeout)
    except SystemError as exc:
        cause: BaseException | None = exc
        while cause is not None and isinstance(cause, Exception):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise cause from None


def _cluster_summary(ray: Any) -> str:
    """``cluster: N node(s), C CPU (F free), G GPU (H free)`` for messages."""
    total, free = ray.cluster_resources(), ray.available_resources()
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    return (
        f"cluster: {nodes} node(s), {total.get('CPU', 0):g} CPU ({free.get('CPU', 0):g} free), "
        f"{total.get('GPU', 0):g} GPU ({free.get('GPU', 0):g} free)"
    )


@contextlib.contextmanager
def _own_signal_handlers() -> Iterator[None]:
    """Keep this process's SIGTERM and SIGINT handlers across ``ray.init``.

    ``ray.init`` replaces the driver's SIGTERM handler by ``sys.exit(15)``, and Ray's core
    worker installs a C++ handler that prints a stack trace on SIGTERM; re-installing
    dfrn's handlers (which ``dfrn`` turns into a clean exit 143 or 130) removes both.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            if handler is not None:
                signal.signal(sig, handler)

