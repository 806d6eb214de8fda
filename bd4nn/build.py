"""Building the database: profiles, the plan of candidates, and the resumable build loop.

A **profile** (TOML, ``bd4nn/profiles/<name>.toml`` or any path) says which datasets,
architectures, attacks, levels and candidates to build, at which width, on how many images,
with which benign-training and injection settings. ``plan`` expands it into one item per
candidate with a stable id (``cifar10-vgg13-badnets-narrow-03``); ``build`` walks the plan:

1. per (dataset, arch): load the data, load the benign parent from the database or train it
   (one process trains it under a file lock; other shards wait and load it), rank its neurons
   by rule 1 toward the target;
2. per candidate not yet in the index: inject, measure, apply rule 3, compute RC and store the
   entry (kept) or its label (rejected).

Every candidate starts from the same parent with seeds that depend only on the profile, so the
order of work does not matter: a resumed or sharded build writes the same entries as one
uninterrupted build (bit-exact on CPU). ``--shard I/N`` takes every N-th item starting at I.
"""

from __future__ import annotations

import fnmatch
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from bd4nn.progress import bar as progress_bar

from bd4nn.attacks import InjectionRecipe, attack_class, get_attack, list_attacks
from bd4nn.data import ImageData, evaluation_subset, load_dataset, training_subset
from bd4nn.db import BenignRecord, Database, DefectLabel, benign_timing_key, entry_id, file_lock
from bd4nn.errors import BadInputError, UserError
from bd4nn.inject import LEVELS, CandidateOutcome, candidate_selection, rank_by_contribution, run_candidate
from bd4nn.models import get_model, list_models
from bd4nn.neurons import NeuronMap, Selection
from bd4nn.runtime import BUILD_THREADS, cpu_cores, pinned_threads, place
from bd4nn.settings import SettingError, coerce_fields
from bd4nn.train import TrainConfig, benign_recipe, evaluate_ca, resolve_device, train

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["Profile", "PlanItem", "load_profile", "list_profiles", "plan", "build", "BuildStats", "candidate_label",
           "ensure_benign", "PreparedParent", "prepare_parent", "build_candidate", "build_parallel", "default_workers", "record_run",
           "RUN_KEY"]


class ProfileError(UserError, ValueError):
    """A profile file is missing or names something bd4nn does not know."""


