"""Evaluation layer: fold plans, CV tasks, metrics, the ridge CV loop, permutation tests.

Public names are re-exported here and imported on first use, so importing one
module of the layer does not import the others.
"""

from __future__ import annotations

from dfrn._exports import lazy_exports

_EXPORTS: dict[str, str] = {
    "ALPHA": "confounds",
    "CONFOUND_COLUMNS": "confounds",
    "Executor": "executors",
    "FOLD_COLUMNS": "folds",
    "IncrementalValue": "confounds",
    "LocalExecutor": "executors",
    "METRIC_COLUMNS": "metrics",
    "PERMUTATION_COLUMNS": "permutation",
    "PREDICTION_COLUMNS": "metrics",
    "RAY_INSTALL_HINT": "executors",
    "RayExecutor": "executors",
    "RidgeInputs": "ridge_cv",
    "SLURM_INSTALL_HINT": "slurm",
    "SlurmExecutor": "slurm",
    "SlurmSettings": "slurm",
    "TRANSIENT_ERRORS": "executors",
    "Task": "tasks",
    "TaskJob": "tasks",
    "align_ridge_inputs": "ridge_cv",
    "align_targets": "ridge_cv",
    "check_plan_groups": "folds",
    "check_storage_probe": "executors",
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
    "make_executor": "executors",
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
    "remove_storage_probe": "executors",
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
    "write_storage_probe": "executors",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
