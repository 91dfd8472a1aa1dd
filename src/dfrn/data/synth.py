"""Synthetic cohorts with *planted* factor effects, for the demo, tests and benchmarks.

The generator starts from a real template that ships offline: nilearn's bundled MNI152
(ICBM 2009a) T1 and gray-matter templates, resampled onto the FSL MNI152 grid
(182×218×182 at 1 mm, origin (-91, -126, -72); coarser voxel sizes keep the same field of
view). Each subject gets five independent factor scores. Factor *k* darkens (T1) and
atrophies (GM) a distinct, anatomically plausible region in proportion to its score:

============  =====================================  =============
factor        region (bilateral spheres, MNI mm)     centres
============  =====================================  =============
anhedonia     hippocampus                            (±26, -22, -14)
appetite      insula                                 (±38, 4, 2)
sleep         brainstem                              (0, -28, -36)
suicidality   caudate                                (±13, 12, 10)
anxiety       cerebellum                             (±26, -62, -36)
============  =====================================  =============

Nuisance variation: global head size (an isotropic zoom about the centre), a smooth
multiplicative bias field, and Gaussian noise. With ``age_effect`` > 0, age (uniform 20–70)
drives a broad atrophy: gray matter everywhere darkens (T1) and thins (GM) in proportion to
the standardised age. With ``age_only``, that factor's score is age plus noise
(``0.8 × z(age) + 0.6 × N(0, 1)``) and plants no region: the brain carries nothing about it
beyond age, the confound every "beyond the covariates" analysis must see through. With
``asymmetry`` > 0 the left hemisphere is darker by that fraction in every subject (a
lateralised brain, so that a left-right flipped scan differs from every training scan: the
template is nilearn's symmetric one and the planted regions are symmetric, so without it a
flipped scan is as likely as the scan itself; the demo's cohort is symmetric). The ground-truth masks are written as
``truth_<factor>.nii.gz`` and the true scores into ``participants.tsv``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

from dfrn.io import atomic_write_nifti, atomic_write_tsv

__all__ = [
    "FACTORS",
    "REGIONS",
    "FSL_SHAPE",
    "FSL_AFFINE",
    "template_grid",
    "load_template",
    "region_masks",
    "SynthCohort",
    "make_synthetic_cohort",
    "SHIFTS",
    "shifted_scan",
    "write_shifted_scans",
]

FACTORS: tuple[str, ...] = ("anhedonia", "appetite", "sleep", "suicidality", "anxiety")
REGIONS: dict[str, tuple[str, tuple[tuple[float, float, float], ...]]] = {
    "anhedonia": ("hippocampus", ((-26.0, -22.0, -14.0), (26.0, -22.0, -14.0))),
    "appetite": ("insula", ((-38.0, 4.0, 2.0), (38.0, 4.0, 2.0))),
    "sleep": ("brainstem", ((0.0, -28.0, -36.0),)),
    "suicidality": ("caudate", ((-13.0, 12.0, 10.0), (13.0, 12.0, 10.0))),
    "anxiety": ("cerebellum", ((-26.0, -62.0, -36.0), (26.0, -62.0, -36.0))),
}
FSL_SHAPE: tuple[int, int, int] = (182, 218, 182)
FSL_AFFINE: np.ndarray = np.array(
    [[1.0, 0, 0, -91.0], [0, 1.0, 0, -126.0], [0, 0, 1.0, -72.0], [0, 0, 0, 1.0]]
)


def template_grid(voxel_size: float = 1.0) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and affine of the FSL MNI152 grid at ``voxel_size`` mm (same field of view)."""
    if voxel_size <= 0:
        raise ValueError("voxel_size must be positive")
    shape = tuple(int(math.ceil(n / voxel_size)) for n in FSL_SHAPE)
    affine = FSL_AFFINE.copy()
    affine[:3, :3] *= voxel_size
    return shape, affine  # type: ignore[return-value]


