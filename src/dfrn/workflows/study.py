"""The study context shared by the stages: cohort, input files, targets, volumes, lock.

:class:`Study` is one study as every stage reads it, built once per run
(:func:`dfrn.workflows.run.build_study`); :class:`StudyResult` collects what each stage
returned, in typed fields. ``dfrn run`` and the later commands (``dfrn baseline``,
``dfrn attention``) load a study through these functions, so each check (input digests,
targets, the fold plan, the folder's lock) exists once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from dfrn.config import StudyConfig
from dfrn.data.cohort import Cohort, load_bids_cohort, load_cohort_table, read_delimited
from dfrn.data.covariates import (
    CovariateSelection,
    covariate_target_copies,
    select_covariates,
)
from dfrn.data.images import VolumeCache, VolumeSet
from dfrn.errors import DfrnInputError, listed
from dfrn.evaluation.folds import check_plan_groups, iter_splits, make_fold_plan
from dfrn.executors import Executor
from dfrn.io import file_digest
from dfrn.models.regressor import DFRNRegressor
from dfrn.targets.providers import StaticTargets, TargetProvider
from dfrn.workflows.lock import ResultsLock
from dfrn.workflows.results import (
    InputFile,
    ResultsFolder,
    read_run_info,
    verify_inputs,
)

__all__ = [
    "Study",
    "StudyResult",
    "CVResult",
    "uses_prep",
    "cohort_table_path",
    "load_study_cohort",
    "warn_prep_qc",
    "run_study_prep",
    "collect_inputs",
    "fold_plan_for",
    "prepare_volumes",
    "study_targets",
    "study_covariates",
    "study_provider",
    "check_targets",
    "results_lock",
    "make_estimator_factory",
    "network_voxel_mm",
    "open_study",
]


@dataclass(frozen=True)
class Study:
    """One study as every stage reads it: built once, after every input check has passed.

    Attributes
    ----------
    cfg : StudyConfig
    out : Path
        The results folder.
    cohort : Cohort
    targets : DataFrame
        The checked targets of the whole cohort (factor scores or the table's columns).
    raw_provider : TargetProvider
        Each split's raw targets (factors refitted per training fold when asked).
    provider : TargetProvider
        What the models train on: ``raw_provider``, or its fold residuals on the covariates.
    covariates : CovariateSelection or None
        The ``[confounds] covariates``, coded.
    plan : DataFrame
        The fold plan (``cv/folds.tsv``).
    volumes : VolumeSet
        The cached network inputs.
    inputs : dict of str to InputFile
        Every input file and its digest (the run's identity).
    executor : Executor
        Runs the units of work of every stage.
    log : callable
    progress : bool
    resumed : bool
        Whether the folder held this run already.
    permutations : int
        Network permutations asked for (``dfrn run --permutations``).
    notes : tuple of str
        Shown at the top of the report.
    stability : DataFrame or None
        The factors' stability summary, logged after Table 1.
    """

    cfg: StudyConfig
    out: Path
    cohort: Cohort
    targets: pd.DataFrame
    raw_provider: TargetProvider
    provider: TargetProvider
    covariates: CovariateSelection | None
    plan: pd.DataFrame
    volumes: VolumeSet
    inputs: dict[str, InputFile]
    executor: Executor
    log: Callable[[str], None] = print
    progress: bool = True
    resumed: bool = False
    permutations: int = 0
    notes: tuple[str, ...] = ()
    stability: pd.DataFrame | None = None

    @property
    def factors(self) -> list[str]:
        """The targets' names, in order."""
        return list(self.targets.columns)


@dataclass(frozen=True)
class CVResult:
    """The CV stage's pooled out-of-fold predictions, their metrics and Table 1."""

    predictions: pd.DataFrame
    metrics: pd.DataFrame
    table1: pd.DataFrame


@dataclass
class StudyResult:
    """What the stages of one run returned, one typed field each (None: the stage did not run).

    The field names are the stage names of :data:`dfrn.workflows.stages.STAGES`.
    """

    study: Study
    cv: CVResult | None = None
    covariates_model: pd.DataFrame | None = None
    network_permutation: pd.DataFrame | None = None
    packages: dict[str, Path] | None = None
    baseline: dict[str, pd.DataFrame] | None = None
    comparison: pd.DataFrame | None = None
    attention: dict[str, pd.DataFrame] | None = None
    confounds: pd.DataFrame | None = None
    report: Path | None = None

    @property
    def out(self) -> Path:
        return self.study.out

    @property
    def resumed(self) -> bool:
        return self.study.resumed

    @property
    def cohort(self) -> Cohort:
        return self.study.cohort

    @property
    def targets(self) -> pd.DataFrame:
        return self.study.targets

    @property
    def plan(self) -> pd.DataFrame:
        return self.study.plan

    @property
    def predictions(self) -> pd.DataFrame:
        return self._cv().predictions

    @property
    def metrics(self) -> pd.DataFrame:
        return self._cv().metrics

    @property
    def table1(self) -> pd.DataFrame:
        return self._cv().table1

    def _cv(self) -> CVResult:
        if self.cv is None:
            raise RuntimeError("the CV stage has not run")
        return self.cv


def uses_prep(cfg: StudyConfig) -> bool:
    """Whether the study's images come from its own prep stage (``<results>/prep/``)."""
    return cfg.prep is not None or bool(cfg.cohort.derivatives)


def cohort_table_path(cfg: StudyConfig, out: str | Path | None) -> Path:
    """The table the study's cohort is read from (``<results>/prep/cohort.tsv`` with prep)."""
    c = cfg.cohort
    if uses_prep(cfg):
        if out is None:
            raise ValueError("a study with [prep] or [cohort] derivatives needs its results folder")
        return ResultsFolder(Path(out)).prep / "cohort.tsv"
    return Path(c.table) if c.table else Path(c.bids) / "participants.tsv"


def load_study_cohort(cfg: StudyConfig, out: str | Path | None = None) -> Cohort:
    """The cohort named by ``[cohort]``; targets are validated unless factors derive them.

    With ``[prep]`` or ``[cohort] derivatives`` the cohort is ``<out>/prep/cohort.tsv``,
    written by :func:`run_study_prep`. A cohort made by ``dfrn prep`` warns about subjects
    that QC flagged or that failed and are missing from it. Participants that share an image
    or GM file are warned about, or refused under ``[cohort] strict``.
    """
    c = cfg.cohort
    targets = [] if cfg.factors is not None else list(c.targets)
    # the GM maps are checked like the images: present, files, one per participant
    gm, strict = [c.gm_column], c.strict
    if uses_prep(cfg):
        table = cohort_table_path(cfg, out)
        if not table.is_file():
            raise DfrnInputError(
                f"{table} is missing: the study's prep stage has not finished; rerun 'dfrn run'"
            )
        cohort = load_cohort_table(
            table, targets, "t1", c.covariates, file_columns=gm, strict=strict
        )
    elif c.table:
        cohort = load_cohort_table(
            c.table, targets, c.image_column, c.covariates, file_columns=gm, strict=strict
        )
    else:
        cohort = load_bids_cohort(
            c.bids, targets, c.covariates, session=c.session or None, file_columns=gm,
            strict=strict,
        )
    warn_prep_qc(cohort)
    selection = study_covariates(cohort, cfg)
    if selection is not None and selection.dropped:
        import warnings

        warnings.warn(
            f"{len(selection.dropped)} subject(s) left out of the study because a covariate is "
            f"missing ([cohort] missing_covariates = \"drop\"): "
            f"{listed(selection.dropped, 10)}",
            UserWarning, stacklevel=2,
        )
        cohort = cohort.without(selection.dropped)
    return cohort


def study_covariates(cohort: Cohort, cfg: StudyConfig) -> CovariateSelection | None:
    """The study's ``[cohort] covariates`` and ``site``, checked (None without any).

    Subjects missing a covariate are refused by name, or listed in ``dropped`` under
    ``[cohort] missing_covariates = "drop"``.
    """
    c = cfg.cohort
    return select_covariates(cohort.table, c.covariates, c.site, c.missing_covariates,
                             categorical=c.categorical_covariates)


def warn_prep_qc(cohort: Cohort) -> None:
    """Warn about subjects ``dfrn prep`` flagged (``prep_status``) or that failed (``qc.tsv``)."""
    import warnings

    if "prep_status" in cohort.table.columns:
        flagged = cohort.table.index[cohort.table["prep_status"].astype(str) == "flagged"]
        if len(flagged):
            warnings.warn(
                f"{len(flagged)} subject(s) were flagged by dfrn prep's QC and are included: "
                f"{', '.join(map(str, flagged[:5]))}; check qc.tsv and their QC figures",
                UserWarning, stacklevel=2,
            )
    # dfrn prep's cohort.tsv sits beside qc.tsv; the BIDS group level's group_cohort.tsv
    # (labelled subjects only) beside group_qc.tsv
    name = cohort.source.name
    qc_name = name[: -len("cohort.tsv")] + "qc.tsv" if name.endswith("cohort.tsv") else "qc.tsv"
    qc_path = cohort.source.parent / qc_name if cohort.source.is_file() else None
    if qc_path is not None and qc_path.is_file() and "prep_status" in cohort.table.columns:
        qc = read_delimited(qc_path, "prep QC table")
        failed = qc.loc[qc["status"] == "failed", "participant_id"].tolist()
        if failed:
            warnings.warn(
                f"{len(failed)} subject(s) failed dfrn prep and are not in the cohort: "
                f"{', '.join(failed[:5])} (see {qc_path})", UserWarning, stacklevel=2,
            )


def run_study_prep(cfg: StudyConfig, out: Path, progress: bool, log: Callable[[str], None],
                   resumed: bool, executor: Executor | None = None) -> None:
    """The study's prep stage: raw scans (``[prep]``) or derivatives into ``<out>/prep``.

    Finished subjects are reused. On a resumed run, a raw scan that changed since it was
    preprocessed is refused (the study's results were made from the old one). Failed subjects
    stop the study with an error naming them.
    """
    from dfrn.config import PrepConfig
    from dfrn.workflows.prep import run_prep

    c = cfg.cohort
    p = cfg.prep or PrepConfig()
    run_prep(
        c.table or c.bids, ResultsFolder(out).prep, image_column=c.image_column,
        session=c.session or None, derivatives=c.derivatives or None, transform=p.transform,
        seed=p.seed, deterministic=p.deterministic, template=p.template or None,
        template_mask=p.template_mask or None, template_space=p.template_space or None,
        jobs=p.jobs, dice_min=p.dice_min,
        corr_min=p.corr_min, progress=progress, log=log,
        changed_input="refuse" if resumed else "rerun", executor=executor,
    )


def _init_files(cfg: StudyConfig) -> list[tuple[str, str, Path]]:
    """``[model] init``'s files (a package's metadata and weights): part of the run's
    identity, so other pretrained weights are another run."""
    if not cfg.model.init:
        return []
    p = Path(cfg.model.init)
    if not p.is_dir():
        return [("model.init", "[model] init", p)]
    files = [p / "metadata.json", *sorted(p.glob("model-*.safetensors"))]
    return [(f"model.init/{f.name}", f"[model] init {f.name}", f) for f in files]


def collect_inputs(cfg: StudyConfig, cohort: Cohort, progress: bool = False) -> dict[str, InputFile]:
    """Every input file of the study with its SHA-256, keyed by role (not by location).

    The cohort table (or BIDS ``participants.tsv``), each participant's T1, the GM maps (when
    the table has a GM column), the brain mask, and the atlases, label tables, template and
    ground-truth masks named in the config.
    """
    from tqdm.auto import tqdm

    c = cfg.cohort
    wanted: list[tuple[str, str, Path]] = []
    table = cohort.source if uses_prep(cfg) else cohort_table_path(cfg, None)
    wanted.append(("cohort_table", "the cohort table", table))
    for pid, p in zip(cohort.participant_ids, cohort.images, strict=True):
        wanted.append((f"t1/{pid}", f"participant {pid} T1", Path(p)))
    # GM maps count whenever the table names them: a later 'dfrn baseline' reads them even
    # when the run itself had the baseline disabled
    gm = cohort.path_column(c.gm_column)
    if gm is not None:
        for pid, p in zip(cohort.participant_ids, gm, strict=True):
            if not p.is_file():
                raise DfrnInputError(f"participant {pid}: GM map not found: {p}")
            wanted.append((f"gm/{pid}", f"participant {pid} GM map", p))
    if c.mask:
        wanted.append(("mask", "the brain mask", Path(c.mask)))
    wanted += _init_files(cfg)
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


def fold_plan_for(
    cohort: Cohort, cfg: StudyConfig, out: Path, targets: pd.DataFrame | None = None
) -> pd.DataFrame:
    """The saved fold plan (validated) on resume, else a new one (not yet written).

    ``[cv] groups`` keeps each group of that column in one fold (a saved plan that splits a
    group is refused); ``[cv] stratify`` balances the first column of ``targets``. Before
    any training, the plan is checked for ComBat (``[baseline] harmonize = "combat"``) and a
    covariate that copies a target is warned about.
    """
    folder = ResultsFolder(out)
    groups = _fold_groups(cohort, cfg)
    if folder.folds.is_file() and read_run_info(out) is not None:
        plan = folder.read_folds(cohort.participant_ids)
    else:
        strata = None
        if cfg.cv.stratify:
            if targets is None or targets.shape[1] == 0:
                raise ValueError("[cv] stratify needs the study's targets")
            strata = targets.iloc[:, 0].reindex(cohort.participant_ids).to_numpy(float)
        plan = make_fold_plan(
            cohort.participant_ids, cfg.cv.n_folds, cfg.cv.n_repeats, cfg.cv.seed,
            groups=None if groups is None else groups.tolist(), strata=strata,
            group_column=cfg.cv.groups,
        )
    if groups is not None:
        check_plan_groups(plan, groups, cfg.cv.groups)
    _check_plan_for_stages(cohort, cfg, plan, targets)
    return plan


def _check_plan_for_stages(cohort: Cohort, cfg: StudyConfig, plan: pd.DataFrame,
                           targets: pd.DataFrame | None = None) -> None:
    """What the later stages need of the fold plan and the targets, checked before training.

    With ``[baseline] harmonize = "combat"``, every site needs at least 2 training subjects
    in every split (:func:`dfrn.models.harmonize.check_combat_plan`). A covariate that copies
    a target (``|r| > 0.999``) is warned about: its partial r would be rounding noise.

    Raises
    ------
    DfrnInputError
        When ComBat could not be learned on some training fold (naming it and the site).
    """
    import warnings

    b = cfg.baseline
    roi_ridge_runs = b.enabled and "roi_ridge" in b.models and bool(b.atlas)
    if roi_ridge_runs and b.harmonize == "combat" and cfg.cohort.site:  # ComBat's only user
        from dfrn.models.harmonize import check_combat_plan

        check_combat_plan(plan, cohort.table[cfg.cohort.site], targets)
    selection = study_covariates(cohort, cfg) if targets is not None else None
    if selection is None:
        return
    for covariate, target, r, n in covariate_target_copies(selection, targets):
        warnings.warn(
            f"covariate {covariate!r} is a copy of target {target!r} (r = {r:.4f} on the {n} "
            "subjects with both): the analysis beyond the covariates would compute its partial "
            f"r on rounding noise; remove {covariate!r} from [cohort] covariates or {target!r} "
            "from the targets", UserWarning, stacklevel=2,
        )


def _fold_groups(cohort: Cohort, cfg: StudyConfig) -> pd.Series | None:
    column = cfg.cv.groups
    if not column:
        return None
    if column not in cohort.table.columns:
        raise DfrnInputError(
            f"[cv] groups names column {column!r}, which is not in the cohort table "
            f"(available: {', '.join(map(str, cohort.table.columns))})"
        )
    groups = cohort.table[column]
    empty = groups.index[groups.isna().to_numpy()]
    if len(empty):
        raise DfrnInputError(f"participant {empty[0]}: group column {column!r} is empty")
    return groups.set_axis(groups.index.astype(str))


def prepare_volumes(
    cohort: Cohort,
    cfg: StudyConfig,
    out: Path,
    progress: bool,
    inputs: dict[str, InputFile] | None = None,
    log: Callable[[str], None] = print,
) -> VolumeSet:
    """Normalised, downsampled, cached network inputs (refuses constant inputs)."""
    cache = VolumeCache(Path(cfg.cohort.cache_dir) if cfg.cohort.cache_dir else ResultsFolder(out).cache)
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
    plan: pd.DataFrame | None,
    out: Path | None,
    log: Callable[[str], None],
) -> tuple[pd.DataFrame, TargetProvider]:
    """The targets and their provider; ``factors/`` is written into ``out`` unless None."""
    if cfg.factors is None:
        targets = cohort.targets
        return targets, StaticTargets(targets)
    from dfrn.targets.providers import factor_targets, fit_factor_model
    from dfrn.workflows.factors import write_factor_outputs

    targets, provider = factor_targets(cohort, cfg.factors, plan, log)
    if out is not None:
        write_factor_outputs(*fit_factor_model(cohort, cfg.factors), out)
    return targets, provider


def study_provider(
    raw: TargetProvider,
    selection: CovariateSelection | None,
    cfg: StudyConfig,
    log: Callable[[str], None] = print,
) -> TargetProvider:
    """The targets the models train on: ``raw``, or its fold residuals on the covariates."""
    if cfg.confounds.target != "residualize" or selection is None:
        return raw
    from dfrn.targets.providers import ResidualizedTargets

    log(f"targets: residualised on {selection.words()} inside each training fold (fitted on the "
        "training subjects, applied to the test subjects)")
    return ResidualizedTargets(raw, selection.design())


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


def network_voxel_mm(volumes: VolumeSet) -> float:
    """The network input's voxel size in mm: the images' (mean over axes) × downsample."""
    zooms = np.sqrt((np.asarray(volumes.input_grid.affine)[:3, :3] ** 2).sum(axis=0))
    return float(zooms.mean() * volumes.downsample)


def make_estimator_factory(cfg: StudyConfig, progress: bool,
                           voxel_mm: float = 1.0) -> Callable[[int, str], DFRNRegressor]:
    """``make(seed, desc)``: an unfitted regressor with the study's training settings.

    ``voxel_mm`` is the network input's voxel size (:func:`network_voxel_mm`), for the
    augmentation's shifts in mm.
    """
    # every [training] key is a regressor parameter, except the per-task ones
    settings = {k: v for k, v in asdict(cfg.training).items() if k not in ("seed", "n_seeds")}

    model = {k: v for k, v in asdict(cfg.model).items() if k != "heads"}  # heads: the tasks'
    model["block_strides"] = tuple(model["block_strides"])

    def make(seed: int, desc: str) -> DFRNRegressor:
        return DFRNRegressor(seed=seed, progress=progress, desc=desc, voxel_mm=voxel_mm,
                             **model, **settings)

    return make


def open_study(out: str | Path, progress: bool = False, log: Callable[[str], None] = print,
               executor: Executor | None = None) -> Study:
    """A finished results folder as the :class:`Study` its later stages read (``dfrn
    baseline``, ``dfrn attention``): the folder's own config, its cohort, targets, covariates,
    fold plan and cached volumes, through the same functions as ``dfrn run``.

    The input files must still be those the run was made with (by content; the folder may
    have moved), and the fold plan must cover the cohort. The caller holds the folder's lock.

    Raises
    ------
    DfrnInputError
        When ``out`` is not a results folder, or an input file changed (naming it).
    """
    from dfrn.config import load_config
    from dfrn.executors import LocalExecutor

    out = Path(out)
    folder = ResultsFolder(out)
    if read_run_info(out) is None or not folder.config_toml.is_file():
        raise DfrnInputError(f"{out} is not a results folder of 'dfrn run' (no run.json)")
    if not folder.folds.is_file():
        raise DfrnInputError(f"{out} has no cv/folds.tsv; rerun 'dfrn run' to finish the run")
    cfg = load_config(folder.config_toml)
    cohort = load_study_cohort(cfg, out)
    inputs = collect_inputs(cfg, cohort, progress)
    verify_inputs(out, inputs)
    plan = folder.read_folds(cohort.participant_ids)
    targets, raw = study_targets(cohort, cfg, plan, None, log)
    selection = study_covariates(cohort, cfg)
    provider = study_provider(raw, selection, cfg, log)
    volumes = prepare_volumes(cohort, cfg, out, progress, inputs, log)
    return Study(cfg, out, cohort, targets, raw, provider, selection, plan, volumes, inputs,
                 executor if executor is not None else LocalExecutor(), log, progress,
                 resumed=True)
