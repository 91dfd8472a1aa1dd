"""The whole configured pipeline behind ``dfrn run``: cohort → targets → CV → report.

Stages, in order (each resumable):

1. check everything before writing anything: the device, the cohort, every input file's
   digest, the results folder (new, or a resume of the same config and the same input files;
   else refuse, naming the changed files), the targets (finite, not constant, at least 2
   training subjects with a value in every fold) and the cached network inputs (not constant);
2. only then write the run's identity (``run.json``, ``config.toml``, environment), the fold
   plan ``cv/folds.tsv`` (made once from ``[cv] seed``, re-read on resume) and ``factors/``;
3. train and evaluate one network per (repeat, fold, factor), skipping verified tasks, through
   the configured executor (``[executor]``: in this process, or as Ray tasks);
4. write ``cv/predictions.tsv``, ``cv/metrics.tsv``, ``cv/table1.tsv`` and Figure 2.

The whole run holds the results folder's lock (:mod:`dfrn.workflows.lock`), so a second process on the
same folder is refused with the holder's PID and host.

Later stages (baseline, attention) read the same results folder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from dfrn.config import StudyConfig
from dfrn.data.cohort import Cohort
from dfrn.data.covariates import CovariateSelection
from dfrn.data.images import check_common_grid
from dfrn.evaluation.metrics import compute_metrics, fold_r, fold_r_summary, table1
from dfrn.evaluation.tasks import plan_tasks, run_cv
from dfrn.executors import Executor, make_executor
from dfrn.io import atomic_write_tsv
from dfrn.models.regressor import resolve_device
from dfrn.plotting import format_table, plot_fig2
from dfrn.targets.providers import TargetProvider
from dfrn.workflows.confounds import target_words
from dfrn.workflows.learning import train_sizes, write_learning_table
from dfrn.workflows.report import image_words, training_words
from dfrn.workflows.results import (
    ResultsFolder,
    check_results_dir,
    read_run_info,
    record_resume,
    write_run_identity,
)
from dfrn.workflows.study import (
    check_targets,
    collect_inputs,
    fold_plan_for,
    load_study_cohort,
    make_estimator_factory,
    network_voxel_mm,
    prepare_volumes,
    results_lock,
    run_study_prep,
    study_covariates,
    study_provider,
    study_targets,
    uses_prep,
)

__all__ = ["StudyResult", "run_study", "run_cv_stage"]


def _factor_stability(reference, items, cfg: StudyConfig, plan, out: Path, log) -> pd.DataFrame:
    """Per-fold (``fit_on = "train"``) or split-half (``"all"``) stability of the factors."""
    from dfrn.targets.stability import fold_stability, split_half_stability
    from dfrn.workflows.factors import write_stability

    f = cfg.factors
    assert f is not None
    frame = items.fillna(reference.item_medians_) if f.impute == "median" else items
    if f.fit_on == "train":
        stability = fold_stability(frame, plan, reference, f.align)
    else:
        stability = split_half_stability(frame, reference, f.n_resamples, cfg.cv.seed, f.align)
    return write_stability(stability, out, log)


@dataclass
class StudyResult:
    out: Path
    resumed: bool
    cohort: Cohort
    targets: pd.DataFrame
    plan: pd.DataFrame
    predictions: pd.DataFrame
    metrics: pd.DataFrame
    table1: pd.DataFrame
    extra: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class _Targets:
    targets: pd.DataFrame
    raw_provider: TargetProvider
    plan: pd.DataFrame
    covariates: CovariateSelection | None
    provider: TargetProvider


def _study_targets(cohort: Cohort, cfg: StudyConfig, out: Path,
                   log: Callable[[str], None]) -> _Targets:
    """Targets (checked), the fold plan (stratified on them when asked), the covariates and
    the targets the models train on (residualised per fold when asked)."""
    targets, raw = study_targets(cohort, cfg, None, None, log)
    plan = fold_plan_for(cohort, cfg, out, targets)
    check_targets(targets, plan, cfg.cv.n_folds)
    selection = study_covariates(cohort, cfg)
    return _Targets(targets, raw, plan, selection, study_provider(raw, selection, cfg, log))


def run_cv_stage(
    cfg: StudyConfig,
    out: Path,
    progress: bool = True,
    log: Callable[[str], None] = print,
    allow_existing: tuple[str, ...] = (),
    executor: Executor | None = None,
) -> StudyResult:
    """Stages 1–4 (see the module docstring). The caller holds the folder's lock.

    ``executor`` runs the CV tasks (default: in this process).
    """
    out = Path(out)
    resolve_device(cfg.training.device)  # before any caching: cuda on a CPU machine is refused
    if uses_prep(cfg):
        check_results_dir(out, cfg, None, (*allow_existing, "prep"))
        run_study_prep(cfg, out, progress, log, resumed=read_run_info(out) is not None,
                       executor=executor)
        allow_existing = (*allow_existing, "prep")
    cohort = load_study_cohort(cfg, out)
    check_common_grid(cohort.images, [f"participant {p}" for p in cohort.participant_ids])
    inputs = collect_inputs(cfg, cohort, progress)
    resumed = check_results_dir(out, cfg, inputs, allow_existing)
    st = _study_targets(cohort, cfg, out, log)
    targets, plan, provider, selection = st.targets, st.plan, st.provider, st.covariates
    factors = list(targets.columns)
    volumes = prepare_volumes(cohort, cfg, out, progress, inputs, log)
    # every input check has passed: only now does the folder become a run
    if resumed:
        record_resume(out)
    else:
        write_run_identity(out, cfg, inputs)
    folder = ResultsFolder(out)
    if not folder.folds.is_file():
        atomic_write_tsv(plan, folder.folds)
    stability_summary = None
    if cfg.factors is not None:
        from dfrn.targets.providers import fit_factor_model
        from dfrn.workflows.factors import write_factor_outputs

        reference, items = fit_factor_model(cohort, cfg.factors)
        write_factor_outputs(reference, items, out)
        stability_summary = _factor_stability(reference, items, cfg, plan, out, log)
    c = cfg.cohort
    log(
        f"{len(cohort)} subjects, factors {', '.join(factors)}; network input "
        f"{'×'.join(map(str, volumes.shape))} (downsample {c.downsample}); "
        f"{cfg.cv.n_repeats} × {cfg.cv.n_folds}-fold CV. "
        + image_words(len(cohort), image_column=c.image_column, intensity=c.intensity,
                      mask=bool(c.mask), downsample=c.downsample, bids=bool(c.bids))
    )
    tasks = plan_tasks(plan, factors, cfg.model.heads, cfg.training.n_seeds)
    log(f"training: {training_words(cfg.to_dict(), factors, train_sizes(tasks, targets))} "
        f"{len(tasks)} networks in all.")
    predictions = run_cv(
        tasks,
        volumes,
        volumes.index_of,
        provider,
        make_estimator_factory(cfg, progress, network_voxel_mm(volumes)),
        cfg.training.seed,
        folder.cv,
        progress=progress,
        log=log,
        expected=targets,
        executor=executor,
    )
    write_learning_table(folder, tasks, cfg.training.epochs, log,
                         cfg.training.target_scaling == "zscore")
    metrics, t1 = _write_cv_tables(folder, predictions, log, target_words(cfg, selection))
    if stability_summary is not None:
        log(format_table(
            stability_summary[["factor", "median_congruence", "min_congruence", "band"]].round(3),
            "Stability of the factors behind Table 1 (factors/stability.tsv): Tucker's congruence "
            "with the full fit; 'not the same factor' below 0.85",
        ))
    result = StudyResult(out, resumed, cohort, targets, plan, predictions, metrics, t1)
    result.extra.update(volumes=volumes, provider=provider, inputs=inputs,
                        raw_provider=st.raw_provider, covariates=selection)
    return result


def _write_cv_tables(folder: ResultsFolder, predictions: pd.DataFrame,
                     log: Callable[[str], None],
                     targets_said: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Write the CV's predictions, metrics, Table 1 and Figure 2; log Table 1 and the
    pooled r beside each fold's own r. Returns ``(metrics, table1)``."""
    metrics = compute_metrics(predictions)
    t1 = table1(metrics)
    atomic_write_tsv(predictions, folder.predictions)
    atomic_write_tsv(metrics, folder.metrics)
    atomic_write_tsv(t1, folder.table1)
    plot_fig2(predictions, metrics, folder.figure("fig2_scatter"))
    log(format_table(t1, "Table 1 — Pearson r (p) of out-of-fold predictions, per repeat; "
                         + targets_said))
    log(format_table(fold_r_summary(fold_r(predictions), metrics).round(3),
                     "Pooled r beside the r of each fold's own test subjects (a pooled r far "
                     "below the folds' says the fold networks are offset from one another)"))
    return metrics, t1


