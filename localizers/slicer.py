"""SLICER: low clean contribution (METHODS.md §3.6; METHODS-REFERENCE.md §A6, §D).

The study's "SLICER" is most likely NNSlicer (Zhang et al., ESEC/FSE'20; the mapping is
unverified and no BDefects4NN code exists, METHODS-REFERENCE §F.1). Neurons that contribute
little to the clean predictions are dormant or irrelevant there, hence free for a backdoor
(this is why SLICER does well on SRA, which isolates the sub-network from clean prediction).

Score of neuron ``(l, c)``, with ``a`` its BN output (METHODS.md §1), the clean images ``x``
and the explained class ``t = y`` (each image's *true* label; pre-softmax logit ``z_t``)::

    C_{l,c} = mean_x Σ_{h,w} | a_{l,c,h,w}(x) · ∂z_t(x)/∂a_{l,c,h,w} |      score = −C_{l,c}

i.e. rule 1's Taylor/NeuronMCT formula on the clean data (``bd4nn.contribution``, one forward
and one backward per batch for all layers). Lower contribution = more suspicious, so the score
is the negated contribution. The model runs in eval mode (METHODS-REFERENCE §0).

``centered=True`` is the NNSlicer variant: a neuron's *reaction* is its activation minus its
mean activation over the dataset, ``a − ā`` with ``ā_{l,c,h,w}`` the mean BN output over the
clean set (per position), and the contribution becomes
``mean_x Σ_{h,w} |(a − ā)·∂z_t/∂a|``. It is computed in two passes (``ā`` first, with no
gradient; then the gradients). Choices made there (none published): ``ā`` and ``a`` are BN
outputs, as everywhere in bd4nn (a ResNet block's BN output has no post-ReLU value of its
own); the absolute value stays inside the spatial sum so that ``centered`` changes nothing
but ``a → a − ā`` (the reference's alternative, |Σ_{h,w}(·)|, is not implemented).

Settings: ``centered`` (default False: the plain Taylor form, METHODS.md §3.6, which defines
SLICER as "rule-1 formula on the clean data"); ``batch_size`` (memory only, never the
result up to float summation order).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bd4nn.capture import capture
from bd4nn.contribution import contribution
from bd4nn.runtime import frozen
from localizers.base import Localizer, LocalizerError, register_localizer

__all__ = ["Slicer", "centered_contribution"]


def centered_contribution(model, neuron_map, clean, *, layers=None, batch_size=256, device=None) -> dict[str, torch.Tensor]:
    """``mean_x Σ_{h,w} |(a − ā)·∂z_y/∂a|`` for every neuron of ``layers`` (default: all).

    ``ā`` is the mean BN output over ``clean`` (first pass, no gradient). Returns float32
    tensors on ``device``. The model's mode is restored and its parameters get no ``.grad``.
    """
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    names = list(layers) if layers is not None else neuron_map.layers
    n = len(clean)
    y_all = clean.y.long()

    # pass 1: mean activation per (channel, position) over the clean set
    sums: dict[str, torch.Tensor] = {}
    with frozen(model), capture(neuron_map, names) as captured, torch.no_grad():
        for s in range(0, n, batch_size):
            captured.clear()
            model(clean.float_batch(s, s + batch_size, dev))
            for k in names:
                part = captured[k].sum(0, dtype=torch.float64)
                sums[k] = part if k not in sums else sums[k] + part
    mean_act = {k: (v / n).to(torch.float32) for k, v in sums.items()}

    # pass 2: gradients of the true-class logit, all layers in one backward per batch
    totals = {k: torch.zeros(neuron_map.sizes[k], device=dev, dtype=torch.float64) for k in names}
    with frozen(model), capture(neuron_map, names) as captured:
        for s in range(0, n, batch_size):
            xb = clean.float_batch(s, s + batch_size, dev).requires_grad_(True)
            captured.clear()
            logits = model(xb)
            yb = y_all[s : s + batch_size].to(dev)
            z = logits.gather(1, yb[:, None]).sum()  # images are independent in eval mode
            acts = [captured[k] for k in names]
            grads = torch.autograd.grad(z, acts)
            for k, a, g in zip(names, acts, grads):
                prod = (a.detach() - mean_act[k]) * g
                totals[k] += prod.abs().sum((2, 3)).sum(0, dtype=torch.float64)
    return {k: (v / n).float() for k, v in totals.items()}


@register_localizer
class Slicer(Localizer):
    name = "slicer"
    scope = "all"
    summary = "low clean contribution |a·∂z_y/∂a| (true label)"

    @dataclass
    class Settings:
        centered: bool = False  # NNSlicer's reaction a − ā instead of a
        batch_size: int = 256  # memory only

    def scores(self, model, neuron_map, clean, *, device=None, seed=0):
        bs = int(self.settings.batch_size)
        if bs < 1:
            raise LocalizerError(f"slicer: batch_size must be >= 1, got {bs}")
        dev = torch.device(device) if device is not None else next(model.parameters()).device
        layers = self.layers(neuron_map)
        if self.settings.centered:
            contrib = centered_contribution(model, neuron_map, clean, layers=layers, batch_size=bs, device=dev)
        else:
            contrib = contribution(
                model, neuron_map, clean.x, clean.y, layers=layers, absolute=True, batch_size=bs, device=dev
            )
        return {k: -v for k, v in contrib.items()}
