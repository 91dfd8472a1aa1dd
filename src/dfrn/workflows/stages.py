"""The stages of ``dfrn run``, in order, as one list with one call shape.

Each :class:`Stage` says from the study whether it runs (``enabled(study)``), and runs as
``run(study, result)``: it reads what it needs from the :class:`~dfrn.workflows.study.Study`
(built once by :func:`dfrn.workflows.run.build_study`) and from the stages before it on the
:class:`~dfrn.workflows.study.StudyResult`, and returns its own typed result, which the driver
stores on ``result.<name>``. Adding a stage is its module and one line in :data:`STAGES`.
The stage modules are imported when their stage runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from dfrn.evaluation.bootstrap import mean_r_ci
from dfrn.evaluation.metrics import compute_metrics, fold_r, fold_r_summary, table1
from dfrn.evaluation.tasks import plan_tasks, run_cv
from dfrn.io import atomic_write_tsv
from dfrn.plotting import format_table, plot_fig2
from dfrn.workflows.comparison import study_bootstrap
from dfrn.workflows.confounds import target_words
from dfrn.workflows.learning import train_sizes, write_learning_table
from dfrn.workflows.report import image_words, training_words
from dfrn.workflows.results import ResultsFolder
from dfrn.workflows.study import (
    CVResult,
    Study,
    StudyResult,
    make_estimator_factory,
    network_voxel_mm,
)

__all__ = ["Stage", "STAGES", "run_stages"]


@dataclass(frozen=True)
class Stage:
    """One stage: the ``StudyResult`` field it fills, whether it runs, and how."""

    name: str
    enabled: Callable[[Study], bool]
    run: Callable[[Study, StudyResult], object]


def _log_study(study: Study, tasks: list) -> None:
    """The two lines that open the CV: the cohort and input, then the training recipe."""
    cfg, c = study.cfg, study.cfg.cohort
    study.log(
        f"{len(study.cohort)} subjects, factors {', '.join(study.factors)}; network input "
        f"{'×'.join(map(str, study.volumes.shape))} (downsample {c.downsample}); "
        f"{cfg.cv.n_repeats} × {cfg.cv.n_folds}-fold CV. "
        + image_words(len(study.cohort), image_column=c.image_column, intensity=c.intensity,
                      mask=bool(c.mask), downsample=c.downsample, bids=bool(c.bids))
    )
    study.log(f"training: {training_words(cfg.to_dict(), study.factors, train_sizes(tasks, study.targets))} "
              f"{len(tasks)} networks in all.")


def _write_cv_tables(study: Study, predictions: pd.DataFrame) -> CVResult:
    """Write the CV's predictions, metrics, Table 1 and Figure 2; log Table 1 and the
    pooled r beside each fold's own r."""
    folder, log = ResultsFolder(study.out), study.log
    boot = study_bootstrap(study.cfg)
    metrics = compute_metrics(predictions, boot)
    t1 = table1(metrics, mean_r_ci(predictions, boot))
    atomic_write_tsv(predictions, folder.predictions)
    atomic_write_tsv(metrics, folder.metrics)
    atomic_write_tsv(t1, folder.table1)
    plot_fig2(predictions, metrics, folder.figure("fig2_scatter"))
    log(format_table(t1, "Table 1 — Pearson r (p) [95% bootstrap CI over subjects] of "
                         "out-of-fold predictions, per repeat; "
                         + target_words(study.cfg, study.covariates)))
    log(format_table(fold_r_summary(fold_r(predictions), metrics).round(3),
                     "Pooled r beside the r of each fold's own test subjects (a pooled r far "
                     "below the folds' says the fold networks are offset from one another)"))
    return CVResult(predictions, metrics, t1)


def cv_stage(study: Study, result: StudyResult) -> CVResult:
    """Train and evaluate one network per (repeat, fold, factor), skipping verified tasks,
    through the study's executor; write the CV tables (stage 3–4 of ``dfrn run``)."""
    cfg = study.cfg
    tasks = plan_tasks(study.plan, study.factors, cfg.model.heads, cfg.training.n_seeds)
    _log_study(study, tasks)
    folder = ResultsFolder(study.out)
    predictions = run_cv(
        tasks, study.volumes, study.volumes.index_of, study.provider,
        make_estimator_factory(cfg, study.progress, network_voxel_mm(study.volumes)),
        cfg.training.seed, folder.cv, progress=study.progress, log=study.log,
        expected=study.targets, executor=study.executor,
    )
    write_learning_table(folder, tasks, cfg.training.epochs, study.log,
                         cfg.training.target_scaling == "zscore")
    cv = _write_cv_tables(study, predictions)
    if study.stability is not None:
        study.log(format_table(
            study.stability[["factor", "median_congruence", "min_congruence", "band"]].round(3),
            "Stability of the factors behind Table 1 (factors/stability.tsv): Tucker's congruence "
            "with the full fit; 'not the same factor' below 0.85",
        ))
    return cv


