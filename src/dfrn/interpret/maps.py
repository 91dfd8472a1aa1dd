"""Factor attention maps (FAM): per-subject maps averaged over subjects (Eq. 4), on the input grid.

Method (issue 4)
----------------
For subject *i* and factor *k* the attention map :math:`a_i^k` is the attribution of the
model's scalar output to the input volume (:func:`dfrn.interpret.attribution.attribution`;
guided backpropagation by default). The factor map is the mean over subjects (Eq. 4):
:math:`\\mathrm{FAM}_k = \\frac1n\\sum_i a_i^k`.

* **Out-of-fold** (``mode="oof"``, the default): :math:`a_i^k` is computed with the model of
  the fold in which subject *i* was a *test* subject; with repeated K-fold CV a subject is a
  test subject once per repeat, and its map is the mean over those repeats. Then maps are
  averaged over subjects, each subject with equal weight.
* ``mode="all"``: :math:`a_i^k` is the mean of the maps from every (repeat, fold) model.

Both modes average over the same subjects: those that are a test subject of some task.

Two maps are accumulated: the **signed** mean (Eq. 4 literally) and the mean of
**absolute** maps, :math:`\\frac1n\\sum_i \\overline{|a_i^{k,(r)}|}`, where the absolute
value is taken on each single-model map before any averaging. Mean-of-abs is not abs-of-mean:
attributions of opposite sign in different subjects (or repeats) cancel in the signed mean
but add in the absolute one. Region ranking (:func:`dfrn.interpret.regions.rank_regions`)
and Figure 4 (:func:`dfrn.plotting.plot_fam`) use the absolute map: they ask *where* the
network looks, and the sign of a guided-backprop attribution at the input mostly reflects
local image contrast, not the direction of the effect.

Maps are put on the input's 1 mm grid with the input's affine (:func:`to_template_space`),
never with an identity affine. :func:`localisation_scores` measures how well a map finds a
planted region.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import nibabel as nib
import numpy as np
import torch
from torch import nn

from dfrn.data.images import ImageLike, load_img
from dfrn.errors import DfrnInputError
from dfrn.interpret.attribution import attribution

__all__ = [
    "FoldTask",
    "AttentionMaps",
    "iter_subject_maps",
    "factor_attention_map",
    "to_template_space",
    "localisation_scores",
]

Mode = Literal["oof", "all"]


# --------------------------------------------------------------------------------------
# Subject maps and Eq. 4 averaging
# --------------------------------------------------------------------------------------

ModelSource = nn.Module | Callable[[], nn.Module]
VolumeSource = Any  # array-like indexable by subject (N, [C,] D, H, W), or get_volume(i)


@dataclass(frozen=True)
class FoldTask:
    """One trained model and the subjects it did not see.

    Attributes
    ----------
    model : nn.Module or callable
        The model, or a zero-argument loader (called once, when the task is processed, so
        only one model is in memory at a time).
    test_indices : sequence of int
        The task's test subjects, as indices into ``volumes``.
    repeat, fold : int
        Labels only.
    """

    model: ModelSource
    test_indices: Sequence[int]
    repeat: int = 0
    fold: int = 0


@dataclass
class AttentionMaps:
    """A factor attention map on the training grid.

    Attributes
    ----------
    signed : np.ndarray
        Eq. 4: the mean over subjects of the per-subject map, itself the mean over the
        subject's models (float32, the shape of one volume).
    absolute : np.ndarray
        The same average of ``|map|``, the absolute value taken on each single-model map.
    n_subjects : int
        Subjects averaged (those that are a test subject of some task).
    n_maps : int
        Single-model subject maps that went into the average.
    method : str
        Attribution method.
    mode : str
        ``"oof"`` or ``"all"``.
    """

    signed: np.ndarray
    absolute: np.ndarray
    n_subjects: int
    n_maps: int
    method: str
    mode: str


def _as_task(t: FoldTask | tuple) -> FoldTask:
    if isinstance(t, FoldTask):
        return t
    if isinstance(t, tuple) and len(t) in (2, 3, 4):
        return FoldTask(*t)
    raise DfrnInputError(f"a task must be a FoldTask or (model, test_indices), got {type(t)!r}")


def _volume_getter(volumes: VolumeSource) -> tuple[Callable[[int], np.ndarray], int | None]:
    if callable(volumes) and not hasattr(volumes, "__getitem__"):
        return volumes, None
    n = len(volumes) if hasattr(volumes, "__len__") else None
    return (lambda i: volumes[i]), n


def _load_batch(get: Callable[[int], np.ndarray], idx: Sequence[int]) -> tuple[np.ndarray, bool]:
    vols = [np.asarray(get(int(i)), dtype=np.float32) for i in idx]
    shapes = {v.shape for v in vols}
    if len(shapes) != 1:
        raise DfrnInputError(f"volumes of subjects {list(idx)} differ in shape: {sorted(shapes)}")
    v0 = vols[0]
    if v0.ndim not in (3, 4):
        raise DfrnInputError(f"a volume must be (D, H, W) or (C, D, H, W), got shape {v0.shape}")
    batch = np.stack(vols)
    squeeze = v0.ndim == 3
    return (batch[:, None] if squeeze else batch), squeeze


def _resolve(
    tasks: Sequence[FoldTask | tuple], mode: str, n_volumes: int | None
) -> tuple[list[FoldTask], np.ndarray, dict[int, int]]:
    if mode not in ("oof", "all"):
        raise DfrnInputError(f"attention mode must be 'oof' or 'all', got {mode!r}")
    ts = [_as_task(t) for t in tasks]
    if not ts:
        raise DfrnInputError("no (model, test subjects) tasks given")
    tests = [np.unique(np.asarray(t.test_indices, dtype=int)) for t in ts]
    subjects = np.unique(np.concatenate(tests))
    if subjects.size == 0:
        raise DfrnInputError("no test subjects in any task")
    if subjects[0] < 0 or (n_volumes is not None and subjects[-1] >= n_volumes):
        raise DfrnInputError(
            f"test subject indices must lie in [0, {n_volumes}), got {subjects[0]}..{subjects[-1]}"
        )
    if mode == "oof":
        counts: dict[int, int] = {}
        for t in tests:
            for i in t.tolist():
                counts[i] = counts.get(i, 0) + 1
    else:
        counts = {int(i): len(ts) for i in subjects}
    return ts, subjects, counts


def iter_subject_maps(
    tasks: Sequence[FoldTask | tuple],
    volumes: VolumeSource,
    method: str = "guided_backprop",
    *,
    mode: Mode = "oof",
    batch_size: int = 4,
    device: str | torch.device | None = None,
    seed: int = 0,
    **method_kwargs: Any,
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield the single-model maps of the subjects, batch by batch.

    In ``"oof"`` mode each task's model attributes its own test subjects; in ``"all"`` mode
    every task's model attributes every subject that is a test subject of some task. Models
    are loaded one at a time, moved to ``device`` (when given) and used in eval mode.

    Parameters
    ----------
    tasks : sequence of FoldTask or tuple
        See :func:`factor_attention_map`.
    volumes : array-like or callable
        See :func:`factor_attention_map`.
    method : str, default "guided_backprop"
        See :func:`dfrn.interpret.attribution.attribution`.
    mode : {"oof", "all"}, default "oof"
        Which models attribute which subjects.
    batch_size : int, default 4
        Subjects per attribution call.
    device : str or torch.device, optional
        Where the models run.
    seed : int, default 0
        SmoothGrad only: subject *i* uses ``seed + i``, whatever the batching.
    **method_kwargs
        Passed to :func:`dfrn.interpret.attribution.attribution`.

    Yields
    ------
    task_index : int
        Index of the task whose model made the maps.
    subject_indices : np.ndarray
        The batch's subjects (indices into ``volumes``).
    maps : np.ndarray
        ``(B, *volume_shape)``, float32, signed.
    """
    if batch_size < 1:
        raise DfrnInputError(f"batch_size must be positive, got {batch_size}")
    get, n_volumes = _volume_getter(volumes)
    ts, subjects, _ = _resolve(tasks, mode, n_volumes)
    for ti, task in enumerate(ts):
        model = _load_model(task, device)
        idx = np.unique(np.asarray(task.test_indices, dtype=int)) if mode == "oof" else subjects
        for start in range(0, idx.size, batch_size):
            b = idx[start : start + batch_size]
            yield ti, b, _batch_maps(model, get, b, method, seed, method_kwargs)
        del model


