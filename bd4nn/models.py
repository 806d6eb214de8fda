"""CIFAR-style model zoo: VGG-13/16 and ResNet-18/34 behind a small registry.

Every model takes float images in [0, 1] of shape (N, 3, 32, 32) and carries its dataset's
normalization as its first module (``model.normalize``), so attacks and triggers work in pixel
space. ``width`` scales every layer's channel count (tests use tiny models).

Architectures follow the usual CIFAR variants (METHODS-REFERENCE.md §E):

* VGG: conv3x3 (pad 1, with bias) + BN + ReLU, 2x2 max-pool at each 'M', five pools leave a
  1x1 map, then a single Linear head (as in the ANP reference code).
* ResNet: 3x3 stem, no max-pool, BasicBlocks with a 1x1 conv + BN shortcut where the shape
  changes, global average pool, Linear head (kuangliu / ANP ``resnet_cifar.py``).

ReLUs are never in-place and never reused: hooks that capture a BN output (masking, the
contribution of rule 1, localizers) see the tensor intact and fire once per call.

The registry mirrors timm/torchvision: ``@register_model`` adds a builder, ``get_model`` builds,
``list_models`` lists.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence

import torch
from torch import nn

from bd4nn.registry import Registry

__all__ = ["Normalize", "VGG", "ResNet", "register_model", "get_model", "list_models", "MODELS"]

# Per-channel statistics used when the caller names no dataset (CIFAR-10's usual values).
DEFAULT_MEAN = (0.4914, 0.4822, 0.4465)
DEFAULT_STD = (0.2470, 0.2435, 0.2616)

# VGG and ResNet register below at import; models in other modules are built-ins imported on first use.
MODELS: Registry[Callable[..., nn.Module]] = Registry(
    "model", name_of=lambda fn: fn.__name__, builtins={"mobilenetv2": "bd4nn.mobilenet:mobilenetv2",
                                               "preactresnet18": "bd4nn.preact:preactresnet18"}
)


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a builder ``fn(num_classes, width, mean, std) -> nn.Module`` under its name."""
    return MODELS.register(fn)


def list_models(pattern: str = "*") -> list[str]:
    """Names of the registered models matching a shell-style ``pattern``, sorted."""
    return sorted(n for n in MODELS.names() if fnmatch.fnmatch(n, pattern))


def get_model(
    name: str,
    num_classes: int = 10,
    width: float = 1.0,
    *,
    mean: Sequence[float] = DEFAULT_MEAN,
    std: Sequence[float] = DEFAULT_STD,
    seed: int | None = None,
) -> nn.Module:
    """Build a registered model.

    ``seed`` makes the initialization reproducible without touching the global RNG state.
    """
    builder = MODELS.get(name)
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if width <= 0:
        raise ValueError(f"width must be > 0, got {width}")
    if seed is None:
        return builder(num_classes=num_classes, width=width, mean=mean, std=std)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return builder(num_classes=num_classes, width=width, mean=mean, std=std)


def _scale(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; the first module of every model."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


# --------------------------------------------------------------------------------------- VGG

_VGG_CONFIGS: dict[str, list[int | str]] = {
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """CIFAR VGG-BN: ``normalize`` → ``features`` (conv-BN-ReLU stacks) → ``classifier``."""

    def __init__(
        self,
        config: Sequence[int | str],
        num_classes: int,
        width: float,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        layers: list[nn.Module] = []
        in_ch = 3
        for v in config:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            out_ch = _scale(int(v), width)
            layers += [
                nn.Conv2d(in_ch, out_ch, 3, padding=1),
                nn.BatchNorm2d(out_ch),
                nn.ReLU(),
            ]
            in_ch = out_ch
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.features(self.normalize(x))))


@register_model
def vgg13(num_classes: int = 10, width: float = 1.0, mean=DEFAULT_MEAN, std=DEFAULT_STD) -> VGG:
    return VGG(_VGG_CONFIGS["vgg13"], num_classes, width, mean, std)


@register_model
def vgg16(num_classes: int = 10, width: float = 1.0, mean=DEFAULT_MEAN, std=DEFAULT_STD) -> VGG:
    return VGG(_VGG_CONFIGS["vgg16"], num_classes, width, mean, std)


# ------------------------------------------------------------------------------------ ResNet


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN pairs; a 1x1 conv-BN shortcut when the shape changes.

    Each ReLU is its own module (never reused), so hooks on them fire once per call.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        if stride != 1 or in_ch != out_ch:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet: ``normalize`` → 3x3 stem → four stages of ``block`` → global avg pool →
    ``linear``. Subclasses change the block and the stem (``bd4nn.preact``: no BN/ReLU after it)."""

    block: Callable[[int, int, int], nn.Module] = BasicBlock  # block(in_ch, out_ch, stride)
    stem_bn = True  # BN + ReLU after the stem conv

    def __init__(
        self,
        blocks: Sequence[int],
        num_classes: int,
        width: float,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        widths = [_scale(c, width) for c in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        if self.stem_bn:
            self.bn1 = nn.BatchNorm2d(widths[0])
            self.relu = nn.ReLU()
        in_ch = widths[0]
        for stage, (n, out_ch, stride) in enumerate(zip(blocks, widths, (1, 2, 2, 2)), start=1):
            layer = []
            for b in range(n):
                layer.append(self.block(in_ch, out_ch, stride if b == 0 else 1))
                in_ch = out_ch
            setattr(self, f"layer{stage}", nn.Sequential(*layer))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(in_ch, num_classes)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.normalize(x))
        return self.relu(self.bn1(out)) if self.stem_bn else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.linear(self.flatten(self.pool(out)))


@register_model
def resnet18(num_classes: int = 10, width: float = 1.0, mean=DEFAULT_MEAN, std=DEFAULT_STD) -> ResNet:
    return ResNet([2, 2, 2, 2], num_classes, width, mean, std)


@register_model
def resnet34(num_classes: int = 10, width: float = 1.0, mean=DEFAULT_MEAN, std=DEFAULT_STD) -> ResNet:
    return ResNet([3, 4, 6, 3], num_classes, width, mean, std)
