"""The localizer interface and its registry (METHODS.md §3, DESIGN.md "Core notions").

A localizer scores neurons; higher means more suspicious. It sees the infected model, its
neuron map and the defender's clean data, never the defect label or the attack (DESIGN.md: a
localizer does not import ``bd4nn.db`` or ``bd4nn.attacks``). The harness, not the localizer,
turns scores into ``S_localized`` (top-k per covered layer, ``bd4nn.metrics.top_k_selection``).

Writing one::

    @register_localizer
    class MyMethod(Localizer):
        name = "mine"
        scope = "all"                     # or "penultimate"

        @dataclass
        class Settings:                   # published defaults; every field can be overridden
            steps: int = 100

        def scores(self, model, neuron_map, clean, *, device=None, seed=0):
            return {layer: torch.rand(n) for layer, n in neuron_map.sizes.items()}

Third-party packages register theirs through the entry point group ``bd4nn.localizers``
(``name = "package.module:Class"``); they are loaded on the first ``get_localizer`` /
``list_localizers`` call.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from bd4nn.errors import UserError
from bd4nn.neurons import NeuronMap
from bd4nn.runtime import to_float
from bd4nn.settings import SettingError, coerce_fields

__all__ = [
    "CleanData",
    "Localizer",
    "LocalizerError",
    "SCOPES",
    "register_localizer",
    "get_localizer",
    "list_localizers",
    "localizer_class",
    "ENTRY_POINT_GROUP",
]

log = logging.getLogger(__name__)

SCOPES = ("all", "penultimate")
ENTRY_POINT_GROUP = "bd4nn.localizers"


class LocalizerError(UserError, ValueError):
    """Unknown localizer, unknown setting, or a localizer that returned malformed scores."""


@dataclass
class CleanData:
    """The defender's clean data: images in [0,1] pixel space (uint8 or float) and labels.

    ``x``: (N, 3, H, W); ``y``: (N,) int64; ``num_classes``: the model's number of classes.
    The model normalizes its input itself, so triggers and perturbations act in pixel space.
    """

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int

    def __post_init__(self) -> None:
        if self.x.ndim != 4 or self.x.shape[0] != self.y.shape[0]:
            raise LocalizerError(f"clean data: expected x (N,C,H,W) and y (N,), got {tuple(self.x.shape)} and {tuple(self.y.shape)}")
        if self.x.shape[0] == 0:
            raise LocalizerError("clean data is empty")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def float_batch(self, start: int, stop: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Images ``start:stop`` as float [0,1] on ``device``."""
        return to_float(self.x[start:stop].to(device))

    def to(self, device: torch.device | str) -> "CleanData":
        return CleanData(self.x.to(device), self.y.to(device), self.num_classes)


