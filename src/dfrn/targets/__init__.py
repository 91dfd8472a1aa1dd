"""Targets layer: symptom factors (PCA + varimax) and the providers of per-fold targets.

Public names are re-exported here and imported on first use, so importing one
module of the layer does not import the others.
"""

from __future__ import annotations

from dfrn._exports import lazy_exports

_EXPORTS: dict[str, str] = {
    "CRITERIA": "retention",
    "ConfoundFit": "providers",
    "FewParticipantsWarning": "factors",
    "FoldFactorTargets": "providers",
    "ID_COLUMN": "factors",
    "ParallelAnalysis": "retention",
    "ResidualizedTargets": "providers",
    "STABILITY_COLUMNS": "stability",
    "StaticTargets": "providers",
    "SymptomFactors": "factors",
    "TargetProvider": "providers",
    "VarimaxResult": "factors",
    "VelicerMAP": "retention",
    "align_factors": "factors",
    "assign_factor_names": "factors",
    "check_complete": "factors",
    "congruence_band": "stability",
    "default_factor_names": "factors",
    "factor_congruence": "factors",
    "factor_targets": "providers",
    "fit_confounds": "providers",
    "fit_factor_model": "providers",
    "fold_factor_scores": "factors",
    "fold_stability": "stability",
    "item_correlation": "retention",
    "kaiser_criterion": "retention",
    "parallel_analysis": "retention",
    "read_items_table": "factors",
    "resolve_n_factors": "retention",
    "split_half_stability": "stability",
    "subset_stability": "stability",
    "suggest_n_factors": "retention",
    "summarise_stability": "stability",
    "varimax": "factors",
    "velicer_map": "retention",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