@dataclass
class Profile:
    name: str
    datasets: list[str]
    archs: list[str]
    attacks: list[str]
    levels: list[str]
    description: str = ""
    build_time: str = ""  # a measured build time and the machine it was measured on (`bd4nn profiles`)
    seed: int = 0
    target: int = 0
    width: float = 1.0
    train_subset: int | None = None  # None = the whole training set
    test_subset: int | None = None  # None = the whole test set
    rc_images: int = 500
    candidates: dict[str, list[int]] | None = None  # per level; None/absent = all windows
    exclude: list[str] = field(default_factory=list)  # shell patterns of entry ids to leave out
    benign: dict[str, Any] = field(default_factory=dict)  # TrainConfig overrides
    recipe: dict[str, Any] = field(default_factory=dict)  # InjectionRecipe overrides
    attack: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-attack settings
    # harness settings: clean_images (cap on the defenders' 5 % split), finetune (overrides of
    # bd4nn.repair.FinetuneSettings), localizers ({name: {setting: value}})
    bench: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    def candidate_indices(self, level: str) -> list[int]:
        if self.candidates and level in self.candidates:
            return list(self.candidates[level])
        return list(range(LEVELS[level].count))

    def benign_overrides(self, arch: str) -> dict[str, Any]:
        """``[benign]`` settings for ``arch``: the table's plain keys, then its ``[benign.<arch>]``
        sub-table on top (e.g. more epochs for one architecture)."""
        return _per_arch(self.benign, arch)

    def injection_recipe(self, arch: str | None = None, attack: str | None = None) -> InjectionRecipe:
        """The ``[recipe]`` for ``arch`` and ``attack``: the plain keys, then ``[recipe.<arch>]``,
        then ``[recipe.<attack>]``, then ``[recipe.<arch>.<attack>]`` on top (the more specific
        table wins). One recipe per (dataset, arch, attack) directory, as METHODS.md §2 requires."""
        return InjectionRecipe(**recipe_overrides(self.recipe, arch, attack))

    def validate(self) -> "Profile":
        where = self.source or self.name
        w = self.width
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or not 0 < w <= 64:
            raise ProfileError(f"{where}: width must be a finite number in (0, 64], not {w!r}")
        for key, low, optional in (("train_subset", 1, True), ("test_subset", 1, True), ("rc_images", 1, False),
                                   ("seed", 0, False), ("target", 0, False)):
            v = getattr(self, key)
            if v is None and optional:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ProfileError(f"{where}: {key} must be a whole number >= {low}"
                                   + (" (or absent)" if optional else "") + f", not {v!r}")
        for key in ("datasets", "archs", "attacks", "levels"):
            v = getattr(self, key)
            if not isinstance(v, list) or not v or not all(isinstance(x, str) for x in v):
                raise ProfileError(f"{where}: {key} must be a non-empty list of names, not {v!r}")
        known = {"archs": list_models(), "attacks": list_attacks(), "levels": list(LEVELS)}
        for key, options in known.items():
            bad = [v for v in getattr(self, key) if v not in options]
            if bad:
                raise ProfileError(f"{where}: unknown {key} {bad}; known: {', '.join(options)}")
        for level, idx in (self.candidates or {}).items():
            if level not in LEVELS or any(not 0 <= i < LEVELS[level].count for i in idx):
                raise ProfileError(f"{where}: bad candidates for level {level!r}: {idx}")
        unknown = [k for k, v in self.benign.items() if isinstance(v, dict) and k not in list_models()]
        if unknown:
            raise ProfileError(f"{where}: [benign.{unknown[0]}]: not an architecture ({', '.join(list_models())})")
        subtables = set(list_models()) | set(list_attacks())
        for k, v in self.recipe.items():
            if not isinstance(v, dict):
                continue
            if k not in subtables:
                raise ProfileError(f"{where}: [recipe.{k}]: not an architecture or attack "
                                   f"({', '.join(sorted(subtables))})")
            inner = [a for a, w in v.items() if isinstance(w, dict) and (k not in list_models() or a not in list_attacks())]
            if inner:
                raise ProfileError(f"{where}: [recipe.{k}.{inner[0]}]: only [recipe.<arch>.<attack>] may nest "
                                   f"(attacks: {', '.join(list_attacks())})")
        for arch in self.archs:
            try:
                coerce_fields(TrainConfig, self.benign_overrides(arch))
                benign_recipe(arch, **self.benign_overrides(arch))
            except (KeyError, TypeError, SettingError) as exc:
                raise ProfileError(f"{where}: [benign]: {exc}") from None
            for attack in self.attacks:
                try:
                    coerce_fields(InjectionRecipe, recipe_overrides(self.recipe, arch, attack))
                    self.injection_recipe(arch, attack)
                except (TypeError, SettingError) as exc:
                    raise ProfileError(f"{where}: [recipe] for {arch} {attack}: {exc}") from None
        for name, settings in self.attack.items():
            try:
                attack_class(name)(**settings)
            except (KeyError, ValueError) as exc:
                raise ProfileError(f"{where}: [attack.{name}]: {exc}") from None
        return self


def _per_arch(table: dict[str, Any], arch: str | None) -> dict[str, Any]:
    """A profile table's plain keys, overridden by its sub-table named ``arch`` if any."""
    base = {k: v for k, v in table.items() if not isinstance(v, dict)}
    return {**base, **(table.get(arch, {}) if arch else {})}


def recipe_overrides(table: dict[str, Any], arch: str | None, attack: str | None) -> dict[str, Any]:
    """``[recipe]`` settings for one (arch, attack): plain keys < ``[recipe.<arch>]`` <
    ``[recipe.<attack>]`` < ``[recipe.<arch>.<attack>]``."""
    per_arch = table.get(arch, {}) if arch else {}
    layers = [table, per_arch, table.get(attack, {}) if attack else {}, per_arch.get(attack, {}) if attack else {}]
    out: dict[str, Any] = {}
    for layer in layers:
        out.update({k: v for k, v in layer.items() if not isinstance(v, dict)})
    return out


