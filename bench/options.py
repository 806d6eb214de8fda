"""Options every benchmark script shares: torch threads (set once, as the CLI does) and the
dataset folder. One home, so the scripts validate and document them the same way."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from bd4nn.argtypes import number
from bd4nn.runtime import set_threads


def add_machine_options(p: argparse.ArgumentParser, *, data_help: str = "dataset archive folder "
                        "(default: $BD4NN_DATA)") -> None:
    """``--data`` and ``--threads`` (a whole number >= 1; default $BD4NN_THREADS, else every core)."""
    p.add_argument("--data", help=data_help)
    p.add_argument("--threads", type=number(int, 1), default=None,
                   help="torch threads (default: $BD4NN_THREADS, else every core)")


def parse(p: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv`` and set this process's torch threads from ``--threads``."""
    args = p.parse_args(argv)
    set_threads(args.threads)
    return args
