"""The benchmark's cases without pytest: what each kind of case computes, records and checks.

``pytest bench/`` (the test functions of ``bench/test_*.py``) and ``bd4nn bench --ray`` (Ray
tasks, ``bd4nn.cluster``) run a case through the same function here, so a case's results line is
the same whichever ran it. A case function takes a ``Workbench`` and the case's parameters, named
as pytest parametrizes them (``localizer_name``, ``entry_id``, ``repair_name``, ``parent_id``),
and returns a ``CaseOutcome``: the record (the fields of its results line) and the problems
found, empty when the case passes (the pytest case asserts that). ``CASES`` maps each kind, the
``case`` field of its record, to its function.

A ``Workbench`` is what one process needs to run cases: the database, the profile's ``[bench]``
settings, the device, the seed, and caches of the entries, parents and localizations it loaded,
so that a repair case reuses its localization and a worker loads each entry once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from bd4nn import harness
from bd4nn.db import Database
from bd4nn.inject import ASR_COR_THRESHOLD
from bd4nn.verify import differences, remeasure_context

if TYPE_CHECKING:  # pragma: no cover
    from bd4nn.build import Profile

__all__ = ["CaseOutcome", "Workbench", "CASES", "case_record", "run_case"]

CONTEXTS_KEPT = 4  # loaded entries and parents kept in memory per process


@dataclass
class CaseOutcome:
    record: dict[str, Any]  # the case line's fields (``case``, coordinates, metrics)
    problems: list[str] = field(default_factory=list)  # what failed its checks; empty: passed


def case_record(case: str, **metrics: Any) -> dict[str, Any]:
    """A case's results fields: its kind, then its metrics, a non-finite float as None (JSON has
    no NaN)."""
    return {"case": case, **{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                             for k, v in metrics.items()}}


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


@dataclass
class Workbench:
    db: Database
    profile: Profile | None
    device: torch.device
    seed: int = 0
    data_root: str | None = None  # where the datasets are (None: ``$BD4NN_DATA``, ``bd4nn.data``)
    _contexts: dict[str, Any] = field(default_factory=dict)
    _localizations: dict[tuple[str, str], Any] = field(default_factory=dict)
    _data: dict[str, Any] = field(default_factory=dict)

    def settings(self, key: str) -> dict[str, Any]:
        """The profile's ``[bench.<key>]`` table (``localizers``, ``finetune``), empty if none."""
        return dict((self.profile.bench if self.profile else {}).get(key, {}))

    def _clean_options(self) -> dict[str, Any]:
        b = self.profile.bench if self.profile else {}
        return {"clean_fraction": b.get("clean_fraction", 0.05), "clean_images": b.get("clean_images")}

    def _datasets(self, name: str) -> dict[str, Any]:
        """The datasets loaded so far, ``name`` among them (each is loaded once per process)."""
        from bd4nn.data import load_dataset  # noqa: PLC0415

        if name not in self._data:
            self._data[name] = load_dataset(name, self.data_root, progress=False)
        return self._data

    def _cached(self, key: str, load: Callable[[], Any]):
        ctx = self._contexts.get(key)
        if ctx is None:
            ctx = load()
            if len(self._contexts) >= CONTEXTS_KEPT:
                self._contexts.pop(next(iter(self._contexts)))
            self._contexts[key] = ctx
        return ctx

    def context(self, entry_id: str) -> harness.EntryContext:
        """The entry's model, label, trigger and data, loaded once per process."""
        def load():
            data = self._datasets(self.db.entry(entry_id)["dataset"])
            return harness.load_context(self.db, entry_id, device=self.device, data=data, **self._clean_options())

        return self._cached(entry_id, load)

    def benign_context(self, parent: str) -> harness.BenignContext:
        """The benign parent ``<dataset>-<arch>`` with its clean data, loaded once per process."""
        dataset, arch = parent.split("-", 1)
        return self._cached(f"benign-{parent}", lambda: harness.load_benign_context(
            self.db, dataset, arch, device=self.device, data=self._datasets(dataset), **self._clean_options()))

    def localizer(self, name: str, label):
        return harness.make_localizer(name, label, **self.settings("localizers").get(name, {}))

    def localization(self, name: str, entry_id: str) -> harness.Localization:
        """The localization of ``entry_id`` by ``name`` (computed once per process)."""
        key = (name, entry_id)
        if key not in self._localizations:
            ctx = self.context(entry_id)
            self._localizations[key] = harness.localize(ctx, self.localizer(name, ctx.label), seed=self.seed)
        return self._localizations[key]

    def remember(self, name: str, entry_id: str, result: harness.Localization) -> None:
        self._localizations[(name, entry_id)] = result


