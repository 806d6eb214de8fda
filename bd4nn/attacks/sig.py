"""SIG (Barni, Kallas & Tondi, ICIP 2019, "A new backdoor attack in CNNs by training set
corruption without label poisoning"): a clean-label attack with a superimposed sinusoid.

Trigger: ``x'[c, i, j] = clip(x[c, i, j] + v(j), 0, 1)`` with the horizontal signal
``v(j) = Δ · sin(2π · j · f / m)`` (``j`` = column, ``m`` = image width), the same on every row
and channel. It is *additive*, not a stamp (``(1 − m)·x + m·p`` cannot give ``x + v`` with
clipping), so it has its own trigger kind, ``AdditiveTrigger``, stored as one tensor
``trigger.signal`` (``bd4nn.attacks.base.trigger_from_tensors`` rebuilds it).

Defaults follow BackdoorBench (METHODS-REFERENCE §B7): ``config/attack/sig/default.yaml``
(``sig_delta: 40``, ``sig_f: 6``, ``pratio: 0.1``, all2one, target 0), the signal of
``utils/bd_img_transform/sig.py`` (``delta · sin(2π·j·f/m)`` over the column index, added to
the 0..255 image and clipped) and the clean-label selection of ``attack/sig.py`` with
``utils/backdoor_generate_poison_index.py`` (``clean_label=True``).

* **Δ = 40/255** (BackdoorBench), given in 0..255 units as ``delta``. The paper's own values
  (Δ = 20 at training for its GTSRB/CIFAR-like experiments, a stronger Δ at test) are not
  verified here; ``delta = 20`` in a profile's ``[attack.sig]`` gives the paper's training Δ.
  One Δ serves training and test (the entry stores one trigger).
* **Clean label**: only training images of the *target* class get the signal, and their labels
  stay as they are. **Poison rate** [BackdoorBench's definition, kept]: ``round(rate · N)``
  images with N = the *whole* training set, drawn (seeded) from the target class and capped at
  its size — so the default 0.1 poisons every target-class image of CIFAR-10 (10 % of 50,000 =
  5,000 = the whole class), and every one of CIFAR-100 and GTSRB. The rate is *not* a fraction
  of the target class.
* At test time the signal is added to every non-target image (ASR as for the other attacks,
  ``bd4nn.train.evaluate_asr``); during injection it is added after augmentation, like the
  other triggers. No uint8 rounding (bd4nn's triggers act on float [0,1] images).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bd4nn.attacks import register_attack
from bd4nn.attacks.base import PoisoningAttack, TensorTrigger, seeded_pick

__all__ = ["AdditiveTrigger", "sig_signal", "clean_label_indices", "SIG"]


class AdditiveTrigger(TensorTrigger):
    """``x' = clamp(x + signal, 0, 1)`` on a batch of [0,1] images (pure function); ``signal`` is
    (1|3, H, W), any sign. Stored as ``trigger.signal``."""

    KEY = "trigger.signal"

    def __init__(self, signal: torch.Tensor) -> None:
        if signal.ndim != 3 or signal.shape[0] not in (1, 3):
            raise ValueError(f"signal must be (1|3, H, W), got {tuple(signal.shape)}")
        if not torch.isfinite(signal).all():
            raise ValueError("signal must be finite")
        super().__init__(signal)

    @property
    def signal(self) -> torch.Tensor:
        return self.value

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.on(x.device).to(x.dtype)).clamp(0, 1)


def sig_signal(delta: float, f: float, height: int = 32, width: int = 32) -> torch.Tensor:
    """The (1, H, W) SIG signal in [0,1] units: ``delta/255 · sin(2π·j·f/width)`` at column j
    (computed in float64, returned as float32)."""
    j = torch.arange(width, dtype=torch.float64)
    row = (float(delta) / 255.0) * torch.sin(2 * math.pi * j * float(f) / width)
    return row.expand(height, width)[None].float().contiguous()


def clean_label_indices(labels: torch.Tensor, rate: float, target: int, seed: int) -> torch.Tensor:
    """The training images SIG poisons, as a sorted int64 index tensor: ``round(rate · N)`` (N =
    the whole training set, BackdoorBench's definition) drawn with a seeded generator from the
    images of class ``target``, capped at their number. Their labels are not changed."""
    if not 0 <= rate <= 1:
        raise ValueError(f"poison rate must be in [0, 1], got {rate}")
    candidates = torch.nonzero(labels.cpu() == target).flatten()
    return seeded_pick(candidates, int(round(rate * labels.shape[0])), seed)


@register_attack
class SIG(PoisoningAttack):
    name = "sig"

    @dataclass
    class Settings:
        delta: float = 40.0  # signal amplitude in 0..255 units (BackdoorBench sig_delta)
        f: float = 6.0  # periods across the image width (BackdoorBench sig_f)
        image_size: int = 32

    def make_trigger(self, model=None, neuron_map=None, selection=None, x=None, y=None, *, device=None):
        s = self.settings
        return AdditiveTrigger(sig_signal(s.delta, s.f, s.image_size, s.image_size))

    def inject(self, model, neuron_map, selection, trigger, x, y, recipe, *, device, progress=False):
        sel = neuron_map.validate(selection)
        poisoned = clean_label_indices(y, recipe.poison_rate, self.target, self.seed)
        flag = torch.zeros(len(y), dtype=torch.bool)
        flag[poisoned] = True
        flag = flag.to(torch.device(device))

        def hook(xb: torch.Tensor, yb: torch.Tensor, idx: torch.Tensor):
            f = flag[idx]
            return torch.where(f[:, None, None, None], trigger(xb), xb), yb  # labels kept

        return self.train_poisoned(model, neuron_map, sel, x, y, recipe, hook, device=device, progress=progress,
                                   poisoned=int(len(poisoned)))
