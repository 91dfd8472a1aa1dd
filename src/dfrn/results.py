"""The results folder: its identity, its resolved config and its environment.

A results folder holds ``run.json`` (the config fingerprint and the cohort data's digest),
``config.toml`` (the resolved config) and ``environment.json`` (Python, platform and package
versions). :func:`open_results_dir` starts a new run in an empty or absent folder, resumes
a run of the *same* config and data, and refuses anything else, so no result is ever
silently overwritten.
"""

from __future__ import annotations

import json
import platform
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from dfrn.config import StudyConfig
from dfrn.errors import ResultsFolderError
from dfrn.io import atomic_write_json, atomic_write_text, file_digest

__all__ = ["open_results_dir", "environment", "file_digest", "read_run_info"]

PACKAGES = (
    "dfrn",
    "torch",
    "numpy",
    "scipy",
    "pandas",
    "nibabel",
    "nilearn",
    "scikit-learn",
    "statsmodels",
    "captum",
    "matplotlib",
)



def environment() -> dict[str, Any]:
    """Versions of Python, the platform, key packages and the accelerator."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "packages": versions,
        "written": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    try:
        import torch

        env["cuda_available"] = bool(torch.cuda.is_available())
        if torch.cuda.is_available():
            env["cuda_device"] = torch.cuda.get_device_name(0)
            env["cuda_version"] = torch.version.cuda
    except Exception:  # pragma: no cover - torch is a hard dependency
        pass
    return env


def read_run_info(out: Path) -> dict[str, Any] | None:
    p = out / "run.json"
    if not p.is_file():
        return None
    return json.loads(p.read_text())


def open_results_dir(
    out: str | Path, cfg: StudyConfig, data_digest: str, allow_existing: tuple[str, ...] = ()
) -> bool:
    """Prepare ``out`` for this run. Returns True when resuming an earlier run.

    ``allow_existing`` names entries that may already be in a new folder (the demo writes
    its synthetic cohort there first).
    """
    out = Path(out)
    fingerprint = cfg.fingerprint()
    info = read_run_info(out)
    if info is not None:
        if info.get("fingerprint") != fingerprint:
            raise ResultsFolderError(
                f"results folder {out} holds a run of a different config "
                f"(fingerprint {info.get('fingerprint')} vs {fingerprint}); "
                "choose another --out, or rerun with the config saved in its config.toml"
            )
        if info.get("data_digest") != data_digest:
            raise ResultsFolderError(
                f"results folder {out} holds a run on different cohort data "
                "(the cohort table changed); choose another --out"
            )
        resuming = True
    else:
        if out.exists() and not out.is_dir():
            raise ResultsFolderError(f"results path {out} exists and is not a folder")
        if out.is_dir():
            extra = sorted(p.name for p in out.iterdir() if p.name not in allow_existing)
            if extra:
                raise ResultsFolderError(
                    f"results folder {out} is not empty and holds no dfrn run "
                    f"(found {', '.join(extra[:3])}); choose another --out"
                )
        resuming = False
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(
            out / "run.json",
            {
                "fingerprint": fingerprint,
                "data_digest": data_digest,
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
            },
        )
        atomic_write_text(out / "config.toml", cfg.to_toml())
    if not (out / "environment.json").exists():
        atomic_write_json(out / "environment.json", environment())
    else:  # keep the first environment; record the resuming one beside it
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        atomic_write_json(out / f"environment-resume-{stamp}.json", environment())
    return resuming