def _direct(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return fn(*args, **kwargs)


# ------------------------------------------------------------------------------ the cases


def localization_case(work: Workbench, localizer_name: str, entry_id: str, *,
                      call: Callable[..., Any] = _direct) -> CaseOutcome:
    """One localizer on one entry: score, take the top-k per layer, compare with the truth.
    ``call(fn, *args, **kwargs)`` runs the localization (pytest-benchmark times it there)."""
    ctx = work.context(entry_id)
    loc = work.localizer(localizer_name, ctx.label)
    before = harness.snapshot(ctx.model)
    result = call(harness.localize, ctx, loc, seed=work.seed)
    work.remember(localizer_name, entry_id, result)
    rec = case_record("localization", localizer=localizer_name, repair=None, **ctx.fields(), **result.metrics())
    problems = []
    if not harness.model_unchanged(before, ctx.model):
        problems.append(f"{localizer_name} modified the model it was given")
    if not 0.0 <= result.wji <= 1.0:
        problems.append(f"WJI {result.wji} is outside [0, 1]")
    if result.n_localized > result.n_fault:
        problems.append(f"{result.n_localized} neurons localized, more than the {result.n_fault} fault neurons")
    problems += [f"{key} is not finite: {rec[key]}" for key in ("wji", "time_s", "hits", "n_fault", "n_localized")
                 if not _finite(rec[key])]
    if localizer_name == "pfl" and (abs(result.wji - 1.0) > 1e-9 or result.hits != result.n_fault):
        problems.append(f"the ground truth localizes itself with WJI {result.wji} and {result.hits}/"
                        f"{result.n_fault} hits, not 1 and all")
    return CaseOutcome(rec, problems)


def repair_case(work: Workbench, localizer_name: str, repair_name: str, entry_id: str) -> CaseOutcome:
    """Repair what the localizer found in the entry; CA and ASR before and after, CAD, ASRD."""
    from bd4nn.repair import FinetuneSettings  # noqa: PLC0415

    ctx = work.context(entry_id)
    found = work.localization(localizer_name, entry_id)
    settings = work.settings("finetune")
    res = harness.repair_case(ctx, found.selection, repair_name, seed=work.seed,
                              finetune_settings=FinetuneSettings(**settings) if settings else None)
    rec = case_record("repair", localizer=localizer_name, repair=repair_name, **ctx.fields(),
                      wji=found.wji, hits=found.hits, n_fault=found.n_fault, n_localized=found.n_localized,
                      time_s=res.seconds, ca_before=res.ca_before, asr_before=res.asr_before,
                      ca_after=res.ca_after, asr_after=res.asr_after, cad=res.cad, asrd=res.asrd)
    problems = [f"{key} {rec[key]} is not a fraction in [-1, 1]"
                for key in ("ca_before", "asr_before", "ca_after", "asr_after", "cad", "asrd")
                if not (_finite(rec[key]) and -1.0 <= rec[key] <= 1.0)]
    if localizer_name == "pfl" and repair_name == "prune":
        # pruning S_fault (BN γ=β=0) is the masking of rule 3, so ASRD is the label's ASR.Cor
        if not (res.asrd > 0.5 and abs(res.asrd - ctx.label.asr_cor) <= 0.02):
            problems.append(f"pruning S_fault gives ASRD {res.asrd:.4f}, not the label's ASR.Cor "
                            f"{ctx.label.asr_cor:.4f} (within 0.02, above 0.5)")
    return CaseOutcome(rec, problems)


def benign_case(work: Workbench, localizer_name: str, parent_id: str) -> CaseOutcome:
    """A localizer on a benign parent (a control): its time and the summary of its scores."""
    ctx = work.benign_context(parent_id)
    before = harness.snapshot(ctx.model)
    out = harness.benign_localization(ctx, work.localizer(localizer_name, None), seed=work.seed)
    rec = case_record("benign", localizer=localizer_name, repair=None, entry=ctx.id, dataset=ctx.dataset,
                      arch=ctx.arch, **out)
    problems = [] if harness.model_unchanged(before, ctx.model) else [
        f"{localizer_name} modified the model it was given"]
    problems += [f"{key} is not finite: {rec[key]}" for key in ("time_s", "score_max_z", "score_max")
                 if not _finite(rec[key])]
    return CaseOutcome(rec, problems)


def benign_trigger_case(work: Workbench, entry_id: str) -> CaseOutcome:
    """The entry's trigger on its benign parent: the natural-backdoor baseline of its ASR."""
    ctx = work.context(entry_id)
    parent = work.benign_context(f"{ctx.label.dataset}-{ctx.label.arch}").model
    asr = harness.trigger_asr_on_parent(ctx, parent)
    rec = case_record("benign_trigger", localizer=None, repair=None, **ctx.fields(), benign_asr=asr)
    return CaseOutcome(rec, [] if 0.0 <= asr <= 1.0 else [f"benign ASR {asr} is outside [0, 1]"])


def database_case(work: Workbench, entry_id: str) -> CaseOutcome:
    """Re-measure the entry's CA, ASR and ASR.Cor and compare them with its label
    (``bd4nn verify --remeasure``'s check and tolerance)."""
    ctx = work.context(entry_id)
    m = remeasure_context(ctx)
    rec = case_record("database", localizer=None, repair=None, **ctx.fields(), ca_now=m.ca, asr_now=m.asr,
                      asr_cor_now=m.asr_cor)
    problems = differences(ctx.label, m)
    if not m.asr_cor > ASR_COR_THRESHOLD:
        problems.append(f"ASR.Cor {m.asr_cor:.4f}: a kept entry must pass rule 3 (> {ASR_COR_THRESHOLD})")
    return CaseOutcome(rec, problems)


CASES: dict[str, Callable[..., CaseOutcome]] = {
    "localization": localization_case,
    "repair": repair_case,
    "benign": benign_case,
    "benign_trigger": benign_trigger_case,
    "database": database_case,
}


def run_case(work: Workbench, kind: str, **params: Any) -> CaseOutcome:
    """The case of kind ``kind`` (a key of ``CASES``) with its parameters."""
    return CASES[kind](work, **params)
