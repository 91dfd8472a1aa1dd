"""The results-folder lock, with real child processes and real signals."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import dfrn
from dfrn.errors import DfrnError
from dfrn.workflows.lock import LOCK_NAME, ResultsFolderLocked, ResultsLock, lock_results

DEADLINE = 60.0

CHILD = """
import sys, time
from dfrn.workflows.lock import ResultsLock
lock = ResultsLock(sys.argv[1], command="dfrn run child").acquire()
if sys.argv[2] == "stdin":
    sys.stdin.read()
    lock.release()
else:
    time.sleep(600)
"""


class Children:
    """Start lock-holding child processes; kill any still running at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, folder: Path, mode: str = "sleep") -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        src = str(Path(dfrn.__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
        err = open(self.tmp_path / f"child{len(self.procs)}.err", "wb")
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(folder), mode],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
        )
        err.close()
        proc.err_path = self.tmp_path / f"child{len(self.procs)}.err"  # type: ignore[attr-defined]
        self.procs.append(proc)
        wait_for_holder(folder / LOCK_NAME, proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=DEADLINE)
            if proc.stdin is not None:
                proc.stdin.close()


@pytest.fixture
def children(tmp_path: Path) -> Iterator[Children]:
    kids = Children(tmp_path)
    try:
        yield kids
    finally:
        kids.close()


def read_info(path: Path) -> dict | None:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def wait_for_holder(path: Path, proc: subprocess.Popen[bytes]) -> dict:
    """Poll until the lock file names ``proc`` as holder (or fail if the child died)."""
    end = time.monotonic() + DEADLINE
    while time.monotonic() < end:
        info = read_info(path)
        if info is not None and info.get("pid") == proc.pid:
            return info
        if proc.poll() is not None:
            err = Path(proc.err_path).read_text(errors="replace")  # type: ignore[attr-defined]
            pytest.fail(f"child exited with {proc.returncode} before locking:\n{err}")
        time.sleep(0.05)
    pytest.fail(f"child {proc.pid} did not write {path} within {DEADLINE} s")


def wait_gone(proc: subprocess.Popen[bytes]) -> int:
    return proc.wait(timeout=DEADLINE)


def test_running_child_blocks_parent_until_terminated(tmp_path: Path, children: Children) -> None:
    folder = tmp_path / "res"
    child = children.start(folder)

    lock = ResultsLock(folder, command="dfrn run parent")
    with pytest.raises(ResultsFolderLocked) as caught:
        lock.acquire()
    msg = str(caught.value)
    assert "\n" not in msg
    assert f"PID {child.pid} " in msg
    assert f"on host {socket.gethostname()} " in msg
    assert "running dfrn run child since " in msg
    assert msg.startswith(f"results folder {folder} is in use by PID {child.pid}")
    assert msg.endswith("; wait for it to finish, or stop that process and rerun")
    assert isinstance(caught.value, DfrnError)
    assert lock.holder is not None and lock.holder["pid"] == child.pid
    assert not lock.held
    # The refused attempt did not disturb the holder's record.
    assert read_info(folder / LOCK_NAME)["pid"] == child.pid

    os.kill(child.pid, signal.SIGTERM)
    assert wait_gone(child) == -signal.SIGTERM

    notes: list[str] = []
    with ResultsLock(folder, command="dfrn run parent", log=notes.append) as again:
        assert again.held
        assert read_info(folder / LOCK_NAME)["pid"] == os.getpid()
    # Default SIGTERM ends the child without cleanup, so its record was left behind.
    assert len(notes) == 1 and f"PID {child.pid} " in notes[0]


def test_sigkilled_holder_is_taken_over(tmp_path: Path, children: Children) -> None:
    folder = tmp_path / "res"
    child = children.start(folder)
    os.kill(child.pid, signal.SIGKILL)
    assert wait_gone(child) == -signal.SIGKILL

    stale = read_info(folder / LOCK_NAME)
    assert stale is not None and stale["pid"] == child.pid  # the dead child's record remains

    notes: list[str] = []
    lock = lock_results(folder, command="dfrn run parent", log=notes.append)
    try:
        assert lock.held
        assert lock.stale_holder is not None and lock.stale_holder["pid"] == child.pid
        assert len(notes) == 1
        note = notes[0]
        assert note.startswith(f"note: took over the lock of {folder} left by PID {child.pid} ")
        assert f"on {socket.gethostname()} (started {stale['started']})" in note
        assert note.endswith("which is no longer running")
        assert "\n" not in note
        assert read_info(folder / LOCK_NAME)["pid"] == os.getpid()
    finally:
        lock.release()


