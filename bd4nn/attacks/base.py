"""The attack interface: a trigger (a pure function on [0,1] images), a poisoning rule, and an
injection into a given sub-network (METHODS.md §2 "Injection").

Most triggers of bd4nn are *stamps*: ``x' = (1 − m) ⊙ x + m ⊙ p`` with a mask ``m`` (1 or 3
channels, values in [0,1]) and a pattern ``p`` (3 channels, [0,1]). BadNets (opaque patch),
Blended (constant α over the whole image), TrojanNN (optimized pattern inside a fixed region)
and SRA (opaque patch) are all of this form, so an entry stores its trigger as two tensors and
``StampTrigger`` rebuilds it exactly. Triggers of other kinds keep their own tensors: SIG's
additive signal (``trigger.signal``, ``bd4nn.attacks.sig.AdditiveTrigger``) and WaNet's warp
grid (``trigger.grid``, ``bd4nn.attacks.wanet.WarpTrigger``); ``trigger_from_tensors``
rebuilds any stored trigger from the names of its tensors.

An attack is configured by a settings dataclass (published defaults, METHODS-REFERENCE §B) and
a seed. ``make_trigger`` returns the trigger (TrojanNN optimizes it on the model; the others
derive it from the settings and the seed alone); ``inject`` changes the model in place so that
only the given selection (plus the head) carries the backdoor, and returns what it did.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from bd4nn.neurons import NeuronMap, Selection
from bd4nn.train import TrainConfig, train

__all__ = [
    "StampTrigger",
    "TensorTrigger",
    "TRIGGER_KINDS",
    "trigger_from_tensors",
    "InjectionRecipe",
    "InjectionInfo",
    "Attack",
    "PoisoningAttack",
    "poison_indices",
    "seeded_pick",
    "poison_hook",
    "corner_box",
]


class StampTrigger:
    """``x' = (1 − mask) ⊙ x + mask ⊙ pattern`` on a batch of [0,1] images (pure function)."""

    def __init__(self, mask: torch.Tensor, pattern: torch.Tensor) -> None:
        if mask.ndim != 3 or mask.shape[0] not in (1, 3):
            raise ValueError(f"mask must be (1|3, H, W), got {tuple(mask.shape)}")
        if pattern.ndim != 3 or pattern.shape[0] != 3 or pattern.shape[1:] != mask.shape[1:]:
            raise ValueError(f"pattern must be (3, H, W) matching the mask, got {tuple(pattern.shape)}")
        self.mask = mask.detach().float().clamp(0, 1).cpu()
        self.pattern = pattern.detach().float().clamp(0, 1).cpu()
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m, p = self._on.get(x.device) or self._to(x.device)
        return x * (1 - m) + m * p

    def _to(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        pair = (self.mask.to(device), self.pattern.to(device))
        self._on[device] = pair
        return pair

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"trigger.mask": self.mask.contiguous(), "trigger.pattern": self.pattern.contiguous()}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> "StampTrigger":
        return cls(tensors["trigger.mask"], tensors["trigger.pattern"])

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, StampTrigger)
            and torch.equal(self.mask, other.mask)
            and torch.equal(self.pattern, other.pattern)
        )


class TensorTrigger:
    """A trigger that is one stored tensor ``KEY`` (the kinds that are not stamps: SIG's signal,
    WaNet's grid): the tensor kept on the CPU, copied once to each device it is applied on,
    stored as ``{KEY: tensor}`` and compared bit for bit. Subclasses check the tensor's shape and
    define ``__call__``."""

    KEY: ClassVar[str] = ""

    def __init__(self, value: torch.Tensor) -> None:
        self.value = value.detach().float().cpu().contiguous()
        self._on: dict[torch.device, torch.Tensor] = {}

    def on(self, device: torch.device) -> torch.Tensor:
        """The tensor on ``device`` (copied there once)."""
        v = self._on.get(device)
        if v is None:
            v = self._on[device] = self.value.to(device)
        return v

    def tensors(self) -> dict[str, torch.Tensor]:
        return {self.KEY: self.value.contiguous()}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]):
        return cls(tensors[cls.KEY])

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and torch.equal(self.value, other.value)

    __hash__ = None  # mutable tensor inside: compared by value, not hashable


# Every kind of stored trigger: the exact set of tensor names an entry holds for it -> its class
# ("module:Class", imported on first use). Triggers that are not stamps (issue 16): SIG's
# additive signal, WaNet's warp grid.
TRIGGER_KINDS: dict[frozenset[str], str] = {
    frozenset({"trigger.mask", "trigger.pattern"}): "bd4nn.attacks.base:StampTrigger",
    frozenset({"trigger.signal"}): "bd4nn.attacks.sig:AdditiveTrigger",
    frozenset({"trigger.grid"}): "bd4nn.attacks.wanet:WarpTrigger",
}


def trigger_from_tensors(tensors: Mapping[str, torch.Tensor]):
    """Rebuild a stored trigger of any kind (an entry's ``trigger.*`` tensors, ``tensors()`` of
    the trigger that was saved): the set of tensor names tells the kind (``TRIGGER_KINDS``); a
    stamp gives exactly ``StampTrigger.from_tensors``. Raises ``ValueError`` for an unknown set."""
    keys = frozenset(k for k in tensors if k.startswith("trigger."))
    where = TRIGGER_KINDS.get(keys)
    if where is None:
        known = "; ".join(", ".join(sorted(k)) for k in TRIGGER_KINDS)
        raise ValueError(f"unknown trigger tensors {sorted(keys)}; known kinds: {known}")
    module, _, attr = where.partition(":")
    return getattr(importlib.import_module(module), attr).from_tensors(tensors)


