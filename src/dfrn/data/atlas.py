"""Atlases and per-region summaries of images: aggregates an image over atlas labels.

An :class:`Atlas` is a deterministic label image plus a label table (``index``, ``name``).
It comes from a file pair (:func:`load_atlas`, e.g. AAL3v1 on the MNI152 1 mm grid), from
nilearn's AAL3 download (:func:`fetch_aal3_atlas`, needs the internet) or, for offline
demos, from :func:`synthetic_parcellation`, which splits a brain mask into compact parcels
by k-means on the voxel coordinates.

:func:`region_table` is the one aggregation of an image over atlas labels (sum, mean or
volume per region). :func:`roi_volumes` uses it to turn gray-matter probability maps into a
subjects × regions table of volumes in ml, the features of the ridge baseline;
:func:`roi_mean_intensity` gives the mean image value per region instead (the fallback when
only T1 images are available). The ranking of attention maps by region
(:func:`dfrn.interpret.regions.rank_regions`) uses it too.

Grid handling
-------------
Images must lie on the atlas grid. Two grids are *the same* when shape and affine agree
(affine within 1e-3 mm). When they differ only in resolution (and possibly axis flips) —
the same axes and the same field of view to within two voxels of the coarser grid, e.g. the
1 mm and 2 mm MNI152 grids — the atlas is resampled onto the image grid by nearest
neighbour (nilearn ``resample_to_img``) and volumes use the image's voxel size. Any other
difference (same voxel size but a shifted origin or a cropped or padded field of view, as
colin27's 181×217×181 grid against MNI152's 182×218×182; oblique or permuted axes) means
the image is not on the atlas grid and is a :class:`~dfrn.errors.DfrnInputError`:
resampling subject images is left to the caller (e.g. nilearn ``resample_to_img``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from dfrn.data.cohort import read_delimited
from dfrn.data.images import ImageLike, as_3d, image_name, load_img
from dfrn.errors import DfrnInputError

__all__ = [
    "Atlas",
    "STATISTICS",
    "NONFINITE",
    "load_atlas",
    "fetch_aal3_atlas",
    "synthetic_parcellation",
    "region_table",
    "roi_volumes",
    "roi_mean_intensity",
    "labels_on_grid",
    "check_atlas_grid",
]

STATISTICS: tuple[str, ...] = ("sum", "mean", "volume")
"""Per-region statistics of :func:`region_table`."""
NONFINITE: tuple[str, ...] = ("zero", "ignore")
"""How :func:`region_table` treats NaN and inf voxels."""

_AFFINE_TOL = 1e-3


@dataclass
class Atlas:
    """A deterministic atlas: an integer label image and its label table.

    Attributes
    ----------
    img : nibabel.Nifti1Image
        The label image; 0 is background.
    labels : pd.DataFrame
        Columns ``index`` (int, > 0) and ``name`` (str), one row per region that has at
        least one voxel in ``img``, in table order. Voxels whose label is not in the table
        belong to no region.
    source : str
        Where the atlas came from, for messages.
    """

    img: nib.Nifti1Image
    labels: pd.DataFrame
    source: str = ""
    _data: np.ndarray | None = field(default=None, repr=False, compare=False)
    _grids: dict[tuple, _LabelIndex] = field(default_factory=dict, repr=False, compare=False)

    @property
    def names(self) -> list[str]:
        """Region names, in table order."""
        return self.labels["name"].astype(str).tolist()

    @property
    def indices(self) -> np.ndarray:
        """Region labels (int64), in table order."""
        return self.labels["index"].to_numpy(dtype=np.int64)

    def label_data(self) -> np.ndarray:
        """The label image as a 3-D int64 array (cached)."""
        if self._data is None:
            self._data = _integer_labels(self.img, self.source or "atlas")
        return self._data


# --------------------------------------------------------------------------------------
# loading and validating atlases


def _integer_labels(img: nib.spatialimages.SpatialImage, name: str) -> np.ndarray:
    data = as_3d(np.asanyarray(img.dataobj), name)
    if not np.issubdtype(data.dtype, np.integer):
        data = np.asarray(data, dtype=np.float64)
        if not np.all(np.isfinite(data)) or np.any(data != np.round(data)):
            raise DfrnInputError(f"atlas image {name} holds non-integer labels")
    data = data.astype(np.int64)
    if data.min() < 0:
        raise DfrnInputError(f"atlas image {name} holds negative labels")
    return data


def _read_label_table(labels_tsv: str | Path) -> pd.DataFrame:
    path = Path(labels_tsv)
    if not path.is_file():
        raise DfrnInputError(f"atlas label table {path} does not exist")
    table = read_delimited(path, "atlas label table", text_columns=("name",))
    missing = [c for c in ("index", "name") if c not in table.columns]
    if missing:
        raise DfrnInputError(f"atlas label table {path} lacks columns {missing}")
    index = pd.to_numeric(table["index"], errors="coerce")
    if index.isna().any() or np.any(index != np.round(index)):
        raise DfrnInputError(f"atlas label table {path}: column 'index' must hold integers")
    if (table["name"] == "").any():
        raise DfrnInputError(f"atlas label table {path}: column 'name' has empty entries")
    return pd.DataFrame({"index": index.astype(np.int64), "name": table["name"].astype(str)})


def _build_atlas(img: nib.spatialimages.SpatialImage, labels: pd.DataFrame, source: str) -> Atlas:
    """Check a label image against its table, drop empty labels, return the Atlas."""
    data = _integer_labels(img, source)
    labels = labels.loc[labels["index"] != 0].reset_index(drop=True)  # background
    dup_index = labels["index"][labels["index"].duplicated()].unique().tolist()
    if dup_index:
        raise DfrnInputError(f"atlas labels {source}: duplicated index {dup_index}")
    dup_name = labels["name"][labels["name"].duplicated()].unique().tolist()
    if dup_name:
        raise DfrnInputError(f"atlas labels {source}: duplicated name {dup_name}")
    counts = np.bincount(data.ravel())
    present = set(np.flatnonzero(counts).tolist()) - {0}
    unknown = sorted(present - set(labels["index"].tolist()))
    if unknown:
        raise DfrnInputError(
            f"atlas image {source} holds labels {unknown} that its label table does not name"
        )
    n_vox = np.array([counts[i] if i < len(counts) else 0 for i in labels["index"]])
    empty = labels.loc[n_vox == 0]
    if len(empty):
        listed = ", ".join(f"{i} ({n})" for i, n in zip(empty["index"], empty["name"], strict=True))
        warnings.warn(
            f"empty labels: atlas {source} has no voxels for {len(empty)} label(s), "
            f"left out of the ROI features: {listed}",
            UserWarning,
            stacklevel=3,
        )
    labels = labels.loc[n_vox > 0].reset_index(drop=True)
    if labels.empty:
        raise DfrnInputError(f"atlas {source} has no labelled voxels")
    if not isinstance(img, nib.Nifti1Image):
        img = nib.Nifti1Image(data.astype(np.int32), img.affine)
    return Atlas(img=img, labels=labels, source=source, _data=data)


def load_atlas(atlas_path: str | Path, labels_tsv: str | Path) -> Atlas:
    """Load a label image and its ``index``/``name`` TSV.

    Labels that occur in the image but not in the table are an error; labels of the table
    with no voxel in the image are left out with a ``UserWarning`` (the "empty labels"
    note; AAL3v1 has four: 35, 36, 81, 82). Row 0 of the table, if any, is background.

    Parameters
    ----------
    atlas_path : str or Path
        The 3D integer label image.
    labels_tsv : str or Path
        Its label table, with columns ``index`` and ``name``.

    Returns
    -------
    Atlas
        The atlas, with the non-empty labels of the table.

    Raises
    ------
    DfrnInputError
        For a missing, unreadable or non-3D image, non-integer or negative labels, a bad
        table, or labels of the image that the table does not name.
    """
    img = load_img(atlas_path, "atlas image")
    labels = _read_label_table(labels_tsv)
    return _build_atlas(img, labels, str(atlas_path))


def fetch_aal3_atlas(data_dir: str | Path | None = None) -> Atlas:
    """Download AAL3 (v3v2 of nilearn's ``fetch_atlas_aal``) and return it as an Atlas.

    Needs the internet on first use (nilearn caches it in ``data_dir``). The image is on a
    2 mm MNI grid (nilearn lists its template as MNIColin27); :func:`roi_volumes` resamples
    it onto 1 mm MNI images by nearest neighbour.

    Parameters
    ----------
    data_dir : str or Path, optional
        nilearn's download cache.

    Returns
    -------
    Atlas
        AAL3v2 with its nilearn label table.

    Raises
    ------
    DfrnInputError
        For any failure, suggesting ``--atlas``/``--atlas-labels``.
    """
    try:
        from nilearn.datasets import fetch_atlas_aal

        bunch = fetch_atlas_aal(version="3v2", data_dir=data_dir, verbose=0)
        labels = pd.DataFrame(
            {
                "index": [int(i) for i in bunch["indices"]],
                "name": [str(n) for n in bunch["labels"]],
            }
        )
        img = load_img(bunch["maps"], "AAL3 atlas image")
    except Exception as exc:
        raise DfrnInputError(
            f"could not download the AAL3 atlas with nilearn ({type(exc).__name__}: {exc}); "
            "pass a local atlas with --atlas and --atlas-labels"
        ) from exc
    return _build_atlas(img, labels, "nilearn AAL3v2")


def synthetic_parcellation(mask_img: ImageLike, n_regions: int, seed: int = 0) -> Atlas:
    """Split a brain mask into ``n_regions`` compact parcels (k-means on voxel coordinates).

    The parcels depend only on the mask's geometry and the seed (no anatomical atlas is
    copied). They are numbered 1..n in order of their centroid (x, then y, then z) and
    named ``parcel_001``, ``parcel_002``, ... K-means is fitted on at most 10,000 mask
    voxels and then assigns every mask voxel to its nearest centroid, so a 1 mm brain mask
    takes about a second.

    Parameters
    ----------
    mask_img : nibabel image, str or Path
        The brain mask (voxels > 0 are inside).
    n_regions : int
        Number of parcels, at least 1.
    seed : int, default 0
        Seed of the voxel subsample and of k-means.

    Returns
    -------
    Atlas
        The parcellation, on the mask's grid.

    Raises
    ------
    DfrnInputError
        For an unreadable or non-3D mask, ``n_regions < 1``, fewer mask voxels than
        parcels, or a degenerate k-means that leaves a parcel empty.
    """
    img = load_img(mask_img, "brain mask")
    name = image_name(mask_img, "brain mask")
    data = as_3d(np.asanyarray(img.dataobj), name)
    ijk = np.argwhere(data > 0)
    if n_regions < 1:
        raise DfrnInputError(f"synthetic parcellation needs n_regions >= 1, got {n_regions}")
    if len(ijk) < n_regions:
        raise DfrnInputError(
            f"brain mask {name} has {len(ijk)} voxels, fewer than n_regions={n_regions}"
        )
    labels_data = np.zeros(data.shape, dtype=np.int32)
    labels_data[tuple(ijk.T)] = _kmeans_parcels(
        nib.affines.apply_affine(img.affine, ijk), n_regions, seed
    )
    atlas_img = nib.Nifti1Image(labels_data, img.affine)
    atlas_img.header.set_xyzt_units("mm")
    labels = pd.DataFrame(
        {
            "index": np.arange(1, n_regions + 1),
            "name": [f"parcel_{i:03d}" for i in range(1, n_regions + 1)],
        }
    )
    sizes = np.bincount(labels_data.ravel(), minlength=n_regions + 1)[1:]
    if np.any(sizes == 0):  # only if k-means degenerates (e.g. fewer distinct voxels)
        raise DfrnInputError(
            f"synthetic parcellation of {name} left {int(np.sum(sizes == 0))} empty parcel(s): "
            "lower n_regions"
        )
    return _build_atlas(atlas_img, labels, f"synthetic parcellation of {name}")


def _kmeans_parcels(xyz: np.ndarray, n_regions: int, seed: int) -> np.ndarray:
    """Parcel (1..n, numbered by centroid: x, then y, z) of each point of ``xyz``, by k-means
    fitted on at most 10,000 of them."""
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(seed)
    fit_rows = rng.choice(len(xyz), size=min(len(xyz), 10_000), replace=False)
    km = KMeans(n_clusters=n_regions, n_init=1, random_state=seed).fit(xyz[fit_rows])
    assign = km.predict(xyz)
    order = np.lexsort(np.round(km.cluster_centers_, 6).T[::-1])  # sort by x, then y, z
    rank = np.empty(n_regions, dtype=np.int64)
    rank[order] = np.arange(1, n_regions + 1)
    return rank[assign]


# --------------------------------------------------------------------------------------
# grids


def _voxel_volume_mm3(affine: np.ndarray) -> float:
    return float(abs(np.linalg.det(affine[:3, :3])))


def _same_grid(shape_a, affine_a, shape_b, affine_b) -> bool:
    return tuple(shape_a) == tuple(shape_b) and np.allclose(affine_a, affine_b, atol=_AFFINE_TOL)


def _differs_only_in_resolution(shape_a, affine_a, shape_b, affine_b) -> bool:
    """Other voxel size and/or flipped axes, but the same axes and field of view.

    The field of view (outer voxel edges) must agree to within two voxels of the coarser
    grid (MNI 2 mm grids of SPM, FSL and templateflow differ by up to ~2.5 mm). Grids with the same voxel size and axis directions but another shape or origin
    (cropped, padded or shifted) do not qualify.
    """
    zooms_a = np.linalg.norm(affine_a[:3, :3], axis=0)
    zooms_b = np.linalg.norm(affine_b[:3, :3], axis=0)
    if np.any(zooms_a <= 0) or np.any(zooms_b <= 0):
        return False
    dir_a, dir_b = affine_a[:3, :3] / zooms_a, affine_b[:3, :3] / zooms_b
    if not np.allclose(np.abs(dir_a), np.abs(dir_b), atol=1e-3):
        return False  # oblique or permuted axes
    if np.allclose(zooms_a, zooms_b, atol=_AFFINE_TOL) and np.allclose(dir_a, dir_b, atol=1e-3):
        return False  # same voxels and directions: a different shape/origin is another space

    def corners(shape, affine):  # world coordinates of the outer voxel edges
        lo = nib.affines.apply_affine(affine, -0.5 * np.ones(3))
        hi = nib.affines.apply_affine(affine, np.asarray(shape[:3], float) - 0.5)
        return np.minimum(lo, hi), np.maximum(lo, hi)

    lo_a, hi_a = corners(shape_a, affine_a)
    lo_b, hi_b = corners(shape_b, affine_b)
    tol = 2.0 * np.maximum(zooms_a, zooms_b).max() + _AFFINE_TOL
    return bool(np.all(np.abs(lo_a - lo_b) <= tol) and np.all(np.abs(hi_a - hi_b) <= tol))


def _fits(atlas: Atlas, shape: tuple[int, ...], affine: np.ndarray) -> bool:
    """Whether images of this grid can be aggregated over ``atlas`` (same grid or resolution)."""
    a_shape, a_affine = atlas.img.shape[:3], atlas.img.affine
    return _same_grid(shape, affine, a_shape, a_affine) or _differs_only_in_resolution(
        shape, affine, a_shape, a_affine
    )


def _grid_text(shape: tuple[int, ...], affine: np.ndarray) -> str:
    zooms = "×".join(f"{z:g}" for z in np.linalg.norm(affine[:3, :3], axis=0).round(4))
    origin = ", ".join(f"{o:g}" for o in np.asarray(affine[:3, 3]).round(2))
    return f"shape {tuple(int(n) for n in shape)}, {zooms} mm voxels, origin ({origin}) mm"


def _check_atlas_fits_images(
    atlas: Atlas,
    images: Sequence[nib.spatialimages.SpatialImage],
    names: Sequence[str],
    atlas_option: str,
) -> None:
    """Blame the atlas, not an image, when no image of several is on a grid it fits.

    One image off a grid the others share is that image's fault, and is reported by
    :func:`_label_index` when it is reached.
    """
    if len(images) < 2:
        return
    grids: dict[tuple, list[int]] = {}
    for i, img in enumerate(images):
        key = (tuple(int(n) for n in img.shape[:3]), np.round(img.affine, 4).tobytes())
        grids.setdefault(key, []).append(i)
    if any(_fits(atlas, images[m[0]].shape[:3], images[m[0]].affine) for m in grids.values()):
        return
    first = max(grids.values(), key=len)[0]
    img = images[first]
    raise _off_grid(atlas, img.shape[:3], img.affine, f", e.g. image {names[first]}", atlas_option)


def _off_grid(atlas: Atlas, shape: tuple[int, ...], affine: np.ndarray, example: str,
              atlas_option: str, what: str = "images") -> DfrnInputError:
    return DfrnInputError(
        f"atlas {atlas.source} is not on the grid of the {what}, nor a change of resolution "
        f"of it (atlas: {_grid_text(atlas.img.shape[:3], atlas.img.affine)}; {what}: "
        f"{_grid_text(shape, affine)}{example}): fix {atlas_option} to an atlas on the "
        f"template grid of the {what}"
    )


def check_atlas_grid(atlas: Atlas, shape: tuple[int, ...], affine: np.ndarray,
                     atlas_option: str, what: str = "images", example: str = "") -> None:
    """Refuse an atlas in another space than a grid: neither that grid nor another
    resolution of it (the same axes and field of view; see the module notes).

    Parameters
    ----------
    atlas : Atlas
    shape, affine
        The grid of the images (or maps) the atlas will summarise.
    atlas_option : str
        The setting that names the atlas (``"--atlas"``, ``"[attention] atlas"``).
    what : str, default "images"
        What lies on the grid, for the message.
    example : str, default ""
        Appended to the grid's description (e.g. ``", e.g. image sub-01.nii.gz"``).

    Raises
    ------
    DfrnInputError
        One line naming the atlas file, both grids and ``atlas_option``.
    """
    shape = tuple(int(n) for n in shape[:3])
    if not _fits(atlas, shape, affine):
        raise _off_grid(atlas, shape, affine, example, atlas_option, what)


def labels_on_grid(atlas: Atlas, shape: tuple[int, ...], affine: np.ndarray,
                   atlas_option: str) -> np.ndarray:
    """The atlas' labels on an image grid: as they are, or resampled (nearest neighbour)
    from another resolution of the same grid.

    Raises
    ------
    DfrnInputError
        When the atlas is on neither (naming ``atlas_option``, the config key to fix).
    """
    shape = tuple(int(n) for n in shape[:3])
    check_atlas_grid(atlas, shape, affine, atlas_option)
    index = _label_index(atlas, nib.Nifti1Image(np.zeros(shape, np.uint8), affine), "the images")
    labels = np.zeros(int(np.prod(shape)), dtype=np.int64)
    labels[index.voxels] = atlas.indices[index.codes]
    return labels.reshape(shape)


class _LabelIndex:
    """Flat voxel indices and compact region codes of one atlas on one grid."""

    def __init__(self, labels: np.ndarray, atlas: Atlas) -> None:
        lookup = np.zeros(max(int(labels.max()), int(atlas.indices.max())) + 1, dtype=np.int64)
        lookup[atlas.indices] = np.arange(1, len(atlas.indices) + 1)
        codes = lookup[labels.ravel()]
        self.voxels = np.flatnonzero(codes)
        self.codes = codes[self.voxels] - 1
        self.n_regions = len(atlas.indices)
        self.counts = np.bincount(self.codes, minlength=self.n_regions)


def _label_index(atlas: Atlas, img: nib.spatialimages.SpatialImage, name: str) -> _LabelIndex:
    """The atlas's label index on the grid of ``img``; resampled once per distinct grid."""
    shape = tuple(int(s) for s in img.shape[:3])
    key = (shape, np.round(img.affine, 4).tobytes())
    if key in atlas._grids:
        return atlas._grids[key]
    atlas_img = atlas.img
    if _same_grid(shape, img.affine, atlas_img.shape[:3], atlas_img.affine):
        labels = atlas.label_data()
    elif _differs_only_in_resolution(shape, img.affine, atlas_img.shape[:3], atlas_img.affine):
        from nilearn.image import resample_to_img

        target = nib.Nifti1Image(np.zeros(shape, dtype=np.uint8), img.affine)
        src = nib.Nifti1Image(atlas.label_data().astype(np.int32), atlas_img.affine)
        res = resample_to_img(
            src, target, interpolation="nearest", force_resample=True, copy_header=True
        )
        labels = np.rint(np.asarray(res.dataobj)).astype(np.int64)
    else:
        raise DfrnInputError(
            f"image {name} is not on the atlas grid (image shape {shape}, atlas shape "
            f"{tuple(atlas_img.shape[:3])}; affines differ beyond a change of resolution): "
            "register it to the atlas template first"
        )
    index = _LabelIndex(labels, atlas)
    lost = [n for n, c in zip(atlas.names, index.counts, strict=True) if c == 0]
    if lost:
        warnings.warn(
            f"resampling atlas {atlas.source} to the grid of {name} left "
            f"{len(lost)} region(s) without voxels: {', '.join(lost)}",
            UserWarning,
            stacklevel=3,
        )
    atlas._grids[key] = index
    return index


