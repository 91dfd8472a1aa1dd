"""Factor attention maps (FAM): input attributions of DFRN models, averaged over subjects.

Method (issue 4)
----------------
For subject *i* and factor *k* the attention map :math:`a_i^k` is the attribution of the
model's scalar output to the input volume. The default is guided backpropagation: through
each ReLU the relevance is :math:`R_l = (f_l > 0)\\,(R_{l+1} > 0)\\,R_{l+1}`. The factor map
is the mean over subjects (Eq. 4): :math:`\\mathrm{FAM}_k = \\frac1n\\sum_i a_i^k`.

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
but add in the absolute one. Region ranking (:func:`rank_regions`) and Figure 4
(:func:`plot_fam`) use the absolute map: they ask *where* the network looks, and the sign of a
guided-backprop attribution at the input mostly reflects local image contrast, not the
direction of the effect.

Known traps handled here
------------------------
* Guided backprop silently degrades to the plain gradient when ReLUs are not hooked (MONAI's
  ``GuidedBackpropGrad`` only hooks modules *named* ``relu``; any implementation misses
  functional ``F.relu`` calls). We use captum's ``GuidedBackprop``, which hooks every
  ``nn.ReLU`` module, and count the hooks that actually fire against the ReLU nodes of the
  autograd graph; a mismatch raises :class:`AttributionError`.
* Maps are written on the input's 1 mm grid with the input's affine
  (:func:`to_template_space`), never with an identity affine.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from captum.attr import GuidedBackprop, IntegratedGradients, NoiseTunnel, Saliency
from torch import nn

from dfrn.errors import DfrnError, DfrnInputError
from dfrn.io import atomic_write

__all__ = [
    "METHODS",
    "AttributionError",
    "FoldTask",
    "AttentionMaps",
    "attribution",
    "count_hooked_relus",
    "iter_subject_maps",
    "factor_attention_map",
    "to_template_space",
    "rank_regions",
    "localisation_scores",
    "plot_fam",
]

Method = Literal["guided_backprop", "gradient", "integrated_gradients", "smoothgrad"]
METHODS: tuple[str, ...] = ("guided_backprop", "gradient", "integrated_gradients", "smoothgrad")
Mode = Literal["oof", "all"]


class AttributionError(DfrnError, RuntimeError):
    """An attribution that would be silently wrong (e.g. guided backprop with unhooked ReLUs)."""


# --------------------------------------------------------------------------------------
# Attribution of one batch
# --------------------------------------------------------------------------------------


class _ColumnOutput(nn.Module):
    """Wrap a model with output ``(N,)`` so that it returns ``(N, 1)`` (captum ``target=0``).

    It also records the number of ReLU nodes in the autograd graph of the last output.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.relu_nodes = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if out.ndim == 2 and out.shape[1] == 1:
            out = out[:, 0]
        if out.ndim != 1 or out.shape[0] != x.shape[0]:
            raise DfrnInputError(
                f"the model must return one scalar per subject, shape ({x.shape[0]},); "
                f"got {tuple(out.shape)}"
            )
        self.relu_nodes = _count_relu_nodes(out)
        return out[:, None]


def _count_relu_nodes(out: torch.Tensor) -> int:
    """Number of ReLU backward nodes in the autograd graph that produced ``out``."""
    if out.grad_fn is None:
        return 0
    seen: set[int] = set()
    stack = [out.grad_fn]
    n = 0
    while stack:
        fn = stack.pop()
        if id(fn) in seen:
            continue
        seen.add(id(fn))
        if type(fn).__name__.startswith("ReluBackward"):
            n += 1
        stack.extend(nxt for nxt, _ in fn.next_functions if nxt is not None)
    return n


