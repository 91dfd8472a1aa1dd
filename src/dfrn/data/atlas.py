"""Atlas regions and per-region gray-matter volumes: the features of the ridge baseline.

An :class:`Atlas` is a deterministic label image plus a label table (``index``, ``name``).
It comes from a file pair (:func:`load_atlas`, e.g. AAL3v1 on the MNI152 1 mm grid), from
nilearn's AAL3 download (:func:`fetch_aal3_atlas`, needs the internet) or, for offline
demos, from :func:`synthetic_parcellation`, which splits a brain mask into compact parcels
by k-means on the voxel coordinates.

:func:`roi_volumes` turns gray-matter probability maps into a subjects × regions table of
volumes in ml; :func:`roi_mean_intensity` gives the mean image value per region instead
(the fallback when only T1 images are available).

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

from dfrn.errors import DfrnInputError
from dfrn.io import atomic_write_tsv

__all__ = [
    "Atlas",
    "load_atlas",
    "fetch_aal3_atlas",
    "synthetic_parcellation",
    "roi_volumes",
    "roi_mean_intensity",
    "write_roi_features",
]

ImageLike = nib.spatialimages.SpatialImage | str | Path

_AFFINE_TOL = 1e-3


@dataclass
class Atlas:
    """A deterministic atlas: an integer label image and its label table.

    ``labels`` has columns ``index`` (int, > 0) and ``name`` (str), one row per region that
    has at least one voxel in ``img``, in table order. Label 0 is background.
    """

    img: nib.Nifti1Image
    labels: pd.DataFrame
    source: str = ""
    _data: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def names(self) -> list[str]:
        return self.labels["name"].astype(str).tolist()

    @property
    def indices(self) -> np.ndarray:
        return self.labels["index"].to_numpy(dtype=np.int64)

    def label_data(self) -> np.ndarray:
        """The label image as a 3-D int64 array (cached)."""
        if self._data is None:
            self._data = _integer_labels(self.img, self.source or "atlas")
        return self._data


# --------------------------------------------------------------------------------------
# loading and validating atlases


def _load_img(img: ImageLike, what: str) -> nib.spatialimages.SpatialImage:
    if isinstance(img, str | Path):
        path = Path(img)
        if not path.is_file():
            raise DfrnInputError(f"{what} {path} does not exist")
        try:
            return nib.load(path)
        except Exception as exc:  # nibabel raises several types for unreadable files
            raise DfrnInputError(f"{what} {path} is not a readable image: {exc}") from exc
    if not hasattr(img, "affine") or not hasattr(img, "dataobj"):
        raise DfrnInputError(f"{what} is not a nibabel image or a path: {type(img).__name__}")
    return img


def _img_name(img: ImageLike, fallback: str) -> str:
    if isinstance(img, str | Path):
        return str(img)
    fname = img.get_filename() if hasattr(img, "get_filename") else None
    return str(fname) if fname else fallback


def _as_3d(data: np.ndarray, name: str) -> np.ndarray:
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DfrnInputError(f"{name} must be a 3-D image, got shape {data.shape}")
    return data


def _integer_labels(img: nib.spatialimages.SpatialImage, name: str) -> np.ndarray:
    data = _as_3d(np.asanyarray(img.dataobj), name)
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
    try:
        table = pd.read_csv(path, sep="\t", dtype={"name": str})
    except Exception as exc:
        raise DfrnInputError(f"atlas label table {path} is not a readable TSV: {exc}") from exc
    missing = [c for c in ("index", "name") if c not in table.columns]
    if missing:
        raise DfrnInputError(f"atlas label table {path} lacks columns {missing}")
    index = pd.to_numeric(table["index"], errors="coerce")
    if index.isna().any() or np.any(index != np.round(index)):
        raise DfrnInputError(f"atlas label table {path}: column 'index' must hold integers")
    if table["name"].isna().any():
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
    """
    img = _load_img(atlas_path, "atlas image")
    labels = _read_label_table(labels_tsv)
    return _build_atlas(img, labels, str(atlas_path))


def fetch_aal3_atlas(data_dir: str | Path | None = None) -> Atlas:
    """Download AAL3 (v3v2 of nilearn's ``fetch_atlas_aal``) and return it as an Atlas.

    Needs the internet on first use (nilearn caches it in ``data_dir``). The image is on a
    2 mm MNI grid (nilearn lists its template as MNIColin27); :func:`roi_volumes` resamples
    it onto 1 mm MNI images by nearest neighbour. Any failure is a DfrnInputError that
    suggests ``--atlas``/``--atlas-labels``.
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
        maps = bunch["maps"]
        img = maps if hasattr(maps, "affine") else nib.load(maps)
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
    """
    from sklearn.cluster import KMeans

    img = _load_img(mask_img, "brain mask")
    name = _img_name(mask_img, "brain mask")
    data = _as_3d(np.asanyarray(img.dataobj), name)
    ijk = np.argwhere(data > 0)
    if n_regions < 1:
        raise DfrnInputError(f"synthetic parcellation needs n_regions >= 1, got {n_regions}")
    if len(ijk) < n_regions:
        raise DfrnInputError(
            f"brain mask {name} has {len(ijk)} voxels, fewer than n_regions={n_regions}"
        )
    xyz = nib.affines.apply_affine(img.affine, ijk)
    rng = np.random.default_rng(seed)
    fit_rows = rng.choice(len(xyz), size=min(len(xyz), 10_000), replace=False)
    km = KMeans(n_clusters=n_regions, n_init=1, random_state=seed).fit(xyz[fit_rows])
    assign = km.predict(xyz)
    order = np.lexsort(np.round(km.cluster_centers_, 6).T[::-1])  # sort by x, then y, z
    rank = np.empty(n_regions, dtype=np.int64)
    rank[order] = np.arange(1, n_regions + 1)
    labels_data = np.zeros(data.shape, dtype=np.int32)
    labels_data[tuple(ijk.T)] = rank[assign]
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


