"""The benchmark session: which database, which cases, caches, devices, results and baseline.

Created once per pytest process by ``bench.plugin.pytest_configure`` when ``bench/`` is collected.
On the controller (or a serial run) it first ensures the database: the default database is the
``--profile`` (``tiny``) database in the cache folder, built or resumed with a progress bar; a
database given with ``--db`` is used as it is, or completed when ``--profile`` is given too.
Workers open the database the controller prepared.
"""

from __future__ import annotations

import fnmatch
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from bd4nn.build import Profile, build_parallel, default_workers, load_profile
from bd4nn.cases import Workbench
from bd4nn.data import cache_folder, data_folder
from bd4nn.db import Database, DatabaseError, database_fingerprint, weights_fingerprint
from bd4nn.machine import calibrate, machine_info
from bd4nn.results import Baseline, case_key, directory_lines, header
from bd4nn.runtime import default_threads, pinned_threads, set_threads
from bd4nn.train import resolve_device

ROOT = Path(__file__).resolve().parent.parent
RESULTS_KEY = "bd4nn"


def cache_dir() -> Path:
    return cache_folder()


def data_root() -> Path | None:
    """``$BD4NN_DATA``, else the ``../shared/data`` of a development checkout (``bd4nn.data``)."""
    return data_folder(fallbacks=[ROOT.parent / "shared" / "data"])


def worker_device(config: pytest.Config) -> torch.device:
    """``--device`` if given; under xdist ``cuda:(worker index mod count)``; else cuda:0 or CPU.
    Also sets this process's torch threads (``--threads``, else cores // workers)."""
    opt = config.getoption("--device")
    workers = int(getattr(config, "workerinput", {}).get("workercount", 1))
    # workers x threads <= cores, unless --threads / BD4NN_THREADS says otherwise (bd4nn.runtime)
    set_threads(config.getoption("--threads"), workers=workers)
    if opt:
        return resolve_device(opt)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    wid = getattr(config, "workerinput", {}).get("workerid", "gw0")
    index = int(wid[2:]) if wid.startswith("gw") and wid[2:].isdigit() else 0
    return torch.device(f"cuda:{index % torch.cuda.device_count()}")


def _split(value: str | None) -> list[str] | None:
    if not value:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


@dataclass
class BenchSession:
    config: pytest.Config
    db: Database
    profile: Profile | None
    device: torch.device
    seed: int
    localizers: list[str]
    repairs: list[str]
    entry_ids: list[str]
    baseline: Baseline | None
    results_path: Path
    ray: Any = None  # a bd4nn.cluster.RayBench when the cases run on a Ray cluster (--ray)
    work: Workbench = field(init=False)  # loads entries and runs cases in this process (bd4nn.cases)

    def __post_init__(self) -> None:
        dr = data_root()
        self.work = Workbench(self.db, self.profile, self.device, self.seed, str(dr) if dr else None)

    # ------------------------------------------------------------------ setup
    @classmethod
    def from_config(cls, config: pytest.Config, *, build: bool) -> "BenchSession":
        baseline = None  # read first: a bad baseline fails before any database is built
        if config.getoption("--baseline"):
            baseline = Baseline.load(config.getoption("--baseline"), wji_tol=config.getoption("wji_tolerance"),
                                     time_factor=config.getoption("time_factor"),
                                     time_slack=config.getoption("time_slack"),
                                     repair_tol=config.getoption("repair_tolerance"))
        db_opt = config.getoption("--db") or os.environ.get("BD4NN_DB")
        prof_opt = config.getoption("--profile")
        if db_opt:
            db_path = Path(db_opt).expanduser()
            profile = load_profile(prof_opt) if prof_opt else _recorded_profile(Database(db_path))
            must_build = bool(prof_opt)
        else:
            profile = load_profile(prof_opt or "tiny")
            db_path = cache_dir() / f"db-{profile.name}"
            must_build = True
        patterns = _split(config.getoption("--entries"))
        ray = _ray_bench(config, db_path, profile) if build else None
        if build and must_build:
            _ensure(db_path, profile, patterns, ray)  # only the entries --entries asks for
        db = Database(db_path)
        if not db.entries(kept=None):
            raise pytest.UsageError(
                f"the database {db_path} has no entries; build one with "
                f"`bd4nn build --db {db_path} --profile tiny` or pass --profile to build it here"
            )
        from localizers import list_localizers  # noqa: PLC0415

        known = list_localizers()
        locs = _split(config.getoption("--localizers")) or known
        bad = [n for n in locs if n not in known]
        if bad:
            raise pytest.UsageError(f"--localizers: unknown {bad}; known: {', '.join(known)}")
        from bd4nn.repair import list_repairs  # noqa: PLC0415

        repairs = _split(config.getoption("--repairs")) or []
        bad = [r for r in repairs if r not in list_repairs()]
        if bad:
            raise pytest.UsageError(f"--repairs: unknown {bad}; known: {', '.join(list_repairs())}")
        ids = [ln["id"] for ln in db.entries(kept=True)]
        if patterns:
            ids = [i for i in ids if any(fnmatch.fnmatchcase(i, p) for p in patterns)]
        if not ids:
            kept = len(db.entries(kept=True))
            raise pytest.UsageError(
                f"no benchmark cases: {db_path} has {kept} kept entries"
                + (f" and none matches --entries {','.join(patterns)}" if patterns and kept else "")
                + " (`bd4nn info` shows the database)")
        if baseline is not None:
            keys = [{"case": "localization", "localizer": loc, "entry": e} for e in ids for loc in locs]
            keys += [{"case": "repair", "localizer": loc, "repair": rep, "entry": e}
                     for e in ids for loc in locs for rep in repairs]
            if build and not baseline.matching(keys):
                config.issue_config_time_warning(pytest.PytestConfigWarning(
                    f"bd4nn: the baseline {config.getoption('--baseline')} has no reference for any of these "
                    f"{len(keys)} cases (another database or profile?): nothing is compared against it"),
                    stacklevel=2)
        results = config.getoption("--results")
        run = time.strftime("%Y%m%d-%H%M%S")
        results_path = Path(results) if results else ROOT / "results" / f"{run}.jsonl"
        return cls(config, db, profile, worker_device(config), config.getoption("bench_seed"), locs,
                   repairs, ids, baseline, results_path, ray)

    # ------------------------------------------------------------------ cases
    def settings(self, key: str) -> dict[str, Any]:
        return self.work.settings(key)

    @property
    def parents(self) -> list[str]:
        """``<dataset>-<arch>`` of every benign parent the selected entries have (control cases)."""
        out = []
        for e in self.entry_ids:
            line = self.db.entry(e)
            key = f"{line['dataset']}-{line['arch']}"
            if key not in out:
                out.append(key)
        return out

    @property
    def control_localizers(self) -> list[str]:
        """The selected localizers that can run without a ground truth (not PFL)."""
        from localizers import localizer_class  # noqa: PLC0415

        return [n for n in self.localizers if not localizer_class(n).needs_ground_truth]

    def recorder(self) -> "Recorder":
        return Recorder(self)