def covariates_model_stage(study: Study, result: StudyResult) -> pd.DataFrame:
    """The covariates-only model in the same folds (before the baseline: Figure 3 shows it)."""
    from dfrn.workflows.confounds import run_covariates_model

    assert study.covariates is not None
    return run_covariates_model(study.out, study.covariates, study.raw_provider, study.plan)


def network_permutation_stage(study: Study, result: StudyResult) -> pd.DataFrame:
    """The network's permutation test (``dfrn run --permutations N``)."""
    from dfrn.workflows.network_permutation import network_permutation_test

    return network_permutation_test(study, result)


def packages_stage(study: Study, result: StudyResult) -> dict[str, Path]:
    """The model packages of ``[final]`` (``models/<factor>/``)."""
    from dfrn.workflows.packages import write_model_packages

    return write_model_packages(
        study.out, study.cfg, study.volumes, study.targets, study.plan, result.metrics,
        study.inputs, progress=study.progress, log=study.log, covariates=study.covariates,
    )


def baseline_stage(study: Study, result: StudyResult) -> dict[str, pd.DataFrame]:
    """The ``[baseline] models`` (ROI and voxel ridge) in the same folds."""
    from dfrn.workflows.baseline import run_baseline_stage

    return run_baseline_stage(
        study.out, study.cfg, study.cohort, study.targets, study.provider, study.plan,
        progress=study.progress, log=study.log, volumes=study.volumes,
    )


def comparison_stage(study: Study, result: StudyResult) -> pd.DataFrame | None:
    """``cv/comparison.tsv``: the network vs each baseline (and each vs the covariates)."""
    from dfrn.workflows.comparison import run_comparison_stage

    return run_comparison_stage(study.out, study.cfg, study.log)


def attention_stage(study: Study, result: StudyResult) -> dict[str, pd.DataFrame]:
    """Factor attention maps, their region tables and the region ablation."""
    from dfrn.workflows.attention import run_attention_stage

    return run_attention_stage(
        study.out, study.cfg, study.volumes, study.factors, study.plan,
        progress=study.progress, log=study.log, executor=study.executor,
    )


def confounds_stage(study: Study, result: StudyResult) -> pd.DataFrame | None:
    """``cv/confounds.tsv``: each model beyond the covariates (partial r, ΔR², Freedman–Lane)."""
    from dfrn.workflows.confounds import run_confounds_stage

    return run_confounds_stage(study.out, study.cfg, study.covariates, study.raw_provider,
                               study.plan, study.log)


def report_stage(study: Study, result: StudyResult) -> Path:
    """``report.html`` from everything the folder holds."""
    from dfrn.workflows.report import write_report

    path = write_report(study.out, notes=list(study.notes))
    study.log(f"report: {path}")
    return path


def _always(study: Study) -> bool:
    return True


def _with_covariates(study: Study) -> bool:
    return study.covariates is not None


#: The stages of ``dfrn run``, in the order they run.
STAGES: tuple[Stage, ...] = (
    Stage("cv", _always, cv_stage),
    Stage("covariates_model", _with_covariates, covariates_model_stage),
    Stage("network_permutation", lambda s: s.permutations > 0, network_permutation_stage),
    Stage("packages", lambda s: s.cfg.final.enabled, packages_stage),
    Stage("baseline", lambda s: s.cfg.baseline.enabled, baseline_stage),
    Stage("comparison", _always, comparison_stage),
    Stage("attention", lambda s: s.cfg.attention.enabled, attention_stage),
    Stage("confounds", _with_covariates, confounds_stage),
    Stage("report", _always, report_stage),
)


def run_stages(study: Study, stages: tuple[Stage, ...] = STAGES) -> StudyResult:
    """Run each enabled stage in order; each one's result goes on ``result.<name>``."""
    result = StudyResult(study)
    for stage in stages:
        if stage.enabled(study):
            setattr(result, stage.name, stage.run(study, result))
    return result
