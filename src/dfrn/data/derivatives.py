"""Read fMRIPrep / sMRIPrep derivatives: template-space T1, brain mask and GM probability.

For each participant (and session) the files are found with a documented glob, under
``<root>/sub-<l>/[ses-<l>/]anat/``, in the template's space (``MNI152NLin6Asym`` unless
``dfrn prep`` was given another template and ``--template-space``)::

    sub-<l>[_ses-<l>][_*]_space-<space>[_res-<r>]_desc-preproc_T1w.nii[.gz]
    sub-<l>[_ses-<l>][_*]_space-<space>[_res-<r>]_desc-brain_mask.nii[.gz]
    sub-<l>[_ses-<l>][_*]_space-<space>[_res-<r>]_label-GM_probseg.nii[.gz]

When several resolutions exist, ``res-1`` (or no ``res`` entity) is preferred, then the
finest. Images whose grid differs from the template's are resampled by **world coordinates**
with :func:`nilearn.image.resample_to_img` (continuous for T1 and GM, nearest for the mask).

fMRIPrep's template-space GM maps are **not modulated**: they give GM concentration, not
volume. ROI sums of them (the ridge baseline's features) are therefore not GM volumes; run
``dfrn prep`` on the raw scans for modulated maps.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib

from dfrn.data.templates import TEMPLATE_SPACE
from dfrn.errors import DfrnInputError

__all__ = ["DerivativeImages", "find_derivative_images", "resample_to_template"]

_KINDS = {
    "t1": "desc-preproc_T1w",
    "mask": "desc-brain_mask",
    "gm": "label-GM_probseg",
}
_RES = re.compile(r"_res-([A-Za-z0-9]+)_")


@dataclass(frozen=True)
class DerivativeImages:
    """The three template-space files of one participant."""

    t1: Path
    mask: Path
    gm: Path


def _res_key(path: Path) -> tuple[int, float]:
    m = _RES.search(path.name)
    if m is None:
        return (0, 1.0)
    value = m.group(1)
    try:
        r = float(value)
    except ValueError:
        return (2, 0.0)
    return (0 if r == 1 else 1, r)


def find_derivative_images(root: str | Path, participant_id: str,
                           session: str | None = None,
                           space: str = TEMPLATE_SPACE) -> DerivativeImages:
    """Find one participant's template-space T1, brain mask and GM probability map.

    ``space`` is the BIDS ``space-`` label of the images (the registration template's).

    Raises
    ------
    DfrnInputError
        Naming the participant and the missing or ambiguous file.
    """
    root = Path(root)
    sub = participant_id if participant_id.startswith("sub-") else f"sub-{participant_id}"
    base = root / sub
    if not base.is_dir():
        raise DfrnInputError(f"participant {participant_id}: no folder {base} in the derivatives")
    found: dict[str, Path] = {}
    for kind, suffix in _KINDS.items():
        pattern = f"{sub}*_space-{space}*_{suffix}.nii*"
        hits = sorted(set(base.glob(f"anat/{pattern}")) | set(base.glob(f"ses-*/anat/{pattern}")))
        hits = [h for h in hits if h.name.endswith((".nii", ".nii.gz"))
                and f"_space-{space}_" in h.name]
        if session:
            hits = [h for h in hits if f"_ses-{session}_" in h.name]
        if not hits:
            raise DfrnInputError(
                f"participant {participant_id}: no {pattern} under {base} (fMRIPrep with "
                f"--output-spaces {space} writes it)"
            )
        best = min(_res_key(h) for h in hits)
        hits = [h for h in hits if _res_key(h) == best]
        if len(hits) > 1:
            names = ", ".join(h.name for h in hits[:3])
            raise DfrnInputError(
                f"participant {participant_id}: {len(hits)} {suffix} files ({names}); choose "
                "one with [cohort] session"
            )
        found[kind] = hits[0]
    return DerivativeImages(**found)


def resample_to_template(img: nib.spatialimages.SpatialImage, template: nib.spatialimages.SpatialImage,
                         interpolation: str) -> nib.Nifti1Image:
    """``img`` on the template's grid, by world coordinates (a no-op copy when it already is).

    Parameters
    ----------
    interpolation : str
        ``"continuous"`` or ``"nearest"`` (nilearn's names).
    """
    import numpy as np
    from nilearn.image import resample_to_img

    if img.shape[:3] == template.shape[:3] and np.allclose(img.affine, template.affine, atol=1e-4):
        return nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32), template.affine)
    out = resample_to_img(img, template, interpolation=interpolation, force_resample=True,
                          copy_header=True)
    return nib.Nifti1Image(out.get_fdata(dtype="float32"), template.affine)
