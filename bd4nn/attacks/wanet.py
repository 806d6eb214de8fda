"""WaNet (Nguyen & Tran, ICLR 2021, "WaNet – Imperceptible Warping-based Backdoor Attack"): the
trigger is a fixed, smooth image warp.

Defaults and construction follow the authors' repository
``VinAIResearch/Warping-based_Backdoor_Attack-release``: ``config.py`` (``k 4``, ``s 0.5``,
``pc 0.1``, ``cross_ratio 2``, ``grid-rescale 1``, target 0, all2one) and ``train.py`` (the
grids and the noise mode); BackdoorBench ``config/attack/wanet/default.yaml`` has the same
values (METHODS-REFERENCE lists no WaNet section yet).

* **Warp field** (a pure function of the attack's seed): ``k×k×2`` offsets uniform in [-1, 1]
  (channel 0 = x, the column direction; channel 1 = y, the row direction), divided by their mean
  absolute value, upsampled bicubically (``align_corners=True``) to the image size, scaled by
  ``s / H``, added to the identity grid (``[..., 0]`` = column coordinate, ``[..., 1]`` = row,
  both ``linspace(-1, 1)``), multiplied by ``grid_rescale`` and clamped to [-1, 1]. The image is
  resampled with ``grid_sample`` (bilinear, ``align_corners=True``; the clamp keeps every sample
  inside the image). The whole sampling grid is stored as ``trigger.grid`` (H, W, 2), so a
  loaded entry re-applies exactly the same warp (``WarpTrigger``,
  ``bd4nn.attacks.base.trigger_from_tensors``).
* **Poisoning**: ``round(rate · N)`` non-target training images (``poison_indices``, bd4nn's
  all-to-one rule) are warped and relabelled to the target. **Noise mode** ("cross" samples):
  ``round(rate · cross_ratio · N)`` further images (seeded, any class, not poisoned) are warped
  with the same grid plus a fresh per-image perturbation uniform in [-1, 1] / H (clamped to
  [-1, 1]), labels kept, so the model learns *this* warp rather than any warping. The reference
  takes both from the head of every batch (``num_bd = int(bs·pc)``, any class); bd4nn fixes the
  images once, like its other attacks, and warps after augmentation (the reference augments
  after warping, with its own rotation/crop). The perturbation comes from a generator seeded by
  the attack's seed, on the training device, so an injection is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bd4nn.attacks import register_attack
from bd4nn.attacks.base import PoisoningAttack, TensorTrigger, poison_indices, seeded_pick

__all__ = ["WarpTrigger", "random_offsets", "identity_grid", "upsample_offsets", "warp_grid", "noise_indices",
           "WaNet"]


class WarpTrigger(TensorTrigger):
    """``x' = grid_sample(x, grid)`` (bilinear, zero padding, ``align_corners=True``) on a batch of
    [0,1] images (pure function); ``grid`` is (H, W, 2) in [-1, 1], ``[..., 0]`` = x (column),
    ``[..., 1]`` = y (row). Stored as ``trigger.grid``."""

    KEY = "trigger.grid"

    def __init__(self, grid: torch.Tensor) -> None:
        if grid.ndim != 3 or grid.shape[2] != 2:
            raise ValueError(f"grid must be (H, W, 2), got {tuple(grid.shape)}")
        if not torch.isfinite(grid).all() or grid.abs().max() > 1:
            raise ValueError("grid values must be finite and in [-1, 1]")
        super().__init__(grid)

    @property
    def grid(self) -> torch.Tensor:
        return self.value

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return sample(x, self.on(x.device)[None].expand(x.shape[0], -1, -1, -1))


def sample(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """``grid_sample`` as WaNet calls it (bilinear, zeros, ``align_corners=True``)."""
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="zeros", align_corners=True)


def random_offsets(k: int, seed: int) -> torch.Tensor:
    """The (2, k, k) control offsets: uniform in [-1, 1], divided by their mean absolute value."""
    g = torch.Generator().manual_seed(seed)
    ins = torch.rand(2, k, k, generator=g) * 2 - 1
    return ins / ins.abs().mean()


def identity_grid(size: int) -> torch.Tensor:
    """(size, size, 2): ``[i, j] = (x_j, y_i)`` with ``x, y = linspace(-1, 1, size)``."""
    a = torch.linspace(-1, 1, size)
    rows, cols = torch.meshgrid(a, a, indexing="ij")
    return torch.stack((cols, rows), 2)


def upsample_offsets(offsets: torch.Tensor, size: int) -> torch.Tensor:
    """(2, k, k) offsets → (size, size, 2) field, bicubic with ``align_corners=True``."""
    up = F.interpolate(offsets[None].float(), size=(size, size), mode="bicubic", align_corners=True)
    return up[0].permute(1, 2, 0)


def warp_grid(offsets: torch.Tensor, s: float, size: int, grid_rescale: float = 1.0) -> torch.Tensor:
    """The sampling grid ``clamp((identity + s · upsample(offsets) / size) · grid_rescale, -1, 1)``."""
    grid = (identity_grid(size) + float(s) * upsample_offsets(offsets, size) / size) * float(grid_rescale)
    return grid.clamp(-1, 1)


def noise_indices(labels: torch.Tensor, count: int, exclude: torch.Tensor, seed: int) -> torch.Tensor:
    """``count`` images (seeded, any class) outside ``exclude``, sorted; capped at what is left."""
    free = torch.ones(labels.shape[0], dtype=torch.bool)
    free[exclude] = False
    return seeded_pick(torch.nonzero(free).flatten(), count, seed)


@register_attack
class WaNet(PoisoningAttack):
    name = "wanet"

    @dataclass
    class Settings:
        k: int = 4  # control grid size (WaNet config.py --k)
        s: float = 0.5  # warp strength (--s)
        grid_rescale: float = 1.0  # (--grid-rescale)
        cross_ratio: float = 2.0  # noise-mode images per poisoned image (--cross_ratio)
        image_size: int = 32
        field_seed_offset: int = 7919  # the warp field uses seed + offset, apart from poisoning

    def offsets(self) -> torch.Tensor:
        return random_offsets(self.settings.k, self.seed + self.settings.field_seed_offset)

    def make_trigger(self, model=None, neuron_map=None, selection=None, x=None, y=None, *, device=None):
        s = self.settings
        return WarpTrigger(warp_grid(self.offsets(), s.s, s.image_size, s.grid_rescale))

    def inject(self, model, neuron_map, selection, trigger, x, y, recipe, *, device, progress=False):
        sel = neuron_map.validate(selection)
        dev = torch.device(device)
        poisoned = poison_indices(y, recipe.poison_rate, self.target, self.seed)
        n_noise = int(round(recipe.poison_rate * self.settings.cross_ratio * len(y)))
        noisy = noise_indices(y, n_noise, poisoned, self.seed + 1)
        hook = self.batch_hook(poisoned, noisy, len(y), trigger, dev)
        return self.train_poisoned(model, neuron_map, sel, x, y, recipe, hook, device=device, progress=progress,
                                   poisoned=int(len(poisoned)), noise=int(len(noisy)))

    def batch_hook(self, poisoned: torch.Tensor, noisy: torch.Tensor, n: int, trigger: WarpTrigger,
                   device: torch.device):
        """Warp + relabel the poisoned images, warp + perturb (labels kept) the noise images."""
        flags = torch.zeros(n, dtype=torch.int8)
        flags[poisoned] = 1
        flags[noisy] = 2
        flags = flags.to(device)
        gen = torch.Generator(device=device)
        gen.manual_seed(self.seed + 2)
        grid = trigger.on(device)
        size = grid.shape[0]
        target = self.target

        def hook(xb: torch.Tensor, yb: torch.Tensor, idx: torch.Tensor):
            f = flags[idx]
            b = xb.shape[0]
            base = grid[None].expand(b, -1, -1, -1)
            ins = torch.rand(b, *grid.shape, generator=gen, device=device) * 2 - 1
            cross = (base + ins / size).clamp(-1, 1)
            warped, perturbed = sample(xb, base), sample(xb, cross)
            xb = torch.where((f == 1)[:, None, None, None], warped,
                             torch.where((f == 2)[:, None, None, None], perturbed, xb))
            yb = torch.where(f == 1, torch.full_like(yb, target), yb)
            return xb, yb

        return hook
