"""Rendering a ``Table`` as Markdown (pipe table), LaTeX (booktabs), CSV or HTML, and writing files.

- ``md``: a bold title line, a GitHub pipe table (tabulate), the sources as an italic line.
- ``latex``: a ``table`` float with ``\\caption``, ``\\label{tab:bd4nn-<key>}`` and a booktabs
  ``tabular`` whose grouped columns get ``\\multicolumn`` headers; ``_ % & # $ { } ~ ^ \\`` are
  escaped (and ``< >``); an empty cell is ``---``; the sources follow as ``%`` comments.
- ``csv``: a header row and one row per table row, nothing else; values unrounded (15
  significant digits, which drops float noise such as 0.30000000000000004) in the printed
  unit (percent for CA/ASR/CAD/ASRD), an empty cell is an empty field; grouped column names are
  "<group> <label>" (e.g. "VGG-13 narrow").
- ``html``: a self-contained HTML page holding the table (see ``reports.html``, which also
  puts every table and the plots into one page, ``report.html``); sources as "Source:" lines.

In md, latex and html a row key equal to the one above is left blank, so groups read as blocks.
``show_n=True`` adds each cell's n: "0.300 (2)" in md/latex/html, an "<column> n" column in csv.

Confidence intervals (``reports.stats.add_ci``, ``python -m reports --ci``): a cell that has one
prints it after its value, "0.470 [0.410, 0.530]" (then " (n)" with ``show_n``) in md, latex
and html; in csv every column flagged ``Column.ci`` is followed by "<column> lo" and
"<column> hi" columns (unrounded, printed unit; empty where the cell has no interval), before
its "<column> n" column. A table's ``notes`` follow it in md (an italic paragraph each), latex
(footnote-size paragraphs inside the float) and html; csv stays the bare table.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from pathlib import Path

from .tables import EMPTY, Table

__all__ = ["FORMATS", "render", "write_tables", "latex_escape"]

FORMATS = {"md": "md", "latex": "tex", "csv": "csv", "html": "html"}  # format -> file extension

_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
    "<": r"\textless{}", ">": r"\textgreater{}",
}


def latex_escape(text: str) -> str:
    """``text`` with LaTeX's special characters escaped (and "—" as ``---``)."""
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text).replace(EMPTY, "---")


def _key_rows(table: Table) -> list[list[str]]:
    """Row keys with a key blanked when it and all keys before it repeat the row above."""
    out, prev = [], None
    for row in table.rows:
        keys = list(row.keys)
        if prev is not None:
            for i in range(len(keys) - 1):
                if keys[i] != prev[i]:
                    break
                keys[i] = ""
        out.append(keys)
        prev = row.keys
    return out


def _cell_text(c, show_n: bool) -> str:
    """"0.470", "0.470 [0.410, 0.530]", "0.470 [0.410, 0.530] (12)", "0.470 (12)" or "—"."""
    text = c.text()
    if c.value is None:
        return text
    ci = c.ci_text()
    return text + (f" {ci}" if ci else "") + (f" ({c.n})" if show_n else "")


def _cell_texts(table: Table, show_n: bool) -> list[list[str]]:
    return [[_cell_text(c, show_n) for c in row.cells] for row in table.rows]


def _md(table: Table, provenance: bool, show_n: bool) -> str:
    from tabulate import tabulate

    lines = [f"**{table.label}.** {table.title}", ""]
    if table.rows:
        headers = table.key_headers + [c.name for c in table.columns]
        body = [k + v for k, v in zip(_key_rows(table), _cell_texts(table, show_n))]
        align = ("left",) * len(table.key_headers) + ("right",) * len(table.columns)
        lines.append(tabulate(body, headers=headers, tablefmt="pipe", colalign=align, disable_numparse=True))
    else:
        lines.append(f"_{table.empty_note}_")
    if table.notes:
        for note in table.notes:
            lines += ["", f"_{note}_"]
    if provenance and table.sources:
        lines += ["", "_Source: " + "; ".join(table.sources) + "_"]
    return "\n".join(lines) + "\n"