class Localizer:
    """Base class. Subclasses set ``name``, ``scope``, a ``Settings`` dataclass and ``scores``."""

    name: ClassVar[str] = ""
    scope: ClassVar[str] = "all"
    #: what a score means, for help text (e.g. "low mean clean activation")
    summary: ClassVar[str] = ""

    @dataclass
    class Settings:
        pass

    def __init__(self, **overrides: Any) -> None:
        fields = {f.name: f for f in dataclasses.fields(self.Settings)}
        unknown = sorted(set(overrides) - set(fields))
        if unknown:
            raise LocalizerError(
                f"localizer {self.name!r} has no setting {', '.join(map(repr, unknown))}; "
                f"its settings are {', '.join(sorted(fields)) or '(none)'}"
            )
        try:
            checked = coerce_fields(self.Settings, overrides)
        except SettingError as exc:
            raise LocalizerError(f"localizer {self.name!r}: {exc}") from None
        self.settings = self.Settings(**checked)

    # ------------------------------------------------------------------ interface
    def layers(self, neuron_map: NeuronMap) -> list[str]:
        """The neuron layers this localizer covers."""
        return neuron_map.layers if self.scope == "all" else [neuron_map.penultimate]

    def scores(
        self,
        model: nn.Module,
        neuron_map: NeuronMap,
        clean: CleanData,
        *,
        device: torch.device | str | None = None,
        seed: int = 0,
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def __call__(self, model, neuron_map, clean, *, device=None, seed: int = 0) -> dict[str, torch.Tensor]:
        """``scores`` plus a check of its output: every covered layer, right size, finite, CPU."""
        out = self.scores(model, neuron_map, clean, device=device, seed=seed)
        return check_scores(self.name, out, neuron_map, self.layers(neuron_map))

    def report(self) -> dict[str, Any]:
        """JSON-able details of the last ``scores`` call (e.g. which code path ran), recorded with
        every result; empty unless a localizer has something to say."""
        return {}

    def config(self) -> dict[str, Any]:
        """The settings as a plain dict (recorded with every result)."""
        return dataclasses.asdict(self.settings)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


def check_scores(
    name: str, scores: Mapping[str, torch.Tensor], neuron_map: NeuronMap, layers: list[str]
) -> dict[str, torch.Tensor]:
    missing = [l for l in layers if l not in scores]
    extra = [l for l in scores if l not in layers]
    if missing or extra:
        raise LocalizerError(f"localizer {name!r} scored layers {list(scores)}; expected {layers}")
    out = {}
    for layer in layers:
        s = torch.as_tensor(scores[layer]).detach().float().cpu().reshape(-1)
        if s.numel() != neuron_map.sizes[layer]:
            raise LocalizerError(
                f"localizer {name!r}: layer {layer} has {neuron_map.sizes[layer]} neurons but {s.numel()} scores"
            )
        if not torch.isfinite(s).all():
            raise LocalizerError(f"localizer {name!r}: non-finite scores in layer {layer}")
        out[layer] = s
    return out


# ---------------------------------------------------------------------- registry
_REGISTRY: dict[str, type[Localizer]] = {}
_BUILTINS = ("fp", "nc", "anp", "clp", "deepmufl", "slicer", "pfl", "random")
_loaded = False


def register_localizer(cls: type[Localizer]) -> type[Localizer]:
    """Class decorator: make ``cls`` available as ``get_localizer(cls.name)``."""
    if not cls.name:
        raise LocalizerError(f"{cls.__name__} has no name")
    if cls.scope not in SCOPES:
        raise LocalizerError(f"{cls.__name__}.scope must be one of {SCOPES}, not {cls.scope!r}")
    if not dataclasses.is_dataclass(cls.Settings):
        raise LocalizerError(f"{cls.__name__}.Settings must be a dataclass")
    other = _REGISTRY.get(cls.name)
    if other is not None and other is not cls:
        raise LocalizerError(f"localizer name {cls.name!r} is taken by {other.__module__}.{other.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in _BUILTINS:
        importlib.import_module(f"localizers.{mod}")
    try:
        eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    except Exception as exc:  # pragma: no cover - broken metadata in the environment
        log.warning("could not read entry points %s: %s", ENTRY_POINT_GROUP, exc)
        return
    for ep in eps:
        try:
            obj = ep.load()
        except Exception as exc:
            log.warning("localizer plugin %s (%s) failed to load: %s", ep.name, ep.value, exc)
            continue
        if isinstance(obj, type) and issubclass(obj, Localizer) and obj.name not in _REGISTRY:
            register_localizer(obj)


def list_localizers() -> list[str]:
    """Names of all registered localizers (built-ins first, in the paper's order, then plugins)."""
    _load()
    order = {n: i for i, n in enumerate(_BUILTINS)}
    return sorted(_REGISTRY, key=lambda n: (order.get(n, len(order)), n))


def localizer_class(name: str) -> type[Localizer]:
    _load()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise LocalizerError(f"unknown localizer {name!r}; known: {', '.join(list_localizers())}") from None


def get_localizer(name: str, **settings: Any) -> Localizer:
    """A localizer with its published defaults, overridden by ``settings``."""
    return localizer_class(name)(**settings)

