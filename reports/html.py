"""One self-contained HTML page: the tables, their sources and the PNG plots inline.

- ``report(tables, provenance=..., images=..., plots_note=...)``: the page as text; one
  ``<section>`` per table (an ``<h2>`` with its label, its title as caption, the ``<table>``),
  then a "Plots" section with each PNG embedded as a base64 ``data:`` URI.
- ``build_report(results, tables)``: the same with the plots of ``results`` drawn by
  ``reports.figures`` (when matplotlib is installed; otherwise the page says plots need it).
- ``write_report(results, tables, out_dir)``: writes ``out_dir/report.html``.

Cells and row keys are those of the other formats (``formats._cell_texts``, ``_key_rows``:
confidence intervals included when the cells have them); a table's notes follow it;
grouped columns get a header cell spanning their group. Inline CSS only: no JavaScript and no
external URL (a Content-Security-Policy says so to the browser too). Every text is escaped
with ``html.escape``.
"""

from __future__ import annotations

import base64
import sys
import tempfile
from collections.abc import Iterable, Sequence
from html import escape
from pathlib import Path

from . import figures
from .formats import _cell_texts, _key_rows
from .results import Results
from .tables import EMPTY, Table

__all__ = ["REPORT_NAME", "report", "table_section", "plot_images", "build_report", "write_report"]

REPORT_NAME = "report.html"
TITLE = "bd4nn results"
NO_MATPLOTLIB = "Plots need matplotlib, which is not installed (pip install 'bd4nn[plots]')."
NO_PLOT_DATA = "No plots: the results have no localization WJI and no repair CAD/ASRD values."

_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

_CSS = """\
body { font-family: "DejaVu Sans", Helvetica, Arial, sans-serif; color: #1a1a1a; background: #fff;
       margin: 1.5em auto; max-width: 1150px; padding: 0 1em; line-height: 1.4; }
h1 { font-size: 1.6em; margin: 0 0 .3em; }
h2 { font-size: 1.25em; margin: 1.6em 0 .4em; border-bottom: 1px solid #ccc; padding-bottom: .15em; }
p.source { margin: .1em 0; color: #333; font-size: .92em; }
table { border-collapse: collapse; margin: .3em 0; font-size: .92em; }
p.caption { margin: 0 0 .5em; color: #222; }
th, td { border: 1px solid #bbb; padding: .25em .6em; }
th { background: #eceff3; font-weight: 600; text-align: center; }
td { text-align: right; font-variant-numeric: tabular-nums; }
td.key { text-align: left; }
td.na { color: #888; }
td.note { text-align: center; font-style: italic; color: #555; }
tbody tr:nth-child(even) { background: #f7f8fa; }
figure { margin: 1em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figcaption { font-size: .9em; color: #444; }
p.note { font-style: italic; color: #555; }
"""


def _groups(table: Table) -> list[tuple[str | None, int]]:
    """Runs of equal ``group`` over the value columns: (group, width)."""
    runs: list[tuple[str | None, int]] = []
    for c in table.columns:
        if runs and runs[-1][0] == c.group:
            runs[-1] = (c.group, runs[-1][1] + 1)
        else:
            runs.append((c.group, 1))
    return runs


def _head(table: Table) -> list[str]:
    """The ``<thead>`` rows: one, or two when columns are grouped (group cells span their run)."""
    runs = _groups(table)
    if not any(g is not None for g, _ in runs):
        cells = [f"<th>{escape(h)}</th>" for h in table.key_headers + [c.label for c in table.columns]]
        return ["<tr>" + "".join(cells) + "</tr>"]
    top = [f'<th rowspan="2">{escape(h)}</th>' for h in table.key_headers]
    bottom, j = [], 0
    for group, width in runs:
        cols = table.columns[j:j + width]
        j += width
        if group is None:
            top += [f'<th rowspan="2">{escape(c.label)}</th>' for c in cols]
        else:
            top.append(f'<th colspan="{width}">{escape(group)}</th>')
            bottom += [f"<th>{escape(c.label)}</th>" for c in cols]
    return ["<tr>" + "".join(top) + "</tr>", "<tr>" + "".join(bottom) + "</tr>"]