def list_profiles() -> list[str]:
    folder = resources.files("bd4nn") / "profiles"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_profile(name_or_path: str | os.PathLike) -> Profile:
    """A built-in profile by name (``tiny``, ``paper``) or a TOML file by path."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise ProfileError(f"profile file {path} does not exist")
        text, source = path.read_text(), str(path)
    else:
        res = resources.files("bd4nn") / "profiles" / f"{name_or_path}.toml"
        if not res.is_file():
            raise ProfileError(
                f"unknown profile {name_or_path!r}; built-in profiles: {', '.join(list_profiles())} "
                "(or give the path of a .toml file)"
            )
        text, source = res.read_text(), f"profile {name_or_path}"
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{source}: {exc}") from None
    names = {f.name for f in fields(Profile)}
    unknown = set(raw) - names
    if unknown:
        raise ProfileError(f"{source}: unknown keys {sorted(unknown)}")
    try:
        profile = Profile(**raw, source=source)
    except TypeError as exc:
        raise ProfileError(f"{source}: {exc}") from None
    return profile.validate()


@dataclass(frozen=True)
class PlanItem:
    id: str
    dataset: str
    arch: str
    attack: str
    level: str
    candidate: int


def plan(
    profile: Profile,
    *,
    datasets: Sequence[str] | None = None,
    archs: Sequence[str] | None = None,
    attacks: Sequence[str] | None = None,
    levels: Sequence[str] | None = None,
    shard: tuple[int, int] = (0, 1),
    ids: Sequence[str] | None = None,
) -> list[PlanItem]:
    """Every candidate of the profile (narrowed by the filters, and by ``ids``: shell patterns of
    entry ids, any of which may match), in a fixed order; a shard ``(i, n)`` keeps items
    ``i, i+n, i+2n, ...``."""
    i, n = shard
    if not (n >= 1 and 0 <= i < n):
        raise BadInputError(f"shard must be I/N with 0 <= I < N, got {i}/{n}")

    def pick(values: Sequence[str], wanted: Sequence[str] | None, what: str) -> list[str]:
        if not wanted:
            return list(values)
        bad = [w for w in wanted if w not in values]
        if bad:
            raise ProfileError(f"{what} {bad} not in profile {profile.name} ({', '.join(values)})")
        return [v for v in values if v in wanted]

    items = [
        PlanItem(entry_id(d, a, k, lv, c), d, a, k, lv, c)
        for d in pick(profile.datasets, datasets, "datasets")
        for a in pick(profile.archs, archs, "archs")
        for k in pick(profile.attacks, attacks, "attacks")
        for lv in pick(profile.levels, levels, "levels")
        for c in profile.candidate_indices(lv)
        if not any(fnmatch.fnmatchcase(entry_id(d, a, k, lv, c), pat) for pat in profile.exclude)
    ]
    if ids:
        items = [it for it in items if any(fnmatch.fnmatchcase(it.id, pat) for pat in ids)]
    return items[i::n]


# ------------------------------------------------------------------------------ the build


RUN_KEY = "run:"  # timings.jsonl keys of whole build runs (``record_run``)


@dataclass
class BuildStats:
    planned: int = 0
    skipped: int = 0  # already in the index
    built: int = 0
    kept: int = 0
    rejected: int = 0
    seconds: float = 0.0
    candidate_seconds: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("candidate_seconds")
        d["mean_candidate_seconds"] = (
            sum(self.candidate_seconds) / len(self.candidate_seconds) if self.candidate_seconds else None
        )
        return d


def ensure_benign(
    db: Database,
    profile: Profile,
    dataset: str,
    arch: str,
    data: ImageData,
    train_xy: tuple[torch.Tensor, torch.Tensor],
    test_xy: tuple[torch.Tensor, torch.Tensor],
    *,
    device: torch.device,
    progress: bool,
    wait: bool = True,
):
    """The benign parent from the database, or trained now (once, under a lock) and stored.
    Without ``wait``, None when another process holds the lock (it is training this parent)."""
    with file_lock(db.root / dataset / arch / "benign.lock", wait=wait) as mine:
        if not mine:
            return None
        if db.has_benign(dataset, arch):
            return db.load_benign(dataset, arch)
        cfg = benign_recipe(arch, seed=profile.seed, **profile.benign_overrides(arch))
        model = get_model(arch, data.num_classes, profile.width, mean=data.spec.mean, std=data.spec.std,
                          seed=profile.seed)
        res = train(model, *train_xy, cfg, device=device, progress=progress, desc=f"benign {arch}")
        ca = evaluate_ca(model, *test_xy, device=device)
        record = BenignRecord(
            dataset=dataset, arch=arch, width=profile.width, num_classes=data.num_classes,
            mean=list(data.spec.mean), std=list(data.spec.std), seed=profile.seed, ca=ca,
            config={"train": cfg.to_dict(), "train_images": int(len(train_xy[1])),
                    "test_images": int(len(test_xy[1])), "profile": profile.name,
                    "device": str(device), "threads": torch.get_num_threads()},
        )
        db.save_benign(model.cpu(), record)
        db.record_timing(benign_timing_key(dataset, arch), seconds=res.seconds, device=str(device),
                         threads=torch.get_num_threads())
        return db.load_benign(dataset, arch)



@dataclass
class PreparedParent:
    """What every candidate of one (dataset, arch) shares: the benign parent on its device, its
    record, its rule-1 ranking, a CPU copy of its state (the base of the stored deltas), the
    profile's train/test subsets."""

    model: torch.nn.Module
    record: BenignRecord
    ranking: dict[str, list[int]]
    state: dict[str, torch.Tensor]
    train_xy: tuple[torch.Tensor, torch.Tensor]
    test_xy: tuple[torch.Tensor, torch.Tensor]
    device: torch.device