def _recorded_profile(db: Database) -> Profile | None:
    """The profile the database's entries were built with, if it is a known one."""
    for line in db.entries(kept=None)[:1]:
        name = None
        try:
            name = db.load_label(line["id"]).recipe.get("profile")
            return load_profile(name) if name else None
        except Exception:  # an unknown/custom profile: harness defaults, said out loud
            print(f"bd4nn: {db.root} was built with profile {name!r}, which is not a built-in one; the harness "
                  "uses its default settings (pass --profile FILE.toml for the profile's [bench] budgets)",
                  file=sys.stderr)
            return None
    return None


def _ray_bench(config: pytest.Config, db_path: Path, profile: Profile | None):
    """With ``--ray ADDRESS``: the connection that runs the cases (and builds what is missing) as
    Ray tasks (``bd4nn.cluster``); None without it."""
    address = config.getoption("--ray")
    if address is None:
        return None
    if getattr(config.option, "numprocesses", None):
        raise pytest.UsageError("--ray runs the cases on the Ray cluster: leave out -n (xdist is the "
                                "single-machine path)")
    from bd4nn.cluster import RayBench  # noqa: PLC0415 (Ray is an optional dependency)

    return RayBench(address, db_root=db_path, profile=profile, device=config.getoption("--device"),
                    seed=config.getoption("bench_seed"), data_root=data_root(),
                    threads=config.getoption("--threads") or 1)


def _ensure(db_path: Path, profile: Profile, ids: list[str] | None = None, ray=None) -> None:
    """Build or resume ``profile`` into ``db_path`` (no work when complete); with ``ids`` (shell
    patterns of entry ids), only those candidates; on the Ray cluster with ``ray``."""
    from bd4nn.build import plan  # noqa: PLC0415

    db = Database(db_path)
    todo = [it for it in plan(profile, ids=ids) if not db.has_entry(it.id)]
    if not todo:
        return
    print(f"\nbd4nn: building the {profile.name} database in {db_path} ({len(todo)} candidates to go"
          + (f" for --entries {','.join(ids)}" if ids else "") + "; interrupt and rerun to resume)",
          file=sys.stderr, flush=True)
    if ray is not None:
        stats = ray.build(db_path, profile, data_root=data_root(), progress=True, ids=ids)
    else:
        stats = build_parallel(db_path, profile, workers=default_workers(), data_root=data_root(), progress=True,
                               ids=ids)
    print(f"bd4nn: {stats.built} built ({stats.kept} kept) in {stats.seconds:.0f} s", file=sys.stderr, flush=True)