# --------------------------------------------------------------------------------------
# per-region tables


def region_table(
    img: ImageLike,
    atlas: Atlas,
    statistic: str = "mean",
    *,
    nonfinite: str = "zero",
    name: str | None = None,
) -> pd.DataFrame:
    """Aggregate one image over the regions of an atlas.

    Parameters
    ----------
    img : nibabel image, str or Path
        A 3D image on the atlas grid, or on a grid that differs from it only in resolution
        (then the atlas is resampled onto the image grid by nearest neighbour, once per grid
        and atlas; see the module notes).
    atlas : Atlas
        The regions: every label of ``atlas.labels``, in table order.
    statistic : {"sum", "mean", "volume"}, default "mean"
        ``"sum"``: Σ of the voxel values in the region; ``"mean"``: that sum over the
        region's voxel count (NaN for a region with no voxel); ``"volume"``: the sum × the
        image's voxel volume (mm³, from its affine) / 1000, i.e. ml for a probability map.
    nonfinite : {"zero", "ignore"}, default "zero"
        ``"zero"``: NaN and inf voxels count as 0 and are counted in ``n_voxels``;
        ``"ignore"``: they are left out of the sum and of ``n_voxels``.
    name : str, optional
        The image's name in messages; by default its file name, else ``"image"``.

    Returns
    -------
    pd.DataFrame
        One row per atlas region, in table order, with columns ``region`` (name),
        ``label`` (int), ``<statistic>`` (float) and ``n_voxels`` (voxels aggregated).

    Raises
    ------
    DfrnInputError
        For an unreadable or non-3D image, an image that is not on the atlas grid, or an
        unknown ``statistic`` or ``nonfinite``.

    Warns
    -----
    UserWarning
        When resampling the atlas onto a new grid leaves regions without voxels.
    """
    if statistic not in STATISTICS:
        raise DfrnInputError(f"unknown region statistic {statistic!r}; use one of {STATISTICS}")
    if nonfinite not in NONFINITE:
        raise DfrnInputError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
    name = name or image_name(img, "image")
    image = load_img(img, "image")
    index = _label_index(atlas, image, name)  # called here: its warning names our caller
    data = as_3d(np.asanyarray(image.dataobj), name)
    sums, counts = _region_sums(data.ravel()[index.voxels].astype(np.float64), index, nonfinite)
    stat = _region_statistic(sums, counts, statistic, image.affine)
    return pd.DataFrame({"region": atlas.names, "label": atlas.indices, statistic: stat,
                         "n_voxels": counts.astype(np.int64)})