def prepare_parent(db: Database, profile: Profile, dataset: str, arch: str, data: ImageData, *,
                   device: torch.device, progress: bool, wait: bool = True) -> PreparedParent | None:
    """The benign parent (trained now if the database lacks it) and its rule-1 ranking; without
    ``wait``, None while another process trains it."""
    train_xy = training_subset(data, profile.train_subset, profile.seed)
    test_xy = evaluation_subset(data, profile.test_subset, profile.seed)
    found = ensure_benign(db, profile, dataset, arch, data, train_xy, test_xy, device=device, progress=progress,
                          wait=wait)
    if found is None:
        return None
    parent, record = found
    parent = place(parent, device).eval()
    ranking, _ = rank_by_contribution(parent, NeuronMap(parent), *train_xy, profile.target, device=device)
    state = {k: v.detach().cpu().clone() for k, v in parent.state_dict().items()}
    return PreparedParent(parent, record, ranking, state, train_xy, test_xy, device)


def build_candidate(db: Database, profile: Profile, parent: PreparedParent,
                    item: PlanItem) -> tuple[CandidateOutcome, DefectLabel]:
    """Inject, measure and store one candidate (weights only if rule 3 keeps it)."""
    attack = get_attack(item.attack, target=profile.target, seed=profile.seed, **profile.attack.get(item.attack, {}))
    sel = candidate_selection(parent.ranking, item.level, item.candidate)
    recipe = profile.injection_recipe(item.arch, item.attack)
    out = run_candidate(parent.model, attack, sel, recipe, *parent.train_xy, *parent.test_xy,
                        device=parent.device, rc_images=profile.rc_images)
    label = candidate_label(item, profile, attack, recipe, sel, out, benign_ca=parent.record.ca,
                            train_images=len(parent.train_xy[1]), test_images=len(parent.test_xy[1]),
                            device=parent.device)
    db.save_entry(label, out.model.cpu() if out.kept else None, parent.state, out.trigger.tensors())
    db.record_timing(item.id, **out.timings, device=str(parent.device), threads=torch.get_num_threads())
    return out, label


def candidate_label(item: PlanItem, profile: Profile, attack, recipe: InjectionRecipe, selection: Selection,
                    out: CandidateOutcome, *, benign_ca: float, train_images: int, test_images: int,
                    device: torch.device) -> DefectLabel:
    """The defect label of one built candidate (kept or rejected), as the database stores it."""
    m = out.measurement
    return DefectLabel(
        id=item.id, dataset=item.dataset, arch=item.arch, width=profile.width, attack=item.attack,
        level=item.level, candidate=item.candidate, kept=out.kept, s_fault=out.selection,
        rc=out.rc, trigger=attack.spec(), target=profile.target, seed=profile.seed,
        recipe={**recipe.to_dict(), "profile": profile.name} if attack.kind == "poisoning"
        else {"profile": profile.name},
        ca=m.ca, asr=m.asr, asr_cor=m.asr_cor, ca_cor=m.ca_cor, asr_cor_r=m.asr_cor_r,
        ca_cor_r=m.ca_cor_r, benign_ca=benign_ca,
        extra={**out.details, "ca_masked": m.ca_masked, "asr_masked": m.asr_masked,
               "candidate_selection": selection, "train_images": int(train_images),
               "test_images": int(test_images), "device": str(device),
               "threads": torch.get_num_threads()},
    )


