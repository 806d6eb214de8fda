"""The build and the benchmark on a Ray cluster: ``bd4nn build --ray [ADDRESS]``, ``bd4nn bench --ray``.

Ray (https://docs.ray.io) schedules the tasks, retries those whose worker died (and, for the
build, those that raised), and gives each task a GPU where the cluster has GPUs: bd4nn writes no
scheduler of its own. Ray is an optional dependency (``pip install -e ".[ray]"``), imported only
here and only when a ``--ray`` run starts; without it, ``--ray`` is a one-line error naming the
extra. ADDRESS is what ``ray.init`` takes: ``auto`` (the cluster ``ray start`` runs on this
node), ``HOST:PORT``, or ``local`` (the default: a new cluster on this machine).

Every node needs bd4nn installed and the database and dataset folders at the same paths as the
driver: a shared filesystem whose ``flock`` works across nodes (NFSv4, Lustre mounted with
``flock``, BeeGFS, ...). ``BD4NN_DATA`` and ``BD4NN_CACHE`` are passed on to the tasks.

* **Build.** One task per benign parent first (``bd4nn.build.prepare_parent``: trains it under
  its lock, or loads it), then, as each parent is stored, one task per ``batch`` candidates of
  its (dataset, arch). A task stores each candidate itself (claim, atomic files, locked index
  append: ``bd4nn.build.build_candidate``), as a ``build_parallel`` process does, at
  ``BUILD_THREADS`` torch threads; a worker keeps the last parent it prepared (model, rule-1
  ranking, data), so the candidates of one parent that land on it share it as in one build
  process. The database is byte for byte the one a serial build writes.
* **Bench.** One task per group of cases that share an entry (or a benign parent) and a
  localizer, run by ``bd4nn.cases`` exactly as the pytest cases run them; the driver
  (``bench/ray_cases.py``, inside ``pytest bench/ --ray``) writes their results through the
  usual recorder.
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bd4nn.build import BuildStats, PlanItem, PreparedParent, Profile, build_candidate, plan, prepare_parent, record_run
from bd4nn.data import CACHE_ENV, DATA_ENV
from bd4nn.db import Database
from bd4nn.errors import BadInputError, UserError
from bd4nn.progress import bar as progress_bar
from bd4nn.runtime import BUILD_THREADS, pinned_threads

__all__ = ["LOCAL", "EXTRA", "RETRIES", "ClusterError", "ray_module", "connect", "task_resources", "build_on_ray",
           "CaseResult", "RayBench"]

LOCAL = "local"  # --ray without an address: a new cluster on this machine (Ray's own name for it)
EXTRA = 'pip install -e ".[ray]"'
RETRIES = 3  # Ray's retries of a task whose worker died (or, for the build, that raised)
FORWARDED_ENV = (DATA_ENV, CACHE_ENV, "BD4NN_DEBUG")  # passed on to the tasks


class ClusterError(UserError):
    """Ray is missing, the cluster cannot be reached or lacks what was asked, or tasks failed."""


def ray_module():
    """The ``ray`` module, or a ``ClusterError`` that names the extra to install."""
    try:
        import ray  # noqa: PLC0415 (an optional dependency)
    except ImportError:
        raise ClusterError(f"--ray needs Ray, an optional dependency: {EXTRA}") from None
    return ray


def connect(address: str | None = LOCAL):
    """``ray.init(address)`` unless this process is connected already; returns ``ray``. Tasks
    get this process's ``BD4NN_DATA`` / ``BD4NN_CACHE``."""
    ray = ray_module()
    if ray.is_initialized():
        return ray
    address = address or LOCAL
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    kwargs: dict[str, Any] = {"include_dashboard": False} if address == LOCAL else {}
    try:
        ray.init(address=address, runtime_env={"env_vars": env} if env else None, **kwargs)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise ClusterError(f"cannot start or reach the Ray cluster at {address!r}: {_one_line(exc)}") from None
    return ray


def task_resources(ray, device: str | None, threads: int) -> tuple[dict[str, Any], str]:
    """The Ray resources of one task and the device it runs on: ``threads`` CPUs, and one GPU
    where the cluster has GPUs (unless ``device`` is ``cpu``); ``cuda`` is then the task's GPU."""
    gpus = ray.cluster_resources().get("GPU", 0)
    wanted = str(device or "auto")
    if wanted == "cpu" or (wanted == "auto" and not gpus):
        return {"num_cpus": threads}, "cpu"
    if not gpus:
        raise ClusterError(f"--device {wanted}: the Ray cluster has no GPU; use --device cpu or auto")
    return {"num_cpus": threads, "num_gpus": 1}, "cuda"


def _one_line(exc: BaseException) -> str:
    """A task's error in one line: the exception raised in the task (not Ray's wrapper)."""
    cause = getattr(exc, "cause", None) or exc
    text = (str(cause).strip().splitlines() or [""])[0]
    return f"{type(cause).__name__}: {text}" if text else type(cause).__name__


@dataclass(frozen=True)
class _Refused:
    """What a task returns instead of raising a ``UserError``: retrying will not fix it."""

    message: str


