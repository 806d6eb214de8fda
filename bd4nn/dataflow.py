"""Channel dataflow between neuron layers, found by tracing the model (no per-architecture table).

A neuron layer (``NeuronMap``) writes its BN-output channels into the network; everything after it
up to the next conv (ReLU, pooling, identity, flatten, dropout, the residual ``add``) keeps the
channel index, so "which neuron layers' channels does this conv read?" is a walk back through
channel-preserving ops. ``torch.fx.symbolic_trace`` gives the op graph; every activation in it is
labelled with the set of *owners* whose channels it carries:

* the image (a placeholder) is owned by ``IMAGE``;
* a neuron conv's output (and so its BN output) is owned by that layer;
* a channel-preserving op passes its input's owners on;
* an elementwise binary op on two activations (``x + shortcut``) carries the union, and its
  operands' owners are merged into one **residual group**: their channels are summed index by
  index, so a channel set cut out of one of them must be the same channel set in the others.

``sources(model, nm)`` lists, per neuron layer (and for the head, key ``nm.head_name``), the
neuron layers it reads, in neuron-map order; the first conv reads the image → ``[]``.
``residual_groups(model, nm)`` is the partition of the neuron layers into such groups (a plain
VGG: every layer alone; ResNet-18: the stem with ``layer1.*.conv2``, then per stage the
downsampling shortcut with the stage's ``conv2`` layers). ``analyze`` returns both plus the
traced graph (SRA builds its narrow chain from it).

Ops whose channel semantics cannot be followed — ``cat``, channel slicing, a conv without a
following BatchNorm, a second ``Linear``, grouped convs as neurons, unknown modules / functions —
raise ``DataflowError`` naming the node. ``flatten``/``view`` are taken as channel-preserving,
which holds when the spatial map is 1×1 or globally pooled (the consumer checks sizes).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from bd4nn.errors import BadInputError
from bd4nn.neurons import NeuronMap

__all__ = ["DataflowError", "Dataflow", "analyze", "sources", "residual_groups", "IMAGE"]

IMAGE = "<image>"  # owner token of the network input
_LOGITS = "<logits>"  # owner token of the head output

# Modules that keep the channel index (elementwise per channel, or spatial only).
_PRESERVING_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh,
    nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.Softplus,
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
    nn.Identity, nn.Flatten, nn.Dropout, nn.Dropout2d,
    nn.BatchNorm2d,  # a BN that is not a neuron layer's: per-channel affine
)
_PRESERVING_FUNCTIONS = {
    F.relu, torch.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, F.elu, F.hardswish,
    torch.sigmoid, torch.tanh, F.sigmoid, F.tanh,
    F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.dropout,
    torch.flatten, torch.clone, operator.neg, operator.pos, torch.neg,
}
_BINARY_FUNCTIONS = {
    operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
    operator.truediv, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div,
}
_PRESERVING_METHODS = {
    "relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "float", "half", "to", "type_as",
    "view", "reshape", "flatten", "detach", "neg",
}
_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
_SPATIAL_REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
_SCALAR_METHODS = {"size", "dim", "numel"}


class DataflowError(BadInputError):
    """The traced model contains an op whose channel flow bd4nn cannot follow (a ``ValueError``;
    a user error: the architecture given cannot be used where a dataflow is needed, e.g. by SRA)."""


@dataclass
class Dataflow:
    """The result of ``analyze``: per-layer sources, residual groups, and the traced graph."""

    graph_module: fx.GraphModule
    sources: dict[str, list[str]]  # neuron layer (and the head) -> the neuron layers it reads
    groups: list[list[str]]  # partition of the neuron layers, neuron-map order
    head_name: str | None
    # A channel-preserving module with parameters or buffers that is no neuron's (a PreAct BN,
    # which normalizes a conv's input) -> the neuron layers whose channels it reads, map order.
    carried: dict[str, list[str]] = field(default_factory=dict)

    def group_of(self, layer: str) -> list[str]:
        for g in self.groups:
            if layer in g:
                return g
        raise KeyError(layer)


class _UnionFind:
    def __init__(self, items: list[str]) -> None:
        self.parent = {i: i for i in items}

    def find(self, a: str) -> str:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


def _describe(node: fx.Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", repr(node.target))
    return f"node {node.name!r} ({node.op} {target})"


def _dims_exclude_channel(node: fx.Node) -> bool:
    """For ``x.mean(dims)`` and the like: True if the reduced dims leave dim 1 (channels) alone."""
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dims is None:
        return False  # full reduction mixes channels
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    return all(isinstance(d, int) and (d >= 2 or d in (-1, -2)) for d in dims)


def analyze(model: nn.Module, neuron_map: NeuronMap | None = None) -> Dataflow:
    """Trace ``model`` and compute its neuron-layer dataflow (see the module docstring)."""
    nm = neuron_map or NeuronMap(model)
    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:  # noqa: BLE001 - fx raises many kinds
        raise DataflowError(f"{type(model).__name__} is not symbolically traceable: {exc}") from exc
    modules = dict(gm.named_modules())
    layers = nm.layers
    order = {name: i for i, name in enumerate(layers)}
    uf = _UnionFind(layers)
    owners: dict[fx.Node, frozenset[str] | None] = {}  # None: not an activation (constant, shape)
    srcs: dict[str, list[str]] = {}
    carried: dict[str, list[str]] = {}
    neuron_bns = {nm.layer(name).bn_name for name in layers}

    def activation(arg) -> frozenset[str] | None:
        return owners.get(arg) if isinstance(arg, fx.Node) else None

    def read_by(node: fx.Node, reader: str, value: frozenset[str] | None) -> list[str]:
        if value is None:
            raise DataflowError(f"{_describe(node)}: {reader} reads no traced activation")
        if _LOGITS in value:
            raise DataflowError(f"{_describe(node)}: {reader} reads the classifier's output")
        neuron = sorted((o for o in value if o != IMAGE), key=order.__getitem__)
        if IMAGE in value and neuron:
            raise DataflowError(f"{_describe(node)}: {reader} reads the image mixed with neurons {neuron}")
        if reader in srcs:
            raise DataflowError(f"{_describe(node)}: {reader} is called more than once")
        return neuron

    def binary(node: fx.Node, args) -> frozenset[str] | None:
        acts = [a for a in (activation(x) for x in args) if a is not None]
        if not acts:
            return None
        merged = frozenset().union(*acts)
        members = [o for o in merged if o in order]
        if len(acts) > 1:
            if (IMAGE in merged or _LOGITS in merged) and len(merged) > 1:
                raise DataflowError(f"{_describe(node)} combines the image/logits with neuron channels")
            for other in members[1:]:
                uf.union(members[0], other)
        return merged

    for node in gm.graph.nodes:
        value: frozenset[str] | None
        if node.op == "placeholder":
            value = frozenset({IMAGE})
        elif node.op == "get_attr":
            value = None
        elif node.op == "output":
            continue
        elif node.op == "call_module":
            mod = modules[node.target]
            first = activation(node.args[0]) if node.args else None
            if isinstance(mod, nn.Conv2d):
                if node.target not in order:
                    raise DataflowError(
                        f"{_describe(node)}: conv {node.target!r} is not a neuron layer (no BatchNorm "
                        "right after it); its channel mixing cannot be followed"
                    )
                if mod.groups != 1:
                    raise DataflowError(
                        f"{type(model).__name__}: {_describe(node)}: grouped/depthwise conv (groups="
                        f"{mod.groups}) is not supported: its output channel i reads only the input channels "
                        "of its own group, not every channel, which the dataflow (and SRA's dense narrow "
                        "chain built from it) cannot express"
                    )
                srcs[node.target] = read_by(node, node.target, first)
                value = frozenset({node.target})
            elif isinstance(mod, nn.Linear):
                if node.target != nm.head_name:
                    raise DataflowError(f"{_describe(node)}: only the last Linear (the head) is supported")
                srcs[node.target] = read_by(node, node.target, first)
                value = frozenset({_LOGITS})
            elif isinstance(mod, _PRESERVING_MODULES):
                if isinstance(mod, nn.Flatten) and mod.start_dim not in (1, -3):
                    raise DataflowError(f"{_describe(node)}: flatten from dim {mod.start_dim} mixes channels")
                if node.target not in neuron_bns and first is not None and (
                        any(True for _ in mod.parameters()) or any(True for _ in mod.buffers())):
                    if node.target in carried:
                        raise DataflowError(f"{_describe(node)}: {node.target} is called more than once")
                    carried[node.target] = sorted((o for o in first if o in order), key=order.__getitem__)
                value = first
            else:
                raise DataflowError(
                    f"{_describe(node)}: module type {type(mod).__name__} has unknown channel semantics"
                )
        elif node.op == "call_function":
            fn = node.target
            first = activation(node.args[0]) if node.args else None
            if fn in _BINARY_FUNCTIONS:
                value = binary(node, node.all_input_nodes)
            elif fn in _PRESERVING_FUNCTIONS:
                if fn is torch.flatten:
                    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
                    if start not in (1, -3) and first is not None:
                        raise DataflowError(f"{_describe(node)}: flatten from dim {start} mixes channels")
                value = first
            elif fn in (getattr, operator.getitem) and first is None:
                value = None  # e.g. x.shape[0]
            else:
                if not any(activation(a) is not None for a in node.all_input_nodes):
                    value = None  # a function of constants only
                else:
                    raise DataflowError(
                        f"{_describe(node)}: function {getattr(fn, '__name__', fn)} has unknown channel "
                        "semantics (cat / slicing / channel reductions cannot be followed)"
                    )
        elif node.op == "call_method":
            name = node.target
            first = activation(node.args[0]) if node.args else None
            if name in _SCALAR_METHODS:
                value = None
            elif name in _BINARY_METHODS:
                value = binary(node, node.all_input_nodes)
            elif name in _PRESERVING_METHODS:
                value = first
            elif name in _SPATIAL_REDUCE_METHODS and _dims_exclude_channel(node):
                value = first
            elif first is None:
                value = None
            else:
                raise DataflowError(f"{_describe(node)}: method .{name}() has unknown channel semantics")
        else:  # pragma: no cover - fx has no other ops
            raise DataflowError(f"{_describe(node)}: unsupported op {node.op}")
        owners[node] = value

    missing = [name for name in layers if name not in srcs]
    if missing:
        raise DataflowError(f"neuron layers never reached by the traced forward: {missing}")
    if nm.head_name is not None and nm.head_name not in srcs:
        raise DataflowError(f"the head {nm.head_name!r} is never reached by the traced forward")
    # Every activation's owners lie in one group (binary ops merge their operands), so a reader's
    # sources all belong to one residual group.
    for reader, s in srcs.items():
        if len({uf.find(a) for a in s}) > 1:  # pragma: no cover - guaranteed by construction
            raise DataflowError(f"{reader} reads layers of different residual groups: {s}")
    by_root: dict[str, list[str]] = {}
    for name in layers:
        by_root.setdefault(uf.find(name), []).append(name)
    groups = sorted(by_root.values(), key=lambda g: order[g[0]])
    ordered_srcs = {n: srcs[n] for n in layers}
    if nm.head_name is not None:
        ordered_srcs[nm.head_name] = srcs[nm.head_name]
    return Dataflow(gm, ordered_srcs, groups, nm.head_name, carried)


def sources(model: nn.Module, neuron_map: NeuronMap | None = None) -> dict[str, list[str]]:
    """Per neuron layer (and the head, key ``nm.head_name``): the neuron layers whose BN-output
    channels it reads, in neuron-map order; ``[]`` for a layer that reads the image."""
    return analyze(model, neuron_map).sources


def residual_groups(model: nn.Module, neuron_map: NeuronMap | None = None) -> list[list[str]]:
    """The neuron layers partitioned into groups whose channels are added together (directly or
    through an add chain); each group in neuron-map order, groups ordered by first member."""
    return analyze(model, neuron_map).groups