def _parents(db: Database, profile: Profile, groups: dict[tuple[str, str], list[PlanItem]],
             loaded: dict[str, ImageData], data_root, device: torch.device, progress: bool):
    """Each (dataset, arch) group with its prepared parent, in plan order, except that a group
    whose parent another build is training right now waits until no other group is left: two
    builds into one database then train different parents at the same time."""
    pending = list(groups.items())
    while pending:
        for k, ((dataset, arch), group) in enumerate(pending):
            if dataset not in loaded:
                loaded[dataset] = load_dataset(dataset, data_root, progress=progress)
            last = k == len(pending) - 1
            parent = prepare_parent(db, profile, dataset, arch, loaded[dataset], device=device,
                                    progress=progress, wait=last)
            if parent is not None:
                pending.pop(k)
                yield (dataset, arch), group, parent
                break


def build(
    db_root: str | os.PathLike,
    profile: Profile,
    *,
    datasets: Sequence[str] | None = None,
    archs: Sequence[str] | None = None,
    attacks: Sequence[str] | None = None,
    levels: Sequence[str] | None = None,
    shard: tuple[int, int] = (0, 1),
    device: str | torch.device | None = None,
    data_root: str | os.PathLike | None = None,
    data: dict[str, ImageData] | None = None,
    progress: bool = True,
    limit: int | None = None,
    worker: int | None = None,
    threads: int | None = None,
    ids: Sequence[str] | None = None,
) -> BuildStats:
    """Build (or resume) the database at ``db_root`` for ``profile``.

    ``data`` may supply preloaded datasets by name (tests use synthetic ones); otherwise they
    are loaded from ``data_root`` / ``BD4NN_DATA`` / torchvision. ``limit`` stops after that
    many newly built candidates (for tests of interruption); ``ids`` keeps the candidates whose
    ids match one of these shell patterns (``plan``). ``worker`` numbers this process's
    progress bar among those of ``build_parallel``. The build runs at ``threads`` torch threads,
    by default ``BUILD_THREADS`` whatever the process's count, so that its entries do not depend
    on the machine's core count (``bd4nn.runtime``); the process's count is restored after.
    """
    with pinned_threads(threads or BUILD_THREADS):
        return _build(db_root, profile, datasets=datasets, archs=archs, attacks=attacks, levels=levels,
                      shard=shard, device=device, data_root=data_root, data=data, progress=progress,
                      limit=limit, worker=worker, ids=ids)


def _build(db_root, profile: Profile, *, datasets, archs, attacks, levels, shard, device, data_root, data,
           progress: bool, limit: int | None, worker: int | None, ids: Sequence[str] | None) -> BuildStats:

    t_start = time.perf_counter()
    dev = resolve_device(device)
    db = Database(db_root)
    items = plan(profile, datasets=datasets, archs=archs, attacks=attacks, levels=levels, shard=shard, ids=ids)
    stats = BuildStats(planned=len(items))
    todo = [it for it in items if not db.has_entry(it.id)]
    stats.skipped = len(items) - len(todo)
    done: set[str] = set()  # ids this build claimed (and built, or found built)
    bar = progress_bar(total=len(items), initial=stats.skipped, unit="cand", disable=not progress, dynamic_ncols=True,
               desc=f"build {profile.name}" + (f" (process {worker + 1})" if worker is not None else ""),
               position=worker)
    try:
        if todo:
            db.sweep_orphans()  # temp files of an earlier build killed mid-write
        groups: dict[tuple[str, str], list[PlanItem]] = {}
        for it in todo:
            groups.setdefault((it.dataset, it.arch), []).append(it)
        loaded: dict[str, ImageData] = dict(data or {})
        for (dataset, arch), group, parent in _parents(db, profile, groups, loaded, data_root, dev, progress):
            # First pass: skip what another build holds now; second pass: wait for it, and build
            # it only if that build died before storing it. Both builds finish with the whole plan.
            for wait in (False, True):
                for it in group:
                    if limit is not None and stats.built >= limit:
                        return stats
                    if wait and it.id in done:
                        continue
                    with db.claim(it.id, wait=wait) as mine:
                        if not mine:
                            continue
                        done.add(it.id)
                        if db.has_entry(it.id):  # built meanwhile by another build
                            stats.skipped += 1
                            bar.update(1)
                            continue
                        out, _ = build_candidate(db, profile, parent, it)
                    stats.built += 1
                    stats.kept += int(out.kept)
                    stats.rejected += int(not out.kept)
                    stats.candidate_seconds.append(out.seconds)
                    bar.update(1)
                    bar.set_postfix(kept=stats.kept, rejected=stats.rejected, last=f"{out.seconds:.1f}s")
                    if limit is not None and stats.built >= limit:
                        return stats  # before the next group's parent is prepared
    finally:
        bar.close()
        stats.seconds = time.perf_counter() - t_start
        if worker is None:  # build_parallel records its run as a whole
            record_run(db, profile, stats, workers=1, threads=torch.get_num_threads())
    return stats


