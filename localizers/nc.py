"""Neural Cleanse (NC): trigger reverse-engineering, MAD outlier test, activation-gap ranking.

METHODS.md §3 (2), METHODS-REFERENCE.md §A2. Three stages:

1. **Reverse-engineer a trigger for every class at once.** Each class ``k`` has its own mask
   ``m_k ∈ [0,1]^{H×W}`` (broadcast over RGB) and pattern ``p_k ∈ [0,1]^{3×H×W}``, both through
   NC's tanh parameterisation ``v = tanh(θ)/(2−ε) + 0.5``; the stamped image is
   ``x' = (1−m_k)⊙x + m_k⊙p_k`` in pixel space (the model normalizes internally). The loss of
   class ``k`` is ``CE(f(x'), k) + cost_k·||m_k||_1``. The paper runs one class after the
   other; here one mini-batch of clean images is stamped with every active class's trigger
   (a ``(K·B, 3, H, W)`` tensor), the model runs once, and the classes' losses are *summed*:
   class ``k``'s parameters only enter its own term, so its gradient is exactly the one of the
   single-class problem. Adam is applied element-wise (per-class state), and each class has its
   own cost schedule, best-mask record and early stop; a class that stops early leaves the batch.
   The data order depends only on the seed, never on which classes are optimised, so running
   one class alone (``reverse_engineer(..., classes=[k])``) reproduces its batched result.
2. **MAD outlier test** (BB ``defense/nc.py``, NC ``mad_outlier_detection.py``): L1 norms of
   the best masks, median (``median`` setting), ``MAD = 1.4826·median(|L − median|)``,
   anomaly index ``(median − min L)/MAD``; a class is flagged when its norm is below the median
   and its deviation exceeds 2 MADs. The suspect target is the flagged class with the smallest
   norm; when nothing is flagged the smallest-norm class is still used (the ranking needs a
   trigger), and ``infected`` records that the test did not fire.
3. **Neuron ranking** (NC paper §VI, METHODS.md: the last neuron layer): for each channel of
   ``neuron_map.penultimate``, its mean activation as the head reads it (``feature``) on clean
   images stamped with the suspect trigger minus the same mean on the clean images; higher =
   more suspicious.

After ``scores`` the instance exposes ``search`` (a ``TriggerSearch``: masks, patterns, norms,
…), ``norms`` ``{class: L1}``, ``anomaly_index``, ``flagged``, ``target``, ``infected`` and
``report()`` (a JSON-able summary).

Settings: one source, BackdoorBench (BB, ``SCLBD/BackdoorBench``: ``defense/nc.py`` and
``config/defense/nc/cifar10.yaml``), the NC implementation the benchmark studies compare with
and the one whose budget (80 epochs over the clean subset) fits the harness; the original NC
(``bolunwang/backdoor``: ``visualizer.py``, ``gtsrb_visualize_example.py``,
``mad_outlier_detection.py``) differs where noted. Issue 11 measured why one source matters: on
a CIFAR-10 VGG-13 the target's reversed mask norm was 12.2 with BB's settings (BB itself: 11.9)
and 18.8 with the earlier mix of both.

* ``epochs`` 80 (``nc_epoch``), ``batch_size`` 256 (yaml; NC: 1000 steps of 31 mini-batches of
  32). One *epoch* is one pass over the clean data in shuffled mini-batches (the last one may be
  smaller); the cost schedule, the best-mask record and the early stop act once per epoch on
  the mean of the per-mini-batch attack accuracies and mask norms. With 2,500 clean images and
  10 classes this is 800 Adam steps per class at 2,560 stamped images per forward pass.
* ``lr`` 0.1 (``mask_lr``), ``betas`` (0.5, 0.9), ``adam_eps`` 1e-8 (torch's Adam, nc.py; NC's
  Keras Adam: 1e-7).
* ``init_cost`` 1e-3, ``cost_multiplier`` 2 (up ×2, down ÷2**1.5), ``patience`` 5,
  ``reset_cost_to_zero`` False (every label starts at ``init_cost``; NC starts at 0 and sets
  ``init_cost`` after ``patience`` successful epochs).
* ``attack_succ_threshold`` 0.98 (``atk_succ_threshold`` 98.0 %; NC 0.99), ``early_stop`` on,
  ``early_stop_threshold`` 0.99 (NC's example script 1.0), ``early_stop_patience`` 25.
* ``init`` "ones": mask and pattern start at tanh(1)/(2−ε)+0.5 ≈ 0.88 (``np.ones`` as the tanh
  parameters; NC: uniform [0,1), "random"). ``tanh_eps`` 1e-7 (``EPSILON``); we divide by
  (2−ε) as NC, BB by (2+ε): a relative difference of 1e-7.
* ``augment`` True: BB's clean subset goes through its train transform (random crop, padding
  4, horizontal flip); NC feeds images unaugmented.
* ``unreached`` "first": a class that never reaches the threshold keeps the mask and pattern of
  its *first* epoch (BB); "last" keeps the final ones (NC).
* ``median`` "torch": BB's outlier test uses ``torch.median``, the *lower* of the two middle
  values for 10 classes; "numpy" is NC's ``np.median`` (their mean). ``mad_threshold`` 2,
  ``mad_consistency`` 1.4826 (both sources).
* ``feature`` "head": the neuron ranking (stage 3) is taken on the feature the classifier reads
  (the pooled head input), as for FP; neither BB (which unlearns) nor NC's repository ranks
  neurons, and the NC paper ranks "neurons of the second-to-last layer", i.e. that feature.
  "neuron" ranks the post-ReLU BN output of the last conv layer before pooling (the earlier
  default).
* Blending: BB stamps in normalized space, bd4nn in pixel space with the model normalizing
  internally; per-channel normalization is affine, so the two stamped images are the same.
* ``amp`` False: fp32 like the original. ``True`` runs the forward passes under bf16 autocast
  (CUDA, or the CPU proxy of the CUDA path): about 2x faster, but *not* speed only. Measured with
  ``bench/precision.py`` on eight `small` entries (docs/results/bf16-rank-agreement.md), the
  neuron ranking's Spearman ρ against fp32 was 0.73 on average and −0.13 on one entry (bf16
  rounding can make the trigger search settle on another class), so fp32 is the default
  [decision, measured]. ``channels_last`` defaults to on for CUDA, off on CPU (on with
  ``BD4NN_BF16=1``, ``bd4nn.runtime``): speed only
  [decision]; the optimisation itself stays in fp32 (parameters, Adam, losses).
* ``score_batch_size`` 500: batching of the final ranking pass (no effect on results).

Cost: every epoch runs ``num_classes × N`` stamped images forward and backward (input gradient
only), e.g. 80 × 10 × 2,500 = 2 M for CIFAR-10 with the 5 % clean set; early-stopped classes
leave the batch. Memory: one forward holds ``num_classes × batch_size`` images (2,560 for
CIFAR-10); with many classes (GTSRB: 43) lower ``batch_size``. The ≤ 30 s VGG-13/H100 target
has not been measured yet (no GPU was available when this was written).

Best-result rule (NC ``visualizer.py``, BB ``train_step``): after an epoch whose mean attack
accuracy is ≥ the threshold and whose mean mask L1 is below the best so far, the mask and
pattern *at the end of that epoch* are kept, and the reported norm is the L1 of that kept mask
(as NC's ``mad_outlier_detection`` reads the saved mask). A class that never reaches the
threshold keeps its first epoch's mask and pattern as BB does (``unreached``; ``reached``
False). The model is frozen and in eval mode throughout; the clean images are never modified.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bd4nn.capture import capture
from bd4nn.neurons import NeuronMap
from bd4nn.train import augment as _augment
from bd4nn.runtime import autocast, cuda_path, frozen, model_device, to_float
from localizers.base import CleanData, Localizer, LocalizerError, register_localizer

__all__ = ["NeuralCleanse", "TriggerSearch", "reverse_engineer", "mad_outliers", "activation_gap"]


# ----------------------------------------------------------------------------- helpers


def _median(v: torch.Tensor, kind: str = "torch") -> torch.Tensor:
    """The median as BB computes it (``torch.median``: the lower of the two middle values for an
    even count) or as NC does (``np.median``: their mean)."""
    s = v.flatten().sort().values
    n = s.numel()
    if n % 2 or kind == "torch":
        return s[(n - 1) // 2]
    return (s[n // 2 - 1] + s[n // 2]) / 2


def _to_unit(theta: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.tanh(theta) / (2 - eps) + 0.5


def _from_unit(v: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.atanh(((v - 0.5) * (2 - eps)).clamp(-1 + 1e-6, 1 - 1e-6))


# -------------------------------------------------------------------- MAD outlier test


def mad_outliers(norms: Sequence[float] | torch.Tensor, threshold: float = 2.0, consistency: float = 1.4826,
                 median: str = "torch"):
    """NC's MAD test. Returns ``(anomaly_index, flagged, median, mad)``; ``flagged`` lists the
    class indices below the median whose deviation exceeds ``threshold`` MADs, smallest norm
    first. ``median``: "torch" (BB, the lower middle value) or "numpy" (NC, the mean of the two)."""
    if median not in ("torch", "numpy"):
        raise LocalizerError(f"nc: median must be 'torch' or 'numpy', not {median!r}")
    v = torch.as_tensor(norms, dtype=torch.float64).flatten()
    med = _median(v, median)
    dev = (v - med).abs()
    mad = consistency * _median(dev, median)
    if mad > 0:
        idx = dev / mad
    else:  # all deviations' median is 0: any deviation at all is an infinite outlier
        idx = torch.where(dev > 0, torch.full_like(dev, math.inf), torch.zeros_like(dev))
    anomaly = float(idx[int(v.argmin())])
    flagged = [int(k) for k in range(v.numel()) if v[k] <= med and idx[k] > threshold]
    flagged.sort(key=lambda k: (float(v[k]), k))
    return anomaly, flagged, float(med), float(mad)


# ---------------------------------------------------------------- trigger reverse-engineering


@dataclass
class TriggerSearch:
    """What the all-class trigger search found (tensors on CPU, rows in ``classes`` order)."""

    classes: list[int]
    masks: torch.Tensor  # (K, 1, H, W) best masks in [0,1]
    patterns: torch.Tensor  # (K, 3, H, W) best patterns in [0,1]
    norms: torch.Tensor  # (K,) L1 of the best masks
    reached: torch.Tensor  # (K,) bool: the attack threshold was met in some epoch
    epochs_run: list[int]
    final_costs: list[float]
    final_masks: torch.Tensor  # (K, 1, H, W) masks after the last update
    final_patterns: torch.Tensor
    history: list[dict] = field(default_factory=list)  # per epoch: class -> (acc, reg, cost)


class _Schedule:
    """NC's per-class cost schedule, best-mask rule and early stop (one instance per class)."""

    def __init__(self, s) -> None:
        self.s = s
        self.cost = 0.0 if s.reset_cost_to_zero else s.init_cost
        self.set_counter = self.up_counter = self.down_counter = 0
        self.up_flag = self.down_flag = False
        self.reg_best = math.inf
        self.es_counter = 0
        self.es_reg_best = math.inf
        self.stopped = False
        self.epochs = 0

    def update(self, acc: float, reg: float) -> bool:
        """One epoch's mean attack accuracy and mask L1; returns whether to keep the mask."""
        s = self.s
        self.epochs += 1
        keep = acc >= s.attack_succ_threshold and reg < self.reg_best
        if keep:
            self.reg_best = reg
        if s.early_stop:
            if self.reg_best < math.inf:
                if self.reg_best >= s.early_stop_threshold * self.es_reg_best:
                    self.es_counter += 1
                else:
                    self.es_counter = 0
            self.es_reg_best = min(self.es_reg_best, self.reg_best)
            if self.up_flag and self.down_flag and self.es_counter >= s.early_stop_patience:
                self.stopped = True
                return keep
        if self.cost == 0 and acc >= s.attack_succ_threshold:
            self.set_counter += 1
            if self.set_counter >= s.patience:
                self.cost = s.init_cost
                self.up_counter = self.down_counter = 0
                self.up_flag = self.down_flag = False
        else:
            self.set_counter = 0
        if acc >= s.attack_succ_threshold:
            self.up_counter += 1
            self.down_counter = 0
        else:
            self.up_counter = 0
            self.down_counter += 1
        if self.up_counter >= s.patience:
            self.up_counter = 0
            self.cost *= s.cost_multiplier
            self.up_flag = True
        elif self.down_counter >= s.patience:
            self.down_counter = 0
            self.cost /= s.cost_multiplier**1.5
            self.down_flag = True
        return keep


