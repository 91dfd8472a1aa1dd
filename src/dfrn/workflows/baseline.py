"""The baseline stage of a study: classic models on the network's folds, and their files.

``[baseline] models`` chooses the models (both by default):

* ``roi_ridge``: ridge regression on atlas ROI features (the sum of the maps of
  ``[cohort] gm_column`` per atlas region, × voxel volume, in ml: gray-matter volume for GM
  probability maps; mean T1 intensity per region, with a warning, when the cohort has no such
  column) (:class:`dfrn.models.ridge.RidgeBaseline`). Its features are used as measured, as
  the network's images are: no covariate is regressed out of them, so the comparison with the
  network is like for like (``[confounds] target = "residualize"`` adjusts every model's
  targets instead; ``[baseline] harmonize = "combat"`` is the one named feature adjustment).
  It needs an atlas: without one it is skipped with a note.
* ``voxel_ridge``: ridge regression on exactly the network's inputs, the study's cached
  volumes (same grid, mask, intensity normalisation and downsampling), solved in the dual
  from the subjects' Gram matrix (:func:`dfrn.models.ridge.voxel_gram`,
  :class:`dfrn.models.ridge.KernelRidgeCV`): the linear yardstick of Schulz et al. (2020).
  It needs no atlas and no GM maps.

Both are cross-validated by :func:`dfrn.evaluation.ridge_cv.cross_validate_ridge` on the
network's (repeat, fold) plan with the network's targets (its target provider: residualised
inside each training fold under ``[confounds] target = "residualize"``), with the
permutation test of :func:`dfrn.evaluation.permutation.permutation_test` when the targets
are fixed before CV. Figure 3 shows them next to the network. Each model writes its own
files (:func:`dfrn.workflows.confounds.baseline_files`), so a model missing from a resumed
or finished folder is added without redoing the others: a model whose files exist is read
back. Every path comes from :class:`dfrn.workflows.results.ResultsFolder`.

Outputs: ``baseline/roi_features.tsv``, ``baseline/predictions.tsv``,
``baseline/metrics.tsv`` and ``baseline/permutation.tsv`` (the ROI ridge, as before the voxel
ridge), ``baseline/voxel_ridge_predictions.tsv``, ``baseline/voxel_ridge_metrics.tsv``,
``baseline/voxel_ridge_permutation.tsv`` and ``figures/fig3_rr_vs_dfrn.png``.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from dfrn.config import StudyConfig
from dfrn.data.atlas import Atlas, roi_mean_intensity, roi_volumes
from dfrn.data.cohort import Cohort, read_delimited
from dfrn.data.images import VolumeSet
from dfrn.errors import DfrnInputError
from dfrn.evaluation.bootstrap import Bootstrap, mean_r_ci
from dfrn.evaluation.metrics import PREDICTION_COLUMNS, compute_metrics, mean_r, readable
from dfrn.evaluation.permutation import permutation_test
from dfrn.evaluation.ridge_cv import GramInputs, cross_validate_ridge
from dfrn.io import atomic_write_text, atomic_write_tsv
from dfrn.models.ridge import DEFAULT_ALPHAS, voxel_gram
from dfrn.plotting import format_table, plot_fig3
from dfrn.targets.providers import StaticTargets, TargetProvider
from dfrn.workflows.attention import load_atlas_for
from dfrn.workflows.comparison import run_comparison_stage, study_bootstrap
from dfrn.workflows.confounds import BASELINE_KEYS, BaselineFiles, baseline_files
from dfrn.workflows.results import InputFile, ResultsFolder
from dfrn.workflows.study import Study

__all__ = [
    "run_baseline_stage",
    "write_roi_features",
    "write_baseline_outputs",
    "write_permutation_table",
    "MODEL_TITLES",
]

_FIG3 = "fig3_rr_vs_dfrn"  # Figure 3's name in figures/

#: Each baseline model in titles and the log.
MODEL_TITLES = {"roi_ridge": "Ridge baseline (ROI volumes)",
                "voxel_ridge": "Voxel ridge (network inputs)"}
_SUMMARY_NAMES = {"roi_ridge": "ridge (ROI volumes, ridge_r)",
                  "voxel_ridge": "ridge (network input voxels, voxel_ridge_r)"}


def write_roi_features(features: pd.DataFrame, out: str | Path) -> Path:
    """Write the ROI feature table (``participant_id`` first, then regions), full precision.

    Parameters
    ----------
    features : DataFrame
        Indexed by ``participant_id`` (or holding it as a column), one column per region.
    out : str or Path
        The results folder.

    Returns
    -------
    Path
        ``baseline/roi_features.tsv``.
    """
    path = ResultsFolder(Path(out)).roi_features
    table = (
        features
        if "participant_id" in features.columns
        else features.rename_axis("participant_id").reset_index()
    )
    atomic_write_tsv(table, path, float_format=None)
    return path


def write_baseline_outputs(predictions: pd.DataFrame, out: str | Path,
                           model: str = "roi_ridge",
                           boot: Bootstrap | None = None) -> tuple[Path, Path]:
    """Write a baseline model's predictions and their metrics, full precision.

    Parameters
    ----------
    predictions : DataFrame
        Long predictions (:data:`dfrn.evaluation.metrics.PREDICTION_COLUMNS`).
    out : str or Path
        The results folder.
    model : str, default "roi_ridge"
        The model (see :func:`dfrn.workflows.confounds.baseline_files`).
    boot : Bootstrap, optional
        The study's resamples: the metrics then carry each r's 95% CI.

    Returns
    -------
    tuple of Path
        ``baseline/predictions.tsv`` and ``baseline/metrics.tsv`` for the ROI ridge.
    """
    files = baseline_files(out, model)
    pred_path, metrics_path = files.predictions, files.metrics
    atomic_write_tsv(predictions[PREDICTION_COLUMNS], pred_path, float_format=None)
    atomic_write_tsv(compute_metrics(predictions, boot), metrics_path, float_format=None)
    return pred_path, metrics_path


def write_permutation_table(table: pd.DataFrame, out: str | Path,
                            model: str = "roi_ridge") -> Path:
    """Write a baseline model's permutation test table, full precision.

    Parameters
    ----------
    table : DataFrame
        Output of :func:`dfrn.evaluation.permutation.permutation_test`.
    out : str or Path
        The results folder.
    model : str, default "roi_ridge"
        The model (see :func:`dfrn.workflows.confounds.baseline_files`).

    Returns
    -------
    Path
        ``baseline/permutation.tsv`` for the ROI ridge.
    """
    path = baseline_files(out, model).permutation
    atomic_write_tsv(table, path, float_format=None)
    return path


def _features(
    cohort: Cohort, cfg: StudyConfig, atlas: Atlas, folder: ResultsFolder,
    log: Callable[[str], None], atlas_option: str, fresh: bool = False,
) -> pd.DataFrame:
    """The ROI features: read back when already written (unless ``fresh``: another atlas
    was given), else computed and written.

    The maps of ``[cohort] gm_column`` are summed per region (× voxel volume, in ml); they
    may hold gray matter or anything else (lesion maps), so the log names the column.
    """
    if folder.roi_features.is_file() and not fresh:
        return read_delimited(folder.roi_features, "ROI feature table").set_index(
            "participant_id"
        )
    column = cfg.cohort.gm_column
    gm = cohort.path_column(column)
    if gm is not None:
        for pid, p in zip(cohort.participant_ids, gm, strict=True):
            if p.is_dir():
                raise DfrnInputError(
                    f"participant {pid}: column {column!r} names a folder, not a NIfTI file: {p}"
                )
            if not p.is_file():
                raise DfrnInputError(f"participant {pid}: file of column {column!r} not found: {p}")
        log(f"ROI features: sum of '{column}' maps × voxel volume (ml) in {len(atlas.names)} "
            f"regions of {atlas.source}")
        feats = roi_volumes(gm, atlas, cohort.participant_ids, atlas_option=atlas_option)
    else:
        warnings.warn(
            f"no '{column}' column of GM maps in the cohort: the baseline falls back "
            "to mean T1 intensity per region",
            UserWarning,
            stacklevel=2,
        )
        feats = roi_mean_intensity(
            cohort.images, atlas, cohort.participant_ids, atlas_option=atlas_option
        )
    feats.index = feats.index.astype(str)
    feats.index.name = "participant_id"
    write_roi_features(feats, folder.root)
    return feats


@dataclass(frozen=True)
class _RidgeCovariates:
    """What the ROI ridge takes from the study's covariates: ComBat's inputs only (no
    covariate is regressed out of any model's features)."""

    sites: pd.Series | None = None
    """Site labels, for ComBat (``[baseline] harmonize = "combat"``)."""
    preserve: pd.DataFrame | None = None
    """The covariates ComBat keeps (the site dummies excluded)."""


def _covariates(cohort: Cohort, cfg: StudyConfig) -> _RidgeCovariates:
    """ComBat's inputs under ``[baseline] harmonize = "combat"``: the sites and the
    covariates whose effects it keeps; nothing otherwise."""
    from dfrn.data.covariates import CovariateEncoder
    from dfrn.workflows.study import study_covariates

    selection = study_covariates(cohort, cfg)
    if selection is None or cfg.baseline.harmonize != "combat":
        return _RidgeCovariates()
    from dfrn.models.harmonize import require_neurocombat

    require_neurocombat()  # before any work: a one-line error when the extra is missing
    site = cfg.cohort.site
    others = [c for c in selection.names if c != site]
    preserve = CovariateEncoder().fit_transform(selection.raw[others]) if others else None
    return _RidgeCovariates(selection.raw[site].astype(str), preserve)


def _draw_fig3(study: _Study, by_model: dict[str, dict[str, pd.DataFrame]],
               dfrn_metrics: pd.DataFrame | None) -> None:
    """Figure 3: the baseline models of ``by_model``, the network's metrics and the
    covariates-only bar when the study has covariates, each with its bootstrap CI. Every
    model sees its inputs as they are (raw comparison); the legend says when the targets
    were residualised."""
    from dfrn.data.covariates import covariate_names, describe_covariates

    folder, cfg = study.folder, study.cfg
    preds = {m: res["predictions"] for m, res in by_model.items()}
    if dfrn_metrics is not None:
        preds["dfrn"] = folder.read_predictions()
    cov_metrics, label, note = None, "", ""
    names = covariate_names(cfg.cohort.covariates, cfg.cohort.site)
    if names and folder.covariates_metrics.is_file():
        cov_metrics = folder.read_metrics(folder.covariates_metrics)
        preds["covariates"] = folder.read_predictions(folder.covariates_predictions)
        label = f"Covariates only ({describe_covariates(names)})"
        if cfg.confounds.target == "residualize":
            note = " (residualised target)"
    cis = {m: mean_r_ci(p, study.boot) for m, p in preds.items()} if study.boot.n_resamples else None
    plot_fig3(by_model.get("roi_ridge", {}).get("metrics"), dfrn_metrics, folder.figure(_FIG3),
              cov_metrics, label, note, voxel_ridge_metrics=by_model.get("voxel_ridge", {})
              .get("metrics"), cis=cis)


def _refresh_confounds(out: str | Path, study: Study, log: Callable[[str], None]) -> None:
    """After a later ``dfrn baseline``: redo the beyond-the-covariates table with its ridge."""
    from dfrn.workflows.confounds import run_confounds_stage

    if study.covariates is None or not ResultsFolder(Path(out)).predictions.is_file():
        return
    run_confounds_stage(out, study.cfg, study.covariates, study.raw_provider, study.plan, log)


@dataclass(frozen=True)
class _Overrides:
    """What ``dfrn baseline`` was given on its command line (None: the config's)."""

    atlas: str | None = None
    atlas_labels: str | None = None
    n_permutations: int | None = None

    @property
    def new_atlas(self) -> bool:
        """Another atlas: the ROI ridge is redone from new features."""
        return self.atlas is not None or self.atlas_labels is not None


@dataclass(frozen=True)
class _Study:
    """What every baseline model takes from the study."""

    folder: ResultsFolder
    cfg: StudyConfig
    cohort: Cohort
    plan: pd.DataFrame
    targets: pd.DataFrame
    provider: TargetProvider
    n_perm: int
    """Permutations to run: 0 when none are asked for, or the targets change per fold."""
    volumes: Callable[[], VolumeSet]
    """The network's inputs (prepared on first call)."""
    boot: Bootstrap
    """The study's bootstrap resamples (the metrics' CIs)."""

    @property
    def alphas(self) -> tuple[float, ...]:
        return tuple(self.cfg.baseline.alphas) if self.cfg.baseline.alphas else DEFAULT_ALPHAS


@dataclass(frozen=True)
class _ModelInputs:
    """One model's features and the covariates its features are adjusted for."""

    features: pd.DataFrame | GramInputs
    cov: _RidgeCovariates


def _load_study(out: str | Path, cfg: StudyConfig, cohort: Cohort | None,
                targets: pd.DataFrame | None, provider: TargetProvider | None,
                plan: pd.DataFrame | None, n_permutations: int | None, progress: bool,
                log: Callable[[str], None], volumes: VolumeSet | None = None,
                inputs: dict[str, InputFile] | None = None) -> _Study:
    """The study's cohort, plan, targets and provider (loaded where not given)."""
    from dfrn.workflows.study import (
        load_study_cohort,
        prepare_volumes,
        study_covariates,
        study_provider,
        study_targets,
    )

    folder = ResultsFolder(Path(out))
    cohort = cohort or load_study_cohort(cfg, folder.root)
    if plan is None:
        plan = folder.read_folds()
    if targets is None or provider is None:
        targets, raw = study_targets(cohort, cfg, plan, folder.root, log)
        provider = study_provider(raw, study_covariates(cohort, cfg), cfg, log)
    n_perm = cfg.baseline.n_permutations if n_permutations is None else n_permutations
    if n_perm > 0 and not isinstance(provider, StaticTargets):
        why = ("the targets are residualised per fold (the Freedman-Lane p of cv/confounds.tsv "
               "tests the ridge instead)" if cfg.confounds.target == "residualize"
               else "fit_on = 'train'")
        log(f"note: the ridge permutation test needs targets fixed before CV; skipped: {why}")
        n_perm = 0
    cached: list[VolumeSet] = [] if volumes is None else [volumes]

    def get_volumes() -> VolumeSet:
        if not cached:
            cached.append(prepare_volumes(cohort, cfg, folder.root, progress, inputs, log))
        return cached[0]

    return _Study(folder, cfg, cohort, plan, targets, provider, n_perm, get_volumes,
                  study_bootstrap(cfg))


def _roi_inputs(study: _Study, over: _Overrides, log: Callable[[str], None]
                ) -> _ModelInputs | None:
    """The ROI ridge's features (None, with a note, without an atlas)."""
    b = study.cfg.baseline
    atlas = load_atlas_for(over.atlas or b.atlas, over.atlas_labels or b.atlas_labels, log)
    if atlas is None:
        log("ROI ridge skipped: it needs an atlas (--atlas/--atlas-labels or [baseline] atlas)")
        return None
    option = "--atlas" if over.atlas else "[baseline] atlas"
    feats = _features(study.cohort, study.cfg, atlas, study.folder, log, option,
                      fresh=over.new_atlas)
    return _ModelInputs(feats, _covariates(study.cohort, study.cfg))


def _voxel_inputs(study: _Study, log: Callable[[str], None]) -> _ModelInputs:
    """The voxel ridge's Gram matrix over the network's inputs of the plan's subjects."""
    volumes = study.volumes()
    ids = [str(p) for p in dict.fromkeys(study.plan["participant_id"].astype(str))]
    gram = voxel_gram([volumes[i] for i in volumes.index_of(ids)])
    shape = "×".join(map(str, volumes.shape))
    log(f"voxel ridge: the network's inputs ({shape} voxels, downsample {volumes.downsample}, "
        f"intensity {volumes.intensity}) of {len(ids)} subjects, solved in the dual")
    return _ModelInputs(GramInputs(ids, gram), _RidgeCovariates())


#: Written beside the ROI ridge's tables: its features were used as measured. Folders made
#: before (with covariates) regressed the covariates out of them, so their tables are redone.
_FEATURES_NOTE = {"roi_features": "as measured: no covariate regressed out"}


def _features_note(folder: ResultsFolder) -> Path:
    return folder.baseline / "roi_ridge_features.json"


def _adjusted_by_older_dfrn(study: _Study, files: BaselineFiles,
                            log: Callable[[str], None]) -> bool:
    """Whether the folder's ROI ridge tables were made by an older dfrn that regressed the
    covariates out of the ROI features (then they are redone, with one log line)."""
    c = study.cfg.cohort
    if not (c.covariates or c.site) or not files.predictions.is_file():
        return False
    if _features_note(study.folder).is_file():
        return False
    log("ROI ridge: redone: its tables were made by an older dfrn that regressed the "
        "covariates out of the ROI features (now every model sees its inputs as they are)")
    return True


def _run_model(model: str, study: _Study, load: Callable[[], _ModelInputs | None],
               redo: tuple[bool, bool], progress: bool, log: Callable[[str], None]
               ) -> dict[str, pd.DataFrame] | None:
    """One model's predictions, metrics and permutation test: read back where its files
    exist (unless ``redo`` = (predictions, permutations) says so), else computed and written.
    None when the model cannot run (the ROI ridge without an atlas)."""
    files, root = baseline_files(study.folder.root, model), study.folder.root
    if model == "roi_ridge" and _adjusted_by_older_dfrn(study, files, log):
        redo = (True, True)
    have_pred = not redo[0] and files.predictions.is_file() and files.metrics.is_file()
    have_perm = not any(redo) and files.permutation.is_file()
    inputs = None
    if not (have_pred and (have_perm or study.n_perm == 0)):
        inputs = load()
        if inputs is None:
            return None
    if have_pred:
        pred = study.folder.read_predictions(files.predictions)
        log(f"{MODEL_TITLES[model]}: read back from {files.predictions.relative_to(root)}")
    else:
        assert inputs is not None
        pred = cross_validate_ridge(inputs.features, study.provider, study.plan,
                                    None, sites=inputs.cov.sites,
                                    preserve=inputs.cov.preserve, alphas=study.alphas)
        write_baseline_outputs(pred, root, model, study.boot)
        if model == "roi_ridge":
            atomic_write_text(_features_note(study.folder), json.dumps(_FEATURES_NOTE) + "\n")
    results = {"predictions": pred, "metrics": compute_metrics(pred, study.boot)}
    if study.n_perm == 0:
        return results
    if have_perm:
        perm = read_delimited(files.permutation, "baseline permutation table")
    else:
        assert inputs is not None
        perm = permutation_test(
            inputs.features, study.targets, study.plan, n_perm=study.n_perm,
            seed=study.cfg.cv.seed, covariates=None, progress=progress,
            alphas=study.alphas, sites=inputs.cov.sites, preserve=inputs.cov.preserve,
        )
        write_permutation_table(perm, root, model)
    log(format_table(readable(perm, 4), f"{MODEL_TITLES[model]}: permutation test "
                                        f"({study.n_perm} permutations)"))
    return {**results, "permutation": perm}


def _log_summary(by_model: dict[str, dict[str, pd.DataFrame]], dfrn_metrics: pd.DataFrame | None,
                 log: Callable[[str], None]) -> pd.DataFrame:
    """The mean r per factor of each baseline model next to the network's, logged."""
    columns = {f"{BASELINE_KEYS[m]}_r": mean_r(res["metrics"])["mean_r"]
               for m, res in by_model.items()}
    if dfrn_metrics is not None:
        columns["dfrn_r"] = mean_r(dfrn_metrics.assign(factor=dfrn_metrics["factor"].astype(str))
                                   )["mean_r"]
    summary = pd.DataFrame(columns)
    summary.index.name = "factor"
    names = " and ".join(_SUMMARY_NAMES[m] for m in by_model)
    log(format_table(summary.reset_index().round(3),
                     f"Mean Pearson r over repeats: {names} vs DFRN (raw comparison: no "
                     "covariate regressed out of any model's features)"))
    return summary


def _run_models(study: _Study, over: _Overrides, progress: bool,
                log: Callable[[str], None]) -> dict[str, pd.DataFrame]:
    """Every model of ``[baseline] models``, then Figure 3 and the summary."""
    loaders = {"roi_ridge": lambda: _roi_inputs(study, over, log),
               "voxel_ridge": lambda: _voxel_inputs(study, log)}
    redo = {"roi_ridge": (over.new_atlas, over.n_permutations is not None),
            "voxel_ridge": (False, over.n_permutations is not None)}
    by_model: dict[str, dict[str, pd.DataFrame]] = {}
    for model in study.cfg.baseline.models:
        res = _run_model(model, study, loaders[model], redo[model], progress, log)
        if res is not None:
            by_model[model] = res
    if not by_model:
        return {}
    folder = study.folder
    dfrn_metrics = folder.read_metrics() if folder.metrics.is_file() else None
    _draw_fig3(study, by_model, dfrn_metrics)
    results = dict(by_model.get("roi_ridge", {}))  # the ROI ridge's keys, as before
    for key, table in by_model.get("voxel_ridge", {}).items():
        results[f"voxel_ridge_{key}"] = table
    results["summary"] = _log_summary(by_model, dfrn_metrics, log)
    return results


def run_baseline_stage(
    out: str | Path,
    cfg: StudyConfig | None = None,
    cohort: Cohort | None = None,
    targets: pd.DataFrame | None = None,
    provider: TargetProvider | None = None,
    plan: pd.DataFrame | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    atlas: str | None = None,
    atlas_labels: str | None = None,
    n_permutations: int | None = None,
    volumes: VolumeSet | None = None,
) -> dict[str, pd.DataFrame]:
    """Run the models of ``[baseline] models`` on a results folder whose fold plan exists.

    Without ``cfg`` (``dfrn baseline RESULTS``) it takes the folder's lock, checks the input
    files against the run's and refreshes ``cv/confounds.tsv`` afterwards. A model whose
    files exist is read back unless the call changes it (``atlas``: the ROI ridge;
    ``n_permutations``: the permutation tests).

    Parameters
    ----------
    out : str or Path
        The results folder.
    cfg : StudyConfig, optional
        The study's config; None to read the folder's own (a later ``dfrn baseline``).
    cohort, plan : Cohort, DataFrame, optional
        The loaded cohort and the fold plan (from ``cfg`` and the folder when None).
    targets, provider : DataFrame, TargetProvider, optional
        The full-cohort targets and the per-split targets the network trains on (from
        ``cfg`` when either is None).
    progress : bool, default True
    log : callable, default print
    atlas, atlas_labels, n_permutations : optional
        Override ``[baseline] atlas``, ``atlas_labels`` and ``n_permutations``.
    volumes : VolumeSet, optional
        The network's inputs (prepared from the cache when the voxel ridge needs them).

    Returns
    -------
    dict of str to DataFrame
        The ROI ridge's ``predictions``, ``metrics`` and ``permutation`` (when run), the
        voxel ridge's as ``voxel_ridge_predictions`` etc., and ``summary`` (mean r per
        factor, each model next to DFRN); empty when no model could run.
    """
    over = _Overrides(atlas, atlas_labels, n_permutations)
    if cfg is None:
        return _on_finished_folder(out, over, progress, log)
    study = _load_study(out, cfg, cohort, targets, provider, plan, n_permutations,
                        progress, log, volumes)
    return _run_models(study, over, progress, log)


def _on_finished_folder(out: str | Path, over: _Overrides, progress: bool,
                        log: Callable[[str], None]) -> dict[str, pd.DataFrame]:
    """``dfrn baseline RESULTS``: under the folder's lock, with its own config and checked
    inputs; ``cv/confounds.tsv`` and ``cv/comparison.tsv`` are rewritten afterwards."""
    from dfrn.workflows.study import open_study, results_lock

    with results_lock(Path(out), "dfrn baseline", log):
        fin = open_study(out, progress, log)
        study = _load_study(out, fin.cfg, fin.cohort, fin.targets, fin.provider, fin.plan,
                            over.n_permutations, progress, log, fin.volumes)
        results = _run_models(study, over, progress, log)
        _refresh_confounds(out, fin, log)
        run_comparison_stage(out, fin.cfg, log)
        return results
