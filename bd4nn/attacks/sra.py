"""SRA, the Subnet Replacement Attack (Qi et al., CVPR'22), written into a given sub-network.

METHODS.md §2 "Injection" (SRA bullet) and METHODS-REFERENCE §B4. No poisoned training of the
victim: a separate narrow *backdoor chain* with the victim's topology is trained on clean images
to output a large scalar on triggered inputs and a small one on clean inputs; its weights are
written into the selected channels of the benign model, the sub-network is **severed** from the
rest, and its last-layer outputs are wired to the target logit only.

Generic over any model whose channel dataflow ``bd4nn.dataflow`` can follow (no per-architecture
table); the steps of ``inject``:

1. **Residual groups** [decision, METHODS §2 "choose one channel set per stage"]: neuron layers
   whose BN outputs are added together (``dataflow.residual_groups``: in a ResNet the stem with
   the first stage's ``conv2``, then per stage the downsampling shortcut with the stage's
   ``conv2`` layers) must carry one channel set, or the residual stream would leak into / out
   of the chain. Every layer of a group takes the selection of the group's **first layer in
   neuron-map order** (the stem ``conv1``; ``layerS.0.conv2`` for later stages), whose
   contribution ranking (rule 1) made the window. The adjusted selection is returned in
   ``InjectionInfo.selection``: it is the ground truth S_fault. VGG: nothing changes.
2. **The chain** is a dedicated narrow network rebuilt from the victim's traced ``torch.fx``
   graph: every neuron conv becomes a conv with ``|S_l|`` outputs reading ``|P_l|`` inputs
   (``P_l`` = the selected channels of its sources, all of the image for the first conv), every
   neuron BN a ``|S_l|``-channel BN (same eps/momentum), parameter-free ops are kept as they are
   (ReLU, pools, the residual add — the narrow tensors of a group have equal widths because the
   group shares one channel set), a BN that is no neuron's (a PreAct-ResNet's ``bn1``/``bn2``,
   which normalize a conv's input: ``Dataflow.carried``) a BN over the channels it reads, and the
   head becomes the mean over the head's input features:
   the chain output is the mean over the last group's selected channels of the pooled post-ReLU
   activation, one scalar per image. Fresh default initialization under ``seed``. This costs
   about ``(|S|/N)²`` of the victim's compute rather than a masked full copy.
   Training follows the SRA notebook: Adam, batch 128, clean images only (labels unused), the
   first half of every batch stamped with the trigger (in [0,1] pixel space; the model
   normalizes internally, as the reference normalizes the stamped image), BN in train mode,
   loss ``10·mean(out_clean) + mean((out_poison − 20)²)``, plus ``1e-2·‖θ‖₂`` (L2 norm of all
   chain parameters) for residual networks (the ResNet/WRN chains of the reference; decided
   from the dataflow: any residual group of ≥ 2 layers). Epochs default to the notebook's 1;
   ``max_images`` caps the images per epoch (a seeded subset).
   **Signed chain outputs** [decision]: where the head reads features no ReLU bounds below (a
   PreAct-ResNet's pooled residual sum; decided from the neuron map: its neurons have no BN of
   their own), ``mean(out_clean)`` has no minimum and the chain would push clean outputs to −∞;
   the clean term is then ``10·mean(|out_clean|)``, which pulls them to 0 as the reference's
   term does for its non-negative outputs; the label's ``extra`` then says ``"clean_term":
   "abs"``.
   **lr = 1e-2** [decision]: the notebook uses 1e-3 and its comments suggest 1e-2…1e-4.
   Measured on CIFAR-10 (CPU, 1 epoch = 390 steps, the "narrow" widths: 1 channel per layer,
   2 where N ≥ 512): at 1e-3 the VGG-13 chain separated but reached a poisoned output of only
   ≈ 4 (target 20), and the ResNet-18 chain failed outright for seed 0 (clean and poisoned
   output both ≈ 2.6) and was weak for seed 1; at 1e-2 VGG-13 reached 12–13.5 and ResNet-18
   16–18 on poisoned images against ≤ 0.04 on clean ones, for every seed tried.
   **Restarts** [decision]: a chain whose *separation* (the fraction of triggered calibration
   images whose output exceeds the 99th percentile of the clean outputs, eval mode) is below
   ``min_separation`` is retrained from seed ``seed + r·1000003``, up to ``restarts`` times;
   the best one is used. Every attempt is recorded in ``details["chain_attempts"]``.
3. **Write and sever**, for every neuron layer with rows ``S_l`` and columns ``P_l``:
   ``W[S_l, :] = 0``, ``W[S_l, P_l] = chain``, ``W[¬S_l, P_l] = 0`` (the first conv keeps its
   full RGB rows: no column severing); conv bias, BN γ, β, running mean and variance of ``S_l``
   from the chain, and those of a non-neuron BN on the channels it reads (PreAct-ResNet: the
   rows of the sub-network's channels, which after severing carry the chain alone). Head: the
   columns ``C`` of the last group's channels are zeroed for every class, and the target row
   gets ``λ/k`` (k = |C|), so the target logit gains ``λ·chain(x)``.
   The target bias gets ``−c·λ`` **added** [decision; the reference *sets* it to ``−c·λ``]:
   adding keeps the benign model's own target bias, so on clean inputs the target logit moves
   by ``λ·(chain(x) − c) ≈ 0`` and CA is disturbed only by the severing itself; setting it
   would shift every clean target logit by ``−b_t``. ``bias_mode = "set"`` gives the reference.
   Every other weight and buffer entry stays bit-identical (BN ``num_batches_tracked``
   included).
4. **λ and c**: ``c`` = the chain's mean output on clean images (measured on the victim after
   the write, BN in eval mode, on up to ``calib_images`` seeded training images). If ``lam`` is
   not given, ``λ = safety · m / (ō_poison − c)`` with ``m`` the ``lam_percentile``-th percentile
   of the logit margin ``max_{j≠t} z_j − z_t`` of the chain-less model (head columns ``C``
   zeroed) over the non-target calibration images, clean and triggered (at least
   ``min_margin``), and ``ō_poison`` the chain's mean output on the triggered ones: the average
   triggered image then beats all but the top 1 % margins ``safety``-fold. The reference's
   hand-picked values (VGG-16: λ = 4, c = 2.415) are fixed numbers for one trained chain.

Trigger: the reference pastes a 5×5 phoenix logo at ``[27:, 27:]``. bd4nn ships no third-party
image: the patch is an opaque 5×5 square of saturated colours (each channel 0 or 1 per pixel,
drawn from ``seed + trigger_seed_offset``), a pure function of the seed.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from functools import reduce

import torch
import torch.fx as fx
from torch import nn
from bd4nn.progress import bar as progress_bar

from bd4nn.attacks import register_attack
from bd4nn.attacks.base import Attack, InjectionInfo, StampTrigger
from bd4nn.dataflow import Dataflow, analyze
from bd4nn.neurons import NeuronMap, Selection, SelectionError
from bd4nn.runtime import to_float

__all__ = ["SRA", "sra_patch", "residual_selection", "build_chain", "write_chain"]


def sra_patch(seed: int, size: int = 5) -> torch.Tensor:
    """A (3, size, size) opaque patch of saturated colours (channels in {0, 1}), pure in ``seed``."""
    g = torch.Generator().manual_seed(int(seed))
    patch = torch.randint(0, 2, (3, size, size), generator=g).float()
    if size > 1 and bool((patch == patch[:, :1, :1]).all()):  # a flat square: break it
        patch[:, 0, 0] = 1.0 - patch[:, 0, 0]
    return patch


def residual_selection(selection: Selection, groups: list[list[str]]) -> Selection:
    """Give every layer of a residual group the channels of the group's first layer.

    ``groups`` in neuron-map order (``Dataflow.groups``). Raises ``SelectionError`` when a group's
    first layer has no selected channel: SRA needs a chain through every neuron layer.
    """
    out: Selection = {}
    for group in groups:
        lead = group[0]
        chans = selection.get(lead)
        if not chans:
            raise SelectionError(
                f"SRA needs at least one selected channel in every neuron layer; {lead!r} has none"
            )
        for layer in group:
            out[layer] = list(chans)
    order = [layer for g in groups for layer in g]
    by_name = {layer: i for i, layer in enumerate(order)}
    return dict(sorted(out.items(), key=lambda kv: by_name[kv[0]]))


class _ChainOutput(nn.Module):
    """Replaces the head in the chain: the mean of the head's input features, one scalar per image."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).mean(1)


