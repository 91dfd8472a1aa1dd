"""The demo's ground truth for region ablation: the planted structure must rank first.

Runs ``dfrn demo`` (CPU-sized) into a new folder, reads ``attention/ablation_truth.tsv``
(the rank of the atlas region that covers each planted mask, in the region-ablation
ranking), prints the ranks and exits 1 unless every factor with a planted region ranks it
first (the demo plants four; ``sleep`` is age plus noise). It also prints where the
guided-backprop voxel map ranks the same regions, for comparison, and the wall time.

Run::

    python benchmarks/check_demo_ablation.py --out /tmp/demo-check
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

from dfrn.data.synth import REGIONS
from dfrn.workflows.demo import run_demo


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="a new folder")
    args = ap.parse_args()
    t0 = time.perf_counter()
    run_demo(args.out, progress=False, log=lambda s: None)
    wall = time.perf_counter() - t0
    truth = pd.read_csv(args.out / "attention/ablation_truth.tsv", sep="\t")
    voxel = pd.read_csv(args.out / "attention/regions.tsv", sep="\t")
    for r in truth.itertuples():
        name = REGIONS[r.factor][0]
        v = voxel[(voxel.factor == r.factor) & (voxel.region == name)]["rank"]
        print(f"{r.factor}: {r.region} ranks {r.rank} of {r.n_regions} by region ablation; "
              f"{name} ranks {int(v.iloc[0]) if len(v) else 'n/a'} by the guided-backprop map")
    first = int((truth["rank"] == 1).sum())
    print(f"planted region first for {first} of {len(truth)} factors; demo wall time {wall:.0f} s")
    return 0 if first == len(truth) and len(truth) >= 4 else 1


if __name__ == "__main__":
    sys.exit(main())
