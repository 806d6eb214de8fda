"""The glue between the database, the localizers, the metrics and the repairs.

One *case* of the benchmark is a localizer (and optionally a repair) applied to one entry.
``EntryContext`` is what a case needs from the database, loaded once per entry and worker: the
infected model on its device, its neuron map, its label and trigger, the defender's clean data
and the test subset the label was measured on. ``localize`` runs a localizer, applies the
top-k budget and computes WJI, hits, AUROC, AP and the time; ``repair_case`` repairs what it
found. Both ``bd4nn localize`` and the pytest cases in ``bench/`` call these functions, so the
CLI and the harness cannot disagree.

Only the harness touches the label: the localizer gets the model, the neuron map and the clean
data (and PFL gets ``S_fault`` as a setting, DESIGN.md).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bd4nn.errors import BadInputError
from bd4nn.attacks.base import trigger_from_tensors
from bd4nn.data import ImageData, defender_data, evaluation_subset, load_dataset
from bd4nn.db import Database, DefectLabel, bit_equal
from bd4nn.metrics import (auroc, average_precision, flatten_scores, hits, selection_size, tied_layers,
                           top_k_selection, wji)
from bd4nn.neurons import NeuronMap
from bd4nn.repair import FinetuneSettings, RepairResult, repair
from bd4nn.runtime import place
from bd4nn.train import evaluate_asr

__all__ = ["EntryContext", "BenignContext", "Localization", "load_context", "load_benign_context", "localize",
           "timed_scores", "benign_localization", "trigger_asr_on_parent", "repair_case", "make_localizer"]


@dataclass
class EntryContext:
    id: str
    label: DefectLabel
    model: nn.Module
    neuron_map: NeuronMap
    trigger: Callable[[torch.Tensor], torch.Tensor]  # a stamp, SIG's signal or WaNet's warp
    clean_x: torch.Tensor
    clean_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    device: torch.device

    def fields(self) -> dict:
        """The entry's coordinates and label figures, as every results case line records them."""
        lab = self.label
        return {"entry": lab.id, "dataset": lab.dataset, "arch": lab.arch, "attack": lab.attack, "level": lab.level,
                "candidate": lab.candidate, "ca": lab.ca, "asr": lab.asr, "asr_cor": lab.asr_cor,
                "benign_ca": lab.benign_ca}

    def clean(self):
        from localizers import CleanData  # the harness is the only place both sides meet

        return CleanData(self.clean_x, self.clean_y, self.num_classes)


def load_context(
    db: Database,
    entry_id: str,
    *,
    device: torch.device | str = "cpu",
    data: Mapping[str, ImageData] | None = None,
    data_root: str | None = None,
    clean_fraction: float = 0.05,
    clean_images: int | None = None,
    clean_seed: int = 0,
) -> EntryContext:
    """Load one kept entry with its data.

    Clean data = the seeded ``clean_fraction`` of the full training set (METHODS.md §1: 5 %),
    cut to the first ``clean_images`` of that split when given (small profiles). The test set is
    the seeded subset the build measured the label on, so CA/ASR before repair reproduce it.
    ``data`` may hold preloaded datasets by name.
    """
    dev = torch.device(device)
    model, label, trig = db.load_entry(entry_id)
    if not label.kept:
        raise BadInputError(f"entry {entry_id} was rejected by rule 3; only kept entries are benchmark cases")
    ds = (data or {}).get(label.dataset) or load_dataset(label.dataset, data_root, progress=False)
    cx, cy = defender_data(ds, clean_fraction, clean_seed, images=clean_images)
    tx, ty = evaluation_subset(ds, label.extra.get("test_images"), label.seed)
    model = place(model, dev).eval()
    return EntryContext(entry_id, label, model, NeuronMap(model), trigger_from_tensors(trig),
                        cx, cy, tx, ty, ds.num_classes, dev)


