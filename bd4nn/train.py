"""The device-resident training loop: benign training and restricted fine-tuning, plus evaluation.

One loop serves both jobs (DESIGN.md):

* **benign training**: every parameter is trained;
* **restricted fine-tuning** (METHODS.md §2 "Injection", §4 "Neuron fine-tuning"): only a given
  selection is updated — the selected channels' conv filter rows ``W[i]``, conv bias ``b[i]``,
  BN ``γ_i, β_i`` and BN running statistics — and optionally the classifier head. Every other
  parameter **and buffer** stays bit-identical. SGD's weight decay and momentum would move frozen
  entries, and train-mode BN would drift every channel's running statistics, so after every
  optimizer step the loop copies the frozen entries back from a snapshot (the approach
  METHODS.md reports measuring on an H100). BN stays in train mode so that the selected
  channels' running statistics follow their new weights (freezing them collapses CA).

The whole training set lives on the device as uint8; augmentation (random crop with zero padding
4, horizontal flip) runs on the device on each batch; an optional ``batch_hook`` runs after
augmentation (the database issue stamps triggers there, so a patch is not moved by the crop).
On CUDA the loop uses bf16 autocast (on the CPU too with ``BD4NN_BF16=1``,
``bd4nn.runtime.amp_enabled``); on CUDA and on the CPU it runs channels_last
(``bd4nn.runtime.use_channels_last``: faster on both).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn
from bd4nn.progress import bar as progress_bar

from bd4nn.errors import BadInputError, UnknownNameError
from bd4nn.metrics import attack_success_rate, clean_accuracy
from bd4nn.neurons import NeuronMap
from bd4nn.runtime import amp_enabled, autocast, eval_batch_size, to_float, use_channels_last

__all__ = [
    "TrainConfig",
    "TrainResult",
    "BENIGN_RECIPES",
    "benign_recipe",
    "train",
    "augment",
    "predict",
    "evaluate_ca",
    "evaluate_asr",
    "resolve_device",
    "SCHEDULES",
]

BatchHook = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
Trigger = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class TrainConfig:
    """Settings of one training run. The defaults are the benign-training recipe."""

    epochs: int = 30
    batch_size: int = 512
    lr: float = 0.2  # peak learning rate
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "onecycle"  # a key of SCHEDULES
    warmup: float = 0.15  # fraction of steps spent warming up (onecycle, cosine)
    label_smoothing: float = 0.0
    augment: bool = True
    crop_padding: int = 4
    flip: bool = True
    seed: int = 0
    amp: bool | None = None  # bf16 autocast; None = bd4nn.runtime.amp_enabled (CUDA, or BD4NN_BF16=1)
    channels_last: bool | None = None  # None = bd4nn.runtime.use_channels_last (CUDA and CPU)
    drop_last: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


# Benign-training recipes per architecture family (keys: prefixes of model names). They follow
# the usual fast-CIFAR practice (one-cycle SGD with Nesterov momentum, batch 512, label
# smoothing 0.1, bf16 + channels_last on CUDA); the epoch counts are sized for the time
# targets on one H100 (VGG-13 <= 30 s, ResNet-18 <= 90 s) and must be confirmed with
# bench/train_benign.py on a GPU before they are relied on.
BENIGN_RECIPES: dict[str, TrainConfig] = {
    "vgg": TrainConfig(epochs=24, batch_size=512, lr=0.2, weight_decay=5e-4, label_smoothing=0.1),
    "resnet": TrainConfig(epochs=30, batch_size=512, lr=0.2, weight_decay=5e-4, label_smoothing=0.1),
    # MobileNetV2 (issue 16) takes the ResNet recipe until a GPU run tunes it (not measured yet)
    "mobilenet": TrainConfig(epochs=30, batch_size=512, lr=0.2, weight_decay=5e-4, label_smoothing=0.1),
    # PreAct-ResNet-18 (issue 16): the ResNet recipe, likewise untuned
    "preactresnet": TrainConfig(epochs=30, batch_size=512, lr=0.2, weight_decay=5e-4, label_smoothing=0.1),
}


def benign_recipe(arch: str, **overrides) -> TrainConfig:
    """The benign-training config for ``arch`` (longest matching prefix), with overrides."""
    keys = [k for k in BENIGN_RECIPES if arch.startswith(k)]
    if not keys:
        raise UnknownNameError(f"no benign recipe for {arch!r}; known families: {', '.join(BENIGN_RECIPES)}")
    base = BENIGN_RECIPES[max(keys, key=len)]
    return replace(base, **overrides)


@dataclass
class TrainResult:
    seconds: float
    steps: int
    epochs: int
    final_loss: float
    train_accuracy: float  # running accuracy over the last epoch's (augmented) batches
    history: list[dict] = field(default_factory=list)


# --------------------------------------------------------------------- schedules (registry)


def _onecycle(t: float, warmup: float) -> float:
    """Linear warm-up to the peak, then linear decay to 0."""
    if warmup > 0 and t < warmup:
        return t / warmup
    return max(0.0, (1.0 - t) / max(1e-12, 1.0 - warmup))


def _cosine(t: float, warmup: float) -> float:
    """Linear warm-up, then half a cosine down to 0."""
    if warmup > 0 and t < warmup:
        return t / warmup
    u = (t - warmup) / max(1e-12, 1.0 - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, u)))


def _constant(t: float, warmup: float) -> float:
    return 1.0


SCHEDULES: dict[str, Callable[[float, float], float]] = {
    "onecycle": _onecycle,
    "cosine": _cosine,
    "constant": _constant,
}


# -------------------------------------------------------------------------------- helpers


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/"auto" → CUDA if available, else CPU. An unknown device, or a CUDA device this
    machine does not have, is a ``BadInputError`` (a ``ValueError``) that says so (not a torch
    error deep inside)."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise BadInputError(f"unknown device {str(device)!r}; use cpu, cuda, cuda:N or auto") from None
    if dev.type not in ("cpu", "cuda"):
        raise BadInputError(f"device {str(device)!r} is not supported; use cpu, cuda, cuda:N or auto")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BadInputError(f"device {str(device)!r}: no CUDA GPU is visible on this machine; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise BadInputError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return dev


def augment(
    x: torch.Tensor, generator: torch.Generator, padding: int = 4, flip: bool = True
) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip of a batch, on x's device.

    ``x`` is (B, C, H, W) of any dtype; every image gets its own offsets and flip; no Python
    loop over images.
    """
    b, _, h, w = x.shape
    dev = x.device
    if padding > 0:
        xp = F.pad(x, (padding, padding, padding, padding))
        oy = torch.randint(0, 2 * padding + 1, (b,), device=dev, generator=generator)
        ox = torch.randint(0, 2 * padding + 1, (b,), device=dev, generator=generator)
        rows = (oy[:, None] + torch.arange(h, device=dev)[None, :])[:, None, :, None]  # B,1,H,1
        cols = (ox[:, None] + torch.arange(w, device=dev)[None, :])[:, None, None, :]  # B,1,1,W
        bidx = torch.arange(b, device=dev)[:, None, None, None]
        cidx = torch.arange(x.shape[1], device=dev)[None, :, None, None]
        x = xp[bidx, cidx, rows, cols]
    if flip:
        do = torch.rand(b, device=dev, generator=generator) < 0.5
        x = torch.where(do[:, None, None, None], x.flip(3), x)
    return x


