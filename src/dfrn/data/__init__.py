"""Data layer: cohorts, images and the volume cache, atlases and ROI tables, the synthetic cohort.

Public names are re-exported here and imported on first use, so importing one
module of the layer does not import the others.
"""

from __future__ import annotations

from dfrn._exports import lazy_exports

_EXPORTS: dict[str, str] = {
    "Atlas": "atlas",
    "Cohort": "cohort",
    "FACTORS": "synth",
    "FSL_AFFINE": "synth",
    "FSL_SHAPE": "synth",
    "GridSpec": "images",
    "INTENSITY_MODES": "images",
    "ImageLike": "images",
    "NONFINITE": "atlas",
    "REGIONS": "synth",
    "STATISTICS": "atlas",
    "SynthCohort": "synth",
    "VolumeCache": "images",
    "VolumeSet": "images",
    "as_3d": "images",
    "block_downsample": "images",
    "check_common_grid": "images",
    "downsampled_affine": "images",
    "fetch_aal3_atlas": "atlas",
    "image_name": "images",
    "load_atlas": "atlas",
    "load_bids_cohort": "cohort",
    "load_cohort_table": "cohort",
    "load_img": "images",
    "load_template": "synth",
    "load_volume": "images",
    "make_synthetic_cohort": "synth",
    "normalise": "images",
    "numeric_columns": "cohort",
    "read_header": "images",
    "read_table": "cohort",
    "region_masks": "synth",
    "region_table": "atlas",
    "roi_mean_intensity": "atlas",
    "roi_volumes": "atlas",
    "synthetic_parcellation": "atlas",
    "template_grid": "synth",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
