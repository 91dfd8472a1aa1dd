"""``dfrn run`` on the demo cohort with each training-recipe option, through the real CLI.

It writes the demo's synthetic cohort once (``dfrn demo``'s settings), then for each option
writes the demo's study config with that option changed and runs ``dfrn run CONFIG --out
DIR --no-progress`` in a subprocess. Printed per option: exit code, seconds, Table 1 mean r
per factor, and the training sentence the run logged. The baseline and the permutation tests
are switched off (they do not depend on the recipe); attention and region ablation run for
the options that change which networks they read (joint heads, several seeds) and for the
defaults.

Run::

    python benchmarks/check_demo_recipe.py --out /tmp/dfrn-demo-recipe
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import tomli_w

from dfrn.data.synth import make_demo_atlases, make_synthetic_cohort
from dfrn.workflows.demo import AGE_ONLY, QUICK, demo_config

OPTIONS: dict[str, dict] = {
    "paper (defaults)": {},
    "heads joint": {"model": {"heads": "joint"}},
    "early_stopping smoothed": {"training": {"early_stopping": "smoothed", "val_fraction": 0.1,
                                             "epochs": 8, "min_epochs": 4, "patience": 3}},
    "early_stopping none": {"training": {"early_stopping": "none"}},
    "augment light": {"training": {"augment": "light"}},
    "weight_decay + cosine": {"training": {"weight_decay": 0.01, "lr_schedule": "cosine"}},
    "n_seeds 2": {"training": {"n_seeds": 2}},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/dfrn-demo-recipe"))
    ap.add_argument("--only", nargs="*", default=None, help="run only these options")
    args = ap.parse_args()
    synth = args.out / "synth"
    if not (synth / "participants.tsv").is_file():
        cohort = make_synthetic_cohort(
            synth, n_subjects=QUICK.n_subjects, voxel_size=QUICK.voxel_size, effect=QUICK.effect,
            radius=QUICK.radius, seed=0, age_effect=QUICK.age_effect, age_only=AGE_ONLY)
        make_demo_atlases(cohort, seed=0, n_region_parcels=30)
    base = demo_config(synth.resolve(), QUICK, 0).to_dict()
    base["baseline"]["enabled"] = False
    base["confounds"]["n_permutations"] = 0
    failures = 0
    for i, (name, change) in enumerate(OPTIONS.items()):
        if args.only and name not in args.only:
            continue
        raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
        for section, values in change.items():
            raw[section] = {**raw[section], **values}
        reads_networks = name in ("paper (defaults)", "heads joint", "n_seeds 2")
        raw["attention"] = {**raw["attention"], "enabled": reads_networks}
        config = args.out / f"option-{i}.toml"
        config.write_text(tomli_w.dumps(raw))
        out = args.out / f"run-{i}"
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "dfrn.cli", "run", str(config), "--out",
                               str(out), "--no-progress"], capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        failures += proc.returncode != 0
        line = next((x for x in proc.stdout.splitlines() if x.startswith("training:")), "")
        mean = ""
        if proc.returncode == 0:
            m = pd.read_csv(out / "cv/metrics.tsv", sep="\t")
            mean = ", ".join(f"{f} {r:.2f}" for f, r in
                             m.groupby("factor", sort=False)["pearson_r"].mean().items())
        else:
            mean = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "?"
        print(f"{name:26s} rc {proc.returncode} {seconds:5.0f} s  r: {mean}\n    {line}",
              flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
