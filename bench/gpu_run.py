"""One command for a short GPU window: benign VGG-13, BadNets and SRA candidates, six localizers.

    python bench/gpu_run.py --minutes 9 --out gpu-run                 # on a GPU machine
    python bench/gpu_run.py --device cpu --minutes 2 --toy --out /tmp/g  # the CPU rehearsal

Within ``--minutes`` (counted from the start, data loading included) it:

(a) trains the CIFAR-10 VGG-13 benign parent with the `paper` profile's recipe (full width, the
    full training set, bd4nn's benign recipe);
(b) injects BadNets and SRA candidates with the paper recipe, spread over the four levels
    (narrow, small, middle, large; first window, then further windows) for at most
    ``--inject-share`` of the time (a) left (the first pair always);
(c) runs CLP, FP, SLICER, ANP, NC and deepmufl with their published defaults on the kept
    entries: all six on the first BadNets and the first SRA entry, then the other entries, fast
    methods first; a case that would not finish before the deadline (its estimate: the last run
    of that method, else its target time) is skipped and listed;
(d) writes, after *every* stage and case, so that a killed run keeps what it finished:
    ``results.jsonl`` (the harness's results format), ``tables.md`` (Tables I–IV and the
    database counts, by ``reports``), ``times.md`` (per-stage time and peak memory against the
    targets below) and ``run.json``; the database goes to ``DIR/db``. Run it again with the same
    ``--out`` to resume: the parent and the candidates in ``DIR/db`` are reused and the cases
    already in ``results.jsonl`` are kept and not rerun.

Targets (one GPU): benign VGG-13 ≤ 30 s; ≤ 1.5 s per candidate; per model CLP ≤ 0.05 s,
FP ≤ 0.5 s, SLICER ≤ 5 s, ANP ≤ 15 s, NC ≤ 30 s, deepmufl ≤ 300 s.

The dataset comes from ``--data``, else ``$BD4NN_DATA``, else ``../shared/data``, else the
ignored folder ``.data/`` at the repository root (copy ``cifar10.tar.xz`` there to carry it to a
machine without internet). ``--toy`` is a CPU rehearsal with the `tiny` profile's settings
(width 1/8, 4,000 training images, its altered attack recipe and cut localizer budgets).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402

from bd4nn.build import PlanItem, build_candidate, load_profile, prepare_parent  # noqa: E402
from bd4nn.data import data_folder, load_dataset  # noqa: E402
from bd4nn.db import Database, benign_timing_key, entry_id  # noqa: E402
from bd4nn.harness import load_context, localize, make_localizer  # noqa: E402
from bd4nn.inject import LEVELS  # noqa: E402
from bd4nn.results import directory_lines, header  # noqa: E402
from bd4nn.runtime import PeakMemory, amp_enabled, threads  # noqa: E402
from bench.options import add_machine_options, parse  # noqa: E402
from bd4nn.train import resolve_device  # noqa: E402
from bd4nn.argtypes import device as device_arg

ARCH, DATASET = "vgg13", "cifar10"
ATTACKS = ("badnets", "sra")
LOCALIZERS = ("clp", "fp", "slicer", "anp", "nc", "deepmufl")  # fast first
TARGETS = {"benign": 30.0, "candidate": 1.5, "clp": 0.05, "fp": 0.5, "slicer": 5.0, "anp": 15.0, "nc": 30.0,
           "deepmufl": 300.0}
def find_data(given: str | None) -> str | None:
    """``--data``, ``$BD4NN_DATA``, ``../shared/data`` or ``./.data`` (the folder carried to a GPU
    machine): the first that holds CIFAR-10 (``bd4nn.data.data_folder``)."""
    found = data_folder(given, [ROOT.parent / "shared" / "data", ROOT / ".data"], holding=DATASET)
    return str(found) if found is not None else None


def run_profile(toy: bool):
    """The `paper` profile cut to CIFAR-10 VGG-13, BadNets and SRA; with ``toy``, the `tiny`
    profile's CPU-sized settings instead (width 1/8, 4,000 images, its recipe and budgets)."""
    p = load_profile("tiny" if toy else "paper")
    return dataclasses.replace(p, name="gpu-run" + ("-toy" if toy else ""), datasets=[DATASET], archs=[ARCH],
                               attacks=list(ATTACKS), candidates=None, exclude=[]).validate()