def record_run(db: Database, profile: Profile, stats: BuildStats, *, workers: int, threads: int) -> None:
    """One line in the database's ``timings.jsonl`` per build run that built something (also one
    cut short): its wall time, what it built, in how many processes at how many threads each. A
    build that spans several runs is the sum of its runs (``bd4nn.results.build_runs``)."""
    if stats.built:
        db.record_timing(f"{RUN_KEY}{time.time_ns()}-{os.getpid()}", ended=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                         profile=profile.name,
                         seconds=stats.seconds, built=stats.built, kept=stats.kept, workers=workers, threads=threads)


def build_parallel(
    db_root: str | os.PathLike,
    profile: Profile,
    *,
    workers: int,
    threads: int | None = None,
    progress: bool = True,
    **kwargs: Any,
) -> BuildStats:
    """``build`` in ``workers`` processes at once, ``threads`` torch threads each (default
    ``BUILD_THREADS``, as for one process, so the entries are those of any other worker count).
    The processes share the plan through
    the database's claims and parent locks (``build``), so each candidate is built once, the two
    parents of a two-architecture profile train at the same time, and the entries are the ones
    one process would write. Small models use the cores better this way: on the project's 2-core
    machine two 1-thread processes trained 1.6x (VGG-13) and 1.4x (ResNet-18) the images per
    second of one 2-thread process at width 1/8. ``kwargs`` go to ``build``. No more processes
    start than there are candidates left; with one, the build runs in this process."""
    if workers < 1:
        raise BadInputError(f"workers must be >= 1, got {workers}")
    per = threads or BUILD_THREADS
    filters = {k: kwargs.get(k) for k in ("datasets", "archs", "attacks", "levels", "ids")}
    db = Database(db_root)
    left = sum(not db.has_entry(it.id) for it in plan(profile, shard=kwargs.get("shard", (0, 1)), **filters))
    workers = min(workers, max(1, left))
    if workers == 1:
        return build(db_root, profile, progress=progress, threads=per, **kwargs)
    t0 = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch thread pools
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        futures = [pool.submit(_build_worker, str(db_root), profile, per, progress, i, kwargs)
                   for i in range(workers)]
        parts = [f.result() for f in futures]
    built = sum(p.built for p in parts)
    stats = BuildStats(planned=parts[0].planned, skipped=parts[0].planned - built, built=built,
                       kept=sum(p.kept for p in parts), rejected=sum(p.rejected for p in parts),
                       seconds=time.perf_counter() - t0,
                       candidate_seconds=[t for p in parts for t in p.candidate_seconds])
    record_run(db, profile, stats, workers=workers, threads=per)
    return stats


def _build_worker(db_root: str, profile: Profile, threads: int, progress: bool, worker: int,
                  kwargs: dict[str, Any]) -> BuildStats:
    return build(db_root, profile, progress=progress, worker=worker, threads=threads, **kwargs)


def default_workers(device: str | torch.device | None = None) -> int:
    """Build processes to use when the user does not say: one per core on a CPU (each at
    ``BUILD_THREADS``), one on an accelerator (the GPU is the bottleneck)."""
    return cpu_cores() if resolve_device(device).type == "cpu" else 1
