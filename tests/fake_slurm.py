"""A one-node stand-in for SLURM's sbatch, srun, sacct and scancel, for the executor's tests.

It runs the batch scripts submitit writes, one process group per array element, with the
environment SLURM gives a job (``SLURM_ARRAY_JOB_ID``, ``SLURM_ARRAY_TASK_ID`` …), and keeps
each element's state in ``$FAKE_SLURM_DIR`` for ``sacct``. ``sbatch`` also records its
``#SBATCH`` options and which ``SLURM_*`` variables it inherited, for the tests to check.
Usage: ``python fake_slurm.py {sbatch,srun,sacct,scancel,_run} ARGS``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

STATE = Path(os.environ.get("FAKE_SLURM_DIR", "/nonexistent"))


def _next_id() -> int:
    path = STATE / "next_id"
    jid = int(path.read_text()) if path.is_file() else 1000
    path.write_text(str(jid + 1))
    return jid


def sbatch(args: list[str]) -> None:
    script = Path(args[-1])
    opts = dict(re.findall(r"^#SBATCH --([\w-]+)=(.*)$", script.read_text(), re.M))
    jid = _next_id()
    inherited = sorted(k for k in os.environ if k.startswith("SLURM_") and k != "SLURM_CONF")
    (STATE / f"{jid}.json").write_text(json.dumps({"options": opts, "inherited": inherited}))
    lo, hi = (int(x) for x in opts.get("array", "0-0").split("%")[0].split("-"))
    for a in range(lo, hi + 1):
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env.update(SLURM_JOB_ID=str(jid * 1000 + a), SLURM_ARRAY_JOB_ID=str(jid),
                   SLURM_ARRAY_TASK_ID=str(a), SLURM_NTASKS="1", SLURM_JOB_NUM_NODES="1",
                   SLURM_NODEID="0", SLURM_JOB_NODELIST="localhost", SLURM_PROCID="0",
                   SLURM_LOCALID="0")
        (STATE / f"{jid}_{a}.state").write_text("RUNNING")
        subprocess.Popen([sys.executable, __file__, "_run", f"{jid}_{a}", str(script)], env=env,
                         start_new_session=True, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    print(f"Submitted batch job {jid}")


def run(key: str, script: str) -> None:
    """One array element: the batch script in this process group; then its final state."""
    (STATE / f"{key}.pgid").write_text(str(os.getpgid(0)))
    rc = subprocess.call(["bash", script])
    path = STATE / f"{key}.state"
    if not path.read_text().startswith("CANCELLED"):
        path.write_text("COMPLETED" if rc == 0 else "FAILED")


def srun(args: list[str]) -> None:
    files: dict[str, str] = {}
    while args and args[0].startswith("--"):
        flag = args.pop(0)
        if flag in ("--output", "--error"):
            files[flag] = args.pop(0)
    env = os.environ
    for flag, pattern in files.items():
        files[flag] = (pattern.replace("%A", env["SLURM_ARRAY_JOB_ID"])
                       .replace("%a", env["SLURM_ARRAY_TASK_ID"]).replace("%t", "0")
                       .replace("%j", env["SLURM_JOB_ID"]))
    with open(files["--output"], "a") as out, open(files["--error"], "a") as err:
        sys.exit(subprocess.call(args, stdout=out, stderr=err))


def sacct(args: list[str]) -> None:
    print("JobID|State|NodeList")
    ids = [args[i + 1] for i, a in enumerate(args) if a == "-j"]
    for jid in ids:
        for path in sorted(STATE.glob(f"{jid.split('_')[0]}_*.state")):
            print(f"{path.name[:-len('.state')]}|{path.read_text()}|localhost")


def scancel(args: list[str]) -> None:
    for key in (a for a in args if not a.startswith("-")):
        paths = [STATE / f"{key}.state"] if "_" in key else list(STATE.glob(f"{key}_*.state"))
        for path in paths:
            if not path.is_file() or path.read_text() != "RUNNING":
                continue
            path.write_text("CANCELLED by 0")
            pgid = path.with_suffix(".pgid")
            if pgid.is_file():
                try:
                    os.killpg(int(pgid.read_text()), signal.SIGKILL)
                except ProcessLookupError:
                    pass


if __name__ == "__main__":
    command, rest = sys.argv[1], sys.argv[2:]
    {"sbatch": sbatch, "srun": srun, "sacct": sacct, "scancel": scancel,
     "_run": lambda a: run(*a)}[command](rest)
