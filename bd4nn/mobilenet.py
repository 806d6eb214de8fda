"""MobileNetV2, CIFAR variant (Sandler et al., CVPR'18; the 32x32 layout of kuangliu / BackdoorBench).

Layout (``mobilenetv2``), for images in [0, 1] of shape (N, 3, 32, 32):

* ``normalize`` (the dataset's mean/std, the first module as in every bd4nn model);
* stem: 3x3 conv to 32 channels, **stride 1** (ImageNet: 2), BN, ReLU6;
* 17 inverted residual blocks ``blocks.0`` … ``blocks.16`` from the table ``(t, c, n, s)`` =
  expansion, output channels, repeats, stride of the first repeat::

      (1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
      (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)

  the second row has **stride 1** (ImageNet: 2), so the three stride-2 stages leave a 4x4 map.
  A block with input ``k`` channels and hidden width ``h = t·k``: ``expand`` 1x1 conv k→h + BN +
  ReLU6 (absent when t = 1), ``depthwise`` 3x3 conv h→h with ``groups = h`` (stride s) + BN +
  ReLU6, ``project`` 1x1 conv h→c + BN with no activation (the linear bottleneck); the input is
  added when the stride is 1 and k = c (identity shortcut only; no conv shortcut);
* ``conv_last`` 1x1 conv to 1280 + BN + ReLU, global average pool, ``linear`` head.

Convs have no bias; PyTorch's default initialization, as the other bd4nn models. No dropout
before the head (kuangliu has none; torchvision's 0.2 is left out). ReLUs are never in-place and
never reused, as in ``bd4nn.models``. The block is the paper's / torchvision's (ReLU6, no expand
conv when t = 1, identity shortcut only); kuangliu's CIFAR file differs in using ReLU, an expand
conv also when t = 1, and a 1x1 conv + BN shortcut where the stride is 1 but the width changes.
The parameter count at width 1 with 10 classes is torchvision's ``mobilenet_v2(num_classes=10)``'s,
2,236,682 (strides add no parameters); torchvision ends with ReLU6 where this model has ReLU.

**Width.** ``width`` scales every channel count with ``bd4nn.models._scale``
(``max(1, round(c · width))``, the rule of VGG and ResNet) — the stem, each row's ``c`` and the
1280 of ``conv_last`` alike; the hidden width is ``t`` times the (already scaled) block input,
so a depthwise conv always has as many channels as the expand conv before it. This differs from
torchvision's ``width_mult``, which rounds to multiples of 8 and keeps 1280 for widths below 1;
bd4nn's rule keeps tiny test models tiny and is the same for every architecture.

**Neurons: a depthwise channel is a neuron** [decision]. bd4nn's neuron is one output channel of
a conv together with the BatchNorm that follows it (``bd4nn.neurons``). Each depthwise output
channel is exactly that: its own 3x3 filter (row ``i`` of the weight), its own BN γ/β and running
statistics, its own activation map; it can be masked (its BN output zeroed), trained alone
(restricted fine-tuning changes rows along dim 0) and scored like any other channel. So
``NeuronMap`` needs no special case: expand, depthwise and project convs, the stem and
``conv_last`` are all neuron layers, in that order within a block. What differs is the wiring, not
the unit: depthwise channel ``i`` reads only channel ``i`` of the expand layer before it (or of
the stem / the previous block's output when t = 1), instead of every channel. Excluding them
would take the network's only 3x3 (spatial) filters after the stem — 17 layers, 7136 of the
17056 channels at width 1 — out of every localizer's scope and out of the fault selections.
Totals: 17056 neurons in 52 layers at width 1 (7136 depthwise), 2132 at width 1/8 (892
depthwise), each counted by hand in ``tests/test_mobilenet.py``.

**SRA.** ``bd4nn.dataflow`` follows dense channel mixing only; it refuses grouped/depthwise convs
(a ``DataflowError``, which is a ``BadInputError``, naming the architecture), so the SRA attack
refuses MobileNetV2. Rule 1 (``bd4nn.contribution``), masking, restricted training and the
localizers work unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from bd4nn.models import DEFAULT_MEAN, DEFAULT_STD, Normalize, _scale, register_model

__all__ = ["MobileNetV2", "InvertedResidual", "CIFAR_SETTINGS", "mobilenetv2"]

# (expansion t, output channels c, repeats n, stride s of the first repeat); CIFAR strides.
CIFAR_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_CHANNELS = 32
LAST_CHANNELS = 1280


class InvertedResidual(nn.Module):
    """1x1 expand (+BN+ReLU6, absent when ``expansion == 1``) → 3x3 depthwise (+BN+ReLU6) →
    1x1 linear project (+BN); identity shortcut when ``stride == 1`` and ``in_ch == out_ch``."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_ch * expansion
        self.use_residual = stride == 1 and in_ch == out_ch
        if expansion != 1:
            self.expand = nn.Conv2d(in_ch, hidden, 1, bias=False)
            self.expand_bn = nn.BatchNorm2d(hidden)
            self.expand_relu = nn.ReLU6()
        else:
            self.expand = None
        self.depthwise = nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False)
        self.depthwise_bn = nn.BatchNorm2d(hidden)
        self.depthwise_relu = nn.ReLU6()
        self.project = nn.Conv2d(hidden, out_ch, 1, bias=False)
        self.project_bn = nn.BatchNorm2d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.expand is not None:
            out = self.expand_relu(self.expand_bn(self.expand(out)))
        out = self.depthwise_relu(self.depthwise_bn(self.depthwise(out)))
        out = self.project_bn(self.project(out))
        if self.use_residual:
            out = out + x
        return out


class MobileNetV2(nn.Module):
    """CIFAR MobileNetV2: ``normalize`` → stem → ``blocks`` → ``conv_last`` → pool → ``linear``."""

    def __init__(
        self,
        num_classes: int,
        width: float,
        mean: Sequence[float],
        std: Sequence[float],
        settings: Sequence[tuple[int, int, int, int]] = CIFAR_SETTINGS,
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        in_ch = _scale(STEM_CHANNELS, width)
        self.conv1 = nn.Conv2d(3, in_ch, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.relu1 = nn.ReLU6()
        blocks = []
        for t, c, n, s in settings:
            out_ch = _scale(c, width)
            for i in range(n):
                blocks.append(InvertedResidual(in_ch, out_ch, s if i == 0 else 1, t))
                in_ch = out_ch
        self.blocks = nn.Sequential(*blocks)
        last = _scale(LAST_CHANNELS, width)
        self.conv_last = nn.Conv2d(in_ch, last, 1, bias=False)
        self.bn_last = nn.BatchNorm2d(last)
        self.relu_last = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(self.normalize(x))))
        out = self.blocks(out)
        out = self.relu_last(self.bn_last(self.conv_last(out)))
        return self.linear(self.flatten(self.pool(out)))


@register_model
def mobilenetv2(num_classes: int = 10, width: float = 1.0, mean=DEFAULT_MEAN, std=DEFAULT_STD) -> MobileNetV2:
    return MobileNetV2(num_classes, width, mean, std)
