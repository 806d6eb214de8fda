"""Paper order and display names of methods, architectures, datasets, attacks and levels.

Known names come first in paper order; any other name follows, alphabetically, and is shown
as-is. ``None`` (a missing key in a results line) never becomes a row or a column.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["METHODS", "ARCHS", "DATASETS", "ATTACKS", "LEVELS", "ordered", "display"]

METHODS = {
    "fp": "FP",
    "nc": "NC",
    "anp": "ANP",
    "clp": "CLP",
    "deepmufl": "deepmufl",
    "slicer": "SLICER",
    "pfl": "PFL",
    "random": "Random",
}
# The study's four first, then the options beyond its table (issue 16).
ARCHS = {"vgg13": "VGG-13", "vgg16": "VGG-16", "resnet18": "ResNet-18", "resnet34": "ResNet-34",
         "preactresnet18": "PreAct-ResNet-18", "mobilenetv2": "MobileNetV2"}
DATASETS = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "gtsrb": "GTSRB", "imagenette": "Imagenette"}
ATTACKS = {"badnets": "BadNets", "blended": "Blended", "trojannn": "TrojanNN", "sra": "SRA", "sig": "SIG", "wanet": "WaNet"}
LEVELS = {"narrow": "narrow", "small": "small", "middle": "middle", "large": "large"}


def ordered(names: Iterable[str | None], known: dict[str, str]) -> list[str]:
    """The distinct non-None ``names``: those in ``known`` in its order, then the rest sorted."""
    position = {name: i for i, name in enumerate(known)}
    distinct = {n for n in names if n is not None}
    return sorted(distinct, key=lambda n: (0, position[n], "") if n in position else (1, 0, n))


def display(name: str, known: dict[str, str]) -> str:
    """The paper's spelling of ``name`` (unknown names unchanged)."""
    return known.get(name, name)
