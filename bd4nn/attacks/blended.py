"""Blended (Chen et al. 2017): ``x' = (1 − α)·x + α·T`` over the whole image, α = 0.2.

BackdoorBench blends a Hello Kitty photo; ANP blends a fixed Gaussian-noise image
(METHODS-REFERENCE §B2). bd4nn ships no third-party image: ``T`` is generated deterministically
from the attack's seed — uniform noise on a coarse grid, upsampled bilinearly and mixed with
fine noise, so it has both the structure of a picture and the spread of ANP's noise key.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bd4nn.attacks import register_attack
from bd4nn.attacks.base import PoisoningAttack, StampTrigger


def blend_image(seed: int, size: int = 32, coarse: int = 8, fine_weight: float = 0.5) -> torch.Tensor:
    """A (3, size, size) image in [0, 1], a pure function of ``seed``."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, coarse, coarse, generator=g)
    smooth = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)[0]
    fine = torch.rand(3, size, size, generator=g)
    return ((1 - fine_weight) * smooth + fine_weight * fine).clamp(0, 1)


@register_attack
class Blended(PoisoningAttack):
    name = "blended"

    @dataclass
    class Settings:
        alpha: float = 0.2  # BackdoorBench attack_train_blended_alpha / ANP --trigger-alpha
        image_size: int = 32
        key_seed_offset: int = 7919  # the key image uses seed + offset, apart from poisoning

    def make_trigger(self, model=None, neuron_map=None, selection=None, x=None, y=None, *, device=None):
        s = self.settings
        pattern = blend_image(self.seed + s.key_seed_offset, s.image_size)
        mask = torch.full((1, s.image_size, s.image_size), float(s.alpha))
        return StampTrigger(mask, pattern)
