"""The "beyond the covariates" stage: the covariates-only model and ``cv/confounds.tsv``.

Runs whenever ``[cohort] covariates`` or ``site`` is set, after the network (and the ridge
baseline, when it ran). It cross-validates the covariates-only model in the study's folds
(:func:`dfrn.evaluation.confounds.cross_validate_covariates`), judges each model's pooled
out-of-fold predictions by what they add beyond the covariates
(:func:`dfrn.evaluation.confounds.confound_table`) and writes:

* ``cv/covariates_predictions.tsv`` and ``cv/covariates_metrics.tsv``;
* ``cv/confounds.tsv``: repeat, factor, model, n, r, r_partial, p_partial, delta_r2,
  p_delta_r2_permutation; model is ``dfrn`` (the network), ``ridge`` (the ROI ridge),
  ``voxel_ridge`` (the ridge on the network's inputs) or ``covariates``;
* ``cv/confounds_summary.tsv``: the same over repeats, with a plain-words verdict per row.

The analysis is always on the raw target: with ``[confounds] target = "residualize"`` the
models were trained and evaluated on fold residuals, and their predictions are judged here
against each fold's raw target.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from dfrn.config import StudyConfig
from dfrn.data.covariates import CovariateSelection
from dfrn.evaluation.confounds import (
    confound_table,
    cross_validate_covariates,
    raw_target_predictions,
    summarise_confounds,
    verdict,
)
from dfrn.evaluation.metrics import compute_metrics, readable
from dfrn.io import atomic_write_tsv
from dfrn.plotting import format_table
from dfrn.targets.providers import TargetProvider
from dfrn.workflows.results import ResultsFolder

__all__ = ["run_covariates_model", "run_confounds_stage", "MODEL_WORDS", "target_words",
           "BASELINE_KEYS", "BaselineFiles", "baseline_files"]

#: How each model is named in the verdicts ("ridge" is the ROI ridge, named so before the
#: voxel ridge).
MODEL_WORDS = {"dfrn": "the network", "ridge": "the ROI ridge",
               "voxel_ridge": "the voxel ridge", "covariates": "the covariates"}


#: Each model of ``[baseline] models`` under its name in ``cv/confounds.tsv`` and in the
#: summary tables' columns (``<name>_r``); the ROI ridge keeps "ridge", its name before the
#: voxel ridge.
BASELINE_KEYS = {"roi_ridge": "ridge", "voxel_ridge": "voxel_ridge"}


@dataclass(frozen=True)
class BaselineFiles:
    """Where one baseline model's tables are."""

    predictions: Path
    metrics: Path
    permutation: Path


def baseline_files(out: str | Path, model: str = "roi_ridge") -> BaselineFiles:
    """The files of baseline ``model`` (``"roi_ridge"`` or ``"voxel_ridge"``) in ``out``.

    The baseline stage writes them; this stage and the report read them. The ROI ridge keeps
    the names it had before the voxel ridge (``baseline/predictions.tsv`` ...), so older
    readers still find it; the voxel ridge's are ``baseline/voxel_ridge_*.tsv``.
    """
    folder = ResultsFolder(Path(out))
    if model == "roi_ridge":
        return BaselineFiles(folder.baseline_predictions, folder.baseline_metrics,
                             folder.baseline_permutation)
    if model not in BASELINE_KEYS:
        raise ValueError(f"unknown baseline model {model!r}")
    return BaselineFiles(*(folder.baseline / f"{model}_{name}.tsv"
                           for name in ("predictions", "metrics", "permutation")))


def target_words(cfg: StudyConfig, selection: CovariateSelection | None) -> str:
    """What Table 1 reports: the raw target, or its residual after the covariates."""
    if cfg.confounds.target == "residualize" and selection is not None:
        return (f"targets residualised on {selection.words()} inside each training fold "
                "(Table 1 reports r on the residuals)")
    return "raw targets"


def _model_predictions(folder: ResultsFolder, cov_pred: pd.DataFrame, residualized: bool,
                       raw: TargetProvider, plan: pd.DataFrame) -> dict[str, pd.DataFrame]:
    models = {"dfrn": folder.read_predictions()}
    for model, key in BASELINE_KEYS.items():  # the ROI ridge as "ridge", the voxel ridge
        path = baseline_files(folder.root, model).predictions
        if path.is_file():
            models[key] = folder.read_predictions(path)
    if residualized:
        models = {k: raw_target_predictions(v, raw, plan) for k, v in models.items()}
    models["covariates"] = cov_pred
    return models


def run_covariates_model(
    out: str | Path,
    selection: CovariateSelection,
    raw_targets: TargetProvider,
    plan: pd.DataFrame,
) -> pd.DataFrame:
    """Cross-validate the covariates-only model; write its predictions and metrics.

    Returns
    -------
    DataFrame
        Its metrics (``cv/covariates_metrics.tsv``).
    """
    folder = ResultsFolder(Path(out))
    cov_pred = cross_validate_covariates(selection.design(), raw_targets, plan)
    metrics = compute_metrics(cov_pred)
    atomic_write_tsv(cov_pred, folder.covariates_predictions)
    atomic_write_tsv(metrics, folder.covariates_metrics)
    return metrics


def run_confounds_stage(
    out: str | Path,
    cfg: StudyConfig,
    selection: CovariateSelection | None,
    raw_targets: TargetProvider,
    plan: pd.DataFrame,
    log: Callable[[str], None] = print,
) -> pd.DataFrame | None:
    """Write the stage's files (see the module docstring); return the summary.

    The covariates-only model is (re)fitted first, so the table never mixes runs.

    Parameters
    ----------
    out : str or Path
        The results folder (``cv/predictions.tsv`` must exist).
    cfg : StudyConfig
    selection : CovariateSelection or None
        The study's covariates; None: nothing to do (returns None).
    raw_targets : TargetProvider
        The raw (not residualised) targets of each split.
    plan : DataFrame
        The fold plan.
    log : callable
    """
    if selection is None:
        return None
    folder = ResultsFolder(Path(out))
    design = selection.design()
    run_covariates_model(out, selection, raw_targets, plan)
    cov_pred = folder.read_predictions(folder.covariates_predictions)
    models = _model_predictions(folder, cov_pred, cfg.confounds.target == "residualize",
                                raw_targets, plan)
    table = confound_table(models, design, cfg.confounds.n_permutations, cfg.cv.seed)
    atomic_write_tsv(table, folder.confounds)
    summary = summarise_confounds(table)
    words = selection.words()
    summary["verdict"] = [
        verdict(row, words, MODEL_WORDS.get(row["model"], row["model"]))
        if row["model"] != "covariates" else f"the bar: r = {row['r']:.2f} from {words} alone"
        for _, row in summary.iterrows()
    ]
    atomic_write_tsv(summary, folder.confounds_summary)
    _log_summary(summary, cfg, words, log)
    return summary


def _log_summary(summary: pd.DataFrame, cfg: StudyConfig, words: str,
                 log: Callable[[str], None]) -> None:
    n = cfg.confounds.n_permutations
    shown = summary.drop(columns=["verdict", "sd_delta_r2"])
    log(format_table(
        readable(shown, 3),
        f"Beyond the covariates ({words}): partial r, ΔR² and Freedman–Lane p ({n} "
        "permutations) of the out-of-fold predictions (cv/confounds.tsv)",
    ))
    for _, row in summary.iterrows():
        log(f"  {row['factor']}: {row['verdict']}")
    log("  (ΔR² is the linear value added beyond the covariates in this cohort; it cannot rule "
        "out covariate effects a linear model misses, e.g. non-linear age effects)")
