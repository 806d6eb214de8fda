"""Progress bars for humans and for logs: every bar in bd4nn is ``progress.bar(...)``, a tqdm.

On a terminal it is tqdm as usual. When stderr is not a terminal (CI, ``> log 2>&1``) a redrawn
bar would fill the log with carriage returns and escape codes, so the same tqdm is configured
with its own switches to print rarely (``mininterval``: every ``$BD4NN_PROGRESS_SECONDS``, default
30, and when a bar that stays is closed), without nested positions or dynamic width, in ASCII,
and its output goes through ``LineWriter``, which turns each redraw into one plain line. A log
reads like::

    build tiny:  50%|#####     | 12/24 [01:02<01:02,  5.17s/cand, kept=11, rejected=1]
    build tiny: 100%|##########| 24/24 [02:04<00:00,  5.17s/cand, kept=23, rejected=1]
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any, TextIO

from tqdm.auto import tqdm

__all__ = ["bar", "LineWriter", "interactive", "SECONDS_ENV"]

SECONDS_ENV = "BD4NN_PROGRESS_SECONDS"
_CONTROL = re.compile(r"\r|\x1b\[[0-9;]*[A-Za-z]")  # carriage returns and ANSI cursor moves


def interactive(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default stderr) is a terminal."""
    stream = stream if stream is not None else sys.stderr
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class LineWriter:
    """A file for tqdm that writes each status it draws as one line: the carriage return that
    starts a redraw, the cursor moves of nested bars and the blanks that pad a redraw are
    dropped, and what is left empty is not written."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        line = _CONTROL.sub("", text).rstrip()
        if line:
            self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def _seconds() -> float:
    raw = os.environ.get(SECONDS_ENV, "").strip()
    try:
        return max(0.0, float(raw)) if raw else 30.0
    except ValueError:
        return 30.0


def bar(*args: Any, **kwargs: Any) -> tqdm:
    """``tqdm(*args, **kwargs)``, plain lines when stderr is not a terminal (module docstring)."""
    stream = kwargs.get("file") or sys.stderr
    if not interactive(stream):
        kwargs.update(file=LineWriter(stream), mininterval=_seconds(), dynamic_ncols=False, ncols=100,
                      ascii=True, position=None)
    return tqdm(*args, **kwargs)