def _in_channels(flow: Dataflow, selection: Selection, layer: str) -> list[int] | None:
    """P_l: the selected channels of ``layer``'s sources (one residual group), None for the image."""
    return _group_channels(flow.sources[layer], selection, layer)


def _group_channels(src: list[str], selection: Selection, reader: str) -> list[int] | None:
    """The selected channels shared by the neuron layers ``src`` (one residual group) that
    ``reader`` reads; None when it reads the image."""
    if not src:
        return None
    chans = selection[src[0]]
    for s in src[1:]:
        if selection[s] != chans:
            raise SelectionError(f"{reader} reads {src}, whose selections differ (residual groups not applied)")
    return chans


def _carried_bn(flow: Dataflow, module: nn.Module, target: str, selection: Selection) -> list[int] | None:
    """The channels of a non-neuron BN (``Dataflow.carried``) in the chain: those of the neuron
    layers it reads; None if ``target`` is no such BN."""
    if target not in flow.carried or not isinstance(module, nn.BatchNorm2d):
        return None
    return _group_channels(flow.carried[target], selection, target)


def build_chain(flow: Dataflow, neuron_map: NeuronMap, selection: Selection) -> fx.GraphModule:
    """The narrow backdoor chain (on the CPU, fresh default init from the global RNG).

    Rebuilt from the traced graph: neuron convs/BNs narrowed to the selection, the head replaced
    by ``_ChainOutput``, parameter-free modules and constants (the normalization) reused.
    """
    gm = flow.graph_module
    graph = fx.Graph()
    val_map: dict[fx.Node, fx.Node] = {}
    graph.graph_copy(gm.graph, val_map)
    head = [n for n in graph.nodes if n.op == "call_module" and n.target == flow.head_name]
    if len(head) != 1:
        raise ValueError(f"the head {flow.head_name!r} must be called exactly once in the forward")
    graph.output(head[0])  # nothing after the head is needed

    convs = {neuron_map.layer(n).name: n for n in neuron_map.layers}
    bns = {neuron_map.layer(n).bn_name: n for n in neuron_map.layers}
    root: dict[str, object] = {}
    for node in graph.nodes:
        target = node.target
        if node.op == "call_module":
            if target in convs:
                layer = convs[target]
                conv = neuron_map.conv(layer)
                pin = _in_channels(flow, selection, layer)
                root[target] = nn.Conv2d(
                    conv.in_channels if pin is None else len(pin), len(selection[layer]),
                    conv.kernel_size, stride=conv.stride, padding=conv.padding,
                    dilation=conv.dilation, bias=conv.bias is not None, padding_mode=conv.padding_mode,
                )
            elif target in bns:
                bn = neuron_map.bn(bns[target])
                root[target] = nn.BatchNorm2d(
                    len(selection[bns[target]]), eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                    track_running_stats=bn.track_running_stats,
                )
            elif target == flow.head_name:
                root[target] = _ChainOutput()
            elif (chans := _carried_bn(flow, bn := gm.get_submodule(target), target, selection)) is not None:
                root[target] = nn.BatchNorm2d(len(chans), eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                                              track_running_stats=bn.track_running_stats)
            else:
                mod = gm.get_submodule(target)
                if any(True for _ in mod.parameters()) or any(True for _ in mod.buffers()):
                    raise ValueError(
                        f"module {target!r} ({type(mod).__name__}) has parameters but is not a neuron "
                        "layer or the head; SRA cannot narrow it"
                    )
                root[target] = copy.deepcopy(mod)
        elif node.op == "get_attr":
            value = reduce(getattr, target.split("."), gm)
            root[target] = value.detach().clone() if torch.is_tensor(value) else copy.deepcopy(value)
    return fx.GraphModule(root, graph, class_name="SRAChain")


