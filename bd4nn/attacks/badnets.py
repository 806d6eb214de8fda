"""BadNets (Gu et al. 2017): an opaque 3×3 white patch at the bottom-right corner.

Defaults from BackdoorBench ``config/attack/badnet/default.yaml`` (METHODS-REFERENCE §B1):
patch 3×3, pixels 29..31 (no margin), white, all-to-one, target 0, poison rate 0.1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bd4nn.attacks import register_attack
from bd4nn.attacks.base import PoisoningAttack, StampTrigger, corner_box


@register_attack
class BadNets(PoisoningAttack):
    name = "badnets"

    @dataclass
    class Settings:
        patch_size: int = 3
        margin: int = 0
        value: float = 1.0  # white
        image_size: int = 32

    def make_trigger(self, model=None, neuron_map=None, selection=None, x=None, y=None, *, device=None):
        s = self.settings
        mask = torch.zeros(1, s.image_size, s.image_size)
        rows, cols = corner_box(s.patch_size, s.image_size, s.margin)
        mask[:, rows, cols] = 1.0
        pattern = torch.full((3, s.image_size, s.image_size), float(s.value))
        return StampTrigger(mask, pattern)