def table_section(table: Table, *, show_n: bool = False) -> str:
    """``table`` as a ``<section>``: ``<h2>`` label, its title as a caption paragraph (not a
    ``<caption>``, which would wrap to the table's width), then the table."""
    stem = escape(table.file_stem)
    lines = [f'<section id="{stem}">', f"<h2>{escape(table.label)}</h2>",
             f'<p class="caption" id="{stem}-caption">{escape(table.title)}</p>',
             f'<table aria-describedby="{stem}-caption">', "<thead>", *_head(table), "</thead>", "<tbody>"]
    if table.rows:
        for keys, vals in zip(_key_rows(table), _cell_texts(table, show_n)):
            cells = [f'<td class="key">{escape(k)}</td>' for k in keys]
            cells += [f'<td class="na">{escape(v)}</td>' if v == EMPTY else f"<td>{escape(v)}</td>" for v in vals]
            lines.append("<tr>" + "".join(cells) + "</tr>")
    else:
        width = len(table.key_headers) + len(table.columns)
        lines.append(f'<tr><td class="note" colspan="{width}">{escape(table.empty_note)}</td></tr>')
    lines += ["</tbody>", "</table>"]
    lines += [f'<p class="note">{escape(note)}</p>' for note in table.notes]
    lines.append("</section>")
    return "\n".join(lines)


def _plots_section(images: Sequence[tuple[str, bytes]], note: str | None) -> str:
    lines = ['<section id="plots">', "<h2>Plots</h2>"]
    if note:
        lines.append(f'<p class="note">{escape(note)}</p>')
    for name, png in images:
        uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        lines += ["<figure>", f'<img src="{escape(uri)}" alt="{escape(name)}">',
                  f"<figcaption>{escape(name)}</figcaption>", "</figure>"]
    lines.append("</section>")
    return "\n".join(lines)


def report(tables: Iterable[Table], *, provenance: Iterable[str] = (), title: str = TITLE,
           images: Sequence[tuple[str, bytes]] | None = None, plots_note: str | None = None,
           show_n: bool = False) -> str:
    """A whole HTML document: ``title``, a "Source: ..." line per ``provenance`` line, a section
    per table, and a "Plots" section with ``images`` ((file name, PNG bytes) pairs) and/or
    ``plots_note`` (no plots section when both are empty)."""
    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             f'<meta http-equiv="Content-Security-Policy" content="{escape(_CSP)}">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{escape(title)}</title>", "<style>", _CSS, "</style>", "</head>", "<body>",
             "<header>", f"<h1>{escape(title)}</h1>"]
    parts += [f'<p class="source">Source: {escape(line)}</p>' for line in provenance]
    parts += ["</header>", "<main>"]
    parts += [table_section(t, show_n=show_n) for t in tables]
    if images or plots_note:
        parts.append(_plots_section(images or [], plots_note))
    parts += ["</main>", "</body>", "</html>"]
    return "\n".join(parts) + "\n"


def plot_images(results: Results, *, quiet: bool = False) -> list[tuple[str, bytes]] | None:
    """The PNG plots of ``results`` as (file name, bytes), drawn in a temporary folder; None
    without matplotlib (after printing ``figures.NOTICE`` to stderr unless ``quiet``)."""
    if not figures.available():
        if not quiet:
            print(figures.NOTICE, file=sys.stderr)
        return None
    with tempfile.TemporaryDirectory(prefix="bd4nn-plots-") as tmp:
        return [(p.name, p.read_bytes()) for p in figures.plots(results, tmp, quiet=True)]


def build_report(results: Results, tables: Iterable[Table], *, plots: bool = True, show_n: bool = False,
                 quiet: bool = False) -> tuple[str, int]:
    """The page for ``tables`` with the sources of ``results`` and (if ``plots``) its plots
    inline; returns (page, number of plots embedded)."""
    images: list[tuple[str, bytes]] = []
    note = None
    if plots:
        found = plot_images(results, quiet=quiet)
        images = found or []
        note = NO_MATPLOTLIB if found is None else None if found else NO_PLOT_DATA
    page = report(tables, provenance=results.provenance(), images=images, plots_note=note, show_n=show_n)
    return page, len(images)


def write_report(results: Results, tables: Iterable[Table], out_dir: str | Path, *, plots: bool = True,
                 show_n: bool = False, quiet: bool = False) -> tuple[Path, int]:
    """Write ``out_dir/report.html`` (see ``build_report``); returns (its path, plots embedded)."""
    page, n_plots = build_report(results, tables, plots=plots, show_n=show_n, quiet=quiet)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / REPORT_NAME
    path.write_text(page, encoding="utf-8")
    return path, n_plots
