"""Command-line interface: ``bd4nn <command> ...``.

Commands are registered in ``COMMANDS`` (name → (help, add_arguments, run)), so adding one is
one function pair and one decorator, never an if/elif chain. A user's mistake (a wrong path, an
unknown model, a corrupt archive) prints one ``bd4nn: error: ...`` line and exits with status 2;
set ``BD4NN_DEBUG=1`` to get the full traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bd4nn.argtypes import Parser, number, setting, shard
from bd4nn.argtypes import device as device_arg

__all__ = ["main", "command", "COMMANDS"]


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    """Decorator registering ``fn(args) -> exit code`` as ``bd4nn NAME``."""

    def deco(fn: Callable[[argparse.Namespace], int | None]):
        COMMANDS[name] = Command(help, add_arguments, fn)
        return fn

    return deco


def delegated(name: str, help: str, module: str) -> None:
    """Register ``bd4nn NAME`` whose arguments and body are ``module``'s ``add_arguments(p)`` and
    ``run(args)``, imported only when the command is used."""
    from importlib import import_module

    command(name, help, lambda p: import_module(module).add_arguments(p))(
        lambda args: import_module(module).run(args))


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

    from bd4nn.data import get_spec
    from bd4nn.models import get_model, list_models
    from bd4nn.neurons import NeuronMap

    num_classes = get_spec(args.dataset).num_classes if args.dataset else args.num_classes
    maps = {name: NeuronMap(get_model(name, num_classes, width=args.width)) for name in args.names or list_models()}
    print(f"{num_classes} classes, width {args.width:g}")
    print(tabulate([[name, len(nm), nm.total, nm.penultimate, f"{sum(p.numel() for p in nm.model.parameters()) / 1e6:.2f}M"]
                    for name, nm in maps.items()], headers=["model", "neuron layers", "neurons", "penultimate layer",
                                                          "parameters"]))
    for name, nm in maps.items() if args.layers else ():
        print(f"\n{name}")
        print(tabulate([[layer.name, layer.bn_name or "(none: masked after the conv)", layer.size] for layer in nm],
                       headers=["layer (conv)", "BatchNorm", "neurons"]))
    return 0


# ------------------------------------------------------------------------------- listings


def _names_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("names", nargs="*", help="only these (default: all registered)")


def _print_settings(title: str, settings_cls: type) -> None:
    from tabulate import tabulate

    from bd4nn.settings import describe_settings

    rows = describe_settings(settings_cls)
    print(title)
    print(tabulate(rows, headers=["setting", "default", "source of the default / note"]) if rows else "(no settings)")
    print()


@command("localizers", "list the localizers: scope, what a high score means, settings and their defaults",
         _names_args)
def _localizers(args: argparse.Namespace) -> int:
    from localizers import list_localizers, localizer_class

    for name in args.names or list_localizers():
        cls = localizer_class(name)
        _print_settings(f"{name} (scope: {cls.scope}){': ' + cls.summary if cls.summary else ''}", cls.Settings)
    print("override a setting: bd4nn localize ... --set KEY=VALUE, or a profile's [bench.localizers.<name>]")
    return 0


@command("attacks", "list the attacks: kind, settings and their defaults", _names_args)
def _attacks(args: argparse.Namespace) -> int:
    from bd4nn.attacks import attack_class, list_attacks

    for name in args.names or list_attacks():
        cls = attack_class(name)
        _print_settings(f"{name} ({cls.kind})", cls.Settings)
    return 0


@command("profiles", "list the built-in profiles: what each builds, how many candidates, measured build time",
         _names_args)
def _profiles(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from bd4nn.build import list_profiles, load_profile, plan

    rows = []
    for name in args.names or list_profiles():
        p = load_profile(name)
        rows.append([name, len(plan(p)), ", ".join(p.datasets), ", ".join(p.archs), f"{p.width:g}", p.description])
        rows.append(["", "", "", "", "", f"build time: {p.build_time or 'not measured'}"])
    print(tabulate(rows, headers=["profile", "candidates", "datasets", "archs", "width", "description"]))
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
    print(tabulate([["source", data.source], ["classes", data.num_classes], ["train images", len(data.train_y)],
                    ["test images", len(data.test_y)], [f"clean split ({args.fraction:g}, seed {args.seed})", len(split)],
                    ["image shape", "x".join(str(s) for s in data.train_x.shape[1:])],
                    ["load time", f"{seconds:.2f} s"]], tablefmt="plain"))
    print(f"class names: {', '.join(data.classes[:12])}{' ...' if data.num_classes > 12 else ''}")
    return 0


# -------------------------------------------------------------------------------- database


def _build_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", required=True, type=Path, help="database folder (created if missing)")
    p.add_argument("--profile", default="tiny", help="built-in profile (tiny, paper) or a .toml path")
    p.add_argument("--datasets", nargs="+", help="only these datasets of the profile")
    p.add_argument("--archs", nargs="+", help="only these architectures of the profile")
    p.add_argument("--attacks", nargs="+", help="only these attacks of the profile")
    p.add_argument("--levels", nargs="+", help="only these levels (narrow small middle large)")
    p.add_argument("--shard", type=shard, default=(0, 1), metavar="I/N",
                   help="build every N-th candidate starting at I (parallel processes)")
    p.add_argument("--device", type=device_arg, default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if present)")
    p.add_argument("--data", metavar="PATH", help="dataset archive folder (default: $BD4NN_DATA)")
    p.add_argument("--workers", type=number(int, 1), default=None, metavar="N",
                   help="build in N processes at once (default: one per core on a CPU, one on a GPU)")
    _ray_arg(p, "build on the Ray cluster at ADDRESS (auto: the one `ray start` runs on this node; HOST:PORT; "
                "default: a new local one): parents first, then the candidates, one GPU per task where it has "
                "GPUs; --db and the data must be on a filesystem every node shares")
    p.add_argument("--batch", type=number(int, 1), default=1, metavar="N",
                   help="with --ray: candidates per Ray task (default 1)")


def _ray_arg(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help=help + ' (needs Ray: pip install -e ".[ray]")')


@command("build", "build or resume the database of infected models for a profile", _build_args)
def _build(args: argparse.Namespace) -> int:
    from bd4nn.build import build_parallel, default_workers, load_profile
    from bd4nn.errors import BadInputError

    profile = load_profile(args.profile)
    kw = dict(datasets=args.datasets, archs=args.archs, attacks=args.attacks, levels=args.levels,
              shard=args.shard, device=args.device, data_root=args.data)
    if args.ray is not None:
        from bd4nn.cluster import build_on_ray

        if args.workers:
            raise BadInputError("--workers is for one machine; with --ray the cluster's CPUs and GPUs set how "
                                "many candidates build at once")
        stats = build_on_ray(args.db, profile, address=args.ray, threads=args.threads, batch=args.batch, **kw)
    else:
        workers = args.workers or default_workers(args.device)  # also refuses a device this machine lacks
        stats = build_parallel(args.db, profile, workers=workers, threads=args.threads, **kw)
    d = stats.to_dict()
    per = f"{d['mean_candidate_seconds']:.2f} s per candidate" if d["mean_candidate_seconds"] else "nothing new"
    print(f"{profile.name}: {stats.planned} planned, {stats.skipped} already built, {stats.built} built "
          f"({stats.kept} kept, {stats.rejected} rejected) in {stats.seconds:.1f} s; {per}")
    return 0


def _db_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("db", type=Path, help="database folder")


def _list_args(p: argparse.ArgumentParser) -> None:
    _db_args(p)
    p.add_argument("--entries", nargs="*", metavar="PATTERN",
                   help="one row per entry instead (its id, kept, CA, ASR, ASR.Cor, |S_fault|), optionally "
                        "only ids matching these shell patterns, e.g. '*-vgg13-*-narrow-*'")


@command("list", "per directory: kept and rejected counts, mean CA / ASR / ASR.Cor (--entries: every entry id)",
         _list_args)
def _list(args: argparse.Namespace) -> int:
    import fnmatch

    from tabulate import tabulate

    from bd4nn.db import Database
    from bd4nn.results import directory_lines

    lines = Database(args.db, must_exist=True).entries(kept=None)
    pct = lambda v: "" if v is None else f"{100 * v:.1f}"  # noqa: E731
    if args.entries is not None:
        chosen = [ln for ln in lines if not args.entries or any(fnmatch.fnmatchcase(ln["id"], p) for p in args.entries)]
        rows = [[ln["id"], "kept" if ln["kept"] else "rejected", pct(ln.get("ca")), pct(ln.get("asr")),
                 "" if ln.get("asr_cor") is None else f"{ln['asr_cor']:.3f}", ln.get("n_fault")] for ln in chosen]
        print(tabulate(rows, headers=["id", "", "CA %", "ASR %", "ASR.Cor", "|S_fault|"], disable_numparse=True,
                       colalign=("left", "left", "right", "right", "right", "right")) if rows
              else f"{args.db}: no entry matches {' '.join(args.entries)}")
        return 0
    rows = [[d["dataset"], d["arch"], d["attack"], d["kept"], d["rejected"]]
            + [pct(d[k]) for k in ("mean_ca", "mean_asr")]
            + ["" if d["mean_asr_cor"] is None else f"{d['mean_asr_cor']:.3f}"]
            for d in directory_lines(lines, by_level=False)]
    print(tabulate(rows, headers=["dataset", "arch", "attack", "kept", "rejected", "CA %", "ASR %", "ASR.Cor"])
          if rows else f"{args.db}: no entries")
    return 0


@command("info", "per directory and level: kept/rejected, mean CA / ASR / ASR.Cor against the benign parent, "
                 "storage", _db_args)
def _info(args: argparse.Namespace) -> int:
    from bd4nn.db import Database
    from bd4nn.results import database_tables

    db = Database(args.db, must_exist=True)
    print(database_tables(db) if db.entries(kept=None) else f"{args.db}: no entries")
    return 0


def _pack_args(p: argparse.ArgumentParser) -> None:
    _db_args(p)
    p.add_argument("out", type=Path, metavar="OUT.tar", help="archive to write (.tar, or .tar.gz / .tgz compressed)")


@command("pack", "write a verified database as one archive with a manifest of hashes (to publish it)", _pack_args)
def _pack(args: argparse.Namespace) -> int:
    from bd4nn.pack import pack

    info = pack(args.db, args.out, progress=True)
    print(f"{info['archive']}: {info['entries']} entries ({info['kept']} kept), {info['files']} files, "
          f"{info['bytes'] / 1e6:.1f} MB; database fingerprint {info['fingerprint']}\nsha256 {info['sha256']}  "
          f"(publish it with the archive: `bd4nn pull SOURCE DB --sha256 {info['sha256']}` checks it)")
    return 0


def _fetch_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("source", metavar="SOURCE", help=what)
    p.add_argument("db", type=Path, metavar="DB", help="database folder to create (must not exist or be empty)")
    p.add_argument("--sha256", metavar="HEX", help="the archive's published sha256, checked before anything is unpacked")


def _report_fetched(db: Path) -> None:
    from bd4nn.db import Database, database_fingerprint

    lines = Database(db, must_exist=True).entries(kept=None)
    print(f"{db}: {len(lines)} entries ({sum(bool(ln['kept']) for ln in lines)} kept), every hash verified; "
          f"database fingerprint {database_fingerprint(lines)}\nrun the benchmark on it: pytest bench/ --db {db}")


@command("unpack", "verify every hash of a packed database, then unpack it into DB",
         lambda p: _fetch_args(p, "an archive written by `bd4nn pack`"))
def _unpack(args: argparse.Namespace) -> int:
    from bd4nn.pack import unpack

    _report_fetched(unpack(args.source, args.db, sha256=args.sha256, progress=True))
    return 0


@command("pull", "download a packed database (path, https:// URL or hf://OWNER/NAME[/FILE][@REV]), verify it, "
                 "unpack it into DB", lambda p: _fetch_args(p, "a local archive, an http(s):// URL, or a Hugging Face "
                                                             "Hub dataset repo hf://OWNER/NAME[/FILE][@REVISION]"))
def _pull(args: argparse.Namespace) -> int:
    from bd4nn.pack import pull

    _report_fetched(pull(args.source, args.db, sha256=args.sha256, progress=True))
    return 0


delegated("scan", "run localizers on your own model (safetensors; no label): flagged neurons per layer, "
                  "agreement, NC's verdict", "bd4nn.scan")


def _verify_args(p: argparse.ArgumentParser) -> None:
    _db_args(p)
    p.add_argument("--remeasure", type=number(int, 0), default=0, metavar="N",
                   help="also re-measure CA / ASR / ASR.Cor of N kept entries against their labels")
    p.add_argument("--tolerance", type=number(float, 0, high=1), help="allowed difference (default: "
                   "bd4nn.verify.TOLERANCE, 0.02, as in pytest bench/)")
    p.add_argument("--device", type=device_arg, default="auto")
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

        problems += remeasure(db, args.remeasure, tolerance=args.tolerance, device=args.device, data_root=args.data)
    return 1 if problems else 0


# ------------------------------------------------------------------------------- localize


def _localize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", required=True, type=Path, help="database folder")
    p.add_argument("--entry", required=True, help="entry id (`bd4nn list DB --entries`)")
    p.add_argument("--localizer", required=True, help="fp, nc, anp, clp, deepmufl, slicer, pfl, random, ...")
    p.add_argument("--set", dest="settings", action="append", type=setting, default=[], metavar="KEY=VALUE",
                   help="override a localizer setting (repeatable), e.g. --set steps=100")
    p.add_argument("--clean-images", type=number(int, 1), help="use only this many of the 5%% clean images")
    p.add_argument("--seed", type=number(int, 0), default=0)
    p.add_argument("--device", type=device_arg, default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if present)")
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
    print(f"{args.localizer} on {args.entry} ({ctx.label.attack}, {ctx.label.level}; "
          f"{len(ctx.clean_y)} clean images, {ctx.device})")
    print(tabulate([[layer, len(f), " ".join(map(str, found)), " ".join(map(str, f)), h]
                    for layer, found, f, h in res.by_layer(fault)],
                   headers=["layer", "k", "top-k localized", "fault", "hits"]))
    neurons, layers = res.outside_scope(fault)
    if layers:
        print(f"({neurons} fault neurons in {layers} layers outside {args.localizer}'s scope)")
    m, fmt = res.metrics(), (lambda v: "n/a" if v is None else f"{v:.4f}")
    print(f"\nWJI {m['wji']:.4f}   hits {m['hits']}/{m['n_fault']}   AUROC {fmt(m['auroc'])}   "
          f"AP {fmt(m['ap'])}   time {m['time_s']:.3f} s")
    return 0


# ---------------------------------------------------------------------------------- bench


QUICK_ENTRIES = "cifar10-vgg13-*-narrow-00"  # the first window of the smallest level, one architecture
QUICK_LOCALIZERS = "clp,fp,slicer"  # the three that answer in seconds on a CPU


def _bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help=f"a first answer in about a minute: build only {QUICK_ENTRIES} of the database and "
                        f"localize them with {QUICK_LOCALIZERS.replace(',', ', ')} (the full run then reuses them)")
    _ray_arg(p, "run the cases as Ray tasks on the cluster at ADDRESS (auto, HOST:PORT; default: a new local "
                "one), one GPU each where it has GPUs: every kind pytest bench/ runs (localization, repair, benign "
                "controls, database re-measurement), the same results file; without it, pytest -n N is the "
                "single-machine path")
    p.add_argument("pytest_args", nargs=argparse.REMAINDER,
                   help="arguments for pytest, e.g. -k clp -n 2 --db PATH --baseline FILE")


@command("bench", "ensure the database, run `pytest bench/`, write results, print Tables III-VI",
         _bench_args)
def _bench(args: argparse.Namespace) -> int:
    import subprocess

    from reports.cli import main as report_main

    root = Path(__file__).resolve().parent.parent
    if not (root / "bench" / "conftest.py").is_file():
        raise FileNotFoundError(f"{root / 'bench'}: the benchmark cases are not here; run bd4nn bench from "
                                "a checkout installed with `pip install -e .`")
    t0 = time.perf_counter()
    results_opt = argparse.ArgumentParser(add_help=False)
    results_opt.add_argument("--results", type=Path)
    extra = list(args.pytest_args)
    results = results_opt.parse_known_args(extra)[0].results
    if results is None:
        results = root / "results" / f"{time.strftime('%Y%m%d-%H%M%S')}{'-quick' if args.quick else ''}.jsonl"
        extra += ["--results", str(results)]
    if args.ray is not None:
        from bd4nn.cluster import ray_module

        ray_module()  # Ray is installed, or a one-line error naming the extra
        extra += ["--ray", args.ray]
    target = root / "bench"
    if args.quick:  # the localization cases only, on a few entries
        target = target / "test_localization.py"
        extra = ["--entries", QUICK_ENTRIES, "--localizers", QUICK_LOCALIZERS, *extra]
    cmd = [sys.executable, "-m", "pytest", str(target), "-p", "no:cacheprovider", "-q", *extra]
    print("bd4nn bench:", " ".join(cmd[2:]), flush=True)
    rc = subprocess.call(cmd, cwd=root)
    if results.is_file():
        print()
        report_main([str(results), "--tables", "III,IV" if args.quick else "III,IV,V,VI"])
        print(f"\nresults: {results}\nall tables: python -m reports {results} [--format md|latex|csv|html] [--out DIR]")
        if args.quick:
            print(f"first answer in {time.perf_counter() - t0:.0f} s; the whole main job (every localizer, entry "
                  "and repair; it reuses what this run built): bd4nn bench")
    return rc


delegated("compare", "compare two results files entry by entry: per localizer and level, B - A with a bootstrap "
                     "confidence interval and the Wilcoxon p (python -m reports.compare)", "reports.compare")


def _baseline_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["save", "diff"],
                   help="save: keep a results file as the baseline; diff: what changed between two files")
    p.add_argument("files", type=Path, nargs="+", metavar="FILE", help="save: RESULTS; diff: A B")
    p.add_argument("--out", type=Path, default=Path("bench/baselines/tiny.jsonl"),
                   help="save: the baseline file to write (default: bench/baselines/tiny.jsonl)")
    p.add_argument("--overwrite", action="store_true", help="save: replace an existing baseline file")
    p.add_argument("--partial", action="store_true", help="save: accept a run filtered with -k or with failures")


@command("baseline", "save a results file as the regression baseline, or diff two results files", _baseline_args)
def _baseline(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from bd4nn.errors import BadInputError
    from bd4nn.results import diff_results, save_baseline

    if len(args.files) != {"save": 1, "diff": 2}[args.action]:
        raise BadInputError(f"baseline {args.action} takes {'RESULTS' if args.action == 'save' else 'A B'}")
    if args.action == "diff":
        rows = diff_results(*args.files)
        print(tabulate(rows, headers=["case", "metric", "A", "B", "B - A"]) if rows else "no differences")
        return 0
    n = save_baseline(args.files[0], args.out, overwrite=args.overwrite, partial=args.partial)
    print(f"baseline {args.out}: {n} cases from {args.files[0]}")
    return 0


def _report_args(p: argparse.ArgumentParser) -> None:
    from reports.cli import add_arguments

    add_arguments(p)


@command("report", "print the paper's tables from a results file (same as `python -m reports`)", _report_args)
def _report(args: argparse.Namespace) -> int:
    from reports.cli import run

    return run(args)


# ----------------------------------------------------------------------------------- main


def _user_errors() -> tuple[type[BaseException], ...]:
    """What ``main`` reports in one line: ``bd4nn.errors.UserError`` (every bd4nn module's error
    type derives from it), the ``reports`` package's ``ResultsError`` (that package stays free of
    bd4nn and torch imports) and a missing file the user named. Anything else is a bug."""
    from bd4nn.errors import UserError
    from reports.results import ResultsError

    return (UserError, ResultsError, FileNotFoundError)


BUILD_THREADS_HELP = ("torch CPU threads per build process (default 1, so that the entries do not depend on the "
                      "core count; use --workers for more cores)")
PASS_THROUGH = ("bench", "report", "compare")  # commands without --threads (pytest's own option / no torch)


def build_parser() -> argparse.ArgumentParser:
    from bd4nn import __version__

    parser = Parser(
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
                           help=BUILD_THREADS_HELP if name == "build" else
                           "torch CPU threads (default: $BD4NN_THREADS, else every core)")
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # only `bench` passes arguments through (to pytest)
        if not hasattr(args, "pytest_args"):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.pytest_args = extra + list(args.pytest_args)
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
