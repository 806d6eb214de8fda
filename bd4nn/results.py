"""Results files and baselines (DESIGN.md "Results").

A results file is JSON Lines:

* one ``header`` line: run id, time, git hash, torch, CUDA, device, Python, profile, database
  and its fingerprint, options, number of workers, threads, machine, calibration;
* ``directory`` lines: kept/rejected counts and mean CA/ASR/ASR.Cor per (dataset, arch,
  attack, level) of the database the run used (Table "counts" and Tables I/II);
* one ``case`` line per benchmark case: its kind (``localization``, ``repair``, ``database``),
  pytest node id, outcome, entry coordinates, localizer, repair and the metrics (WJI, time_s,
  hits, n_fault, n_localized, AUROC, AP, CA/ASR before and after, CAD, ASRD).

CA, ASR, CAD and ASRD are fractions. ``reports/`` reads these files only.

The header also carries the database fingerprint, the machine and a calibration time, and every
case its entry's ``weights_sha`` (``bd4nn.db``, ``bd4nn.machine``).

A **baseline** is a results file (or its header, directory lines and case lines) kept as the
reference; cases pair by ``case_key`` (kind, localizer, repair, entry). ``compare`` checks a
case against it: a localization's WJI may not fall by more than ``wji_tol``; its time may not
exceed ``time_factor × baseline × calibration ratio + time_slack`` seconds; a repair's ASRD may
not fall, nor its CAD rise, by more than ``repair_tol``. A case on another model than its
baseline case (``differs``) is not compared on WJI, ASRD or CAD. The defaults (``TOLERANCES``)
are those of ``pytest bench/``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bd4nn.errors import BadInputError

__all__ = ["SCHEMA", "TOLERANCES", "header", "directory_lines", "database_summary", "database_tables", "build_runs", "minutes", "case_key", "CASE_FIELDS", "read", "Baseline", "save_baseline", "diff_results", "Regression"]

SCHEMA = 1


def git_hash(root: str | os.PathLike | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def header(*, run: str, profile: str | None, db: str, options: Mapping[str, Any], workers: int,
           root: str | os.PathLike | None = None, threads: int | None = None,
           db_fingerprint: str | None = None, machine: Mapping[str, Any] | None = None,
           calibration_s: float | None = None) -> dict[str, Any]:
    """The first line of a results file. ``machine`` (``bd4nn.machine.machine_info``) and
    ``calibration_s`` (``bd4nn.machine.calibrate``) make its times comparable with another run's;
    ``db_fingerprint`` (``bd4nn.db.database_fingerprint``) says whether its database is another's."""
    cuda = torch.cuda.is_available()
    return {
        "kind": "header", "schema": SCHEMA, "run": run,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "git": git_hash(root),
        "torch": torch.__version__, "cuda": torch.version.cuda if cuda else None,
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "gpus": torch.cuda.device_count() if cuda else 0, "python": platform.python_version(),
        "profile": profile, "db": str(db), "db_fingerprint": db_fingerprint, "options": dict(options),
        "workers": workers,
        "threads": threads if threads is not None else torch.get_num_threads(),  # torch threads per process
        "machine": dict(machine or {}), "calibration_s": calibration_s,
    }


def _mean(values: list[float]) -> float | None:
    vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


def directory_lines(index_lines: Iterable[Mapping[str, Any]], benign_ca: Mapping[tuple[str, str], float] | None = None,
                    *, by_level: bool = True) -> list[dict[str, Any]]:
    """Per (dataset, arch, attack, level) — per (dataset, arch, attack) without ``by_level``, the
    level then None: kept/rejected counts and means over kept entries."""
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for line in index_lines:
        key = (line["dataset"], line["arch"], line["attack"], line["level"] if by_level else None)
        groups.setdefault(key, []).append(line)
    out = []
    for (dataset, arch, attack, level), lines in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
        kept = [ln for ln in lines if ln.get("kept")]
        out.append({
            "kind": "directory", "dataset": dataset, "arch": arch, "attack": attack, "level": level,
            "kept": len(kept), "rejected": len(lines) - len(kept),
            "benign_ca": (benign_ca or {}).get((dataset, arch)),
            "mean_ca": _mean([ln.get("ca") for ln in kept]), "mean_asr": _mean([ln.get("asr") for ln in kept]),
            "mean_asr_cor": _mean([ln.get("asr_cor") for ln in kept]),
        })
    return out


