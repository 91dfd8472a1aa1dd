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
    "METHODS": "attribution",
    "Method": "attribution",
    "RANK_COLUMNS": "regions",
    "attribution": "attribution",
    "cascading_randomization": "sanity",
    "count_hooked_relus": "attribution",
    "factor_attention_map": "maps",
    "iter_subject_maps": "maps",
    "localisation_scores": "maps",
    "rank_regions": "regions",
    "ssim3d": "sanity",
    "to_template_space": "maps",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