def run_study(
    cfg: StudyConfig,
    out: str | Path,
    progress: bool = True,
    log: Callable[[str], None] = print,
    allow_existing: tuple[str, ...] = (),
    permutations: int = 0,
    notes: tuple[str, ...] = (),
    executor: str | None = None,
) -> StudyResult:
    """Run every configured stage, holding the folder's lock; returns the CV results.

    ``executor`` (``"local"``, ``"ray"`` or ``"slurm"``) overrides ``[executor] kind``; the driver
    holds the lock, plans and collects, the executor's workers write task folders.

    ``notes`` are shown at the top of ``report.html`` (the demo says what it shrank).

    ``permutations`` > 0 also runs the network's permutation test (see
    :func:`dfrn.workflows.network_permutation.network_permutation_test`).
    """
    out = Path(out)
    if permutations > 0:
        from dfrn.workflows.network_permutation import check_permutable

        check_permutable(cfg)  # before any training
    e = cfg.executor
    runner = make_executor(executor or e.kind, e)
    if runner.name == "ray" and e.gpus_per_task == 0 and resolve_device("auto").type == "cuda":
        log("note: [executor] gpus_per_task = 0, so Ray gives the tasks no GPU; set it (e.g. "
            "1, or 0.2 for 5 tasks per GPU) to train on this machine's GPUs")
    try:
        with results_lock(out, "dfrn run", log):
            runner.attach(ResultsFolder(out).logs / runner.name, log)
            return _run_study_locked(
                cfg, out, progress, log, allow_existing, permutations, notes, runner
            )
    finally:
        runner.close()