def reverse_engineer(
    model: nn.Module,
    clean: CleanData,
    classes: Sequence[int] | None = None,
    settings: Any = None,
    *,
    device: torch.device | str | None = None,
    seed: int = 0,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> TriggerSearch:
    """Reverse-engineer NC triggers for ``classes`` (default: all) as one batched problem.

    ``init``: optional ``(masks (C,1,H,W), patterns (C,3,H,W))`` in [0,1] for *all*
    ``clean.num_classes`` classes (default: drawn from the seed as ``settings.init`` says).
    The model is used as is (frozen, eval mode inside); it must live on ``device``.
    """
    s = settings if settings is not None else NeuralCleanse.Settings()
    dev = torch.device(device) if device is not None else model_device(model)
    num_classes = int(clean.num_classes)
    cls = list(range(num_classes)) if classes is None else [int(c) for c in classes]
    if not cls or any(not 0 <= c < num_classes for c in cls) or len(set(cls)) != len(cls):
        raise LocalizerError(f"nc: classes must be distinct labels in [0, {num_classes}), got {cls}")
    amp = bool(s.amp)
    cl = s.channels_last if s.channels_last is not None else cuda_path(dev)
    eps = float(s.tanh_eps)
    _, _, h, w = clean.x.shape
    x_all = clean.x.to(dev)  # read only
    n = x_all.shape[0]

    gen = torch.Generator(device=dev)
    gen.manual_seed(int(seed))
    if init is not None:
        m0, p0 = (t.to(dev, torch.float32) for t in init)
        if m0.shape != (num_classes, 1, h, w) or p0.shape != (num_classes, 3, h, w):
            raise LocalizerError(f"nc: init must be ({num_classes},1,{h},{w}) and ({num_classes},3,{h},{w})")
    elif s.init == "random":  # NC: uniform [0,1) for every class, drawn before any selection
        m0 = torch.rand(num_classes, 1, h, w, generator=gen, device=dev)
        p0 = torch.rand(num_classes, 3, h, w, generator=gen, device=dev)
    elif s.init == "ones":  # BB: the tanh-space parameters start at 1
        m0 = _to_unit(torch.ones(num_classes, 1, h, w, device=dev), eps)
        p0 = _to_unit(torch.ones(num_classes, 3, h, w, device=dev), eps)
    else:
        raise LocalizerError(f"nc: init must be 'random' or 'ones', not {s.init!r}")
    sel = torch.tensor(cls, device=dev)
    theta_m = _from_unit(m0[sel], eps)
    theta_p = _from_unit(p0[sel], eps)
    adam = {name: torch.zeros_like(t) for name, t in
            (("mm", theta_m), ("vm", theta_m), ("mp", theta_p), ("vp", theta_p))}
    best_m = _to_unit(theta_m, eps).clone()
    best_p = _to_unit(theta_p, eps).clone()
    sched = [_Schedule(s) for _ in cls]
    b1, b2 = s.betas
    step = 0  # Adam step count, shared by every still-active class (they started together)
    history: list[dict] = []
    bs = max(1, int(s.batch_size))

    first_m = first_p = None  # the masks after the first epoch (BB keeps them for unreached classes)
    with frozen(model):
        for _epoch in range(int(s.epochs)):
            active = [i for i, sc in enumerate(sched) if not sc.stopped]
            if not active:
                break
            pos = torch.tensor(active, device=dev)
            tm, tp = theta_m[pos], theta_p[pos]
            st = {k: v[pos] for k, v in adam.items()}
            cost = torch.tensor([sched[i].cost for i in active], device=dev, dtype=torch.float32)
            target = torch.tensor([cls[i] for i in active], device=dev)
            ka = len(active)
            acc_sum = torch.zeros(ka, device=dev)
            reg_sum = torch.zeros(ka, device=dev)
            perm = torch.randperm(n, generator=gen, device=dev)
            batches = perm.split(bs)
            for idx in batches:
                xb = x_all[idx]
                if s.augment:
                    xb = _augment(xb, gen, 4, True)
                xb = to_float(xb, copy=True)
                b = xb.shape[0]
                tm.requires_grad_(True)
                tp.requires_grad_(True)
                with torch.enable_grad():
                    m = _to_unit(tm, eps)  # (ka,1,H,W)
                    p = _to_unit(tp, eps)  # (ka,3,H,W)
                    xs = ((1 - m).unsqueeze(1) * xb.unsqueeze(0) + (m * p).unsqueeze(1)).reshape(ka * b, 3, h, w)
                    if cl:
                        xs = xs.contiguous(memory_format=torch.channels_last)
                    with autocast(dev, amp):
                        logits = model(xs)
                    logits = logits.float()
                    yt = target.repeat_interleave(b)
                    ce = F.cross_entropy(logits, yt, reduction="none").view(ka, b).mean(1)
                    reg = m.sum(dim=(1, 2, 3))
                    loss = ce.sum() + (cost * reg).sum()
                gm, gp = torch.autograd.grad(loss, [tm, tp])
                with torch.no_grad():
                    tm = tm.detach()
                    tp = tp.detach()
                    step += 1
                    bc1 = 1 - b1**step
                    bc2 = 1 - b2**step
                    for th, g, mk, vk in ((tm, gm, "mm", "vm"), (tp, gp, "mp", "vp")):
                        st[mk].mul_(b1).add_(g, alpha=1 - b1)
                        st[vk].mul_(b2).addcmul_(g, g, value=1 - b2)
                        denom = (st[vk] / bc2).sqrt_().add_(s.adam_eps)
                        th.addcdiv_(st[mk], denom, value=-s.lr / bc1)
                    acc_sum += (logits.argmax(1).view(ka, b) == target[:, None]).float().mean(1)
                    reg_sum += reg.detach()
            with torch.no_grad():
                theta_m[pos] = tm
                theta_p[pos] = tp
                for k in adam:
                    adam[k][pos] = st[k]
                cur_m, cur_p = _to_unit(tm, eps), _to_unit(tp, eps)
                if first_m is None:  # every class is active in the first epoch
                    first_m, first_p = cur_m.clone(), cur_p.clone()
                nb = len(batches)
                accs = (acc_sum / nb).tolist()
                regs = (reg_sum / nb).tolist()
            keep = []
            rec = {}
            for j, i in enumerate(active):
                if sched[i].update(accs[j], regs[j]):
                    keep.append(j)
                rec[cls[i]] = (accs[j], regs[j], sched[i].cost)
            history.append(rec)
            if keep:
                kj = torch.tensor(keep, device=dev)
                best_m[pos[kj]] = cur_m[kj]
                best_p[pos[kj]] = cur_p[kj]

    with torch.no_grad():
        final_m, final_p = _to_unit(theta_m, eps), _to_unit(theta_p, eps)
        reached = torch.tensor([sc.reg_best < math.inf for sc in sched])
        keep_final = ~reached.to(dev)
        fall_m, fall_p = (first_m, first_p) if s.unreached == "first" and first_m is not None else (final_m, final_p)
        best_m[keep_final] = fall_m[keep_final]
        best_p[keep_final] = fall_p[keep_final]
    return TriggerSearch(
        classes=cls,
        masks=best_m.cpu(),
        patterns=best_p.cpu(),
        norms=best_m.sum(dim=(1, 2, 3)).cpu(),
        reached=reached,
        epochs_run=[sc.epochs for sc in sched],
        final_costs=[sc.cost for sc in sched],
        final_masks=final_m.cpu(),
        final_patterns=final_p.cpu(),
        history=history,
    )


# --------------------------------------------------------------------------- ranking


@torch.no_grad()
def activation_gap(
    model: nn.Module,
    neuron_map: NeuronMap,
    layer: str,
    clean: CleanData,
    mask: torch.Tensor,
    pattern: torch.Tensor,
    *,
    device: torch.device | str | None = None,
    batch_size: int = 500,
    amp: bool = False,
    feature: str = "head",
) -> torch.Tensor:
    """Per channel of ``layer``: mean activation on stamped minus on clean images. ``feature``
    "head": the head's input (the pooled feature the classifier reads, channel ``c`` = channel
    ``c`` of ``layer``); "neuron": the post-ReLU BN output of ``layer`` over images and positions."""
    if feature not in ("head", "neuron"):
        raise LocalizerError(f"nc: feature must be 'head' or 'neuron', not {feature!r}")
    dev = torch.device(device) if device is not None else model_device(model)
    m = mask.to(dev, torch.float32).reshape(1, 1, *mask.shape[-2:])
    p = pattern.to(dev, torch.float32).reshape(1, 3, *pattern.shape[-2:])
    size = neuron_map.sizes[layer]
    sums = torch.zeros(2, size, dtype=torch.float64, device=dev)
    count = 0
    head = neuron_map.head() if feature == "head" else None
    if head is not None and head.in_features != size:
        raise LocalizerError(f"nc: the head reads {head.in_features} features but {layer} has {size} channels; "
                             "use feature='neuron' for this model")
    feats: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda _m, inp, _o: feats.append(inp[0])) if feature == "head" else None
    try:
        with frozen(model), capture(neuron_map, [layer] if feature == "neuron" else []) as acts:
            for i in range(0, len(clean), batch_size):
                xb = clean.float_batch(i, min(i + batch_size, len(clean)), dev)
                for j, xin in enumerate((xb, (1 - m) * xb + m * p)):
                    feats.clear()
                    with autocast(dev, amp):
                        model(xin)
                    if feature == "head":
                        a = feats[0].float().flatten(1)
                        sums[j] += a.sum(dim=0).double()
                    else:
                        a = acts[layer].float().relu()
                        sums[j] += a.sum(dim=(0, 2, 3)).double()
                count += xb.shape[0] * (1 if feature == "head" else a.shape[2] * a.shape[3])
    finally:
        if handle is not None:
            handle.remove()
    means = sums / count
    return (means[1] - means[0]).float().cpu()


