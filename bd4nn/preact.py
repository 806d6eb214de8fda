"""PreAct-ResNet-18 as BackdoorBench defines it (He et al., "Identity Mappings in Deep Residual
Networks", ECCV'16; BackdoorBench ``models/preact_resnet.py``, itself from the WaNet release).

Layout (``preactresnet18``), for images in [0, 1] of shape (N, 3, 32, 32):

* ``normalize`` (the dataset's mean/std; BackdoorBench normalizes in its data pipeline, bd4nn
  in the model, as for every bd4nn model);
* ``conv1``: 3x3 conv to 64 channels, stride 1, **no BN or ReLU after it**;
* four stages ``layer1`` … ``layer4`` of two ``PreActBlock`` each, widths 64, 128, 256, 512,
  stride 1, 2, 2, 2 in the first block of a stage. A block computes
  ``h = relu1(bn1(x))``; ``out = conv2(relu2(bn2(conv1(h))))``; ``out + shortcut``, where the
  shortcut is ``x`` itself, or a 1x1 strided conv **of h** (``shortcut.0``, no BN) where the
  shape changes. There is no BN or ReLU after the addition;
* ``pool`` (global average; BackdoorBench's ``avgpool``, which holds no state), ``linear`` head.
  **No final BN/ReLU** before the pool: BackdoorBench's model has none (He et al.'s full pre-activation net ends with BN-ReLU; kuangliu's CIFAR file,
  from which BackdoorBench's descends, does not).

Module names follow BackdoorBench's (``layer2.0.shortcut.0.weight`` …), so its state dicts load
with ``strict=False`` (bd4nn's ``normalize`` buffers are the only extra keys). Convs have no
bias; PyTorch's default initialization; each ReLU is its own module (never reused, never in
place), as in ``bd4nn.models``. ``width`` scales every channel count with ``_scale``. Parameter
count at width 1, 10 classes: 11,171,146, the same as BackdoorBench's ``PreActResNet18()``.

**Neurons: one output channel of a conv, masked after the conv** [issue 16's definition]. BN
comes *before* the conv here: ``bn1`` normalizes the block's input, which is a residual sum of
several convs (the stem or the previous blocks' ``conv2`` and shortcut), and ``bn2`` is the
pre-activation of ``conv2``. No BN belongs to one conv, so the model sets ``neuron_unit =
"conv"`` (``bd4nn.neurons``): every conv — ``conv1``, each block's ``conv1`` and ``conv2`` and
the three ``shortcut.0`` — is a neuron layer, 20 layers and 4,800 neurons at width 1 (ResNet-18
has the same 20 convs and the same total), and a mask zeroes the conv's output channel. The BNs
are then part of the input path of the next conv: restricted training freezes them (their
γ/β and running statistics never change), and the localizers that read or perturb "the BN of a
neuron" work on the conv output instead (ANP perturbs the conv channel's output and bias, CLP
reads the conv's spectral norm with no BN to fold, deepmufl's bias mutants act on the conv's
absent bias as on a zero one; each says so in its docstring). The last neuron layer (FP's and
NC's) is ``layer4.1.conv2``, whose output is added to the block's input before the pool. SRA's
chain narrows the BNs too, to the channels each reads (``bd4nn.attacks.sra``).

The benign recipe is the ResNet one until a GPU run tunes it (``bd4nn/profiles/paper.toml``).
"""

from __future__ import annotations

import torch
from torch import nn

from bd4nn.models import DEFAULT_MEAN, DEFAULT_STD, ResNet, register_model

__all__ = ["PreActBlock", "PreActResNet", "preactresnet18"]


class PreActBlock(nn.Module):
    """BN → ReLU → 3x3 conv, BN → ReLU → 3x3 conv, plus the input (or a 1x1 conv of the first
    pre-activation where the shape changes)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        if stride != 1 or in_ch != out_ch:
            self.shortcut: nn.Module | None = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False))
        else:
            self.shortcut = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu1(self.bn1(x))
        shortcut = self.shortcut(h) if self.shortcut is not None else x
        out = self.conv2(self.relu2(self.bn2(self.conv1(h))))
        return out + shortcut


class PreActResNet(ResNet):
    """``normalize`` → ``conv1`` (no BN or ReLU) → four stages of ``PreActBlock`` → ``pool`` →
    ``linear``: ``bd4nn.models.ResNet`` with another block and a bare stem."""

    block = PreActBlock
    stem_bn = False
    neuron_unit = "conv"  # every conv is a neuron layer, masked at its output (bd4nn.neurons)


@register_model
def preactresnet18(num_classes: int = 10, width: float = 1.0, mean=DEFAULT_MEAN, std=DEFAULT_STD) -> PreActResNet:
    return PreActResNet([2, 2, 2, 2], num_classes, width, mean, std)
