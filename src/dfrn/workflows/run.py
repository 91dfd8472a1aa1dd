"""The whole configured pipeline behind ``dfrn run``: cohort → targets → CV → report.

Stages, in order (each resumable):

1. check everything before writing anything: the device, the cohort, every input file's
   digest, the results folder (new, or a resume of the same config and the same input files;
   else refuse, naming the changed files), the targets (finite, not constant, at least 2
   training subjects with a value in every fold) and the cached network inputs (not constant);
2. only then write the run's identity (``run.json``, ``config.toml``, environment), the fold
   plan ``cv/folds.tsv`` (made once from ``[cv] seed``, re-read on resume) and ``factors/``;
3. train and evaluate one network per (repeat, fold, factor), skipping verified tasks, through
   the configured executor (``[executor]``: in this process, as Ray tasks or SLURM jobs);
4. write ``cv/predictions.tsv``, ``cv/metrics.tsv``, ``cv/table1.tsv`` and Figure 2.

Stages 1–2 build the :class:`~dfrn.workflows.study.Study` once (:func:`build_study`); then
every stage of :data:`dfrn.workflows.stages.STAGES` that the config enables runs on it, from
the CV (3–4) to the report. The whole run holds the results folder's lock
(:mod:`dfrn.workflows.lock`), so a second process on the same folder is refused with the
holder's PID and host.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from dfrn.config import StudyConfig
from dfrn.data.cohort import Cohort
from dfrn.data.covariates import CovariateSelection
from dfrn.data.images import check_common_grid
from dfrn.executors import Executor, make_executor
from dfrn.io import atomic_write_tsv
from dfrn.models.regressor import resolve_device
from dfrn.targets.providers import TargetProvider
from dfrn.workflows.pretrained import check_init
from dfrn.workflows.results import (
    InputFile,
    ResultsFolder,
    check_results_dir,
    read_run_info,
    record_resume,
    write_run_identity,
)
from dfrn.workflows.stages import run_stages
from dfrn.workflows.study import (
    Study,
    StudyResult,
    check_targets,
    collect_inputs,
    fold_plan_for,
    load_study_cohort,
    network_voxel_mm,
    prepare_volumes,
    results_lock,
    run_study_prep,
    study_covariates,
    study_provider,
    study_targets,
    uses_prep,
)

__all__ = ["run_study", "build_study"]


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


def _load_checked_cohort(cfg: StudyConfig, out: Path, progress: bool,
                         log: Callable[[str], None], allow_existing: tuple[str, ...],
                         executor: Executor) -> tuple[Cohort, dict[str, InputFile], bool]:
    """Stage 1's first half: the prep stage when configured, the cohort on one grid, every
    input file's digest and the results folder's check. Returns (cohort, inputs, resumed)."""
    resolve_device(cfg.training.device)  # before any caching: cuda on a CPU machine is refused
    if uses_prep(cfg):
        check_results_dir(out, cfg, None, (*allow_existing, "prep"))
        run_study_prep(cfg, out, progress, log, resumed=read_run_info(out) is not None,
                       executor=executor)
        allow_existing = (*allow_existing, "prep")
    cohort = load_study_cohort(cfg, out)
    check_common_grid(cohort.images, [f"participant {p}" for p in cohort.participant_ids])
    inputs = collect_inputs(cfg, cohort, progress)
    return cohort, inputs, check_results_dir(out, cfg, inputs, allow_existing)


def _write_identity(cfg: StudyConfig, out: Path, cohort: Cohort, inputs: dict[str, InputFile],
                    resumed: bool, plan: pd.DataFrame,
                    log: Callable[[str], None]) -> pd.DataFrame | None:
    """Stage 2: the run's identity, the fold plan and ``factors/`` (with their stability,
    returned for the log after Table 1)."""
    if resumed:
        record_resume(out)
    else:
        write_run_identity(out, cfg, inputs)
    folder = ResultsFolder(out)
    if not folder.folds.is_file():
        atomic_write_tsv(plan, folder.folds)
    if cfg.factors is None:
        return None
    from dfrn.targets.providers import fit_factor_model
    from dfrn.workflows.factors import write_factor_outputs

    reference, items = fit_factor_model(cohort, cfg.factors)
    write_factor_outputs(reference, items, out)
    return _factor_stability(reference, items, cfg, plan, out, log)


def build_study(
    cfg: StudyConfig,
    out: Path,
    executor: Executor,
    progress: bool = True,
    log: Callable[[str], None] = print,
    allow_existing: tuple[str, ...] = (),
    permutations: int = 0,
    notes: tuple[str, ...] = (),
) -> Study:
    """Stages 1–2 (see the module docstring): every check, then the run's identity; the
    :class:`Study` every stage reads. The caller holds the folder's lock."""
    out = Path(out)
    cohort, inputs, resumed = _load_checked_cohort(cfg, out, progress, log, allow_existing,
                                                   executor)
    st = _study_targets(cohort, cfg, out, log)
    volumes = prepare_volumes(cohort, cfg, out, progress, inputs, log)
    check_init(cfg, st.targets.shape[1], network_voxel_mm(volumes), log,
               {f.digest for k, f in inputs.items() if k.startswith("t1/")},
               [str(c) for c in st.targets.columns])
    # every input check has passed: only now does the folder become a run
    stability = _write_identity(cfg, out, cohort, inputs, resumed, st.plan, log)
    return Study(cfg, out, cohort, st.targets, st.raw_provider, st.provider, st.covariates,
                 st.plan, volumes, inputs, executor, log, progress, resumed, permutations,
                 tuple(notes), stability)


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
    """Run every configured stage, holding the folder's lock; returns each stage's result.

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
            study = build_study(cfg, out, runner, progress, log, allow_existing, permutations,
                                notes)
            return run_stages(study)
    finally:
        runner.close()
