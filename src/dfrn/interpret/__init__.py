"""Interpretation layer: attributions, factor attention maps, region ranking, sanity checks.

Public names are re-exported here and imported on first use, so importing one
module of the layer does not import the others.
"""

from __future__ import annotations

from dfrn._exports import lazy_exports

_EXPORTS: dict[str, str] = {
    "AttentionMaps": "maps",
    "AttributionError": "attribution",
    "DFRN_CASCADE": "sanity",
    "FoldTask": "maps",
    "IMPORTANCE_COLUMNS": "ablation",
    "METHODS": "attribution",
    "MIN_REGION_VOXELS": "ablation",
    "Method": "attribution",
    "RANK_COLUMNS": "regions",
    "RegionGrid": "ablation",
    "SANITY_MAX_SPEARMAN": "sanity",
    "ablation_changes": "ablation",
    "attribution": "attribution",
    "cascading_randomization": "sanity",
    "count_hooked_relus": "attribution",
    "factor_attention_map": "maps",
    "fails_sanity": "sanity",
    "iter_subject_maps": "maps",
    "localisation_scores": "maps",
    "rank_regions": "regions",
    "region_importance": "ablation",
    "regions_on_grid": "ablation",
    "ssim3d": "sanity",
    "to_template_space": "maps",
    "train_mean_baseline": "ablation",
    "truth_ranks": "ablation",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