def database_summary(db: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """What ``bd4nn info`` and the fidelity reports show of a ``bd4nn.db.Database``.

    Returns ``(directories, parents)``: the ``directory_lines`` of its index, each with
    ``ca_drop`` (benign CA − mean CA) and ``size`` (mean stored bytes / full checkpoint bytes
    over kept entries) added; and one dict per benign parent (dataset, arch, width, CA, training
    epochs, images, seconds). Levels in the paper's order (narrow, small, middle, large).
    """
    from bd4nn.db import benign_timing_key  # noqa: PLC0415 (as below: results stays light to import)

    lines = db.entries(kept=None)
    parents, benign = [], {}
    timings = db.timings()
    for dataset, arch in sorted({(ln["dataset"], ln["arch"]) for ln in lines}):
        try:
            rec = db.benign_record(dataset, arch)
        except Exception:  # noqa: BLE001 (a missing parent shows as blanks)
            continue
        benign[(dataset, arch)] = rec.ca
        cfg = rec.config or {}
        parents.append({"dataset": dataset, "arch": arch, "width": rec.width, "ca": rec.ca,
                        "epochs": (cfg.get("train") or {}).get("epochs"), "train_images": cfg.get("train_images"),
                        "test_images": cfg.get("test_images"),
                        "seconds": timings.get(benign_timing_key(dataset, arch), {}).get("seconds", cfg.get("seconds")),
                        "threads": cfg.get("threads")})
    from bd4nn.inject import LEVELS  # noqa: PLC0415 (the build's module; results stay light to import)

    rank = {name: i for i, name in enumerate(LEVELS)}
    dirs = sorted(directory_lines(lines, benign),
                  key=lambda d: (d["dataset"], d["arch"], d["attack"], rank.get(d["level"], len(rank))))
    for d in dirs:
        key = (d["dataset"], d["arch"], d["attack"], d["level"])
        kept = [ln for ln in lines if ln.get("kept") and (ln["dataset"], ln["arch"], ln["attack"], ln["level"]) == key]
        d["ca_drop"] = (d["benign_ca"] - d["mean_ca"]) if d["benign_ca"] is not None and d["mean_ca"] is not None \
            else None
        d["size"] = _mean([ln["bytes"] / ln["full_bytes"] for ln in kept if ln.get("full_bytes")])
    return dirs, parents


CASE_FIELDS = ("case", "localizer", "repair", "entry")  # what identifies a case across runs


def _pct(v: float | None, digits: int = 1) -> str:
    return "" if v is None else f"{100 * v:.{digits}f}"


def minutes(seconds: float | None) -> str:
    """``"42 s"`` below two minutes, else ``"3.5 min"``; blank when unknown."""
    if seconds is None:
        return ""
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def build_runs(db: Any) -> list[dict[str, Any]]:
    """The build runs recorded in the database's ``timings.jsonl`` (``bd4nn.build.record_run``),
    oldest first: profile, wall seconds, candidates built and kept, processes, threads each."""
    from bd4nn.build import RUN_KEY  # noqa: PLC0415

    return [t for k, t in sorted(db.timings().items()) if k.startswith(RUN_KEY)]


def database_tables(db: Any) -> str:
    """``bd4nn info``: the benign parents, then per directory and level the kept/rejected counts
    and the means over kept entries against the parent (``database_summary``)."""
    from tabulate import tabulate  # noqa: PLC0415

    dirs, parents = database_summary(db)
    out = []
    if parents:
        out += [tabulate([[p["dataset"], p["arch"], f"{p['width']:g}", _pct(p["ca"], 2), p["epochs"], p["train_images"],
                           p["test_images"], minutes(p["seconds"])] for p in parents],
                         headers=["dataset", "arch", "width", "benign CA %", "epochs", "train images", "test images",
                                  "train time"]), ""]
    out.append(tabulate([[d["dataset"], d["arch"], d["attack"], d["level"], d["kept"], d["rejected"], _pct(d["mean_ca"]),
                          _pct(d["ca_drop"]), _pct(d["mean_asr"]),
                          "" if d["mean_asr_cor"] is None else f"{d['mean_asr_cor']:.3f}", _pct(d["size"], 2)]
                         for d in dirs],
                        headers=["dataset", "arch", "attack", "level", "kept", "rejected", "CA %", "CA drop pts",
                                 "ASR %", "ASR.Cor", "size % of full"]))
    kept = sum(d["kept"] for d in dirs)
    total = kept + sum(d["rejected"] for d in dirs)
    out.append(f"\n{kept} kept of {total} candidates; means over kept entries; CA drop = benign CA - CA")
    runs = build_runs(db)
    if runs:
        out.append(f"built in {len(runs)} run(s), {minutes(sum(r.get('seconds') or 0 for r in runs))} wall in all: "
                   + "; ".join(f"{r.get('built')} candidates in {minutes(r.get('seconds'))} "
                               f"({r.get('workers')} x {r.get('threads')} threads)" for r in runs))
    return "\n".join(out)


def case_key(case: Mapping[str, Any]) -> str:
    """A case's identity across runs, from its fields (kind, localizer, repair, entry), so that
    renaming a test or its parameter ids never unpairs a case from its baseline."""
    return ":".join(str(case.get(k) or "-") for k in CASE_FIELDS)


def read(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All lines of a results file; a corrupt line is an error naming the file and line."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such results file")
    out = []
    for i, raw in enumerate(p.read_text().splitlines(), 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise BadInputError(f"{p}:{i}: not JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise BadInputError(f"{p}:{i}: expected a JSON object")
        out.append(obj)
    return out


@dataclass
class Regression:
    """One metric of one case worse than its baseline by more than the tolerance."""

    key: str  # case_key
    metric: str  # "WJI", "time", "ASRD", "CAD"
    now: float
    baseline: float
    limit: str  # the rule it broke, e.g. "< baseline - 0.05"
    source: str = ""  # the baseline file

    def __str__(self) -> str:
        unit = " s" if self.metric == "time" else ""
        return (f"{self.key}: {self.metric} {self.now:.4f}{unit} {self.limit.replace('baseline', f'baseline {self.baseline:.4f}{unit}')}"
                + (f" ({self.source})" if self.source else ""))

    def row(self) -> list:
        """``[case, metric, baseline, now, change]`` (the end-of-run table of ``pytest bench/``)."""
        return [self.key, self.metric, f"{self.baseline:.4f}", f"{self.now:.4f}", f"{self.now - self.baseline:+.4f}"]


# The one home of the baseline tolerances (``pytest bench/`` takes its option defaults from here).
TOLERANCES = {"wji_tol": 0.05, "time_factor": 3.0, "time_slack": 2.0, "repair_tol": 0.05}


class Baseline:
    """Reference metrics per case key, with tolerances, and the header of the run they came from.

    Two rules keep a comparison honest on another machine or database (issue 14):

    * **Database differs.** A case whose entry has another ``weights_sha`` than the baseline's
      (``bd4nn.db.weights_fingerprint``) ran on another model: its WJI, ASRD and CAD are not
      compared, and ``differs`` says so. A localization's WJI is compared once, on its
      localization case, not again on the repair cases that reuse it.
    * **Machine-aware time.** A baseline time is scaled by the ratio of the two runs'
      calibrations (``bd4nn.machine.calibrate``: the same fixed work timed in each session), and
      not compared at all across device kinds (``set_run``).
    """

    def __init__(self, cases: Mapping[str, Mapping[str, Any]], *, wji_tol: float = TOLERANCES["wji_tol"],
                 time_factor: float = TOLERANCES["time_factor"], time_slack: float = TOLERANCES["time_slack"],
                 repair_tol: float = TOLERANCES["repair_tol"], source: str = "",
                 head: Mapping[str, Any] | None = None) -> None:
        self.cases = dict(cases)
        self.wji_tol = wji_tol
        self.time_factor = time_factor
        self.time_slack = time_slack
        self.repair_tol = repair_tol
        self.source = source
        self.head = dict(head or {})
        self.time_scale: float | None = 1.0  # set_run: now's calibration / the baseline's; None: not compared

    @classmethod
    def load(cls, path: str | os.PathLike, **tolerances: float) -> "Baseline":
        """A results or baseline file's passed cases; ``wji``, ``time_s``, ``cad`` and ``asrd`` must
        be finite numbers (or null) and each case needs its kind and entry, else a
        ``BadInputError`` names the line."""
        cases, head = {}, None
        for i, ln in enumerate(read(path), 1):
            if ln.get("kind") == "header" and head is None:
                head = ln
            if ln.get("kind") != "case":
                continue
            if not ln.get("case") or not isinstance(ln.get("entry"), str):
                raise BadInputError(f"{path}: case {i} has no case/entry field: not a bd4nn results file")
            for key in ("wji", "time_s", "cad", "asrd"):
                v = ln.get(key)
                if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                    raise BadInputError(f"{path}: case {case_key(ln)}: {key} must be a finite number, not {v!r}")
            if ln.get("outcome") == "passed":
                cases[case_key(ln)] = ln
        return cls(cases, source=str(path), head=head, **tolerances)

    @property
    def fingerprint(self) -> str | None:
        """The baseline run's database fingerprint (None in a file written before they existed)."""
        return self.head.get("db_fingerprint")

    def set_run(self, head: Mapping[str, Any]) -> str:
        """Take the current run's header (machine, calibration) into account for time checks;
        returns one line saying how times are compared."""
        kind0 = (self.head.get("machine") or {}).get("device_kind")
        kind1 = (head.get("machine") or {}).get("device_kind")
        if kind0 and kind1 and kind0 != kind1:
            self.time_scale = None
            return f"times not compared: the baseline ran on {kind0}, this run on {kind1}"
        c0, c1 = self.head.get("calibration_s"), head.get("calibration_s")
        if _num(c0) and _num(c1) and c0 > 0 and c1 > 0:
            self.time_scale = c1 / c0
            return (f"times compared after scaling the baseline's by {self.time_scale:.2f} (calibration: "
                    f"{1000 * c1:.0f} ms now, {1000 * c0:.0f} ms in the baseline run)")
        self.time_scale = 1.0
        return "times compared unscaled (the baseline has no calibration)"

    def matching(self, cases: Iterable[Mapping[str, Any]]) -> int:
        """How many of ``cases`` (dicts of ``CASE_FIELDS``) the baseline has a reference for."""
        return sum(1 for c in cases if case_key(c) in self.cases)

    def differs(self, case: Mapping[str, Any]) -> bool:
        """Whether ``case`` ran on another model than its baseline case (both name their weights)."""
        ref = self.cases.get(case_key(case))
        a, b = case.get("weights_sha"), (ref or {}).get("weights_sha")
        return bool(a and b and a != b)

    def compare(self, case: Mapping[str, Any]) -> list[Regression]:
        """Regressions of ``case`` against the baseline (empty: fine, not in the baseline, or only
        on another model: ``differs``)."""
        key = case_key(case)
        ref = self.cases.get(key)
        if ref is None:
            return []
        out = []
        same_model = not self.differs(case)
        repair = case.get("case") == "repair"

        def worse(metric: str, now: Any, then: Any, bad: bool, limit: str) -> None:
            if isinstance(now, (int, float)) and isinstance(then, (int, float)) and bad:
                out.append(Regression(key, metric, float(now), float(then), limit, self.source))

        w, w0 = case.get("wji"), ref.get("wji")  # a repair case repeats its localization's WJI
        worse("WJI", w, w0, same_model and not repair and _num(w) and _num(w0) and w < w0 - self.wji_tol,
              f"< baseline - {self.wji_tol}")
        t, t0 = case.get("time_s"), ref.get("time_s")  # a localizer's time; a repair's is not compared
        scale = self.time_scale
        scaled = "" if scale in (None, 1.0) else f" x {scale:.2f} (calibration)"
        worse("time", t, t0, scale is not None and not repair and _num(t) and _num(t0)
              and t > self.time_factor * t0 * scale + self.time_slack,
              f"> {self.time_factor} x baseline{scaled} + {self.time_slack} s")
        a, a0 = case.get("asrd"), ref.get("asrd")  # a repair's ASR drop: higher is better
        worse("ASRD", a, a0, same_model and _num(a) and _num(a0) and a < a0 - self.repair_tol,
              f"< baseline - {self.repair_tol}")
        c, c0 = case.get("cad"), ref.get("cad")  # its CA drop: lower is better
        worse("CAD", c, c0, same_model and _num(c) and _num(c0) and c > c0 + self.repair_tol,
              f"> baseline + {self.repair_tol}")
        return out


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


BASELINE_FIELDS = ("kind", "case", "nodeid", "outcome", "entry", "weights_sha", "localizer", "repair", "wji", "time_s",
                   "hits", "n_fault", "n_localized", "auroc", "ap", "cad", "asrd",
                   # the context, so that `python -m reports BASELINE` prints every table
                   "dataset", "arch", "attack", "level", "candidate", "ca", "asr", "asr_cor", "benign_ca",
                   "ca_before", "asr_before", "ca_after", "asr_after",
                   # the benign controls (the detection table, Table II's benign column)
                   "score_max_z", "score_p99_z", "score_max", "benign_asr")


def save_baseline(results: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
                  partial: bool = False) -> int:
    """Write the header, the database's directory lines and the passed cases of a results file
    (``BASELINE_FIELDS``) to ``out``; returns the number of cases.

    Refuses to replace an existing file unless ``overwrite``, and a run that was filtered with
    ``-k`` or had failed cases unless ``partial``: a baseline of part of the cases would pass
    every case it lacks."""
    lines = read(results)
    p = Path(out)
    if p.exists() and not overwrite:
        raise BadInputError(f"{p} exists; pass --overwrite to replace this baseline")
    head = [ln for ln in lines if ln.get("kind") == "header"]
    failed = [case_key(ln) for ln in lines if ln.get("kind") == "case" and ln.get("outcome") not in ("passed", "skipped")]
    keyword = ((head[0].get("options") or {}).get("keyword") if head else None) or ""
    if (failed or keyword) and not partial:
        why = [f"{len(failed)} cases did not pass (e.g. {failed[0]})"] if failed else []
        why += [f"it was filtered with -k {keyword!r}"] if keyword else []
        raise BadInputError(f"{results}: {' and '.join(why)}; a baseline of part of the cases passes every case "
                            "it lacks; pass --partial to save it anyway")
    dirs = [ln for ln in lines if ln.get("kind") == "directory"]
    cases = [{k: ln.get(k) for k in BASELINE_FIELDS if k in ln}
             for ln in lines if ln.get("kind") == "case" and ln.get("outcome") == "passed"]
    if not cases:
        raise BadInputError(f"{results}: no passed cases to make a baseline of")
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(ln, sort_keys=True) + "\n" for ln in head[:1] + dirs + cases))
    os.replace(tmp, p)
    return len(cases)


DIFF_METRICS = ("wji", "time_s", "hits", "cad", "asrd")


def diff_results(a: str | os.PathLike, b: str | os.PathLike) -> list[list]:
    """``[case, metric, A, B, B - A]`` for every metric of ``DIFF_METRICS`` that differs between
    two results or baseline files, and ``[case, "only in A" / "only in B", ...]`` for unpaired
    cases (``bd4nn baseline diff``); cases pair by ``case_key``."""
    def cases(path):
        return {case_key(ln): ln for ln in read(path) if ln.get("kind") == "case" and ln.get("outcome") == "passed"}

    ca, cb = cases(a), cases(b)
    rows: list[list] = []
    for key in sorted(ca.keys() | cb.keys()):
        if key not in cb or key not in ca:
            rows.append([key, "only in A" if key in ca else "only in B", "", "", ""])
            continue
        for m in DIFF_METRICS:
            x, y = ca[key].get(m), cb[key].get(m)
            if _num(x) and _num(y) and x != y:
                rows.append([key, m, f"{x:.4f}", f"{y:.4f}", f"{y - x:+.4f}"])
    return rows