def _refusing(fn, *args):
    try:
        return fn(*args)
    except UserError as exc:
        return _Refused(str(exc))


# ---------------------------------------------------------------------------------- build


@dataclass(frozen=True)
class BuildJob:
    """What every build task needs to know (sent with each task)."""

    db_root: str
    profile: Profile
    device: str
    data_root: str | None
    threads: int

    def key(self) -> tuple:
        return (self.db_root, repr(self.profile), self.device, self.data_root, self.threads)


_PARENT: dict[tuple, PreparedParent] = {}  # this worker's last prepared parent


def _prepared(job: BuildJob, dataset: str, arch: str) -> PreparedParent:
    """The parent of (dataset, arch), prepared once per worker (only the last one is kept)."""
    from bd4nn.data import load_dataset  # noqa: PLC0415

    key = (*job.key(), dataset, arch)
    if key not in _PARENT:
        _PARENT.clear()
        data = load_dataset(dataset, job.data_root, progress=False)
        _PARENT[key] = prepare_parent(Database(job.db_root), job.profile, dataset, arch, data,
                                      device=torch.device(job.device), progress=False)
    return _PARENT[key]


def _parent_task(job: BuildJob, dataset: str, arch: str) -> float:
    """Train (or load) the benign parent of (dataset, arch) and rank its neurons; its CA."""
    with pinned_threads(job.threads):
        return _prepared(job, dataset, arch).record.ca


def _candidates_task(job: BuildJob, items: Sequence[PlanItem]) -> list[tuple[str, bool | None, float]]:
    """Build and store ``items`` (one parent's candidates): per item (id, kept, seconds), kept
    None for one that was in the index already (a retried task, or another build)."""
    with pinned_threads(job.threads):
        db = Database(job.db_root)
        parent = _prepared(job, items[0].dataset, items[0].arch)
        done: list[tuple[str, bool | None, float]] = []
        for it in items:
            with db.claim(it.id, wait=True):
                if db.has_entry(it.id):
                    done.append((it.id, None, 0.0))
                    continue
                out, _ = build_candidate(db, job.profile, parent, it)
            done.append((it.id, bool(out.kept), out.seconds))
        return done


def build_on_ray(
    db_root: str | os.PathLike,
    profile: Profile,
    *,
    address: str | None = LOCAL,
    device: str | None = None,
    data_root: str | os.PathLike | None = None,
    threads: int | None = None,
    batch: int = 1,
    progress: bool = True,
    **filters: Any,
) -> BuildStats:
    """Build (or resume) ``profile`` into ``db_root`` with Ray tasks on the cluster at ``address``.

    ``filters`` are ``plan``'s (datasets, archs, attacks, levels, shard, ids). The parents are
    built first, then ``batch`` candidates per task; one progress bar counts the whole plan. A
    task that fails is retried ``RETRIES`` times; what still fails is named at the end, in a
    ``ClusterError``, after every other task finished (rerun to resume: what was stored stays).
    """
    if batch < 1:
        raise BadInputError(f"--batch must be >= 1, got {batch}")
    t0 = time.perf_counter()
    ray = connect(address)
    per = threads or BUILD_THREADS
    resources, dev = task_resources(ray, device, per)
    root = Path(db_root).expanduser().resolve()
    db = Database(root)
    items = plan(profile, **filters)
    todo = [it for it in items if not db.has_entry(it.id)]
    stats = BuildStats(planned=len(items), skipped=len(items) - len(todo))
    groups: dict[tuple[str, str], list[PlanItem]] = {}
    for it in todo:
        groups.setdefault((it.dataset, it.arch), []).append(it)
    job = BuildJob(str(root), profile, dev, str(Path(data_root).expanduser().resolve()) if data_root else None, per)
    task = ray.remote(_refusing).options(**resources, max_retries=RETRIES, retry_exceptions=True)
    slots = ray.cluster_resources().get("GPU" if dev == "cuda" else "CPU", 1) // (1 if dev == "cuda" else per)
    if todo:
        db.sweep_orphans()  # temp files of an earlier build killed mid-write
    pending = {task.remote(_parent_task, job, *key): ("parent", key) for key in groups}
    failures: list[str] = []
    parents = 0
    bar = progress_bar(total=len(items), initial=stats.skipped, unit="cand", disable=not progress,
                       dynamic_ncols=True, desc=f"build {profile.name} on Ray")
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            kind, what = pending.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except Exception as exc:  # noqa: BLE001 (retried RETRIES times by Ray; named at the end)
                result = _Refused(_one_line(exc))
            if isinstance(result, _Refused):
                names = f"parent {'/'.join(what)}" if kind == "parent" else ", ".join(it.id for it in what)
                failures.append(f"{names}: {result.message}")
            elif kind == "parent":
                parents += 1
                group = groups[what]
                for k in range(0, len(group), batch):
                    chunk = group[k:k + batch]
                    pending[task.remote(_candidates_task, job, chunk)] = ("candidates", chunk)
            else:
                for _, kept, seconds in result:
                    if kept is None:
                        stats.skipped += 1
                        continue
                    stats.built += 1
                    stats.kept += int(kept)
                    stats.rejected += int(not kept)
                    stats.candidate_seconds.append(seconds)
                bar.update(len(result))
            bar.set_postfix(parents=f"{parents}/{len(groups)}", kept=stats.kept, rejected=stats.rejected, refresh=False)
    finally:
        for ref in pending:  # interrupted: nothing keeps running for this build
            ray.cancel(ref)
        bar.close()
        stats.seconds = time.perf_counter() - t0
        record_run(db, profile, stats, workers=int(slots), threads=per)
    if failures:
        raise ClusterError(f"{len(failures)} Ray task(s) failed after {RETRIES} retries; what was built is stored, "
                           f"rerun to resume. First: {failures[0]}")
    return stats