def _load_model(task: FoldTask, device: str | torch.device | None) -> nn.Module:
    """The task's model (called when given as a loader), moved to ``device`` when given."""
    model = task.model if isinstance(task.model, nn.Module) else task.model()
    if device is not None:
        model = model.to(device)
    return model


def _batch_maps(
    model: nn.Module,
    get: Callable[[int], np.ndarray],
    subjects: np.ndarray,
    method: str,
    seed: int,
    method_kwargs: dict[str, Any],
) -> np.ndarray:
    """Signed float32 maps ``(B, *volume_shape)`` of one batch of subjects by one model."""
    batch, squeeze = _load_batch(get, subjects)
    kw = dict(method_kwargs)
    if method == "smoothgrad":
        kw["seed"] = [seed + int(i) for i in subjects]
    maps = attribution(model, torch.from_numpy(batch), method, **kw).float().cpu().numpy()
    return maps[:, 0] if squeeze else maps


def factor_attention_map(
    tasks: Sequence[FoldTask | tuple],
    volumes: VolumeSource,
    method: str = "guided_backprop",
    *,
    mode: Mode = "oof",
    batch_size: int = 4,
    device: str | torch.device | None = None,
    seed: int = 0,
    **method_kwargs: Any,
) -> AttentionMaps:
    """Factor attention map of one factor (Eq. 4), averaged over subjects, folds and repeats.

    Parameters
    ----------
    tasks : sequence of FoldTask or tuple
        One entry per trained (repeat, fold) model of the factor: a :class:`FoldTask` or a
        ``(model_or_loader, test_indices)`` tuple. ``test_indices`` index ``volumes``.
    volumes : array-like or callable
        The volumes the models were trained on (after normalisation and downsampling):
        an array-like indexable by subject (``np.ndarray`` ``(N, D, H, W)``, a list, a
        ``VolumeSet``) or a callable ``get_volume(i)``. Each volume is ``(D, H, W)`` or
        ``(C, D, H, W)``.
    method : str, default "guided_backprop"
        See :func:`dfrn.interpret.attribution.attribution`.
    mode : {"oof", "all"}, default "oof"
        ``"oof"``: subject *i*'s map comes from the models of the folds where *i* was a test
        subject, averaged over repeats. ``"all"``: the mean over every model.
    batch_size : int, default 4
        Subjects per attribution call.
    device : str or torch.device, optional
        Where the models run.
    seed : int, default 0
        SmoothGrad only (see :func:`iter_subject_maps`).
    **method_kwargs
        Passed to :func:`dfrn.interpret.attribution.attribution`.

    Returns
    -------
    AttentionMaps
        The signed map (Eq. 4) and the mean absolute map. Every subject that is a test
        subject of some task has weight ``1 / n_subjects``; within a subject each
        contributing model has weight ``1 / (number of its models)``.

    Raises
    ------
    DfrnInputError
        For no tasks or test subjects, indices outside ``volumes``, a bad ``mode`` or
        volumes of different shapes.
    """
    get, n_volumes = _volume_getter(volumes)
    _, subjects, counts = _resolve(tasks, mode, n_volumes)
    batches = iter_subject_maps(
        tasks, get, method, mode=mode, batch_size=batch_size, device=device, seed=seed, **method_kwargs
    )
    signed, absolute, n_maps = _eq4_average(batches, counts, int(subjects.size))
    return AttentionMaps(signed, absolute, int(subjects.size), n_maps, method, mode)


