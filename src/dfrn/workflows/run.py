"""The whole configured pipeline behind ``dfrn run``: cohort → targets → CV → report.

Stages, in order (each resumable):

1. check everything before writing anything: the device, the cohort, every input file's
   digest, the results folder (new, or a resume of the same config and the same input files;
   else refuse, naming the changed files), the targets (finite, not constant, at least 2
   training subjects with a value in every fold) and the cached network inputs (not constant);
2. only then write the run's identity (``run.json``, ``config.toml``, environment), the fold
   plan ``cv/folds.tsv`` (made once from ``[cv] seed``, re-read on resume) and ``factors/``;
3. train and evaluate one network per (repeat, fold, factor), skipping verified tasks;
4. write ``cv/predictions.tsv``, ``cv/metrics.tsv``, ``cv/table1.tsv`` and Figure 2.

The whole run holds the results folder's lock (:mod:`dfrn.workflows.lock`), so a second process on the
same folder is refused with the holder's PID and host.

Later stages (baseline, attention) read the same results folder.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from dfrn.data.cohort import Cohort, load_bids_cohort, load_cohort_table
from dfrn.config import StudyConfig
from dfrn.evaluation.tasks import StaticTargets, TargetProvider, plan_tasks, run_cv
from dfrn.errors import DfrnInputError
from dfrn.evaluation.folds import iter_splits, make_fold_plan, validate_fold_plan
from dfrn.data.images import VolumeCache, VolumeSet, check_common_grid
from dfrn.io import atomic_write_tsv, file_digest
from dfrn.workflows.lock import ResultsLock
from dfrn.plotting import format_table, plot_fig2
from dfrn.workflows.results import (
    InputFile,
    check_results_dir,
    read_run_info,
    record_resume,
    verify_inputs,
    write_run_identity,
)
from dfrn.evaluation.metrics import compute_metrics, table1
from dfrn.models.regressor import DFRNRegressor, resolve_device

__all__ = [
    "StudyResult",
    "load_study_cohort",
    "run_study",
    "run_cv_stage",
    "study_targets",
    "fold_plan_for",
    "prepare_volumes",
    "collect_inputs",
    "check_targets",
    "results_lock",
    "open_finished_study",
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


def collect_inputs(cfg: StudyConfig, cohort: Cohort, progress: bool = False) -> dict[str, InputFile]:
    """Every input file of the study with its SHA-256, keyed by role (not by location).

    The cohort table (or BIDS ``participants.tsv``), each participant's T1, the GM maps (when
    the baseline reads them), the brain mask, and the atlases, label tables, template and
    ground-truth masks named in the config.
    """
    from tqdm.auto import tqdm

    c = cfg.cohort
    wanted: list[tuple[str, str, Path]] = []
    table = Path(c.table) if c.table else Path(c.bids) / "participants.tsv"
    wanted.append(("cohort_table", "the cohort table", table))
    for pid, p in zip(cohort.participant_ids, cohort.images, strict=True):
        wanted.append((f"t1/{pid}", f"participant {pid} T1", Path(p)))
    if cfg.baseline.enabled:
        gm = cohort.path_column(c.gm_column)
        for pid, p in zip(cohort.participant_ids, gm or [], strict=False):
            if not p.is_file():
                raise DfrnInputError(f"participant {pid}: GM map not found: {p}")
            wanted.append((f"gm/{pid}", f"participant {pid} GM map", p))
    if c.mask:
        wanted.append(("mask", "the brain mask", Path(c.mask)))
    stages = [("baseline", cfg.baseline, ("atlas", "atlas_labels"))]
    stages.append(("attention", cfg.attention, ("atlas", "atlas_labels", "template")))
    for section, sub, keys in stages:
        if not sub.enabled:
            continue
        for k in keys:
            value = getattr(sub, k)
            if value:
                wanted.append((f"{section}.{k}", f"[{section}] {k}", Path(value)))
    if cfg.attention.enabled:
        for factor, value in sorted(cfg.attention.truth.items()):
            wanted.append((f"attention.truth.{factor}", f"[attention] truth {factor}", Path(value)))
    out: dict[str, InputFile] = {}
    for key, label, path in tqdm(wanted, desc="checking inputs", unit="file", disable=not progress):
        if not path.is_file():
            raise DfrnInputError(f"{label}: file not found: {path}")
        out[key] = InputFile(label, path, file_digest(path))
    return out


def fold_plan_for(cohort: Cohort, cfg: StudyConfig, out: Path) -> pd.DataFrame:
    """The saved fold plan (validated) on resume, else a new one (not yet written)."""
    path = out / "cv" / "folds.tsv"
    if path.is_file() and read_run_info(out) is not None:
        plan = pd.read_csv(path, sep="\t", dtype={"participant_id": str})
        validate_fold_plan(plan, cohort.participant_ids)
        return plan
    return make_fold_plan(cohort.participant_ids, cfg.cv.n_folds, cfg.cv.n_repeats, cfg.cv.seed)


def prepare_volumes(
    cohort: Cohort,
    cfg: StudyConfig,
    out: Path,
    progress: bool,
    inputs: dict[str, InputFile] | None = None,
    log: Callable[[str], None] = print,
) -> VolumeSet:
    """Normalised, downsampled, cached network inputs (refuses constant inputs)."""
    cache = VolumeCache(Path(cfg.cohort.cache_dir) if cfg.cohort.cache_dir else out / "cache")
    mask = Path(cfg.cohort.mask) if cfg.cohort.mask else None
    digests = None
    if inputs is not None:
        digests = [inputs[f"t1/{pid}"].digest for pid in cohort.participant_ids]
    return cache.prepare(
        cohort.participant_ids,
        cohort.images,
        cfg.cohort.downsample,
        mask,
        progress=progress,
        intensity=cfg.cohort.intensity,
        digests=digests,
        log=log,
    )


def study_targets(
    cohort: Cohort,
    cfg: StudyConfig,
    plan: pd.DataFrame,
    out: Path | None,
    log: Callable[[str], None],
) -> tuple[pd.DataFrame, TargetProvider]:
    """The targets and their provider; ``factors/`` is written into ``out`` unless None."""
    if cfg.factors is None:
        targets = cohort.targets
        return targets, StaticTargets(targets)
    from dfrn.targets.providers import factor_targets

    return factor_targets(cohort, cfg.factors, plan, out, log)


def check_targets(targets: pd.DataFrame, plan: pd.DataFrame, n_folds: int) -> None:
    """Refuse targets a network cannot be trained or evaluated on, before any training.

    Each factor needs finite values, at least ``n_folds`` subjects with a value, more than one
    distinct value, and at least 2 subjects with a value in the training part of every fold.

    Raises
    ------
    DfrnInputError
        One line naming the factor (and the repeat and fold).
    """
    for f in targets.columns:
        v = targets[f].to_numpy(float)
        if np.isinf(v).any():
            pid = targets.index[np.isinf(v)][0]
            raise DfrnInputError(f"factor {f!r} has an infinite value for participant {pid}")
        n = int(np.isfinite(v).sum())
        if n < n_folds:
            raise DfrnInputError(
                f"factor {f!r} has {n} subjects with a value, fewer than cv.n_folds={n_folds}"
            )
        values = np.unique(v[np.isfinite(v)])
        if len(values) < 2:
            raise DfrnInputError(
                f"factor {f!r} is constant ({values[0]:g} for all {n} subjects with a value): "
                "it cannot be predicted; remove it from [cohort] targets"
            )
    for r, fold, train, _ in iter_splits(plan):
        counts = targets.loc[train].notna().sum()
        for f, count in counts.items():
            if count < 2:
                raise DfrnInputError(
                    f"factor {f!r} has {int(count)} subject(s) with a value in the training part "
                    f"of repeat {r}, fold {fold} (at least 2 are needed); lower cv.n_folds or "
                    "add subjects with a value"
                )


@contextlib.contextmanager
def results_lock(out: Path, command: str, log: Callable[[str], None]) -> Iterator[None]:
    """Hold the results folder's lock; a one-line error when the folder cannot be written."""
    created = not Path(out).exists()
    try:
        lock = ResultsLock(out, command=command, log=log).acquire()
    except OSError as exc:
        if created:
            _remove_if_empty(Path(out))
        raise DfrnInputError(
            f"cannot write to the results folder {out}: {exc.strerror or exc}"
        ) from None
    try:
        yield
    finally:
        lock.release()
        if created:
            _remove_if_empty(Path(out))


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


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
    """Stages 1–4 (see the module docstring). The caller holds the folder's lock."""
    out = Path(out)
    resolve_device(cfg.training.device)  # before any caching: cuda on a CPU machine is refused
    cohort = load_study_cohort(cfg)
    check_common_grid(cohort.images, [f"participant {p}" for p in cohort.participant_ids])
    inputs = collect_inputs(cfg, cohort, progress)
    resumed = check_results_dir(out, cfg, inputs, allow_existing)
    plan = fold_plan_for(cohort, cfg, out)
    targets, provider = study_targets(cohort, cfg, plan, None, log)
    factors = list(targets.columns)
    check_targets(targets, plan, cfg.cv.n_folds)
    volumes = prepare_volumes(cohort, cfg, out, progress, inputs, log)
    # every input check has passed: only now does the folder become a run
    if resumed:
        record_resume(out)
    else:
        write_run_identity(out, cfg, inputs)
    if not (out / "cv" / "folds.tsv").is_file():
        atomic_write_tsv(plan, out / "cv" / "folds.tsv")
    if cfg.factors is not None:
        from dfrn.targets.providers import fit_factor_model
        from dfrn.targets.factors import write_factor_outputs

        write_factor_outputs(*fit_factor_model(cohort, cfg.factors), out)
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
        expected=targets,
    )
    metrics = compute_metrics(predictions)
    t1 = table1(metrics)
    atomic_write_tsv(predictions, out / "cv" / "predictions.tsv")
    atomic_write_tsv(metrics, out / "cv" / "metrics.tsv")
    atomic_write_tsv(t1, out / "cv" / "table1.tsv")
    plot_fig2(predictions, metrics, out / "figures" / "fig2_scatter.png")
    log(format_table(t1, "Table 1 — Pearson r (p) of out-of-fold predictions, per repeat"))
    result = StudyResult(out, resumed, cohort, targets, plan, predictions, metrics, t1)
    result.extra.update(volumes=volumes, provider=provider, inputs=inputs)
    return result