def candidate_order() -> list[PlanItem]:
    """Window 0 of every level, then further windows spread over each level's range, each for
    both attacks: (narrow 0: BadNets, SRA), (small 0: ...), ..., (narrow 10: ...), ..."""
    spreads = {lvl: [0] + [i for i in (LEVELS[lvl].count // 2, LEVELS[lvl].count // 4, 3 * LEVELS[lvl].count // 4)
                           if i > 0] for lvl in LEVELS}
    items, seen = [], set()
    for rank in range(4):
        for lvl in ("narrow", "small", "middle", "large"):
            if rank < len(spreads[lvl]) and (lvl, spreads[lvl][rank]) not in seen:
                i = spreads[lvl][rank]
                seen.add((lvl, i))
                items += [PlanItem(entry_id(DATASET, ARCH, a, lvl, i), DATASET, ARCH, a, lvl, i) for a in ATTACKS]
    return items


class Run:
    """The run's state and its files, rewritten after every step."""

    def __init__(self, out: Path, minutes: float, device: torch.device, profile, argv: list[str]) -> None:
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + 60.0 * minutes
        self.out, self.device, self.profile = out, device, profile
        self.stages: list[dict] = []
        self.skipped: list[str] = []
        self.failures: list[str] = []
        self.cases = 0
        self.db = Database(out / "db")
        self.results = out / "results.jsonl"
        self.command = "python bench/gpu_run.py " + " ".join(argv)
        out.mkdir(parents=True, exist_ok=True)
        # a rerun into the same folder resumes: the database is reused, earlier cases are kept
        self.earlier = [json.loads(ln) for ln in self.results.read_text().splitlines()
                        if ln.strip() and json.loads(ln).get("kind") == "case"] if self.results.exists() else []
        self.done = {(c.get("localizer"), c.get("entry")) for c in self.earlier}
        head = header(run="gpu-run", profile=profile.name, db=str(self.db.root),
                      options={"minutes": minutes, "command": self.command,
                               "localizer_settings": profile.bench.get("localizers", {}),
                               "bf16": amp_enabled(device)},
                      workers=0, root=ROOT, threads=threads())
        with open(self.results, "w") as f:
            f.write("".join(json.dumps(ln) + "\n" for ln in [head, *self.earlier]))
        self.cases = len(self.earlier)

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def stage(self, name: str, key: str | None, fn, *args, **kwargs):
        t = time.perf_counter()
        with PeakMemory(self.device) as mem:
            result = fn(*args, **kwargs)
        seconds = time.perf_counter() - t
        self.stages.append({"stage": name, "key": key, "seconds": seconds, "peak_mib": mem.peak_mib})
        print(f"[{time.perf_counter() - self.t0:6.0f} s] {name}: {seconds:.2f} s", flush=True)
        return result

    def guarded(self, name: str, key: str | None, fn, *args, **kwargs):
        """``stage``, but a failure is printed, recorded and survived (the window goes on)."""
        try:
            return self.stage(name, key, fn, *args, **kwargs)
        except Exception as exc:
            traceback.print_exc()
            self.failures.append(f"{name}: {type(exc).__name__}: {exc}")
            self.stages.append({"stage": f"{name} FAILED", "key": None, "seconds": 0.0, "peak_mib": None})
            self.write()
            return None

    def add_case(self, line: dict) -> None:
        with open(self.results, "a") as f:
            f.write(json.dumps(line) + "\n")
        self.cases += 1

    # ------------------------------------------------------------------------ writing
    def write(self, final: bool = False) -> None:
        """Rewrite the directory lines into the results, then tables.md, times.md, run.json."""
        lines = [json.loads(ln) for ln in self.results.read_text().splitlines() if ln.strip()]
        body = [ln for ln in lines if ln.get("kind") != "directory"]
        entries = self.db.entries(kept=None)
        benign = {}
        if self.db.has_benign(DATASET, ARCH):
            benign[(DATASET, ARCH)] = self.db.benign_record(DATASET, ARCH).ca
        dirs = list(directory_lines(entries, benign)) if entries else []
        tmp = self.results.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(ln) + "\n" for ln in body[:1] + dirs + body[1:]))
        tmp.replace(self.results)
        self._tables(final)
        self._times(final)
        (self.out / "run.json").write_text(json.dumps(
            {"command": self.command, "device": str(self.device), "elapsed_s": time.perf_counter() - self.t0,
             "final": final, "stages": self.stages, "skipped": self.skipped, "failures": self.failures,
             "cases": self.cases}, indent=1) + "\n")

    def _tables(self, final: bool) -> None:
        import reports

        text = [f"# GPU run: tables ({'final' if final else 'partial'})", "",
                f"Generated by `{self.command}`, then `python -m reports {self.results.name} --format md`.", ""]
        try:
            tables = reports.build_tables(reports.load([self.results]))
            for key in ("counts", "I", "II", "III", "IV"):
                text += [reports.render(tables[key], "md", provenance=False).rstrip(), ""]
        except Exception as exc:  # no data yet for some table: say so, keep the rest of the run
            text += [f"(tables not available yet: {type(exc).__name__}: {exc})", ""]
        (self.out / "tables.md").write_text("\n".join(text))

    def _times(self, final: bool) -> None:
        rows = []
        by_key: dict[str, list[float]] = {}
        for st in self.stages:
            if st["key"]:
                by_key.setdefault(st["key"], []).append(st["seconds"])
        for key, target in TARGETS.items():
            vals = by_key.get(key, [])
            mean = sum(vals) / len(vals) if vals else None
            rows.append([key, len(vals), "—" if mean is None else f"{mean:.2f}", f"≤ {target:g}",
                         "—" if mean is None else ("yes" if mean <= target else "NO")])
        stage_rows = [[st["stage"], f"{st['seconds']:.2f}", "—" if st["peak_mib"] is None else f"{st['peak_mib']:.0f}"]
                      for st in self.stages]
        mem = "peak GPU MiB" if self.device.type == "cuda" else "peak RSS MiB"
        text = [f"# GPU run: time per stage ({'final' if final else 'partial'})", "",
                f"`{self.command}` on {describe(self.device)}; bf16 autocast: {amp_enabled(self.device)}; "
                f"elapsed {time.perf_counter() - self.t0:.0f} s.", "",
                "Mean seconds per unit against the targets (benign: one training; candidate: injection "
                "+ rule 3 + RC; localizers: per model):", "",
                tabulate(rows, ["what", "n", "mean s", "target s", "met"], tablefmt="github"), "",
                "Every stage:", "", tabulate(stage_rows, ["stage", "s", mem], tablefmt="github"), ""]
        if self.skipped:
            text += ["Skipped for lack of time: " + ", ".join(self.skipped) + ".", ""]
        if self.failures:
            text += ["Failed:", ""] + [f"- {f}" for f in self.failures] + [""]
        (self.out / "times.md").write_text("\n".join(text))


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {threads()} threads"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=9.0, help="wall-clock budget, start to finish (default 9)")
    p.add_argument("--out", type=Path, required=True, help="folder for the results, tables and database")
    p.add_argument("--device", type=device_arg, default="auto", help="cuda, cuda:1, cpu (default: cuda if present)")
    p.add_argument("--toy", action="store_true", help="CPU-sized rehearsal (module docstring)")
    p.add_argument("--inject-share", type=float, default=0.3, help="share of the time left after (a) that (b) may take (0.3)")
    p.add_argument("--max-candidates", type=int, default=16, help="at most this many candidates (16)")
    add_machine_options(p, data_help="folder holding cifar10.tar.xz (default: see module docstring)")
    args = parse(p, argv)
    dev = resolve_device(args.device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    profile = run_profile(args.toy)
    run = Run(args.out, args.minutes, dev, profile, argv)
    print(f"gpu_run: {describe(dev)}, budget {args.minutes:g} min, writing to {args.out}", flush=True)

    def on_term(signum, frame):  # a polite kill: write what exists, then stop
        run.write()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    try:
        code = _stages(run, args, dev, profile)
        return 1 if run.failures else code
    finally:
        run.write(final=True)
        print(f"gpu_run: wrote {args.out}/results.jsonl, tables.md, times.md, run.json", flush=True)


def _stages(run: Run, args, dev: torch.device, profile) -> int:
    data = run.stage("load CIFAR-10", None, load_dataset, DATASET, find_data(args.data), progress=False)
    # (a) benign parent (+ rule 1 ranking, which every candidate shares)
    parent = run.stage("benign VGG-13 + rule 1", None, prepare_parent, run.db, profile, DATASET, ARCH, data,
                       device=dev, progress=False)
    rec = run.db.benign_record(DATASET, ARCH)
    run.stages.append({"stage": f"  of which benign training ({rec.config['train']['epochs']} epochs, "
                                f"CA {rec.ca:.4f})", "key": "benign",
                       "seconds": float(run.db.timings()[benign_timing_key(DATASET, ARCH)]["seconds"]),
                       "peak_mib": None})
    run.write()
    # (b) candidates
    inject_deadline = time.perf_counter() + max(0.0, run.left()) * args.inject_share
    last = TARGETS["candidate"]
    for i, item in enumerate(candidate_order()[: args.max_candidates]):
        if run.db.has_entry(item.id):
            continue
        if i >= len(ATTACKS) and time.perf_counter() + last > inject_deadline:  # the first pair always
            run.skipped.append(f"candidate {item.id}")
            continue
        got = run.guarded(f"inject {item.id}", "candidate", build_candidate, run.db, profile, parent, item)
        last = run.stages[-1]["seconds"]
        if got is None:
            continue
        out, label = got
        print(f"    CA {label.ca:.4f} ASR {label.asr:.4f} ASR.Cor {label.asr_cor:.3f} kept={label.kept}", flush=True)
        run.write()
    # (c) localizers on the kept entries
    kept = [ln["id"] for ln in run.db.entries(kept=True)]
    order = {it.id: i for i, it in enumerate(candidate_order())}
    kept.sort(key=lambda e: order.get(e, 1 << 30))
    # unknown cost = the target (a GPU); the toy rehearsal tries everything once
    estimate = {name: 0.0 if args.toy else TARGETS[name] for name in LOCALIZERS}
    settings = profile.bench.get("localizers", {})
    data_map = {DATASET: data}
    # every method on the first BadNets and the first SRA entry (Table IV gets all six), then the
    # other entries, fast methods first, the slow ones with what is left
    first = [next((e for e in kept if f"-{a}-" in e), None) for a in ATTACKS]
    first = [e for e in first if e is not None]
    rest = [e for e in kept if e not in first]
    cases = [(n, e) for e in first for n in LOCALIZERS] + [(n, e) for n in LOCALIZERS for e in rest]
    contexts: dict = {}
    for name, entry in cases:
        if (name, entry) in run.done:
            continue
        if run.left() < estimate[name] * 1.1 + 5.0:
            run.skipped.append(f"{name} on {entry}")
            continue
        if entry not in contexts:
            contexts[entry] = load_context(run.db, entry, device=dev, data=data_map,
                                           clean_images=profile.bench.get("clean_images"))
        ctx = contexts[entry]
        res = run.guarded(f"{name} on {entry}", name, localize, ctx,
                          make_localizer(name, ctx.label, **settings.get(name, {})))
        if res is None:
            continue
        estimate[name] = res.time_s
        run.add_case({"kind": "case", "case": "localization", "nodeid": f"gpu_run[{name}-{entry}]",
                      "outcome": "passed", "localizer": name, "repair": None, **ctx.fields(), **res.metrics()})
        run.write()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
