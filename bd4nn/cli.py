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


# --------------------------------------------------------------------------------- models


def _models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("names", nargs="*", help="models to show (default: all registered)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--dataset", help="take the number of classes from this dataset (e.g. gtsrb)")
    g.add_argument("--num-classes", type=int, default=10, help="number of classes (default 10)")
    p.add_argument("--width", type=float, default=1.0, help="channel width multiplier (default 1.0)")
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
    p.add_argument("--fraction", type=float, default=0.05, help="defenders' clean split (default 0.05)")
    p.add_argument("--seed", type=int, default=0, help="seed of the clean split (default 0)")
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


@command("build", "build or resume the database of infected models for a profile", _build_args)
def _build(args: argparse.Namespace) -> int:
    from bd4nn.build import build, load_profile

    profile = load_profile(args.profile)
    stats = build(args.db, profile, datasets=args.datasets, archs=args.archs, attacks=args.attacks,
                  levels=args.levels, shard=args.shard, device=args.device, data_root=args.data)
    d = stats.to_dict()
    per = f"{d['mean_candidate_seconds']:.2f} s per candidate" if d["mean_candidate_seconds"] else "nothing new"
    print(f"{profile.name}: {stats.planned} planned, {stats.skipped} already built, {stats.built} built "
          f"({stats.kept} kept, {stats.rejected} rejected) in {stats.seconds:.1f} s; {per}")
    return 0


def _db_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("db", type=Path, help="database folder")


def _summary_rows(lines: list[dict], by_level: bool) -> list[list]:
    from statistics import mean

    groups: dict[tuple, list[dict]] = {}
    for line in lines:
        key = (line["dataset"], line["arch"], line["attack"]) + ((line["level"],) if by_level else ())
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

    lines = Database(args.db).entries(kept=None)
    if not lines:
        print(f"{args.db}: no entries")
        return 0
    print(tabulate(_summary_rows(lines, by_level=False),
                   headers=["dataset", "arch", "attack", "kept", "rejected", "CA %", "ASR %", "ASR.Cor"]))
    return 0


@command("info", "per directory and level: kept/rejected, mean CA / ASR / ASR.Cor, storage", _db_args)
def _info(args: argparse.Namespace) -> int:
    from statistics import mean

    from tabulate import tabulate

    from bd4nn.db import Database

    db = Database(args.db)
    lines = db.entries(kept=None)
    if not lines:
        print(f"{args.db}: no entries")
        return 0
    rows = _summary_rows(lines, by_level=True)
    ratio: dict[tuple, str] = {}
    for key in {tuple(r[:4]) for r in rows}:
        kept = [g for g in lines if g["kept"] and (g["dataset"], g["arch"], g["attack"], g["level"]) == key]
        if kept:
            ratio[key] = f"{100 * mean(g['bytes'] / g['full_bytes'] for g in kept):.2f}"
    for r in rows:
        r.append(ratio.get(tuple(r[:4]), ""))
    print(tabulate(rows, headers=["dataset", "arch", "attack", "level", "kept", "rejected", "CA %", "ASR %",
                                  "ASR.Cor", "size % of full"]))
    kept = [g for g in lines if g["kept"]]
    print(f"\n{len(kept)} kept of {len(lines)} candidates")
    return 0


def _verify_args(p: argparse.ArgumentParser) -> None:
    _db_args(p)
    p.add_argument("--remeasure", type=int, default=0, metavar="N",
                   help="also re-measure CA / ASR / ASR.Cor of N kept entries against their labels")
    p.add_argument("--tolerance", type=float, default=0.02, help="allowed difference (default 0.02)")
    p.add_argument("--device", default="auto")
    p.add_argument("--data", metavar="PATH", help="dataset archive folder (default: $BD4NN_DATA)")


@command("verify", "re-hash every file of a database; optionally re-measure entries", _verify_args)
def _verify(args: argparse.Namespace) -> int:
    from bd4nn.db import Database

    db = Database(args.db)
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


# ----------------------------------------------------------------------------------- main


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean the user asked for something wrong (no traceback)."""
    from bd4nn.neurons import SelectionError

    from bd4nn.data import DatasetError
    from bd4nn.db import DatabaseError

    return (SelectionError, FileNotFoundError, DatasetError, DatabaseError)


def build_parser() -> argparse.ArgumentParser:
    from bd4nn import __version__

    parser = argparse.ArgumentParser(
        prog="bd4nn",
        description="Benchmark of neuron-level backdoor-defect localization in CNNs.",
    )
    parser.add_argument("--version", action="version", version=f"bd4nn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("bd4nn: interrupted", file=sys.stderr)
        return 130
    except (KeyError, ValueError, *_user_errors()) as exc:
        if os.environ.get("BD4NN_DEBUG"):
            raise
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"bd4nn: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
