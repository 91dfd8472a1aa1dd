"""An exclusive lock on a dfrn results folder.

Two ``dfrn run`` processes on the same results folder must never both train: they would
do the same work twice and then collide while moving their results into place. Before it
writes anything, a run takes :class:`ResultsLock` on its folder; a second run on the same
folder is refused at once with a one-line :class:`ResultsFolderLocked` error that names
the process holding it.

How it works
------------
The lock is the file ``<folder>/.dfrn.lock`` locked with ``flock(LOCK_EX | LOCK_NB)``.

* A ``flock`` lock belongs to the *open file description*, not to the path or the
  process: a second :func:`os.open` of the same file, even in the same process, is
  refused while the first holds it. Forked children (``fork`` without ``exec``) share the
  description and so keep the lock alive until the last of them closes it; the file
  descriptor is not inherited across ``exec``.
* The kernel releases the lock when the last descriptor is closed, which includes the
  death of its process by any cause, ``SIGKILL`` and crashes included. A lock file left
  behind by a dead process is therefore free to take; the new holder logs a note naming
  the process it took over from.
* On network file systems Linux emulates ``flock`` with POSIX byte-range locks (NFS v4
  and later, and CIFS/SMB), which the server enforces, so the lock also works between
  runs on different hosts sharing the folder. File systems without working lock support
  make taking the lock fail with a one-line :class:`~dfrn.errors.DfrnError`.

While held, the file holds JSON ``{"pid", "host", "started", "command"}`` describing the
holder. These fields are for messages only: whether the folder is locked is decided by
the kernel's lock alone, never by the PID or host in the file (a PID may be reused, and
cannot be checked on another host). Releasing empties the file and then removes it while
still holding the lock; a newcomer that opened the removed file notices that it locked a
file no longer at the path and retries on the new one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from dfrn.errors import DfrnError

__all__ = ["LOCK_NAME", "ResultsFolderLocked", "ResultsLock", "lock_results"]

LOCK_NAME = ".dfrn.lock"

_BUSY = {errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES}
_MAX_TRIES = 50


class ResultsFolderLocked(DfrnError):
    """The results folder is locked by another running dfrn process."""


class ResultsLock:
    """An exclusive, non-blocking lock on a results folder.

    Parameters
    ----------
    folder
        The results folder; it is created, with its parents, if missing.
    command
        What the holder is running, written into the lock file for messages
        (e.g. ``"dfrn run study.toml"``).
    log
        Called with one line when the lock is taken over from a process that died
        without releasing it.
    name
        The lock file's name: ``.dfrn.lock`` locks the folder; ``dfrn prep``'s participant
        level locks one subject of it (``.dfrn-sub-<label>.lock``).
    what
        What is locked, for messages (default ``"results folder <folder>"``).

    Attributes
    ----------
    path : Path
        The lock file, ``<folder>/.dfrn.lock``.
    holder : dict or None
        When :meth:`acquire` was refused: what the lock file said about the process
        holding the lock (may be ``None`` or partial if the file could not be read).
    stale_holder : dict or None
        After a successful :meth:`acquire`: what the lock file said about a previous
        holder that died without releasing, else ``None``.

    Examples
    --------
    >>> with ResultsLock("results/study1", command="dfrn run study.toml"):  # doctest: +SKIP
    ...     train()
    """

    def __init__(
        self, folder: str | Path, command: str = "dfrn", log: Callable[[str], None] = print,
        name: str = LOCK_NAME, what: str = "",
    ) -> None:
        self.folder = Path(folder)
        self.path = self.folder / name
        self.what = what or f"results folder {self.folder}"
        self.command = command
        self.log = log
        self.holder: dict[str, Any] | None = None
        self.stale_holder: dict[str, Any] | None = None
        self._fd: int | None = None
        self._owner_pid: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def acquire(self) -> ResultsLock:
        """Take the lock, or raise :class:`ResultsFolderLocked` at once if it is held.

        Returns
        -------
        ResultsLock
            ``self``, holding the lock.

        Raises
        ------
        ResultsFolderLocked
            Another open lock, in this or another process, holds the folder.
        DfrnError
            The folder or lock file cannot be created, or the file system refuses locks.
        """
        if self._fd is not None:
            raise RuntimeError(f"the lock on {self.folder} is already held by this object")
        self.holder = None
        self.stale_holder = None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DfrnError(
                f"cannot create results folder {self.folder}: {exc.strerror or exc}"
            ) from None
        fd = self._lock_file_at_path()
        try:
            self._write_holder(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._owner_pid = os.getpid()
        if self.stale_holder is not None:
            old = self.stale_holder
            self.log(
                f"note: took over the lock of {self.what.removeprefix('results folder ')} left by PID {old.get('pid')} on "
                f"{old.get('host', 'an unknown host')} (started {old.get('started', 'at an unknown time')}), "
                "which is no longer running"
            )
        return self

    def _lock_file_at_path(self) -> int:
        """Open and lock the lock file now at :attr:`path`; its descriptor, or a refusal."""
        for _ in range(_MAX_TRIES):
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in _BUSY:
                    self.holder = _read_info_retrying(fd)
                    os.close(fd)
                    raise ResultsFolderLocked(self._refusal(self.holder)) from None
                os.close(fd)
                raise DfrnError(
                    f"cannot lock {self.path}: {exc.strerror or exc} (does this file system "
                    "support file locks?)"
                ) from None
            if _same_file(fd, self.path):
                return fd
            # The previous holder removed the file between our open and our lock: the lock
            # we hold is on an orphan. Let go and lock the file now at the path.
            os.close(fd)
        raise ResultsFolderLocked(  # pragma: no cover - needs a lock churned ~50 times in one call
            f"results folder {self.folder} is in use by another process (its lock file "
            "keeps changing); wait for it to finish, or stop that process and rerun"
        )

    def _write_holder(self, fd: int) -> None:
        """Note a dead previous holder in :attr:`stale_holder`; write this process as holder."""
        old = _read_info(fd)
        if old is not None and old.get("pid") not in (None, os.getpid()):
            self.stale_holder = old
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": self.command,
        }
        data = (json.dumps(info, sort_keys=True) + "\n").encode("utf-8")
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)

    def release(self) -> None:
        """Let go of the lock: empty the lock file, remove it, unlock and close.

        Does nothing if the lock is not held. In a forked child that inherited a held
        lock, only closes the child's copy of the descriptor: the parent keeps the lock.
        """
        fd, self._fd = self._fd, None
        if fd is None:
            return
        owner, self._owner_pid = self._owner_pid, None
        try:
            if owner == os.getpid():
                try:
                    os.ftruncate(fd, 0)
                except OSError:
                    pass
                try:
                    # Unlink only while still holding the lock, so no newcomer's file is
                    # removed; an empty leftover file is harmless if this fails.
                    if _same_file(fd, self.path):
                        self.path.unlink()
                except OSError:
                    pass
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> ResultsLock:
        # Already held: ``with lock_results(folder):`` enters a lock taken beforehand.
        return self if self.held else self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "held" if self.held else "not held"
        return f"ResultsLock({str(self.folder)!r}, {state})"

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            raise DfrnError(f"cannot open lock file {self.path}: {exc.strerror or exc}") from None

    def _refusal(self, info: dict[str, Any] | None) -> str:
        if info is None or info.get("pid") is None:
            who = "another process"
        else:
            who = (
                f"PID {info['pid']} on host {info.get('host', 'unknown')} (running "
                f"{info.get('command', 'dfrn')} since {info.get('started', 'an unknown time')})"
            )
        return (
            f"{self.what} is in use by {who}; wait for it to finish, or stop that process and "
            "rerun"
        )


@contextlib.contextmanager
def shared_lock(folder: str | Path) -> Iterator[None]:
    """Hold ``<folder>/.dfrn.lock`` shared: any number of shared holders at once, but not
    while a :class:`ResultsLock` holds it (and no :class:`ResultsLock` while they do).

    ``dfrn prep``'s participant-level processes hold it, so that a whole-folder ``dfrn prep``
    cannot run beside them. The file is neither written nor removed.

    Raises
    ------
    ResultsFolderLocked
        When a :class:`ResultsLock` holds the folder (its holder is named).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    for _ in range(_MAX_TRIES):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_info_retrying(fd) if exc.errno in _BUSY else None
            os.close(fd)
            if exc.errno not in _BUSY:
                raise DfrnError(f"cannot lock {path}: {exc.strerror or exc}") from None
            raise ResultsFolderLocked(ResultsLock(folder)._refusal(holder)) from None
        if _same_file(fd, path):
            break
        os.close(fd)  # an exclusive holder removed the file meanwhile: lock the new one
    else:  # pragma: no cover
        raise ResultsFolderLocked(f"results folder {folder} is in use by another process")
    try:
        yield
    finally:
        os.close(fd)


