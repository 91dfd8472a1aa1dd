"""Benchmark ``dfrn prep`` at 1 mm: seconds per subject and Dice, affine vs SyN, side by side.

Runs the shared IXI scans (native, with skull, 2 mm) through ``run_prep`` onto the 1 mm
MNI152NLin6Asym template, once with ``transform = "affine"`` (the baseline, like Clinica's
``t1-linear``) and once with ``"syn"``, deterministic (one ITK thread per subject), ``--jobs``
subjects at a time. Prints the per-subject Dice, correlation and seconds, the mean seconds per
subject, the SyN/affine time ratio measured in this one run, and the ratio to Clinica
``t1-linear``'s anchor of about 6 minutes per subject.

Usage::

    DFRN_TEST_DATA=../shared/data python benchmarks/bench_prep.py [--jobs 2] [--subjects 10]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import pandas as pd

CLINICA_T1_LINEAR_S = 360.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--subjects", type=int, default=10)
    ap.add_argument("--modes", default="affine,syn")
    ap.add_argument("--keep", type=Path, default=None, help="keep the outputs here")
    args = ap.parse_args()
    data = Path(os.environ.get("DFRN_TEST_DATA", "../shared/data")).resolve()
    from dfrn.workflows.prep import run_prep

    ixi = pd.read_csv(data / "ixi" / "participants.tsv", sep="\t").head(args.subjects)
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench_prep_"))
    root.mkdir(parents=True, exist_ok=True)
    table = root / "participants.tsv"
    ixi.assign(t1=[str(data / "ixi" / f"{p}_T1w.nii.gz") for p in ixi.participant_id]).to_csv(
        table, sep="\t", index=False)
    tpl = data / "mni152" / "tpl-MNI152NLin6Asym_res-01_T1w.nii.gz"
    mask = data / "mni152" / "tpl-MNI152NLin6Asym_res-01_desc-brain_mask.nii.gz"
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"{len(ixi)} IXI subjects at 1 mm, --jobs {args.jobs}, deterministic")
    results = {}
    for mode in args.modes.split(","):
        out = root / f"prep-{mode}"
        t0 = time.perf_counter()
        summary = run_prep(table, out, transform=mode, template=tpl, template_mask=mask,
                           jobs=args.jobs, progress=False, log=lambda m: None,
                           raise_on_failure=False)
        wall = time.perf_counter() - t0
        qc = summary.qc
        results[mode] = (qc, wall)
        print(f"\n[{mode}] wall {wall:.0f} s for {len(qc)} subjects "
              f"({wall / len(qc):.0f} s per subject at --jobs {args.jobs})")
        print(qc[["participant_id", "dice", "corr", "gm_ml", "runtime_s", "status"]]
              .to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        print(f"[{mode}] mean {qc.runtime_s.mean():.0f} s per subject (one process, one thread); "
              f"Dice min {qc.dice.min():.3f}, mean {qc.dice.mean():.3f}; "
              f"vs Clinica t1-linear ~{CLINICA_T1_LINEAR_S:.0f} s: "
              f"{qc.runtime_s.mean() / CLINICA_T1_LINEAR_S:.2f}x")
    if "affine" in results and "syn" in results:
        ratio = results["syn"][0].runtime_s.mean() / results["affine"][0].runtime_s.mean()
        print(f"\nratio SyN / affine seconds per subject (same run): {ratio:.2f}")


if __name__ == "__main__":
    main()
