"""Reading the neurons' activations: BN-output capture.

Rule 1 (``contribution``), TrojanNN's trigger search and several localizers read the BN outputs
(the neurons' activations, METHODS.md §1; the conv outputs of a pre-activation network,
``NeuronMap.output``) of some neuron layers, usually inside
``bd4nn.runtime.frozen`` (eval mode, parameters out of autograd). ``capture`` is a context
manager that removes its hooks on exit, also on an exception.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from bd4nn.neurons import NeuronMap

__all__ = ["capture"]


@contextmanager
def capture(neuron_map: NeuronMap, layers: Sequence[str] | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Record the BN output of each neuron layer in ``layers`` (default: all) on every forward.

    Yields a dict ``{layer: last BN output}`` that each forward pass overwrites. The tensors
    keep their autograd graph, so ``torch.autograd.grad(z, captured[layer])`` works.
    """
    names = list(layers) if layers is not None else neuron_map.layers
    out: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for name in names:
            handles.append(neuron_map.output(name).register_forward_hook(lambda _m, _i, o, k=name: out.__setitem__(k, o)))
        yield out
    finally:
        for h in handles:
            h.remove()