@dataclass
class FinishedStudy:
    """A finished run's config, cohort and fold plan, checked against its input files."""

    out: Path
    cfg: StudyConfig
    cohort: Cohort
    plan: pd.DataFrame
    inputs: dict[str, InputFile]


def open_finished_study(out: str | Path, progress: bool = False) -> FinishedStudy:
    """Load a results folder for a later stage (``dfrn baseline``, ``dfrn attention``).

    The input files must still be those the run was made with (by content; the folder may
    have moved), and the fold plan must cover the cohort.

    Raises
    ------
    DfrnInputError
        When ``out`` is not a results folder, or an input file changed (naming it).
    """
    from dfrn.config import load_config

    out = Path(out)
    if read_run_info(out) is None or not (out / "config.toml").is_file():
        raise DfrnInputError(f"{out} is not a results folder of 'dfrn run' (no run.json)")
    plan_path = out / "cv" / "folds.tsv"
    if not plan_path.is_file():
        raise DfrnInputError(f"{out} has no cv/folds.tsv; rerun 'dfrn run' to finish the run")
    cfg = load_config(out / "config.toml")
    cohort = load_study_cohort(cfg)
    inputs = collect_inputs(cfg, cohort, progress)
    verify_inputs(out, inputs)
    plan = pd.read_csv(plan_path, sep="\t", dtype={"participant_id": str})
    validate_fold_plan(plan, cohort.participant_ids)
    return FinishedStudy(out, cfg, cohort, plan, inputs)