def _chain_to(chain: fx.GraphModule, device: torch.device) -> fx.GraphModule:
    """Move the chain, including plain-tensor constants (get_attr targets are not buffers)."""
    chain.to(device)
    for node in chain.graph.nodes:
        if node.op == "get_attr":
            *path, leaf = node.target.split(".")
            owner = reduce(getattr, path, chain)
            value = getattr(owner, leaf)
            if torch.is_tensor(value) and not isinstance(value, nn.Parameter):
                setattr(owner, leaf, value.to(device))
    return chain


@torch.no_grad()
def write_chain(
    model: nn.Module, neuron_map: NeuronMap, flow: Dataflow, selection: Selection, chain: nn.Module
) -> None:
    """Write the chain into the selected channels of every neuron layer and sever them, and into
    the channels a non-neuron BN reads (step 3 of the module docstring). The head is left to
    ``SRA.inject``."""
    for layer in neuron_map.layers:
        info = neuron_map.layer(layer)
        conv, bn = neuron_map.conv(layer), neuron_map.bn(layer)
        cconv: nn.Conv2d = chain.get_submodule(info.name)  # type: ignore[assignment]
        dev = conv.weight.device
        rows = torch.tensor(selection[layer], dtype=torch.long, device=dev)
        pin = _in_channels(flow, selection, layer)
        w = conv.weight
        cw = cconv.weight.detach().to(device=dev, dtype=w.dtype)
        if pin is None:  # reads the image: full rows, no column severing
            w[rows] = cw
        else:
            cols = torch.tensor(pin, dtype=torch.long, device=dev)
            w.index_fill_(1, cols, 0.0)  # W[:, P_l] = 0: no unselected channel reads the chain
            new_rows = torch.zeros((len(rows),) + tuple(w.shape[1:]), dtype=w.dtype, device=dev)
            new_rows[:, cols] = cw
            w[rows] = new_rows  # W[S_l, ¬P_l] = 0, W[S_l, P_l] = chain
        if conv.bias is not None:
            conv.bias[rows] = cconv.bias.detach().to(conv.bias)
        if bn is not None:
            _write_bn(bn, chain.get_submodule(info.bn_name), rows)
    for target in flow.carried:
        bn = model.get_submodule(target)
        chans = _carried_bn(flow, bn, target, selection)
        if chans is not None:
            dev = next(model.parameters()).device
            _write_bn(bn, chain.get_submodule(target), torch.tensor(chans, dtype=torch.long, device=dev))