def _eq4_average(
    batches: Iterator[tuple[int, np.ndarray, np.ndarray]], counts: dict[int, int], n_subjects: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """Eq. 4: weighted means of the signed and absolute maps (float32), and the map count.

    Subject *i* has weight ``1 / n_subjects``, shared by its ``counts[i]`` models.
    """
    signed: np.ndarray | None = None
    absolute: np.ndarray | None = None
    n_maps = 0
    for _, idx, maps in batches:
        if signed is None:
            signed = np.zeros(maps.shape[1:], dtype=np.float64)
            absolute = np.zeros(maps.shape[1:], dtype=np.float64)
        assert absolute is not None
        if maps.shape[1:] != signed.shape:
            raise DfrnInputError(
                f"volume shape {maps.shape[1:]} differs from earlier volumes {signed.shape}"
            )
        for i, m in zip(idx.tolist(), maps, strict=True):
            w = 1.0 / (n_subjects * counts[i])
            signed += w * m
            absolute += w * np.abs(m)
            n_maps += 1
    assert signed is not None and absolute is not None
    return signed.astype(np.float32), absolute.astype(np.float32), n_maps


# --------------------------------------------------------------------------------------
# Template space
# --------------------------------------------------------------------------------------


def to_template_space(
    map_array: np.ndarray,
    reference_img: ImageLike,
    downsample: int = 1,
    *,
    order: int = 1,
) -> nib.Nifti1Image:
    """Put a map from the training grid on the input (template, 1 mm) grid.

    The training grid was made by zero-padding the input at the end of each axis to a
    multiple of ``downsample`` (*f*) and block-averaging, so training voxel *i* covers input
    voxels ``[i·f, (i+1)·f)`` and its centre is input coordinate ``i·f + (f − 1)/2``. Input
    voxel *j* is therefore at training coordinate ``(j − (f − 1)/2) / f``; the map is sampled
    there (``order=1``: trilinear, edges clamped; ``order=0``: each block repeated) and the
    padding is cropped.

    Parameters
    ----------
    map_array : np.ndarray
        The map on the training grid, ``(D, H, W)`` or ``(1, D, H, W)``.
    reference_img : nibabel image, str or Path
        An image on the input grid (shape and affine are used).
    downsample : int, default 1
        The block-averaging factor of the training grid.
    order : {0, 1}, default 1
        1: trilinear; 0: block repeat.

    Returns
    -------
    nibabel.Nifti1Image
        float32, on the reference's grid, with its affine (and its qform/sform codes).

    Raises
    ------
    DfrnInputError
        For an unreadable reference, a map that is not 3D or whose shape does not match the
        reference downsampled by ``downsample``, or a bad ``downsample`` or ``order``.
    """
    ref = load_img(reference_img, "reference image")
    ref_shape = tuple(int(s) for s in ref.shape[:3])
    up, f = _checked_map(map_array, ref_shape, downsample, order)
    if f > 1:
        for axis, size in enumerate(ref_shape):
            up = _upsample_axis(up, axis, f, size, order)
    return _float32_image_like(up, ref)


def _checked_map(
    map_array: np.ndarray, ref_shape: tuple[int, ...], downsample: int, order: int
) -> tuple[np.ndarray, int]:
    """The map as a 3D float32 array and the integer factor, checked against the reference."""
    data = np.asarray(map_array, dtype=np.float32)
    if data.ndim == 4 and data.shape[0] == 1:
        data = data[0]
    if data.ndim != 3:
        raise DfrnInputError(f"an attention map must be 3D, got shape {data.shape}")
    f = int(downsample)
    if f < 1 or f != downsample:
        raise DfrnInputError(f"downsample must be a positive integer, got {downsample!r}")
    expected = tuple(-(-s // f) for s in ref_shape)
    if data.shape != expected:
        raise DfrnInputError(
            f"map shape {data.shape} does not match reference shape {ref_shape} downsampled "
            f"by {f} (expected {expected})"
        )
    if order not in (0, 1):
        raise DfrnInputError(f"order must be 0 (block repeat) or 1 (trilinear), got {order}")
    return data, f


def _float32_image_like(data: np.ndarray, ref: nib.spatialimages.SpatialImage) -> nib.Nifti1Image:
    """``data`` as a float32 NIfTI with the reference's affine (and NIfTI space codes, units)."""
    img = nib.Nifti1Image(np.ascontiguousarray(data, dtype=np.float32), np.asarray(ref.affine))
    hdr = getattr(ref, "header", None)
    if isinstance(hdr, nib.Nifti1Header):  # keep the reference's space codes (e.g. 4 = MNI)
        qcode, scode = int(hdr["qform_code"]), int(hdr["sform_code"])
        img.set_sform(ref.affine, code=scode if (scode or qcode) else 2)
        img.set_qform(ref.affine, code=qcode)
        img.header.set_xyzt_units(*hdr.get_xyzt_units())
    img.set_data_dtype(np.float32)
    return img


def _upsample_axis(data: np.ndarray, axis: int, f: int, size: int, order: int) -> np.ndarray:
    """Sample ``data`` along ``axis`` at training coordinates ``(j − (f − 1)/2) / f``."""
    n = data.shape[axis]
    j = np.arange(size)
    if order == 0:
        return np.take(data, j // f, axis=axis)
    c = np.clip((j - (f - 1) / 2.0) / f, 0.0, n - 1.0)
    lo = np.minimum(np.floor(c).astype(int), max(n - 2, 0))
    hi = np.minimum(lo + 1, n - 1)
    w = (c - lo).astype(np.float32)
    shape = [1, 1, 1]
    shape[axis] = size
    w = w.reshape(shape)
    return np.take(data, lo, axis=axis) * (1 - w) + np.take(data, hi, axis=axis) * w


# --------------------------------------------------------------------------------------
# Localisation of a planted effect
# --------------------------------------------------------------------------------------


def localisation_scores(
    abs_map: np.ndarray,
    truth_mask: np.ndarray,
    brain_mask: np.ndarray | None = None,
    top_fraction: float = 0.01,
) -> dict[str, float]:
    """How well |map| finds a known (planted) region.

    Parameters
    ----------
    abs_map : np.ndarray
        The map (its absolute value is used; non-finite voxels are left out).
    truth_mask : np.ndarray
        Boolean mask of the planted region, the shape of ``abs_map``.
    brain_mask : np.ndarray, optional
        Only these voxels are scored; all voxels by default.
    top_fraction : float, default 0.01
        Share of the voxels counted as the map's top voxels, in (0, 1].

    Returns
    -------
    dict
        ``roc_auc`` (ROC AUC of |map| as a score for voxels of ``truth_mask``),
        ``top_fraction_in_truth`` (fraction of the top ``top_fraction`` voxels by |map|, at
        least one voxel, that lie in the truth mask), ``chance_top_fraction`` (the truth
        mask's share of the voxels, the value expected by chance), ``n_voxels`` and
        ``n_truth``.

    Raises
    ------
    DfrnInputError
        For mismatched shapes, a bad ``top_fraction``, or a truth mask that covers none or
        all of the scored voxels.
    """
    from sklearn.metrics import roc_auc_score

    scores, truth = _scored_voxels(abs_map, truth_mask, brain_mask)
    if not 0 < top_fraction <= 1:
        raise DfrnInputError(f"top_fraction must be in (0, 1], got {top_fraction}")
    n_truth = int(truth.sum())
    if n_truth == 0 or n_truth == truth.size:
        raise DfrnInputError(
            f"the truth mask covers {n_truth} of {truth.size} voxels; it must cover some, not all"
        )
    k = max(1, int(np.ceil(top_fraction * scores.size)))
    top = np.argpartition(-scores, k - 1)[:k]
    return {
        "roc_auc": float(roc_auc_score(truth, scores)),
        "top_fraction_in_truth": float(truth[top].mean()),
        "chance_top_fraction": n_truth / truth.size,
        "n_voxels": int(truth.size),
        "n_truth": n_truth,
    }


def _scored_voxels(
    abs_map: np.ndarray, truth_mask: np.ndarray, brain_mask: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """|map| and truth at the finite voxels (within the brain mask, when given)."""
    a = np.abs(np.asarray(abs_map, dtype=np.float64))
    t = np.asarray(truth_mask).astype(bool)
    if a.shape != t.shape:
        raise DfrnInputError(f"map shape {a.shape} differs from truth mask shape {t.shape}")
    keep = np.isfinite(a)
    if brain_mask is not None:
        b = np.asarray(brain_mask).astype(bool)
        if b.shape != a.shape:
            raise DfrnInputError(f"brain mask shape {b.shape} differs from map shape {a.shape}")
        keep &= b
    return a[keep], t[keep]
