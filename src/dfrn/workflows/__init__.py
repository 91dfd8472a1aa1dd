"""Workflows layer: the stages that read and write a results folder, and the demo.

Public names are re-exported here and imported on first use, so importing one
module of the layer does not import the others.
"""

from __future__ import annotations

from dfrn._exports import lazy_exports

_EXPORTS: dict[str, str] = {
    "DemoSettings": "demo",
    "FULL": "demo",
    "FinishedStudy": "study",
    "GM_FRACTION": "prep",
    "InputFile": "results",
    "LOCK_NAME": "lock",
    "PREDICT_COLUMNS": "predict",
    "PrepSubject": "prep",
    "PrepSummary": "prep",
    "QC_COLUMNS": "prep",
    "QUICK": "demo",
    "REFERENCES": "report",
    "ResultsFolder": "results",
    "ResultsFolderLocked": "lock",
    "ResultsLock": "lock",
    "SCRATCH": "results",
    "StudyResult": "run",
    "check_results_dir": "results",
    "check_targets": "study",
    "cohort_table_path": "study",
    "collect_inputs": "study",
    "demo_config": "demo",
    "environment": "results",
    "file_digest": "results",
    "find_packages": "predict",
    "fold_plan_for": "study",
    "load_atlas_for": "attention",
    "load_study_cohort": "study",
    "lock_results": "lock",
    "make_estimator_factory": "study",
    "network_permutation_test": "network_permutation",
    "open_finished_study": "study",
    "plan_prep_subjects": "prep",
    "predict_cohort": "predict",
    "prep_task": "prep",
    "prepare_volumes": "study",
    "read_run_info": "results",
    "record_resume": "results",
    "results_lock": "study",
    "run_attention_stage": "attention",
    "run_baseline_stage": "baseline",
    "run_cv_stage": "run",
    "run_demo": "demo",
    "run_factors": "factors",
    "run_prep": "prep",
    "run_study": "run",
    "run_study_prep": "study",
    "study_targets": "study",
    "suggest_factors": "factors",
    "template_name": "packages",
    "uses_prep": "study",
    "verify_inputs": "results",
    "warn_prep_qc": "study",
    "write_baseline_outputs": "baseline",
    "write_factor_outputs": "factors",
    "write_model_packages": "packages",
    "write_permutation_table": "baseline",
    "write_report": "report",
    "write_roi_features": "baseline",
    "write_run_identity": "results",
    "write_stability": "factors",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
