"""Neuron maps: the ordered neuron layers of a model, selections over them, and masking.

A *neuron* is one output channel of a conv layer together with the BatchNorm that follows it
(METHODS.md §1). ``NeuronMap`` finds these conv→BN units by walking ``named_modules()`` in
registration order: a ``BatchNorm2d`` that comes right after a ``Conv2d`` with as many output
channels forms one neuron layer, named by the conv's module path (``features.3``,
``layer2.0.shortcut.0``). No per-architecture table is involved, so any conv net with conv→BN
units works, at any width. The classifier is not a neuron layer; ``head_name`` names it (the
last ``nn.Linear``).

**Pre-activation networks** (``NEURON_UNITS``). In a PreAct-ResNet (He et al., ECCV'16) the unit
is BN → ReLU → conv: a BatchNorm normalizes the *input* of the conv after it (often a residual
sum of several convs), so it belongs to no single conv. A model declares this with the class
attribute ``neuron_unit = "conv"``: then every ``Conv2d`` is a neuron layer on its own
(``bn_name`` None), its neuron is one output channel of the conv, and its activation, which
masks, captures and localizers read, is the conv's output (``output_name``). The default
``neuron_unit = "conv+bn"`` is the walk above. ``bd4nn.preact`` is the one such model.

A *selection* is ``{layer_name: sorted list of channels}``. A *mask* zeroes the selected
channels' activations (the BN output, or the conv output of a ``"conv"`` unit; before the
nonlinearity / residual add) through forward hooks.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from bd4nn.errors import UserError

__all__ = ["NeuronLayer", "NeuronMap", "Selection", "SelectionError", "normalize_selection", "NEURON_UNITS"]

Selection = dict[str, list[int]]


class SelectionError(UserError, ValueError):
    """A selection names an unknown layer or an out-of-range / duplicate channel."""


# A model's ``neuron_unit`` attribute -> what forms its neuron layers (module docstring).
NEURON_UNITS = ("conv+bn", "conv")


@dataclass(frozen=True)
class NeuronLayer:
    name: str  # module path of the conv
    bn_name: str | None  # module path of the BatchNorm that follows it; None for a "conv" unit
    size: int  # number of output channels = neurons
    offset: int  # global index of channel 0 in the map's flat order

    @property
    def output_name(self) -> str:
        """The module whose output is the neurons' activation: the BN, or the conv itself."""
        return self.bn_name if self.bn_name is not None else self.name