def _region_sums(values: np.ndarray, index: _LabelIndex,
                 nonfinite: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-region sum and voxel count of ``values`` (the labelled voxels, in ``index`` order)."""
    if nonfinite == "zero":
        values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
        codes, counts = index.codes, index.counts
    else:
        finite = np.isfinite(values)
        codes, values = index.codes[finite], values[finite]
        counts = np.bincount(codes, minlength=index.n_regions)
    return np.bincount(codes, weights=values, minlength=index.n_regions), counts


def _region_statistic(sums: np.ndarray, counts: np.ndarray, statistic: str,
                      affine: np.ndarray) -> np.ndarray:
    """``statistic`` of each region from its sum and voxel count (see :func:`region_table`)."""
    if statistic == "volume":
        return sums * _voxel_volume_mm3(affine) / 1000.0
    if statistic == "mean":
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return sums


def _subject_table(
    images: Sequence[ImageLike],
    atlas: Atlas,
    participant_ids: Sequence[str],
    statistic: str,
    atlas_option: str,
) -> pd.DataFrame:
    """Subjects × regions table of :func:`region_table` values."""
    ids = [str(p) for p in participant_ids]
    if len(ids) != len(images):
        raise DfrnInputError(
            f"got {len(images)} images but {len(ids)} participant ids; they must match one to one"
        )
    dup = sorted({p for p in ids if ids.count(p) > 1})
    if dup:
        raise DfrnInputError(f"duplicated participant ids: {dup}")
    imgs = [load_img(x, f"image of subject {pid}") for x, pid in zip(images, ids, strict=True)]
    names = [image_name(x, f"of subject {pid}") for x, pid in zip(images, ids, strict=True)]
    _check_atlas_fits_images(atlas, imgs, names, atlas_option)
    out = np.empty((len(ids), len(atlas.indices)), dtype=np.float64)
    for row, (img, name) in enumerate(zip(imgs, names, strict=True)):
        out[row] = region_table(img, atlas, statistic, name=name)[statistic].to_numpy()
    return pd.DataFrame(out, index=pd.Index(ids, name="participant_id"), columns=atlas.names)


def roi_volumes(
    images: Sequence[ImageLike],
    atlas: Atlas,
    participant_ids: Sequence[str],
    *,
    atlas_option: str = "the atlas",
) -> pd.DataFrame:
    """Gray-matter volume per region in ml, one row per participant.

    ``volume = Σ_{voxels v in region} GM(v) × voxel volume (mm³) / 1000``, with the voxel
    volume from the image affine's determinant (:func:`region_table` with
    ``statistic="volume"``). Non-finite values count as 0. See the module notes for grid
    handling.

    Parameters
    ----------
    images : sequence of nibabel image, str or Path
        Gray-matter probability (or modulated GM) maps, in the order of ``participant_ids``.
    atlas : Atlas
        The regions.
    participant_ids : sequence of str
        One unique id per image.
    atlas_option : str, default "the atlas"
        The setting that names the atlas (``"[baseline] atlas"``), for the error raised when
        no image is on a grid the atlas fits.

    Returns
    -------
    pd.DataFrame
        Indexed by ``participant_id``, one column per atlas region name, in atlas order.

    Raises
    ------
    DfrnInputError
        Naming the atlas when none of several images fits its grid; naming the image when
        one image does not.
    """
    return _subject_table(images, atlas, participant_ids, "volume", atlas_option)


def roi_mean_intensity(
    images: Sequence[ImageLike],
    atlas: Atlas,
    participant_ids: Sequence[str],
    *,
    atlas_option: str = "the atlas",
) -> pd.DataFrame:
    """Mean image value per region, one row per participant (fallback features from T1).

    Same layout and grid rules as :func:`roi_volumes` (:func:`region_table` with
    ``statistic="mean"``); a region with no voxel on the image grid (possible after
    resampling) is NaN. Callers should warn that these are intensity, not gray-matter
    volume, features.

    Parameters
    ----------
    images : sequence of nibabel image, str or Path
        Images on the atlas grid (or one differing only in resolution).
    atlas : Atlas
        The regions.
    participant_ids : sequence of str
        One unique id per image.
    atlas_option : str, default "the atlas"
        The setting that names the atlas (``"[baseline] atlas"``), for the error raised when
        no image is on a grid the atlas fits.

    Returns
    -------
    pd.DataFrame
        Indexed by ``participant_id``, one column per atlas region name, in atlas order.

    Raises
    ------
    DfrnInputError
        Naming the atlas when none of several images fits its grid; naming the image when
        one image does not.
    """
    return _subject_table(images, atlas, participant_ids, "mean", atlas_option)
