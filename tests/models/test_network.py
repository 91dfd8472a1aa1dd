"""The DFRN network against MONAI's reference ResNet."""

from __future__ import annotations

import pytest
import torch

from dfrn.models.network import DFRN, count_parameters

monai_resnet = pytest.importorskip("monai.networks.nets.resnet")


def _monai_reference(widen_factor: float = 1.0) -> torch.nn.Module:
    return monai_resnet.ResNet(
        widen_factor=widen_factor,
        block="basic",
        layers=[1, 1, 1, 1],
        block_inplanes=[64, 128, 256, 512],
        spatial_dims=3,
        n_input_channels=1,
        conv1_t_size=7,
        conv1_t_stride=(1, 2, 2),
        shortcut_type="B",
        bias_downsample=False,
        num_classes=1,
    )


def test_parameter_count_matches_monai() -> None:
    ref = _monai_reference()
    ours = DFRN()
    assert count_parameters(ours) == 14_356_033
    assert count_parameters(ref) == count_parameters(ours)
    assert set(ref.state_dict()) == set(ours.state_dict())


@pytest.mark.parametrize(("train", "widen"), [(True, 1.0), (False, 1.0), (True, 0.125)])
def test_outputs_match_monai_after_weight_copy(train: bool, widen: float) -> None:
    torch.manual_seed(0)
    ref = _monai_reference(widen).double()
    ours = DFRN(widen_factor=widen).double()
    assert count_parameters(ours) == count_parameters(ref)
    assert ours.conv1.out_channels == int(64 * widen) and ours.fc.in_features == int(512 * widen)
    ours.load_state_dict(ref.state_dict())
    ref.train(train)
    ours.train(train)
    x = torch.randn(2, 1, 20, 24, 20, dtype=torch.float64)
    y_ref = ref(x.clone()).squeeze(1)
    y_ours = ours(x.clone())
    assert y_ours.shape == (2,)
    torch.testing.assert_close(y_ours, y_ref, rtol=1e-10, atol=1e-10)
    if train:  # running statistics were updated identically
        torch.testing.assert_close(ours.bn1.running_mean, ref.bn1.running_mean)


def test_widen_factor_below_one_channel_is_refused() -> None:
    from dfrn.errors import DfrnInputError

    with pytest.raises(DfrnInputError, match="widen_factor must be at least 1/64"):
        DFRN(widen_factor=0.01)


def test_block_strides_literal_reading_keeps_resolution() -> None:
    strided = DFRN()
    literal = DFRN(block_strides=(1, 1, 1, 1))
    assert count_parameters(literal) == count_parameters(strided)
    x = torch.zeros(1, 1, 16, 16, 16)
    feats: dict[str, torch.Size] = {}

    def keep(name: str):
        def hook(module, inputs, output) -> None:
            feats[name] = output.shape

        return hook

    literal.layer4.register_forward_hook(keep("lit"))
    strided.layer4.register_forward_hook(keep("std"))
    literal.eval()(x)
    strided.eval()(x)
    assert feats["lit"][2:] == (8, 4, 4)
    assert feats["std"][2:] == (1, 1, 1)


def test_bad_block_strides() -> None:
    with pytest.raises(ValueError, match="block_strides"):
        DFRN(block_strides=(1, 2))