class NeuronMap:
    """The neuron layers of ``model`` (conv→BN units, or every conv for a ``neuron_unit = "conv"``
    model) in module-registration order."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        modules = dict(model.named_modules())
        unit = getattr(model, "neuron_unit", "conv+bn")
        if unit not in NEURON_UNITS:
            raise ValueError(f"{type(model).__name__}.neuron_unit is {unit!r}; expected one of {NEURON_UNITS}")
        layers: list[NeuronLayer] = []
        prev_name: str | None = None
        prev: nn.Module | None = None
        offset = 0
        for name, module in model.named_modules():
            if unit == "conv":
                if isinstance(module, nn.Conv2d):
                    layers.append(NeuronLayer(name, None, module.out_channels, offset))
                    offset += module.out_channels
                continue
            if isinstance(module, nn.BatchNorm2d) and isinstance(prev, nn.Conv2d):
                if prev.out_channels != module.num_features:
                    raise ValueError(
                        f"conv {prev_name} has {prev.out_channels} outputs but the BatchNorm "
                        f"{name} after it has {module.num_features} features"
                    )
                layers.append(NeuronLayer(prev_name, name, module.num_features, offset))  # type: ignore[arg-type]
                offset += module.num_features
            if len(list(module.children())) == 0:  # leaves only: containers do not break pairs
                prev_name, prev = name, module
        if not layers:
            raise ValueError(f"{type(model).__name__} has no {'conv' if unit == 'conv' else 'conv→BatchNorm'} units")
        self._layers = {layer.name: layer for layer in layers}
        self._modules = modules
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        self.head_name: str | None = linears[-1] if linears else None

    # ------------------------------------------------------------------ structure
    @property
    def layers(self) -> list[str]:
        """Neuron layer names in order."""
        return list(self._layers)

    @property
    def sizes(self) -> dict[str, int]:
        return {n: layer.size for n, layer in self._layers.items()}

    @property
    def total(self) -> int:
        return sum(layer.size for layer in self._layers.values())

    @property
    def penultimate(self) -> str:
        """The last neuron layer (the last conv feeding the head; FP and NC score only it)."""
        return next(reversed(self._layers))

    def __len__(self) -> int:
        return len(self._layers)

    def __iter__(self) -> Iterator[NeuronLayer]:
        return iter(self._layers.values())

    def __contains__(self, name: object) -> bool:
        return name in self._layers

    def layer(self, name: str) -> NeuronLayer:
        try:
            return self._layers[name]
        except KeyError:
            raise SelectionError(
                f"unknown neuron layer {name!r}; this model's layers are {', '.join(self._layers)}"
            ) from None

    def conv(self, name: str) -> nn.Conv2d:
        return self._modules[self.layer(name).name]  # type: ignore[return-value]

    def bn(self, name: str) -> nn.BatchNorm2d | None:
        """The layer's BatchNorm; None for a ``"conv"`` unit (a pre-activation network)."""
        bn_name = self.layer(name).bn_name
        return None if bn_name is None else self._modules[bn_name]  # type: ignore[return-value]

    def output(self, name: str) -> nn.Module:
        """The module whose output is the layer's neuron activation (``NeuronLayer.output_name``)."""
        return self._modules[self.layer(name).output_name]

    def head(self) -> nn.Linear:
        if self.head_name is None:
            raise ValueError("model has no nn.Linear head")
        return self._modules[self.head_name]  # type: ignore[return-value]

    # ------------------------------------------------------------------ selections
    def validate(self, selection: Mapping[str, Sequence[int]]) -> Selection:
        """Check a selection against this map and return it normalized (sorted, known layers).

        Raises ``SelectionError`` naming the offending layer or channel.
        """
        out: Selection = {}
        for name, channels in selection.items():
            layer = self.layer(name)
            chans = [int(c) for c in channels]
            if len(set(chans)) != len(chans):
                raise SelectionError(f"layer {name!r}: duplicate channels in {chans}")
            bad = [c for c in chans if not 0 <= c < layer.size]
            if bad:
                raise SelectionError(f"layer {name!r} has {layer.size} channels; out of range: {bad}")
            if chans:
                out[name] = sorted(chans)
        return {n: out[n] for n in self._layers if n in out}

    def full(self) -> Selection:
        """Every neuron."""
        return {n: list(range(layer.size)) for n, layer in self._layers.items()}

    def complement(self, selection: Mapping[str, Sequence[int]]) -> Selection:
        """Every neuron not in ``selection``."""
        sel = self.validate(selection)
        out: Selection = {}
        for n, layer in self._layers.items():
            chosen = set(sel.get(n, ()))
            rest = [c for c in range(layer.size) if c not in chosen]
            if rest:
                out[n] = rest
        return out

    def channel_masks(
        self, selection: Mapping[str, Sequence[int]], device: torch.device | str | None = None
    ) -> dict[str, torch.Tensor]:
        """Boolean per-layer vectors, True on the selected channels (layers not named: absent)."""
        sel = self.validate(selection)
        masks = {}
        for n, chans in sel.items():
            m = torch.zeros(self._layers[n].size, dtype=torch.bool, device=device)
            m[chans] = True
            masks[n] = m
        return masks

    def to_flat(self, selection: Mapping[str, Sequence[int]]) -> torch.Tensor:
        """Global indices (int64, sorted) of the selected neurons."""
        sel = self.validate(selection)
        idx = [self._layers[n].offset + c for n, chans in sel.items() for c in chans]
        return torch.tensor(sorted(idx), dtype=torch.long)

    def from_flat(self, indices: Sequence[int] | torch.Tensor) -> Selection:
        """Inverse of ``to_flat``."""
        flat = sorted(int(i) for i in (indices.tolist() if torch.is_tensor(indices) else indices))
        out: Selection = {}
        for i in flat:
            if not 0 <= i < self.total:
                raise SelectionError(f"global neuron index {i} out of range [0, {self.total})")
            for layer in self._layers.values():
                if layer.offset <= i < layer.offset + layer.size:
                    out.setdefault(layer.name, []).append(i - layer.offset)
                    break
        return out

    # ------------------------------------------------------------------ masking
    @contextmanager
    def mask(self, selection: Mapping[str, Sequence[int]]) -> Iterator[None]:
        """Zero the selected channels' activations (BN outputs; conv outputs of a ``"conv"`` unit)
        inside the ``with`` block.

        Implemented with forward hooks on the modules ``output`` names, so it works for any
        architecture and leaves every parameter untouched. Hooks are removed on exit, also
        on an exception.
        """
        sel = self.validate(selection)
        handles = []
        try:
            for name, chans in sel.items():
                keep = torch.ones(self.layer(name).size)
                keep[chans] = 0.0
                handles.append(self.output(name).register_forward_hook(_make_mask_hook(keep)))
            yield
        finally:
            for h in handles:
                h.remove()


def _make_mask_hook(keep: torch.Tensor):
    cache: dict[tuple, torch.Tensor] = {}

    def hook(_module: nn.Module, _inputs, output: torch.Tensor) -> torch.Tensor:
        key = (output.device, output.dtype)
        k = cache.get(key)
        if k is None:
            k = cache[key] = keep.to(device=output.device, dtype=output.dtype).view(1, -1, 1, 1)
        return output * k

    return hook


def normalize_selection(selection: Mapping[str, Sequence[int]]) -> Selection:
    """Sorted channel lists with empty layers dropped (no model needed)."""
    return {str(n): sorted(int(c) for c in chans) for n, chans in selection.items() if len(chans)}
