"""The DFRN network: a 3D ResNet-10 style regressor with one scalar output.

Architecture (DEVELOPERS.md, the method's paper):

* stem: ``Conv3d(1, 64, 7, stride=(1, 2, 2), padding=3, bias=False)`` + BN + ReLU, then
  ``MaxPool3d(3, stride=2, padding=1)``;
* four residual basic blocks with 64, 128, 256 and 512 channels; each is
  conv3³ + BN + ReLU, conv3³ + BN, the skip sum (a 1³ conv + BN projection where the shape
  changes, "shortcut B"), then ReLU;
* global average pooling and one linear output.

``block_strides`` sets the stride of the first conv of each block. ``widen_factor`` scales
every layer's channels as MONAI's ``ResNet(widen_factor=...)`` does (``int(64 * f)`` …);
1.0 is the paper's network, a small factor a narrow one for quick checks and small cohorts.

* ``(1, 2, 2, 2)`` (default) is the standard 3D ResNet-10 of Hara et al., whose stem the
  paper uses exactly. At 182×218×182 a forward pass costs about 0.13 TMAC.
* ``(1, 1, 1, 1)`` is the literal reading of the paper's text (stride 1 in every block).
  It costs about 26× the compute (3.34 TMAC per forward) and about 20 GiB of saved
  activations at batch size 4, more than the 12 GB GPU the paper reports.

Parameter names match MONAI's ``ResNet`` (``conv1``, ``bn1``, ``layer1.0.conv1`` …, ``fc``),
so a MONAI state dict loads directly; ``tests/test_model.py`` checks exact parity. Each ReLU
is its own non-inplace ``nn.ReLU`` module, so hook-based attribution (guided backprop) sees
every one of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dfrn.config import ModelConfig
from dfrn.errors import DfrnInputError

__all__ = ["DFRN", "BasicBlock", "block_channels", "count_parameters", "DEFAULT_BLOCK_STRIDES", "PAPER_LITERAL_STRIDES"]

DEFAULT_BLOCK_STRIDES: tuple[int, ...] = tuple(ModelConfig().block_strides)  # one default
PAPER_LITERAL_STRIDES: tuple[int, int, int, int] = (1, 1, 1, 1)
BLOCK_CHANNELS: tuple[int, int, int, int] = (64, 128, 256, 512)


def block_channels(widen_factor: float = 1.0) -> tuple[int, ...]:
    """The four blocks' channel counts, ``int(c * widen_factor)`` as in MONAI's ``ResNet``."""
    channels = tuple(int(c * widen_factor) for c in BLOCK_CHANNELS)
    if not widen_factor > 0 or channels[0] < 1:
        raise DfrnInputError(
            f"widen_factor must be at least 1/64 (one channel in the first block), got {widen_factor!r}"
        )
    return channels


class BasicBlock(nn.Module):
    """Residual basic block: conv3³-BN-ReLU-conv3³-BN, skip sum, ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv3d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv3d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm3d(planes),
            )
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu2(out + residual)


class DFRN(nn.Module):
    """Deep Factor Regression Network for one symptom factor.

    Parameters
    ----------
    block_strides:
        Stride of each of the four residual blocks; see the module docstring.
    in_channels:
        Number of input channels (1 for a T1 scan).
    n_outputs:
        Outputs of the last linear layer: 1 (one network per factor, the paper's choice) or
        one per factor (``[model] heads = "joint"``, the paper's ablation).
    widen_factor:
        Multiplies every layer's channel count, as in MONAI's ``ResNet`` (1.0: 64 … 512).

    Input is ``(N, in_channels, D, H, W)``; output is ``(N,)`` for one output, else
    ``(N, n_outputs)``.
    """

    def __init__(
        self,
        block_strides: Sequence[int] = DEFAULT_BLOCK_STRIDES,
        in_channels: int = 1,
        n_outputs: int = 1,
        widen_factor: float = 1.0,
    ) -> None:
        super().__init__()
        strides = tuple(int(s) for s in block_strides)
        if len(strides) != 4 or any(s < 1 for s in strides):
            raise DfrnInputError(
                f"block_strides must be four positive integers, got {block_strides!r}"
            )
        if n_outputs < 1:
            raise DfrnInputError(f"n_outputs must be >= 1, got {n_outputs}")
        channels = block_channels(widen_factor)
        self.block_strides = strides
        self.n_outputs = int(n_outputs)
        self.widen_factor = float(widen_factor)
        self.conv1 = nn.Conv3d(
            in_channels, channels[0], kernel_size=7, stride=(1, 2, 2), padding=3, bias=False
        )
        self.bn1 = nn.BatchNorm3d(channels[0])
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool3d(kernel_size=3, stride=2, padding=1)
        in_planes = channels[0]
        for i, (planes, stride) in enumerate(zip(channels, strides, strict=True), start=1):
            self.add_module(f"layer{i}", nn.Sequential(BasicBlock(in_planes, planes, stride)))
            in_planes = planes
        self.avgpool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(in_planes, self.n_outputs)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        out = self.fc(x)
        return out.squeeze(1) if self.n_outputs == 1 else out

    def select_output(self, k: int) -> DFRN:
        """A one-output copy that computes output ``k`` exactly (the fc layer's row ``k``).

        A joint network's prediction for one factor is this network's; attribution,
        ablation and model packages use it as they use a network of its own.
        """
        if not 0 <= k < self.n_outputs:
            raise DfrnInputError(f"output {k} of a network with {self.n_outputs} outputs")
        one = DFRN(self.block_strides, self.conv1.in_channels, 1, self.widen_factor)
        state = {n: v for n, v in self.state_dict().items() if not n.startswith("fc.")}
        state["fc.weight"] = self.fc.weight.detach()[k : k + 1].clone()
        state["fc.bias"] = self.fc.bias.detach()[k : k + 1].clone()
        one.load_state_dict(state)
        return one.to(self.fc.weight.device).train(self.training)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
