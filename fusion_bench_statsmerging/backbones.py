"""Backbones for per-task-head suites that need no torchvision.

:class:`MobileNetV2Features` is torchvision's MobileNetV2 without its classifier, written in
plain PyTorch with the same module tree, so torchvision's state dicts (e.g. the
``IMAGENET1K_V1`` checkpoint ``mobilenet_v2-b0353104.pth``) load into it after dropping the
``classifier.*`` keys. A suite refers to it as
``{"kind": "module", "target": "fusion_bench_statsmerging.backbones:MobileNetV2Features"}``.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

# (expansion t, output channels c, repeats n, first stride s): torchvision's table
MOBILENET_V2_SETTING = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1],
                        [6, 160, 3, 2], [6, 320, 1, 1]]


def _make_divisible(v: float, divisor: int = 8, min_value: Optional[int] = None) -> int:
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class ConvBNReLU6(nn.Sequential):
    """Conv2d (no bias) + BatchNorm2d + ReLU6: torchvision's ``Conv2dNormActivation`` keys (0, 1, 2)."""

    def __init__(self, inp: int, oup: int, kernel: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(nn.Conv2d(inp, oup, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(oup), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: List[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(inp, hidden, kernel=1))
        layers += [ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
                   nn.Conv2d(hidden, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2Features(nn.Module):
    """MobileNetV2 up to the global average pool: images (N, 3, H, W) -> features (N, 1280)."""

    def __init__(self, width_mult: float = 1.0, round_nearest: int = 8,
                 setting: Optional[Sequence[Sequence[int]]] = None):
        super().__init__()
        input_channel = _make_divisible(32 * width_mult, round_nearest)
        self.out_features = _make_divisible(1280 * max(1.0, width_mult), round_nearest)
        features: List[nn.Module] = [ConvBNReLU6(3, input_channel, stride=2)]
        for t, c, n, s in setting or MOBILENET_V2_SETTING:
            output_channel = _make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                features.append(InvertedResidual(input_channel, output_channel, s if i == 0 else 1, t))
                input_channel = output_channel
        features.append(ConvBNReLU6(input_channel, self.out_features, kernel=1))
        self.features = nn.Sequential(*features)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.adaptive_avg_pool2d(self.features(x), 1).flatten(1)


def split_torchvision_mobilenet_v2(state: Dict[str, Tensor]) -> tuple[Dict[str, Tensor], Dict[str, Tensor]]:
    """torchvision MobileNetV2 state dict -> (backbone state for :class:`MobileNetV2Features`,
    ImageNet head ``{"weight", "bias"}``)."""
    backbone = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    head = {"weight": state["classifier.1.weight"], "bias": state["classifier.1.bias"]}
    return backbone, head
