"""Command-line interface: ``bd4nn <command> ...``.

Commands are registered in ``COMMANDS`` (name → (help, add_arguments, run)), so adding one is
one function pair and one decorator, never an if/elif chain. A user's mistake (a wrong path, an
unknown model, a corrupt archive) prints one ``bd4nn: error: ...`` line and exits with status 2;
set ``BD4NN_DEBUG=1`` to get the full traceback instead.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["main", "command", "COMMANDS"]


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


COMMANDS: dict[str, Command] = {}


def number(kind: type, low: float | None = None, *, above: bool = False, high: float | None = None):
    """An argparse ``type``: a finite ``int``/``float`` with bounds (``above``: strictly above ``low``).
    ``int`` refuses "1.5"; ``float`` refuses inf and nan. The message names the problem."""
    noun = "a whole number" if kind is int else "a number"

    def parse(text: str):
        try:
            value = kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if low is not None and (value < low or (above and value == low)):
            raise argparse.ArgumentTypeError(f"{text!r} must be {'>' if above else '>='} {low:g}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{text!r} must be <= {high:g}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


class _Parser(argparse.ArgumentParser):
    """One line for a usage mistake (argparse prints the whole usage block by default)."""

    def error(self, message: str):  # type: ignore[override]
        print(f"{self.prog}: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


def command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    """Decorator registering ``fn(args) -> exit code`` as ``bd4nn NAME``."""

    def deco(fn: Callable[[argparse.Namespace], int | None]):
        COMMANDS[name] = Command(help, add_arguments, fn)
        return fn

    return deco


# --------------------------------------------------------------------------------- models


def _models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("names", nargs="*", help="models to show (default: all registered)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--dataset", help="take the number of classes from this dataset (e.g. gtsrb)")
    g.add_argument("--num-classes", type=number(int, 2), default=10, help="number of classes (default 10)")
    p.add_argument("--width", type=number(float, 0, above=True, high=64), default=1.0,
                   help="channel width multiplier (default 1.0)")
    p.add_argument("--layers", action="store_true", help="also list every neuron layer and its size")


@command("models", "list the model zoo with neuron layers and neuron totals", _models_args)
def _models(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from bd4nn.models import get_model, list_models
    from bd4nn.neurons import NeuronMap

    num_classes = args.num_classes
    if args.dataset:
        from bd4nn.data import get_spec

        num_classes = get_spec(args.dataset).num_classes
    names = args.names or list_models()
    rows, details = [], []
    for name in names:
        model = get_model(name, num_classes, width=args.width)
        nm = NeuronMap(model)
        params = sum(p.numel() for p in model.parameters())
        rows.append([name, len(nm), nm.total, nm.penultimate, f"{params / 1e6:.2f}M"])
        if args.layers:
            details.append((name, [[layer.name, layer.bn_name, layer.size] for layer in nm]))
    print(f"{num_classes} classes, width {args.width:g}")
    print(tabulate(rows, headers=["model", "neuron layers", "neurons", "penultimate layer", "parameters"]))
    for name, table in details:
        print(f"\n{name}")
        print(tabulate(table, headers=["layer (conv)", "BatchNorm", "neurons"]))
    return 0


# ----------------------------------------------------------------------------------- data


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", help="cifar10, cifar100, gtsrb, or imagefolder (with --data)")
    p.add_argument(
        "--data",
        metavar="PATH",
        help="a .tar.xz archive, an ImageFolder directory, or a folder holding <name>.tar.xz "
        "(default: $BD4NN_DATA, else torchvision download)",
    )
    p.add_argument("--fraction", type=number(float, 0, above=True, high=1), default=0.05,
                   help="defenders' clean split (default 0.05)")
    p.add_argument("--seed", type=number(int, 0), default=0, help="seed of the clean split (default 0)")
    p.add_argument("--no-download", action="store_true", help="never fall back to torchvision download")


@command("data", "load a dataset and print its source, split sizes, classes and load time", _data_args)
def _data(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from bd4nn.data import clean_split, load_dataset

    t0 = time.perf_counter()
    data = load_dataset(args.dataset, args.data, download=not args.no_download)
    seconds = time.perf_counter() - t0
    split = clean_split(len(data.train_y), args.fraction, args.seed)
    rows = [
        ["source", data.source],
        ["classes", data.num_classes],
        ["train images", len(data.train_y)],
        ["test images", len(data.test_y)],
        [f"clean split ({args.fraction:g}, seed {args.seed})", len(split)],
        ["image shape", "x".join(str(s) for s in data.train_x.shape[1:])],
        ["load time", f"{seconds:.2f} s"],
    ]
    print(tabulate(rows, tablefmt="plain"))
    names = ", ".join(data.classes[:12]) + (" ..." if data.num_classes > 12 else "")
    print(f"class names: {names}")
    return 0


# -------------------------------------------------------------------------------- database


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard takes I/N (e.g. 0/4), not {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise argparse.ArgumentTypeError(f"--shard I/N needs 0 <= I < N, got {text}")
    return i, n


def _build_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", required=True, type=Path, help="database folder (created if missing)")
    p.add_argument("--profile", default="tiny", help="built-in profile (tiny, paper) or a .toml path")
    p.add_argument("--datasets", nargs="+", help="only these datasets of the profile")
    p.add_argument("--archs", nargs="+", help="only these architectures of the profile")
    p.add_argument("--attacks", nargs="+", help="only these attacks of the profile")
    p.add_argument("--levels", nargs="+", help="only these levels (narrow small middle large)")
    p.add_argument("--shard", type=_shard, default=(0, 1), metavar="I/N",
                   help="build every N-th candidate starting at I (parallel processes)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if present)")
    p.add_argument("--data", metavar="PATH", help="dataset archive folder (default: $BD4NN_DATA)")
    p.add_argument("--workers", type=number(int, 1), default=1, metavar="N",
                   help="build in N processes at once, sharing the cores (--threads is then per process; "
                        "on a CPU, small models build faster in 2 one-thread processes than in one)")


@command("build", "build or resume the database of infected models for a profile", _build_args)
def _build(args: argparse.Namespace) -> int:
    from bd4nn.build import build, build_parallel, load_profile

    profile = load_profile(args.profile)
    kw = dict(datasets=args.datasets, archs=args.archs, attacks=args.attacks, levels=args.levels,
              shard=args.shard, device=args.device, data_root=args.data)
    stats = build_parallel(args.db, profile, workers=args.workers, threads=args.threads, **kw) if args.workers > 1 \
        else build(args.db, profile, **kw)
    d = stats.to_dict()
    per = f"{d['mean_candidate_seconds']:.2f} s per candidate" if d["mean_candidate_seconds"] else "nothing new"
    print(f"{profile.name}: {stats.planned} planned, {stats.skipped} already built, {stats.built} built "
          f"({stats.kept} kept, {stats.rejected} rejected) in {stats.seconds:.1f} s; {per}")
    return 0


def _db_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("db", type=Path, help="database folder")


def _summary_rows(lines: list[dict]) -> list[list]:
    """Per (dataset, arch, attack): kept, rejected and mean CA / ASR / ASR.Cor of the kept."""
    from statistics import mean

    groups: dict[tuple, list[dict]] = {}
    for line in lines:
        key = (line["dataset"], line["arch"], line["attack"])
        groups.setdefault(key, []).append(line)
    rows = []
    for key, group in sorted(groups.items()):
        kept = [g for g in group if g["kept"]]
        fmt = lambda k: f"{100 * mean(g[k] for g in kept):.1f}" if kept else ""  # noqa: E731
        cor = f"{mean(g['asr_cor'] for g in kept):.3f}" if kept else ""
        rows.append([*key, len(kept), len(group) - len(kept), fmt("ca"), fmt("asr"), cor])
    return rows


@command("list", "per directory: kept and rejected counts, mean CA / ASR / ASR.Cor", _db_args)
def _list(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from bd4nn.db import Database

    lines = Database(args.db, must_exist=True).entries(kept=None)
    if not lines:
        print(f"{args.db}: no entries")
        return 0
    print(tabulate(_summary_rows(lines),
                   headers=["dataset", "arch", "attack", "kept", "rejected", "CA %", "ASR %", "ASR.Cor"]))
    return 0


@command("info", "per directory and level: kept/rejected, mean CA / ASR / ASR.Cor against the benign parent, "
                 "storage", _db_args)
def _info(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from bd4nn.db import Database
    from bd4nn.results import database_summary

    db = Database(args.db, must_exist=True)
    lines = db.entries(kept=None)
    if not lines:
        print(f"{args.db}: no entries")
        return 0
    rows, parents = database_summary(db)
    if parents:
        print(tabulate([[p["dataset"], p["arch"], f"{p['width']:g}", f"{100 * p['ca']:.2f}", p["epochs"],
                         p["train_images"], p["test_images"], _secs(p["seconds"])] for p in parents],
                       headers=["dataset", "arch", "width", "benign CA %", "epochs", "train images",
                                "test images", "train time"]))
        print()
    pct = lambda v: "" if v is None else f"{100 * v:.1f}"  # noqa: E731
    print(tabulate([[d["dataset"], d["arch"], d["attack"], d["level"], d["kept"], d["rejected"], pct(d["mean_ca"]),
                     "" if d["ca_drop"] is None else f"{100 * d['ca_drop']:.1f}", pct(d["mean_asr"]),
                     "" if d["mean_asr_cor"] is None else f"{d['mean_asr_cor']:.3f}",
                     "" if d["size"] is None else f"{100 * d['size']:.2f}"] for d in rows],
                   headers=["dataset", "arch", "attack", "level", "kept", "rejected", "CA %", "CA drop pts",
                            "ASR %", "ASR.Cor", "size % of full"]))
    kept = [g for g in lines if g["kept"]]
    print(f"\n{len(kept)} kept of {len(lines)} candidates; means over kept entries; CA drop = benign CA - CA")
    return 0


def _secs(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _verify_args(p: argparse.ArgumentParser) -> None:
    _db_args(p)
    p.add_argument("--remeasure", type=number(int, 0), default=0, metavar="N",
                   help="also re-measure CA / ASR / ASR.Cor of N kept entries against their labels")
    p.add_argument("--tolerance", type=number(float, 0, high=1), default=0.02, help="allowed difference (default 0.02)")
    p.add_argument("--device", default="auto")
    p.add_argument("--data", metavar="PATH", help="dataset archive folder (default: $BD4NN_DATA)")


@command("verify", "re-hash every file of a database; optionally re-measure entries", _verify_args)
def _verify(args: argparse.Namespace) -> int:
    from bd4nn.db import Database

    db = Database(args.db, must_exist=True)
    problems = db.verify()
    for p in problems:
        print(f"FAIL {p}")
    n = len(db.entries(kept=None))
    print(f"{n} entries hashed: {'all files match' if not problems else f'{len(problems)} problems'}")
    if args.remeasure:
        from bd4nn.verify import remeasure

        bad = remeasure(db, args.remeasure, tolerance=args.tolerance, device=args.device, data_root=args.data)
        problems += bad
    return 1 if problems else 0


# ------------------------------------------------------------------------------- localize


def _setting(text: str) -> tuple[str, object]:
    """``key=value`` with the value parsed as JSON when it parses (numbers, true/false, lists)."""
    import json

    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--set takes KEY=VALUE, not {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def _localize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", required=True, type=Path, help="database folder")
    p.add_argument("--entry", required=True, help="entry id (`bd4nn list` / index.jsonl)")
    p.add_argument("--localizer", required=True, help="fp, nc, anp, clp, deepmufl, slicer, pfl, random, ...")
    p.add_argument("--set", dest="settings", action="append", type=_setting, default=[], metavar="KEY=VALUE",
                   help="override a localizer setting (repeatable), e.g. --set steps=100")
    p.add_argument("--clean-images", type=number(int, 1), help="use only this many of the 5%% clean images")
    p.add_argument("--seed", type=number(int, 0), default=0)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if present)")
    p.add_argument("--data", metavar="PATH", help="dataset archive folder (default: $BD4NN_DATA)")


@command("localize", "run one localizer on one entry: per-layer top-k, WJI, AUROC, AP, time", _localize_args)
def _localize(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from bd4nn.db import Database
    from bd4nn.harness import load_context, localize, make_localizer
    from bd4nn.train import resolve_device

    ctx = load_context(Database(args.db, must_exist=True), args.entry, device=resolve_device(args.device), data_root=args.data,
                       clean_images=args.clean_images)
    loc = make_localizer(args.localizer, ctx.label, **dict(args.settings))
    res = localize(ctx, loc, seed=args.seed)
    fault = ctx.label.s_fault
    rows = []
    for layer in res.scores:
        k = len(fault.get(layer, []))
        if k == 0:
            continue
        found = res.selection.get(layer, [])
        hit = sorted(set(found) & set(fault[layer]))
        rows.append([layer, k, " ".join(map(str, found)), " ".join(map(str, fault[layer])), len(hit)])
    uncovered = [layer for layer in fault if layer not in res.scores]
    print(f"{args.localizer} on {args.entry} ({ctx.label.attack}, {ctx.label.level}; "
          f"{len(ctx.clean_y)} clean images, {ctx.device})")
    print(tabulate(rows, headers=["layer", "k", "top-k localized", "fault", "hits"]))
    if uncovered:
        n = sum(len(fault[layer]) for layer in uncovered)
        print(f"({n} fault neurons in {len(uncovered)} layers outside {args.localizer}'s scope)")
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    m = res.metrics()
    print(f"\nWJI {m['wji']:.4f}   hits {m['hits']}/{m['n_fault']}   AUROC {fmt(m['auroc'])}   "
          f"AP {fmt(m['ap'])}   time {m['time_s']:.3f} s")
    return 0


# ---------------------------------------------------------------------------------- bench


def _bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("pytest_args", nargs=argparse.REMAINDER,
                   help="arguments for pytest, e.g. -k clp -n 2 --db PATH --baseline FILE")


@command("bench", "ensure the database, run `pytest bench/`, write results, print Tables III and IV",
         _bench_args)
def _bench(args: argparse.Namespace) -> int:
    import subprocess

    root = Path(__file__).resolve().parent.parent
    if not (root / "bench" / "conftest.py").is_file():
        raise FileNotFoundError(f"{root / 'bench'}: the benchmark cases are not here; run bd4nn bench from "
                                "a checkout installed with `pip install -e .`")
    extra = list(args.pytest_args)
    results = None
    for i, a in enumerate(extra):
        if a == "--results" and i + 1 < len(extra):
            results = Path(extra[i + 1])
        elif a.startswith("--results="):
            results = Path(a.split("=", 1)[1])
    if results is None:
        results = root / "results" / f"{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
        extra += ["--results", str(results)]
    cmd = [sys.executable, "-m", "pytest", str(root / "bench"), "-p", "no:cacheprovider", "-q", *extra]
    print("bd4nn bench:", " ".join(cmd[2:]), flush=True)
    rc = subprocess.call(cmd, cwd=root)
    if results.is_file():
        import reports

        res = reports.load([results])
        tables = reports.build_tables(res)
        for line in res.provenance():
            print(line)
        for name in ("III", "IV", "V", "VI"):
            if name in tables:
                print()
                print(reports.render(tables[name], "md", provenance=False))
        print(f"\nresults: {results}\nall tables: python -m reports {results} [--format md|latex|csv] [--out DIR]")
    return rc


def _baseline_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["save"], help="save: keep a results file as the baseline")
    p.add_argument("results", type=Path, help="results file (results/<run>.jsonl)")
    p.add_argument("--out", type=Path, default=Path("bench/baselines/tiny.jsonl"),
                   help="baseline file to write (default: bench/baselines/tiny.jsonl)")


@command("baseline", "save a results file as the regression baseline (`pytest bench/ --baseline FILE`)",
         _baseline_args)
def _baseline(args: argparse.Namespace) -> int:
    from bd4nn.results import save_baseline

    n = save_baseline(args.results, args.out)
    print(f"baseline {args.out}: {n} cases from {args.results}")
    return 0


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("report_args", nargs=argparse.REMAINDER, help="arguments of `python -m reports`")


@command("report", "print the paper's tables from a results file (same as `python -m reports`)", _report_args)
def _report(args: argparse.Namespace) -> int:
    from reports.__main__ import main as report_main

    return int(report_main(list(args.report_args)) or 0)


# ----------------------------------------------------------------------------------- main


def _user_errors() -> tuple[type[BaseException], ...]:
    """What ``main`` reports in one line: ``bd4nn.errors.UserError`` (every bd4nn module's error
    type derives from it), the ``reports`` package's ``ResultsError`` (that package stays free of
    bd4nn and torch imports) and a missing file the user named. Anything else is a bug."""
    from bd4nn.errors import UserError
    from reports.results import ResultsError

    return (UserError, ResultsError, FileNotFoundError)


PASS_THROUGH = ("bench", "report")  # commands whose arguments go to pytest / python -m reports


def build_parser() -> argparse.ArgumentParser:
    from bd4nn import __version__

    parser = _Parser(
        prog="bd4nn",
        description="Benchmark of neuron-level backdoor-defect localization in CNNs.",
    )
    parser.add_argument("--version", action="version", version=f"bd4nn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
        if name not in PASS_THROUGH:  # bench/report hand their options to pytest/reports
            p.add_argument("--threads", type=number(int, 1), default=None, metavar="N",
                           help="torch CPU threads (default: $BD4NN_THREADS, else every core)")
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # only `bench` and `report` pass arguments through (to pytest / reports)
        for key in ("pytest_args", "report_args"):
            if hasattr(args, key):
                setattr(args, key, extra + list(getattr(args, key)))
                break
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        if args.command not in PASS_THROUGH:
            from bd4nn.runtime import set_threads

            set_threads(args.threads)
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("bd4nn: interrupted", file=sys.stderr)
        return 130
    except _user_errors() as exc:
        if os.environ.get("BD4NN_DEBUG"):
            raise
        print(f"bd4nn: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
