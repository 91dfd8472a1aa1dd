"""Does starting from a pretrained network help a small study? (issue 31)

Source: 400 synthetic subjects at 8 mm whose easy target is age, which drives a broad
gray-matter atrophy (``age_effect``). ``dfrn run`` on it with ``[final] mode = "refit"``
writes the source package ``models/age/`` (one network trained on all 400).

Targets: five small cohorts (60 subjects each, one per seed) from the same generator, with
the same age atrophy and a weak planted anhedonia effect (the hippocampus darkens by
``EFFECT`` per SD of the score). On each, the same 3-fold CV (same folds, same training
seeds, 15 epochs) runs four ways: from scratch; ``init`` = the source package; ``init`` + ``freeze =
"backbone"``; ``init`` + ``backbone_lr_scale = 0.1``. Reported: the pooled out-of-fold r of
anhedonia per variant (mean ± sd over the five cohorts), the paired difference to scratch,
and the wall time.

Run::

    python benchmarks/bench_transfer.py /tmp/transfer            # about 15-30 min on 2 cores

Writes ``/tmp/transfer/transfer.tsv`` and prints the Markdown table for RESULTS.md.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pandas as pd
import torch

from dfrn.config import config_from_dict
from dfrn.data.synth import make_synthetic_cohort
from dfrn.workflows.run import run_study

SEEDS = (1, 2, 3, 4, 5)
EFFECT, AGE_EFFECT, WIDEN, EPOCHS = 0.15, 0.15, 0.25, 20
TARGET_SUBJECTS, TARGET_EPOCHS, TARGET_FOLDS = 60, 15, 3
VARIANTS = {
    "scratch": {},
    "init": {"init": "SOURCE"},
    "init + freeze backbone": {"init": "SOURCE", "freeze": "backbone"},
    "init + backbone lr × 0.1": {"init": "SOURCE", "backbone_lr_scale": 0.1},
}


def _config(table: Path, mask: Path, target: str, model: dict, cv_seed: int, final: dict,
            epochs: int = TARGET_EPOCHS, folds: int = TARGET_FOLDS):
    return config_from_dict({
        "cohort": {"table": str(table), "targets": [target], "mask": str(mask)},
        "model": {"widen_factor": WIDEN, **model},
        "training": {"epochs": epochs, "seed": cv_seed},
        "cv": {"n_folds": folds, "n_repeats": 1, "seed": cv_seed},
        "baseline": {"enabled": False}, "attention": {"enabled": False},
        "final": final,
    }, table.parent)


def make_source(root: Path) -> Path:
    """The source package: age on 400 subjects (2-fold CV for its log, then a refit)."""
    c = make_synthetic_cohort(root / "source_cohort", n_subjects=400, voxel_size=8.0,
                              effect=EFFECT, age_effect=AGE_EFFECT, radius=14.0, seed=100)
    cfg = _config(c.table, c.brain_mask, "age", {}, 0, {"enabled": True, "mode": "refit"},
                  epochs=EPOCHS, folds=2)
    t0 = time.perf_counter()
    res = run_study(cfg, root / "source", progress=False, log=lambda s: None)
    r = float(res.metrics["pearson_r"].iloc[0])
    print(f"source: age on 400 subjects, CV r = {r:.3f}, {time.perf_counter() - t0:.0f} s")
    return root / "source" / "models" / "age"


def run_target(root: Path, seed: int, package: Path) -> list[dict]:
    """The four variants on one target cohort, same folds and training seeds."""
    c = make_synthetic_cohort(root / f"target_{seed}", n_subjects=TARGET_SUBJECTS, voxel_size=8.0,
                              effect=EFFECT, age_effect=AGE_EFFECT, radius=14.0, seed=seed)
    rows = []
    for name, model in VARIANTS.items():
        model = {k: (str(package) if v == "SOURCE" else v) for k, v in model.items()}
        cfg = _config(c.table, c.brain_mask, "anhedonia", model, seed, {"enabled": False})
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        res = run_study(cfg, root / f"run_{seed}_{name.replace(' ', '_')}", progress=False,
                        log=lambda s: None)
        rows.append({"seed": seed, "variant": name,
                     "r": float(res.metrics["pearson_r"].iloc[0]),
                     "seconds": time.perf_counter() - t0})
        print(rows[-1], flush=True)
    return rows


def table(df: pd.DataFrame) -> str:
    """Mean ± sd of r per variant, the paired difference to scratch, and the wall time."""
    wide = df.pivot(index="seed", columns="variant", values="r")
    lines = ["| variant | r (mean ± sd over 5 cohorts) | Δr vs scratch (mean ± sd, paired) "
             "| better than scratch | wall time per CV (s, median) |", "|---|---|---|---|---|"]
    for name in VARIANTS:
        r, d = wide[name], wide[name] - wide["scratch"]
        secs = df.loc[df.variant == name, "seconds"].median()  # robust to a busy machine
        diff = "—" if name == "scratch" else f"{d.mean():+.3f} ± {d.std(ddof=1):.3f}"
        wins = "—" if name == "scratch" else f"{int((d > 0).sum())} of {len(d)}"
        lines.append(f"| {name} | {r.mean():.3f} ± {r.std(ddof=1):.3f} | {diff} | {wins} "
                     f"| {secs:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--table"]:  # the table again from a finished run's transfer.tsv
        print(table(pd.read_csv(sys.argv[2], sep="\t")))
        sys.exit(0)
    root = Path(sys.argv[1])
    root.mkdir(parents=True, exist_ok=True)
    package = make_source(root)
    rows = [row for seed in SEEDS for row in run_target(root, seed, package)]
    df = pd.DataFrame(rows)
    df.to_csv(root / "transfer.tsv", sep="\t", index=False)
    print(table(df))