class Recorder:
    """Controller-side plugin: writes the results file as reports arrive (also from workers)."""

    def __init__(self, session: BenchSession) -> None:
        self.session = session
        self.fh = None
        self.cases = 0
        self.regressions: list = []  # bd4nn.results.Regression
        self.differs: list[str] = []  # cases on another model than their baseline case
        self.weights = {ln["id"]: weights_fingerprint(ln) for ln in session.db.entries(kept=True)}
        self.fingerprint = database_fingerprint(session.db.entries(kept=None))
        if session.ray is not None:  # the machine and speed of a Ray worker, where the cases run
            self.threads = session.ray.threads
            self.calibration_s, self.machine = session.ray.calibrate()
        else:
            self.threads = session.config.getoption("--threads") or default_threads(max(1, self._workers(session.config)))
            with pinned_threads(self.threads):  # the same work at the cases' thread count, before any worker starts
                self.calibration_s = calibrate(session.device)
            self.machine = {**machine_info(session.device), "threads": self.threads}
        self.time_rule = ""

    @staticmethod
    def _workers(config: pytest.Config) -> int:
        workers = getattr(config.option, "numprocesses", None) or 0
        return int(workers) if str(workers).isdigit() else 0

    def _open(self, config: pytest.Config) -> None:
        s = self.session
        s.results_path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(s.results_path, "w", buffering=1)
        workers = self._workers(config)
        opts = {k: config.getoption(k) for k in ("localizers", "entries", "repairs", "baseline", "bench_seed",
                                                  "keyword", "ray")}
        opts["localizer_settings"] = s.settings("localizers")
        head = header(run=s.results_path.stem, profile=s.profile.name if s.profile else None, db=str(s.db.root),
                      options=opts, workers=workers, root=ROOT, threads=self.threads,
                      db_fingerprint=self.fingerprint, machine=self.machine,
                      calibration_s=self.calibration_s)
        self.fh.write(json.dumps(head) + "\n")
        if s.baseline is not None:
            self.time_rule = s.baseline.set_run(head)
        benign = {}
        for line in s.db.entries(kept=None):
            key = (line["dataset"], line["arch"])
            if key not in benign:
                try:
                    benign[key] = s.db.benign_record(*key).ca
                except DatabaseError:
                    benign[key] = None
        for d in directory_lines(s.db.entries(kept=None), benign):
            self.fh.write(json.dumps(d) + "\n")

    @pytest.hookimpl(trylast=True)
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        self._open(session.config)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        props = dict(report.user_properties).get(RESULTS_KEY)
        if props is None or self.fh is None:
            return
        if report.when == "call" or (report.when == "setup" and report.skipped):
            line = {"kind": "case", "nodeid": report.nodeid, "outcome": report.outcome, **props,
                    "weights_sha": self.weights.get(props.get("entry"))}
            self.fh.write(json.dumps(line, default=_json_default) + "\n")
            self.cases += 1
            baseline = self.session.baseline
            if baseline is not None and report.passed:
                self.regressions += baseline.compare(line)
                if baseline.differs(line):
                    self.differs.append(case_key(line))

    def pytest_report_teststatus(self, report: pytest.TestReport, config: pytest.Config):
        """``-v`` shows each passed case's figures (``WJI 0.624 in 0.004 s``) instead of PASSED."""
        props = dict(report.user_properties).get(RESULTS_KEY)
        if props is None or report.when != "call" or not report.passed:
            return None
        figures = []
        if isinstance(props.get("wji"), (int, float)):
            figures.append(f"WJI {props['wji']:.3f}")
        if isinstance(props.get("asrd"), (int, float)):
            figures.append(f"ASRD {props['asrd']:.3f} CAD {props['cad']:.3f}")
        if isinstance(props.get("time_s"), (int, float)):
            figures.append(f"in {props['time_s']:.2f} s")
        return ("passed", ".", (" ".join(figures) or "PASSED", {"green": True})) if figures else None

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.fh is not None:
            self.fh.close()
        if self.regressions and session.exitstatus == pytest.ExitCode.OK:
            # like pytest-benchmark's --benchmark-compare-fail: every case ran, the run fails once
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter) -> None:
        write = terminalreporter.write_line
        baseline = self.session.baseline
        if baseline is not None:
            if baseline.fingerprint and baseline.fingerprint != self.fingerprint:
                write(f"bd4nn: database differs: this database's fingerprint is {self.fingerprint}, the baseline's "
                      f"{baseline.fingerprint} ({baseline.source}); {len(self.differs)} cases ran on models other than "
                      "their baseline case's, and their WJI, ASRD and CAD were not compared (not regressions)",
                      yellow=True)
            write(f"bd4nn: {self.time_rule}")
        if self.regressions:
            from tabulate import tabulate  # noqa: PLC0415

            terminalreporter.section(f"bd4nn: {len(self.regressions)} regressions against the baseline "
                                     f"{baseline.source}", red=True)
            rows = [r.row() for r in self.regressions]
            write(tabulate(rows, headers=["case", "metric", "baseline", "now", "change"]))
            write("allowed: " + "; ".join(sorted({f"{r.metric} {r.limit}" for r in self.regressions})))
        write(f"bd4nn: {self.cases} cases recorded in {self.session.results_path}")
        write(f"bd4nn: its tables: python -m reports {self.session.results_path}")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON-serializable: {type(obj).__name__}")