def _run_study_locked(
    cfg: StudyConfig,
    out: Path,
    progress: bool,
    log: Callable[[str], None],
    allow_existing: tuple[str, ...],
    permutations: int,
    notes: tuple[str, ...] = (),
    executor: Executor | None = None,
) -> StudyResult:
    result = run_cv_stage(cfg, out, progress, log, allow_existing, executor)
    if result.extra["covariates"] is not None:  # before the baseline: Figure 3 shows its bar
        from dfrn.workflows.confounds import run_covariates_model

        run_covariates_model(out, result.extra["covariates"], result.extra["raw_provider"],
                             result.plan)
    if permutations > 0:
        from dfrn.workflows.network_permutation import network_permutation_test

        result.extra["network_permutation"] = network_permutation_test(
            out, cfg, result, permutations, progress=progress, log=log, executor=executor
        )
    if cfg.final.enabled:
        from dfrn.workflows.packages import write_model_packages

        result.extra["packages"] = write_model_packages(
            out, cfg, result.extra["volumes"], result.targets, result.plan, result.metrics,
            result.extra["inputs"], progress=progress, log=log,
            covariates=result.extra["covariates"],
        )
    if cfg.baseline.enabled:
        from dfrn.workflows.baseline import run_baseline_stage

        result.extra["baseline"] = run_baseline_stage(
            out, cfg, result.cohort, result.targets, result.extra["provider"], result.plan,
            progress=progress, log=log, volumes=result.extra["volumes"],
        )
    if cfg.attention.enabled:
        from dfrn.workflows.attention import run_attention_stage

        result.extra["attention"] = run_attention_stage(
            out, cfg, result.extra["volumes"], list(result.targets.columns), result.plan,
            progress=progress, log=log, executor=executor,
        )
    if result.extra["covariates"] is not None:
        from dfrn.workflows.confounds import run_confounds_stage

        result.extra["confounds"] = run_confounds_stage(
            out, cfg, result.extra["covariates"], result.extra["raw_provider"], result.plan, log,
        )
    from dfrn.workflows.report import write_report

    result.extra["report"] = write_report(out, notes=list(notes))
    log(f"report: {result.extra['report']}")
    return result
