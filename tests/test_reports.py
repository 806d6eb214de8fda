"""Tests of reports/: results files -> tables (md, latex, csv) and plots.

Every results file here is written by hand with chosen numbers; each expected cell is the mean
worked out in a comment next to it. No torch: reports/ reads results files only.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

import reports
from reports.cli import main
from reports.tables import TABLE_KEYS, Cell

ROOT = Path(__file__).resolve().parents[1]

HEADER = {"kind": "header", "schema": 1, "run": "20261123-130501", "created": "2026-11-23T13:05:01",
          "git": "abc1234", "torch": "2.4.1", "cuda": None, "device": "cpu", "python": "3.11.7",
          "profile": "tiny", "db": "db", "options": {}, "workers": 2}


def case(kind: str = "localization", **kw) -> dict:
    """A case line on cifar10 / vgg13 / badnets / narrow unless overridden."""
    entry = kw.pop("entry", "cifar10-vgg13-badnets-narrow-00")
    line = {"kind": "case", "case": kind, "nodeid": f"bench/test_{kind}.py::x", "outcome": "passed",
            "entry": entry, "dataset": "cifar10", "arch": "vgg13", "attack": "badnets", "level": "narrow",
            "candidate": 0, "localizer": "clp" if kind != "database" else None, "repair": None}
    line.update(kw)
    return line


def directory(**kw) -> dict:
    line = {"kind": "directory", "dataset": "cifar10", "arch": "vgg13", "attack": "badnets", "level": "narrow",
            "kept": 3, "rejected": 1, "benign_ca": 0.93, "mean_ca": 0.9, "mean_asr": 0.99, "mean_asr_cor": 0.8}
    line.update(kw)
    return line


def write(tmp_path: Path, lines: list[dict], name: str = "results.jsonl", header: dict | None = HEADER) -> Path:
    path = tmp_path / name
    body = ([header] if header else []) + lines
    path.write_text("".join(json.dumps(x) + "\n" for x in body))
    return path


def tables_of(tmp_path: Path, lines: list[dict]) -> dict[str, reports.Table]:
    return reports.build_tables(reports.load(write(tmp_path, lines)))


def md_row(text: str, first: str) -> list[str]:
    """The cells of the md table row whose first cell is ``first``."""
    for line in text.splitlines():
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == first:
            return cells
    raise AssertionError(f"no row {first!r} in\n{text}")


# ------------------------------------------------------------------------------ Table III (WJI)

WJI_LINES = [
    case(wji=0.2), case(wji=0.4),                       # CLP VGG-13 narrow: (0.2 + 0.4) / 2 = 0.300
    case(wji=0.9, outcome="skipped"),                   # skipped: not counted
    case(wji=None), case(),                             # null / missing: not counted
    case(wji=0.9, level="small"),                       # CLP VGG-13 small 0.900; VGG-13 mean (.2+.4+.9)/3 = 0.500
    case(wji=0.1, arch="resnet18"),                     # CLP overall mean (.2+.4+.9+.1)/4 = 0.400
    case(wji=0.7, localizer="fp"),                      # FP: narrow only, small is empty
    case(wji=0.05, localizer="random"), case(wji=1.0, localizer="pfl"), case(wji=0.6, localizer="zeta"),
    case("repair", wji=0.99, repair="prune"),           # repair case: not in Table III
]


def test_wji_cells_are_means_over_counted_cases(tmp_path):
    t = tables_of(tmp_path, WJI_LINES)["III"]
    assert t.cell("CLP", "narrow", "VGG-13") == Cell(pytest.approx(0.3), 2, "fixed3")
    assert t.cell("CLP", "narrow", "VGG-13").text() == "0.300"
    assert t.cell("CLP", "small", "VGG-13").text() == "0.900"
    assert t.cell("CLP", "mean", "VGG-13").text() == "0.500"
    assert t.cell("CLP", "narrow", "ResNet-18").text() == "0.100"
    assert t.cell("CLP", "mean").n == 4 and t.cell("CLP", "mean").text() == "0.400"
    md = reports.render(t, "md")
    # method | VGG-13 narrow, small, mean | ResNet-18 narrow, small, mean | mean
    assert md_row(md, "CLP") == ["CLP", "0.300", "0.900", "0.500", "0.100", "—", "0.100", "0.400"]


def test_empty_cells_print_a_dash_never_zero(tmp_path):
    t = tables_of(tmp_path, WJI_LINES)["III"]
    empty = t.cell("FP", "small", "VGG-13")
    assert empty.value is None and empty.n == 0 and empty.text() == "—"
    row = md_row(reports.render(t, "md"), "FP")
    assert row == ["FP", "0.700", "—", "0.700", "—", "—", "—", "0.700"]
    assert "0.000" not in reports.render(t, "md")
    assert "---" in reports.render(t, "latex").split(r"\midrule")[1]


def test_methods_in_paper_order_with_display_names(tmp_path):
    t = tables_of(tmp_path, WJI_LINES)["III"]
    assert [r.keys for r in t.rows] == [("FP",), ("CLP",), ("PFL",), ("Random",), ("zeta",)]
    assert [c.group for c in t.columns] == ["VGG-13"] * 3 + ["ResNet-18"] * 3 + [None]
    assert [c.label for c in t.columns[:3]] == ["narrow", "small", "mean"]


def test_levels_and_archs_in_paper_order_whatever_the_file_order(tmp_path):
    lines = [case(wji=0.5, arch=a, level=lv) for a in ["resnet34", "mynet", "vgg16", "vgg13"]
             for lv in ["large", "narrow", "middle", "small"]]
    t = tables_of(tmp_path, lines)["III"]
    groups = list(dict.fromkeys(c.group for c in t.columns))
    assert groups == ["VGG-13", "VGG-16", "ResNet-34", "mynet", None]
    assert [c.label for c in t.columns[:5]] == ["narrow", "small", "middle", "large", "mean"]


# ------------------------------------------------------------------------------ Tables I and II


def test_entry_tables_deduplicate_entries_and_prefer_database_cases(tmp_path):
    e1, e2 = "cifar10-vgg13-badnets-narrow-00", "cifar10-vgg13-badnets-narrow-01"
    lines = [
        directory(), directory(level="small", benign_ca=0.93),
        case("database", entry=e1, ca=0.90, asr=0.98),
        # ignored: e1 has a database case
        case(entry=e1, ca=0.50, asr=0.10, wji=0.1), case(entry=e1, ca=0.50, asr=0.10, wji=0.2),
        case(entry=e2, candidate=1, ca=0.80, asr=None, wji=0.3),   # e2: no database case, ca 0.80 counted once
        case(entry=e2, candidate=1, ca=0.80, asr=0.96, wji=0.4),   # e2's ASR from this case
        case("database", entry="x-skipped", ca=0.1, asr=0.1, outcome="skipped"),
        case("database", entry="cifar10-vgg13-badnets-large-00", level="large", ca=0.70, asr=None),
    ]
    tabs = tables_of(tmp_path, lines)
    ca = tabs["I"]
    assert ca.cell(("CIFAR-10", "VGG-13"), "narrow") == Cell(pytest.approx(0.85), 2, "pct")  # (0.90 + 0.80) / 2
    assert ca.cell(("CIFAR-10", "VGG-13"), "narrow").text() == "85.0"
    assert ca.cell(("CIFAR-10", "VGG-13"), "large").text() == "70.0"
    assert ca.cell(("CIFAR-10", "VGG-13"), "mean").text() == "80.0"                     # (.90 + .80 + .70) / 3
    assert ca.cell(("CIFAR-10", "VGG-13"), "benign").text() == "93.0"
    asr = tabs["II"]
    assert asr.cell(("CIFAR-10", "VGG-13"), "narrow").text() == "97.0"                  # (0.98 + 0.96) / 2
    assert asr.cell(("CIFAR-10", "VGG-13"), "large").text() == "—"                      # only a null ASR
    assert "benign" not in [c.label for c in asr.columns]
    assert [c.label for c in ca.columns] == ["narrow", "small", "large", "mean", "benign"]
    assert ca.cell(("CIFAR-10", "VGG-13"), "small").text() == "—"    # a directory line, no entry


def test_benign_ca_from_cases_when_no_directory_line_has_it(tmp_path):
    lines = [case("database", ca=0.90, benign_ca=0.94), case(ca=0.90, benign_ca=0.94, wji=0.1),
             case("database", entry="e2", candidate=1, ca=0.80, benign_ca=0.92)]
    t = tables_of(tmp_path, lines)["I"]
    assert t.cell(("CIFAR-10", "VGG-13"), "benign") == Cell(pytest.approx(0.93), 2, "pct")  # one per entry
    t = tables_of(tmp_path, lines + [directory(benign_ca=0.95)])["I"]
    assert t.cell(("CIFAR-10", "VGG-13"), "benign").text() == "95.0"  # directory lines win


# ------------------------------------------------------------------------------ Table IV (time)


@pytest.mark.parametrize("times, text", [
    ([1.0, 2.0], "1.50"), ([1234.0, 1236.0], "1240"), ([0.012345], "0.0123"), ([99.96], "100"), ([0.0], "0"),
])
def test_time_is_mean_seconds_with_three_significant_figures(tmp_path, times, text):
    t = tables_of(tmp_path, [case(time_s=s) for s in times])["IV"]
    assert t.cell("CLP", "VGG-13").text() == text
    assert t.cell("CLP", "VGG-13").value == pytest.approx(sum(times) / len(times))


# ------------------------------------------------------------------------------ Tables V and VI (repair)

REPAIR_LINES = [
    case("repair", repair="prune", cad=0.01, asrd=0.9), case("repair", repair="prune", cad=0.03, asrd=0.7),
    case("repair", repair="prune", cad=None, asrd=0.5, level="small"),
    case("repair", repair="prune", localizer="pfl", cad=-0.0001, asrd=1.0),
    case("repair", repair="finetune", cad=0.10, asrd=0.2),
    case("repair", repair="finetune", cad=0.5, asrd=0.5, outcome="skipped"),
]


def test_pruning_table_has_cad_and_asrd_rows_per_method(tmp_path):
    t = tables_of(tmp_path, REPAIR_LINES)["V"]
    assert [r.keys for r in t.rows] == [("CLP", "CAD"), ("CLP", "ASRD"), ("PFL", "CAD"), ("PFL", "ASRD")]
    assert t.cell(("CLP", "CAD"), "narrow", "VGG-13").text() == "2.0"    # (1 % + 3 %) / 2
    assert t.cell(("CLP", "ASRD"), "narrow", "VGG-13").text() == "80.0"  # (90 % + 70 %) / 2
    assert t.cell(("CLP", "CAD"), "small", "VGG-13").text() == "—"       # only a null CAD
    assert t.cell(("CLP", "ASRD"), "mean").text() == "70.0"              # (90 + 70 + 50) / 3
    assert t.cell(("PFL", "CAD"), "narrow", "VGG-13").text() == "0.0"    # -0.01 %: no "-0.0"
    md = reports.render(t, "md")
    assert md_row(md, "CLP")[:3] == ["CLP", "CAD", "2.0"]
    assert md_row(md, "")[:3] == ["", "ASRD", "80.0"]                    # repeated method left blank


def test_finetuning_table_takes_finetune_cases_only(tmp_path):
    t = tables_of(tmp_path, REPAIR_LINES)["VI"]
    assert [r.keys for r in t.rows] == [("CLP", "CAD"), ("CLP", "ASRD")]
    assert t.cell(("CLP", "CAD"), "narrow", "VGG-13") == Cell(pytest.approx(0.10), 1, "pct")
    assert t.cell(("CLP", "ASRD"), "mean").text() == "20.0"


# ------------------------------------------------------------------------------ counts, datasets, loading


def test_counts_table_from_directory_lines(tmp_path):
    lines = [directory(kept=3, rejected=1), directory(attack="sra", kept=0, rejected=0),
             directory(arch="resnet18", level="large", kept=1, rejected=4)]
    t = tables_of(tmp_path, lines)["counts"]
    assert [r.keys for r in t.rows] == [("CIFAR-10", "VGG-13", "BadNets", "narrow"),
                                        ("CIFAR-10", "VGG-13", "SRA", "narrow"),
                                        ("CIFAR-10", "ResNet-18", "BadNets", "large"), ("total", "", "", "")]
    assert [c.text() for c in t.rows[0].cells] == ["3", "1", "75.0"]
    assert [c.text() for c in t.rows[1].cells] == ["0", "0", "—"]     # no candidates: no share
    assert [c.text() for c in t.rows[3].cells] == ["4", "5", "44.4"]  # 4 / 9


def test_several_datasets_put_the_dataset_in_the_rows(tmp_path):
    lines = [case(wji=0.2), case(wji=0.6, dataset="gtsrb", entry="gtsrb-vgg13-badnets-narrow-00")]
    t = tables_of(tmp_path, lines)["III"]
    assert t.key_headers == ["dataset", "method"]
    assert t.cell(("CIFAR-10", "CLP"), "narrow", "VGG-13").text() == "0.200"
    assert t.cell(("GTSRB", "CLP"), "narrow", "VGG-13").text() == "0.600"
    only = reports.build_tables(reports.load(tmp_path / "results.jsonl").filter(dataset=["gtsrb"]))["III"]
    assert only.key_headers == ["method"] and only.cell("CLP", "mean").text() == "0.600"


def test_several_files_concatenate_cases_and_keep_each_header(tmp_path):
    a = write(tmp_path, [case(wji=0.2), directory(kept=2)], "a.jsonl")
    b = write(tmp_path, [case(wji=0.4), directory(kept=5)], "b.jsonl",
              header={**HEADER, "run": "20261124-090000", "device": "NVIDIA H100", "git": None, "profile": None})
    res = reports.load([a, b])
    assert len(res.cases) == 2 and len(res.directories) == 1 and res.directories[0].kept == 5  # last wins
    assert res.provenance() == ["a.jsonl: run 20261123-130501, device cpu, git abc1234, profile tiny",
                                "b.jsonl: run 20261124-090000, device NVIDIA H100, git —, profile —"]
    assert reports.build_tables(res)["III"].cell("CLP", "mean").text() == "0.300"


def test_unknown_keys_and_kinds_are_ignored_and_nan_is_null(tmp_path):
    path = write(tmp_path, [case(wji=0.2, novel_metric=[1, 2]), {"kind": "summary", "x": 1}])
    with path.open("a") as f:
        f.write('{"kind": "case", "case": "localization", "localizer": "clp", "arch": "vgg13", '
                '"level": "narrow", "wji": NaN}\n')
    t = reports.build_tables(reports.load(path))["III"]
    assert t.cell("CLP", "narrow", "VGG-13") == Cell(pytest.approx(0.2), 1, "fixed3")


# ------------------------------------------------------------------------------ formats


def test_csv_is_parseable_with_unrounded_numbers(tmp_path):
    lines = [case(wji=0.2), case(wji=0.4), case(wji=0.123456, localizer="fp", level="small"),
             case("database", ca=0.912345, asr=0.5)]
    tabs = tables_of(tmp_path, lines)
    rows = list(csv.reader(io.StringIO(reports.render(tabs["III"], "csv"))))
    assert rows[0] == ["method", "VGG-13 narrow", "VGG-13 small", "VGG-13 mean", "mean"]
    values = {r[0]: r[1:] for r in rows[1:]}
    assert float(values["CLP"][0]) == pytest.approx(0.3, abs=1e-12)
    assert values["FP"][0] == "" and float(values["FP"][1]) == 0.123456  # empty cell; not rounded to 0.123
    assert all(v == "" or isinstance(float(v), float) for r in values.values() for v in r)
    rows = list(csv.reader(io.StringIO(reports.render(tabs["I"], "csv"))))
    assert rows[1][:3] == ["CIFAR-10", "VGG-13", "91.2345"]  # percent, unrounded


def test_latex_is_booktabs_and_escapes(tmp_path):
    lines = [case(wji=0.25, localizer="my_loc"), directory(kept=1, rejected=1)]
    tabs = tables_of(tmp_path, lines)
    tex = reports.render(tabs["III"], "latex")
    assert r"\toprule" in tex and r"\midrule" in tex and r"\bottomrule" in tex
    assert r"\multicolumn{2}{c}{VGG-13}" in tex and r"\cmidrule(lr){2-3}" in tex
    assert r"my\_loc & 0.250 & 0.250 & 0.250 \\" in tex and "my_loc" not in tex.replace(r"my\_loc", "")
    counts = reports.render(tabs["counts"], "latex")
    assert r"kept \%" in counts and r"\textgreater{} 0.5" in counts
    assert "% source: results.jsonl: run 20261123-130501" in counts


def test_show_n_adds_counts(tmp_path):
    t = tables_of(tmp_path, [case(wji=0.2), case(wji=0.4)])["III"]
    assert md_row(reports.render(t, "md", show_n=True), "CLP")[1] == "0.300 (2)"
    rows = list(csv.reader(io.StringIO(reports.render(t, "csv", show_n=True))))
    assert rows[0][1:3] == ["VGG-13 narrow", "VGG-13 narrow n"] and rows[1][2] == "2"


# ------------------------------------------------------------------------------ command line


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_prints_tables_and_source_caption(tmp_path, capsys):
    path = write(tmp_path, WJI_LINES + REPAIR_LINES)
    code, out, err = run_cli(capsys, path, "--tables", "iii,V")
    assert code == 0 and err == ""
    assert out.splitlines()[0] == "Source: results.jsonl: run 20261123-130501, device cpu, git abc1234, profile tiny"
    assert "**Table III.**" in out and "**Table V.**" in out and "**Table IV.**" not in out
    assert md_row(out, "CLP")[1] == "0.300"


def test_cli_missing_file_is_one_line_exit_2(tmp_path, capsys):
    code, out, err = run_cli(capsys, tmp_path / "nope.jsonl")
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [f"reports: error: {tmp_path / 'nope.jsonl'}: results file not found"]


def test_cli_corrupt_line_names_file_and_line(tmp_path, capsys):
    path = write(tmp_path, [case(wji=0.2)])
    with path.open("a") as f:
        f.write('{"kind": "case", "wji": 0.\n' + json.dumps(case(wji=0.3)) + "\n")
    code, _, err = run_cli(capsys, path)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and f"{path}:3: corrupt line" in lines[0]


@pytest.mark.parametrize("content, message", [
    ("", "empty results file"), ("\n\n", "empty results file"),
    ('{"kind": "case", "wji": "high"}\n', ":1: 'wji' should be a number"),
    ('[1, 2]\n', ":1: corrupt line, expected a JSON object"),
    ('{"case": "localization"}\n', ":1: line has no 'kind'"),
])
def test_cli_bad_files_exit_2(tmp_path, capsys, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    code, _, err = run_cli(capsys, path)
    assert code == 2 and len(err.strip().splitlines()) == 1 and str(path) in err and message in err


def test_cli_out_writes_one_file_per_table(tmp_path, capsys):
    path = write(tmp_path, WJI_LINES + REPAIR_LINES + [directory()])
    out_dir = tmp_path / "report"
    code, out, err = run_cli(capsys, path, "--out", out_dir, "--format", "csv", "--no-plots")
    assert code == 0
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(
        [f"table{i}.csv" for i in range(1, 7)] + ["detection.csv", "counts.csv"])
    rows = list(csv.reader((out_dir / "table3.csv").open()))
    assert rows[0][0] == "method" and float(dict((r[0], r[1]) for r in rows[1:])["CLP"]) == pytest.approx(0.3)
    assert f"wrote {len(TABLE_KEYS)} tables and 0 plots" in err

    code, out, err = run_cli(capsys, path, "--out", out_dir / "md", "--tables", "III", "--no-plots")
    md = (out_dir / "md" / "table3.md").read_text()
    assert code == 0 and [p.name for p in (out_dir / "md").iterdir()] == ["table3.md"]
    assert md.startswith("**Table III.**") and md_row(md, "CLP")[1] == "0.300" and "_Source: results.jsonl" in md


def test_cli_single_csv_table_on_stdout_is_bare_csv(tmp_path, capsys):
    code, out, _ = run_cli(capsys, write(tmp_path, WJI_LINES), "--format", "csv", "--tables", "IV")
    assert code == 0 and out.splitlines()[0] == "method,VGG-13,ResNet-18,mean"


def test_cli_dataset_filter_unknown_is_exit_2(tmp_path, capsys):
    code, _, err = run_cli(capsys, write(tmp_path, WJI_LINES), "--dataset", "gtsrb")
    assert code == 2 and "gtsrb" in err and "cifar10" in err


def test_python_dash_m_help_and_no_heavy_imports():
    out = subprocess.run([sys.executable, "-m", "reports", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "--format" in out.stdout and "--tables" in out.stdout
    code = ("import sys, reports, reports.__main__; "  # importing __main__ (as `bd4nn report` does) must not run it
            "print(sorted(m for m in ('torch', 'bd4nn', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stderr


# ------------------------------------------------------------------------------ plots


def test_plots_without_matplotlib_are_skipped_with_a_notice(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(reports.figures, "available", lambda: False)
    path = write(tmp_path, WJI_LINES)
    code, _, err = run_cli(capsys, path, "--out", tmp_path / "o", "--tables", "III")
    assert code == 0 and reports.figures.NOTICE in err and not list((tmp_path / "o").glob("*.png"))


def test_plots_write_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    res = reports.load(write(tmp_path, WJI_LINES + REPAIR_LINES))
    paths = reports.plots(res, tmp_path / "plots")
    assert sorted(p.name for p in paths) == ["finetune_asrd_vs_cad.png", "prune_asrd_vs_cad.png", "wji.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