def make_localizer(name: str, label: DefectLabel | None = None, **settings: Any):
    """A localizer by name; an oracle (``needs_ground_truth``, e.g. PFL) gets the label's S_fault."""
    from localizers import localizer_class

    cls = localizer_class(name)
    if cls.needs_ground_truth:
        if label is None:
            raise BadInputError(f"{name} reads the ground truth: it needs the entry's label")
        settings = {**settings, "fault": label.s_fault}
    return cls(**settings)


@dataclass
class Localization:
    localizer: str
    scores: dict[str, torch.Tensor]
    selection: dict[str, list[int]]
    wji: float
    hits: int
    n_fault: int
    n_localized: int
    auroc: float
    ap: float
    time_s: float
    settings: dict[str, Any] = field(default_factory=dict)
    tied: list[str] = field(default_factory=list)  # layers where a (seeded) tie-break decided the cut
    details: dict[str, Any] = field(default_factory=dict)  # the localizer's report() of this run

    def metrics(self) -> dict[str, Any]:
        return {"wji": self.wji, "hits": self.hits, "n_fault": self.n_fault, "n_localized": self.n_localized,
                "auroc": _finite_or_none(self.auroc), "ap": _finite_or_none(self.ap), "time_s": self.time_s,
                "tied_layers": len(self.tied), **_summary_fields(self.scores),
                **({"details": self.details} if self.details else {})}

    def by_layer(self, fault: Mapping[str, list[int]]) -> list[tuple[str, list[int], list[int], int]]:
        """Per fault layer in the localizer's scope: (layer, top-k localized, fault, hits)."""
        return [(layer, list(self.selection.get(layer, [])), list(fault[layer]),
                 len(set(self.selection.get(layer, [])) & set(fault[layer])))
                for layer in self.scores if fault.get(layer)]

    def outside_scope(self, fault: Mapping[str, list[int]]) -> tuple[int, int]:
        """(fault neurons, fault layers) the localizer does not score (e.g. FP's one layer)."""
        layers = [layer for layer in fault if layer not in self.scores and fault[layer]]
        return sum(len(fault[layer]) for layer in layers), len(layers)


def _finite_or_none(v: float) -> float | None:
    return v if isinstance(v, (int, float)) and math.isfinite(v) else None


def _summary_fields(scores: Mapping[str, torch.Tensor]) -> dict[str, float | None]:
    """``score_max_z``, ``score_p99_z``, ``score_max``: the model-level summary of a localizer's
    scores (``localizers.base.score_summary``) that the detection AUROC compares between
    infected entries and benign parents."""
    from localizers.base import score_summary

    return {f"score_{k}": _finite_or_none(v) for k, v in score_summary(scores).items()}


