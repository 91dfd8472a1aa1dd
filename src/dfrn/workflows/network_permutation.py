"""The network's permutation test in a study (``dfrn run --permutations N``) and its files.

Each permutation shuffles the targets across subjects (one shuffle shared by all factors)
and re-runs the network's whole cross-validation on the *first repeat* of the fold plan,
training a fresh network per (fold, factor) exactly as the main run does. The statistic is
the pooled out-of-fold Pearson r of that repeat; p = (1 + #{r_perm ≥ r}) / (1 + N).

Cost: N × n_folds × n_factors trainings — with the paper's 10 folds and 5 factors, 50
trainings per permutation, i.e. N = 100 permutations cost 10× the main 5 × 10-fold run.
Permutation ``k``'s tasks are written under ``permutations/perm-kkkk/``
(:meth:`dfrn.workflows.results.ResultsFolder.permutation_cv`) and a re-run resumes where
it stopped. The table goes to ``cv/permutation.tsv``.
"""

from __future__ import annotations

import pandas as pd

from dfrn.config import StudyConfig
from dfrn.errors import DfrnInputError
from dfrn.evaluation.metrics import readable
from dfrn.evaluation.permutation import permutation_test_generic
from dfrn.evaluation.tasks import plan_tasks, run_cv
from dfrn.io import atomic_write_tsv
from dfrn.plotting import format_table
from dfrn.targets.providers import StaticTargets
from dfrn.workflows.results import ResultsFolder
from dfrn.workflows.study import Study, StudyResult, make_estimator_factory, network_voxel_mm

__all__ = ["check_permutable", "network_permutation_test"]


def check_permutable(cfg: StudyConfig) -> None:
    """Refuse ``--permutations`` for targets made inside the folds, before any training.

    Raises
    ------
    DfrnInputError
        With ``[factors] fit_on = "train"`` or ``[confounds] target = "residualize"``.
    """
    if cfg.factors is not None and cfg.factors.fit_on == "train":
        raise DfrnInputError(
            "--permutations needs targets fixed before CV; it is not available with "
            "[factors] fit_on = 'train'"
        )
    if cfg.confounds.target == "residualize":
        raise DfrnInputError(
            "--permutations needs targets fixed before CV; it is not available with "
            "[confounds] target = 'residualize' (the Freedman-Lane p of cv/confounds.tsv tests "
            "the network beyond the covariates without retraining)"
        )


def network_permutation_test(study: Study, result: StudyResult) -> pd.DataFrame:
    """Run ``study.permutations`` permutations of the network CV (first repeat); write the table.

    Parameters
    ----------
    study : Study
        The study (its config, targets, plan, volumes, provider and executor).
    result : StudyResult
        The stages so far; its CV predictions are the observed ones.

    Returns
    -------
    DataFrame
        The table of :func:`dfrn.evaluation.permutation.permutation_test_generic`.

    Raises
    ------
    DfrnInputError
        When the targets are fitted per fold (``[factors] fit_on = "train"``).
    """
    cfg, n_perm, log, volumes = study.cfg, study.permutations, study.log, study.volumes
    check_permutable(cfg)
    if not isinstance(study.provider, StaticTargets):
        raise DfrnInputError("--permutations needs targets fixed before CV")
    plan = study.plan[study.plan["repeat"] == study.plan["repeat"].min()]
    factors = study.factors
    tasks = plan_tasks(plan, factors, cfg.model.heads, cfg.training.n_seeds)
    make = make_estimator_factory(cfg, progress=False, voxel_mm=network_voxel_mm(volumes))
    log(
        f"network permutation test: {n_perm} permutations × {len(tasks)} trainings "
        f"(first repeat, {plan['fold'].nunique()} folds × {len(factors)} factors)"
    )
    folder = ResultsFolder(study.out)

    def cv_predict(index: int | None, targets: pd.DataFrame) -> pd.DataFrame:
        if index is None:  # the observed predictions are passed below: never asked for
            raise RuntimeError("the network's unpermuted CV is the main run's")
        return run_cv(
            tasks, volumes, volumes.index_of, StaticTargets(targets), make,
            cfg.training.seed, folder.permutation_cv(index), progress=False,
            log=log, expected=targets, executor=study.executor,
        )

    observed = result.predictions[result.predictions["repeat"] == plan["repeat"].iloc[0]]
    table = permutation_test_generic(
        cv_predict, study.targets, n_perm, seed=cfg.cv.seed, observed=observed,
        progress=study.progress,
    )
    atomic_write_tsv(table, folder.network_permutation)
    log(format_table(readable(table, 4), f"DFRN permutation test ({n_perm} permutations)"))
    return table
