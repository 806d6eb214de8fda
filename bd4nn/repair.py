"""Repairs that act on a localizer's ``S_localized`` (METHODS.md §4, METHODS-REFERENCE §C).

* **prune**: set BN ``γ_i = β_i = 0`` for every localized neuron, so its output is exactly 0
  after BN and after the ReLU (option (a) of METHODS-REFERENCE §C1, as CLP does).
* **finetune**: 10 epochs on the defender's clean data, updating only the localized neurons'
  conv filters, conv biases, BN ``γ``/``β`` and BN running statistics; the head stays frozen
  [METHODS decision]. Every other parameter and buffer stays bit-identical (the restricted mode
  of ``bd4nn.train.train`` restores them after each step). Optimizer settings are
  BackdoorBench's fine-tuning defaults (METHODS-REFERENCE §C2: SGD lr 0.01, momentum 0.9,
  weight decay 5e-4, cosine, batch 256) with random crop + flip; METHODS fixes the 10 epochs.

Each repair works on a copy; ``repair`` measures CA and ASR before and after and returns CAD
and ASRD. An empty selection (a localizer that covers no fault layer under the top-k budget)
is a valid input: the model is left as it is.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from bd4nn.metrics import asrd, cad
from bd4nn.neurons import NeuronMap
from bd4nn.registry import Registry
from bd4nn.train import TrainConfig, evaluate_asr, evaluate_ca, train

__all__ = ["FinetuneSettings", "RepairResult", "REPAIRS", "list_repairs", "prune", "finetune", "repair"]


@dataclass
class FinetuneSettings:
    epochs: int = 10  # METHODS §4
    lr: float = 0.01  # BackdoorBench config/defense/ft/config.yaml
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    schedule: str = "cosine"
    augment: bool = True


@dataclass
class RepairResult:
    method: str
    ca_before: float
    asr_before: float
    ca_after: float
    asr_after: float
    cad: float
    asrd: float
    seconds: float
    n_neurons: int

    def to_dict(self) -> dict:
        return asdict(self)


RepairFn = Callable[..., nn.Module]
REPAIRS: Registry[RepairFn] = Registry("repair", builtins={"prune": "bd4nn.repair:prune",
                                                             "finetune": "bd4nn.repair:finetune"})


def register_repair(name: str) -> Callable[[RepairFn], RepairFn]:
    """Decorator: ``fn(model, neuron_map, selection, **kw)`` repairs ``model`` in place."""
    return REPAIRS.register(name=name)


def list_repairs() -> list[str]:
    return REPAIRS.names()


@register_repair("prune")
@torch.no_grad()
def prune(model: nn.Module, neuron_map: NeuronMap, selection: Mapping[str, Sequence[int]], **_: object) -> nn.Module:
    """Zero BN γ and β of the selected neurons, in place; returns ``model``.

    In eval mode this is the mask (``NeuronMap.mask``): the BN output γ·x̂ + β of those channels
    is 0. A neuron without a BN (a pre-activation network's conv) gets its conv filter rows and
    bias zeroed instead, which makes its conv output, again the masked activation, 0."""
    for layer, chans in neuron_map.validate(selection).items():
        bn = neuron_map.bn(layer)
        unit = bn if bn is not None else neuron_map.conv(layer)
        idx = torch.tensor(chans, dtype=torch.long, device=unit.weight.device)
        unit.weight.index_fill_(0, idx, 0.0)
        if unit.bias is not None:
            unit.bias.index_fill_(0, idx, 0.0)
    return model


@register_repair("finetune")
def finetune(
    model: nn.Module,
    neuron_map: NeuronMap,
    selection: Mapping[str, Sequence[int]],
    *,
    clean_x: torch.Tensor,
    clean_y: torch.Tensor,
    settings: FinetuneSettings | None = None,
    device: torch.device | str | None = None,
    seed: int = 0,
    progress: bool = False,
    **_: object,
) -> nn.Module:
    """Restricted fine-tuning of the selected neurons on the clean data, in place."""
    sel = neuron_map.validate(selection)
    if not sel:
        return model
    s = settings or FinetuneSettings()
    cfg = TrainConfig(epochs=s.epochs, batch_size=s.batch_size, lr=s.lr, momentum=s.momentum,
                      weight_decay=s.weight_decay, schedule=s.schedule, augment=s.augment, seed=seed,
                      drop_last=False)
    train(model, clean_x, clean_y, cfg, device=device, restrict=sel, neuron_map=neuron_map,
          train_head=False, progress=progress, desc="fine-tune")
    return model


def repair(
    method: str,
    model: nn.Module,
    selection: Mapping[str, Sequence[int]],
    *,
    clean_x: torch.Tensor,
    clean_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    trigger: Callable[[torch.Tensor], torch.Tensor],
    target: int,
    before: tuple[float, float] | None = None,
    device: torch.device | str | None = None,
    seed: int = 0,
    finetune_settings: FinetuneSettings | None = None,
) -> RepairResult:
    """Repair a copy of ``model`` with ``method`` and measure CA/ASR before and after.

    ``before`` = (CA, ASR) of the infected model if already measured (saves two passes).
    """
    fix = REPAIRS.get(method)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    if before is None:
        before = (evaluate_ca(model, test_x, test_y, device=dev),
                  evaluate_asr(model, test_x, test_y, trigger, target, device=dev))
    fixed = copy.deepcopy(model).to(dev)
    nm = NeuronMap(fixed)
    sel = nm.validate(selection)
    t0 = time.perf_counter()
    fix(fixed, nm, sel, clean_x=clean_x, clean_y=clean_y, settings=finetune_settings, device=dev, seed=seed)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    ca_after = evaluate_ca(fixed, test_x, test_y, device=dev)
    asr_after = evaluate_asr(fixed, test_x, test_y, trigger, target, device=dev)
    return RepairResult(method, before[0], before[1], ca_after, asr_after, cad(before[0], ca_after),
                        asrd(before[1], asr_after), seconds, sum(len(c) for c in sel.values()))