def test_child_that_releases_leaves_no_file_and_no_note(tmp_path: Path, children: Children) -> None:
    folder = tmp_path / "res"
    child = children.start(folder, mode="stdin")
    with pytest.raises(ResultsFolderLocked):
        ResultsLock(folder).acquire()

    assert child.stdin is not None
    child.stdin.close()  # the child reads EOF, releases and exits
    assert wait_gone(child) == 0
    assert not (folder / LOCK_NAME).exists()

    notes: list[str] = []
    with ResultsLock(folder, log=notes.append) as lock:
        assert lock.stale_holder is None
    assert notes == []


def test_two_locks_in_one_process(tmp_path: Path) -> None:
    folder = tmp_path / "a" / "b" / "res"  # parents are created
    notes: list[str] = []
    first = ResultsLock(folder, log=notes.append).acquire()
    second = ResultsLock(folder, log=notes.append)
    with pytest.raises(ResultsFolderLocked, match=rf"in use by PID {os.getpid()} on host "):
        second.acquire()
    assert second.holder is not None and second.holder["pid"] == os.getpid()

    first.release()
    assert not first.held
    assert not (folder / LOCK_NAME).exists()
    first.release()  # idempotent
    second.acquire()
    assert second.held and second.holder is None
    first.release()  # a released object does not touch the lock now held by another
    assert second.held
    assert read_info(folder / LOCK_NAME)["pid"] == os.getpid()
    with pytest.raises(ResultsFolderLocked):
        ResultsLock(folder).acquire()
    second.release()
    second.release()
    assert notes == []  # our own PID is never reported as a dead holder


def test_context_manager_releases_on_exception(tmp_path: Path) -> None:
    folder = tmp_path / "res"
    with pytest.raises(KeyError):
        with ResultsLock(folder) as lock:
            assert lock.held
            raise KeyError("boom")
    assert not lock.held
    assert not (folder / LOCK_NAME).exists()
    with lock_results(folder) as again:  # free again
        assert again.held


def test_acquire_twice_on_one_object_is_a_bug(tmp_path: Path) -> None:
    with ResultsLock(tmp_path / "res") as lock:
        with pytest.raises(RuntimeError):
            lock.acquire()


def test_lock_file_content_while_held(tmp_path: Path) -> None:
    folder = tmp_path / "res"
    with ResultsLock(folder, command="dfrn run study.toml"):
        info = json.loads((folder / LOCK_NAME).read_text(encoding="utf-8"))
        assert set(info) == {"pid", "host", "started", "command"}
        assert info["pid"] == os.getpid()
        assert info["host"] == socket.gethostname()
        assert info["command"] == "dfrn run study.toml"
        assert info["started"].endswith("+00:00")


@pytest.mark.parametrize("content", [b"", b'{"pid": 12', b"not json\n", b"[1, 2]"])
def test_unreadable_holder_is_another_process(tmp_path: Path, content: bytes) -> None:
    folder = tmp_path / "res"
    folder.mkdir()
    path = folder / LOCK_NAME
    path.write_bytes(content)
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a holder that wrote no record
        lock = ResultsLock(folder)
        with pytest.raises(ResultsFolderLocked) as caught:
            lock.acquire()
        assert str(caught.value) == (
            f"results folder {folder} is in use by another process; wait for it to finish, "
            "or stop that process and rerun"
        )
        assert lock.holder is None
    finally:
        os.close(fd)
    # Once that descriptor is closed, the garbage is no record of a holder: no note.
    notes: list[str] = []
    with ResultsLock(folder, log=notes.append):
        pass
    assert notes == []


RACER = """
import os, sys, time
from dfrn.workflows.lock import ResultsFolderLocked, ResultsLock
folder, marker, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
done = 0
while done < rounds:
    try:
        lock = ResultsLock(folder, log=lambda line: None).acquire()
    except ResultsFolderLocked:
        continue
    try:
        # Only the one holder may create the marker; a second one at once fails here.
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        time.sleep(0.0005)  # widen the window in which a second holder would show
        os.unlink(marker)
    finally:
        lock.release()
    done += 1
"""


def test_racing_processes_never_hold_the_lock_together(tmp_path: Path) -> None:
    """Processes acquiring and releasing in a tight loop exclude each other.

    This also covers the unlink on release: a process that opened the lock file just
    before its holder removed it must not lock that orphan while another process locks
    the new file (without the inode check in ``acquire`` this test fails).
    """
    folder = tmp_path / "res"
    marker = tmp_path / "inside"
    env = dict(os.environ)
    src = str(Path(dfrn.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(folder), str(marker), "300"],
            stderr=subprocess.PIPE,
            env=env,
        )
        for _ in range(8)
    ]
    try:
        errors = [p.communicate(timeout=120)[1].decode(errors="replace") for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0] * 8, "\n".join(errors)
    assert not marker.exists()
