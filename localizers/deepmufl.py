"""deepmufl (Ghanbari et al., ASE'23): mutation-based fault localization, per neuron (channel).

METHODS.md §3 item 5, METHODS-REFERENCE.md §A5 and §F.6. Sources for the formulas and counts:
deepmufl ``src/metallaxis.py``, ``src/muse.py``, ``src/mutation_executor.py``.

**Mutants.** For every neuron (output channel ``c`` of neuron layer ``l``) eight mutants, in
``MUTANTS`` order: its conv filter ``W[c]`` +1, −1, ×2, ×0.5, and its bias +1, −1, ×2, ×0.5, the
bias being the conv bias ``b[c]`` where the conv has one (VGG) and BN ``β[c]`` otherwise (ResNet).
A pre-activation network's neuron (``bd4nn.preact``) has neither: its bias mutants act on the
conv's absent bias as on a zero one (``z_c ± 1``; ``× s`` leaves the model as it is, so those
two mutants flip no test) [decision: it keeps eight mutants per neuron in every model].
These are deepmufl's four value mutators (it chains +1, −2, ×2, ÷4 with restores, which yields
the same four mutants); deepmufl applies them to whole conv layers, the channel granularity is
METHODS' decision (§F.6).

**Tests and counts.** Tests = the clean data; *failing* = the model under study misclassifies it,
*passing* = classifies it correctly (``P``, ``F`` the counts). Per mutant: ``n_f2p`` (failing
tests it now classifies correctly), ``n_p2f`` (passing tests it now misclassifies), ``n_i_f``
(failing tests whose prediction changed) and ``n_i_p`` (= ``n_p2f`` for classification).

**Scores** (higher = more suspicious). Default: Metallaxis type 1 (``e_f = n_f2p``,
``e_p = n_p2f``) with Ochiai ``e_f / sqrt(F (e_f + e_p))``, max over the neuron's 8 mutants.
``formula="sbi"`` (``e_f / (e_f + e_p)``), ``metallaxis_type=2`` (``e_f = n_i_f``,
``e_p = n_i_p``) and ``aggregation="mean"`` give deepmufl's other Metallaxis variants (both are 0
when ``e_f + e_p = 0`` or ``F = 0``). ``formula="muse"``: ``(1/8) Σ_m |n_f2p(m)/F − α n_p2f(m)/P|``
with ``α = (f2p(e)/F)(p2f(e)/P)``, ``f2p(e)`` / ``p2f(e)`` the numbers of *distinct* failing /
passing tests that any mutant of the neuron flips (deepmufl's ``muse.py``; a term is 0 when its
``F`` or ``P`` is 0; deepmufl identifies tests by their bytes, we by index).

**A mutant is not a copied model.** A mutant of channel ``c`` changes only channel ``c`` of its
conv's output ``z``, by a closed form (``x`` the conv input, ``b_c`` its bias or 0):

* ``W[c] ± 1``: ``z_c ± S`` with ``S = conv(x, ones)``, the receptive-field sum of the input
  computed by the same conv (stride, padding, dilation, groups) with an all-ones kernel, so zero
  padding is handled exactly (padded positions contribute 0 to both);
* ``W[c] × s``: ``z_c + (s − 1)(z_c − b_c)``, i.e. ``s (z_c − b_c) + b_c``;
* conv bias ``± 1`` / ``× s``: ``z_c ± 1`` / ``z_c + (s − 1) b_c``;
* BN ``β[c] ± 1`` / ``× s``: the BN output's channel ``c`` plus ``± 1`` / ``(s − 1) β_c``.

These are identities of real arithmetic (the conv is linear in its weight); in floating point
they differ from a rebuilt mutant only by rounding, which the tests check (in float64 the counts
equal those of explicitly built mutants). BN runs normally on the mutated conv output, so no BN
algebra is involved (eval mode, running statistics).

**Suffix-only batched execution.** The model is traced once with ``torch.fx`` (no copy: the
graph calls the model's own modules). For a layer, the *dependent* nodes are the conv node and
everything downstream of it; all other nodes (the prefix, and in ResNet the shortcut / identity
operand of every residual add whose other operand is downstream) do not depend on the mutation.
One clean pass per test batch evaluates the whole graph once and keeps the values that some
layer's dependent part reads. Then, for a chunk of ``M`` mutants (any mix of channels and
kinds), the conv node's value is the clean ``z`` repeated ``M`` times (rows mutant-major,
``m·B + t``) with each mutant's channel replaced as above, and only the dependent nodes run, on
``M·B`` rows. An operand a dependent node reads from the clean pass is expanded to match: for
``+ − ×`` by broadcasting a ``(M, B, …)`` view against ``(1, B, …)`` (no copy), else by repeating
it. This is exact by construction: every dependent node receives, per row block ``m``, exactly
the tensors it would receive in a forward pass of mutant ``m`` on the ``B`` tests, because a
non-dependent value is by definition the same in every mutant. Before use, each layer's plan is
checked on the first batch: two no-op mutants must reproduce the clean logits. Models that
cannot be traced, or whose graph the fx backend cannot express (``_FxUnsupported``), fall back
to a hook backend: the whole model runs on the repeated batch and a forward hook on the conv
(and BN) substitutes the channels — still exact and copy-free, but the prefix is recomputed per
mutant. Nothing else falls back (a failed no-op check is a bug and raises), and which backend
ran, with the reason for a fallback, is in ``report()`` and so in every results case.

**Cost and defaults.** Work ≈ 8 × Σ_l C_l × (suffix MACs after layer l) per test: for a
full-width CIFAR VGG-13 ≈ 1.26 TMAC per test, ≈ 6.3 PFLOP for 2,500 tests. ``tf32=True`` (on
CUDA; PyTorch's own default for cuDNN convs) lets the convs use TF32 tensor cores; ``amp=True``
adds bf16 autocast (≈ 2× faster again, but bf16 rounding can flip the prediction of tests with a
tiny logit margin, which then shows up as spurious flips in every mutant). On the CPU ``tf32`` is
ignored and, unless ``amp`` asks for the bf16 proxy of the CUDA path (``bd4nn.runtime``),
everything is exact fp32 (or the model's own dtype) and deterministic.
``max_tests`` (default None = all clean images) takes a seeded subset for budgets.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn
from bd4nn.progress import bar as progress_bar

from bd4nn.neurons import NeuronMap
from bd4nn.runtime import autocast as _autocast, cuda_path, frozen, model_device, to_float
from localizers.base import Localizer, LocalizerError, register_localizer

log = logging.getLogger(__name__)

__all__ = ["DeepMufl", "MUTANTS", "MutationResult", "mutant_counts", "metallaxis", "muse", "aggregate"]

#: (target, operation, value); target "w" = the conv filter W[c], "b" = the bias (conv b[c], else BN β[c])
MUTANTS = (("w", "add", 1.0), ("w", "add", -1.0), ("w", "mul", 2.0), ("w", "mul", 0.5),
           ("b", "add", 1.0), ("b", "add", -1.0), ("b", "mul", 2.0), ("b", "mul", 0.5))
# per kind: coefficient of S, coefficient of (z_c - b_c), coefficient of 1, coefficient of the bias value
_COEF = torch.tensor([[1, 0, 0, 0], [-1, 0, 0, 0], [0, 1, 0, 0], [0, -0.5, 0, 0],
                      [0, 0, 1, 0], [0, 0, -1, 0], [0, 0, 0, 1], [0, 0, 0, -0.5]], dtype=torch.float64)
_BROADCAST_OPS = {operator.add, operator.sub, operator.mul, torch.add, torch.sub, torch.mul}


@dataclass
class MutationResult:
    """Outcome of running every mutant of some layers on the tests."""

    counts: dict[str, torch.Tensor]  # layer -> int64 (channels, 8, 4): n_f2p, n_p2f, n_i_f, n_i_p
    pred: torch.Tensor  # (N,) the model's own predictions on the tests
    passing: torch.Tensor  # (N,) bool
    f2p_distinct: dict[str, torch.Tensor]  # layer -> (channels,) distinct failing tests any mutant fixes
    p2f_distinct: dict[str, torch.Tensor]  # layer -> (channels,) distinct passing tests any mutant breaks
    backend: str  # "fx" or "hooks"
    fallback: str | None = None  # why the fx backend could not run the model (then "hooks" ran)

    @property
    def n_fail(self) -> int:
        return int((~self.passing).sum())

    @property
    def n_pass(self) -> int:
        return int(self.passing.sum())


# ------------------------------------------------------------------------- mutation algebra
class _Layer:
    """Per-layer constants: the conv, its bias / BN β, the all-ones kernel, the kind table."""

    def __init__(self, name: str, neuron_map: NeuronMap):
        self.name = name
        self.conv_name, self.out_name = neuron_map.layer(name).name, neuron_map.layer(name).output_name
        self.conv: nn.Conv2d = neuron_map.conv(name)
        self.bn: nn.BatchNorm2d | None = neuron_map.bn(name)  # None: a pre-activation net's conv
        self.size = neuron_map.sizes[name]
        w = self.conv.weight
        dev = w.device
        self.has_conv_bias = self.conv.bias is not None
        # bias mutants act on the conv output (its bias, or a zero one without BN) or on BN β
        self.bias_on_conv = self.has_conv_bias or self.bn is None
        zeros = torch.zeros(self.size, device=dev, dtype=torch.float32)
        self.conv_b = self.conv.bias.detach().float() if self.has_conv_bias else zeros
        beta = self.bn.bias.detach().float() if self.bn is not None and self.bn.bias is not None else zeros
        self.bias_val = self.conv_b if self.bias_on_conv else beta  # the mutated bias value per channel
        g = self.conv.groups
        self.ones = torch.ones(g, w.shape[1], *w.shape[2:], device=dev, dtype=w.dtype)
        self.per_group = self.size // g
        self.coef = _COEF.to(device=dev, dtype=torch.float32)

    def receptive_sum(self, x: torch.Tensor) -> torch.Tensor:
        """``conv(x, ones)`` per group, (B, groups, H, W), same stride / padding / dilation."""
        c = self.conv
        ones = self.ones.to(dtype=x.dtype) if x.dtype != self.ones.dtype else self.ones
        if c.padding_mode != "zeros":
            return c._conv_forward(x, ones, None)  # handles the padding mode (groups: ones has g rows)
        return nn.functional.conv2d(x, ones, None, c.stride, c.padding, c.dilation, c.groups)

    def mutate_conv(self, z: torch.Tensor, s_map: torch.Tensor, ch: torch.Tensor, kind: torch.Tensor,
                    channels_last: bool) -> torch.Tensor:
        """The conv output of ``M`` mutants, (M·B, C, H, W): ``z`` repeated, channel ``ch[m]`` of
        block ``m`` replaced by its mutated value (conv-level mutants; BN-β mutants leave it)."""
        m, b = ch.numel(), z.shape[0]
        coef = self.coef[kind]  # (M, 4)
        if not self.bias_on_conv:
            coef = coef.clone()
            coef[:, 2:] = 0  # bias mutants act on BN β instead (see add_beta)
        zc = z[:, ch].transpose(0, 1).float()  # (M, B, H, W)
        sc = s_map[:, ch // self.per_group].transpose(0, 1).float()
        bc = self.conv_b[ch].view(m, 1, 1, 1)
        bv = self.bias_val[ch].view(m, 1, 1, 1)
        c = [coef[:, i].view(m, 1, 1, 1) for i in range(4)]
        new = zc + c[0] * sc + c[1] * (zc - bc) + (c[2] + c[3] * bv)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        out = z.unsqueeze(0).expand(m, *z.shape).reshape(m * b, *z.shape[1:]).contiguous(memory_format=fmt)
        out.view(m, b, *z.shape[1:])[torch.arange(m, device=z.device), :, ch] = new.to(z.dtype)
        return out

    def add_beta(self, y: torch.Tensor, ch: torch.Tensor, kind: torch.Tensor) -> torch.Tensor:
        """BN output of the mutants: add β-mutants' shifts (conv without bias, with a BN, only)."""
        if self.bias_on_conv:
            return y
        m = ch.numel()
        coef = self.coef[kind]
        shift = coef[:, 2] + coef[:, 3] * self.bias_val[ch]  # (M,)
        if not bool((shift != 0).any()):
            return y
        yv = y.view(m, y.shape[0] // m, *y.shape[1:])
        idx = torch.arange(m, device=y.device)
        yv[idx, :, ch] = (yv[idx, :, ch].float() + shift.view(m, 1, 1, 1)).to(y.dtype)
        return y


# ------------------------------------------------------------------------- fx backend
class _FxUnsupported(LocalizerError):
    """The model has a structure the fx backend cannot express (the one reason to fall back)."""


class _FxRunner:
    """Clean pass once per test batch, then only the mutation-dependent nodes per mutant chunk."""

    backend = "fx"

    def __init__(self, model: nn.Module, layers: Sequence[_Layer]):
        self.model = model
        graph = fx.Tracer().trace(model)
        self.nodes = list(graph.nodes)
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise _FxUnsupported("deepmufl fx backend: the model must take one input")
        self.input = placeholders[0]
        self.output = next(n for n in self.nodes if n.op == "output")
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self.modules = dict(model.named_modules())
        batched: set[fx.Node] = set()
        for n in self.nodes:
            if n is self.input or any(a in batched for a in n.all_input_nodes):
                batched.add(n)
        self.batched = batched
        self.plans = {}
        keep: set[fx.Node] = {n for n in self.nodes if n not in batched and n.op != "output"}
        for layer in layers:
            convs = [n for n in self.nodes if n.op == "call_module" and n.target == layer.conv_name]
            bns = [n for n in self.nodes if n.op == "call_module" and n.target == layer.out_name]
            if len(convs) != 1 or len(bns) != 1 or len(convs[0].all_input_nodes) != 1:
                raise _FxUnsupported(f"deepmufl fx backend: conv/BN of {layer.name} not called exactly once")
            conv = convs[0]
            dep = {conv}
            for n in self.nodes[self.order[conv] + 1:]:
                if any(a in dep for a in n.all_input_nodes):
                    dep.add(n)
            if bns[0] not in dep or self.output not in dep:
                raise _FxUnsupported(f"deepmufl fx backend: {layer.name} does not reach the output through its BN")
            dep_nodes = sorted(dep, key=self.order.__getitem__)
            reads = {a for n in dep_nodes[1:] for a in n.all_input_nodes if a not in dep}
            keep |= reads | {conv, conv.all_input_nodes[0]}
            last = {}
            for n in dep_nodes[1:]:
                for a in n.all_input_nodes:
                    if a in dep:
                        last[a] = n
            free_after: dict[fx.Node, list[fx.Node]] = {}
            for a, n in last.items():
                free_after.setdefault(n, []).append(a)
            self.plans[layer.name] = (conv, bns[0], dep_nodes[1:], free_after)
        self.keep = keep
        last_use = {}
        for n in self.nodes:
            for a in n.all_input_nodes:
                last_use[a] = n
        self.clean_free: dict[fx.Node, list[fx.Node]] = {}
        for a, n in last_use.items():
            if a not in keep:
                self.clean_free.setdefault(n, []).append(a)

    def _call(self, node: fx.Node, args, kwargs):
        if node.op == "call_module":
            return self.modules[node.target](*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "get_attr":
            obj = self.model
            for part in node.target.split("."):
                obj = getattr(obj, part)
            return obj
        raise _FxUnsupported(f"deepmufl fx backend: unsupported node {node.op}")

    def clean(self, x: torch.Tensor):
        """Evaluate the whole graph on the tests; returns (logits, env of kept values)."""
        env: dict[fx.Node, object] = {}
        for n in self.nodes:
            if n.op == "placeholder":
                env[n] = x
                continue
            args = fx.node.map_arg(n.args, env.__getitem__)
            if n.op == "output":
                out = args[0]
                break
            env[n] = self._call(n, args, fx.node.map_arg(n.kwargs, env.__getitem__))
            for a in self.clean_free.get(n, ()):
                env.pop(a, None)
        if not torch.is_tensor(out):
            raise _FxUnsupported("deepmufl fx backend: the model must return one logits tensor")
        return out, env

    def conv_io(self, env, layer: _Layer):
        conv = self.plans[layer.name][0]
        return env[conv.all_input_nodes[0]], env[conv]

    def mutants(self, env, layer: _Layer, ch, kind, zexp: torch.Tensor, b: int, m: int, stats=None):
        conv, bn, dep_nodes, free_after = self.plans[layer.name]
        denv: dict[fx.Node, object] = {conv: zexp}
        expanded: dict[fx.Node, object] = {}

        def fetch(a):
            if a in denv:
                return denv[a]
            v = env[a]
            if a in self.batched and torch.is_tensor(v) and v.dim() > 0:
                if v.shape[0] != b:
                    raise _FxUnsupported("deepmufl fx backend: a clean operand is not batch-first")
                if a not in expanded:
                    expanded[a] = v.unsqueeze(0).expand(m, *v.shape).reshape(m * b, *v.shape[1:])
                return expanded[a]
            return v

        for n in dep_nodes:
            if n.op == "output":
                out = fx.node.map_arg(n.args, fetch)[0]
                break
            res = None
            if n.op == "call_function" and n.target in _BROADCAST_OPS and len(n.args) == 2 and not n.kwargs:
                a0, a1 = n.args
                if isinstance(a0, fx.Node) and isinstance(a1, fx.Node) and (a0 in denv) != (a1 in denv):
                    d, c = (a0, a1) if a0 in denv else (a1, a0)
                    dv, cv = denv[d], env[c]
                    if (c in self.batched and torch.is_tensor(dv) and torch.is_tensor(cv)
                            and cv.dim() == dv.dim() and cv.shape[0] == b and dv.shape[1:] == cv.shape[1:]):
                        dvv, cvv = dv.view(m, b, *dv.shape[1:]), cv.unsqueeze(0)
                        res = (n.target(dvv, cvv) if d is a0 else n.target(cvv, dvv)).view(dv.shape)
            if res is None:
                res = self._call(n, fx.node.map_arg(n.args, fetch), fx.node.map_arg(n.kwargs, fetch))
            if n is bn:
                res = layer.add_beta(res, ch, kind)
            if stats is not None and torch.is_tensor(res) and res.dim() > 0:
                stats[0] = max(stats[0], res.numel() * res.element_size() // max(1, m * b))
            denv[n] = res
            for a in free_after.get(n, ()):
                denv.pop(a, None)
        return out


# ------------------------------------------------------------------------- hook backend
class _HookRunner:
    """Fallback for untraceable models: the whole model on the repeated batch; a forward hook
    on the conv substitutes the mutated channels, one on the BN adds β shifts."""

    backend = "hooks"

    def __init__(self, model: nn.Module, layers: Sequence[_Layer]):
        self.model = model

    def clean(self, x):
        captured = {}
        return self.model(x), captured

    def conv_io(self, env, layer):
        return None, None

    def mutants(self, env, layer: _Layer, ch, kind, x: torch.Tensor, b: int, m: int, stats=None,
                channels_last: bool = False):
        def conv_hook(_mod, inputs, output):
            xin, z = inputs[0][:b], output[:b]
            return layer.mutate_conv(z, layer.receptive_sum(xin), ch, kind, channels_last)

        def bn_hook(_mod, _inputs, output):
            return layer.add_beta(output, ch, kind)

        def measure(_mod, _inputs, output):
            if torch.is_tensor(output) and output.dim() > 0:
                stats[0] = max(stats[0], output.numel() * output.element_size() // (m * b))

        handles = [layer.conv.register_forward_hook(conv_hook)]
        if layer.bn is not None:
            handles.append(layer.bn.register_forward_hook(bn_hook))
        if stats is not None:
            handles += [mod.register_forward_hook(measure) for mod in self.model.modules()]
        try:
            xr = x.unsqueeze(0).expand(m, *x.shape).reshape(m * b, *x.shape[1:])
            if channels_last:
                xr = xr.contiguous(memory_format=torch.channels_last)
            return self.model(xr)
        finally:
            for h in handles:
                h.remove()


# ------------------------------------------------------------------------- driver
@contextmanager
def _precision(dev: torch.device, tf32: bool):
    if dev.type != "cuda":
        yield
        return
    old = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


@torch.no_grad()
def mutant_counts(
    model: nn.Module,
    neuron_map: NeuronMap,
    x: torch.Tensor,
    y: torch.Tensor,
    layers: Sequence[str] | None = None,
    *,
    batch_size: int = 512,
    max_rows: int = 32768,
    memory_mb: int = 2048,
    amp: bool = False,
    tf32: bool = True,
    channels_last: bool = False,
    backend: str = "auto",
    progress: bool = False,
) -> MutationResult:
    """Run all 8 mutants of every channel of ``layers`` (default: all) on the tests ``x`` (float
    [0,1], on the model's device) with labels ``y``; the model is used as is (put it in eval
    mode and out of autograd first, as ``DeepMufl`` does). ``batch_size`` tests share one
    clean pass; a suffix forward takes at most ``max_rows`` (mutant × test) rows and an
    expanded activation of at most ``memory_mb``. ``backend``: "auto" (fx, else hooks), "fx",
    "hooks"."""
    dev = x.device
    names = list(layers) if layers is not None else neuron_map.layers
    for mod in model.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.running_mean is None:
            raise LocalizerError("deepmufl needs BatchNorm running statistics (eval-mode BN)")
    pdtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    x = x.to(pdtype)
    y = y.to(dev)
    specs = [_Layer(name, neuron_map) for name in names]
    if backend not in ("auto", "fx", "hooks"):
        raise LocalizerError(f"deepmufl: unknown backend {backend!r}")
    use_amp = bool(amp)
    cl = channels_last and x.dim() == 4
    autocast = lambda: _autocast(dev, use_amp)  # noqa: E731
    # tolerance of the no-op check: it catches structural errors (O(1) logit differences), not rounding
    tol = 5e-2 if use_amp or (dev.type == "cuda" and tf32) else 1e-3
    xv = x[: min(8, x.shape[0])]
    if cl:
        xv = xv.contiguous(memory_format=torch.channels_last)
    runner, row_bytes, why = None, None, None
    for kind in (("fx", "hooks") if backend == "auto" else (backend,)):
        try:
            with _precision(dev, tf32):
                cand = _FxRunner(model, specs) if kind == "fx" else _HookRunner(model, specs)
                row_bytes = _check(cand, specs, xv, cl, autocast, tol)
            runner = cand
            break
        except (fx.proxy.TraceError, _FxUnsupported) as exc:
            # only an untraceable model or a structure the fx backend cannot express falls back
            # to the hooks; any other failure (a failed no-op check included) is a bug: raise it
            if kind != "fx" or backend != "auto":
                raise
            why = exc
            log.warning("deepmufl: the fx backend cannot run this model (%s); using the hook backend", exc)
    if runner is None:
        raise LocalizerError(f"deepmufl: no backend can run this model ({why})") from why
    n_tests, n_mut = x.shape[0], len(MUTANTS)
    kinds = torch.arange(n_mut, device=dev)
    counts = {s.name: torch.zeros(s.size * n_mut, 4, dtype=torch.long, device=dev) for s in specs}
    f2p_any = {s.name: torch.zeros(s.size, n_tests, dtype=torch.int32, device=dev) for s in specs}
    p2f_any = {s.name: torch.zeros(s.size, n_tests, dtype=torch.int32, device=dev) for s in specs}
    preds = []
    bar = progress_bar(total=sum(s.size for s in specs) * n_mut * n_tests, desc="deepmufl mutant×test", unit="run",
               unit_scale=True, disable=not progress, leave=False)
    try:
        with _precision(dev, tf32):
            for start in range(0, n_tests, batch_size):
                xb = x[start : start + batch_size]
                if cl:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                yb = y[start : start + batch_size]
                b = xb.shape[0]
                with autocast():
                    logits, env = runner.clean(xb)
                orig = logits.argmax(1)
                preds.append(orig)
                passing = orig == yb
                for spec in specs:
                    xin, z = runner.conv_io(env, spec)
                    with autocast():
                        s_map = spec.receptive_sum(xin) if xin is not None else None
                    per_fwd = max(1, min(max_rows // b, (memory_mb << 20) // (row_bytes[spec.name] * b)))
                    total = spec.size * n_mut
                    for s in range(0, total, per_fwd):
                        flat = torch.arange(s, min(total, s + per_fwd), device=dev)
                        ch, kind = flat // n_mut, kinds[flat % n_mut]
                        m = flat.numel()
                        out = _run_chunk(runner, env, spec, ch, kind, xb, z, s_map, b, cl, autocast, None)
                        pred = out.argmax(1).view(m, b)
                        correct, changed = pred == yb, pred != orig
                        f2p = correct & ~passing
                        p2f = ~correct & passing
                        cnt = counts[spec.name]
                        cnt[flat, 0] += f2p.sum(1)
                        cnt[flat, 1] += p2f.sum(1)
                        cnt[flat, 2] += (changed & ~passing).sum(1)
                        cnt[flat, 3] += (changed & passing).sum(1)
                        f2p_any[spec.name][:, start : start + b].index_add_(0, ch, f2p.int())
                        p2f_any[spec.name][:, start : start + b].index_add_(0, ch, p2f.int())
                        bar.update(m * b)
                del env
    finally:
        bar.close()
    pred = torch.cat(preds)
    return MutationResult(
        counts={k: v.view(-1, n_mut, 4).cpu() for k, v in counts.items()},
        pred=pred.cpu(),
        passing=(pred == y).cpu(),
        f2p_distinct={k: (v > 0).sum(1).cpu() for k, v in f2p_any.items()},
        p2f_distinct={k: (v > 0).sum(1).cpu() for k, v in p2f_any.items()},
        backend=runner.backend,
        fallback=None if why is None else f"{type(why).__name__}: {why}",
    )


def _run_chunk(runner, env, spec: _Layer, ch, kind, xb, z, s_map, b, cl, autocast, stats=None):
    """Logits (M·B, K) of the mutants (ch[m], kind[m]); ``stats[0]`` gets the largest
    activation's bytes per row."""
    m = ch.numel()
    with autocast():
        if isinstance(runner, _HookRunner):
            return runner.mutants(env, spec, ch, kind, xb, b, m, stats, channels_last=cl)
        zexp = spec.mutate_conv(z, s_map, ch, kind, cl)
        if stats is not None:
            stats[0] = max(stats[0], zexp.numel() * zexp.element_size() // (m * b))
        return runner.mutants(env, spec, ch, kind, zexp, b, m, stats)


@torch.no_grad()
def _check(runner, specs: Sequence[_Layer], xv: torch.Tensor, cl: bool, autocast, tol: float) -> dict[str, int]:
    """Per layer, two no-op mutants (all coefficients 0) must reproduce the clean logits; returns
    the largest activation's bytes per (mutant × test) row, per layer."""
    b = xv.shape[0]
    with autocast():
        logits, env = runner.clean(xv)
    ref = logits.float().repeat(2, 1)
    bound = tol * max(1.0, float(ref.abs().max()))
    rows = {}
    for spec in specs:
        xin, z = runner.conv_io(env, spec)
        with autocast():
            s_map = spec.receptive_sum(xin) if xin is not None else None
        ch = torch.tensor([0, spec.size - 1], device=xv.device)
        kind = torch.zeros(2, dtype=torch.long, device=xv.device)
        saved, spec.coef = spec.coef, torch.zeros_like(spec.coef)  # every mutation scaled to 0
        try:
            stats = [0]
            out = _run_chunk(runner, env, spec, ch, kind, xv, z, s_map, b, cl, autocast, stats)
        finally:
            spec.coef = saved
        if out.shape != ref.shape or not float((out.float() - ref).abs().max()) <= bound:
            raise LocalizerError(f"deepmufl {runner.backend} backend: no-op mutants of {spec.name} do not "
                                 "reproduce the clean logits")
        rows[spec.name] = max(1, stats[0])
    return rows


# ------------------------------------------------------------------------- scores
def metallaxis(counts: torch.Tensor, n_fail: int, formula: str = "ochiai", kind: int = 1) -> torch.Tensor:
    """Per-mutant Metallaxis score from (…, 4) counts (deepmufl ``metallaxis.py``)."""
    c = counts.double()
    e_f, e_p = (c[..., 0], c[..., 1]) if kind == 1 else (c[..., 2], c[..., 3])
    denom = e_f + e_p
    if n_fail == 0:
        return torch.zeros_like(e_f)
    safe = denom.clamp_min(1)
    if formula == "ochiai":
        val = e_f / torch.sqrt(n_fail * safe)
    elif formula == "sbi":
        val = e_f / safe
    else:
        raise LocalizerError(f"unknown Metallaxis formula {formula!r}")
    return torch.where(denom > 0, val, torch.zeros_like(val))


def aggregate(per_mutant: torch.Tensor, how: str = "max") -> torch.Tensor:
    """Per neuron: max or mean over its mutants (last dimension)."""
    if how == "max":
        return per_mutant.max(-1).values
    if how == "mean":
        return per_mutant.mean(-1)
    raise LocalizerError(f"unknown aggregation {how!r}")


def muse(counts: torch.Tensor, n_fail: int, n_pass: int, f2p_distinct: torch.Tensor,
         p2f_distinct: torch.Tensor) -> torch.Tensor:
    """MUSE per neuron (deepmufl ``muse.py``): (1/|M|) Σ_m |n_f2p(m)/F − α n_p2f(m)/P| with
    α = (f2p(e)/F)(p2f(e)/P); a ratio whose denominator is 0 counts as 0."""
    c = counts.double()
    t1 = c[..., 0] / n_fail if n_fail > 0 else torch.zeros_like(c[..., 0])
    t2 = c[..., 1] / n_pass if n_pass > 0 else torch.zeros_like(c[..., 1])
    a1 = f2p_distinct.double() / n_fail if n_fail > 0 else torch.zeros(c.shape[0], dtype=torch.float64)
    a2 = p2f_distinct.double() / n_pass if n_pass > 0 else torch.zeros(c.shape[0], dtype=torch.float64)
    alpha = (a1 * a2)[:, None]
    return (t1 - alpha * t2).abs().sum(-1) / c.shape[-2]


def score_result(result: MutationResult, formula: str = "ochiai", metallaxis_type: int = 1,
                 aggregation: str = "max") -> dict[str, torch.Tensor]:
    out = {}
    for layer, c in result.counts.items():
        if formula == "muse":
            s = muse(c, result.n_fail, result.n_pass, result.f2p_distinct[layer], result.p2f_distinct[layer])
        else:
            s = aggregate(metallaxis(c, result.n_fail, formula, metallaxis_type), aggregation)
        out[layer] = s.float()
    return out


@register_localizer
class DeepMufl(Localizer):
    name = "deepmufl"
    scope = "all"
    summary = "mutation-based: Metallaxis-Ochiai, max over 8 per-channel mutants"

    @dataclass
    class Settings:
        formula: str = "ochiai"  # deepmufl Metallaxis-Ochiai; "sbi" (Metallaxis-SBI) or "muse"
        metallaxis_type: int = 1  # 1: e_f = n_f2p, e_p = n_p2f (default); 2: n_i_f, n_i_p
        aggregation: str = "max"  # over a neuron's 8 mutants (deepmufl reports max and mean)
        max_tests: int | None = None  # None: every clean image; else a seeded subset of this size
        batch_size: int = 512  # tests per clean (prefix) pass
        max_rows: int = 32768  # (mutant × test) rows per suffix forward
        memory_mb: int | None = None  # largest expanded activation per forward; None: 2048 CUDA, 256 CPU
        tf32: bool = True  # CUDA: TF32 convs (PyTorch's cuDNN default); False = strict fp32
        amp: bool = False  # bf16 autocast (CUDA; the CPU as its proxy): faster, noisier predictions
        channels_last: bool | None = None  # None: bd4nn.runtime.cuda_path (on for CUDA)
        progress: bool = True  # tqdm bar (mutant × test runs)

    def scores(self, model, neuron_map, clean, *, device=None, seed=0):
        s = self.settings
        if s.formula not in ("ochiai", "sbi", "muse"):
            raise LocalizerError(f"deepmufl: formula must be ochiai, sbi or muse, not {s.formula!r}")
        if s.aggregation not in ("max", "mean"):
            raise LocalizerError(f"deepmufl: aggregation must be max or mean, not {s.aggregation!r}")
        if s.metallaxis_type not in (1, 2):
            raise LocalizerError(f"deepmufl: metallaxis_type must be 1 or 2, not {s.metallaxis_type!r}")
        if s.max_tests is not None and s.max_tests < 1:
            raise LocalizerError("deepmufl: max_tests must be >= 1 or None")
        dev = torch.device(device) if device is not None else model_device(model)  # placed by Localizer.__call__
        idx = torch.arange(len(clean))
        if s.max_tests is not None and s.max_tests < len(clean):
            g = torch.Generator().manual_seed(int(seed))
            idx = torch.randperm(len(clean), generator=g)[: s.max_tests].sort().values
        x = clean.x[idx].to(dev)
        x = to_float(x)
        y = clean.y[idx].to(dev)
        cuda = dev.type == "cuda"
        with frozen(model):
            result = mutant_counts(
                model, neuron_map, x, y, self.layers(neuron_map),
                batch_size=s.batch_size, max_rows=s.max_rows,
                memory_mb=s.memory_mb if s.memory_mb is not None else (2048 if cuda else 256),
                amp=s.amp, tf32=s.tf32,
                channels_last=s.channels_last if s.channels_last is not None else cuda_path(dev),
                progress=s.progress,
            )
        self.last = {"backend": result.backend, "fallback": result.fallback, "tests": int(len(result.pred)),
                     "failing_tests": result.n_fail}
        return score_result(result, s.formula, s.metallaxis_type, s.aggregation)

    def report(self) -> dict:
        """Which backend ran the last ``scores`` (and why it fell back, if it did), and the tests."""
        return dict(getattr(self, "last", {}))