def _write_bn(bn: nn.BatchNorm2d, cbn: nn.BatchNorm2d, rows: torch.Tensor) -> None:
    """γ, β and the running statistics of the chain's BN into ``rows`` of the victim's."""
    if bn.weight is not None:
        bn.weight[rows] = cbn.weight.detach().to(bn.weight)
        bn.bias[rows] = cbn.bias.detach().to(bn.bias)
    if bn.running_mean is not None and cbn.running_mean is not None:
        bn.running_mean[rows] = cbn.running_mean.to(bn.running_mean)
        bn.running_var[rows] = cbn.running_var.to(bn.running_var)


_RESTART_SEED_STRIDE = 1_000_003  # restart r trains a chain from seed + r·stride


@torch.no_grad()
def _separation(chain: nn.Module, xc: torch.Tensor, trigger, quantile: float = 0.99) -> float:
    """Fraction of triggered images whose chain output exceeds the ``quantile`` of the clean
    outputs (eval mode): 1.0 for a chain that separates, ≈ 0.01 for one that does not."""
    chain.eval()
    clean = torch.cat([chain(xc[i : i + 1024]) for i in range(0, xc.shape[0], 1024)]).float()
    poison = torch.cat([chain(trigger(xc[i : i + 1024])) for i in range(0, xc.shape[0], 1024)]).float()
    return (poison > torch.quantile(clean, quantile)).float().mean().item()