# ----------------------------------------------------------------- restricted fine-tuning


class _Restriction:
    """Which entries a restricted run may change, and the snapshot that restores the rest.

    Selections are whole output channels, so the frozen part of every partially trainable tensor
    (conv weight and bias, BN γ/β, BN running statistics) is a set of rows along dim 0: the
    snapshot keeps only those rows, and ``restore`` writes them back in place with one
    ``index_copy_`` per tensor (no per-step allocation of full-size masks or copies).

    A BatchNorm that is no neuron's (every BN of a pre-activation network, ``bd4nn.preact``:
    it normalizes the input of a conv) is frozen whole, and runs in eval mode during the run
    (``train_mode``): in train mode it would normalize with batch statistics that the trained
    channels shift, while the restored running statistics, which the model uses afterwards,
    would not follow, so the trained rows would fit a normalization the model never applies
    [decision; measured on PreAct-ResNet-18 at width 1/8, three-colour data, BadNets at lr 0.05:
    with train-mode BNs the poisoned run reached train accuracy 1.0 but the model then predicted
    the target for every clean test image (CA 0.48), from the restored statistics]. Nothing then
    normalizes the trained channels: such runs need a lower learning rate (the same run diverged
    at lr 0.05 and was stable at 0.01-0.03).
    """

    def __init__(
        self,
        model: nn.Module,
        neuron_map: NeuronMap,
        selection: Mapping[str, Sequence[int]],
        train_head: bool,
    ) -> None:
        sel = neuron_map.validate(selection)
        neuron_bns = {neuron_map.layer(n).bn_name for n in neuron_map.layers}
        self.fixed_bns = [m for n, m in model.named_modules()
                          if isinstance(m, nn.modules.batchnorm._BatchNorm) and n not in neuron_bns]
        self.frozen_rows: dict[str, torch.Tensor | None] = {}  # param name -> rows to restore; None = none
        row_buffers: dict[str, torch.Tensor] = {}
        for layer, chans in sel.items():
            conv_name, bn_name = neuron_map.layer(layer).name, neuron_map.layer(layer).bn_name
            conv, bn = neuron_map.conv(layer), neuron_map.bn(layer)
            keep = torch.ones(conv.out_channels, dtype=torch.bool)
            keep[list(chans)] = False
            rows = torch.nonzero(keep).flatten().to(conv.weight.device)
            self.frozen_rows[f"{conv_name}.weight"] = rows
            if conv.bias is not None:
                self.frozen_rows[f"{conv_name}.bias"] = rows
            if bn is None:  # a pre-activation net's conv: the BNs are not the neuron's; all frozen
                continue
            if bn.weight is not None:
                self.frozen_rows[f"{bn_name}.weight"] = rows
                self.frozen_rows[f"{bn_name}.bias"] = rows
            if bn.running_mean is not None:
                row_buffers[f"{bn_name}.running_mean"] = rows
                row_buffers[f"{bn_name}.running_var"] = rows
        if train_head:
            head = neuron_map.head_name
            if head is None:
                raise ValueError("train_head=True but the model has no nn.Linear head")
            for pname, _ in neuron_map.head().named_parameters():
                self.frozen_rows[f"{head}.{pname}"] = None
        self.params = dict(model.named_parameters())
        # Parameters outside frozen_rows get requires_grad=False and are not in the optimizer, so
        # they cannot change. Partially trainable parameters keep a snapshot of their frozen rows;
        # buffers are restored whole (BN statistics of the unselected rows, num_batches_tracked).
        self._restore: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = []
        for n, rows in self.frozen_rows.items():
            if rows is not None and len(rows):
                p = self.params[n]
                self._restore.append((p, rows, p.detach()[rows].clone()))
        for n, b in model.named_buffers():
            rows = row_buffers.get(n)
            if rows is None:
                self._restore.append((b, None, b.detach().clone()))
            elif len(rows):
                self._restore.append((b, rows, b.detach()[rows].clone()))

    def train_mode(self, model: nn.Module) -> None:
        """``model.train()``, except the BNs that are no neuron's (class docstring)."""
        model.train()
        for m in self.fixed_bns:
            m.eval()

    def trainable(self) -> list[nn.Parameter]:
        return [self.params[n] for n in self.params if n in self.frozen_rows]

    def set_requires_grad(self) -> dict[str, bool]:
        old = {n: p.requires_grad for n, p in self.params.items()}
        for n, p in self.params.items():
            p.requires_grad_(n in self.frozen_rows)
        return old

    def restore_requires_grad(self, old: dict[str, bool]) -> None:
        for n, p in self.params.items():
            p.requires_grad_(old[n])

    @torch.no_grad()
    def restore(self) -> None:
        """Write every frozen entry back (after each optimizer step: weight decay, momentum and
        train-mode BN move them; the trainable rows' updates do not depend on them)."""
        for t, rows, snap in self._restore:
            if rows is None:
                t.copy_(snap)
            else:
                t.index_copy_(0, rows, snap)