# ---------------------------------------------------------------------------------- bench


@dataclass(frozen=True)
class BenchJob:
    """What every benchmark task needs to know (sent with each task)."""

    db_root: str
    profile: Profile | None
    device: str
    seed: int
    data_root: str | None
    threads: int

    def key(self) -> tuple:
        return (self.db_root, repr(self.profile), self.device, self.seed, self.data_root, self.threads)


@dataclass
class CaseResult:
    """One case as a task ran it: its record and problems (``bd4nn.cases.CaseOutcome``), or the
    traceback of the exception it raised (then no record, as in a pytest case that raised)."""

    record: dict[str, Any] | None
    problems: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0


_WORKBENCH: dict[tuple, Any] = {}  # this worker's bd4nn.cases.Workbench


def _cases_task(job: BenchJob, cases: Sequence[tuple[str, dict[str, Any]]]) -> list[CaseResult]:
    """Run ``cases`` ((kind, parameters) of ``bd4nn.cases``) in order, on this worker's workbench
    (its loaded entries and localizations are reused by later tasks on the same worker)."""
    from bd4nn.cases import Workbench, run_case  # noqa: PLC0415

    with pinned_threads(job.threads):
        if job.key() not in _WORKBENCH:
            _WORKBENCH.clear()
            _WORKBENCH[job.key()] = Workbench(Database(job.db_root), job.profile, torch.device(job.device),
                                              job.seed, job.data_root)
        work = _WORKBENCH[job.key()]
        out = []
        for kind, params in cases:
            t0 = time.perf_counter()
            try:
                o = run_case(work, kind, **params)
                out.append(CaseResult(o.record, o.problems, None, time.perf_counter() - t0))
            except Exception:  # noqa: BLE001 (the case failed; the others still run)
                out.append(CaseResult(None, [], traceback.format_exc(), time.perf_counter() - t0))
        return out


def _calibrate_task(job: BenchJob) -> tuple[float, dict[str, Any]]:
    from bd4nn.machine import calibrate, machine_info  # noqa: PLC0415

    with pinned_threads(job.threads):
        return calibrate(job.device), machine_info(job.device)


class RayBench:
    """The benchmark's cases as Ray tasks on the cluster at ``address``, one GPU each where the
    cluster has GPUs, ``threads`` CPUs each otherwise."""

    def __init__(self, address: str | None, *, db_root: str | os.PathLike, profile: Profile | None,
                 device: str | None, seed: int, data_root: str | os.PathLike | None, threads: int = 1) -> None:
        self.address = address or LOCAL
        self.ray = connect(self.address)
        self.resources, dev = task_resources(self.ray, device, threads)
        self.device_option = device
        self.threads = threads
        self.job = BenchJob(str(Path(db_root).expanduser().resolve()), profile, dev, seed,
                            str(Path(data_root).expanduser().resolve()) if data_root else None, threads)

    def build(self, db_root: str | os.PathLike, profile: Profile, **kwargs: Any) -> BuildStats:
        """``build_on_ray`` on this cluster, with this benchmark's device option."""
        return build_on_ray(db_root, profile, address=self.address, device=self.device_option, **kwargs)

    def calibrate(self) -> tuple[float, dict[str, Any]]:
        """``bd4nn.machine.calibrate`` and ``machine_info`` on a worker, with a case's resources:
        the machine the cases' times were taken on."""
        task = self.ray.remote(_calibrate_task).options(**self.resources, max_retries=RETRIES)
        return self.ray.get(task.remote(self.job))

    def run(self, groups: Sequence[Sequence[tuple[str, dict[str, Any]]]]) -> Iterator[tuple[int, list[CaseResult]]]:
        """One task per group of cases; yields (group index, its results) as tasks finish. A task
        whose worker died is retried; one that still fails gives each of its cases an error."""
        ray = self.ray
        task = ray.remote(_cases_task).options(**self.resources, max_retries=RETRIES)
        pending = {task.remote(self.job, list(g)): i for i, g in enumerate(groups)}
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                i = pending.pop(ready[0])
                try:
                    results = ray.get(ready[0])
                except Exception as exc:  # noqa: BLE001 (reported as each case's failure)
                    error = f"the Ray task failed after {RETRIES} retries: {_one_line(exc)}"
                    results = [CaseResult(None, [], error) for _ in groups[i]]
                yield i, results
        finally:
            for ref in pending:
                ray.cancel(ref)
