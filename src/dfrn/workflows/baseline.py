"""The baseline stage of a study: ridge regression on atlas ROI volumes, same folds, its files.

Reads the results folder's config, cohort and fold plan, computes ROI features (the sum of
the maps of ``[cohort] gm_column`` per atlas region, × voxel volume, in ml: gray-matter volume
for GM probability maps; mean T1 intensity per region, with a warning, when the cohort has no
such column), cross-validates
:class:`dfrn.models.ridge.RidgeBaseline` on the network's (repeat, fold) plan with
:func:`dfrn.evaluation.ridge_cv.cross_validate_ridge` (covariates: ``[cohort] covariates``),
runs the permutation test, and draws Figure 3 next to the network's metrics when they
exist. This module writes the stage's files; every path comes from
:class:`dfrn.workflows.results.ResultsFolder`.

Outputs: ``baseline/roi_features.tsv``, ``baseline/predictions.tsv``,
``baseline/metrics.tsv``, ``baseline/permutation.tsv`` and ``figures/fig3_rr_vs_dfrn.png``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from dfrn.config import StudyConfig
from dfrn.data.atlas import Atlas, roi_mean_intensity, roi_volumes
from dfrn.data.cohort import Cohort, read_delimited
from dfrn.errors import DfrnInputError
from dfrn.evaluation.metrics import PREDICTION_COLUMNS, compute_metrics, mean_r, readable
from dfrn.evaluation.permutation import permutation_test
from dfrn.evaluation.ridge_cv import cross_validate_ridge
from dfrn.io import atomic_write_tsv
from dfrn.models.ridge import DEFAULT_ALPHAS
from dfrn.plotting import format_table, plot_fig3
from dfrn.targets.providers import StaticTargets, TargetProvider
from dfrn.workflows.attention import load_atlas_for
from dfrn.workflows.results import ResultsFolder

__all__ = [
    "run_baseline_stage",
    "write_roi_features",
    "write_baseline_outputs",
    "write_permutation_table",
]

_FIG3 = "fig3_rr_vs_dfrn"  # Figure 3's name in figures/


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


def write_baseline_outputs(predictions: pd.DataFrame, out: str | Path) -> tuple[Path, Path]:
    """Write the baseline's predictions and their metrics, full precision.

    Parameters
    ----------
    predictions : DataFrame
        Long predictions (:data:`dfrn.evaluation.metrics.PREDICTION_COLUMNS`).
    out : str or Path
        The results folder.

    Returns
    -------
    tuple of Path
        ``baseline/predictions.tsv`` and ``baseline/metrics.tsv``.
    """
    folder = ResultsFolder(Path(out))
    pred_path, metrics_path = folder.baseline_predictions, folder.baseline_metrics
    atomic_write_tsv(predictions[PREDICTION_COLUMNS], pred_path, float_format=None)
    atomic_write_tsv(compute_metrics(predictions), metrics_path, float_format=None)
    return pred_path, metrics_path


def write_permutation_table(table: pd.DataFrame, out: str | Path) -> Path:
    """Write the ridge permutation test's table, full precision.

    Parameters
    ----------
    table : DataFrame
        Output of :func:`dfrn.evaluation.permutation.permutation_test`.
    out : str or Path
        The results folder.

    Returns
    -------
    Path
        ``baseline/permutation.tsv``.
    """
    path = ResultsFolder(Path(out)).baseline_permutation
    atomic_write_tsv(table, path, float_format=None)
    return path


def _features(
    cohort: Cohort, cfg: StudyConfig, atlas: Atlas, folder: ResultsFolder,
    log: Callable[[str], None], atlas_option: str,
) -> pd.DataFrame:
    """The ROI features: read back when already written, else computed and written.

    The maps of ``[cohort] gm_column`` are summed per region (× voxel volume, in ml); they
    may hold gray matter or anything else (lesion maps), so the log names the column.
    """
    if folder.roi_features.is_file():
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
    """What the ridge takes from the study's covariates."""

    design: pd.DataFrame | None = None
    """All covariates, encoded (site dummies included): regressed out of the features."""
    sites: pd.Series | None = None
    """Site labels, for ComBat (``[baseline] harmonize = "combat"``)."""
    preserve: pd.DataFrame | None = None
    """The covariates ComBat keeps (the site dummies excluded)."""


def _covariates(cohort: Cohort, cfg: StudyConfig) -> _RidgeCovariates:
    """The ridge's covariates: ``[cohort] covariates`` and ``site``, and ComBat's inputs."""
    from dfrn.data.covariates import CovariateEncoder
    from dfrn.workflows.study import study_covariates

    selection = study_covariates(cohort, cfg)
    if selection is None:
        return _RidgeCovariates()
    design = selection.design()
    if cfg.baseline.harmonize != "combat":
        return _RidgeCovariates(design)
    from dfrn.models.harmonize import require_neurocombat

    require_neurocombat()  # before any work: a one-line error when the extra is missing
    site = cfg.cohort.site
    others = [c for c in selection.names if c != site]
    preserve = CovariateEncoder().fit_transform(selection.raw[others]) if others else None
    return _RidgeCovariates(design, selection.raw[site].astype(str), preserve)


def _draw_fig3(folder: ResultsFolder, cfg: StudyConfig, metrics: pd.DataFrame,
               dfrn_metrics: pd.DataFrame | None) -> None:
    """Figure 3, with the covariates-only bar when the study has covariates."""
    from dfrn.data.covariates import covariate_names, describe_covariates

    cov_metrics, label, note = None, "", ""
    names = covariate_names(cfg.cohort.covariates, cfg.cohort.site)
    if names and folder.covariates_metrics.is_file():
        cov_metrics = folder.read_metrics(folder.covariates_metrics)
        label = f"Covariates only ({describe_covariates(names)})"
        if cfg.confounds.target == "residualize":
            note = " (residualised target)"
    plot_fig3(metrics, dfrn_metrics, folder.figure(_FIG3), cov_metrics, label, note)