def timed_scores(localizer, model: nn.Module, neuron_map: NeuronMap, clean, device: torch.device, *,
                 seed: int = 0) -> tuple[dict[str, torch.Tensor], float]:
    """A localizer's scores and the wall-clock seconds they took, the device synchronized on
    both sides (loading excluded): the time every case reports."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    scores = localizer(model, neuron_map, clean, device=device, seed=seed)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return scores, time.perf_counter() - t0


def localize(ctx: EntryContext, localizer, *, seed: int = 0) -> Localization:
    """Score the entry's neurons, take the top-k per covered layer, compare with the truth.

    Ties at the top-k cut are broken by an order seeded with ``seed`` (``top_k_selection``) and
    counted in ``tied_layers``. Time = wall-clock seconds of ``scores`` with the device
    synchronized, loading excluded.
    """
    label = ctx.label
    scores, seconds = timed_scores(localizer, ctx.model, ctx.neuron_map, ctx.clean(), ctx.device, seed=seed)
    fault = label.s_fault
    sel = top_k_selection(scores, fault, seed=seed)
    flat, labels = flatten_scores(scores, fault)
    return Localization(
        localizer=localizer.name, scores=scores, selection=sel, wji=wji(fault, sel, label.rc),
        hits=hits(fault, sel), n_fault=selection_size(fault), n_localized=selection_size(sel),
        auroc=auroc(flat, labels), ap=average_precision(flat, labels), time_s=seconds,
        settings={} if localizer.needs_ground_truth else localizer.config(),
        tied=tied_layers(scores, fault),
        details=localizer.report(),
    )


@dataclass
class BenignContext:
    """A benign parent as a control case needs it: no label, no trigger, no ground truth."""

    dataset: str
    arch: str
    model: nn.Module
    neuron_map: NeuronMap
    clean_x: torch.Tensor
    clean_y: torch.Tensor
    num_classes: int
    device: torch.device

    @property
    def id(self) -> str:
        return f"benign-{self.dataset}-{self.arch}"

    def clean(self):
        from localizers import CleanData

        return CleanData(self.clean_x, self.clean_y, self.num_classes)


def load_benign_context(db: Database, dataset: str, arch: str, *, device: torch.device | str = "cpu",
                        data: Mapping[str, ImageData] | None = None, data_root: str | None = None,
                        clean_fraction: float = 0.05, clean_images: int | None = None,
                        clean_seed: int = 0) -> BenignContext:
    """The benign parent of (dataset, arch) with the same clean data its entries' cases get."""
    dev = torch.device(device)
    model, record = db.load_benign(dataset, arch)
    ds = (data or {}).get(dataset) or load_dataset(dataset, data_root, progress=False)
    cx, cy = defender_data(ds, clean_fraction, clean_seed, images=clean_images)
    model = place(model, dev).eval()
    return BenignContext(dataset, arch, model, NeuronMap(model), cx, cy, record.num_classes, dev)


def benign_localization(ctx: BenignContext, localizer, *, seed: int = 0) -> dict[str, Any]:
    """A localizer on a benign parent (a control: nothing to score against): its time, the
    summary of its scores (``score_max_z``, ...) and its report."""
    if localizer.needs_ground_truth:
        raise BadInputError(f"{localizer.name} reads the ground truth, which a benign model does not have")
    scores, seconds = timed_scores(localizer, ctx.model, ctx.neuron_map, ctx.clean(), ctx.device, seed=seed)
    details = localizer.report()
    return {"time_s": seconds, **_summary_fields(scores), **({"details": details} if details else {})}


def trigger_asr_on_parent(ctx: EntryContext, parent: nn.Module) -> float:
    """The entry's trigger on its benign parent: the ASR a model never trained on it already has
    (a natural-backdoor baseline), on the test subset the label's ASR was measured on."""
    return evaluate_asr(parent, ctx.test_x, ctx.test_y, ctx.trigger, ctx.label.target, device=ctx.device)


def repair_case(ctx: EntryContext, selection: Mapping[str, list[int]], method: str, *, seed: int = 0,
                finetune_settings: FinetuneSettings | None = None, use_label: bool = True) -> RepairResult:
    """Repair a copy of the entry's model with ``method`` on ``selection``. CA/ASR before repair
    are the label's (measured on the same test subset; ``bench/test_database.py`` re-measures
    them), or measured now with ``use_label=False``."""
    before = (ctx.label.ca, ctx.label.asr) if use_label else None
    return repair(method, ctx.model, selection, clean_x=ctx.clean_x, clean_y=ctx.clean_y,
                  test_x=ctx.test_x, test_y=ctx.test_y, trigger=ctx.trigger, target=ctx.label.target,
                  before=before, device=ctx.device, seed=seed, finetune_settings=finetune_settings)


def model_unchanged(before: Mapping[str, torch.Tensor], model: nn.Module) -> bool:
    """Whether ``model``'s state equals a snapshot bit for bit (a localizer must not edit it).
    Bitwise, so a NaN weight that stayed NaN counts as unchanged (``torch.equal`` says NaN ≠ NaN)."""
    state = model.state_dict()
    return set(state) == set(before) and all(bit_equal(before[k].cpu(), state[k].cpu()) for k in before)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
