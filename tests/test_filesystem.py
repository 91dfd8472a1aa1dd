"""Real file-system failures: a read-only results folder and a full disk give one-line errors.

Each case runs ``dfrn`` in a private mount namespace (``unshare -rm``) on a small or
read-only tmpfs, so nothing is mounted outside the test. Skipped where user namespaces are
not available.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import study_config


def _unshare_ok() -> bool:
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt && umount /mnt"],
        capture_output=True,
    )
    return probe.returncode == 0


pytestmark = pytest.mark.skipif(not _unshare_ok(), reason="needs unshare -rm and tmpfs mounts")


def _in_namespace(script: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run a Python script as root of a new user+mount namespace."""
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(script))
    env = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        ["unshare", "-rm", sys.executable, str(path)], capture_output=True, text=True, env=env,
        timeout=600,
    )


PRELUDE = """
import subprocess, sys
from pathlib import Path
from dfrn.cli import main

def mount(where, options):
    Path(where).mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", where], check=True)

def run(*args):
    rc = main([*args, "--no-progress"])
    print(f"RC={rc}", flush=True)
    return rc
"""


def test_read_only_results_folder_and_parent(tiny_cohort, tmp_path: Path) -> None:
    cfg = tmp_path / "study.toml"
    cfg.write_text(study_config(tiny_cohort, cohort={"targets": ["sleep"]}).to_toml())
    mnt = tmp_path / "mnt"
    result = _in_namespace(PRELUDE + f"""
mount("{mnt}", "size=256m")
assert run("run", "{cfg}", "--out", "{mnt}/res") == 0
subprocess.run(["mount", "-o", "remount,ro", "{mnt}"], check=True)
run("run", "{cfg}", "--out", "{mnt}/res")        # the results folder is read-only
run("attention", "{mnt}/res")                     # a later stage on it
run("run", "{cfg}", "--out", "{mnt}/new/res")    # the parent is read-only
""", tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("RC=2") == 3, (result.stdout, result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.startswith("dfrn: error")]
    assert len(errors) == 3, result.stderr
    assert all("Read-only file system" in e for e in errors), errors
    assert f"{mnt}/res" in errors[0] and f"{mnt}/res" in errors[1] and f"{mnt}/new" in errors[2]
    assert "Traceback" not in result.stderr


def test_full_disk_names_the_file_and_the_space(tiny_cohort, tmp_path: Path) -> None:
    cfg = tmp_path / "study.toml"
    # the paper's width: one network (55 MiB) does not fit the 8 MiB disk
    cfg.write_text(study_config(tiny_cohort, cohort={"targets": ["sleep"]},
                                model={"widen_factor": 1.0}).to_toml())
    mnt = tmp_path / "mnt"
    result = _in_namespace(PRELUDE + f"""
mount("{mnt}", "size=8m")
run("run", "{cfg}", "--out", "{mnt}/res")
# torch.save's own failure, without the size check in front of it
import torch
from dfrn.errors import DiskSpaceError
from dfrn.io import atomic_write
try:
    atomic_write("{mnt}/big.pt", lambda p: torch.save(torch.zeros(4_000_000), p))
except DiskSpaceError as exc:
    print("DISK:", exc, flush=True)
import os
print("LEFT:", sorted(os.listdir("{mnt}")), flush=True)
""", tmp_path)
    assert result.returncode == 0, result.stderr
    assert "RC=2" in result.stdout, (result.stdout, result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.startswith("dfrn: error")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "no space left on the device writing" in errors[0] and "model.pt" in errors[0]
    assert "needs about 54." in errors[0] and "MiB" in errors[0] and "free" in errors[0]
    disk = [line for line in result.stdout.splitlines() if line.startswith("DISK:")]
    assert len(disk) == 1 and f"{mnt}/big.pt" in disk[0] and "more than the" in disk[0]
    assert "LEFT: ['res']" in result.stdout  # no temporary file left behind
