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
            # called through Localizer.__call__: model and neuron_map are already on `device`
            return {layer: torch.rand(n) for layer, n in neuron_map.sizes.items()}

Third-party packages register theirs through the entry point group ``bd4nn.localizers``
(``name = "package.module:Class"``); they are loaded on the first ``get_localizer`` /
``list_localizers`` call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from bd4nn.errors import RegistryError, UserError
from bd4nn.neurons import NeuronMap
from bd4nn.registry import Registry
from bd4nn.runtime import to_float, working_copy
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
    "LOCALIZERS",
    "standardize_per_layer",
    "outliers",
    "score_summary",
]

def standardize_per_layer(values: torch.Tensor) -> torch.Tensor:
    """``(v − mean) / std`` with the unbiased std; all zeros where std is 0 or undefined."""
    v = values.double()
    if v.numel() < 2:
        return torch.zeros_like(values, dtype=torch.float32)
    mu, sd = v.mean(), v.std()
    if not torch.isfinite(sd) or sd <= 0:
        return torch.zeros_like(values, dtype=torch.float32)
    return ((v - mu) / sd).float()


def outliers(scores: Mapping[str, torch.Tensor], u: float) -> dict[str, list[int]]:
    """Per layer, the channels whose score exceeds the layer's mean by more than ``u`` unbiased
    standard deviations (CLP's rule; ``bd4nn scan``'s flags); a layer with no spread or one
    channel has none. ``{layer: sorted channels}`` without empty layers."""
    out: dict[str, list[int]] = {}
    for layer, s in scores.items():
        v = torch.as_tensor(s).detach().double().reshape(-1)
        if v.numel() < 2:
            continue
        mu, sd = v.mean(), v.std()
        if not bool(torch.isfinite(sd)) or float(sd) <= 0:
            continue
        idx = torch.nonzero(v > mu + float(u) * sd).reshape(-1).tolist()
        if idx:
            out[layer] = sorted(int(i) for i in idx)
    return out


def score_summary(scores: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """How suspicious a model looks to a localizer as a whole, from its per-layer scores: the
    largest per-layer standardized score (``max_z``, the statistic of a model-level detection:
    a backdoor shows as a few neurons far above their layer), the 99th percentile of the
    standardized scores (``p99_z``) and the raw maximum (``max``). Layers with fewer than two
    neurons or no spread contribute z = 0."""
    z = torch.cat([standardize_per_layer(v.detach().float().cpu().reshape(-1)) for v in scores.values()]) \
        if scores else torch.zeros(1)
    raw = torch.cat([v.detach().float().cpu().reshape(-1) for v in scores.values()]) if scores else torch.zeros(1)
    return {"max_z": float(z.max()), "p99_z": float(torch.quantile(z.double(), 0.99)), "max": float(raw.max())}


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
    #: an oracle that reads the defect's ground truth: the harness passes it the label's
    #: S_fault as the ``fault`` setting (PFL, the upper bound of the tables)
    needs_ground_truth: ClassVar[bool] = False

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
        """``scores`` on ``device`` (default: the model's), plus a check of its output: every
        covered layer, right size, finite, CPU. The model is placed there once, here
        (``bd4nn.runtime.working_copy``: a copy when it lives elsewhere, so the caller's model
        never moves), and ``scores`` receives a model and neuron map that are already on the
        device it is told."""
        work, dev = working_copy(model, device)
        nm = neuron_map if work is model else NeuronMap(work)
        out = self.scores(work, nm, clean, device=dev, seed=seed)
        return check_scores(self.name, out, nm, self.layers(nm))

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
def _check_class(cls: type[Localizer]) -> None:
    if cls.scope not in SCOPES:
        raise RegistryError(f"{cls.__name__}.scope must be one of {SCOPES}, not {cls.scope!r}")
    if not dataclasses.is_dataclass(cls.Settings):
        raise RegistryError(f"{cls.__name__}.Settings must be a dataclass")


LOCALIZERS: Registry[type[Localizer]] = Registry(
    "localizer", base=Localizer, entry_points=ENTRY_POINT_GROUP, check=_check_class,
    builtins={"fp": "localizers.fp:FP", "nc": "localizers.nc:NeuralCleanse", "anp": "localizers.anp:ANP",
              "clp": "localizers.clp:CLP", "deepmufl": "localizers.deepmufl:DeepMufl",
              "slicer": "localizers.slicer:Slicer", "pfl": "localizers.pfl:PFL", "random": "localizers.random:Random"})


def register_localizer(cls: type[Localizer]) -> type[Localizer]:
    """Class decorator: make ``cls`` available as ``get_localizer(cls.name)``."""
    return LOCALIZERS.register(cls)


def list_localizers() -> list[str]:
    """Names of all registered localizers (built-ins first, in the paper's order, then plugins)."""
    return LOCALIZERS.names()


def localizer_class(name: str) -> type[Localizer]:
    return LOCALIZERS.get(name)


def get_localizer(name: str, **settings: Any) -> Localizer:
    """A localizer with its published defaults, overridden by ``settings``."""
    return localizer_class(name)(**settings)

