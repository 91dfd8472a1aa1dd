"""Atlas regions ranked by the mean |attention| of a factor attention map.

The absolute map is used: the ranking asks *where* the networks look (see
:mod:`dfrn.interpret.maps`). The aggregation over atlas labels is
:func:`dfrn.data.atlas.region_table`, the same one that makes the ROI features of the ridge
baseline; this module only puts the map on the atlas grid and sorts.
"""

from __future__ import annotations

from collections.abc import Mapping

import nibabel as nib
import numpy as np
import pandas as pd

from dfrn.data.atlas import Atlas, check_atlas_grid, region_table
from dfrn.data.images import ImageLike, as_3d, image_name, load_img
from dfrn.errors import DfrnInputError

__all__ = ["RANK_COLUMNS", "rank_regions"]

RANK_COLUMNS: tuple[str, ...] = (
    "factor",
    "rank",
    "region",
    "label",
    "mean_attention",
    "n_voxels",
)
"""Columns of the table :func:`rank_regions` returns."""

_AFFINE_TOL = 1e-3


def _label_names(labels: pd.DataFrame | Mapping[int, str] | pd.Series) -> dict[int, str]:
    if isinstance(labels, pd.DataFrame):
        if "name" not in labels.columns:
            raise DfrnInputError("the atlas label table needs a 'name' column")
        keys = labels["index"] if "index" in labels.columns else labels.index
        return {int(k): str(v) for k, v in zip(keys, labels["name"], strict=True)}
    return {int(k): str(v) for k, v in dict(labels).items()}


def _lenient_atlas(
    atlas_img: ImageLike, labels: pd.DataFrame | Mapping[int, str] | pd.Series,
    name: str | None = None,
) -> Atlas:
    """An :class:`Atlas` of the named labels > 0 that have voxels; other voxels are no region."""
    name = name or image_name(atlas_img, "atlas")
    aimg = load_img(atlas_img, "atlas")
    data = as_3d(np.asarray(aimg.dataobj), f"atlas {name}")
    if not np.allclose(data, np.round(data)):
        raise DfrnInputError("the atlas must hold integer labels (a probabilistic atlas was given)")
    data = np.round(data).astype(np.int64)
    data[data < 0] = 0
    counts = np.bincount(data.ravel())
    names = _label_names(labels)
    keep = [k for k in sorted(names) if 0 < k < counts.size and counts[k] > 0]
    table = pd.DataFrame(
        {"index": np.asarray(keep, dtype=np.int64), "name": [names[k] for k in keep]}
    )
    img = nib.Nifti1Image(data.astype(np.int32), aimg.affine)
    return Atlas(img=img, labels=table, source=name)


def _on_atlas_grid(abs_map: np.ndarray, map_affine: np.ndarray, atlas: Atlas,
                   atlas_option: str, map_file: str) -> np.ndarray:
    """``abs_map`` on the atlas grid: as it is, or resampled (trilinear, so it stays
    non-negative) from another resolution of that grid; an atlas in another space is refused
    (:func:`dfrn.data.atlas.check_atlas_grid`)."""
    from nilearn.image import resample_to_img

    shape, affine = atlas.img.shape[:3], atlas.img.affine
    if abs_map.shape == shape and np.allclose(map_affine, affine, atol=_AFFINE_TOL):
        return abs_map
    check_atlas_grid(atlas, abs_map.shape, map_affine, atlas_option, "attention map",
                     f", {map_file}" if map_file else "")
    src = nib.Nifti1Image(abs_map.astype(np.float32), map_affine)
    tgt = nib.Nifti1Image(np.zeros(shape, np.int16), affine)
    res = resample_to_img(src, tgt, interpolation="linear", force_resample=True,
                          copy_header=True)
    return np.asarray(res.dataobj, dtype=np.float64)


def rank_regions(
    map_img: ImageLike,
    atlas_img: ImageLike,
    labels: pd.DataFrame | Mapping[int, str] | pd.Series,
    factor: str,
    *,
    atlas_name: str | None = None,
    atlas_option: str = "the atlas",
) -> pd.DataFrame:
    """Rank atlas regions by mean |attention| (highest first).

    The absolute map is resampled (trilinear, so it stays non-negative) onto the atlas grid
    when the grids differ only in resolution (the same space: axes and field of view, see
    :mod:`dfrn.data.atlas`); an atlas in another space is refused. The per-region mean is
    :func:`dfrn.data.atlas.region_table` with ``statistic="mean"`` and
    ``nonfinite="ignore"``: non-finite voxels are left out.

    Parameters
    ----------
    map_img : nibabel image, str or Path
        A 3D attention map (its absolute value is ranked).
    atlas_img : nibabel image, str or Path
        A 3D label image with integer values (floats equal to integers are accepted);
        label 0 (and any negative value) is background and never ranked.
    labels : pd.DataFrame, mapping or pd.Series
        Integer atlas value → region name: a table with a ``name`` column indexed by the
        label value (or with an ``index`` column), or a mapping. Labels absent from it, or
        with no (finite) voxel, are skipped.
    factor : str
        Written into the ``factor`` column.
    atlas_name : str, optional
        The atlas' file, for messages (by default the file ``atlas_img`` was read from).
    atlas_option : str, default "the atlas"
        The setting that names the atlas (``"--atlas"``), for the off-grid message.

    Returns
    -------
    pd.DataFrame
        Columns :data:`RANK_COLUMNS` (``factor, rank, region, label, mean_attention,
        n_voxels``), one row per ranked region; ties by ascending label.

    Raises
    ------
    DfrnInputError
        For an unreadable or non-3D map or atlas, a non-integer atlas, a label table
        without a ``name`` column, or an atlas neither on the map's grid nor on another
        resolution of it (one line naming the atlas and both grids).
    """
    mimg = load_img(map_img, "attention map")
    map_name = image_name(map_img, "attention map")
    atlas = _lenient_atlas(atlas_img, labels, atlas_name)
    abs_map = np.abs(as_3d(np.asarray(mimg.dataobj, dtype=np.float64), map_name))
    abs_map = _on_atlas_grid(abs_map, mimg.affine, atlas, atlas_option,
                             image_name(map_img, ""))
    df = _ranked_regions(abs_map, atlas, map_name)
    df.insert(0, "factor", factor)
    return df.reset_index(drop=True)


def _ranked_regions(abs_map: np.ndarray, atlas: Atlas, map_name: str) -> pd.DataFrame:
    """Mean ``abs_map`` of each named region with voxels, ranked (highest first, ties by label)."""
    columns = ["region", "label", "mean_attention", "n_voxels"]
    if atlas.labels.empty:
        df = pd.DataFrame(columns=columns)
    else:
        table = region_table(
            nib.Nifti1Image(abs_map, atlas.img.affine), atlas, "mean", nonfinite="ignore",
            name=map_name,
        )
        df = table.loc[table["n_voxels"] > 0].rename(columns={"mean": "mean_attention"})[columns]
    df = df.sort_values(["mean_attention", "label"], ascending=[False, True], kind="stable")
    df.insert(0, "rank", np.arange(1, len(df) + 1))
    return df
