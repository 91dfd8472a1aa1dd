"""Benchmark: a fixed set of small CV tasks on Ray with 1 and 2 workers against ``local``.

Baseline: ``--executor local`` (every task in this process, one after another). The same
study (a synthetic cohort, ``--folds`` folds × ``--repeats`` repeats × 2 factors) is run
into a fresh results folder by each executor, side by side in one run; every task gets one
torch thread. Ray's start-up is timed apart (it is paid once per ``dfrn run``). Each Ray
setting runs the study twice: cold (fresh workers: they import torch and dfrn and read the
cohort) and warm (the same workers again, into a new folder). Prints the wall time of each,
the speed-up over ``local``, and Ray's overhead per task (1 worker against local, divided by
the number of tasks), cold and warm. It also checks that every run gives the local run's
predictions (within 1e-6).

    python benchmarks/bench_executor.py [--subjects 16] [--epochs 3] [--folds 4] [--repeats 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dfrn.config import config_from_dict
from dfrn.data.synth import make_synthetic_cohort
from dfrn.workflows.run import run_study


def _cfg(synth, args, kind: str):
    raw = {
        "cohort": {"table": str(synth.table), "targets": ["anhedonia", "sleep"],
                   "mask": str(synth.brain_mask)},
        "training": {"epochs": args.epochs, "val_fraction": 0.0},
        "cv": {"n_folds": args.folds, "n_repeats": args.repeats, "seed": 1},
        "baseline": {"enabled": False}, "attention": {"enabled": False},
        "final": {"enabled": False},
        "executor": {"kind": kind, "cpus_per_task": 1},
    }
    return config_from_dict(raw, synth.root)


def _timed(cfg, out: Path) -> float:
    t = time.perf_counter()
    run_study(cfg, out, progress=False, log=lambda s: None)
    return time.perf_counter() - t


def main() -> None:
    import ray

    ap = argparse.ArgumentParser()
    ap.add_argument("--subjects", type=int, default=16)
    ap.add_argument("--voxel-size", type=float, default=6.0)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--folds", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    n_tasks = args.folds * args.repeats * 2
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        root = Path(tmp)
        synth = make_synthetic_cohort(root / "c", n_subjects=args.subjects,
                                      voxel_size=args.voxel_size, seed=0)
        # warm the volume cache and the imports, so no run pays for them
        run_study(_cfg(synth, args, "local"), root / "warm", progress=False, log=lambda s: None)
        local = _timed(_cfg(synth, args, "local"), root / "local")
        walls, warm, starts = {}, {}, {}
        for workers in (1, 2):
            t = time.perf_counter()
            ray.init(address="local", num_cpus=workers, include_dashboard=False,
                     log_to_driver=False, _temp_dir=str(root / f"ray{workers}"))
            starts[workers] = time.perf_counter() - t
            walls[workers] = _timed(_cfg(synth, args, "ray"), root / f"ray-{workers}")
            warm[workers] = _timed(_cfg(synth, args, "ray"), root / f"ray-{workers}-warm")
            ray.shutdown()
        ref = pd.read_csv(root / "local/cv/predictions.tsv", sep="\t")
        for name in ("ray-1", "ray-2", "ray-1-warm", "ray-2-warm"):
            got = pd.read_csv(root / f"{name}/cv/predictions.tsv", sep="\t")
            diff = float(np.max(np.abs(got["y_pred"] - ref["y_pred"])))
            assert diff <= 1e-6, f"{name} differs from local by {diff}"
        shape = f"input grid from a {args.voxel_size:g} mm synthetic cohort"
        print(f"{n_tasks} tasks ({args.repeats} repeats x {args.folds} folds x 2 factors), "
              f"{args.subjects} subjects, {shape}, {args.epochs} epochs, 1 torch thread per task")
        print(f"local (baseline):  {local:.1f} s ({local / n_tasks:.2f} s per task)")
        for workers in (1, 2):
            print(f"ray, {workers} worker(s): cold {walls[workers]:.1f} s (speed-up "
                  f"{local / walls[workers]:.2f}x), warm {warm[workers]:.1f} s (speed-up "
                  f"{local / warm[workers]:.2f}x); Ray start-up {starts[workers]:.1f} s, apart")
        print(f"Ray overhead per task (1 worker vs local): cold {(walls[1] - local) / n_tasks:.2f}"
              f" s, warm {(warm[1] - local) / n_tasks:.2f} s; every run's predictions equal "
              "local's within 1e-6")


if __name__ == "__main__":
    main()
