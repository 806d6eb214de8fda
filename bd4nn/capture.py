"""Reading a model without changing it: frozen evaluation and BN-output capture.

Rule 1 (``contribution``), TrojanNN's trigger search and several localizers all need the same
two things: run the model in eval mode with its parameters out of autograd (so nothing gets a
``.grad`` and BN running statistics do not move), and read the BN outputs (the neurons'
activations, METHODS.md §1) of some neuron layers. Both are context managers that restore the
model exactly on exit, also on an exception.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from bd4nn.neurons import NeuronMap

__all__ = ["frozen", "capture"]


@contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and ``requires_grad=False`` on every parameter inside the block; on exit each
    module gets back its own ``training`` flag (a model in mixed modes stays mixed) and each
    parameter its ``requires_grad``."""
    modes = [(m, m.training) for m in model.modules()]
    req = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for m, _ in modes:
            m.training = False
        for p, _ in req:
            p.requires_grad_(False)
        yield model
    finally:
        for p, r in req:
            p.requires_grad_(r)
        for m, t in modes:
            m.training = t


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
            bn = neuron_map.bn(name)
            handles.append(bn.register_forward_hook(lambda _m, _i, o, k=name: out.__setitem__(k, o)))
        yield out
    finally:
        for h in handles:
            h.remove()
