"""Attribution of a model's output to its input voxels (captum), with the ReLU-hook guard.

Methods
-------
``guided_backprop`` (the default of the attention stage): through each ReLU the relevance
is :math:`R_l = (f_l > 0)\\,(R_{l+1} > 0)\\,R_{l+1}` (captum ``GuidedBackprop``).
``gradient``: the plain input gradient (captum ``Saliency(abs=False)``).
``integrated_gradients``: captum, zero baseline. ``smoothgrad``: captum ``NoiseTunnel`` over
the signed gradient, seeded per subject so maps do not depend on batching.

The guard
---------
Guided backprop silently degrades to the plain gradient when ReLUs are not hooked (MONAI's
``GuidedBackpropGrad`` only hooks modules *named* ``relu``; any implementation misses
functional ``F.relu`` calls). captum's ``GuidedBackprop`` hooks every ``nn.ReLU`` module;
we count the hooks that actually fire against the ReLU nodes of the autograd graph, and a
mismatch raises :class:`AttributionError` (see also :func:`count_hooked_relus`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from captum.attr import GuidedBackprop, IntegratedGradients, NoiseTunnel, Saliency
from torch import nn

from dfrn.errors import DfrnError, DfrnInputError

__all__ = [
    "METHODS",
    "Method",
    "AttributionError",
    "attribution",
    "count_hooked_relus",
]

Method = Literal["guided_backprop", "gradient", "integrated_gradients", "smoothgrad"]
METHODS: tuple[str, ...] = ("guided_backprop", "gradient", "integrated_gradients", "smoothgrad")
"""The attribution methods of :func:`attribution`."""


class AttributionError(DfrnError, RuntimeError):
    """An attribution that would be silently wrong (e.g. guided backprop with unhooked ReLUs)."""



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


@dataclass(frozen=True)
class _Options:
    """The method-specific settings of :func:`attribution`."""

    n_steps: int
    internal_batch_size: int | None
    nt_samples: int
    noise_level: float
    seed: int | Sequence[int]


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
    model : nn.Module
        A regressor mapping ``(N, C, D, H, W)`` to ``(N,)`` (``(N, 1)`` is accepted). It is
        evaluated in eval mode; its previous train/eval mode is restored afterwards.
    x : torch.Tensor
        Input batch ``(N, C, D, H, W)``. It is moved to the model's device and dtype.
    method : {"guided_backprop", "gradient", "integrated_gradients", "smoothgrad"}
        ``"guided_backprop"`` (captum ``GuidedBackprop``), ``"gradient"`` (the plain
        input gradient, captum ``Saliency(abs=False)``), ``"integrated_gradients"`` (captum,
        zero baseline, ``n_steps`` Gauss-Legendre steps) or ``"smoothgrad"`` (captum
        ``NoiseTunnel`` over the signed gradient, ``nt_samples`` noisy copies with standard
        deviation ``noise_level × (max − min)`` of each subject's volume).
    n_steps : int, default 32
        Integrated gradients only: number of steps.
    internal_batch_size : int, optional
        Integrated gradients only: captum's internal batch size.
    nt_samples : int, default 16
        SmoothGrad only: number of noisy copies.
    noise_level : float, default 0.15
        SmoothGrad only: noise SD as a fraction of each volume's range.
    seed : int or sequence of int, default 0
        SmoothGrad only. ``seed`` is one integer (sample *j* of the batch uses ``seed + j``)
        or one seed per sample, so maps do not depend on how subjects are batched.

    Returns
    -------
    torch.Tensor
        Same shape as ``x`` (on the model's device, in the model's dtype), signed. Batch
        elements are independent (batch norm runs on its running statistics).

    Raises
    ------
    AttributionError
        For guided backprop when some ReLU operation of the graph is not a hooked
        ``nn.ReLU`` module (the map would silently degrade towards the plain gradient).
    DfrnInputError
        For an unknown method, a batch that is not 5D, or a model output that is not one
        scalar per subject.
    """
    _check_method_and_batch(method, x)
    opts = _Options(n_steps, internal_batch_size, nt_samples, noise_level, seed)
    inp = x.detach().to(**_model_tensor_kwargs(model)).clone().requires_grad_(True)
    wrapped = _ColumnOutput(model)
    with _eval_mode(model), _quiet_captum():
        out = _ATTRIBUTE[method](wrapped, inp, opts)
    return out.detach()