# ------------------------------------------------------------------------------ the loop


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    config: TrainConfig | None = None,
    *,
    device: str | torch.device | None = None,
    restrict: Mapping[str, Sequence[int]] | None = None,
    neuron_map: NeuronMap | None = None,
    train_head: bool = True,
    batch_hook: BatchHook | None = None,
    progress: bool = True,
    desc: str = "train",
) -> TrainResult:
    """Train ``model`` in place on uint8 images ``x`` (N,3,H,W) with labels ``y``.

    ``restrict``: a selection; when given, only those neurons (and the head if ``train_head``)
    change, everything else stays bit-identical. ``batch_hook(x_float01, y, idx)`` may rewrite
    a batch after augmentation (``idx`` = the batch's indices into ``x``), e.g. to poison it.
    Returns timing and loss; the model is left on ``device`` in eval mode.
    """
    cfg = config or TrainConfig()
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {cfg.schedule!r}; known: {', '.join(SCHEDULES)}")
    if x.ndim != 4 or x.shape[0] != y.shape[0]:
        raise ValueError(f"expected images (N,C,H,W) and N labels, got {tuple(x.shape)} and {tuple(y.shape)}")
    dev = resolve_device(device)
    amp = amp_enabled(dev, cfg.amp)
    channels_last = use_channels_last(dev, cfg.channels_last)
    model.to(dev)
    if channels_last:
        model.to(memory_format=torch.channels_last)

    restriction = None
    old_requires_grad: dict[str, bool] = {}
    if restrict is not None:
        restriction = _Restriction(model, neuron_map or NeuronMap(model), restrict, train_head)
        old_requires_grad = restriction.set_requires_grad()
        params = restriction.trainable()
    else:
        params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: the selection is empty and train_head is False")

    xd = x.to(dev, non_blocking=True)
    yd = y.to(dev, non_blocking=True).long()
    n = xd.shape[0]
    bs = min(cfg.batch_size, n)
    steps_per_epoch = n // bs if cfg.drop_last else math.ceil(n / bs)
    total_steps = max(1, steps_per_epoch * cfg.epochs)

    gen = torch.Generator(device=dev)
    gen.manual_seed(cfg.seed)
    opt = torch.optim.SGD(
        params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
        weight_decay=cfg.weight_decay,
    )
    sched_fn = SCHEDULES[cfg.schedule]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: sched_fn(s / total_steps, cfg.warmup))

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    history: list[dict] = []
    loss_sum = torch.zeros((), device=dev)
    correct = torch.zeros((), device=dev, dtype=torch.long)
    seen = 0
    step = 0
    if restriction is not None:
        restriction.train_mode(model)
    else:
        model.train()
    bar = progress_bar(range(cfg.epochs), desc=desc, disable=not progress, leave=False, unit="epoch")
    try:
        for epoch in bar:
            perm = torch.randperm(n, device=dev, generator=gen)
            loss_sum.zero_()
            correct.zero_()
            seen = 0
            for b in range(steps_per_epoch):
                idx = perm[b * bs : (b + 1) * bs]
                xb = xd[idx]
                if cfg.augment:
                    xb = augment(xb, gen, cfg.crop_padding, cfg.flip)
                xb = to_float(xb)
                yb = yd[idx]
                if batch_hook is not None:
                    xb, yb = batch_hook(xb, yb, idx)
                if channels_last:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                with autocast(dev, amp):
                    out = model(xb)
                    loss = F.cross_entropy(out.float(), yb, label_smoothing=cfg.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                if restriction is not None:
                    restriction.restore()
                step += 1
                with torch.no_grad():
                    loss_sum += loss.detach() * yb.shape[0]
                    correct += (out.argmax(1) == yb).sum()
                seen += yb.shape[0]
            epoch_loss = (loss_sum / max(1, seen)).item()
            epoch_acc = correct.item() / max(1, seen)
            history.append({"epoch": epoch + 1, "loss": epoch_loss, "train_acc": epoch_acc})
            bar.set_postfix(loss=f"{epoch_loss:.3f}", acc=f"{epoch_acc:.3f}", refresh=False)
    finally:
        bar.close()
        model.eval()
        if restriction is not None:
            restriction.restore_requires_grad(old_requires_grad)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    last = history[-1] if history else {"loss": float("nan"), "train_acc": float("nan")}
    return TrainResult(seconds, step, cfg.epochs, last["loss"], last["train_acc"], history)


# ---------------------------------------------------------------------------- evaluation


@torch.no_grad()
def predict(
    model: nn.Module,
    x: torch.Tensor,
    *,
    device: str | torch.device | None = None,
    batch_size: int | None = None,
    transform: Trigger | None = None,
    amp: bool | None = None,
) -> torch.Tensor:
    """Predicted labels (int64, CPU) of uint8 or [0,1]-float images, model in eval mode.

    ``transform`` maps a float [0,1] batch to another (e.g. a trigger). The model's own mode
    is restored afterwards; its memory format is left as it is (``bd4nn.runtime.place``).
    ``batch_size`` defaults to the device's (``bd4nn.runtime.eval_batch_size``).
    """
    dev = resolve_device(device) if device is not None else next(model.parameters()).device
    batch_size = batch_size or eval_batch_size(dev)
    was_training = model.training
    model.to(dev).eval()
    preds = []
    try:
        for i in range(0, x.shape[0], batch_size):
            xb = to_float(x[i : i + batch_size].to(dev, non_blocking=True))
            if transform is not None:
                xb = transform(xb)
            with autocast(dev, amp):
                preds.append(model(xb).argmax(1))
    finally:
        model.train(was_training)
    return torch.cat(preds).cpu() if preds else torch.empty(0, dtype=torch.long)


def evaluate_ca(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **kwargs) -> float:
    """Clean accuracy on (x, y); kwargs go to ``predict``."""
    return clean_accuracy(predict(model, x, **kwargs), y.cpu())


def evaluate_asr(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, trigger: Trigger, target: int, **kwargs
) -> float:
    """Attack success rate of ``trigger`` toward ``target`` (METHODS.md §1): only images whose
    true label is not the target are triggered and counted."""
    keep = y.cpu() != target
    preds = predict(model, x[keep], transform=trigger, **kwargs)
    return attack_success_rate(preds, y.cpu()[keep], target)
