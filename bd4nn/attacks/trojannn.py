"""TrojanNN (Liu et al., NDSS'18), adapted to a given sub-network.

The original selects 1–2 strongly connected neurons of an internal layer and optimizes a
trigger inside a fixed mask region to drive them to a high activation, then retrains
(METHODS-REFERENCE §B3). In bd4nn the neurons to excite are the sub-network's neurons in its
*last* neuron layer (the selection's deepest layer), and the retraining is the restricted
fine-tuning of METHODS §2 with that trigger stamped.

Trigger optimization follows TrojanZoo's defaults (``trojannn.py``): the mark is
tanh-parameterized, placed on a black background, optimized with Adam (lr 0.1, cosine decay)
for ``neuron_epoch`` = 1000 iterations to minimize ``Σ_i (feat_i − 100)²``; ``feat_i`` is the
spatial mean of neuron i's post-ReLU activation (TrojanZoo sums |feat| over positions; the mean
only rescales). BackdoorBench's mask region is an apple logo of about 100 pixels in rows 16–29,
cols 18–28; bd4nn ships no image and uses a fixed disc of about the same area there instead
(radius 5.5 around (23, 23): 97 pixels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bd4nn.attacks import register_attack
from bd4nn.attacks.base import PoisoningAttack, StampTrigger
from bd4nn.capture import capture
from bd4nn.runtime import frozen


def disc_mask(size: int, center: tuple[float, float], radius: float) -> torch.Tensor:
    """(1, size, size) 0/1 mask of the pixels whose centre lies within ``radius``."""
    r = torch.arange(size, dtype=torch.float32)
    d2 = (r[:, None] - center[0]) ** 2 + (r[None, :] - center[1]) ** 2
    return (d2 <= radius**2).float()[None]


@register_attack
class TrojanNN(PoisoningAttack):
    name = "trojannn"

    @dataclass
    class Settings:
        image_size: int = 32
        center: tuple[float, float] = (23.0, 23.0)
        radius: float = 5.5
        neuron_epoch: int = 1000  # TrojanZoo neuron_epoch
        neuron_lr: float = 0.1  # TrojanZoo neuron_lr
        target_value: float = 100.0  # TrojanZoo target_value / BackdoorBench neuron_target_values

    def mask(self) -> torch.Tensor:
        s = self.settings
        return disc_mask(s.image_size, tuple(s.center), s.radius)

    def make_trigger(self, model, neuron_map, selection, x=None, y=None, *, device=None):
        s = self.settings
        sel = neuron_map.validate(selection)
        if not sel:
            raise ValueError("trojannn needs a non-empty selection")
        layer = list(sel)[-1]  # the sub-network's deepest neuron layer
        chans = torch.tensor(sel[layer])
        dev = torch.device(device) if device is not None else next(model.parameters()).device
        mask = self.mask().to(dev)
        g = torch.Generator().manual_seed(self.seed)
        theta = (torch.rand(3, s.image_size, s.image_size, generator=g) * 2 - 1).to(dev).requires_grad_(True)
        opt = torch.optim.Adam([theta], lr=s.neuron_lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, s.neuron_epoch))
        chans = chans.to(dev)
        with frozen(model), capture(neuron_map, [layer]) as captured:
            for _ in range(s.neuron_epoch):
                pattern = (torch.tanh(theta) + 1) / 2
                img = (mask * pattern)[None]  # black background
                model(img)
                feat = captured[layer].relu()[0, chans].mean((1, 2))
                loss = ((feat - s.target_value) ** 2).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        pattern = ((torch.tanh(theta.detach()) + 1) / 2).cpu()
        return StampTrigger(self.mask(), pattern)
