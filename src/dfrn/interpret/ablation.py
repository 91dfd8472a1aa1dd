"""Region ablation importance: how much out-of-fold accuracy falls without each region.

Voxel saliency answers "to which voxels is the output locally sensitive?"; the user asks
"which regions do the predictions need?". Region ablation (occlusion) answers that
directly, and faithfully by construction: each held-out subject's input has one atlas
region replaced by a neutral value, the subject's fold model predicts again, and the
pooled out-of-fold r is recomputed.

* :func:`regions_on_grid` maps an atlas (on the images' grid) onto the network's input grid
  once: each downsampled voxel takes the label that covers most of its block (background
  included); regions left with fewer than ``min_voxels`` voxels are skipped (and reported).
* :func:`ablation_changes` runs captum's ``FeatureAblation`` with the region labels as its
  ``feature_mask`` (several regions per forward pass): ``f(x) - f(x with region r set to
  the baseline)`` per subject and region.
* :func:`train_mean_baseline` is the default neutral value: the mean input of the fold's
  *training* subjects (never the test subjects'); ``0`` is the alternative.
* :func:`region_importance` pools the ablated predictions as Table 1 pools predictions
  (per repeat, over folds) and gives per region ``delta_r`` (r intact minus r ablated, the
  mean over repeats), a seeded bootstrap 95% CI of ``delta_r`` over subjects, and
  ``mean_abs_change`` (mean |Δŷ| in target SD units).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn

from dfrn.errors import DfrnInputError

__all__ = [
    "RegionGrid",
    "regions_on_grid",
    "ablation_changes",
    "train_mean_baseline",
    "region_importance",
    "IMPORTANCE_COLUMNS",
    "MIN_REGION_VOXELS",
    "truth_ranks",
]

#: Regions with fewer voxels than this on the network's input grid are skipped.
MIN_REGION_VOXELS = 2
IMPORTANCE_COLUMNS = ["factor", "rank", "index", "region", "n_voxels", "delta_r", "ci_low",
                      "ci_high", "mean_abs_change"]


@dataclass(frozen=True)
class RegionGrid:
    """Atlas regions on the network's input grid.

    Attributes
    ----------
    labels : ndarray of int64, shape (D, H, W)
        The region label of each input voxel (0: background, or a skipped region).
    table : DataFrame
        ``index``, ``name``, ``n_voxels`` of the kept regions, in atlas order.
    skipped : list of str
        Regions left out (too few voxels after downsampling).
    """

    labels: np.ndarray
    table: pd.DataFrame
    skipped: list[str] = field(default_factory=list)


def _block_mode(labels: np.ndarray, factor: int) -> np.ndarray:
    """The most frequent label of each ``factor``³ block (zero-padded at the ends, as the
    images are); ties go to the smaller label."""
    if factor == 1:
        return labels
    pad = [(0, (-s) % factor) for s in labels.shape]
    d = np.pad(labels, pad)
    n = [s // factor for s in d.shape]
    blocks = d.reshape(n[0], factor, n[1], factor, n[2], factor).transpose(0, 2, 4, 1, 3, 5)
    from scipy.stats import mode

    return mode(blocks.reshape(-1, factor**3), axis=1, keepdims=False).mode.reshape(n)


def regions_on_grid(
    atlas_labels: np.ndarray,
    table: pd.DataFrame,
    downsample: int,
    input_shape: Sequence[int],
    min_voxels: int = MIN_REGION_VOXELS,
    atlas_name: str = "atlas",
) -> RegionGrid:
    """Map an atlas on the images' grid onto the network's input grid.

    Parameters
    ----------
    atlas_labels : ndarray of int, shape of the images
        The atlas label image (checked to be on the images' grid by the caller).
    table : DataFrame
        ``index`` and ``name`` of the atlas' regions.
    downsample : int
        The study's block-averaging factor.
    input_shape : sequence of int
        The network input's shape (checked against the mapped labels).
    min_voxels : int
        Regions with fewer voxels on the input grid are skipped.
    atlas_name : str
        For messages.

    Raises
    ------
    DfrnInputError
        When no region keeps ``min_voxels`` voxels.
    """
    grid = _block_mode(np.asarray(atlas_labels, dtype=np.int64), int(downsample))
    if tuple(grid.shape) != tuple(input_shape):
        raise DfrnInputError(
            f"{atlas_name} maps to shape {grid.shape} on the network's input grid, not "
            f"{tuple(input_shape)}: it is not on the images' grid"
        )
    counts = np.bincount(grid.ravel(), minlength=int(table["index"].max()) + 1)
    n_vox = counts[table["index"].to_numpy(dtype=np.int64)]
    keep = n_vox >= min_voxels
    kept = table.loc[keep, ["index", "name"]].assign(n_voxels=n_vox[keep]).reset_index(drop=True)
    if kept.empty:
        raise DfrnInputError(
            f"{atlas_name}: no region keeps {min_voxels} voxels on the network's input grid "
            f"(downsample {downsample}); use a coarser atlas or a smaller [cohort] downsample"
        )
    grid = np.where(np.isin(grid, kept["index"].to_numpy()), grid, 0)
    return RegionGrid(grid, kept, table.loc[~keep, "name"].astype(str).tolist())


def train_mean_baseline(volumes: Callable[[int], np.ndarray], train_indices: Sequence[int]
                        ) -> np.ndarray:
    """The mean input of the training subjects (float32): the default neutral value."""
    idx = list(train_indices)
    if not idx:
        raise DfrnInputError("the train-mean ablation baseline needs training subjects")
    total = np.zeros(np.asarray(volumes(idx[0])).shape, dtype=np.float64)
    for i in idx:
        total += np.asarray(volumes(i), dtype=np.float64)
    return (total / len(idx)).astype(np.float32)


def ablation_changes(
    model: nn.Module,
    x: torch.Tensor,
    grid: RegionGrid,
    baseline: float | np.ndarray = 0.0,
    regions_per_pass: int | None = None,
) -> np.ndarray:
    """``f(x) - f(x with region r replaced by the baseline)`` for every subject and region.

    Parameters
    ----------
    model : nn.Module
        Maps ``(n, 1, D, H, W)`` to ``(n,)`` or ``(n, 1)``; put in eval mode here.
    x : Tensor of shape (n, 1, D, H, W)
    grid : RegionGrid
    baseline : float or ndarray of shape (D, H, W)
        The neutral value (0, or the training subjects' mean input).
    regions_per_pass : int, optional
        Regions ablated in one forward pass (captum's ``perturbations_per_eval``); by default
        8 for inputs below a million voxels and 1 above (measured in
        ``benchmarks/bench_ablation.py``: 1.13× faster at 23×28×23, 0.80× at 182×218×182).

    Returns
    -------
    ndarray of shape (n_regions, n)
        In the model's output units, regions in ``grid.table`` order.
    """
    from captum.attr import FeatureAblation

    model.eval()
    if regions_per_pass is None:
        regions_per_pass = 8 if int(np.prod(x.shape[2:])) < 1_000_000 else 1

    def forward(inp: torch.Tensor) -> torch.Tensor:
        return model(inp).reshape(len(inp))

    labels = torch.as_tensor(grid.labels, device=x.device)
    mask = labels[None, None].expand_as(x)
    base: float | torch.Tensor = float(baseline) if np.isscalar(baseline) else torch.as_tensor(
        np.asarray(baseline, dtype=np.float32), device=x.device)[None, None]
    with torch.no_grad():
        attr = FeatureAblation(forward).attribute(
            x, baselines=base, feature_mask=mask, perturbations_per_eval=regions_per_pass)
    flat = attr.reshape(len(x), -1).cpu().numpy()
    first = [int(np.flatnonzero(grid.labels.ravel() == i)[0]) for i in grid.table["index"]]
    return flat[:, first].T.astype(np.float64)


def _pearson_rows(y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Pearson r of ``y`` (..., n) with each row of ``pred`` (..., n), along the last axis.

    Constant predictions (a region the network cannot do without, ablated) carry no
    information about ``y``: their r is 0, not undefined.
    """
    yc = y - y.mean(axis=-1, keepdims=True)
    pc = pred - pred.mean(axis=-1, keepdims=True)
    den = np.sqrt((yc**2).sum(-1) * (pc**2).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 1e-12, (yc * pc).sum(-1) / np.where(den > 1e-12, den, 1.0), 0.0)


#: Subject draws (repeats × resamples × subjects) held at once by :func:`_bootstrap_ci`.
_BOOT_CHUNK_ELEMENTS = 1 << 19


def _bootstrap_ci(y: np.ndarray, intact: np.ndarray, ablated: np.ndarray, n_boot: int,
                  rng: np.random.Generator, chunk_elements: int = _BOOT_CHUNK_ELEMENTS
                  ) -> np.ndarray:
    """The 95% percentile CI of ``delta_r`` per region over ``n_boot`` subject resamples.

    The resamples are drawn ``chunk`` rows at a time (``rng.integers`` yields the same stream
    in chunks as in one call, so the CI is that of one ``(n_boot, n)`` draw). Memory is
    ``repeats × chunk × n`` for the draws plus ``regions × n_boot`` for the deltas, whose
    percentiles need them all: it no longer grows with ``n_boot × n``.

    Parameters
    ----------
    y, intact : ndarray of shape (R, n)
        True values and intact predictions per repeat.
    ablated : ndarray of shape (K, R, n)
        Ablated predictions per region.
    n_boot : int
    rng : numpy Generator
    chunk_elements : int
        About how many (repeat, resample, subject) draws one chunk holds.

    Returns
    -------
    ndarray of shape (K, 2)
        The 2.5th and 97.5th percentiles.
    """
    n_rep, n = y.shape
    chunk = max(1, chunk_elements // max(1, n_rep * n))
    d = np.empty((len(ablated), n_boot))  # (K, B)
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        boots = rng.integers(0, n, size=(stop - start, n))
        yb = y[:, boots]  # (R, b, n)
        r_intact = _pearson_rows(yb, intact[:, boots])  # (R, b)
        for k, abl in enumerate(ablated):
            d[k, start:stop] = (r_intact - _pearson_rows(yb, abl[:, boots])).mean(axis=0)
    return np.nanpercentile(d, [2.5, 97.5], axis=1).T


def region_importance(
    records: pd.DataFrame, table: pd.DataFrame, n_boot: int = 1000, seed: int = 0
) -> pd.DataFrame:
    """``delta_r`` with its bootstrap CI and ``mean_abs_change`` per factor and region.

    Parameters
    ----------
    records : DataFrame
        One row per (repeat, factor, participant_id) with ``y_true``, ``y_pred`` (intact)
        and one column per region index (``int``) holding the ablated prediction.
    table : DataFrame
        ``index``, ``name``, ``n_voxels`` of the regions.
    n_boot : int
        Bootstrap resamples of the subjects (the same subjects in every repeat), drawn in
        chunks (:func:`_bootstrap_ci`); 0 skips the CI (NaN).
    seed : int

    Returns
    -------
    DataFrame
        :data:`IMPORTANCE_COLUMNS`, ranked by ``delta_r`` within each factor.
    """
    rng = np.random.default_rng(seed)
    regions = [int(i) for i in table["index"]]
    out = []
    for factor, g in records.groupby("factor", sort=False):
        repeats = sorted(g["repeat"].unique())
        wide = [g[g["repeat"] == r].set_index("participant_id").sort_index() for r in repeats]
        ids = wide[0].index
        y = np.stack([w.loc[ids, "y_true"].to_numpy(float) for w in wide])  # (R, n)
        intact = np.stack([w.loc[ids, "y_pred"].to_numpy(float) for w in wide])
        ablated = np.stack([w.loc[ids, regions].to_numpy(float).T for w in wide], axis=1)
        delta = (_pearson_rows(y, intact)[None] - _pearson_rows(y[None], ablated)).mean(axis=1)
        ci = np.full((len(regions), 2), np.nan)
        if n_boot > 0:
            ci = _bootstrap_ci(y, intact, ablated, n_boot, rng)
        sd = float(np.std(y[0], ddof=1)) or 1.0
        change = np.abs(ablated - intact[None]).mean(axis=(1, 2)) / sd
        t = table.assign(factor=factor, delta_r=delta, ci_low=ci[:, 0], ci_high=ci[:, 1],
                         mean_abs_change=change, region=table["name"].astype(str))
        t = t.sort_values("delta_r", ascending=False, kind="stable")
        t["rank"] = np.arange(1, len(t) + 1)
        out.append(t[IMPORTANCE_COLUMNS])
    return pd.concat(out, ignore_index=True)


def truth_ranks(table: pd.DataFrame, labels: np.ndarray, truth: dict[str, np.ndarray]
                ) -> pd.DataFrame:
    """Where a known region (a ground-truth mask) lands in each factor's ablation ranking.

    Parameters
    ----------
    table : DataFrame
        :func:`region_importance`'s output.
    labels : ndarray of int
        The atlas on the masks' grid.
    truth : dict of str to ndarray of bool
        A ground-truth mask per factor (the demo's planted regions).

    Returns
    -------
    DataFrame
        ``factor``, ``region`` (the atlas region covering most of the mask), ``rank`` and
        ``n_regions``.
    """
    rows = []
    for factor, mask in truth.items():
        ranked = table[table["factor"] == factor]
        inside = labels[np.asarray(mask, bool) & (labels > 0)]
        if ranked.empty or inside.size == 0:
            continue
        index = int(np.bincount(inside).argmax())
        hit = ranked[ranked["index"] == index]
        rows.append({"factor": factor, "region": hit["region"].iloc[0] if len(hit) else "",
                     "rank": int(hit["rank"].iloc[0]) if len(hit) else -1,
                     "n_regions": len(ranked)})
    return pd.DataFrame(rows, columns=["factor", "region", "rank", "n_regions"])