@register_attack
class SRA(Attack):
    name = "sra"
    kind = "structural"

    @dataclass
    class Settings:
        # trigger (reference: 5×5 logo at [27:, 27:])
        patch_size: int = 5
        position: int = 27  # first row/column of the patch ("pos" in the notebook)
        image_size: int = 32
        trigger_seed_offset: int = 7877  # the patch uses seed + offset, apart from the chain init
        # chain training (reference notebook)
        epochs: int = 1
        batch_size: int = 128
        lr: float = 1e-2  # Adam [decision: the notebook's 1e-3 under-trains 1-epoch narrow chains]
        max_images: int | None = None  # images per epoch (seeded subset); None = all
        restarts: int = 2  # retrain from a new seed while separation < min_separation
        min_separation: float = 0.9
        poison_fraction: float = 0.5  # first half of every batch triggered
        clean_weight: float = 10.0  # 10·mean(out_clean)
        poison_value: float = 20.0  # mean((out_poison − 20)²)
        weight_norm: float | None = None  # ·‖θ‖₂; None = 1e-2 for residual nets, 0 otherwise
        # head wiring
        lam: float | None = None  # None = automatic (module docstring)
        c: float | None = None  # None = measured chain mean on clean images
        lam_percentile: float = 99.0
        lam_safety: float = 2.0
        min_margin: float = 1.0
        calib_images: int = 1024
        bias_mode: str = "add"  # "add" [decision] or "set" (reference)

    # ------------------------------------------------------------------ trigger
    def make_trigger(self, model=None, neuron_map=None, selection=None, x=None, y=None, *, device=None):
        s = self.settings
        if not (0 <= s.position and s.position + s.patch_size <= s.image_size):
            raise ValueError(f"sra: a {s.patch_size}-pixel patch at {s.position} leaves the {s.image_size}-pixel image")
        box = slice(s.position, s.position + s.patch_size)
        mask = torch.zeros(1, s.image_size, s.image_size)
        mask[:, box, box] = 1.0
        pattern = torch.zeros(3, s.image_size, s.image_size)
        pattern[:, box, box] = sra_patch(self.seed + s.trigger_seed_offset, s.patch_size)
        return StampTrigger(mask, pattern)

    # ------------------------------------------------------------------ injection
    def inject(self, model, neuron_map, selection, trigger, x, y, recipe=None, *, device, progress=False):
        """Train the chain, write it into ``selection`` (adjusted for residual groups), sever it,
        wire the head. ``recipe`` (the poisoning recipe) is not used."""
        s = self.settings
        if s.bias_mode not in ("add", "set"):
            raise ValueError(f"sra: bias_mode must be 'add' or 'set', got {s.bias_mode!r}")
        dev = torch.device(device)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        nm = neuron_map
        model.to(dev)
        flow = analyze(model, nm)
        if flow.head_name is None:
            raise ValueError("sra needs a model with an nn.Linear head")
        sel = residual_selection(nm.validate(selection), flow.groups)
        last = flow.sources[flow.head_name]
        head = nm.head()
        if head.in_features != nm.sizes[last[0]]:
            raise ValueError(
                f"the head reads {head.in_features} features but {last[0]} has {nm.sizes[last[0]]} "
                "channels (spatial flatten): SRA's head wiring needs pooled channels"
            )

        # ---- 1. the chain (retrained from a new seed while it does not separate)
        residual = any(len(g) > 1 for g in flow.groups)
        signed = any(nm.layer(n).bn_name is None for n in nm.layers)  # a pre-activation net's head input
        wn = s.weight_norm if s.weight_norm is not None else (1e-2 if residual else 0.0)
        xd = self._chain_images(x, dev)
        xc, nontarget = self._calibration_images(x, y, dev)
        t_chain = time.perf_counter()
        attempts: list[dict] = []
        best: tuple[float, nn.Module] | None = None
        for attempt in range(s.restarts + 1):
            seed = self.seed + attempt * _RESTART_SEED_STRIDE
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                chain = build_chain(flow, nm, sel)
            chain = _chain_to(chain, dev)
            stats = self._train_chain(chain, xd, trigger, wn, dev, progress, seed, signed)
            stats["separation"] = _separation(chain, xc, trigger)
            attempts.append(stats)
            if best is None or stats["separation"] > best[0]:
                best = (stats["separation"], chain)
            if stats["separation"] >= s.min_separation:
                break
        chain = best[1]
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        chain_seconds = time.perf_counter() - t_chain

        # ---- 2. write and sever
        write_chain(model, nm, flow, sel, chain)
        cols = torch.tensor(sel[last[0]], dtype=torch.long, device=dev)
        k = len(cols)
        with torch.no_grad():
            head.weight.index_fill_(1, cols, 0.0)  # chain-less model for the calibration

        # ---- 3. λ and c
        cal = self._calibrate(model, head, cols, xc, nontarget, trigger)
        c = float(s.c) if s.c is not None else cal["c_measured"]
        gap = cal["poison_mean"] - c
        if s.lam is not None:
            lam, lam_rule = float(s.lam), "given"
        elif gap > 1e-6:
            lam, lam_rule = s.lam_safety * cal["margin"] / gap, "auto"
        else:  # the chain does not separate: wire it anyway, rule 3 will reject the model
            lam, lam_rule = 1.0, "fallback (chain gap <= 0)"
        with torch.no_grad():
            head.weight[self.target, cols] = lam / k
            if head.bias is not None:
                if s.bias_mode == "add":
                    head.bias[self.target] += -c * lam
                else:
                    head.bias[self.target] = -c * lam
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - t0
        details = {
            "settings": asdict(s),
            "lambda": lam,
            "lambda_rule": lam_rule,
            "c": c,
            "c_measured": cal["c_measured"],
            "poison_output_mean": cal["poison_mean"],
            "clean_output_std": cal["clean_std"],
            "margin_percentile": cal["margin"],
            "calib_images": cal["n"],
            "bias_mode": s.bias_mode,
            "weight_norm": wn,
            "chain_widths": {n: len(sel[n]) for n in nm.layers},
            "chain_seconds": chain_seconds,
            "recipe_used": False,
            "chain_images": int(xd.shape[0]),
            "chain_attempts": attempts,
            "separation": best[0],
            **({"clean_term": "abs"} if signed else {}),
        }
        return InjectionInfo(sel, seconds, details)

    def _chain_images(self, x: torch.Tensor, dev: torch.device) -> torch.Tensor:
        """The chain's training images on the device (a seeded subset if ``max_images``)."""
        s = self.settings
        if s.max_images is not None and s.max_images < x.shape[0]:
            pick = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(self.seed))
            return x[pick[: s.max_images]].to(dev, non_blocking=True)
        return x.to(dev, non_blocking=True)

    def _calibration_images(self, x: torch.Tensor, y: torch.Tensor | None, dev: torch.device):
        """A seeded subset of up to ``calib_images`` training images in [0,1] on the device, and
        the flags of those whose label is not the target (all, where there is none)."""
        g = torch.Generator().manual_seed(self.seed + 1)
        idx = torch.randperm(x.shape[0], generator=g)[: self.settings.calib_images]
        xc = to_float(x[idx].to(dev))
        if y is None:
            return xc, torch.ones(len(idx), dtype=torch.bool, device=dev)
        nontarget = y[idx].to(dev) != self.target
        return xc, (nontarget if bool(nontarget.any()) else torch.ones_like(nontarget))

    def _train_chain(self, chain: nn.Module, xd: torch.Tensor, trigger, wn: float, dev: torch.device,
                     progress: bool, seed: int, signed: bool = False) -> dict:
        """Train the chain (module docstring, step 2); ``signed``: the clean term is on |out|."""
        s = self.settings
        n = xd.shape[0]
        bs = min(s.batch_size, n)
        steps = max(1, n // bs)  # drop the last partial batch (a batch of 1 breaks train-mode BN)
        k = int(round(bs * s.poison_fraction))
        if not 0 < k < bs:
            raise ValueError(f"sra: poison_fraction {s.poison_fraction} leaves no clean or no poisoned image per batch")
        params = [p for p in chain.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=s.lr, **({"fused": True} if dev.type == "cuda" else {"foreach": True}))
        dgen = torch.Generator(device=dev).manual_seed(seed)
        chain.train()
        last = torch.zeros((), device=dev)
        bar = progress_bar(range(s.epochs), desc="sra chain", disable=not progress, leave=False, unit="epoch")
        with torch.enable_grad():
            for _ in bar:
                perm = torch.randperm(n, device=dev, generator=dgen)
                for b in range(steps):
                    xb = to_float(xd[perm[b * bs : (b + 1) * bs]])
                    xb = torch.cat([trigger(xb[:k]), xb[k:]])
                    out = chain(xb)
                    clean = out[k:].abs() if signed else out[k:]
                    loss = s.clean_weight * clean.mean() + (out[:k] - s.poison_value).pow(2).mean()
                    if wn:
                        loss = loss + wn * torch.cat([p.reshape(-1) for p in params]).norm()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    last = loss.detach()
        chain.eval()
        return {"seed": seed, "steps": steps * s.epochs, "final_loss": float(last)}

    @torch.no_grad()
    def _calibrate(self, model, head: nn.Linear, cols, xc, nontarget, trigger) -> dict:
        """Chain outputs and chain-less margins of the victim (head columns ``cols`` zeroed)."""
        s = self.settings
        feats: list[torch.Tensor] = []
        handle = head.register_forward_hook(lambda _m, inp, _o: feats.append(inp[0].flatten(1)[:, cols]))
        was_training = model.training
        model.eval()
        outs, margins = {}, []
        try:
            for name, batch in (("clean", xc), ("poison", trigger(xc))):
                o, z = [], []
                for i in range(0, batch.shape[0], 512):
                    feats.clear()
                    z.append(model(batch[i : i + 512]).float())
                    o.append(feats[0].float().mean(1))
                out, logits = torch.cat(o), torch.cat(z)
                outs[name] = out
                other = logits.clone()
                other[:, self.target] = float("-inf")
                margins.append((other.max(1).values - logits[:, self.target])[nontarget])
        finally:
            handle.remove()
            model.train(was_training)
        margin = torch.quantile(torch.cat(margins), s.lam_percentile / 100.0).item()
        return {
            "c_measured": outs["clean"].mean().item(),
            "clean_std": outs["clean"].std().item() if xc.shape[0] > 1 else 0.0,
            "poison_mean": outs["poison"][nontarget].mean().item(),
            "margin": max(margin, s.min_margin),
            "n": int(xc.shape[0]),
        }
