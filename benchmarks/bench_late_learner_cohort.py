"""Issue 27's kind of cohort through dfrn run with the defaults: does a late-learning effect
come out "adds" beyond age and sex, and its null twin not?

120 synthetic subjects, T1 at 2 mm; age (uniform 20–70) drives a broad gray-matter atrophy.
Target ``effect`` = a local shape change (the hippocampus shrinks by a 2 mm radial
displacement per SD of the planted score) + 0.5 × z(age) + 0.5 × noise; its null twin
``null`` = 0.5 × z(age) + 0.5 × noise. Covariates age and sex, residualised in each training
fold; network input 8 mm (``downsample = 4``); 3-fold CV, 1 repeat; every other setting is
dfrn's default (``widen_factor = 1.0``, ``early_stopping = "auto"``, ``bn_stats =
"recompute"``) with ``epochs = 50``. The verdicts are in the log and ``cv/confounds.tsv``.

Run::

    python benchmarks/bench_late_learner_cohort.py /tmp/late-learner
"""
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from dfrn.config import config_from_dict
from dfrn.data.synth import make_synthetic_cohort
from dfrn.workflows.run import run_study

root = Path(sys.argv[1])
c = make_synthetic_cohort(root / "cohort", n_subjects=120, voxel_size=2.0, seed=11,
                          age_effect=0.05, radius=14.0, displacement=2.0)
t = pd.read_csv(c.table, sep="\t")
z_age = ((t["age"] - t["age"].mean()) / t["age"].std()).to_numpy()
rng = np.random.default_rng([27, 1])
t["effect"] = t["anhedonia"].to_numpy() + 0.5 * z_age + 0.5 * rng.standard_normal(len(t))
t["null"] = 0.5 * z_age + 0.5 * rng.standard_normal(len(t))
t.to_csv(c.table, sep="\t", index=False)
cfg = config_from_dict({
    "cohort": {"table": str(c.table), "targets": ["effect", "null"], "mask": str(c.brain_mask),
               "downsample": 4, "covariates": ["age", "sex"]},
    "confounds": {"target": "residualize"},
    "training": {"epochs": 50},
    "cv": {"n_folds": 3, "n_repeats": 1, "seed": 0},
    "baseline": {"enabled": False}, "attention": {"enabled": False},
    "final": {"enabled": False},
}, root)
run_study(cfg, root / "results", progress=False)
