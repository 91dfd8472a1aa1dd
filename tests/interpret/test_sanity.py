"""Cascading model-randomisation sanity check and 3D SSIM."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dfrn.errors import DfrnInputError
from dfrn.interpret.sanity import DFRN_CASCADE, cascading_randomization, ssim3d
from dfrn.models.network import DFRN
from dfrn.plotting import plot_sanity


@pytest.fixture(scope="module")
def fitted_dfrn() -> tuple[nn.Module, torch.Tensor]:
    """A DFRN whose read-out is fitted (ridge, closed form) to a planted signal.

    Full training is too slow for a unit test on a shared CPU; a fitted ``fc`` makes the
    trained model differ from a randomised one where the cascade starts.
    """
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    n = 32
    x = torch.randn(n, 1, 16, 16, 16, generator=g)
    y = torch.randn(n, generator=g)
    x[:, 0, 9:15, 2:8, 9:15] += y[:, None, None, None]
    model = DFRN().eval()
    feats: list[torch.Tensor] = []
    hook = model.avgpool.register_forward_hook(lambda m, i, o: feats.append(o.flatten(1)))
    with torch.no_grad():
        model(x)
    hook.remove()
    f = feats[0].double()
    mu, sd = f.mean(0), f.std(0) + 1e-8
    z = (f - mu) / sd
    wz = torch.linalg.solve(
        z.T @ z + n * torch.eye(z.shape[1], dtype=z.dtype), z.T @ (y - y.mean()).double()
    )
    with torch.no_grad():
        model.fc.weight.copy_((wz / sd)[None].float())
        model.fc.bias.fill_(float(y.mean() - (mu * wz / sd).sum()))
        pred = model(x)
    assert np.corrcoef(pred.numpy(), y.numpy())[0, 1] > 0.5
    return model, x[:1]


def test_cascading_randomization_gradient_fails_less_than_guided_backprop(
    fitted_dfrn, tmp_path
) -> None:
    model, x = fitted_dfrn
    before = {k: v.clone() for k, v in model.state_dict().items()}
    df = cascading_randomization(model, x, ["gradient", "guided_backprop"], seed=0)
    for k, v in model.state_dict().items():  # the trained model is untouched
        assert torch.equal(v, before[k])
    steps = ["trained"] + [s for s, _ in DFRN_CASCADE]
    assert list(df.columns) == ["method", "step", "spearman", "ssim"]
    assert df["step"].tolist() == steps * 2
    by = df.set_index(["method", "step"])
    assert by.loc[("gradient", "trained"), "spearman"] == 1.0
    # the plain gradient depends on the learned read-out; guided backprop barely does
    assert by.loc[("gradient", "fc"), "spearman"] < 0.7
    assert by.loc[("guided_backprop", "fc"), "spearman"] > 0.8
    assert (
        by.loc[("gradient", "fc"), "spearman"] < by.loc[("guided_backprop", "fc"), "spearman"] - 0.2
    )
    assert by.loc[("gradient", "conv1"), "spearman"] < 0.9
    assert df["ssim"].between(-1, 1).all()
    out = plot_sanity(df, tmp_path / "sanity.png")
    assert out.exists() and out.stat().st_size > 1000


def test_ssim3d_identity_and_contrast() -> None:
    a = np.random.default_rng(0).random((14, 14, 14))
    assert ssim3d(a, a) == pytest.approx(1.0)
    assert ssim3d(a, 1 - a) < 0
    with pytest.raises(DfrnInputError):
        ssim3d(a, a[:-1])
