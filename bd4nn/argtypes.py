"""The argument types and the parser class of the ``bd4nn`` command line (``bd4nn.cli``) and the
benchmark scripts (``bench/options.py``): each ``type`` turns one command-line word into a value
or raises ``argparse.ArgumentTypeError`` with a message that names the problem."""

from __future__ import annotations

import argparse
import json
import math
import sys

__all__ = ["number", "shard", "setting", "device", "Parser"]


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


class Parser(argparse.ArgumentParser):
    """One line for a usage mistake (argparse prints the whole usage block by default)."""

    def error(self, message: str):  # type: ignore[override]
        print(f"{self.prog}: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


def shard(text: str) -> tuple[int, int]:
    """``I/N`` with ``0 <= I < N``: build every N-th candidate starting at I."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard takes I/N (e.g. 0/4), not {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise argparse.ArgumentTypeError(f"--shard I/N needs 0 <= I < N, got {text}")
    return i, n


def setting(text: str) -> tuple[str, object]:
    """``key=value`` with the value parsed as JSON when it parses (numbers, true/false, lists)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--set takes KEY=VALUE, not {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def device(text: str) -> str:
    """A device this machine has (``auto``, ``cpu``, ``cuda``, ``cuda:N``), checked when the command
    line is read, so ``--device cuda`` on a machine without a GPU stops before any data loads."""
    from bd4nn.errors import BadInputError
    from bd4nn.train import resolve_device

    try:
        resolve_device(text)
    except BadInputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text