def run_study(
    cfg: StudyConfig,
    out: str | Path,
    progress: bool = True,
    log: Callable[[str], None] = print,
    allow_existing: tuple[str, ...] = (),
    permutations: int = 0,
) -> StudyResult:
    """Run every configured stage, holding the folder's lock; returns the CV results.

    ``permutations`` > 0 also runs the network's permutation test (see
    :func:`dfrn.workflows.network_permutation.network_permutation_test`).
    """
    out = Path(out)
    with results_lock(out, "dfrn run", log):
        return _run_study_locked(cfg, out, progress, log, allow_existing, permutations)


def _run_study_locked(
    cfg: StudyConfig,
    out: Path,
    progress: bool,
    log: Callable[[str], None],
    allow_existing: tuple[str, ...],
    permutations: int,
) -> StudyResult:
    result = run_cv_stage(cfg, out, progress, log, allow_existing)
    if permutations > 0:
        from dfrn.workflows.network_permutation import network_permutation_test

        result.extra["network_permutation"] = network_permutation_test(
            out, cfg, result, permutations, progress=progress, log=log
        )
    if cfg.baseline.enabled:
        from dfrn.workflows.baseline import run_baseline_stage

        result.extra["baseline"] = run_baseline_stage(
            out, cfg, result.cohort, result.targets, result.extra["provider"], result.plan,
            progress=progress, log=log,
        )
    if cfg.attention.enabled:
        from dfrn.workflows.attention import run_attention_stage

        result.extra["attention"] = run_attention_stage(
            out, cfg, result.extra["volumes"], list(result.targets.columns), result.plan,
            progress=progress, log=log,
        )
    return result
