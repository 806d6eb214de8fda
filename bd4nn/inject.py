"""Algorithm 1 of the database (METHODS.md §2): candidates, injection, the rule-3 filter, RC.

* **Rule 1**: ``rank_by_contribution`` orders each layer's neurons by descending Taylor /
  NeuronMCT contribution toward the target logit on clean training images of the target class.
* **Rule 2**: ``candidate_selection`` cuts each layer's ranking into windows — small (5 %, 20
  windows), middle (10 %, 10), large (20 %, 5) and narrow (the small windows' first neuron, or
  first two where the layer has ≥ 512 neurons). Window ``i`` at ``pct`` % of a layer of ``N``
  neurons holds ranks ``1 + ⌊pct·i·N/100⌋ .. ⌊pct·(i+1)·N/100⌋`` (1-based), computed in integer
  arithmetic so that no float rounding moves a boundary; an empty window takes one neuron.
* **Injection** is the attack's (``bd4nn.attacks``); this module measures the result:
  CA, ASR, ASR.Cor = ASR − ASR(S_fault masked), CA.Cor likewise, and the Cor.R variants that
  mask every *other* neuron instead. **Rule 3** keeps the model iff ASR.Cor > 0.5.
* **RC**: the rule-1 contribution of each fault neuron on *triggered* inputs toward the target,
  normalized to sum to 1.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bd4nn.attacks import Attack, InjectionRecipe, StampTrigger
from bd4nn.contribution import contribution, rank_neurons
from bd4nn.metrics import correlation
from bd4nn.neurons import NeuronMap, Selection
from bd4nn.train import evaluate_asr, evaluate_ca

__all__ = [
    "LEVELS",
    "Level",
    "window",
    "candidate_selection",
    "candidates",
    "rank_by_contribution",
    "relative_contribution",
    "measure",
    "Measurement",
    "CandidateOutcome",
    "run_candidate",
    "ASR_COR_THRESHOLD",
]

ASR_COR_THRESHOLD = 0.5  # rule 3: keep iff ASR.Cor > 0.5


@dataclass(frozen=True)
class Level:
    name: str
    percent: int  # window width in percent of a layer
    count: int  # number of windows = candidates at this level
    narrow: bool = False  # keep only the first 1 (or 2 where N >= 512) neurons of each window


LEVELS: dict[str, Level] = {
    "narrow": Level("narrow", 5, 20, narrow=True),
    "small": Level("small", 5, 20),
    "middle": Level("middle", 10, 10),
    "large": Level("large", 20, 5),
}
NARROW_WIDE_LAYER = 512  # layers with at least this many neurons keep 2 per narrow window


def window(n: int, percent: int, i: int) -> list[int]:
    """0-based rank positions of window ``i`` of width ``percent`` % in a layer of ``n``."""
    if n < 1:
        raise ValueError("a layer has at least one neuron")
    lo = (percent * i * n) // 100  # ranks 1+lo .. hi (1-based) = positions lo .. hi-1
    hi = (percent * (i + 1) * n) // 100
    lo = min(lo, n - 1)
    if hi <= lo:
        hi = lo + 1  # an empty window takes at least one neuron
    return list(range(lo, min(hi, n)))


def candidate_selection(ranking: Mapping[str, Sequence[int]], level: str | Level, i: int) -> Selection:
    """Candidate ``i`` of ``level`` from per-layer rankings (channels, most contributing first)."""
    lv = LEVELS[level] if isinstance(level, str) else level
    if not 0 <= i < lv.count:
        raise ValueError(f"level {lv.name} has candidates 0..{lv.count - 1}, not {i}")
    sel: Selection = {}
    for layer, order in ranking.items():
        pos = window(len(order), lv.percent, i)
        if lv.narrow:
            pos = pos[: 2 if len(order) >= NARROW_WIDE_LAYER else 1]
        sel[layer] = sorted(int(order[p]) for p in pos)
    return sel


def candidates(ranking: Mapping[str, Sequence[int]], level: str) -> list[Selection]:
    return [candidate_selection(ranking, level, i) for i in range(LEVELS[level].count)]


def rank_by_contribution(
    model: nn.Module,
    neuron_map: NeuronMap,
    x: torch.Tensor,
    y: torch.Tensor,
    target: int,
    *,
    max_images: int = 500,
    device: torch.device | str | None = None,
) -> tuple[dict[str, list[int]], dict[str, torch.Tensor]]:
    """Rule 1: per-layer channel rankings (descending contribution toward ``target`` on up to
    ``max_images`` clean images of class ``target``), and the contributions themselves."""
    idx = torch.nonzero(y == target).flatten()[:max_images]
    if len(idx) == 0:
        raise ValueError(f"no training image of the target class {target}")
    c = contribution(model, neuron_map, x[idx], target, device=device)
    return rank_neurons(c, descending=True), c


def relative_contribution(
    model: nn.Module,
    neuron_map: NeuronMap,
    selection: Selection,
    x: torch.Tensor,
    y: torch.Tensor,
    trigger: StampTrigger,
    target: int,
    *,
    max_images: int = 500,
    device: torch.device | str | None = None,
) -> dict[str, list[float]]:
    """RC: the fault neurons' contribution on triggered non-target images toward ``target``,
    normalized to sum to 1 (uniform if every contribution is zero)."""
    idx = torch.nonzero(y != target).flatten()[:max_images]
    c = contribution(model, neuron_map, x[idx], target, layers=list(selection), transform=trigger, device=device)
    raw = {layer: c[layer][chans].double() for layer, chans in selection.items()}
    total = sum(float(v.sum()) for v in raw.values())
    if total <= 0:
        return uniform_rc(selection)
    return {layer: (v / total).tolist() for layer, v in raw.items()}


def uniform_rc(selection: Selection) -> dict[str, list[float]]:
    """Every fault neuron the same share: RC when it cannot be measured."""
    m = sum(len(ch) for ch in selection.values())
    return {layer: [1.0 / m] * len(ch) for layer, ch in selection.items()}


@dataclass
class Measurement:
    ca: float
    asr: float
    ca_masked: float
    asr_masked: float
    ca_rest_masked: float
    asr_rest_masked: float

    @property
    def asr_cor(self) -> float:
        return correlation(self.asr, self.asr_masked)

    @property
    def ca_cor(self) -> float:
        return correlation(self.ca, self.ca_masked)

    @property
    def asr_cor_r(self) -> float:
        return correlation(self.asr, self.asr_rest_masked)

    @property
    def ca_cor_r(self) -> float:
        return correlation(self.ca, self.ca_rest_masked)


def measure(
    model: nn.Module,
    neuron_map: NeuronMap,
    selection: Selection,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    trigger: StampTrigger,
    target: int,
    *,
    device: torch.device | str | None = None,
) -> Measurement:
    """CA and ASR of the model as is, with ``selection`` masked, and with all else masked."""
    kw: dict[str, Any] = {"device": device}
    ca = evaluate_ca(model, test_x, test_y, **kw)
    asr = evaluate_asr(model, test_x, test_y, trigger, target, **kw)
    with neuron_map.mask(selection):
        ca_m = evaluate_ca(model, test_x, test_y, **kw)
        asr_m = evaluate_asr(model, test_x, test_y, trigger, target, **kw)
    with neuron_map.mask(neuron_map.complement(selection)):
        ca_r = evaluate_ca(model, test_x, test_y, **kw)
        asr_r = evaluate_asr(model, test_x, test_y, trigger, target, **kw)
    return Measurement(ca, asr, ca_m, asr_m, ca_r, asr_r)


@dataclass
class CandidateOutcome:
    """One candidate of Algorithm 1: the infected model and everything its label records."""

    model: nn.Module
    selection: Selection  # S_fault (the attack may have adjusted the candidate)
    trigger: StampTrigger
    measurement: Measurement
    rc: dict[str, list[float]]
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)  # reproducible facts (the label's extra)
    timings: dict[str, float] = field(default_factory=dict)  # wall-clock seconds (never hashed)

    @property
    def kept(self) -> bool:
        return not self.details.get("diverged", False) and self.measurement.asr_cor > ASR_COR_THRESHOLD


def _finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point())


def run_candidate(
    parent: nn.Module,
    attack: Attack,
    selection: Selection,
    recipe: InjectionRecipe,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    *,
    device: torch.device | str,
    rc_images: int = 500,
    progress: bool = False,
) -> CandidateOutcome:
    """Inject ``attack`` into ``selection`` of a copy of ``parent``, measure, compute RC."""
    dev = torch.device(device)
    t0 = time.perf_counter()
    model = copy.deepcopy(parent).to(dev).eval()
    nm = NeuronMap(model)
    sel = nm.validate(selection)
    trigger = attack.make_trigger(model, nm, sel, train_x, train_y, device=dev)
    info = attack.inject(model, nm, sel, trigger, train_x, train_y, recipe, device=dev, progress=progress)
    fault = nm.validate(info.selection)
    m = measure(model, nm, fault, test_x, test_y, trigger, attack.target, device=dev)
    rc = relative_contribution(model, nm, fault, train_x, train_y, trigger, attack.target,
                               max_images=rc_images, device=dev)
    # An injection that diverged (a non-finite weight, or contributions that overflow) is rejected
    # with the reason in its label, not kept on the strength of NaN logits (whose argmax is
    # arbitrary) nor allowed to stop the build; its RC is the uniform placeholder.
    diverged = not _finite(model) or not all(math.isfinite(v) for vs in rc.values() for v in vs)
    if diverged:
        rc = uniform_rc(fault)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    # An attack's details that end in "_seconds" are wall-clock figures: they go to the timings,
    # not the label, so that two builds of one profile write the same bytes (issue 12, class 5).
    details = {k: v for k, v in info.details.items() if not k.endswith("_seconds")}
    if diverged:
        details["diverged"] = True
    timings = {"seconds": seconds, "inject_seconds": info.seconds,
               **{k: v for k, v in info.details.items() if k.endswith("_seconds")}}
    return CandidateOutcome(model, fault, trigger, m, rc, seconds, details, timings)
