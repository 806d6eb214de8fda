"""Tests of reports/html.py: the one-page HTML report (``python -m reports ... --format html``).

The page is checked as text, then opened in a real headless Chromium (Debian's ``chromium``;
.ci/run installs it): the rendered DOM must hold every table's caption and known cells, and a
screenshot must have the requested size and show text. Without a chromium binary the browser
tests skip. The results file is made with the helpers of tests/test_reports.py.
"""

from __future__ import annotations

import base64
import html
import os
import json
import shutil
import signal
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

import reports
from reports import html as html_report
from reports.cli import main
from test_reports import HEADER, REPAIR_LINES, WJI_LINES, case, directory, write

ROOT = Path(__file__).resolve().parents[1]
ODD = "<i>odd&name</i>"  # a localizer name that must be shown as text, never parsed as markup
LINES = WJI_LINES + REPAIR_LINES + [
    case(wji=0.25, localizer=ODD),
    case("database", ca=0.90, asr=0.98),                                # Table I 90.0, Table II 98.0
    directory(), directory(arch="resnet18", level="large", kept=1, rejected=4),  # counts total 4 / 9 = 44.4
]
# (table, row keys, column label, group, printed value), worked out in tests/test_reports.py
KNOWN = [("III", "CLP", "narrow", "VGG-13", "0.300"), ("III", "FP", "small", "VGG-13", "—"),
         ("V", ("CLP", "CAD"), "narrow", "VGG-13", "2.0"), ("V", ("CLP", "ASRD"), "narrow", "VGG-13", "80.0"),
         ("I", ("CIFAR-10", "VGG-13"), "narrow", None, "90.0"), ("counts", ("total", "", "", ""), "kept %", None, "44.4")]
WINDOW = (1200, 1600)


@pytest.fixture
def results_file(tmp_path) -> Path:
    return write(tmp_path, LINES, header={**HEADER, "run": "r<1>&2"})


def tables_and_results(path: Path):
    res = reports.load(path)
    return list(reports.build_tables(res).values()), res


def test_known_cells_are_what_the_tables_say(results_file):
    tables = {t.key: t for t in tables_and_results(results_file)[0]}
    for key, row, column, group, text in KNOWN:
        assert tables[key].cell(row, column, group).text() == text, (key, row, column)


def test_page_has_every_table_escaped_and_self_contained(results_file, monkeypatch):
    monkeypatch.setattr(reports.figures, "available", lambda: False)
    tables, res = tables_and_results(results_file)
    page, n_plots = html_report.build_report(res, tables, quiet=True)
    assert n_plots == 0 and page.startswith("<!DOCTYPE html>") and page.endswith("</html>\n")
    assert page.count("<section") == len(tables) + 1 and page.count("<h2>") == len(tables) + 1
    for t in tables:
        assert f"<h2>{html.escape(t.label)}</h2>" in page and html.escape(t.title) in page
    assert "Source: results.jsonl: run r&lt;1&gt;&amp;2, device cpu" in page
    assert "&lt;i&gt;odd&amp;name&lt;/i&gt;" in page and ODD not in page
    assert "<td>0.300</td>" in page and '<td class="na">—</td>' in page
    assert '<th colspan="3">VGG-13</th>' in page and '<th rowspan="2">method</th>' in page
    assert html.escape(html_report.NO_MATPLOTLIB) in page and "<img" not in page
    lowered = page.lower()
    assert "<script" not in lowered and "javascript:" not in lowered and "<link" not in lowered
    assert "http:" not in lowered and "https:" not in lowered and "url(" not in lowered and "src=" not in lowered


def test_plots_are_embedded_as_data_uris(results_file):
    pytest.importorskip("matplotlib")
    tables, res = tables_and_results(results_file)
    page, n_plots = html_report.build_report(res, tables)
    assert n_plots == 3 and page.count('<img src="data:image/png;base64,') == 3
    for name in ["wji.png", "prune_asrd_vs_cad.png", "finetune_asrd_vs_cad.png"]:
        assert f"<figcaption>{name}</figcaption>" in page
    first = page.split('src="data:image/png;base64,', 1)[1].split('"', 1)[0]
    assert base64.b64decode(first, validate=True)[:8] == b"\x89PNG\r\n\x1a\n"
    assert html_report.NO_MATPLOTLIB not in page and html_report.NO_PLOT_DATA not in page


