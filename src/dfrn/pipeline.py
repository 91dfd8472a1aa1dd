"""The whole configured pipeline behind ``dfrn run``: cohort → targets → CV → report.

Stages, in order (each resumable):

1. open the results folder (new, or a resume of the same config and data; else refuse);
2. load and validate the cohort; derive factor targets if ``[factors]`` is configured;
3. the fold plan ``cv/folds.tsv`` (made once from ``[cv] seed``, re-read on resume);
4. cache the normalised volumes;
5. train and evaluate one network per (repeat, fold, factor), skipping finished tasks;
6. write ``cv/predictions.tsv``, ``cv/metrics.tsv``, ``cv/table1.tsv`` and Figure 2.

Later stages (baseline, attention) read the same results folder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from dfrn.cohort import Cohort, load_bids_cohort, load_cohort_table
from dfrn.config import StudyConfig
from dfrn.cv import StaticTargets, TargetProvider, plan_tasks, run_cv
from dfrn.errors import DfrnInputError
from dfrn.folds import make_fold_plan, validate_fold_plan
from dfrn.images import VolumeCache, VolumeSet
from dfrn.io import atomic_write_tsv, file_digest
from dfrn.report import format_table, plot_fig2
from dfrn.results import open_results_dir
from dfrn.stats import compute_metrics, table1
from dfrn.training import DFRNRegressor

__all__ = [
    "StudyResult",
    "load_study_cohort",
    "run_study",
    "run_cv_stage",
    "study_targets",
    "fold_plan_for",
    "prepare_volumes",
]


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


def load_study_cohort(cfg: StudyConfig) -> Cohort:
    """The cohort named by ``[cohort]``; targets are validated unless factors derive them."""
    c = cfg.cohort
    targets = [] if cfg.factors is not None else list(c.targets)
    if c.table:
        return load_cohort_table(c.table, targets, c.image_column, c.covariates)
    return load_bids_cohort(c.bids, targets, c.covariates, session=c.session or None)


def _data_digest(cfg: StudyConfig) -> str:
    c = cfg.cohort
    path = Path(c.table) if c.table else Path(c.bids) / "participants.tsv"
    return file_digest(path) if path.is_file() else ""


def fold_plan_for(cohort: Cohort, cfg: StudyConfig, out: Path) -> pd.DataFrame:
    """Make and save the fold plan, or read the saved one on resume."""
    path = out / "cv" / "folds.tsv"
    if path.is_file():
        plan = pd.read_csv(path, sep="\t", dtype={"participant_id": str})
        validate_fold_plan(plan, cohort.participant_ids)
        return plan
    plan = make_fold_plan(cohort.participant_ids, cfg.cv.n_folds, cfg.cv.n_repeats, cfg.cv.seed)
    atomic_write_tsv(plan, path)
    return plan


def prepare_volumes(cohort: Cohort, cfg: StudyConfig, out: Path, progress: bool) -> VolumeSet:
    cache = VolumeCache(Path(cfg.cohort.cache_dir) if cfg.cohort.cache_dir else out / "cache")
    mask = Path(cfg.cohort.mask) if cfg.cohort.mask else None
    return cache.prepare(
        cohort.participant_ids, cohort.images, cfg.cohort.downsample, mask, progress=progress
    )


def study_targets(
    cohort: Cohort, cfg: StudyConfig, plan: pd.DataFrame, out: Path, log: Callable[[str], None]
) -> tuple[pd.DataFrame, TargetProvider]:
    if cfg.factors is None:
        targets = cohort.targets
        return targets, StaticTargets(targets)
    from dfrn.factor_targets import factor_targets

    return factor_targets(cohort, cfg.factors, plan, out, log)


def make_estimator_factory(cfg: StudyConfig, progress: bool) -> Callable[[int, str], DFRNRegressor]:
    t = cfg.training

    def make(seed: int, desc: str) -> DFRNRegressor:
        return DFRNRegressor(
            block_strides=tuple(cfg.model.block_strides),
            epochs=t.epochs,
            batch_size=t.batch_size,
            lr=t.lr,
            weight_decay=t.weight_decay,
            target_scaling=t.target_scaling,
            val_fraction=t.val_fraction,
            patience=t.patience,
            seed=seed,
            device=t.device,
            amp=t.amp,
            progress=progress,
            desc=desc,
        )

    return make


def run_cv_stage(
    cfg: StudyConfig,
    out: Path,
    progress: bool = True,
    log: Callable[[str], None] = print,
    allow_existing: tuple[str, ...] = (),
) -> StudyResult:
    """Stages 1–6 (see the module docstring)."""
    out = Path(out)
    cohort = load_study_cohort(cfg)
    resumed = open_results_dir(out, cfg, _data_digest(cfg), allow_existing)
    plan = fold_plan_for(cohort, cfg, out)
    targets, provider = study_targets(cohort, cfg, plan, out, log)
    factors = list(targets.columns)
    for f in factors:
        n = int(targets[f].notna().sum())
        if n < cfg.cv.n_folds:
            raise DfrnInputError(
                f"factor {f!r} has {n} subjects with a value, fewer than cv.n_folds={cfg.cv.n_folds}"
            )
    volumes = prepare_volumes(cohort, cfg, out, progress)
    log(
        f"{len(cohort)} subjects, factors {', '.join(factors)}; network input "
        f"{'×'.join(map(str, volumes.shape))} (downsample {cfg.cohort.downsample}); "
        f"{cfg.cv.n_repeats} × {cfg.cv.n_folds}-fold CV"
    )
    tasks = plan_tasks(plan, factors)
    predictions = run_cv(
        tasks,
        volumes,
        volumes.index_of,
        provider,
        make_estimator_factory(cfg, progress),
        cfg.training.seed,
        out / "cv",
        progress=progress,
        log=log,
    )
    metrics = compute_metrics(predictions)
    t1 = table1(metrics)
    atomic_write_tsv(predictions, out / "cv" / "predictions.tsv")
    atomic_write_tsv(metrics, out / "cv" / "metrics.tsv")
    atomic_write_tsv(t1, out / "cv" / "table1.tsv")
    plot_fig2(predictions, metrics, out / "figures" / "fig2_scatter.png")
    log(format_table(t1, "Table 1 — Pearson r (p) of out-of-fold predictions, per repeat"))
    result = StudyResult(out, resumed, cohort, targets, plan, predictions, metrics, t1)
    result.extra.update(volumes=volumes, provider=provider)
    return result


def run_study(
    cfg: StudyConfig,
    out: str | Path,
    progress: bool = True,
    log: Callable[[str], None] = print,
    allow_existing: tuple[str, ...] = (),
    permutations: int = 0,
) -> StudyResult:
    """Run every configured stage; returns the cross-validation results.

    ``permutations`` > 0 also runs the network's permutation test (see
    :func:`dfrn.network_permutation.network_permutation_test`).
    """
    out = Path(out)
    result = run_cv_stage(cfg, out, progress, log, allow_existing)
    if permutations > 0:
        from dfrn.network_permutation import network_permutation_test

        result.extra["network_permutation"] = network_permutation_test(
            out, cfg, result, permutations, progress=progress, log=log
        )
    if cfg.baseline.enabled:
        from dfrn.baseline_stage import run_baseline_stage

        result.extra["baseline"] = run_baseline_stage(
            out, cfg, result.cohort, result.targets, result.extra["provider"], result.plan,
            progress=progress, log=log,
        )
    if cfg.attention.enabled:
        from dfrn.attention_stage import run_attention_stage

        result.extra["attention"] = run_attention_stage(
            out, cfg, result.extra["volumes"], list(result.targets.columns), result.plan,
            progress=progress, log=log,
        )
    return result