@dataclass
class InjectionRecipe:
    """How a poisoning attack fine-tunes the sub-network (recorded in every entry's label).

    METHODS.md §2 reports, on one H100 with VGG-13, ASR ≈ 98 % and ASR.Cor ≈ 0.97–0.98 at
    CA ≈ 88.9 % with 10 epochs at lr 0.05, the trigger stamped after augmentation.
    """

    epochs: int = 10
    lr: float = 0.05
    batch_size: int = 256
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup: float = 0.0
    poison_rate: float = 0.1
    train_head: bool = True
    augment: bool = True

    def train_config(self, seed: int) -> TrainConfig:
        return TrainConfig(
            epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, momentum=self.momentum,
            nesterov=True, weight_decay=self.weight_decay, schedule=self.schedule,
            warmup=self.warmup, augment=self.augment, seed=seed,
        )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class InjectionInfo:
    """What ``inject`` did. ``selection`` is the sub-network that now carries the backdoor: the
    given one, except where an attack must adjust it (SRA's shared residual channels)."""

    selection: Selection
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)


def poison_indices(labels: torch.Tensor, rate: float, target: int, seed: int) -> torch.Tensor:
    """The training images to poison (all-to-one), as a sorted int64 index tensor.

    ``round(rate · N)`` images, N = the whole training set (BackdoorBench's definition of the
    rate), drawn with a seeded generator from the images whose label is not the target
    [decision: a target-class image would teach nothing new when relabelled to the target].
    """
    if not 0 <= rate <= 1:
        raise ValueError(f"poison rate must be in [0, 1], got {rate}")
    candidates = torch.nonzero(labels.cpu() != target).flatten()
    return seeded_pick(candidates, int(round(rate * labels.shape[0])), seed)


def seeded_pick(candidates: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """``min(k, len(candidates))`` of ``candidates`` (image indices) drawn with a generator seeded
    with ``seed``, sorted: how every attack chooses the images it alters."""
    g = torch.Generator().manual_seed(seed)
    return candidates[torch.randperm(len(candidates), generator=g)[: min(k, len(candidates))]].sort().values


def poison_hook(poisoned: torch.Tensor, n: int, trigger: StampTrigger, target: int, device: torch.device):
    """A ``train`` batch hook that stamps the trigger on the poisoned images (after augmentation)
    and relabels them to the target; no per-image Python loop."""
    flag = torch.zeros(n, dtype=torch.bool)
    flag[poisoned] = True
    flag = flag.to(device)

    def hook(xb: torch.Tensor, yb: torch.Tensor, idx: torch.Tensor):
        f = flag[idx]
        xb = torch.where(f[:, None, None, None], trigger(xb), xb)
        yb = torch.where(f, torch.full_like(yb, target), yb)
        return xb, yb

    return hook


class Attack:
    """Base class. Subclasses set ``name``, ``kind`` and a ``Settings`` dataclass."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""  # "poisoning" or "structural"

    @dataclass
    class Settings:
        pass

    def __init__(self, *, target: int = 0, seed: int = 0, **settings: Any) -> None:
        self.target = int(target)
        self.seed = int(seed)
        try:
            self.settings = self.Settings(**settings)
        except TypeError as exc:
            raise ValueError(f"{self.name}: {exc}") from None

    def spec(self) -> dict[str, Any]:
        """JSON-able description (the label's trigger spec, without the tensors)."""
        return {"attack": self.name, "kind": self.kind, "target": self.target, "seed": self.seed,
                "settings": asdict(self.settings)}

    def make_trigger(
        self,
        model: nn.Module,
        neuron_map: NeuronMap,
        selection: Selection,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        device: torch.device,
    ) -> StampTrigger:
        raise NotImplementedError

    def inject(
        self,
        model: nn.Module,
        neuron_map: NeuronMap,
        selection: Selection,
        trigger: StampTrigger,
        x: torch.Tensor,
        y: torch.Tensor,
        recipe: InjectionRecipe,
        *,
        device: torch.device,
        progress: bool = False,
    ) -> InjectionInfo:
        raise NotImplementedError


class PoisoningAttack(Attack):
    """Fine-tune only the sub-network and the head on clean ∪ poisoned data (METHODS §2)."""

    kind = "poisoning"

    def inject(self, model, neuron_map, selection, trigger, x, y, recipe, *, device, progress=False):
        sel = neuron_map.validate(selection)
        poisoned = poison_indices(y, recipe.poison_rate, self.target, self.seed)
        hook = poison_hook(poisoned, len(y), trigger, self.target, torch.device(device))
        return self.train_poisoned(model, neuron_map, sel, x, y, recipe, hook, device=device, progress=progress,
                                   poisoned=int(len(poisoned)))

    def train_poisoned(self, model, neuron_map, sel, x, y, recipe, hook, *, device, progress=False,
                       **details) -> InjectionInfo:
        """The restricted fine-tuning every poisoning attack shares: ``sel`` (and the head) trained
        with ``recipe``, ``hook`` poisoning each batch; ``details`` (e.g. how many images were
        poisoned) go into the label's ``extra`` with the final loss and train accuracy."""
        t0 = time.perf_counter()
        res = train(
            model, x, y, recipe.train_config(self.seed), device=device, restrict=sel,
            neuron_map=neuron_map, train_head=recipe.train_head, batch_hook=hook,
            progress=progress, desc=f"inject {self.name}",
        )
        return InjectionInfo(sel, time.perf_counter() - t0,
                             {**details, "final_loss": res.final_loss, "train_accuracy": res.train_accuracy})


def corner_box(size: int, image: int = 32, margin: int = 0) -> tuple[slice, slice]:
    """Rows and columns of a ``size``×``size`` square at the bottom-right corner."""
    end = image - margin
    return slice(end - size, end), slice(end - size, end)
