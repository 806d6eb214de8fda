"""Taylor / NeuronMCT neuron contribution (METHODS.md §2 rule 1, RC; METHODS-REFERENCE §D).

For neuron ``(l, i)`` with activation ``a`` (its BN output), input ``x`` and explained class
``t``::

    c_l^i(x) = Σ_{h,w} | a_{l,i,h,w}(x) · ∂z_t(x) / ∂a_{l,i,h,w} |

averaged over the images. ``z_t`` is the pre-softmax logit. For ReLU nets the product is the
same before or after the ReLU, so BN outputs serve both VGG and ResNet. Every layer is computed
at once: one forward and one backward per batch (the backward of ``Σ_n z_{t_n}(x_n)`` gives each
image its own gradient, since images do not interact in eval mode). The same function gives

* rule 1: clean training images of class ``t``, explained class ``t``;
* RC: triggered inputs, explained class = the target;
* the SLICER localizer: clean images, explained class = the true label.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from bd4nn.capture import capture
from bd4nn.neurons import NeuronMap
from bd4nn.runtime import frozen, to_float

__all__ = ["contribution", "rank_neurons"]


def contribution(
    model: nn.Module,
    neuron_map: NeuronMap,
    x: torch.Tensor,
    classes: int | torch.Tensor,
    *,
    layers: Sequence[str] | None = None,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    absolute: bool = True,
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """Mean contribution of every neuron of ``layers`` (default: all) over images ``x``.

    ``x``: uint8 or float [0,1] images (N,3,H,W). ``classes``: the explained class, one int
    for all images or a tensor of N labels. ``transform`` (e.g. a trigger) maps a float batch
    before the forward pass. ``absolute=False`` sums the signed products instead (then takes
    the mean). Returns ``{layer: float32 CPU tensor of size N_l}``. The model's mode is
    restored afterwards; its parameters get no ``.grad``.
    """
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    names = list(layers) if layers is not None else neuron_map.layers
    n = x.shape[0]
    if n == 0:
        raise ValueError("contribution needs at least one image")
    if torch.is_tensor(classes):
        if classes.shape[0] != n:
            raise ValueError(f"{n} images but {classes.shape[0]} classes")
        cls_all = classes.long()
    else:
        cls_all = torch.full((n,), int(classes), dtype=torch.long)

    totals = {name: torch.zeros(neuron_map.sizes[name], device=dev, dtype=torch.float64) for name in names}
    with frozen(model), capture(neuron_map, names) as captured:
        for s in range(0, n, batch_size):
            xb = x[s : s + batch_size].to(dev)
            xb = to_float(xb)
            if transform is not None:
                xb = transform(xb)
            xb.requires_grad_(True)  # so activations carry a graph even with frozen weights
            captured.clear()
            logits = model(xb)
            cls = cls_all[s : s + batch_size].to(dev)
            z = logits.gather(1, cls[:, None]).sum()
            acts = [captured[k] for k in names]
            grads = torch.autograd.grad(z, acts)
            for k, a, g in zip(names, acts, grads):
                prod = a.detach() * g
                per_image = prod.abs().sum((2, 3)) if absolute else prod.sum((2, 3))
                totals[k] += per_image.sum(0, dtype=torch.float64)
    return {k: (v / n).float().cpu() for k, v in totals.items()}


def rank_neurons(scores: dict[str, torch.Tensor], descending: bool = True) -> dict[str, list[int]]:
    """Per layer, channel indices ordered by score (ties: lower index first)."""
    out = {}
    for name, s in scores.items():
        idx = torch.arange(s.numel())
        # stable sort on the key gives lower index first among ties
        key = -s if descending else s
        order = torch.sort(key.double(), stable=True).indices
        out[name] = idx[order].tolist()
    return out