class _CountingGuidedBackprop(GuidedBackprop):
    """captum's ``GuidedBackprop`` that counts the ReLU backward hooks that fire."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.fired = 0

    def _backward_hook(self, module, grad_input, grad_output):  # type: ignore[no-untyped-def,override]
        self.fired += 1
        return super()._backward_hook(module, grad_input, grad_output)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _model_tensor_kwargs(model: nn.Module) -> dict[str, Any]:
    p = next(iter(model.parameters()), None)
    if p is None:
        return {}
    return {"device": p.device, "dtype": p.dtype}


def _rng_devices(device: torch.device) -> list[int]:
    if device.type == "cuda":
        return [device.index if device.index is not None else torch.cuda.current_device()]
    return []


def attribution(
    model: nn.Module,
    x: torch.Tensor,
    method: str = "guided_backprop",
    *,
    n_steps: int = 32,
    internal_batch_size: int | None = None,
    nt_samples: int = 16,
    noise_level: float = 0.15,
    seed: int | Sequence[int] = 0,
) -> torch.Tensor:
    """Attribution of the model's scalar output to each input voxel.

    Parameters
    ----------
    model:
        A regressor mapping ``(N, C, D, H, W)`` to ``(N,)`` (``(N, 1)`` is accepted). It is
        evaluated in eval mode; its previous train/eval mode is restored afterwards.
    x:
        Input batch ``(N, C, D, H, W)``. It is moved to the model's device and dtype.
    method:
        ``"guided_backprop"`` (captum ``GuidedBackprop``), ``"gradient"`` (the plain
        input gradient, captum ``Saliency(abs=False)``), ``"integrated_gradients"`` (captum,
        zero baseline, ``n_steps`` Gauss-Legendre steps) or ``"smoothgrad"`` (captum
        ``NoiseTunnel`` over the signed gradient, ``nt_samples`` noisy copies with standard
        deviation ``noise_level × (max − min)`` of each subject's volume).
    n_steps, internal_batch_size:
        Integrated gradients only.
    nt_samples, noise_level, seed:
        SmoothGrad only. ``seed`` is one integer (sample *j* of the batch uses ``seed + j``)
        or one seed per sample, so maps do not depend on how subjects are batched.

    Returns
    -------
    Tensor of the same shape as ``x`` (on the model's device, in the model's dtype), signed.
    Batch elements are independent (batch norm runs on its running statistics).
    """
    if method not in METHODS:
        raise DfrnInputError(f"unknown attribution method {method!r}; choose one of {METHODS}")
    if x.ndim != 5:
        raise DfrnInputError(
            f"attribution expects a batch of shape (N, C, D, H, W), got {tuple(x.shape)}"
        )
    kw = _model_tensor_kwargs(model)
    inp = x.detach().to(**kw).clone().requires_grad_(True)
    wrapped = _ColumnOutput(model)
    with _eval_mode(model), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*hooks on ReLU.*")
        warnings.filterwarnings("ignore", message=".*did not already require gradients.*")
        if method == "guided_backprop":
            gbp = _CountingGuidedBackprop(wrapped)
            out = gbp.attribute(inp, target=0)
            total = wrapped.relu_nodes
            if gbp.fired == 0 or gbp.fired < total:
                raise AttributionError(
                    f"guided backprop hooked {gbp.fired} of the model's {total} ReLU operations; "
                    "every ReLU must be its own nn.ReLU module (not F.relu / torch.relu), "
                    "otherwise the map silently degrades towards the plain gradient"
                )
        elif method == "gradient":
            out = Saliency(wrapped).attribute(inp, target=0, abs=False)
        elif method == "integrated_gradients":
            out = IntegratedGradients(wrapped).attribute(
                inp,
                baselines=torch.zeros_like(inp),
                target=0,
                n_steps=n_steps,
                internal_batch_size=internal_batch_size,
            )
        else:  # smoothgrad
            seeds = (
                [int(seed) + j for j in range(inp.shape[0])]
                if isinstance(seed, int)
                else [int(s) for s in seed]
            )
            if len(seeds) != inp.shape[0]:
                raise DfrnInputError(
                    f"smoothgrad got {len(seeds)} seeds for a batch of {inp.shape[0]}"
                )
            tunnel = NoiseTunnel(Saliency(wrapped))
            parts = []
            for j in range(inp.shape[0]):
                xj = inp[j : j + 1].detach().clone().requires_grad_(True)
                sd = float(noise_level * (xj.detach().max() - xj.detach().min()))
                with torch.random.fork_rng(devices=_rng_devices(xj.device)):
                    torch.manual_seed(seeds[j])
                    parts.append(
                        tunnel.attribute(
                            xj,
                            nt_type="smoothgrad",
                            nt_samples=nt_samples,
                            stdevs=sd if sd > 0 else 1e-6,
                            target=0,
                            abs=False,
                        )
                    )
            out = torch.cat(parts)
    return out.detach()


def count_hooked_relus(model: nn.Module, x: torch.Tensor | None = None) -> int:
    """Number of ReLU modules that guided backprop hooks.

    Without ``x``: the number of ``nn.ReLU`` modules in ``model.modules()`` (what captum
    hooks). With an example batch ``x``: the number of ReLU backward hooks that actually fire
    during one guided-backprop pass (a module called twice counts twice); an
    :class:`AttributionError` is raised if some ReLU operations of the graph were not hooked.
    """
    if x is None:
        return sum(isinstance(m, nn.ReLU) for m in model.modules())
    kw = _model_tensor_kwargs(model)
    inp = x.detach().to(**kw).clone().requires_grad_(True)
    wrapped = _ColumnOutput(model)
    gbp = _CountingGuidedBackprop(wrapped)
    with _eval_mode(model), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*hooks on ReLU.*")
        gbp.attribute(inp, target=0)
    if gbp.fired < wrapped.relu_nodes:
        raise AttributionError(
            f"only {gbp.fired} of {wrapped.relu_nodes} ReLU operations are hookable nn.ReLU modules"
        )
    return gbp.fired


# --------------------------------------------------------------------------------------
# Subject maps and Eq. 4 averaging
# --------------------------------------------------------------------------------------

ModelSource = nn.Module | Callable[[], nn.Module]
VolumeSource = Any  # array-like indexable by subject (N, [C,] D, H, W), or get_volume(i)


@dataclass(frozen=True)
class FoldTask:
    """One trained model and the subjects it did not see.

    ``model`` is an ``nn.Module`` or a zero-argument loader (called once, when the task is
    processed, so only one model is in memory at a time). ``test_indices`` index ``volumes``.
    ``repeat`` and ``fold`` are labels only.
    """

    model: ModelSource
    test_indices: Sequence[int]
    repeat: int = 0
    fold: int = 0


@dataclass
class AttentionMaps:
    """A factor attention map on the training grid.

    ``signed`` is Eq. 4 (mean over subjects of the per-subject map, itself the mean over the
    subject's out-of-fold models); ``absolute`` is the same average of ``|map|`` with the
    absolute value taken on each single-model map. Shapes are those of one volume.
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
    """Yield ``(task_index, subject_indices, maps)`` batch by batch.

    In ``"oof"`` mode each task's model attributes its own test subjects; in ``"all"`` mode
    every task's model attributes every subject that is a test subject of some task. ``maps``
    has shape ``(B, *volume_shape)`` (float32, signed). Models are loaded one at a time, moved
    to ``device`` (when given) and used in eval mode.
    """
    if batch_size < 1:
        raise DfrnInputError(f"batch_size must be positive, got {batch_size}")
    get, n_volumes = _volume_getter(volumes)
    ts, subjects, _ = _resolve(tasks, mode, n_volumes)
    for ti, task in enumerate(ts):
        model = task.model if isinstance(task.model, nn.Module) else task.model()
        if device is not None:
            model = model.to(device)
        idx = np.unique(np.asarray(task.test_indices, dtype=int)) if mode == "oof" else subjects
        for start in range(0, idx.size, batch_size):
            b = idx[start : start + batch_size]
            batch, squeeze = _load_batch(get, b)
            kw = dict(method_kwargs)
            if method == "smoothgrad":
                kw["seed"] = [seed + int(i) for i in b]
            a = attribution(model, torch.from_numpy(batch), method, **kw)
            maps = a.float().cpu().numpy()
            yield ti, b, (maps[:, 0] if squeeze else maps)
        del model


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
    tasks:
        One entry per trained (repeat, fold) model of the factor: a :class:`FoldTask` or a
        ``(model_or_loader, test_indices)`` tuple. ``test_indices`` index ``volumes``.
    volumes:
        The volumes the models were trained on (after normalisation and downsampling):
        an array-like indexable by subject (``np.ndarray`` ``(N, D, H, W)``, a list, a
        ``VolumeSet``) or a callable ``get_volume(i)``. Each volume is ``(D, H, W)`` or
        ``(C, D, H, W)``.
    method, method_kwargs:
        See :func:`attribution`.
    mode:
        ``"oof"`` (default): subject *i*'s map comes from the models of the folds where *i* was
        a test subject, averaged over repeats. ``"all"``: the mean over every model.

    Returns
    -------
    :class:`AttentionMaps`: the signed map (Eq. 4) and the mean absolute map. Every subject
    that is a test subject of some task has weight ``1 / n_subjects``; within a subject each
    contributing model has weight ``1 / (number of its models)``.
    """
    get, n_volumes = _volume_getter(volumes)
    _, subjects, counts = _resolve(tasks, mode, n_volumes)
    n_subjects = int(subjects.size)
    signed: np.ndarray | None = None
    absolute: np.ndarray | None = None
    n_maps = 0
    for _, idx, maps in iter_subject_maps(
        tasks,
        get,
        method,
        mode=mode,
        batch_size=batch_size,
        device=device,
        seed=seed,
        **method_kwargs,
    ):
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
    return AttentionMaps(
        signed=signed.astype(np.float32),
        absolute=absolute.astype(np.float32),
        n_subjects=n_subjects,
        n_maps=n_maps,
        method=method,
        mode=mode,
    )


# --------------------------------------------------------------------------------------
# Template space
# --------------------------------------------------------------------------------------


def _as_img(img: nib.spatialimages.SpatialImage | str | Path, what: str) -> Any:
    if isinstance(img, str | Path):
        try:
            return nib.load(str(img))
        except Exception as exc:
            raise DfrnInputError(f"cannot read {what} {img}: {exc}") from exc
    return img


def to_template_space(
    map_array: np.ndarray,
    reference_img: nib.spatialimages.SpatialImage | str | Path,
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
    padding is cropped. The image carries the reference's affine (and its qform/sform codes),
    float32.
    """
    ref = _as_img(reference_img, "reference image")
    ref_shape = tuple(int(s) for s in ref.shape[:3])
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
    up = data
    if f > 1:
        for axis, size in enumerate(ref_shape):
            up = _upsample_axis(up, axis, f, size, order)
    img = nib.Nifti1Image(np.ascontiguousarray(up, dtype=np.float32), np.asarray(ref.affine))
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
# Atlas regions
# --------------------------------------------------------------------------------------


def _label_names(labels: pd.DataFrame | Mapping[int, str] | pd.Series) -> dict[int, str]:
    if isinstance(labels, pd.DataFrame):
        if "name" not in labels.columns:
            raise DfrnInputError("the atlas label table needs a 'name' column")
        keys = labels["index"] if "index" in labels.columns else labels.index
        return {int(k): str(v) for k, v in zip(keys, labels["name"], strict=True)}
    return {int(k): str(v) for k, v in dict(labels).items()}


def rank_regions(
    map_img: nib.spatialimages.SpatialImage | str | Path,
    atlas_img: nib.spatialimages.SpatialImage | str | Path,
    labels: pd.DataFrame | Mapping[int, str],
    factor: str,
) -> pd.DataFrame:
    """Rank atlas regions by mean |attention| (highest first).

    ``labels`` maps integer atlas values to region names: a table with a ``name`` column
    indexed by the label value (or with an ``index`` column), or a mapping. Label 0 is
    background and is never ranked; labels absent from the table or with no voxel are
    skipped. The absolute map is resampled (trilinear) onto the atlas grid when their grids
    differ (linear, so it stays non-negative); non-finite
    voxels are ignored.

    Returns columns ``factor, rank, region, label, mean_attention, n_voxels``.
    """
    from nilearn.image import resample_to_img

    mimg = _as_img(map_img, "attention map")
    aimg = _as_img(atlas_img, "atlas")
    atlas = np.asarray(aimg.dataobj)
    if atlas.ndim == 4 and atlas.shape[3] == 1:
        atlas = atlas[..., 0]
    if atlas.ndim != 3:
        raise DfrnInputError(f"the atlas must be a 3D label image, got shape {atlas.shape}")
    if not np.allclose(atlas, np.round(atlas)):
        raise DfrnInputError("the atlas must hold integer labels (a probabilistic atlas was given)")
    atlas = np.round(atlas).astype(np.int64)
    abs_map = np.abs(np.asarray(mimg.dataobj, dtype=np.float64))
    if abs_map.ndim == 4 and abs_map.shape[3] == 1:
        abs_map = abs_map[..., 0]
    if abs_map.ndim != 3:
        raise DfrnInputError(f"the attention map must be 3D, got shape {abs_map.shape}")
    same_grid = abs_map.shape == atlas.shape and np.allclose(mimg.affine, aimg.affine, atol=1e-3)
    if not same_grid:
        src = nib.Nifti1Image(abs_map.astype(np.float32), mimg.affine)
        tgt = nib.Nifti1Image(np.zeros(atlas.shape, np.int16), aimg.affine)
        abs_map = np.asarray(
            resample_to_img(
                src, tgt, interpolation="linear", force_resample=True, copy_header=True
            ).dataobj,
            dtype=np.float64,
        )
    names = _label_names(labels)
    ok = np.isfinite(abs_map) & (atlas > 0)
    lab = atlas[ok]
    n_lab = int(lab.max()) + 1 if lab.size else 1
    sums = np.bincount(lab, weights=abs_map[ok], minlength=n_lab)
    counts = np.bincount(lab, minlength=n_lab)
    rows = [
        {
            "region": names[k],
            "label": k,
            "mean_attention": sums[k] / counts[k],
            "n_voxels": int(counts[k]),
        }
        for k in sorted(names)
        if 0 < k < n_lab and counts[k] > 0
    ]
    df = pd.DataFrame(rows, columns=["region", "label", "mean_attention", "n_voxels"])
    df = df.sort_values(["mean_attention", "label"], ascending=[False, True], kind="stable")
    df.insert(0, "rank", np.arange(1, len(df) + 1))
    df.insert(0, "factor", factor)
    return df.reset_index(drop=True)


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

    Returns ``roc_auc`` (ROC AUC of |map| as a score for voxels of ``truth_mask``, over voxels
    of ``brain_mask`` when given, else all voxels), ``top_fraction_in_truth`` (fraction of the
    top ``top_fraction`` voxels by |map|, at least one voxel, that lie in the truth mask),
    ``chance_top_fraction`` (the truth mask's share of the voxels, the value expected by
    chance), ``n_voxels`` and ``n_truth``.
    """
    from sklearn.metrics import roc_auc_score

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
    if not 0 < top_fraction <= 1:
        raise DfrnInputError(f"top_fraction must be in (0, 1], got {top_fraction}")
    scores, truth = a[keep], t[keep]
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


# --------------------------------------------------------------------------------------
# Figure 4
# --------------------------------------------------------------------------------------


def plot_fam(
    maps: Mapping[str, nib.spatialimages.SpatialImage | str | Path],
    template_img: nib.spatialimages.SpatialImage | str | Path,
    path: str | Path,
    *,
    threshold_percentile: float = 90.0,
    display_mode: str = "z",
    n_cuts: int = 7,
    dpi: int = 150,
) -> Path:
    """Figure 4: the template with one attention overlay per factor (one row each).

    Pass the **absolute** maps (:attr:`AttentionMaps.absolute` through
    :func:`to_template_space`): the figure shows where each factor's networks attend. Each
    overlay is thresholded at ``threshold_percentile`` of its non-zero |values|; all-nonnegative
    maps use a sequential colour map, signed maps a symmetric one.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from nilearn import plotting

    if not maps:
        raise DfrnInputError("plot_fam needs at least one factor map")
    template = _as_img(template_img, "template")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    n = len(maps)
    fig = plt.figure(figsize=(14, 2.6 * n), facecolor="black")
    try:
        for row, (factor, img) in enumerate(maps.items()):
            im = _as_img(img, f"attention map of {factor}")
            data = np.asarray(im.dataobj, dtype=np.float64)
            vals = np.abs(data[np.isfinite(data) & (data != 0)])
            thr = float(np.percentile(vals, threshold_percentile)) if vals.size else 0.0
            vmax = float(vals.max()) if vals.size else 1.0
            signed = bool(np.nanmin(data) < 0) if data.size else False
            ax = fig.add_axes((0.0, 1.0 - (row + 1) / n, 1.0, 1.0 / n))
            plotting.plot_stat_map(
                im,
                bg_img=template,
                display_mode=display_mode,
                cut_coords=n_cuts if display_mode in ("x", "y", "z") else None,
                axes=ax,
                figure=fig,
                title=str(factor),
                threshold=thr,
                vmax=vmax,
                cmap="cold_hot" if signed else "hot",
                symmetric_cbar=signed,
                colorbar=True,
                annotate=True,
                draw_cross=False,
                black_bg=True,
            )
        atomic_write(
            out, lambda p: fig.savefig(p, dpi=dpi, facecolor=fig.get_facecolor(), format="png")
        )
    finally:
        plt.close(fig)
    return out