def _check_method_and_batch(method: str, x: torch.Tensor) -> None:
    """Refuse an unknown method or a batch that is not 5D."""
    if method not in METHODS:
        raise DfrnInputError(f"unknown attribution method {method!r}; choose one of {METHODS}")
    if x.ndim != 5:
        raise DfrnInputError(
            f"attribution expects a batch of shape (N, C, D, H, W), got {tuple(x.shape)}"
        )


@contextlib.contextmanager
def _quiet_captum() -> Iterator[None]:
    """Silence captum's warnings about ReLU hooks and inputs that did not require gradients."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*hooks on ReLU.*")
        warnings.filterwarnings("ignore", message=".*did not already require gradients.*")
        yield


def _guided_backprop(wrapped: _ColumnOutput, inp: torch.Tensor, opts: _Options) -> torch.Tensor:
    """captum ``GuidedBackprop``, refused when some ReLU operation was not hooked."""
    gbp = _CountingGuidedBackprop(wrapped)
    out = gbp.attribute(inp, target=0)
    total = wrapped.relu_nodes
    if gbp.fired == 0 or gbp.fired < total:
        raise AttributionError(
            f"guided backprop hooked {gbp.fired} of the model's {total} ReLU operations; "
            "every ReLU must be its own nn.ReLU module (not F.relu / torch.relu), "
            "otherwise the map silently degrades towards the plain gradient"
        )
    return out


def _gradient(wrapped: _ColumnOutput, inp: torch.Tensor, opts: _Options) -> torch.Tensor:
    """The signed input gradient (captum ``Saliency(abs=False)``)."""
    return Saliency(wrapped).attribute(inp, target=0, abs=False)


def _integrated_gradients(
    wrapped: _ColumnOutput, inp: torch.Tensor, opts: _Options
) -> torch.Tensor:
    """captum ``IntegratedGradients`` from a zero baseline."""
    return IntegratedGradients(wrapped).attribute(
        inp,
        baselines=torch.zeros_like(inp),
        target=0,
        n_steps=opts.n_steps,
        internal_batch_size=opts.internal_batch_size,
    )


def _smoothgrad_seeds(seed: int | Sequence[int], n: int) -> list[int]:
    """One seed per sample: ``seed + j`` for one integer, else the given seeds."""
    seeds = [int(seed) + j for j in range(n)] if isinstance(seed, int) else [int(s) for s in seed]
    if len(seeds) != n:
        raise DfrnInputError(f"smoothgrad got {len(seeds)} seeds for a batch of {n}")
    return seeds


def _smoothgrad(wrapped: _ColumnOutput, inp: torch.Tensor, opts: _Options) -> torch.Tensor:
    """captum ``NoiseTunnel`` over the signed gradient, each sample with its own seed."""
    seeds = _smoothgrad_seeds(opts.seed, inp.shape[0])
    tunnel = NoiseTunnel(Saliency(wrapped))
    parts = []
    for j in range(inp.shape[0]):
        xj = inp[j : j + 1].detach().clone().requires_grad_(True)
        sd = float(opts.noise_level * (xj.detach().max() - xj.detach().min()))
        with torch.random.fork_rng(devices=_rng_devices(xj.device)):
            torch.manual_seed(seeds[j])
            parts.append(
                tunnel.attribute(
                    xj,
                    nt_type="smoothgrad",
                    nt_samples=opts.nt_samples,
                    stdevs=sd if sd > 0 else 1e-6,
                    target=0,
                    abs=False,
                )
            )
    return torch.cat(parts)


_ATTRIBUTE: dict[str, Callable[[_ColumnOutput, torch.Tensor, _Options], torch.Tensor]] = {
    "guided_backprop": _guided_backprop,
    "gradient": _gradient,
    "integrated_gradients": _integrated_gradients,
    "smoothgrad": _smoothgrad,
}


def count_hooked_relus(model: nn.Module, x: torch.Tensor | None = None) -> int:
    """Number of ReLU modules that guided backprop hooks.

    Parameters
    ----------
    model : nn.Module
        The regressor.
    x : torch.Tensor, optional
        An example batch ``(N, C, D, H, W)``.

    Returns
    -------
    int
        Without ``x``: the number of ``nn.ReLU`` modules in ``model.modules()`` (what captum
        hooks). With ``x``: the number of ReLU backward hooks that actually fire during one
        guided-backprop pass (a module called twice counts twice).

    Raises
    ------
    AttributionError
        With ``x``, when some ReLU operations of the graph were not hooked.
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
