"""Cascading model-randomisation sanity check of attention maps (Adebayo et al., 2018).

A map that explains the *trained* model must change when the model's learned weights are
replaced by random ones. The cascading test randomises the network from the top (``fc``)
down to the stem, one stage at a time and cumulatively, recomputes the map after each stage
and compares it with the trained model's map by

* the Spearman rank correlation of ``|map|`` (over all voxels, or within a mask), and
* 3D SSIM of ``|map|`` min-max normalised to [0, 1] (Gaussian window, σ = 1.5 voxels,
  Wang et al. 2004 constants; equivalent to ``skimage.metrics.structural_similarity`` with
  ``gaussian_weights=True, use_sample_covariance=False, data_range=1``).

Guided backpropagation is known to fail this check: its maps barely change when the top
layers are randomised, because they mostly reconstruct the input's edges. Report it next to
the plain gradient.

"Randomised" means every parameter and buffer of the stage is re-drawn from PyTorch's
default initialisation (``reset_parameters`` of each conv, linear and batch-norm layer; batch
norm running statistics are reset too, since they were learned from data with the trained
weights).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from scipy import ndimage
from scipy.stats import spearmanr
from torch import nn

from dfrn.errors import DfrnInputError
from dfrn.interpret.attribution import attribution

__all__ = [
    "DFRN_CASCADE",
    "cascading_randomization",
    "ssim3d",
    "fails_sanity",
    "SANITY_MAX_SPEARMAN",
]

#: A map that keeps a Spearman correlation above this with the trained model's map after
#: only the output layer is randomised mostly shows the image: it fails the check.
SANITY_MAX_SPEARMAN = 0.8


def fails_sanity(table: pd.DataFrame, method: str) -> bool | None:
    """Whether ``method``'s map fails the check (None when the table does not test it).

    Parameters
    ----------
    table : DataFrame
        :func:`cascading_randomization`'s table (``method``, ``step``, ``spearman``).
    method : str
    """
    rows = table[(table["method"] == method) & (table["step"] == "fc")]
    if rows.empty:
        return None
    return bool(float(rows["spearman"].iloc[0]) > SANITY_MAX_SPEARMAN)

# (step label, module names randomised at that step), from the top of DFRN down.
DFRN_CASCADE: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("fc", ("fc",)),
    ("layer4", ("layer4",)),
    ("layer3", ("layer3",)),
    ("layer2", ("layer2",)),
    ("layer1", ("layer1",)),
    ("conv1", ("bn1", "conv1")),
)
TRAINED_STEP = "trained"


def _minmax(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def ssim3d(
    a: np.ndarray,
    b: np.ndarray,
    *,
    data_range: float = 1.0,
    sigma: float = 1.5,
    truncate: float = 3.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> float:
    """Mean structural similarity of two equally shaped volumes (Gaussian window).

    Borders of half the window width are excluded from the mean when the volume is larger
    than the window, as in scikit-image.

    Parameters
    ----------
    a, b : np.ndarray
        Volumes of one shape.
    data_range : float, default 1.0
        Value range of the data (1 for min-max normalised maps).
    sigma : float, default 1.5
        SD of the Gaussian window, in voxels.
    truncate : float, default 3.5
        Window half-width in SDs.
    k1, k2 : float, default 0.01, 0.03
        Stabilising constants of Wang et al. (2004).

    Returns
    -------
    float
        The mean SSIM, in [-1, 1].

    Raises
    ------
    DfrnInputError
        When the shapes differ.
    """
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise DfrnInputError(f"SSIM needs equal shapes, got {x.shape} and {y.shape}")

    def filt(v: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(v, sigma=sigma, truncate=truncate, mode="reflect")

    mx, my = filt(x), filt(y)
    vx = filt(x * x) - mx * mx
    vy = filt(y * y) - my * my
    cxy = filt(x * y) - mx * my
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    pad = int(truncate * sigma + 0.5)
    if all(n > 2 * pad for n in s.shape):
        s = s[tuple(slice(pad, n - pad) for n in s.shape)]
    return float(s.mean())


def _randomise(module: nn.Module) -> None:
    for m in module.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()


def _compare(ref: np.ndarray, cur: np.ndarray, mask: np.ndarray | None) -> tuple[float, float]:
    """Mean over samples of Spearman(|ref|, |cur|) and SSIM of min-max normalised |maps|."""
    rhos, ssims = [], []
    for r, c in zip(ref, cur, strict=True):
        ra, ca = np.abs(r), np.abs(c)
        rv = ra[mask] if mask is not None else ra.ravel()
        cv = ca[mask] if mask is not None else ca.ravel()
        if np.ptp(rv) == 0 or np.ptp(cv) == 0:
            rhos.append(np.nan)
        else:
            rhos.append(float(spearmanr(rv, cv).statistic))
        ssims.append(ssim3d(_minmax(ra), _minmax(ca)))
    return float(np.mean(rhos)), float(np.mean(ssims))


def cascading_randomization(
    model: nn.Module,
    x: torch.Tensor,
    method: str | Sequence[str] = "guided_backprop",
    seed: int = 0,
    *,
    cascade: Sequence[tuple[str, Sequence[str]]] = DFRN_CASCADE,
    mask: np.ndarray | None = None,
    **method_kwargs: object,
) -> pd.DataFrame:
    """Cascading model-randomisation test of one or more attribution methods.

    Parameters
    ----------
    model : nn.Module
        The trained model; it is not modified (a deep copy is randomised).
    x : torch.Tensor
        Input batch ``(N, 1, D, H, W)`` (a few subjects); metrics are averaged over them.
        Single-channel volumes are compared voxel by voxel.
    method : str or sequence of str, default "guided_backprop"
        One method name or several (see :func:`dfrn.interpret.attribution.attribution`).
    seed : int, default 0
        Seed of the random re-initialisation (same random weights for every method).
    cascade : sequence of (str, sequence of str), default DFRN_CASCADE
        ``(step label, module names)`` from the top of the network down; default
        :data:`DFRN_CASCADE` (fc, layer4, layer3, layer2, layer1, conv1 + bn1).
    mask : np.ndarray, optional
        Boolean ``(D, H, W)`` mask restricting the Spearman correlation (e.g. brain).
    **method_kwargs
        Passed to :func:`dfrn.interpret.attribution.attribution`.

    Returns
    -------
    pd.DataFrame
        One row per (method, step): ``method, step, spearman, ssim``. The first step of each
        method is ``"trained"`` (the map against itself: 1, 1); step *s* means every stage
        from the top down to and including *s* is randomised.

    Raises
    ------
    DfrnInputError
        For a batch that is not ``(N, 1, D, H, W)``, a cascade naming modules the model
        lacks, or a mask of another shape.
    """
    methods = [method] if isinstance(method, str) else list(method)
    mask = _checked_inputs(model, x, cascade, mask)
    test = _Cascade(model, x, seed, cascade, mask, method_kwargs)
    rows = [row for meth in methods for row in test.rows(meth)]
    return pd.DataFrame(rows, columns=["method", "step", "spearman", "ssim"])


def _checked_inputs(
    model: nn.Module,
    x: torch.Tensor,
    cascade: Sequence[tuple[str, Sequence[str]]],
    mask: np.ndarray | None,
) -> np.ndarray | None:
    """Refuse a batch that is not ``(N, 1, D, H, W)``, unknown modules or a mismatched mask."""
    if x.ndim != 5 or x.shape[1] != 1:
        raise DfrnInputError(f"x must be (N, 1, D, H, W), got {tuple(x.shape)}")
    names = dict(model.named_modules())
    for label, mods in cascade:
        missing = [m for m in mods if m not in names]
        if missing:
            raise DfrnInputError(
                f"cascade step {label!r} names modules not in the model: {missing}"
            )
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != tuple(x.shape[2:]):
            raise DfrnInputError(
                f"mask shape {mask.shape} differs from volume {tuple(x.shape[2:])}"
            )
    return mask


@dataclass(frozen=True)
class _Cascade:
    """One cascading test: the trained model, its input and the stages to randomise."""

    model: nn.Module
    x: torch.Tensor
    seed: int
    steps: Sequence[tuple[str, Sequence[str]]]
    mask: np.ndarray | None
    method_kwargs: dict[str, object]

    def _map(self, model: nn.Module, method: str) -> np.ndarray:
        """``method``'s map of ``x`` by ``model``, ``(N, D, H, W)``."""
        return attribution(model, self.x, method, **self.method_kwargs).float().cpu().numpy()[:, 0]

    def rows(self, method: str) -> list[dict[str, object]]:
        """The trained row, then one row per step, randomising a deep copy cumulatively."""
        ref = self._map(self.model, method)
        rows: list[dict[str, object]] = [
            {"method": method, "step": TRAINED_STEP, "spearman": 1.0, "ssim": 1.0}
        ]
        work = copy.deepcopy(self.model)
        work_modules = dict(work.named_modules())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            for label, mods in self.steps:
                for name in mods:
                    _randomise(work_modules[name])
                rho, ss = _compare(ref, self._map(work, method), self.mask)
                rows.append({"method": method, "step": label, "spearman": rho, "ssim": ss})
        return rows
