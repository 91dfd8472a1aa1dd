"""Evaluation layer: fold plans, CV tasks, metrics, the ridge CV loop, permutation tests.

Where the tasks run (this process, Ray, SLURM) is the :mod:`dfrn.executors` layer.

Public names are re-exported here and imported on first use, so importing one
module of the layer does not import the others.
"""

from __future__ import annotations

from dfrn._exports import lazy_exports

_EXPORTS: dict[str, str] = {
    "ALPHA": "confounds",
    "CONFOUND_COLUMNS": "confounds",
    "FOLD_COLUMNS": "folds",
    "IncrementalValue": "confounds",
    "METRIC_COLUMNS": "metrics",
    "PERMUTATION_COLUMNS": "permutation",
    "PREDICTION_COLUMNS": "metrics",
    "RidgeInputs": "ridge_cv",
    "Task": "tasks",
    "GramInputs": "ridge_cv",
    "fold_r": "metrics",
    "fold_r_summary": "metrics",
    "LearningCheck": "learning",
    "check_learning": "learning",
    "learning_warnings": "learning",
    "LEARNING_COLUMNS": "learning",
    "EARLY_FRACTION": "learning",
    "FALL_FRACTION": "learning",
    "TaskJob": "tasks",
    "align_ridge_inputs": "ridge_cv",
    "align_targets": "ridge_cv",
    "check_plan_groups": "folds",
    "collect_predictions": "tasks",
    "compute_metrics": "metrics",
    "confound_table": "confounds",
    "cross_validate_covariates": "confounds",
    "cross_validate_ridge": "ridge_cv",
    "format_p": "metrics",
    "format_r_p": "metrics",
    "format_sd": "metrics",
    "incremental_value": "confounds",
    "iter_splits": "folds",
    "make_fold_plan": "folds",
    "mean_r": "metrics",
    "permutation_indices": "permutation",
    "permutation_test": "permutation",
    "permutation_test_generic": "permutation",
    "permute_targets": "permutation",
    "plan_tasks": "tasks",
    "FactorNetwork": "tasks",
    "factor_networks": "tasks",
    "network_factors": "tasks",
    "prepare_split_engine": "ridge_cv",
    "raw_target_predictions": "confounds",
    "read_task_meta": "tasks",
    "readable": "metrics",
    "run_cv": "tasks",
    "run_task": "tasks",
    "run_task_job": "tasks",
    "split_rows": "ridge_cv",
    "strata_bins": "folds",
    "summarise_confounds": "confounds",
    "table1": "metrics",
    "task_seed": "tasks",
    "validate_fold_plan": "folds",
    "verdict": "confounds",
    "verify_task": "tasks",
    "Bootstrap": "bootstrap",
    "AlignedPredictions": "bootstrap",
    "align_predictions": "bootstrap",
    "bootstrap_r": "bootstrap",
    "repeat_r_ci": "bootstrap",
    "mean_r_ci": "bootstrap",
    "COMPARISON_COLUMNS": "comparison",
    "CorrectedTTest": "comparison",
    "ModelPair": "comparison",
    "corrected_resampled_ttest": "comparison",
    "fold_mse": "comparison",
    "compare_models": "comparison",
    "comparison_verdict": "comparison",
    "format_ci": "metrics",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
