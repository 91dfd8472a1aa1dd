"""Data layer: cohorts, images and the volume cache, atlases and ROI tables, the synthetic cohort.

Public names are re-exported here and imported on first use, so importing one
module of the layer does not import the others.
"""

from __future__ import annotations

from dfrn._exports import lazy_exports

_EXPORTS: dict[str, str] = {
    "Atlas": "atlas",
    "Cohort": "cohort",
    "CovariateEncoder": "covariates",
    "CovariateSelection": "covariates",
    "DerivativeImages": "derivatives",
    "FACTORS": "synth",
    "FSL_AFFINE": "synth",
    "FSL_SHAPE": "synth",
    "GridSpec": "images",
    "INTENSITY_MODES": "images",
    "ImageLike": "images",
    "NONFINITE": "atlas",
    "PREP_TRANSFORMS": "prep",
    "PrepParams": "prep",
    "PrepResult": "prep",
    "REGIONS": "synth",
    "STATISTICS": "atlas",
    "SynthCohort": "synth",
    "TEMPLATE_SPACE": "templates",
    "Template": "templates",
    "VolumeCache": "images",
    "VolumeSet": "images",
    "ants_environment": "prep",
    "as_3d": "images",
    "block_downsample": "images",
    "check_common_grid": "images",
    "check_shared_files": "cohort",
    "check_t1": "prep",
    "covariate_names": "covariates",
    "describe_covariates": "covariates",
    "downsampled_affine": "images",
    "fetch_aal3_atlas": "atlas",
    "find_bids_t1": "cohort",
    "find_derivative_images": "derivatives",
    "image_name": "images",
    "labels_on_grid": "atlas",
    "load_atlas": "atlas",
    "load_bids_cohort": "cohort",
    "load_cohort_table": "cohort",
    "load_img": "images",
    "load_template": "synth",
    "load_volume": "images",
    "make_synthetic_cohort": "synth",
    "normalise": "images",
    "numeric_columns": "cohort",
    "order_classes": "prep",
    "preprocess_t1": "prep",
    "read_delimited": "cohort",
    "read_header": "images",
    "read_table": "cohort",
    "region_masks": "synth",
    "region_table": "atlas",
    "registration_qc": "prep",
    "require_ants": "prep",
    "resample_to_template": "derivatives",
    "resolve_template": "templates",
    "roi_mean_intensity": "atlas",
    "roi_volumes": "atlas",
    "same_world_grid": "templates",
    "select_covariates": "covariates",
    "set_ants_threads": "prep",
    "synthetic_parcellation": "atlas",
    "template_grid": "synth",
    "templateflow_home": "templates",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
