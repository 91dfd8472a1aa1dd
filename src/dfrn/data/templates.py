"""Where the registration template and its brain mask come from.

``dfrn prep`` registers every T1 to **MNI152NLin6Asym at 1 mm** (the FSL grid,
182×218×182). The template is looked up in this order, with no download unless the
``templateflow`` package is installed and its server can be reached:

1. explicit paths (``dfrn prep --template PATH --template-mask PATH`` or ``[prep] template``
   and ``template_mask``);
2. a TemplateFlow cache on disk: ``$TEMPLATEFLOW_HOME`` (default ``~/.cache/templateflow``)
   holding ``tpl-MNI152NLin6Asym/tpl-MNI152NLin6Asym_res-01_T1w.nii.gz`` and
   ``…_res-01_desc-brain_mask.nii.gz``; read straight from disk, offline;
3. ``templateflow.api.get`` when the ``templateflow`` package is installed (it downloads the
   two files into that cache the first time, then works offline).

Anything else is a one-line error that says how to provide the files. dfrn ships no
template: the files are 11 MB and carry their own licence.

Images are compared by **world coordinates**, never by voxel arrays: FSL's and TemplateFlow's
MNI152NLin6Asym files differ in the sign of the x axis and in the origin
(:func:`same_world_grid`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from dfrn.errors import DfrnInputError

__all__ = [
    "TEMPLATE_SPACE",
    "Template",
    "resolve_template",
    "templateflow_home",
    "same_world_grid",
]

#: The template space of ``dfrn prep``'s outputs (BIDS ``space-`` entity).
TEMPLATE_SPACE = "MNI152NLin6Asym"
_TPL_T1 = "tpl-MNI152NLin6Asym_res-01_T1w.nii.gz"
_TPL_MASK = "tpl-MNI152NLin6Asym_res-01_desc-brain_mask.nii.gz"


@dataclass(frozen=True)
class Template:
    """A registration template: T1 image, brain mask and where they came from.

    Attributes
    ----------
    t1 : Path
        Template T1 image.
    mask : Path
        Binary brain mask on the template's grid.
    source : str
        ``"paths"``, ``"templateflow-cache"`` or ``"templateflow"``.
    """

    t1: Path
    mask: Path
    source: str

    @property
    def resolution_mm(self) -> float:
        """Voxel size of the template in mm (the largest of the three axes)."""
        return float(max(nib.load(self.t1).header.get_zooms()[:3]))


def templateflow_home() -> Path:
    """The TemplateFlow cache folder (``$TEMPLATEFLOW_HOME`` or ``~/.cache/templateflow``)."""
    env = os.environ.get("TEMPLATEFLOW_HOME", "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "templateflow"


def same_world_grid(a: nib.spatialimages.SpatialImage, b: nib.spatialimages.SpatialImage,
                    atol: float = 1e-3) -> bool:
    """True when two images sample the same world points (shape, voxel size and corners).

    Two grids are the same when the world coordinates of every voxel centre agree, whatever
    the voxel axes' order or sign: the eight corners are compared as a set.
    """
    if sorted(a.shape[:3]) != sorted(b.shape[:3]):
        return False

    def corners(img: nib.spatialimages.SpatialImage) -> np.ndarray:
        n = np.array(img.shape[:3]) - 1
        ijk = np.array([[i, j, k] for i in (0, n[0]) for j in (0, n[1]) for k in (0, n[2])])
        xyz = nib.affines.apply_affine(img.affine, ijk)
        return xyz[np.lexsort(xyz.T[::-1])]

    return bool(np.allclose(corners(a), corners(b), atol=atol))


def _check_pair(t1: Path, mask: Path, source: str) -> Template:
    for p, what in ((t1, "template"), (mask, "template mask")):
        if not p.is_file():
            raise DfrnInputError(f"{what} not found: {p}")
        try:
            nib.load(p)
        except Exception as exc:  # nibabel raises several types
            raise DfrnInputError(f"{what} {p} cannot be read as NIfTI: {exc}") from None
    t1_img, mask_img = nib.load(t1), nib.load(mask)
    if not same_world_grid(t1_img, mask_img):
        raise DfrnInputError(
            f"template mask {mask} is not on the template's grid ({t1}): give the mask that "
            "belongs to the template"
        )
    values = np.unique(np.asarray(mask_img.dataobj))
    if not np.isin(values, (0, 1)).all() or len(values) < 2:
        raise DfrnInputError(f"template mask {mask} must be a binary 0/1 image with a brain")
    return Template(t1=t1.resolve(), mask=mask.resolve(), source=source)


def resolve_template(template: str | Path | None = None,
                     template_mask: str | Path | None = None) -> Template:
    """Find the MNI152NLin6Asym 1 mm template and brain mask (see the module docstring).

    Parameters
    ----------
    template, template_mask : str or Path, optional
        Explicit files. Give both or neither.

    Raises
    ------
    DfrnInputError
        When only one path is given, a file is missing or unreadable, the mask is off the
        template's grid, or no template can be found.
    """
    if bool(template) != bool(template_mask):
        raise DfrnInputError(
            "give both --template and --template-mask (or [prep] template and template_mask), "
            "or neither to use MNI152NLin6Asym from TemplateFlow"
        )
    if template and template_mask:
        return _check_pair(Path(template).expanduser(), Path(template_mask).expanduser(), "paths")
    folder = templateflow_home() / "tpl-MNI152NLin6Asym"
    if (folder / _TPL_T1).is_file() and (folder / _TPL_MASK).is_file():
        return _check_pair(folder / _TPL_T1, folder / _TPL_MASK, "templateflow-cache")
    try:
        from templateflow import api as tflow  # type: ignore[import-not-found]
    except ImportError:
        tflow = None
    if tflow is not None:
        try:
            t1 = tflow.get("MNI152NLin6Asym", resolution=1, desc=None, suffix="T1w")
            mask = tflow.get("MNI152NLin6Asym", resolution=1, desc="brain", suffix="mask")
        except Exception as exc:  # network errors come in many types
            raise DfrnInputError(
                f"TemplateFlow could not provide MNI152NLin6Asym ({type(exc).__name__}: {exc}); "
                "pass --template PATH --template-mask PATH"
            ) from None
        if t1 and mask and not isinstance(t1, list) and not isinstance(mask, list):
            return _check_pair(Path(t1), Path(mask), "templateflow")
    raise DfrnInputError(
        f"no MNI152NLin6Asym template found: pass --template PATH --template-mask PATH, put "
        f"{_TPL_T1} and {_TPL_MASK} in {folder}, or pip install templateflow (downloads once)"
    )
