"""Models layer: the DFRN network, its scikit-learn style regressor, the ridge estimator.

Public names are re-exported here and imported on first use, so importing one
module of the layer does not import the others.
"""

from __future__ import annotations

from dfrn._exports import lazy_exports

_EXPORTS: dict[str, str] = {
    "AUGMENT_MODES": "augment",
    "Augmenter": "augment",
    "EARLY_STOPPING_MODES": "early_stopping",
    "EarlyStopping": "early_stopping",
    "StopStep": "early_stopping",
    "voxel_gram": "ridge",
    "center_gram": "ridge",
    "KernelRidgePath": "ridge",
    "KernelRidgeCV": "ridge",
    "GRAM_BLOCK_VALUES": "ridge",
    "StoppingPlan": "early_stopping",
    "plan_stopping": "early_stopping",
    "SMOOTHED_MARGIN": "early_stopping",
    "check_combat_plan": "harmonize",
    "masked_sse": "regressor",
    "stratified_holdout": "regressor",
    "BasicBlock": "network",
    "block_channels": "network",
    "BatchFeeder": "feed",
    "ComBatHarmonizer": "harmonize",
    "DEFAULT_ALPHAS": "ridge",
    "DEFAULT_BLOCK_STRIDES": "network",
    "DFRN": "network",
    "DFRNRegressor": "regressor",
    "FREEZE_CHOICES": "pretrained",
    "InitSource": "pretrained",
    "InitReport": "pretrained",
    "read_init": "pretrained",
    "cached_init": "pretrained",
    "apply_init": "pretrained",
    "frozen_names": "pretrained",
    "freeze": "pretrained",
    "param_groups": "pretrained",
    "INTENDED_USE": "package",
    "METADATA_SCHEMA": "package",
    "ModelPackage": "package",
    "MultiTargetRidgeCV": "ridge",
    "PAPER_LITERAL_STRIDES": "network",
    "RidgeBaseline": "ridge",
    "RidgePath": "ridge",
    "SCHEMA_VERSION": "package",
    "apply_preprocess": "ridge",
    "clear_resident": "feed",
    "count_parameters": "network",
    "dfrn_version": "package",
    "encode_covariates": "ridge",
    "fit_preprocess": "ridge",
    "index_by_participant": "ridge",
    "load_package": "package",
    "package_readme": "package",
    "require_neurocombat": "harmonize",
    "resident_bytes": "feed",
    "resolve_device": "regressor",
    "scan_content_digest": "package",
    "seed_everything": "regressor",
    "split_view": "feed",
    "validate_metadata": "package",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
