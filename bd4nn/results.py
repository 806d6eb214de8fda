"""Results files and baselines (DESIGN.md "Results").

A results file is JSON Lines:

* one ``header`` line: run id, time, git hash, torch, CUDA, device, Python, profile, database,
  options, number of workers;
* ``directory`` lines: kept/rejected counts and mean CA/ASR/ASR.Cor per (dataset, arch,
  attack, level) of the database the run used (Table "counts" and Tables I/II);
* one ``case`` line per benchmark case: its kind (``localization``, ``repair``, ``database``),
  pytest node id, outcome, entry coordinates, localizer, repair and the metrics (WJI, time_s,
  hits, n_fault, n_localized, AUROC, AP, CA/ASR before and after, CAD, ASRD).

CA, ASR, CAD and ASRD are fractions. ``reports/`` reads these files only.

A **baseline** is a results file (or its case lines) kept as the reference. ``compare`` checks a
case against it: WJI may not fall by more than ``wji_tol``; time may not exceed
``time_factor × baseline + time_slack`` seconds; a repair's ASRD may not fall, nor its CAD rise,
by more than ``repair_tol``. The defaults (``TOLERANCES``) are those of ``pytest bench/``.
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

__all__ = ["SCHEMA", "TOLERANCES", "header", "directory_lines", "database_summary", "case_key", "read", "Baseline", "save_baseline", "Regression"]

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
           root: str | os.PathLike | None = None, threads: int | None = None) -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    return {
        "kind": "header", "schema": SCHEMA, "run": run,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "git": git_hash(root),
        "torch": torch.__version__, "cuda": torch.version.cuda if cuda else None,
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "gpus": torch.cuda.device_count() if cuda else 0, "python": platform.python_version(),
        "profile": profile, "db": str(db), "options": dict(options), "workers": workers,
        "threads": threads if threads is not None else torch.get_num_threads(),  # torch threads per process
    }


def _mean(values: list[float]) -> float | None:
    vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


def directory_lines(index_lines: Iterable[Mapping[str, Any]], benign_ca: Mapping[tuple[str, str], float] | None = None
                    ) -> list[dict[str, Any]]:
    """Per (dataset, arch, attack, level): kept/rejected counts and means over kept entries."""
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for line in index_lines:
        key = (line["dataset"], line["arch"], line["attack"], line["level"])
        groups.setdefault(key, []).append(line)
    out = []
    for (dataset, arch, attack, level), lines in sorted(groups.items()):
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


def case_key(case: Mapping[str, Any]) -> str:
    """What identifies a case across runs: its kind and its pytest parameter id."""
    nodeid = str(case.get("nodeid", ""))
    param = nodeid[nodeid.find("[") + 1 : -1] if "[" in nodeid else nodeid
    return f"{case.get('case')}:{param}"


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
    key: str
    what: str

    def __str__(self) -> str:
        return f"{self.key}: {self.what}"


# The one home of the baseline tolerances (``pytest bench/`` takes its option defaults from here).
TOLERANCES = {"wji_tol": 0.05, "time_factor": 3.0, "time_slack": 2.0, "repair_tol": 0.05}


class Baseline:
    """Reference metrics per case key, with tolerances."""

    def __init__(self, cases: Mapping[str, Mapping[str, Any]], *, wji_tol: float = TOLERANCES["wji_tol"],
                 time_factor: float = TOLERANCES["time_factor"], time_slack: float = TOLERANCES["time_slack"],
                 repair_tol: float = TOLERANCES["repair_tol"], source: str = "") -> None:
        self.cases = dict(cases)
        self.wji_tol = wji_tol
        self.time_factor = time_factor
        self.time_slack = time_slack
        self.repair_tol = repair_tol
        self.source = source

    @classmethod
    def load(cls, path: str | os.PathLike, **tolerances: float) -> "Baseline":
        """A results or baseline file's passed cases; ``wji`` and ``time_s`` must be finite
        numbers (or null) and each case needs a ``nodeid``, else a ``ValueError`` names the line."""
        cases = {}
        for i, ln in enumerate(read(path), 1):
            if ln.get("kind") != "case":
                continue
            if not isinstance(ln.get("nodeid"), str) or not ln.get("case"):
                raise BadInputError(f"{path}: case {i} has no nodeid/case: not a bd4nn results file")
            for key in ("wji", "time_s", "cad", "asrd"):
                v = ln.get(key)
                if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                    raise BadInputError(f"{path}: case {ln['nodeid']}: {key} must be a finite number, not {v!r}")
            if ln.get("outcome") == "passed":
                cases[case_key(ln)] = ln
        return cls(cases, source=str(path), **tolerances)

    def matching(self, keys: Iterable[str]) -> int:
        """How many of ``keys`` (``case_key`` strings) the baseline has a reference for."""
        return sum(1 for k in keys if k in self.cases)

    def compare(self, case: Mapping[str, Any]) -> list[Regression]:
        """Regressions of ``case`` against the baseline (empty: fine or not in the baseline)."""
        key = case_key(case)
        ref = self.cases.get(key)
        if ref is None:
            return []
        out = []
        w, w0 = case.get("wji"), ref.get("wji")
        if isinstance(w, (int, float)) and isinstance(w0, (int, float)) and w < w0 - self.wji_tol:
            out.append(Regression(key, f"WJI {w:.4f} < baseline {w0:.4f} - {self.wji_tol} ({self.source})"))
        t, t0 = case.get("time_s"), ref.get("time_s")
        if isinstance(t, (int, float)) and isinstance(t0, (int, float)):
            limit = self.time_factor * t0 + self.time_slack
            if t > limit:
                out.append(Regression(key, f"time {t:.3f} s > {self.time_factor} x baseline {t0:.3f} s + "
                                           f"{self.time_slack} s ({self.source})"))
        a, a0 = case.get("asrd"), ref.get("asrd")  # a repair's ASR drop: higher is better
        if isinstance(a, (int, float)) and isinstance(a0, (int, float)) and a < a0 - self.repair_tol:
            out.append(Regression(key, f"ASRD {a:.4f} < baseline {a0:.4f} - {self.repair_tol} ({self.source})"))
        c, c0 = case.get("cad"), ref.get("cad")  # its CA drop: lower is better
        if isinstance(c, (int, float)) and isinstance(c0, (int, float)) and c > c0 + self.repair_tol:
            out.append(Regression(key, f"CAD {c:.4f} > baseline {c0:.4f} + {self.repair_tol} ({self.source})"))
        return out


BASELINE_FIELDS = ("kind", "case", "nodeid", "outcome", "entry", "localizer", "repair", "wji", "time_s",
                   "hits", "n_fault", "auroc", "cad", "asrd")


def save_baseline(results: str | os.PathLike, out: str | os.PathLike) -> int:
    """Write the header and the passed cases of a results file (key metrics only) to ``out``."""
    lines = read(results)
    head = [ln for ln in lines if ln.get("kind") == "header"]
    cases = [{k: ln.get(k) for k in BASELINE_FIELDS if k in ln}
             for ln in lines if ln.get("kind") == "case" and ln.get("outcome") == "passed"]
    if not cases:
        raise BadInputError(f"{results}: no passed cases to make a baseline of")
    p = Path(out)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(ln, sort_keys=True) + "\n" for ln in head[:1] + cases))
    os.replace(tmp, p)
    return len(cases)
