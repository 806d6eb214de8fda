"""Paper-style tables from results files (see issue 5).

Reads the JSON Lines results files that ``bd4nn bench`` writes, and nothing else: the standard
library, ``tabulate`` and, for the statistics (``--ci``, ``--pairs``, the detection AUROC,
``reports.compare``), ``scipy`` and ``numpy`` (matplotlib, optional, for the plots).

    results = reports.load(["results.jsonl"])          # Results; ResultsError on a bad file
    tables = reports.build_tables(results)              # {"I": Table, ..., "VI", "detection", "counts"}
    print(reports.render(tables["III"], "md"))          # "md" | "latex" | "csv" | "html"
    reports.write_tables(tables.values(), "out", "md")  # out/table1.md ... out/counts.md
    reports.plots(results, "out")                       # [Path] of PNGs; [] without matplotlib

Command line: ``python -m reports RESULTS... [--format md|latex|csv|html] [--out DIR] [--tables ...]
[--ci] [--pairs]``; ``python -m reports.compare A B``.
"""

from .figures import plots
from .formats import FORMATS, render, write_tables
from .results import Case, Directory, Header, Results, ResultsError, load
from .tables import TABLE_KEYS, Cell, Column, Row, Table, build_tables

__all__ = [
    "load", "Results", "ResultsError", "Header", "Directory", "Case",
    "build_tables", "Table", "Row", "Column", "Cell", "TABLE_KEYS",
    "render", "write_tables", "FORMATS", "plots",
]