def _refresh_confounds(out: str | Path, cfg: StudyConfig, cohort: Cohort, plan: pd.DataFrame,
                       log: Callable[[str], None]) -> None:
    """After a later ``dfrn baseline``: redo the beyond-the-covariates table with its ridge."""
    from dfrn.workflows.confounds import run_confounds_stage
    from dfrn.workflows.study import study_covariates, study_targets

    selection = study_covariates(cohort, cfg)
    if selection is None or not ResultsFolder(Path(out)).predictions.is_file():
        return
    _, raw = study_targets(cohort, cfg, plan, None, log)
    run_confounds_stage(out, cfg, selection, raw, plan, log)


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
) -> dict[str, pd.DataFrame]:
    """Run the ridge baseline on a results folder whose fold plan exists.

    Called without ``cfg`` (``dfrn baseline RESULTS``), it takes the folder's lock and first
    checks that the input files are those the run was made with.

    Parameters
    ----------
    out : str or Path
        The results folder.
    cfg : StudyConfig, optional
        The study's config; None to read the folder's own (a later ``dfrn baseline``).
    cohort : Cohort, optional
        The loaded cohort (loaded from ``cfg`` when None).
    targets : DataFrame, optional
        The full-cohort targets; with ``provider``, from ``cfg`` when either is None.
    provider : TargetProvider, optional
        The per-split targets (a ``StaticTargets`` unless factors are fitted per fold).
    plan : DataFrame, optional
        The fold plan (read from the folder when None).
    progress : bool, default True
    log : callable, default print
    atlas, atlas_labels : str, optional
        Override ``[baseline] atlas`` and ``atlas_labels``.
    n_permutations : int, optional
        Override ``[baseline] n_permutations``.

    Returns
    -------
    dict of str to DataFrame
        ``predictions``, ``metrics``, ``summary`` (mean r per factor, ridge next to DFRN)
        and, when run, ``permutation``; empty when there is no atlas.
    """
    if cfg is None:
        from dfrn.workflows.study import open_finished_study, results_lock

        with results_lock(Path(out), "dfrn baseline", log):
            study = open_finished_study(out, progress)
            results = run_baseline_stage(
                out, study.cfg, study.cohort, None, None, study.plan, progress, log, atlas,
                atlas_labels, n_permutations,
            )
            _refresh_confounds(out, study.cfg, study.cohort, study.plan, log)
            return results
    from dfrn.workflows.study import (
        load_study_cohort,
        study_covariates,
        study_provider,
        study_targets,
    )

    folder = ResultsFolder(Path(out))
    b = cfg.baseline
    cohort = cohort or load_study_cohort(cfg, folder.root)
    if plan is None:
        plan = folder.read_folds()
    if targets is None or provider is None:
        targets, raw = study_targets(cohort, cfg, plan, folder.root, log)
        provider = study_provider(raw, study_covariates(cohort, cfg), cfg, log)
    atlas_obj = load_atlas_for(atlas or b.atlas, atlas_labels or b.atlas_labels, log)
    if atlas_obj is None:
        log("baseline skipped: it needs an atlas (--atlas/--atlas-labels or [baseline] atlas)")
        return {}
    option = "--atlas" if atlas else "[baseline] atlas"
    feats = _features(cohort, cfg, atlas_obj, folder, log, option)
    alphas = tuple(b.alphas) if b.alphas else DEFAULT_ALPHAS
    cov = _covariates(cohort, cfg)
    pred = cross_validate_ridge(feats, provider, plan, cov.design, sites=cov.sites,
                                preserve=cov.preserve, alphas=alphas)
    write_baseline_outputs(pred, folder.root)
    metrics = compute_metrics(pred)
    results = {"predictions": pred, "metrics": metrics}

    n_perm = b.n_permutations if n_permutations is None else n_permutations
    if n_perm > 0 and isinstance(provider, StaticTargets):
        perm = permutation_test(
            feats, targets, plan, n_perm=n_perm, seed=cfg.cv.seed, covariates=cov.design,
            progress=progress, alphas=alphas, sites=cov.sites, preserve=cov.preserve,
        )
        write_permutation_table(perm, folder.root)
        log(format_table(readable(perm, 4), f"Ridge baseline: permutation test ({n_perm} permutations)"))
        results["permutation"] = perm
    elif n_perm > 0:
        why = ("the targets are residualised per fold (the Freedman-Lane p of cv/confounds.tsv "
               "tests the ridge instead)" if cfg.confounds.target == "residualize"
               else "fit_on = 'train'")
        log(f"note: the ridge permutation test needs targets fixed before CV; skipped: {why}")

    dfrn_metrics = folder.read_metrics() if folder.metrics.is_file() else None
    _draw_fig3(folder, cfg, metrics, dfrn_metrics)
    summary = mean_r(metrics)["mean_r"].rename("ridge_r").to_frame()
    if dfrn_metrics is not None:
        dfrn_metrics = dfrn_metrics.assign(factor=dfrn_metrics["factor"].astype(str))
        summary["dfrn_r"] = mean_r(dfrn_metrics)["mean_r"]
    log(format_table(summary.reset_index().round(3), "Mean Pearson r over repeats: ridge vs DFRN"))
    results["summary"] = summary
    return results
