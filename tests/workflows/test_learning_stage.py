"""A cohort whose effect is subtle, with an age confound, as a user asks "beyond age and
sex?": the defaults (fixed epochs on a small split, BatchNorm statistics recomputed) find
it and do not call its null twin. The run's log and ``cv/learning.tsv`` say what ran."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import NARROW

from dfrn.config import config_from_dict
from dfrn.workflows.run import run_study


@pytest.fixture(scope="module")
def subtle_cohort(tmp_path_factory: pytest.TempPathFactory):
    """72 subjects at 8 mm: age thins gray matter everywhere; the target is a 5% darkening
    of the hippocampus per SD + 0.5 × z(age) + noise; the null twin is age + noise only."""
    from dfrn.data.synth import make_synthetic_cohort

    root = tmp_path_factory.mktemp("subtle")
    cohort = make_synthetic_cohort(root / "c", n_subjects=72, voxel_size=8.0, radius=14.0,
                                   effect=0.05, age_effect=0.1, seed=3)
    table = pd.read_csv(cohort.table, sep="\t")
    z = ((table.age - table.age.mean()) / table.age.std()).to_numpy()
    rng = np.random.default_rng(11)
    table["target"] = table.anhedonia + 0.5 * z + 0.5 * rng.standard_normal(len(table))
    table["nulltwin"] = 0.5 * z + 0.5 * rng.standard_normal(len(table)) \
        + 0.5 * rng.standard_normal(len(table))
    table.to_csv(root / "c" / "subtle.tsv", sep="\t", index=False)
    return root


def _run(root, name: str, targets: list[str], training: dict) -> tuple[pd.DataFrame, list[str]]:
    raw = {"cohort": {"table": str(root / "c" / "subtle.tsv"), "targets": targets,
                      "covariates": ["age", "sex"], "mask": str(root / "c" / "brain_mask.nii.gz")},
           "model": {"widen_factor": NARROW},
           "training": {"epochs": 20, "seed": 1, **training},
           "cv": {"n_folds": 3, "n_repeats": 1, "seed": 0},
           "confounds": {"target": "residualize", "n_permutations": 200},
           "baseline": {"enabled": False}, "attention": {"enabled": False},
           "final": {"enabled": False}}
    lines: list[str] = []
    run_study(config_from_dict(raw, root), root / name, progress=False, log=lines.append)
    conf = pd.read_csv(root / name / "cv" / "confounds.tsv", sep="\t")
    return conf[conf.model == "dfrn"].set_index("factor"), lines


def test_the_defaults_find_a_subtle_effect_beyond_age_and_not_its_null_twin(
        subtle_cohort) -> None:
    """The defaults: every fold network trains 20 epochs (a split of 4 validation subjects
    cannot stop it) with BatchNorm statistics recomputed. Measured beside this test (3 seeds
    × the paper's rule with running statistics, one torch thread): partial r 0.65 / 0.62 /
    0.61 for the defaults against 0.51 / 0.11 / 0.49 for the old rule, whose Freedman–Lane p
    was 0.37 on the second seed. Which seed the old rule fails on changes with the host's
    floating point (a thread count is enough), so that contrast is measured by
    benchmarks/bench_learning.py, not asserted here; the defaults' result holds on any host
    (partial r 0.62 with one thread, 0.63 with two)."""
    new, log = _run(subtle_cohort, "new", ["target", "nulltwin"], {})
    assert new.loc["target", "r_partial"] > 0.4
    assert new.loc["target", "p_delta_r2_permutation"] < 0.05  # "adds beyond age and sex"
    # its null twin: a null's p is uniform over hosts' rounding (measured here: 0.52-0.60),
    # so what holds on any host is "not the smallest p 200 permutations give", which a
    # network that saw the age confound would get every time; and a partial r within
    # about 3 SD of 0 on 72 subjects
    assert new.loc["nulltwin", "p_delta_r2_permutation"] > 1.5 / 201
    assert abs(new.loc["nulltwin", "r_partial"]) < 0.4
    text = "\n".join(log)
    # the log's summary names what the images are (issue 26.14)
    assert "72 participants' T1-weighted images on a common grid were normalised (zscore " \
           "inside a brain mask)" in text
    assert "for 20 epochs (no early stopping: a validation split of 0.1 × 48 training " \
           "subjects holds 4, fewer than 20)" in text
    learning = pd.read_csv(subtle_cohort / "new" / "cv" / "learning.tsv", sep="\t")
    assert len(learning) == 6 and (learning["stopping"] == "none").all()
    assert (learning["best_epoch"] == 19).all()
    target = learning[learning.factor == "target"]
    assert target["learned"].all() and "warning: target" not in text
