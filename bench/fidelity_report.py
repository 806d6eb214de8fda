"""Build a profile's database, run the benchmark on it, and write one Markdown fidelity report.

    python bench/fidelity_report.py --profile small --db ~/bd4nn-db/small --out docs/results/small-cpu.md
    python bench/fidelity_report.py --profile small --db DB --out report.md --skip-bench   # database only
    python bench/fidelity_report.py --profile small --db DB --out report.md -- -k "clp or slicer"

Every number in the report is what these commands measured: the database part comes from the
entries' labels and the benign parents' records (``bd4nn info``), the benchmark part from the
results file of ``pytest bench/`` through ``reports`` (``python -m reports RESULTS --format md``).
The header gives the exact command line, the git hash, the machine, and the wall times. The
build and the benchmark resume: a database or results file that is already complete is not
redone unless asked (``--rerun-bench``). Arguments after ``--`` go to pytest.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402

from bd4nn.build import build_parallel, default_workers, load_profile, plan  # noqa: E402
from bd4nn.data import DATA_ENV, data_folder  # noqa: E402
from bd4nn.db import Database  # noqa: E402
from bd4nn.results import build_runs, database_summary, git_hash, minutes  # noqa: E402
from bd4nn.machine import describe  # noqa: E402
from bench.options import add_machine_options, parse  # noqa: E402


def _minutes(seconds: float | None) -> str:
    return minutes(seconds) or "—"  # a blank cell reads "—" in the report


def _pct(v: float | None, digits: int = 1) -> str:
    return "—" if v is None else f"{100 * v:.{digits}f}"


def database_section(db: Database, targets: dict) -> list[str]:
    dirs, parents = database_summary(db)
    lines = db.entries(kept=None)
    out = ["## The database", ""]
    out += ["### Benign parents", "",
            tabulate([[p["dataset"], p["arch"], f"{p['width']:g}", _pct(p["ca"], 2), p["epochs"], p["train_images"],
                       p["test_images"], _minutes(p["seconds"]), p["threads"]] for p in parents],
                     headers=["dataset", "arch", "width", "benign CA %", "epochs", "train images", "test images",
                              "train time", "threads"], tablefmt="github"), ""]
    asr_t, drop_t = targets["asr"], targets["ca_drop"]
    out += ["### Entries per attack and level (`bd4nn info`)", "",
            f"Means over kept entries, full test set. Targets: ASR ≥ {100 * asr_t:.0f} % and CA within "
            f"{100 * drop_t:.0f} points of the benign parent; rule 3 keeps an entry iff ASR.Cor > 0.5.", ""]
    rows = []
    for d in dirs:
        ok = []
        if d["mean_asr"] is not None:
            ok.append("ASR" if d["mean_asr"] >= asr_t else "ASR ✗")
        if d["ca_drop"] is not None:
            ok.append("CA" if d["ca_drop"] <= drop_t else "CA ✗")
        rows.append([d["arch"], d["attack"], d["level"], d["kept"], d["rejected"], _pct(d["mean_ca"]),
                     _pct(d["ca_drop"]), _pct(d["mean_asr"]),
                     "—" if d["mean_asr_cor"] is None else f"{d['mean_asr_cor']:.3f}", " ".join(ok) or "—"])
    out += [tabulate(rows, headers=["arch", "attack", "level", "kept", "rejected", "CA %", "CA drop pts", "ASR %",
                                    "ASR.Cor", "targets met"], tablefmt="github"), ""]
    out += ["### Every candidate", "",
            "One row per candidate (kept or rejected), as its label records it; time from the "
            "database's `timings.jsonl`.", ""]
    crow = []
    timings = db.timings()
    for ln in lines:
        lab = db.load_label(ln["id"])
        rec = lab.recipe
        crow.append([ln["id"], "kept" if ln["kept"] else "rejected", lab.n_fault, _pct(lab.ca), _pct(lab.asr),
                     "—" if lab.asr_cor is None else f"{lab.asr_cor:.3f}",
                     "—" if lab.ca_cor is None else f"{lab.ca_cor:.3f}",
                     f"{rec.get('epochs')} ep, lr {rec.get('lr')}, bs {rec.get('batch_size')}" if "epochs" in rec
                     else "chain (SRA)", _minutes(timings.get(ln["id"], {}).get("seconds"))])
    out += [tabulate(crow, headers=["entry", "kept", "|S_fault|", "CA %", "ASR %", "ASR.Cor", "CA.Cor", "recipe",
                                    "time"], tablefmt="github"), ""]
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pytest_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, pytest_args = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--profile", default="small", help="profile (default small)")
    p.add_argument("--db", required=True, type=Path, help="database folder (built or resumed)")
    p.add_argument("--out", required=True, type=Path, help="the Markdown report to write")
    p.add_argument("--results", type=Path, nargs="+",
                   help="results file(s) (default: results/<profile>-report.jsonl); when every one exists "
                        "the benchmark is not rerun and the report reads them all")
    p.add_argument("--no-build", action="store_true",
                   help="report on the database as it is (the header counts what the plan still misses)")
    p.add_argument("--built-with", action="append", default=[], metavar="COMMAND",
                   help="with --no-build: a command that built the database (repeatable; shown in the header)")
    p.add_argument("--skip-bench", action="store_true", help="database sections only")
    p.add_argument("--rerun-bench", action="store_true", help="run the benchmark even if the results file exists")
    add_machine_options(p, data_help="dataset archive folder (default: $BD4NN_DATA, else ../shared/data)")
    p.add_argument("--notes", type=Path, metavar="FILE",
                   help="a Markdown file of analysis written by hand (e.g. why targets are missed), "
                        "included under its own heading, marked as such")
    p.add_argument("--workers", type=int, default=None,
                   help="build in N processes at once (bd4nn build --workers; default: one per core on a CPU)")
    p.add_argument("--asr-target", type=float, default=0.95)
    p.add_argument("--ca-drop-target", type=float, default=0.08)
    args = parse(p, argv)
    command = "python bench/fidelity_report.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])

    profile = load_profile(args.profile)
    found = data_folder(args.data, [ROOT.parent / "shared" / "data"])
    data = str(found) if found is not None else None
    t0 = time.perf_counter()
    built = 0
    if not args.no_build:
        built = build_parallel(args.db, profile, workers=args.workers or default_workers(), data_root=data).built
    build_wall = time.perf_counter() - t0
    db = Database(args.db)
    missing = [it.id for it in plan(profile) if not db.has_entry(it.id)]
    labels = [db.load_label(ln["id"]) for ln in db.entries(kept=None)]
    timings = db.timings()
    _, parents = database_summary(db)
    runs = build_runs(db)
    recorded = sum(timings.get(lab.id, {}).get("seconds") or 0 for lab in labels) \
        + sum(p["seconds"] or 0 for p in parents)

    all_results = args.results or [ROOT / "results" / f"{profile.name}-report.jsonl"]
    results = all_results[0]
    if len(all_results) > 1 and not all(r.is_file() for r in all_results):
        p.error("several --results files are read, never written: run the benchmark into each first")
    bench_wall = None
    cmd: list[str] = []
    if not args.skip_bench and (args.rerun_bench or not results.is_file()):
        cmd = [sys.executable, "-m", "pytest", str(ROOT / "bench"), "-p", "no:cacheprovider", "-q",
               "--benchmark-disable", "--db", str(args.db), "--profile", args.profile, "--results", str(results),
               *(["--threads", str(args.threads)] if args.threads else []), *pytest_args]
        print("fidelity_report:", shlex.join(cmd[2:]), flush=True)
        t1 = time.perf_counter()
        rc = subprocess.call(cmd, cwd=ROOT, env={**os.environ, **({DATA_ENV: data} if data else {})})
        bench_wall = time.perf_counter() - t1
        if rc not in (0, 1):  # 1 = some case failed: still reported
            print(f"fidelity_report: pytest exited {rc}", file=sys.stderr)
            return rc

    workers = f" --workers {args.workers}" if args.workers else ""
    runs = [*([] if args.no_build else [f"bd4nn build --db {args.db} --profile {args.profile}{workers}"]),
            *([shlex.join(["pytest", *cmd[3:]])] if bench_wall is not None else []),
            *([f"python -m reports {' '.join(str(r) for r in all_results)} --format md"] if not args.skip_bench else [])]
    head = [f"# Fidelity report: the `{profile.name}` profile", "",
            "Generated, not typed: every figure below is what these commands printed or recorded.", "",
            "```bash", command, "```", "",
            *(["which runs, in order:", "", "```bash", *runs, "```", ""] if runs else []),
            *(["The database was built beforehand by:", "", "```bash", *args.built_with, "```", ""]
              if args.built_with else []),
            *(["The benchmark results were reused, not rerun: each file's own header (run, git hash, threads, "
               "`pytest bench/` options) is listed under \"The benchmark\".", ""]
              if bench_wall is None and not args.skip_bench else []),
            f"- git: `{git_hash(ROOT)}`; torch {torch.__version__}; Python {platform.python_version()}",
            f"- machine: {describe()}",
            f"- profile: {profile.description}",
            f"- build: {len(labels)} candidates in the database, {sum(lab.kept for lab in labels)} kept"
            + (f"; **{len(missing)} candidates of the profile's plan are not built yet** "
               f"({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''})" if missing else "")
            + (f"; this run built {built} in {_minutes(build_wall)} wall time" if not args.no_build else
               " (this run built nothing: --no-build)")
            + f"; the recorded compute of the database (benign training + every candidate, summed over "
            f"processes) is {_minutes(recorded)}"
            + ("; its build runs (`timings.jsonl`): " + "; ".join(
                f"{r.get('built')} built in {_minutes(r.get('seconds'))} wall ({r.get('workers')} process(es) x "
                f"{r.get('threads')} threads)" for r in runs) if runs else ""),
            f"- benchmark: {'not run (--skip-bench)' if args.skip_bench else _minutes(bench_wall) + ' wall time' if bench_wall is not None else 'results reused from ' + ', '.join(str(r) for r in all_results)}",
            f"- written {time.strftime('%Y-%m-%d %H:%M %Z')}", ""]
    body = database_section(db, {"asr": args.asr_target, "ca_drop": args.ca_drop_target})
    if not args.skip_bench and all(r.is_file() for r in all_results):
        import reports

        from bd4nn.results import read

        res = reports.load(all_results)
        tables = reports.build_tables(res)
        body += ["## The benchmark (`python -m reports " + " ".join(str(r) for r in all_results) + " --format md`)",
                 ""]
        for r in all_results:
            lines_r = read(r)
            head_line = next((ln for ln in lines_r if ln.get("kind") == "header"), {})
            opts = {k: v for k, v in (head_line.get("options") or {}).items() if v not in (None, "", [], {})}
            cases = sum(1 for ln in lines_r if ln.get("kind") == "case")
            body.append(f"- `{r.name}`: run {head_line.get('run')}, git `{head_line.get('git')}`, "
                        f"{head_line.get('threads')} threads x {max(1, head_line.get('workers') or 0)} process(es), "
                        f"{cases} cases, options `{opts}`")
        body += ["", "Tables I–II here are means over the entries the benchmark ran on (the database "
                 "section above covers every candidate).", ""]
        settings = profile.bench
        if settings:
            body += ["Harness settings of the profile's `[bench]` table (published defaults elsewhere):", "",
                     "```toml", *_toml_lines(settings, prefix="bench."), "```", ""]
        # the kept/rejected counts are the database section's (read from the database itself: a
        # results file holds a snapshot of them, and several files would count them twice)
        for key in ("I", "II", "III", "IV", "V", "VI"):
            body += [reports.render(tables[key], "md", provenance=False).rstrip(), ""]
    if args.notes:
        body += ["## Analysis (written by hand, not generated)", "",
                 f"From `{args.notes}`; every figure it cites is in the generated sections above.", "",
                 args.notes.read_text().strip(), ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(head + body) + "\n")
    print(f"fidelity_report: wrote {args.out}")
    return 0


def _toml_lines(table: dict, prefix: str = "") -> list[str]:
    plain = [f"{k} = {v!r}" for k, v in table.items() if not isinstance(v, dict)]
    out = plain[:]
    for k, v in table.items():
        if isinstance(v, dict):
            out += [f"[{prefix}{k}]"] + _toml_lines(v, prefix=f"{prefix}{k}.")
    return out


if __name__ == "__main__":
    sys.exit(main())
