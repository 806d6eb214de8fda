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


# ----------------------------------------------------------------------------------- main


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean the user asked for something wrong (no traceback)."""
    from bd4nn.neurons import SelectionError

    errors: list[type[BaseException]] = [SelectionError, FileNotFoundError]
    try:
        from bd4nn.data import DatasetError

        errors.append(DatasetError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


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