def test_cli_html_writes_one_report_or_prints_it(results_file, tmp_path, capsys):
    out_dir = tmp_path / "report"
    assert main([str(results_file), "--format", "html", "--out", str(out_dir), "--no-plots", "--show-n"]) == 0
    out, err = capsys.readouterr()
    assert out == "" and [p.name for p in out_dir.iterdir()] == ["report.html"]
    assert f"wrote {out_dir / 'report.html'} ({len(reports.TABLE_KEYS)} tables and 0 plots in one page)" in err
    page = (out_dir / "report.html").read_text(encoding="utf-8")
    assert "<td>0.300 (2)</td>" in page and 'id="plots"' not in page
    assert main([str(results_file), "--format", "html", "--tables", "III", "--no-plots"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("<!DOCTYPE html>") and out.count("<section") == 1 and err == ""
    one = reports.render(reports.build_tables(reports.load(results_file))["counts"], "html")
    assert one.count("<section") == 1 and "Source: results.jsonl" in one and "ASR.Cor &gt; 0.5" in one


def test_cli_html_on_the_repository_baseline(tmp_path, capsys):
    assert main([str(ROOT / "bench" / "baselines" / "tiny.jsonl"), "--format", "html", "--out", str(tmp_path)]) == 0
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    lines = [json.loads(x) for x in (ROOT / "bench" / "baselines" / "tiny.jsonl").read_text().splitlines()]
    run = next(ln["run"] for ln in lines if ln["kind"] == "header")
    assert page.count("<section") == len(reports.TABLE_KEYS) + 1 and f"Source: tiny.jsonl: run {run}" in page
    clp = [ln["wji"] for ln in lines if ln["kind"] == "case" and ln["case"] == "localization" and ln["localizer"] == "clp"]
    assert f"<td>{sum(clp) / len(clp):.3f}</td>" in page  # CLP's mean WJI over every entry, Table III's last column


# ------------------------------------------------------------------------------ headless Chromium


@pytest.fixture(scope="module")
def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no chromium binary on PATH (chromium / chromium-browser): apt-get install chromium "
                "to run the HTML browser tests (.ci/run installs it)")


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    """report.html of ``LINES`` made by the command line (plots inline when matplotlib is there)."""
    tmp = tmp_path_factory.mktemp("html")
    path = write(tmp, LINES, header={**HEADER, "run": "r<1>&2"})
    assert main([str(path), "--format", "html", "--out", str(tmp / "out")]) == 0
    return tmp / "out" / "report.html"


def headless(browser: str, page: Path, *args: str, timeout: float = 120) -> str:
    """Run headless Chromium on ``page`` with ``args``; its stdout (stderr warnings ignored)."""
    profile = page.parent / f"chromium-profile-{os.getpid()}"
    cmd = [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--hide-scrollbars", "--no-first-run", f"--user-data-dir={profile}", *args, page.as_uri()]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the browser and its helpers
        proc.communicate()
        pytest.fail(f"chromium did not finish within {timeout:.0f} s: {' '.join(cmd)}")
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert proc.returncode == 0, f"chromium exited {proc.returncode}: {err[-2000:]}"
    return out


class Dom(HTMLParser):
    """The text of a rendered DOM: ``texts`` of headings and paragraphs, and ``tables``, each the
    cell texts of its body rows."""

    def __init__(self, text: str):
        super().__init__()
        self.texts: list[str] = []
        self.tables: list[list[list[str]]] = []
        self.open: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr" and "tbody" in self.open:
            self.tables[-1].append([])
        elif tag == "td" and "tbody" in self.open:
            self.tables[-1][-1].append("")
        self.open.append(tag)

    def handle_endtag(self, tag):
        if tag in self.open:
            del self.open[len(self.open) - 1 - self.open[::-1].index(tag):]

    def handle_data(self, data):
        if self.open and self.open[-1] == "td" and "tbody" in self.open:
            self.tables[-1][-1][-1] += data
        elif self.open and self.open[-1] in ("h1", "h2", "p", "figcaption"):
            self.texts.append(data.strip())


def test_chromium_dom_has_every_caption_and_known_cells(chromium, page):
    dom = Dom(headless(chromium, page, "--dump-dom"))
    tables = list(reports.build_tables(reports.load(page.parents[1] / "results.jsonl")).values())
    assert len(dom.tables) == len(tables)
    assert "Source: results.jsonl: run r<1>&2, device cpu, git abc1234, profile tiny" in dom.texts
    for t, rows in zip(tables, dom.tables):
        assert t.label in dom.texts and t.title in dom.texts
        if not t.rows:  # an empty table shows its note in one row
            assert rows == [[t.empty_note]], (t.key, rows)
            continue
        assert len(rows) == len(t.rows) and all(len(r) == len(t.key_headers) + len(t.columns) for r in rows)
    by_key = dict(zip((t.key for t in tables), zip(tables, dom.tables)))
    for key, row, column, group, text in KNOWN:
        t, rows = by_key[key]
        keys = (row,) if isinstance(row, str) else row
        i = next(i for i, r in enumerate(t.rows) if r.keys == keys)
        j = next(j for j, c in enumerate(t.columns) if c.label == column and c.group == group)
        assert rows[i][len(t.key_headers) + j] == text, (key, row, column, group)
    iii = by_key["III"][1]
    assert ["CLP", "0.300", "0.900", "0.500", "0.100", "—", "0.100", "0.400"] in iii
    assert [ODD, "0.250", "—", "0.250", "—", "—", "—", "0.250"] in iii  # shown as text, not markup
    v = by_key["V"][1]
    assert v[0][:3] == ["CLP", "CAD", "2.0"] and v[1][:3] == ["", "ASRD", "80.0"]  # repeated key blank
    assert by_key["counts"][1][-1] == ["total", "", "", "", "4", "5", "44.4"]


def test_chromium_screenshot_has_the_size_and_shows_text(chromium, page):
    np = pytest.importorskip("numpy")
    image = pytest.importorskip("PIL.Image")  # pillow: a dependency of bd4nn, unlike matplotlib
    shot = page.parent / "screenshot.png"
    headless(chromium, page, f"--screenshot={shot}", f"--window-size={WINDOW[0]},{WINDOW[1]}")
    assert shot.is_file() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with image.open(shot) as im:
        assert im.size == WINDOW
        grey = np.asarray(im.convert("L"), dtype=float)
    top = grey[:400]
    assert (top < 100).mean() > 0.003, "almost no dark (text) pixels in the top 400 rows"
    assert (grey > 240).mean() > 0.5, "the page background is not mostly white"
    assert grey.std() > 10 and (grey[:, :600] < 100).sum() > 1000, "the screenshot is near-uniform"
