"""Command line: ``python -m reports RESULTS... [--format md|latex|csv|html] [--out DIR] ...``.

``add_arguments(parser)`` and ``run(args)`` are the pair ``bd4nn report`` registers; ``main`` is
the standalone entry point. A results file that is missing, empty or corrupt is one
``reports: error: FILE:LINE: ...`` line on stderr and exit status 2.

``--format html`` makes one self-contained page (``reports.html``): tables, sources and plots
inline; printed, or with ``--out DIR`` written to ``DIR/report.html`` (and nothing else).

Statistics (``reports.stats``): ``--ci`` adds a seeded 95 % bootstrap confidence interval to
every mean of Tables III, V and VI ("0.470 [0.410, 0.530]"; csv: "<column> lo" and
"<column> hi" columns), ``--seed`` and ``--resamples`` set its seed (0) and resamples (10,000);
``--pairs`` appends the "Paired tests" table (Wilcoxon signed-rank test of every pair of
localizers on WJI; ``DIR/pairs.<ext>`` with ``--out``). Without them the output is unchanged.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import html as html_report
from .figures import plots
from .formats import FORMATS, render, write_tables
from .results import ResultsError, load
from .stats import RESAMPLES, SEED, add_ci, pairs_table  # scipy is imported only when they run
from .tables import TABLE_KEYS, build_tables

__all__ = ["add_arguments", "run", "main", "parse_tables"]

DESCRIPTION = """\
Print the paper's tables from bd4nn results files (JSON Lines written by `bd4nn bench`):
I clean accuracy and II attack success rate of the entries, III WJI and IV time of each
localizer, V pruning and VI fine-tuning repair (CAD, ASRD), and the database counts.
Cells are means over cases (skipped cases and null metrics excluded); "—" means no data."""

EPILOG = """\
examples:
  python -m reports results.jsonl
  python -m reports run1.jsonl run2.jsonl --tables III,IV --format latex
  python -m reports results.jsonl --out report/ --format csv      # files + PNG plots
  python -m reports results.jsonl --out report/ --format html     # one report.html
  python -m reports results.jsonl --tables III,V --ci --pairs     # 95 % CIs and paired tests
