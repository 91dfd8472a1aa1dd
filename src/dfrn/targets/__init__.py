"""Targets layer: symptom factors (PCA + varimax) and the providers of per-fold targets.

Public names are re-exported here and imported on first use, so importing one
module of the layer does not import the others.
"""

from __future__ import annotations

from dfrn._exports import lazy_exports

_EXPORTS: dict[str, str] = {
    "FoldFactorTargets": "providers",
    "ID_COLUMN": "factors",
    "StaticTargets": "providers",
    "SymptomFactors": "factors",
    "TargetProvider": "providers",
    "VarimaxResult": "factors",
    "align_factors": "factors",
    "assign_factor_names": "factors",
    "default_factor_names": "factors",
    "factor_congruence": "factors",
    "factor_targets": "providers",
    "fit_factor_model": "providers",
    "fold_factor_scores": "factors",
    "read_items_table": "factors",
    "varimax": "factors",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