def load_template(voxel_size: float = 1.0, kind: str = "t1") -> nib.Nifti1Image:
    """nilearn's bundled MNI152 template (``t1``, ``gm`` or ``mask``) on the FSL grid."""
    from nilearn import datasets, image

    loaders = {
        "t1": datasets.load_mni152_template,
        "gm": datasets.load_mni152_gm_template,
        "mask": datasets.load_mni152_brain_mask,
    }
    src = loaders[kind](resolution=1)
    shape, affine = template_grid(voxel_size)
    interp = "nearest" if kind == "mask" else "continuous"
    out = image.resample_img(
        src,
        target_affine=affine,
        target_shape=shape,
        interpolation=interp,
        force_resample=True,
        copy_header=True,
    )
    data = np.asarray(out.dataobj, dtype=np.float32)
    if kind == "t1":
        data = np.clip(data, 0, None) / max(float(data.max()), 1e-6)
    elif kind == "gm":
        data = np.clip(data, 0, 1)
    else:
        data = (data > 0.5).astype(np.float32)
    return nib.Nifti1Image(data, affine)


def _sphere(shape: tuple[int, ...], affine: np.ndarray, centre, radius: float) -> np.ndarray:
    ijk = np.indices(shape, dtype=np.float32).reshape(3, -1)
    xyz = affine[:3, :3] @ ijk + affine[:3, 3:4]
    d2 = np.sum((xyz - np.asarray(centre, dtype=np.float32)[:, None]) ** 2, axis=0)
    return (d2 <= radius**2).reshape(shape)


def region_masks(voxel_size: float = 1.0, radius: float = 10.0) -> dict[str, np.ndarray]:
    """Binary masks of the planted regions, one per factor, on the FSL grid."""
    shape, affine = template_grid(voxel_size)
    masks = {}
    for factor, (_, centres) in REGIONS.items():
        m = np.zeros(shape, dtype=bool)
        for c in centres:
            m |= _sphere(shape, affine, c, radius)
        masks[factor] = m
    return masks


