"""Attribution methods: captum parity with an independent guided ReLU, the ReLU-hook guard."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from dfrn.errors import DfrnInputError
from dfrn.interpret.attribution import (
    METHODS,
    AttributionError,
    attribution,
    count_hooked_relus,
)
from dfrn.models.network import DFRN


class _GuidedReluFn(torch.autograd.Function):
    """ReLU whose backward is R_l = (f_l > 0)·(R_{l+1} > 0)·R_{l+1}."""

    @staticmethod
    def forward(ctx, f: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(f)
        return f.clamp(min=0)

    @staticmethod
    def backward(ctx, r: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (f,) = ctx.saved_tensors
        return (f > 0).to(r.dtype) * (r > 0).to(r.dtype) * r


class _GuidedRelu(nn.Module):
    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return _GuidedReluFn.apply(f)


def _manual_guided_backprop(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    guided = copy.deepcopy(model).eval()
    for mod in list(guided.modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(mod, child_name, _GuidedRelu())
    assert not any(isinstance(m, nn.ReLU) for m in guided.modules())
    inp = x.clone().requires_grad_(True)
    guided(inp).sum().backward()
    return inp.grad


@pytest.fixture(scope="module")
def dfrn64() -> dict[str, object]:
    torch.manual_seed(0)
    model = DFRN().double().eval()
    x = torch.randn(1, 1, 8, 9, 8, dtype=torch.float64)
    return {"model": model, "x": x, "gbp": attribution(model, x, "guided_backprop")}


def test_guided_backprop_matches_independent_guided_relu(dfrn64) -> None:
    model, x, ours = dfrn64["model"], dfrn64["x"], dfrn64["gbp"]
    manual = _manual_guided_backprop(model, x)
    assert ours.shape == x.shape
    assert manual.abs().max() > 0
    torch.testing.assert_close(ours, manual, rtol=1e-9, atol=1e-12)


def test_guided_backprop_differs_from_plain_gradient(dfrn64) -> None:
    model, x, gbp = dfrn64["model"], dfrn64["x"], dfrn64["gbp"]
    grad = attribution(model, x, "gradient")
    plain = x.clone().requires_grad_(True)
    model(plain).sum().backward()
    torch.testing.assert_close(grad, plain.grad, rtol=1e-9, atol=1e-12)
    rel = (gbp - grad).norm() / grad.norm()
    assert rel > 0.5


def test_hooked_relus_counted_and_fired(dfrn64) -> None:
    model, x = dfrn64["model"], dfrn64["x"]
    assert count_hooked_relus(model) == 9  # stem + 2 per residual block
    assert count_hooked_relus(model, x) == 9  # hooks that actually fired in a backward pass


class _FunctionalRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.relu(self.conv(x)) - 0.1)  # second ReLU is not a module
        return h.mean((1, 2, 3, 4))


def test_unhooked_relu_is_an_error_not_a_silent_gradient() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 1, 5, 5, 5)
    with pytest.raises(AttributionError, match="1 of the model's 2 ReLU"):
        attribution(_FunctionalRelu(), x, "guided_backprop")
    with pytest.raises(AttributionError):
        count_hooked_relus(_FunctionalRelu(), x)


class _Quadratic(nn.Module):
    """f(x) = ½ Σ w·x² per subject; its input gradient is w·x."""

    def __init__(self, w: np.ndarray) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.as_tensor(w, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.w * x[:, 0] ** 2).sum((1, 2, 3))


@pytest.mark.parametrize("method", [m for m in METHODS if m != "guided_backprop"])
def test_other_methods_on_a_known_gradient(method: str) -> None:
    torch.manual_seed(1)
    model = _Quadratic(np.random.default_rng(0).normal(size=(3, 4, 5)))
    model.train()
    x = torch.randn(2, 1, 3, 4, 5)
    a = attribution(model, x, method, n_steps=16, nt_samples=4)
    assert a.shape == x.shape and torch.isfinite(a).all()
    assert model.training  # eval during attribution, mode restored
    exact = model.w.detach() * x[:, 0]  # the input gradient
    if method == "gradient":
        torch.testing.assert_close(a[:, 0], exact)
    elif method == "integrated_gradients":  # x · ∫ w·(αx) dα = ½ w·x²
        torch.testing.assert_close(a[:, 0], 0.5 * exact * x[:, 0], rtol=1e-4, atol=1e-5)
    else:  # smoothgrad: same seed, same map, whatever the batch
        assert not torch.allclose(a[:, 0], exact)
        again = attribution(model, x[1:], method, nt_samples=4, seed=[1])
        torch.testing.assert_close(a[1:], again)


def test_guided_backprop_without_relus_is_rejected() -> None:
    model = _Quadratic(np.ones((3, 4, 5)))
    with pytest.raises(AttributionError, match="hooked 0"):
        attribution(model, torch.randn(1, 1, 3, 4, 5), "guided_backprop")


def test_bad_method_and_shape_are_input_errors() -> None:
    model = _Quadratic(np.ones((3, 4, 5)))
    with pytest.raises(DfrnInputError, match="unknown attribution method"):
        attribution(model, torch.randn(1, 1, 3, 4, 5), "lrp")
    with pytest.raises(DfrnInputError, match="N, C, D, H, W"):
        attribution(model, torch.randn(3, 4, 5), "gradient")
