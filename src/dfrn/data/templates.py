"""Where the registration template and its brain mask come from.

``dfrn prep`` registers every T1 to **MNI152NLin6Asym at 1 mm** (the FSL grid,
182×218×182) unless it is given another template. The template is looked up in this order,
offline routes first, with no download unless both offline routes fail and the
``templateflow`` package (installed by the ``[prep]`` extra) can reach its server:

1. explicit paths (``dfrn prep --template PATH --template-mask PATH`` or ``[prep] template``
   and ``template_mask``);
2. a TemplateFlow cache on disk: ``$TEMPLATEFLOW_HOME`` (default ``~/.cache/templateflow``)
   holding ``tpl-MNI152NLin6Asym/tpl-MNI152NLin6Asym_res-01_T1w.nii.gz`` and
   ``…_res-01_desc-brain_mask.nii.gz``; read straight from disk, offline (the empty
   placeholder files that ``templateflow`` puts in a new cache do not count);
3. ``templateflow.api.get`` (it downloads the two files into that cache the first time, then
   works offline).

**Space label.** The outputs are named ``space-<label>`` (BIDS). Routes 2 and 3 are
MNI152NLin6Asym. For explicit paths, the label is ``--template-space NAME`` (``[prep]
template_space``), or else it is read from a TemplateFlow file name ``tpl-<label>_…``; a
template that has neither is refused, so that no other template is ever called
MNI152NLin6Asym.

Anything else is a one-line error that says how to provide the files. dfrn ships no
template: the files are 11 MB and carry their own licence.

Images are compared by **world coordinates**, never by voxel arrays: FSL's and TemplateFlow's
MNI152NLin6Asym files differ in the sign of the x axis and in the origin
(:func:`same_world_grid`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
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
_SPACE_LABEL = re.compile(r"[A-Za-z0-9]+")
_TPL_NAME = re.compile(r"tpl-([A-Za-z0-9]+)_")


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
    space : str
        The BIDS ``space-`` label of the outputs (``MNI152NLin6Asym`` unless another
        template was given).
    """

    t1: Path
    mask: Path
    source: str
    space: str = TEMPLATE_SPACE

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


def _check_space_label(space: str) -> str:
    """``space`` when it is a BIDS label (letters and digits only); else a one-line error."""
    if not _SPACE_LABEL.fullmatch(str(space)):
        raise DfrnInputError(
            f"--template-space ([prep] template_space) {space!r} is not a BIDS label: use "
            "letters and digits only (e.g. MNI152NLin2009cAsym)"
        )
    return str(space)


def _space_of(t1: Path, space: str | None) -> str:
    """The space label of an explicit template: given, or read from ``tpl-<label>_…``."""
    found = _TPL_NAME.match(t1.name)
    if space:
        _check_space_label(space)
        if found and found.group(1) != space:
            raise DfrnInputError(
                f"--template {t1.name} is TemplateFlow's {found.group(1)}, but --template-space "
                f"is {space}: give the space of that template"
            )
        return space
    if found:
        return found.group(1)
    raise DfrnInputError(
        f"--template {t1.name}: name its space with --template-space NAME ([prep] "
        "template_space), e.g. MNI152NLin6Asym; it is not a TemplateFlow file (tpl-<space>_…)"
    )


def _cached(path: Path) -> bool:
    """A file of the TemplateFlow cache (not the empty placeholder of an unfetched one)."""
    return path.is_file() and path.stat().st_size > 0


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
                     template_mask: str | Path | None = None,
                     space: str | None = None) -> Template:
    """Find the template and its brain mask (see the module docstring).

    Parameters
    ----------
    template, template_mask : str or Path, optional
        Explicit files. Give both or neither.
    space : str, optional
        The BIDS space label of explicit files (required unless the template's file name is
        TemplateFlow's ``tpl-<label>_…``). Without files it may only be MNI152NLin6Asym.

    Raises
    ------
    DfrnInputError
        When only one path is given, a file is missing or unreadable, the mask is off the
        template's grid, the space label is missing, malformed or contradicts the file
        name, or no template can be found.
    """
    if bool(template) != bool(template_mask):
        raise DfrnInputError(
            "give both --template and --template-mask (or [prep] template and template_mask), "
            "or neither to use MNI152NLin6Asym from TemplateFlow"
        )
    if template and template_mask:
        t1 = Path(template).expanduser()
        found = _check_pair(t1, Path(template_mask).expanduser(), "paths")
        return replace(found, space=_space_of(t1, space))
    if space and space != TEMPLATE_SPACE:
        _check_space_label(space)
        raise DfrnInputError(
            f"--template-space {space}: without --template, dfrn prep uses {TEMPLATE_SPACE} "
            f"from TemplateFlow; give --template PATH --template-mask PATH of {space}"
        )
    folder = templateflow_home() / "tpl-MNI152NLin6Asym"
    if _cached(folder / _TPL_T1) and _cached(folder / _TPL_MASK):
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
        f"{_TPL_T1} and {_TPL_MASK} in {folder}, or pip install 'dfrn[prep]' (its templateflow "
        "downloads them once)"
    )
