"""The 10 shared IXI scans through ``dfrn prep`` at 2 mm: the QC assertions for every scan.

This was the CI test ``test_registration_quality_on_the_ixi_scans`` on all 10 scans (about
4.5 minutes with 2 jobs); the test suite now runs 3 scans on a 4 mm template, and this script
keeps the 10-scan run and its assertions. It runs the ``dfrn prep`` command (SyN,
deterministic, ``--jobs`` subjects at a time) on the 1 mm MNI152NLin6Asym template resampled
to 2 mm (91×109×91), then asserts, for each of the 10 subjects:

* brain-mask Dice with the template's >= 0.90, T1 correlation in the brain >= 0.40, status ok;
* GM volume between 350 and 1100 ml (adults), GM share of the brain mask in 0.25–0.6;
* mean N4 T1 intensity CSF < GM < WM, recomputed from the written native dseg.

It prints the QC table and the wall time, and exits 1 when an assertion fails.

Usage::

    DFRN_TEST_DATA=../shared/data python benchmarks/bench_prep_ixi10.py [--jobs 2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def check(out: Path) -> list[str]:
    """The assertions of the former 10-scan test; returns what failed (empty: all hold)."""
    qc = pd.read_csv(out / "qc.tsv", sep="\t")
    problems = []
    if len(qc) != 10:
        problems.append(f"{len(qc)} subjects in qc.tsv, not 10")
    for name, ok in (
        ("dice >= 0.90", qc["dice"] >= 0.90),
        ("corr >= 0.40", qc["corr"] >= 0.40),
        ("status ok", qc["status"] == "ok"),
        ("gm_ml in 350-1100", qc["gm_ml"].between(350, 1100)),
        ("gm_fraction in 0.25-0.6", qc["gm_fraction"].between(0.25, 0.6)),
    ):
        if not ok.all():
            problems.append(f"{name} fails for {', '.join(qc.participant_id[~ok])}")
    for sub in sorted(out.glob("sub-*")):
        anat = sub / "anat"
        t1 = nib.load(anat / f"{sub.name}_desc-preproc_T1w.nii.gz").get_fdata()
        dseg = np.asarray(nib.load(anat / f"{sub.name}_dseg.nii.gz").dataobj)
        means = [float(t1[dseg == k].mean()) for k in (1, 2, 3)]
        if not means[0] < means[1] < means[2]:
            problems.append(f"{sub.name}: mean T1 of CSF, GM, WM not increasing: {means}")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--keep", type=Path, default=None, help="keep the outputs here")
    args = ap.parse_args()
    data = Path(os.environ.get("DFRN_TEST_DATA", ROOT.parent / "shared" / "data")).resolve()
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import mni_template  # the tests' template resampling, not a copy of it

    root = args.keep or Path(tempfile.mkdtemp(prefix="bench_prep_ixi10_"))
    root.mkdir(parents=True, exist_ok=True)
    tpl, mask = mni_template(data, root, 2)
    ixi = pd.read_csv(data / "ixi" / "participants.tsv", sep="\t", dtype=str)
    table = root / "participants.tsv"
    ixi.assign(t1=[str(data / "ixi" / f"{p}_T1w.nii.gz") for p in ixi.participant_id]).to_csv(
        table, sep="\t", index=False)
    out = root / "prep"
    code = "import sys; from dfrn.cli import main; sys.exit(main())"
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", code, "prep", str(table), "--out", str(out), "--template",
         str(tpl), "--template-mask", str(mask), "--jobs", str(args.jobs), "--no-progress"],
        capture_output=True, text=True, env={**os.environ, "MPLBACKEND": "Agg"},
    )
    wall = time.perf_counter() - t0
    print(f"{len(ixi)} IXI scans, SyN, 2 mm template, --jobs {args.jobs}, {os.cpu_count()} cores: "
          f"wall {wall:.0f} s (exit {proc.returncode})")
    if proc.returncode != 0:
        print(proc.stderr[-2000:])
        return 1
    qc = pd.read_csv(out / "qc.tsv", sep="\t")
    print(qc[["participant_id", "dice", "corr", "gm_ml", "gm_fraction", "runtime_s", "status"]]
          .to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    problems = check(out)
    for p in problems:
        print(f"FAIL: {p}")
    print("all assertions hold" if not problems else f"{len(problems)} assertion(s) failed")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