# ------------------------------------------------------------------------- localizer


@register_localizer
class NeuralCleanse(Localizer):
    name = "nc"
    scope = "penultimate"
    summary = "activation increase under the reverse-engineered trigger of the MAD-suspect class"

    @dataclass
    class Settings:
        epochs: int = 80  # BB nc_epoch (NC: 1000 steps of 31 mini-batches)
        batch_size: int = 256  # BB loader batch_size (NC: 32)
        lr: float = 0.1  # NC, BB
        betas: tuple[float, float] = (0.5, 0.9)  # NC, BB
        adam_eps: float = 1e-8  # torch/BB (NC Keras: 1e-7)
        init_cost: float = 1e-3  # NC, BB
        reset_cost_to_zero: bool = False  # BB nc.py: every label starts at init_cost (NC: True)
        attack_succ_threshold: float = 0.98  # BB cifar10.yaml atk_succ_threshold 98.0 (NC: 0.99)
        patience: int = 5  # NC, BB
        cost_multiplier: float = 2.0  # NC example script, BB; down = multiplier**1.5
        early_stop: bool = True  # NC, BB
        early_stop_threshold: float = 0.99  # BB cifar10.yaml (NC example script: 1.0)
        early_stop_patience: int = 25  # NC (5·patience), BB
        tanh_eps: float = 1e-7  # NC (Keras epsilon), BB
        init: str = "ones"  # BB (NC: "random", uniform [0,1))
        augment: bool = True  # BB: the clean subset goes through the train transform, crop 4 + flip (NC: none)
        mad_threshold: float = 2.0  # BB nc.py (= NC)
        mad_consistency: float = 1.4826  # BB nc.py (= NC)
        median: str = "torch"  # BB nc.py torch.median, lower middle value ("numpy": NC np.median)
        unreached: str = "first"  # a class never reaching the threshold keeps its 1st-epoch mask (BB); "last"
        feature: str = "head"  # rank on the feature the head reads ("neuron": pre-pool relu(BN), module doc)
        score_batch_size: int = 500
        amp: bool = False  # fp32 like the original; True = bf16 autocast (bd4nn.runtime.autocast)
        channels_last: bool | None = None  # None = bd4nn.runtime.cuda_path (on for CUDA)

    def __init__(self, **overrides: Any) -> None:
        super().__init__(**overrides)
        self.search: TriggerSearch | None = None
        self.anomaly_index = float("nan")
        self.flagged: list[int] = []
        self.target = -1
        self.infected = False
        self.norms: dict[int, float] = {}
        self._median = self._mad = float("nan")

    def scores(self, model, neuron_map, clean, *, device=None, seed=0):
        s = self.settings
        for key, allowed in (("median", ("torch", "numpy")), ("unreached", ("first", "last")),
                             ("feature", ("head", "neuron"))):
            if getattr(s, key) not in allowed:
                raise LocalizerError(f"nc: {key} must be one of {allowed}, not {getattr(s, key)!r}")
        work, nm = model, neuron_map  # on `device` already (Localizer.__call__)
        dev = torch.device(device) if device is not None else model_device(model)
        search = reverse_engineer(work, clean, None, s, device=dev, seed=seed)
        anomaly, flagged, median, mad = mad_outliers(search.norms, s.mad_threshold, s.mad_consistency, s.median)
        row = flagged[0] if flagged else int(search.norms.argmin())
        self.search = search
        self.anomaly_index = anomaly
        self.flagged = [search.classes[i] for i in flagged]
        self.infected = bool(flagged)
        self.target = search.classes[row]
        self.norms = {c: float(v) for c, v in zip(search.classes, search.norms)}
        self._median, self._mad = median, mad
        amp = bool(s.amp)
        layer = nm.penultimate
        gap = activation_gap(
            work, nm, layer, clean, search.masks[row], search.patterns[row],
            device=dev, batch_size=s.score_batch_size, amp=amp, feature=s.feature,
        )
        return {layer: gap}

    def report(self) -> dict:
        """JSON-able summary of the last ``scores`` call."""
        if self.search is None:
            return {}
        return {
            "target": self.target,
            "infected": self.infected,
            "anomaly_index": self.anomaly_index,
            "flagged": list(self.flagged),
            "norms": dict(self.norms),
            "median": self._median,
            "mad": self._mad,
            "reached": [bool(r) for r in self.search.reached],
            "epochs_run": list(self.search.epochs_run),
        }