class _GridCache:
    """Atlas label indices per image grid; resamples the atlas once per distinct grid."""

    def __init__(self, atlas: Atlas) -> None:
        self.atlas = atlas
        self._cache: dict[tuple, _LabelIndex] = {}
        self._warned_lost = False

    def get(self, img: nib.spatialimages.SpatialImage, name: str) -> _LabelIndex:
        shape = tuple(img.shape[:3])
        key = (shape, np.round(img.affine, 4).tobytes())
        if key in self._cache:
            return self._cache[key]
        atlas_img = self.atlas.img
        if _same_grid(shape, img.affine, atlas_img.shape[:3], atlas_img.affine):
            labels = self.atlas.label_data()
        elif _differs_only_in_resolution(shape, img.affine, atlas_img.shape[:3], atlas_img.affine):
            from nilearn.image import resample_to_img

            target = nib.Nifti1Image(np.zeros(shape, dtype=np.uint8), img.affine)
            src = nib.Nifti1Image(self.atlas.label_data().astype(np.int32), atlas_img.affine)
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
        index = _LabelIndex(labels, self.atlas)
        lost = [n for n, c in zip(self.atlas.names, index.counts, strict=True) if c == 0]
        if lost and not self._warned_lost:
            self._warned_lost = True
            warnings.warn(
                f"resampling atlas {self.atlas.source} to the grid of {name} left "
                f"{len(lost)} region(s) without voxels: {', '.join(lost)}",
                UserWarning,
                stacklevel=4,
            )
        self._cache[key] = index
        return index


# --------------------------------------------------------------------------------------
# features


def _region_table(
    images: Sequence[ImageLike],
    atlas: Atlas,
    participant_ids: Sequence[str],
    reducer: str,
) -> pd.DataFrame:
    ids = [str(p) for p in participant_ids]
    if len(ids) != len(images):
        raise DfrnInputError(
            f"got {len(images)} images but {len(ids)} participant ids; they must match one to one"
        )
    dup = sorted({p for p in ids if ids.count(p) > 1})
    if dup:
        raise DfrnInputError(f"duplicated participant ids: {dup}")
    cache = _GridCache(atlas)
    out = np.empty((len(ids), len(atlas.indices)), dtype=np.float64)
    for row, (img_like, pid) in enumerate(zip(images, ids, strict=True)):
        name = _img_name(img_like, f"of subject {pid}")
        img = _load_img(img_like, f"image of subject {pid}")
        index = cache.get(img, name)
        data = _as_3d(np.asanyarray(img.dataobj), name)
        values = data.ravel()[index.voxels].astype(np.float64)
        values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
        sums = np.bincount(index.codes, weights=values, minlength=index.n_regions)
        if reducer == "volume":
            out[row] = sums * _voxel_volume_mm3(img.affine) / 1000.0
        else:
            with np.errstate(invalid="ignore", divide="ignore"):
                out[row] = np.where(index.counts > 0, sums / np.maximum(index.counts, 1), np.nan)
    df = pd.DataFrame(out, index=pd.Index(ids, name="participant_id"), columns=atlas.names)
    return df


def roi_volumes(
    images: Sequence[ImageLike], atlas: Atlas, participant_ids: Sequence[str]
) -> pd.DataFrame:
    """Gray-matter volume per region in ml, one row per participant.

    ``volume = Σ_{voxels v in region} GM(v) × voxel volume (mm³) / 1000``, with the voxel
    volume from the image affine's determinant. ``images`` are gray-matter probability (or
    modulated GM) maps, as nibabel images or paths, in the order of ``participant_ids``.
    Non-finite values count as 0. Returns a DataFrame indexed by ``participant_id`` with one
    column per atlas region name, in atlas order. See the module notes for grid handling.
    """
    return _region_table(images, atlas, participant_ids, "volume")


def roi_mean_intensity(
    images: Sequence[ImageLike], atlas: Atlas, participant_ids: Sequence[str]
) -> pd.DataFrame:
    """Mean image value per region, one row per participant (fallback features from T1).

    Same layout and grid rules as :func:`roi_volumes`; a region with no voxel on the image
    grid (possible after resampling) is NaN. Callers should warn that these are intensity,
    not gray-matter volume, features.
    """
    return _region_table(images, atlas, participant_ids, "mean")


def write_roi_features(df: pd.DataFrame, out_dir: str | Path) -> Path:
    """Write ``out_dir/baseline/roi_features.tsv`` (participant_id first, then regions)."""
    path = Path(out_dir) / "baseline" / "roi_features.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    table = df if "participant_id" in df.columns else df.rename_axis("participant_id").reset_index()
    atomic_write_tsv(table, path, float_format=None)
    return path
