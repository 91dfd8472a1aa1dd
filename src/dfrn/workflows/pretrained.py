"""``[model] init`` at the study level: checked once, before the folder becomes a run.

The weights are read and fitted to the study's network (a mismatch is one line naming the
first tensor), the log says what was loaded, and a package made for other inputs is
refused (another intensity mode: the networks' inputs would mean something else) or warned
about (another voxel size: convolutions apply at any grid, but what they learned is scaled
in voxels, so their receptive fields now cover another extent in mm).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from dfrn.config import StudyConfig
from dfrn.errors import DfrnInputError
from dfrn.models.network import DFRN
from dfrn.models.pretrained import InitSource, apply_init, cached_init

__all__ = ["check_init", "init_provenance"]


def _package_inputs(source: InitSource, cfg: StudyConfig, voxel_mm: float,
                    log: Callable[[str], None]) -> None:
    """Refuse a package of another intensity mode; warn about another voxel size."""
    if source.meta is None:
        return
    inp = source.meta["input"]
    if inp["intensity"] != cfg.cohort.intensity:
        raise DfrnInputError(
            f"config [model] init {source.path}: the package's networks were trained on "
            f"intensity '{inp['intensity']}' inputs, this study's are '{cfg.cohort.intensity}'; "
            "set [cohort] intensity to match, or start from other weights"
        )
    zooms = np.sqrt((np.asarray(inp["affine"], float)[:3, :3] ** 2).sum(axis=0))
    theirs = float(zooms.mean() * inp["downsample"])
    if not np.isclose(theirs, voxel_mm, rtol=1e-3):
        log(f"warning: [model] init {source.path} was trained on {theirs:g} mm network inputs, "
            f"this study's are {voxel_mm:g} mm: the convolutions apply at any grid, but each "
            f"layer's receptive field now covers {voxel_mm / theirs:.2g}× the extent in mm")


def _package_overlap(source: InitSource, scans: set[str], factors: list[str],
                     log: Callable[[str], None]) -> None:
    """A package trained on this study's scans: refused for one of its factors (its network
    saw the test folds' targets: the CV would leak), warned about for another target."""
    if source.meta is None:
        return
    shared = len(scans & set(source.meta.get("training_scans_sha256", [])))
    if not shared:
        return
    factor = source.meta["factor"]
    if factor in factors:
        raise DfrnInputError(
            f"config [model] init {source.path}: the package's networks were trained on "
            f"'{factor}' with {shared} of this study's scans, so every test fold's target was "
            "seen before training: start from a package made on another cohort"
        )
    log(f"warning: [model] init {source.path} was trained (on '{factor}') with {shared} of "
        "this study's scans: the CV is optimistic if that target carries this study's signal")


def check_init(cfg: StudyConfig, n_factors: int, voxel_mm: float,
               log: Callable[[str], None], scans: set[str] = frozenset(),
               factors: list[str] | None = None) -> InitSource | None:
    """Read ``[model] init``, fit it to the study's network (``n_factors`` outputs with
    joint heads) and log what was loaded; ``voxel_mm`` is the network input's voxel size.
    ``scans`` (the SHA-256 of the study's T1 files) and ``factors`` check that a package was
    not trained on this study's subjects and targets.

    Raises
    ------
    DfrnInputError
        A missing or unreadable file, a backbone that does not fit, a package trained on
        inputs of another intensity mode, or one trained on this study's scans and factor.
    """
    m = cfg.model
    if not m.init:
        return None
    source = cached_init(m.init, m.init_member)
    outputs = n_factors if m.heads == "joint" else 1
    report = apply_init(DFRN(m.block_strides, n_outputs=outputs, widen_factor=m.widen_factor),
                        source)
    _package_inputs(source, cfg, voxel_mm, log)
    _package_overlap(source, set(scans), list(factors or []), log)
    frozen = {"none": "", "stem": "; stem frozen", "backbone": "; backbone frozen"}[m.freeze]
    scale = (f"; backbone lr × {m.backbone_lr_scale:g}" if m.backbone_lr_scale != 1.0 else "")
    log(report.line(source) + frozen + scale)
    return source


def init_provenance(source: InitSource | None) -> dict[str, str] | None:
    """What a model package records of the weights its networks started from."""
    if source is None:
        return None
    return {"fine_tuned_from": source.describe(), "kind": source.kind,
            "sha256": source.sha256}