With --format html, every table, the sources and the plots (embedded) go into one self-contained
page, report/report.html (no JavaScript, no external files), or to stdout without --out."""


def parse_tables(text: str) -> list[str]:
    """``"I,iii,counts"`` -> ``["I", "III", "counts"]`` (``all`` = every table), in paper order;
    ``detection`` and ``counts`` by name."""
    wanted = set()
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if part.lower() == "all":
            wanted.update(TABLE_KEYS)
            continue
        key = part.lower() if part.lower() in ("counts", "detection") else part.upper()
        if key not in TABLE_KEYS:
            raise argparse.ArgumentTypeError(f"unknown table {part!r} (choose from {', '.join(TABLE_KEYS)}, all)")
        wanted.add(key)
    if not wanted:
        raise argparse.ArgumentTypeError("--tables needs at least one table name")
    return [k for k in TABLE_KEYS if k in wanted]


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _names(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", nargs="+", type=Path, metavar="RESULTS",
                   help="results files (JSON Lines); several are concatenated")
    p.add_argument("--format", choices=list(FORMATS), default="md",
                   help="md (GitHub pipe tables, default), latex (booktabs), csv (unrounded values) "
                        "or html (one self-contained page, plots embedded)")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="also write each table to DIR/table3.md (.tex, .csv), counts.md, and PNG plots; "
                        "with --format html, write only DIR/report.html instead of printing it")
    p.add_argument("--tables", type=parse_tables, default=list(TABLE_KEYS), metavar="LIST",
                   help="comma-separated tables to show: I,II,III,IV,V,VI,counts or all (default: all)")
    p.add_argument("--plots", action=argparse.BooleanOptionalAction, default=None,
                   help="write PNG plots to --out DIR (default: on with --out; needs matplotlib); "
                        "with --format html, embed them in the page (default: on)")
    p.add_argument("--dataset", type=_names, action="extend", metavar="NAME[,NAME]",
                   help="only these datasets (repeatable)")
    p.add_argument("--attack", type=_names, action="extend", metavar="NAME[,NAME]",
                   help="only these attacks (repeatable)")
    p.add_argument("--show-n", action="store_true", help="show each cell's number of cases")
    p.add_argument("--ci", action="store_true",
                   help="add a 95%% bootstrap confidence interval (percentile, over entries) to every mean of "
                        "Tables III, V and VI: '0.470 [0.410, 0.530]'; csv: '<column> lo', '<column> hi' columns")
    p.add_argument("--pairs", action="store_true",
                   help="append the paired-tests table: for every pair of localizers, the Wilcoxon signed-rank "
                        "test of their WJI on the same entries (n, median difference, W, p, Holm-adjusted p)")
    p.add_argument("--seed", type=int, default=SEED, help=f"seed of the --ci bootstrap (default {SEED})")
    p.add_argument("--resamples", type=_positive, default=RESAMPLES, metavar="N",
                   help=f"resamples of the --ci bootstrap (default {RESAMPLES})")


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, not {text!r}")
    return n


def _filtered(results, name: str, wanted: list[str] | None):
    if not wanted:
        return results
    have = results.values(name)
    missing = [w for w in wanted if w not in have]
    if missing:
        raise ResultsError(f"no results for {name} {', '.join(missing)} "
                           f"(the results have: {', '.join(sorted(have)) or 'none'})")
    return results.filter(**{name: wanted})


def run(args: argparse.Namespace) -> int:
    """Load, filter, print the selected tables; with ``--out`` write them and the plots."""
    if args.plots and args.out is None and args.format != "html":
        raise ResultsError("--plots needs --out DIR (the folder the PNG files go to)")
    results = load(args.results)
    results = _filtered(results, "dataset", args.dataset)
    results = _filtered(results, "attack", args.attack)
    tables = build_tables(results)
    chosen = [tables[k] for k in args.tables]
    if getattr(args, "ci", False):
        add_ci(chosen, seed=getattr(args, "seed", SEED), resamples=getattr(args, "resamples", RESAMPLES))
    if getattr(args, "pairs", False):
        chosen.append(pairs_table(results))

    fmt = args.format
    if fmt == "html":
        return _run_html(args, results, chosen)
    bare_csv = fmt == "csv" and len(chosen) == 1
    comment = {"md": "", "latex": "% ", "csv": "# "}[fmt]
    if not bare_csv:
        for line in results.provenance():
            print(f"{comment}Source: {line}")
        if results.headers:
            print()
    for i, table in enumerate(chosen):
        if i:
            print()
        if fmt == "csv" and not bare_csv:
            print(f"# {table.label}: {table.title}")
        print(render(table, fmt, provenance=False, show_n=args.show_n), end="")

    if args.out is not None:
        written = write_tables(chosen, args.out, fmt, show_n=args.show_n)
        n_tables = len(written)
        if args.plots is not False:
            written += plots(results, args.out)
        n_plots = len(written) - n_tables
        print(f"reports: wrote {_plural(n_tables, 'table')} and {_plural(n_plots, 'plot')} to {args.out}",
              file=sys.stderr)
    return 0


def _run_html(args: argparse.Namespace, results, chosen) -> int:
    """``--format html``: the one page, on stdout or as ``--out DIR/report.html``."""
    want_plots = args.plots is not False
    if args.out is None:
        page, _ = html_report.build_report(results, chosen, plots=want_plots, show_n=args.show_n)
        sys.stdout.write(page)
        return 0
    path, n_plots = html_report.write_report(results, chosen, args.out, plots=want_plots, show_n=args.show_n)
    print(f"reports: wrote {path} ({_plural(len(chosen), 'table')} and {_plural(n_plots, 'plot')} in one page)",
          file=sys.stderr)
    return 0


def standalone(prog: str, description: str, epilog: str, add_args, run_args, argv: list[str] | None) -> int:
    """A ``python -m`` entry point: parse ``argv`` with ``add_args``, call ``run_args``, and report a
    results error in one line (exit status 2; a traceback with ``BD4NN_DEBUG=1``)."""
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(parser)
    args = parser.parse_args(argv)
    try:
        return run_args(args)
    except (ValueError, OSError) as exc:  # ResultsError is a ValueError
        if os.environ.get("BD4NN_DEBUG"):
            raise
        print(f"{prog.split()[-1]}: error: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    return standalone("python -m reports", DESCRIPTION, EPILOG, add_arguments, run, argv)