def lock_results(
    folder: str | Path, command: str = "dfrn", log: Callable[[str], None] = print
) -> ResultsLock:
    """Take and return a :class:`ResultsLock` on ``folder``; see there for the parameters."""
    return ResultsLock(folder, command=command, log=log).acquire()


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``fd`` is the file now at ``path``."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    own = os.fstat(fd)
    return (own.st_dev, own.st_ino) == (st.st_dev, st.st_ino)


def _read_info(fd: int) -> dict[str, Any] | None:
    """The holder JSON in the lock file, or ``None`` if empty, partial or not a holder."""
    try:
        raw = os.pread(fd, 65536, 0)
        info = json.loads(raw.decode("utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict):
        return None
    # One line per field, whatever the file held: the fields go into one-line messages.
    return {
        str(k): v if isinstance(v, int) and not isinstance(v, bool) else " ".join(str(v).split())
        for k, v in info.items()
    }


def _read_info_retrying(fd: int, tries: int = 5, pause: float = 0.02) -> dict[str, Any] | None:
    """:func:`_read_info`, retried briefly in case the holder is between truncate and write."""
    for i in range(tries):
        info = _read_info(fd)
        if info is not None or i == tries - 1:
            return info
        time.sleep(pause)
    return None  # pragma: no cover
