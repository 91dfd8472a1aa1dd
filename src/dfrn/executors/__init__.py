"""Executors layer: where a study's units of work run (this process, Ray, SLURM).

Every stage that fans out work (CV tasks, network permutations, region ablation, ``dfrn prep``
subjects) hands a pure function and its items to one of these; the task protocol and the
storage probe are in :mod:`dfrn.executors.base`. It sits below ``workflows`` and beside
``evaluation``: the CV loop takes an executor but never imports Ray or submitit.

Public names are re-exported here and imported on first use, so importing one
module of the layer does not import the others (nor Ray, nor submitit).
"""

from __future__ import annotations

from dfrn._exports import lazy_exports

_EXPORTS: dict[str, str] = {
    "Executor": "base",
    "LocalExecutor": "base",
    "TRANSIENT_ERRORS": "base",
    "check_storage_probe": "base",
    "make_executor": "base",
    "remove_storage_probe": "base",
    "write_storage_probe": "base",
    "RAY_INSTALL_HINT": "ray_executor",
    "RayExecutor": "ray_executor",
    "SLURM_INSTALL_HINT": "slurm",
    "SlurmExecutor": "slurm",
    "SlurmSettings": "slurm",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
