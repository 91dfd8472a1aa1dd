"""Calibrated intervals and out-of-distribution flags of ``dfrn predict``.

Trains one package (factor ``sleep`` of the demo's generative model: age plus noise, read
from the age-driven atrophy) on a synthetic cohort with a lateralised brain (``asymmetry``),
then predicts new subjects from another seed (``dfrn synth``'s generator):

* the coverage of the CV+ intervals at 0.5 / 0.8 / 0.9 / 0.95 (fraction of new subjects
  whose true score lies in [lower, upper]) and their mean width;
* the in-distribution flag rate, and for each changed scan of
  :func:`dfrn.data.synth.shifted_scan` the flag rate, the detectors named, and the AUC of
  ``ood_score`` (changed scans against the unchanged new subjects; ties count half).

Run::

    python benchmarks/bench_predict_uncertainty.py --train 150 --new 400 --changed 60
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from dfrn.config import config_from_dict
from dfrn.data.synth import SHIFTS, make_synthetic_cohort, write_shifted_scans
from dfrn.workflows.demo import QUICK, synth_cohort
from dfrn.workflows.predict import predict_cohort
from dfrn.workflows.run import run_study

COVERAGES = (0.5, 0.8, 0.9, 0.95)


def _train(root: Path, args: argparse.Namespace) -> None:
    train = make_synthetic_cohort(
        root / "train", n_subjects=args.train, voxel_size=args.voxel, effect=QUICK.effect,
        radius=QUICK.radius, seed=5, age_effect=QUICK.age_effect, age_only="sleep",
        asymmetry=args.asymmetry)
    raw = {"cohort": {"table": str(train.table), "targets": ["sleep"],
                      "mask": str(train.brain_mask)},
           "model": {"widen_factor": args.width},
           "training": {"epochs": args.epochs, "val_fraction": 0.0},
           "cv": {"n_folds": args.folds, "n_repeats": 1, "seed": 1},
           "baseline": {"enabled": False}, "attention": {"enabled": False},
           "final": {"enabled": True}}
    run_study(config_from_dict(raw, train.root), root / "res", progress=False,
              log=lambda s: None)


def _auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a changed scan > an unchanged one's), ties counting half."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[pos, neg]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=150)
    ap.add_argument("--new", type=int, default=400)
    ap.add_argument("--changed", type=int, default=60)
    ap.add_argument("--voxel", type=float, default=8.0)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--width", type=float, default=0.125)
    ap.add_argument("--asymmetry", type=float, default=0.2)
    args = ap.parse_args()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _train(root, args)
        settings = dataclasses.replace(QUICK, voxel_size=args.voxel, asymmetry=args.asymmetry)
        table = synth_cohort(root / "new", args.new, seed=11, settings=settings,
                             progress=False, log=lambda s: None)
        truth = pd.read_csv(table, sep="\t", dtype={"participant_id": str}).set_index(
            "participant_id")["sleep"]
        print(f"| coverage | covered ({args.new} new subjects) | mean width |")
        print("|---|---|---|")
        base = None
        for c in COVERAGES:
            p = predict_cohort(root / "res", table, root / f"p{c}", coverage=c,
                               progress=False, log=lambda s: None).set_index("participant_id")
            y = truth.loc[p.index]
            print(f"| {c:g} | {((p['lower'] <= y) & (y <= p['upper'])).mean():.3f} | "
                  f"{(p['upper'] - p['lower']).mean():.3f} |")
            base = p if base is None else base
        changed = predict_cohort(root / "res", write_shifted_scans(table, root / "changed", args.changed),
                                 root / "pc", progress=False, log=lambda s: None)
        print("\n| scans | flagged | detectors named (share of scans) | AUC of ood_score |")
        print("|---|---|---|---|")
        print(f"| unchanged new subjects | {base['ood'].mean():.3f} | | |")
        for kind in SHIFTS:
            p = changed[changed["participant_id"].str.startswith(kind)]
            named = pd.Series([d for r in p["ood_reason"].fillna("") for d in r.split(", ") if d])
            words = ", ".join(f"{d} {n / len(p):.2f}" for d, n in named.value_counts().items())
            auc = _auc(p["ood_score"].to_numpy(), base["ood_score"].to_numpy())
            print(f"| {kind} | {p['ood'].mean():.3f} | {words} | {auc:.3f} |")
    print(f"\n{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