def _bias_field(shape: tuple[int, ...], rng: np.random.Generator, strength: float) -> np.ndarray:
    """A smooth multiplicative field: exp of a random low-order polynomial in x, y, z."""
    axes = [np.linspace(-1, 1, n, dtype=np.float32) for n in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    terms = [x, y, z, x * y, y * z, x * z, x**2 - 1 / 3, y**2 - 1 / 3, z**2 - 1 / 3]
    coefs = rng.normal(0, strength, size=len(terms))
    log_field = sum(c * t for c, t in zip(coefs, terms, strict=True))
    return np.exp(np.broadcast_to(log_field, shape)).astype(np.float32)


def _zoom_about_centre(data: np.ndarray, scale: float, order: int = 1) -> np.ndarray:
    """Isotropic zoom of the head about the volume centre (global size nuisance)."""
    centre = (np.asarray(data.shape) - 1) / 2
    matrix = np.eye(3) / scale
    offset = centre - matrix @ centre
    return ndimage.affine_transform(data, matrix, offset=offset, order=order, mode="constant")


def _displacement_fields(shape: tuple[int, ...], affine: np.ndarray,
                         radius: float) -> list[np.ndarray]:
    """Per factor, a unit radial field (3, *shape) in voxels: outward from each centre of its
    region, tapering smoothly to 0 at twice the radius."""
    ijk = np.indices(shape, dtype=np.float32)
    inverse = np.linalg.inv(affine)
    voxel = float(np.abs(affine[0, 0]))
    out = []
    for _, centres in REGIONS.values():
        field_k = np.zeros((3, *shape), dtype=np.float32)
        for c in centres:
            cv = (inverse[:3, :3] @ np.asarray(c) + inverse[:3, 3]).astype(np.float32)
            offset = ijk - cv[:, None, None, None]
            dist = np.sqrt(np.sum(offset**2, axis=0)) * voxel
            taper = np.clip(1.0 - dist / (2.0 * radius), 0.0, None) ** 2
            field_k += offset / max(radius / voxel, 1.0) * taper
        out.append(field_k)
    return out


def _displace(images: list[np.ndarray], fields: list[np.ndarray],
              weights: np.ndarray) -> list[np.ndarray]:
    """Resample ``images`` at x + Σ_k weights[k] × fields[k](x): a positive weight samples
    from farther out, so the region looks shrunk."""
    total = sum(w * f for w, f in zip(weights, fields, strict=True) if w)
    coords = np.indices(images[0].shape, dtype=np.float32) + total
    return [ndimage.map_coordinates(im, coords, order=1, mode="nearest").astype(np.float32)
            for im in images]


@dataclass
class SynthCohort:
    """What :func:`make_synthetic_cohort` wrote."""

    root: Path
    table: Path
    participants: pd.DataFrame
    truth_masks: dict[str, Path] = field(default_factory=dict)
    brain_mask: Path | None = None
    template: Path | None = None
    voxel_size: float = 1.0


def make_synthetic_cohort(
    out_dir: str | Path,
    n_subjects: int = 116,
    voxel_size: float = 1.0,
    effect: float = 0.15,
    radius: float = 10.0,
    size_sd: float = 0.03,
    bias_strength: float = 0.05,
    noise_sd: float = 0.02,
    seed: int = 0,
    progress: bool = False,
    age_effect: float = 0.0,
    age_only: str | None = None,
    displacement: float = 0.0,
    asymmetry: float = 0.0, table_name: str = "participants.tsv",
) -> SynthCohort:
    """Write a synthetic cohort with planted factor effects.

    Parameters
    ----------
    out_dir:
        Folder to write into (created): images ``sub-XXXX_T1w.nii.gz`` and ``_gm.nii.gz``,
        the cohort table (``participant_id, t1, gm, age, sex`` and one column per factor).
    n_subjects:
        Cohort size (116 by default, the size of the method's cohort).
    voxel_size:
        1 for the full 182×218×182 grid; larger values give coarser grids with the same
        field of view (the demo uses 4 mm).
    effect:
        Fractional darkening of a region per unit of factor score (N(0, 1)), smooth edged.
    age_effect:
        Fractional darkening of gray matter (weighted by the template's GM probability) per
        SD of age; 0 (default) leaves age unrelated to the images.
    age_only:
        A factor whose score is made from age plus noise, with no planted region.
    displacement:
        When > 0, each factor *shrinks* its region instead of darkening it: a smooth radial
        displacement of up to ``displacement`` mm per unit of score pulls the region's
        tissue towards its centre (subtle local atrophy); ``effect`` is then not used.
    asymmetry:
        Fixed darkening of the left hemisphere (x < 0) in every subject (module docstring).
    table_name:
        The cohort table's file name (``dfrn synth`` writes ``cohort.tsv``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tpl = _Template.load(voxel_size, radius)
    truth_paths, mask_path, template_path = _write_template_files(out, tpl, age_only)
    draws = _Draws.sample(rng, seed, n_subjects, age_only)
    model = _SubjectModel(
        effect=effect, age_effect=age_effect, displacement=displacement, voxel_size=voxel_size,
        size_sd=size_sd, bias_strength=bias_strength, noise_sd=noise_sd, ageing=age_effect * tpl.gm,
        fields=_displacement_fields(tpl.t1.shape, tpl.affine, radius) if displacement else None,
        lateral=asymmetry * _left_hemisphere(voxel_size) if asymmetry else None,
    )
    table = pd.DataFrame(_write_subjects(out, tpl, model, draws, rng, progress))
    atomic_write_tsv(table, out / table_name)
    return SynthCohort(root=out, table=out / table_name, participants=table, truth_masks=truth_paths,
                       brain_mask=mask_path, template=template_path, voxel_size=voxel_size)


@dataclass(frozen=True, eq=False)
class _Template:
    """The template images a synthetic cohort is made from, on the FSL grid."""

    affine: np.ndarray
    t1: np.ndarray
    gm: np.ndarray
    brain: np.ndarray
    masks: dict[str, np.ndarray]
    """Per factor, the binary mask of its planted region."""
    soft: dict[str, np.ndarray]
    """The same masks, smoothed (the planted effect's smooth edge)."""

    @classmethod
    def load(cls, voxel_size: float, radius: float) -> _Template:
        """nilearn's templates at ``voxel_size`` mm, and the regions of ``radius`` mm."""
        t1 = load_template(voxel_size, "t1")
        gm = load_template(voxel_size, "gm")
        mask_img = load_template(voxel_size, "mask")
        t1_data = t1.get_fdata(dtype=np.float32)
        gm_data = gm.get_fdata(dtype=np.float32)
        brain = mask_img.get_fdata(dtype=np.float32) > 0
        masks = region_masks(voxel_size, radius)
        sigma = max(2.0 / voxel_size, 0.5)
        soft = {f: ndimage.gaussian_filter(m.astype(np.float32), sigma) for f, m in masks.items()}
        return cls(t1.affine, t1_data, gm_data, brain, masks, soft)


def _write_template_files(out: Path, tpl: _Template,
                          age_only: str | None) -> tuple[dict[str, Path], Path, Path]:
    """Write the ground-truth masks, the brain mask and the template T1; return their paths."""
    truth_paths = {}
    for f, m in tpl.masks.items():
        if f == age_only:  # no planted region: no ground truth
            continue
        p = out / f"truth_{f}.nii.gz"
        atomic_write_nifti(nib.Nifti1Image((m & tpl.brain).astype(np.uint8), tpl.affine), p)
        truth_paths[f] = p
    mask_path = out / "brain_mask.nii.gz"
    atomic_write_nifti(nib.Nifti1Image(tpl.brain.astype(np.uint8), tpl.affine), mask_path)
    template_path = out / "template_T1w.nii.gz"
    atomic_write_nifti(nib.Nifti1Image(tpl.t1, tpl.affine), template_path)
    return truth_paths, mask_path, template_path


@dataclass(frozen=True, eq=False)
class _Draws:
    """The cohort-level random draws: factor scores, ages and sexes."""

    scores: np.ndarray
    """(n_subjects, n_factors) factor scores."""
    ages: np.ndarray
    sexes: np.ndarray
    z_age: np.ndarray
    """Standardised ages."""
    planted: np.ndarray
    """Per factor, 1 when it plants a region, 0 for the age-only factor."""

    @classmethod
    def sample(cls, rng: np.random.Generator, seed: int, n_subjects: int,
               age_only: str | None) -> _Draws:
        """Draw scores, ages and sexes from ``rng``; an age-only factor from its own stream."""
        scores = rng.standard_normal((n_subjects, len(FACTORS)))
        ages = rng.uniform(20, 70, n_subjects).round(1)
        sexes = rng.choice(["F", "M"], n_subjects)
        z_age = (ages - 45.0) / (50.0 / math.sqrt(12.0))  # uniform(20, 70): mean 45, sd 14.4
        planted = np.ones(len(FACTORS))
        if age_only is not None:  # a separate stream: the other draws are unchanged
            k = FACTORS.index(age_only)
            noise = np.random.default_rng([seed, 1]).standard_normal(n_subjects)
            scores[:, k] = 0.8 * z_age + 0.6 * noise
            planted[k] = 0.0
        return cls(scores, ages, sexes, z_age, planted)


@dataclass(frozen=True, eq=False)
class _SubjectModel:
    """How a subject's scores and age become images (see :func:`make_synthetic_cohort`)."""

    effect: float
    age_effect: float
    displacement: float
    voxel_size: float
    size_sd: float
    bias_strength: float
    noise_sd: float
    ageing: np.ndarray
    """Darkening of the template per SD of age (``age_effect`` × GM probability)."""
    fields: list[np.ndarray] | None
    """Per factor, its displacement field (:func:`_displacement_fields`); None for darkening."""
    lateral: np.ndarray | None = None
    """The fixed darkening of the left hemisphere (``asymmetry``); None: symmetric."""


def _left_hemisphere(voxel_size: float) -> np.ndarray:
    """1 in the left hemisphere (x < 0), 0 in the right: a logistic step of 4 mm scale."""
    shape, affine = template_grid(voxel_size)
    x = affine[0, 0] * np.arange(shape[0]) + affine[0, 3]
    step = 1.0 / (1.0 + np.exp(x / 4.0))
    return np.broadcast_to(step[:, None, None], shape).astype(np.float32)


def _subject_images(tpl: _Template, model: _SubjectModel, draws: _Draws, i: int,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Subject ``i``'s T1 and GM: planted effects and ageing, then head size, bias and noise."""
    change = np.zeros_like(tpl.t1)
    for k, f in enumerate(FACTORS):
        if model.fields is None:
            change += draws.planted[k] * model.effect * draws.scores[i, k] * tpl.soft[f]
    if model.age_effect:
        change += model.ageing * draws.z_age[i]
    if model.lateral is not None:
        change += model.lateral
    factor_map = np.clip(1.0 - change, 0.2, 1.8)
    scale = 1.0 + model.size_sd * rng.standard_normal()
    t1_s, gm_s = tpl.t1 * factor_map, tpl.gm * factor_map
    if model.fields is not None:
        weights = draws.planted * draws.scores[i] * model.displacement / model.voxel_size
        t1_s, gm_s = _displace([t1_s, gm_s], model.fields, weights)
    t1_i = _zoom_about_centre(t1_s, scale)
    gm_i = _zoom_about_centre(gm_s, scale)
    t1_i *= _bias_field(t1_i.shape, rng, model.bias_strength)
    t1_i += model.noise_sd * rng.standard_normal(t1_i.shape).astype(np.float32) * (t1_i > 0)
    t1_i = np.clip(t1_i, 0, None).astype(np.float32)
    gm_i = np.clip(gm_i, 0, 1).astype(np.float32)
    return t1_i, gm_i


def _write_subjects(out: Path, tpl: _Template, model: _SubjectModel, draws: _Draws,
                    rng: np.random.Generator, progress: bool) -> list[dict[str, object]]:
    """Make and write every subject's images, in order; return the rows of the cohort table."""
    from tqdm.auto import tqdm

    n_subjects = len(draws.ages)
    rows = []
    width = max(4, len(str(n_subjects)))
    for i in tqdm(range(n_subjects), desc="synthetic subjects", disable=not progress):
        pid = f"sub-{i + 1:0{width}d}"
        t1_i, gm_i = _subject_images(tpl, model, draws, i, rng)
        t1_path = out / f"{pid}_T1w.nii.gz"
        gm_path = out / f"{pid}_gm.nii.gz"
        atomic_write_nifti(nib.Nifti1Image(t1_i, tpl.affine), t1_path)
        atomic_write_nifti(nib.Nifti1Image(gm_i, tpl.affine), gm_path)
        row = {
            "participant_id": pid,
            "t1": t1_path.name,
            "gm": gm_path.name,
            "age": draws.ages[i],
            "sex": draws.sexes[i],
        }
        row.update({f: round(float(draws.scores[i, k]), 6) for k, f in enumerate(FACTORS)})
        rows.append(row)
    return rows


def make_demo_atlases(cohort: SynthCohort, n_parcels: int = 60, seed: int = 0,
                      n_region_parcels: int | None = None) -> dict[str, Path]:
    """Two offline atlases for the demo, written beside the cohort.

    * ``parcellation_dseg.nii.gz`` (+ ``.tsv``): ``n_parcels`` k-means parcels of the brain
      mask, driven by voxel coordinates only, so they do not copy the planted regions. The
      ridge baseline uses it (an atlas that outlined the planted regions would make its job
      trivial).
    * ``regions_dseg.nii.gz`` (+ ``.tsv``): parcels (the same ones, or ``n_region_parcels``
      coarser ones) with the planted regions written over them under their anatomical names
      (hippocampus, insula, …). Attention maps and region ablation are ranked on it, so the
      output can say *which* structure a factor is read from.
    """
    from dfrn.data.atlas import synthetic_parcellation

    assert cohort.brain_mask is not None
    parc = synthetic_parcellation(cohort.brain_mask, n_parcels, seed=seed)
    labels = parc.label_data().astype(np.int32)
    paths = {}
    p = cohort.root / "parcellation_dseg.nii.gz"
    atomic_write_nifti(nib.Nifti1Image(labels, parc.img.affine), p)
    atomic_write_tsv(parc.labels[["index", "name"]], p.with_name("parcellation_dseg.tsv"))
    paths["parcellation"] = p
    if n_region_parcels is not None and n_region_parcels != n_parcels:
        parc = synthetic_parcellation(cohort.brain_mask, n_region_parcels, seed=seed)
        labels = parc.label_data().astype(np.int32)
        n_parcels = n_region_parcels
    regions = labels.copy()
    names = parc.labels[["index", "name"]].copy()
    brain = regions > 0
    for k, factor in enumerate(FACTORS):
        if factor not in cohort.truth_masks:  # an age-only factor plants no region
            continue
        idx = n_parcels + 1 + k
        truth = np.asarray(nib.load(cohort.truth_masks[factor]).dataobj) > 0
        regions[truth & brain] = idx
        names.loc[len(names)] = {"index": idx, "name": REGIONS[factor][0]}
    present = set(np.unique(regions)) - {0}
    names = names[names["index"].isin(present)]
    p = cohort.root / "regions_dseg.nii.gz"
    atomic_write_nifti(nib.Nifti1Image(regions, parc.img.affine), p)
    atomic_write_tsv(names, p.with_name("regions_dseg.tsv"))
    paths["regions"] = p
    return paths


#: The changed scans of :func:`shifted_scan` (out-of-distribution tests and benchmarks).
SHIFTS: tuple[str, ...] = ("contrast", "bias", "flip", "gm", "noise", "shift")


def _flip_x(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Mirror an image about the world plane x = 0 (left-right), by linear interpolation."""
    a, b = float(affine[0, 0]), float(affine[0, 3])
    coords = np.indices(data.shape, dtype=np.float64)
    coords[0] = -coords[0] - 2.0 * b / a  # voxel i at x = a i + b reads x' = -x
    return ndimage.map_coordinates(data, coords, order=1, mode="constant")


def shifted_scan(kind: str, t1: np.ndarray, gm: np.ndarray, affine: np.ndarray,
                 rng: np.random.Generator) -> np.ndarray:
    """A subject's scan changed in a way a package should flag as out of distribution.

    ``contrast``: intensities squared (a contrast change z-scoring does not undo);
    ``bias``: a strong smooth bias field, exp(-1 … 1) from back to front; ``flip``: mirrored
    left-right (about x = 0); ``gm``: the GM map instead of the T1 scan; ``noise``: Gaussian
    noise of sd 0.2 (10 × the generator's); ``shift``: moved 10 mm to the right.
    """
    t1 = np.asarray(t1, dtype=np.float64)
    if kind == "contrast":
        out = t1**2
    elif kind == "bias":
        out = t1 * np.exp(np.linspace(-1.0, 1.0, t1.shape[1]))[None, :, None]
    elif kind == "flip":
        out = _flip_x(t1, affine)
    elif kind == "gm":
        out = np.asarray(gm, dtype=np.float64)
    elif kind == "noise":
        out = t1 + rng.normal(0.0, 0.2, t1.shape)
    elif kind == "shift":
        out = ndimage.shift(t1, (10.0 / abs(float(affine[0, 0])), 0.0, 0.0), order=1)
    else:
        raise ValueError(f"unknown shift {kind!r}; one of {', '.join(SHIFTS)}")
    return out.astype(np.float32)


def write_shifted_scans(table: str | Path, folder: str | Path, n_subjects: int,
                        kinds: tuple[str, ...] | list[str] = SHIFTS, seed: int = 0) -> Path:
    """The first ``n_subjects`` of a synthetic cohort table, each changed every way of
    ``kinds`` (:func:`shifted_scan`), written to ``folder`` with a cohort table ``c.tsv``
    (``participant_id`` = kind + subject number, ``t1``); its path."""
    table, folder = Path(table), Path(folder)
    new = pd.read_csv(table, sep="\t", dtype={"participant_id": str}).iloc[:n_subjects]
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for _, r in new.iterrows():
        t1 = nib.load(table.parent / r["t1"])
        gm = np.asarray(nib.load(table.parent / r["gm"]).dataobj)
        for kind in kinds:
            name = f"{kind}{r['participant_id'][4:]}"
            data = shifted_scan(kind, np.asarray(t1.dataobj), gm, t1.affine, rng)
            atomic_write_nifti(nib.Nifti1Image(data, t1.affine), folder / f"{name}.nii.gz")
            rows.append({"participant_id": name, "t1": f"{name}.nii.gz"})
    atomic_write_tsv(pd.DataFrame(rows), folder / "c.tsv")
    return folder / "c.tsv"
