"""ANP: Adversarial Neuron Perturbation (Wu & Wang, NeurIPS'21), as in the official code.

METHODS.md §3 (3), METHODS-REFERENCE.md §A3 (``csdongxian/ANP_backdoor``,
``optimize_mask_cifar.py`` and ``models/anp_batchnorm.py``). Every BN channel of every neuron
layer (``neuron_map.bn(layer)``) is a neuron with a mask ``m`` (init 1), a multiplicative noise
``δ`` and a bias noise ``ξ``. The clean forward uses BN weight ``γ·m`` and bias ``β``; the
perturbed forward ``γ·(m+δ)`` and ``β·(1+ξ)``. Per iteration, on a batch of clean images:

1. draw ``δ, ξ ~ U(−ε, ε)``;
2. ``steps`` signed-gradient *ascent* steps on ``CE(f_{m+δ, 1+ξ}(x), y)`` w.r.t. ``(δ, ξ)`` with
   step ``ε/steps``; like the code (not the paper) the noise is not projected back to
   ``[−ε, ε]`` (``project_noise`` = True projects);
3. mask loss ``α·CE(f_m(x), y) + (1−α)·CE(f_{m+δ,1+ξ}(x), y)``, one SGD step (momentum, no
   weight decay) on the masks, then clamp to ``[0, 1]``.

Score = ``1 − m``: a low mask (the neuron is pruned first) is suspicious.

Implementation. The caller's model is not replaced or copied (unless ``device`` differs from
its device): a forward hook on each neuron-layer BN turns its output ``out = γ·x̂ + β`` into
``a⊙out + b`` with per-channel ``a = m(+δ)`` and ``b = β⊙(1(+ξ) − a)``, which equals
``γ·a·x̂ + β(1+ξ)``, i.e. the noisy BN above, exactly. A pre-activation network's neuron has no
BN of its own (``bd4nn.preact``): the hook sits on the conv output ``W·x + β`` (``β`` = the conv
bias, 0 when it has none) and gives ``a·W·x + β(1+ξ)``, ANP's perturbation of the neuron's
weights and bias as the paper states it [decision: the original perturbs every BN module,
which in a PreAct block normalizes the *input* of a conv, a residual sum of several convs, not
a neuron of bd4nn's]. ``a`` and ``b`` of all layers are computed
at once from flat (total-channel) tensors, so there is no per-channel Python loop and every
tensor stays on the device. The network weights are out of autograd; only ``m``, ``δ``, ``ξ``
get gradients.

BN mode [decision, following the original]: the original optimises the masks with
``model.train()``, so every BN normalises with the *batch* statistics. We do the same by putting
the BatchNorm modules (only those; any other module stays in eval) in train mode with
``track_running_stats`` switched off for the duration, so batch statistics are used and the
running statistics are neither read nor updated (the original updates the running statistics of
its throw-away copy, which never feed back into the mask optimisation in train mode). Every
module's ``training`` and ``track_running_stats`` flags, every ``requires_grad`` and every hook
are restored on exit, also on an exception: the model comes back bit-identical.
``train_mode_bn`` = False runs with running statistics (eval mode) instead.

Settings and their sources (ANP = the official code's argparse / ``recipe.md``):

* ``eps`` 0.4, ``steps`` 1, ``alpha`` 0.2, ``nb_iter`` 2000, ``batch_size`` 128 (batches drawn
  with replacement), mask SGD ``lr`` 0.2 with ``momentum`` 0.9, constant: ANP. (BB uses lr 0.01
  and batch 256.)
* ``augment`` True with ``crop_padding`` 4 and ``flip``: the original's clean data goes through
  RandomCrop(32, 4) + RandomHorizontalFlip; we keep it (device-side, ``bd4nn.train.augment``)
  [decision: follow the original; set False to use the images as given].
* ``project_noise`` False: the code; True: the paper's projection.
* ``amp`` False: fp32 as the original; ``True`` runs the forward passes under bf16 autocast
  (``bd4nn.runtime.autocast``: CUDA, or the CPU as a proxy of the CUDA path) [decision].
* Clean data: whatever the harness passes (the original draws from 500 images, 1 % of CIFAR-10;
  bd4nn's defender set is 5 %), sampled with replacement from a ``torch.Generator`` seeded with
  ``seed``; batches are drawn and augmented on the device in blocks of iterations.

Cost per iteration: three forward and two backward passes (input/BN-coefficient gradients only)
at ``batch_size`` images; for VGG-13 at batch 128 this is launch-bound, roughly 0.5 k kernels.
The ≤ 15 s VGG-13/H100 target has not been measured yet (no GPU was available when this was
written).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bd4nn.neurons import NeuronMap
from bd4nn.train import augment as _augment
from bd4nn.runtime import autocast, frozen, to_float, working_copy
from localizers.base import CleanData, Localizer, LocalizerError, register_localizer

__all__ = ["ANP", "NoisyBN", "anp_masks"]


@contextmanager
def _anp_mode(model: nn.Module, train_bn: bool):
    """Eval mode and frozen parameters; BatchNorm modules in batch-statistics mode without
    running-stat updates when ``train_bn``. Restores every flag on exit."""
    bns = [(m, m.track_running_stats) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with frozen(model):
        try:
            if train_bn:
                for m, _ in bns:
                    m.training = True
                    m.track_running_stats = False
            yield
        finally:
            for m, t in bns:
                m.track_running_stats = t


class NoisyBN:
    """Forward hooks on the neuron-layer BNs (``NeuronMap.output``: the conv of a pre-activation
    net's neuron) that turn each output ``out`` into ``a⊙out + b``
    per channel, with ``a`` and ``b`` flat over all layers' channels (``set``). With
    ``coefficients`` this is ANP's noisy BN (``γ·a·x̂ + β·(1+ξ)``). A context manager: the hooks
    are removed on exit."""

    def __init__(self, neuron_map: NeuronMap, layers: list[str] | None = None) -> None:
        self.layers = list(layers) if layers is not None else neuron_map.layers
        self.sizes = [neuron_map.sizes[l] for l in self.layers]
        self.bns = [neuron_map.output(l) for l in self.layers]  # the BN, or the conv of a "conv" unit
        if len({id(b) for b in self.bns}) != len(self.bns):
            raise LocalizerError("anp: two neuron layers share one BatchNorm module")
        self._a: list[torch.Tensor] = []
        self._b: list[torch.Tensor] = []
        self._handles: list = []

    def beta(self, device) -> torch.Tensor:
        """The BN biases (conv biases of ``"conv"`` units) of all channels, flat (zeros where a
        module has no bias / no affine parameters)."""
        return torch.cat([
            (b.bias.detach().float() if b.bias is not None else torch.zeros(n)).to(device)
            for b, n in zip(self.bns, self.sizes)
        ])

    @staticmethod
    def coefficients(mask, beta, noise_w=None, noise_b=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a, b)`` of the clean (no noise) or perturbed BN: ``a = m(+δ)``, ``b = β(1(+ξ) − a)``."""
        a = mask if noise_w is None else mask + noise_w
        b = beta * (1 - a) if noise_b is None else beta * (1 + noise_b - a)
        return a, b

    def set(self, a: torch.Tensor, b: torch.Tensor) -> None:
        self._a = [t.view(1, -1, 1, 1) for t in a.split(self.sizes)]
        self._b = [t.view(1, -1, 1, 1) for t in b.split(self.sizes)]

    def _hook(self, i: int):
        def hook(_mod, _inp, out):
            return torch.addcmul(self._b[i], out, self._a[i])
        return hook

    def __enter__(self) -> "NoisyBN":
        try:
            for i, bn in enumerate(self.bns):
                self._handles.append(bn.register_forward_hook(self._hook(i)))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._a, self._b = [], []


def anp_masks(
    model: nn.Module,
    neuron_map: NeuronMap,
    clean: CleanData,
    settings=None,
    *,
    device: torch.device | str | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Optimise ANP's masks; ``{layer: mask in [0,1]}`` (CPU), one value per BN channel."""
    s = settings if settings is not None else ANP.Settings()
    work, dev = working_copy(model, device)
    nm = neuron_map if work is model else NeuronMap(work)
    noisy = NoisyBN(nm)
    layers, sizes = noisy.layers, noisy.sizes
    total = sum(sizes)
    beta = noisy.beta(dev)
    eps = float(s.eps)
    mask = torch.ones(total, device=dev, requires_grad=True)
    noise_w = torch.zeros(total, device=dev, requires_grad=True)
    noise_b = torch.zeros(total, device=dev, requires_grad=True)
    buf = torch.zeros(total, device=dev)
    gen = torch.Generator(device=dev)
    gen.manual_seed(int(seed))
    amp = bool(s.amp)
    ctx = lambda: autocast(dev, amp)  # noqa: E731

    def forward(xb: torch.Tensor, perturbed: bool) -> torch.Tensor:
        if perturbed:
            noisy.set(*NoisyBN.coefficients(mask, beta, noise_w, noise_b))
        else:
            noisy.set(*NoisyBN.coefficients(mask, beta))
        with ctx():
            out = work(xb)
        return out.float()

    x_all = clean.x.to(dev)  # read only
    y_all = clean.y.to(dev).long()
    n = x_all.shape[0]
    bs = int(s.batch_size)
    chunk = max(1, min(int(s.nb_iter), max(1, 8192 // max(1, bs))))  # iterations per pre-drawn block
    lr_noise = eps / max(1, int(s.steps))
    with _anp_mode(work, bool(s.train_mode_bn)), noisy:
        it = 0
        while it < int(s.nb_iter):
            c = min(chunk, int(s.nb_iter) - it)
            idx = torch.randint(0, n, (c * bs,), generator=gen, device=dev)
            xc = x_all[idx]
            if s.augment:
                xc = _augment(xc, gen, int(s.crop_padding), bool(s.flip))
            xc = to_float(xc)
            yc = y_all[idx]
            for j in range(c):
                xb = xc[j * bs : (j + 1) * bs]
                yb = yc[j * bs : (j + 1) * bs]
                if eps > 0:
                    with torch.no_grad():
                        noise_w.uniform_(-eps, eps, generator=gen)
                        noise_b.uniform_(-eps, eps, generator=gen)
                    for _ in range(int(s.steps)):
                        loss = F.cross_entropy(forward(xb, True), yb)
                        gw, gb = torch.autograd.grad(loss, [noise_w, noise_b])
                        with torch.no_grad():
                            noise_w.add_(gw.sign(), alpha=lr_noise)
                            noise_b.add_(gb.sign(), alpha=lr_noise)
                            if s.project_noise:
                                noise_w.clamp_(-eps, eps)
                                noise_b.clamp_(-eps, eps)
                    loss_rob = F.cross_entropy(forward(xb, True), yb)
                else:
                    loss_rob = 0.0
                loss_nat = F.cross_entropy(forward(xb, False), yb)
                loss = s.alpha * loss_nat + (1 - s.alpha) * loss_rob
                (gm,) = torch.autograd.grad(loss, [mask])
                with torch.no_grad():
                    buf.mul_(s.momentum).add_(gm)
                    mask.sub_(buf, alpha=s.lr).clamp_(0.0, 1.0)
            it += c
    m = mask.detach().cpu()
    return {l: t.clone() for l, t in zip(layers, m.split(sizes))}


@register_localizer
class ANP(Localizer):
    name = "anp"
    scope = "all"
    summary = "1 − ANP mask learned under adversarial neuron perturbation"

    @dataclass
    class Settings:
        eps: float = 0.4  # ANP anp_eps
        steps: int = 1  # ANP anp_steps
        alpha: float = 0.2  # ANP anp_alpha
        nb_iter: int = 2000  # ANP
        batch_size: int = 128  # ANP (BB: 256)
        lr: float = 0.2  # ANP mask SGD (BB: 0.01)
        momentum: float = 0.9  # ANP
        augment: bool = True  # ANP: RandomCrop(32, 4) + flip on the clean data
        crop_padding: int = 4  # ANP
        flip: bool = True  # ANP
        project_noise: bool = False  # ANP code (paper: True)
        train_mode_bn: bool = True  # ANP: model.train() during mask optimisation
        amp: bool = False  # fp32 like the original

    def __init__(self, **overrides) -> None:
        super().__init__(**overrides)
        self.masks: dict[str, torch.Tensor] = {}

    def scores(self, model, neuron_map, clean, *, device=None, seed=0):
        self.masks = anp_masks(model, neuron_map, clean, self.settings, device=device, seed=seed)
        return {layer: 1.0 - m for layer, m in self.masks.items()}
