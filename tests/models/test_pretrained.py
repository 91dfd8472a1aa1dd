"""Pretrained starts: MedicalNet's checkpoint layout, plain state dicts, freezing, lr scale."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dfrn.errors import DfrnInputError
from dfrn.models.network import DFRN
from dfrn.models.pretrained import apply_init, frozen_names, param_groups, read_init
from dfrn.models.regressor import DFRNRegressor

monai_resnet = pytest.importorskip("monai.networks.nets.resnet")
WIDEN = 0.125


def _monai_resnet10(n_classes: int = 2) -> torch.nn.Module:
    """MONAI's ResNet-10 (MedicalNet's architecture family), with another output layer."""
    return monai_resnet.ResNet(
        widen_factor=WIDEN, block="basic", layers=[1, 1, 1, 1],
        block_inplanes=[64, 128, 256, 512], spatial_dims=3, n_input_channels=1,
        conv1_t_size=7, conv1_t_stride=(1, 2, 2), shortcut_type="B", bias_downsample=False,
        num_classes=n_classes,
    )


def _backbone(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The pooled features before the output layer."""
    feats: list[torch.Tensor] = []
    handle = net.avgpool.register_forward_hook(lambda m, i, o: feats.append(o.flatten(1)))
    net(x)
    handle.remove()
    return feats[0]


def test_a_medicalnet_layout_checkpoint_loads_and_gives_the_same_features(tmp_path: Path) -> None:
    """MONAI's ResNet-10 weights saved as MedicalNet saves them ({'state_dict': ...}, keys
    prefixed 'module.'): the backbone loads; the output layer (another task's) does not."""
    torch.manual_seed(0)
    ref = _monai_resnet10().eval()
    for m in ref.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "resnet_10.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()},
                "epoch": 3}, path)
    source = read_init(path)
    assert source.kind == "medicalnet"
    ours = DFRN(widen_factor=WIDEN)
    fc_before = ours.fc.weight.detach().clone()
    report = apply_init(ours, source)
    n = len(ours.state_dict())
    assert (report.loaded, report.total, report.reinitialised) == (n - 2, n, ("fc",))
    assert report.line(source) == (f"init: loaded {n - 2} of {n} tensors from MedicalNet "
                                   f"checkpoint {path}; re-initialised fc")
    assert torch.equal(ours.fc.weight, fc_before)  # random, not MONAI's 2-class layer
    x = torch.randn(2, 1, 20, 24, 20)
    with torch.no_grad():
        torch.testing.assert_close(_backbone(ours.eval(), x), _backbone(ref, x), rtol=0,
                                   atol=1e-6)


def test_another_architecture_is_one_line_naming_the_first_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "wide.pt"
    torch.save(DFRN(widen_factor=0.25).state_dict(), path)
    with pytest.raises(DfrnInputError, match=r"^config \[model\] init .*wide\.pt: tensor "
                       r"conv1\.weight has shape \(16, 1, 7, 7, 7\) in the checkpoint but "
                       r"\(8, 1, 7, 7, 7\) in this network"):
        apply_init(DFRN(widen_factor=WIDEN), read_init(path))
    plain = tmp_path / "plain.pt"  # default strides: no projection in the first block
    torch.save(DFRN(widen_factor=WIDEN).state_dict(), plain)
    with pytest.raises(DfrnInputError, match=r"tensor layer1\.0\.downsample\.0\.weight is "
                       r"missing in the checkpoint but \(8, 8, 1, 1, 1\) in this network"):
        apply_init(DFRN(block_strides=(2, 2, 2, 2), widen_factor=WIDEN), read_init(plain))
    with pytest.raises(DfrnInputError, match=r"^config \[model\] init: file not found: "):
        read_init(tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(DfrnInputError, match=r"junk\.pth: not a PyTorch checkpoint"):
        read_init(junk)


def test_a_plain_state_dict_keeps_its_output_layer(tmp_path: Path) -> None:
    torch.manual_seed(1)
    src = DFRN(widen_factor=WIDEN)
    path = tmp_path / "mine.safetensors"
    from safetensors.torch import save_file

    save_file(src.state_dict(), str(path))
    ours = DFRN(widen_factor=WIDEN)
    report = apply_init(ours, read_init(path))
    assert report.reinitialised == () and report.loaded == report.total
    for k, v in src.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k


def _volumes(n: int = 8) -> tuple[list[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(0)
    vols = [rng.standard_normal((16, 20, 16)).astype(np.float32) for _ in range(n)]
    y = np.array([v[4:8, 6:10, 4:8].mean() for v in vols]) + 0.1 * rng.standard_normal(n)
    return vols, y


def _fit(init: Path, freeze: str, **over) -> tuple[DFRNRegressor, dict[str, torch.Tensor]]:
    vols, y = _volumes()
    est = DFRNRegressor(widen_factor=WIDEN, epochs=1, val_fraction=0.0, batch_size=4,
                        device="cpu", init=str(init), freeze=freeze, **over)
    est.fit(vols, y)
    return est, {k: v.detach().clone() for k, v in est.model_.state_dict().items()}


def test_a_frozen_backbone_keeps_every_tensor_and_statistic(tmp_path: Path) -> None:
    """freeze = "backbone": after training (with BatchNorm statistics recomputed, the
    default), every backbone tensor, BN running statistics included, equals the init;
    freeze = "none" changes them; "stem" keeps conv1 and bn1 only."""
    torch.manual_seed(2)
    src = DFRN(widen_factor=WIDEN)
    path = tmp_path / "init.pt"
    torch.save(src.state_dict(), path)
    init = src.state_dict()
    _, frozen = _fit(path, "backbone")
    backbone = frozen_names(src, "backbone")
    assert "bn1.running_mean" in backbone and "fc.weight" not in backbone
    for k in backbone:
        assert torch.equal(frozen[k], init[k]), k
    assert not torch.equal(frozen["fc.weight"], init["fc.weight"])  # the head trained
    _, free = _fit(path, "none")
    assert not torch.equal(free["layer2.0.conv1.weight"], init["layer2.0.conv1.weight"])
    assert not torch.equal(free["bn1.running_mean"], init["bn1.running_mean"])
    _, stem = _fit(path, "stem")
    assert torch.equal(stem["conv1.weight"], init["conv1.weight"])
    assert torch.equal(stem["bn1.running_var"], init["bn1.running_var"])
    assert not torch.equal(stem["layer1.0.conv1.weight"], init["layer1.0.conv1.weight"])


def test_backbone_lr_scale_sets_the_backbones_learning_rate() -> None:
    net = DFRN(widen_factor=WIDEN)
    head, backbone = param_groups(net, 1e-3, 0.1)
    assert head["lr"] == 1e-3 and backbone["lr"] == pytest.approx(1e-4)
    assert {id(p) for p in head["params"]} == {id(net.fc.weight), id(net.fc.bias)}
    assert len(backbone["params"]) == len(list(net.parameters())) - 2