def _latex(table: Table, provenance: bool, show_n: bool) -> str:
    nk, cols = len(table.key_headers), table.columns
    spec = "l" * nk
    groups: list[tuple[str | None, int]] = []  # runs of equal group: (group, width)
    for c in cols:
        if groups and groups[-1][0] == c.group:
            groups[-1] = (c.group, groups[-1][1] + 1)
        else:
            groups.append((c.group, 1))
    spec += "".join(" " + "r" * width for _, width in groups)
    lines = [r"\begin{table}[t]", r"\centering",
             rf"\caption{{{latex_escape(table.title)}}}", rf"\label{{tab:bd4nn-{table.key.lower()}}}",
             rf"\begin{{tabular}}{{{spec}}}", r"\toprule"]
    if any(g is not None for g, _ in groups):
        heads, rules, start = [""] * nk, [], nk + 1
        for g, width in groups:
            if g is None:
                heads += [""] * width
            else:
                heads.append(rf"\multicolumn{{{width}}}{{c}}{{{latex_escape(g)}}}")
                rules.append(rf"\cmidrule(lr){{{start}-{start + width - 1}}}")
            start += width
        lines += [" & ".join(heads) + r" \\", " ".join(rules)]
    lines += [" & ".join(latex_escape(h) for h in table.key_headers + [c.label for c in cols]) + r" \\",
              r"\midrule"]
    if table.rows:
        for keys, vals in zip(_key_rows(table), _cell_texts(table, show_n)):
            lines.append(" & ".join(latex_escape(x) for x in keys + vals) + r" \\")
    else:
        lines.append(rf"\multicolumn{{{nk + len(cols)}}}{{c}}{{{latex_escape(table.empty_note)}}} \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    if table.notes:
        notes = "".join(latex_escape(n) + r"\par " for n in table.notes).rstrip()
        lines += [r"\par\smallskip", r"{\footnotesize " + notes + "}"]
    lines.append(r"\end{table}")
    if provenance:
        lines += [f"% source: {s}" for s in table.sources]
    return "\n".join(lines) + "\n"


def _csv(table: Table, show_n: bool) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    header = list(table.key_headers)
    for c in table.columns:
        header += [c.name] + ([f"{c.name} lo", f"{c.name} hi"] if c.ci else [])
        header += [f"{c.name} n"] if show_n else []
    w.writerow(header)

    def number(x: float | None, kind: str) -> str:
        return "" if x is None else str(round(x)) if kind == "int" else format(x, ".15g")

    for row in table.rows:
        out = list(row.keys)
        for col, c in zip(table.columns, row.cells):
            out.append(number(c.number, c.kind))
            if col.ci:
                b = c.bounds
                out += ["", ""] if b is None else [number(b[0], c.kind), number(b[1], c.kind)]
            if show_n:
                out.append(str(c.n))
        w.writerow(out)
    return buf.getvalue()


def render(table: Table, fmt: str = "md", *, provenance: bool = True, show_n: bool = False) -> str:
    """``table`` as text in ``fmt`` ("md", "latex", "csv" or "html"); ``provenance`` adds the
    sources (md, latex and html; csv is the bare table)."""
    if fmt == "md":
        return _md(table, provenance, show_n)
    if fmt == "latex":
        return _latex(table, provenance, show_n)
    if fmt == "csv":
        return _csv(table, show_n)
    if fmt == "html":
        from .html import report  # reports.html imports this module

        return report([table], provenance=table.sources if provenance else (),
                      title=f"{table.label}: bd4nn results", show_n=show_n)
    raise ValueError(f"unknown table format {fmt!r} (choose from {', '.join(FORMATS)})")


def write_tables(tables: Iterable[Table], out_dir: str | Path, fmt: str = "md", *,
                 show_n: bool = False) -> list[Path]:
    """Write each table to ``out_dir/<table3|counts>.<md|tex|csv|html>``; returns the paths."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown table format {fmt!r} (choose from {', '.join(FORMATS)})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for table in tables:
        path = out / f"{table.file_stem}.{FORMATS[fmt]}"
        path.write_text(render(table, fmt, show_n=show_n), encoding="utf-8")
        paths.append(path)
    return paths
