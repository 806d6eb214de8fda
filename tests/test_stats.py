"""Tests of reports/stats.py and reports/compare.py: bootstrap CIs, Wilcoxon signed-rank tests,
``--ci`` / ``--pairs`` and ``python -m reports.compare``.

Expected values are worked out independently of the code under test: intervals against a direct
call of ``scipy.stats.bootstrap`` (same seed and settings) and a normal-approximation interval;
signed-rank statistics by ranking by hand and p-values by enumerating every sign assignment;
``compare`` on results files built with a known difference. Results lines come from the helpers
of tests/test_reports.py.
"""

from __future__ import annotations

import csv
import inspect
import io
import itertools
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy
from scipy import stats as sps

import reports
from reports import stats
from reports.cli import main as reports_main
from reports.compare import compare
from reports.compare import main as compare_main
from reports.tables import Cell
from test_reports import HEADER, REPAIR_LINES, WJI_LINES, case, md_row, write

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ROOT / "bench" / "baselines" / "tiny.jsonl"

# scipy >= 1.15 tests ties or zeros in small samples by enumerating the sign flips (else: normal approximation)
SIGN_FLIPS = tuple(int(x) for x in scipy.__version__.split(".")[:2]) >= (1, 15)

SAMPLE = [0.12, 0.55, 0.31, 0.90, 0.05, 0.47, 0.66, 0.23, 0.38, 0.71]


def scipy_percentile_ci(x, seed: int, resamples: int = stats.RESAMPLES) -> tuple[float, float]:
    """The interval straight from scipy: percentile method, 95 %, a Generator seeded with ``seed``."""
    seeded = {"rng" if "rng" in inspect.signature(sps.bootstrap).parameters else "random_state":
              np.random.default_rng(seed)}  # scipy < 1.15: random_state
    res = sps.bootstrap((np.asarray(x, dtype=float),), np.mean, n_resamples=resamples, confidence_level=0.95,
                        method="percentile", **seeded)
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def distinct(lines: list[dict]) -> list[dict]:
    """``lines`` with an entry of their own each (test_reports' lines share one entry, and a
    cell's values from one entry are one cluster: no interval)."""
    return [{**x, "entry": f"entry-{i:02d}"} for i, x in enumerate(lines)]


def exact_two_sided_p(ranks: list[float], r_plus: float) -> float:
    """P-value of R+ = ``r_plus`` by enumerating all 2^n sign assignments of ``ranks``:
    2 * min(P(T <= r_plus), P(T >= r_plus)), capped at 1."""
    totals = [sum(r for r, s in zip(ranks, signs) if s) for signs in itertools.product([0, 1], repeat=len(ranks))]
    eps = 1e-9
    low = sum(t <= r_plus + eps for t in totals) / len(totals)
    high = sum(t >= r_plus - eps for t in totals) / len(totals)
    return min(1.0, 2 * min(low, high))


def ranks_by_hand(d: list[float]) -> list[float]:
    """Ranks of |d| (1 = smallest), ties getting the average of the ranks they span."""
    order = sorted(range(len(d)), key=lambda i: abs(d[i]))
    ranks = [0.0] * len(d)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and abs(d[order[j + 1]]) == abs(d[order[i]]):
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


# ------------------------------------------------------------------------------ bootstrap CIs


def test_bootstrap_ci_is_scipys_percentile_bootstrap_with_the_seed():
    assert stats.bootstrap_ci(SAMPLE) == pytest.approx(scipy_percentile_ci(SAMPLE, seed=0), abs=1e-12)
    assert stats.bootstrap_ci(SAMPLE, seed=7, resamples=2000) == pytest.approx(
        scipy_percentile_ci(SAMPLE, seed=7, resamples=2000), abs=1e-12)
    assert stats.bootstrap_ci(SAMPLE) == stats.bootstrap_ci(SAMPLE)          # seeded: reproducible
    assert stats.bootstrap_ci(SAMPLE, seed=1) != stats.bootstrap_ci(SAMPLE)  # and the seed matters
    lo, hi = stats.bootstrap_ci(SAMPLE)
    assert min(SAMPLE) <= lo < statistics.mean(SAMPLE) < hi <= max(SAMPLE)


def test_bootstrap_ci_of_a_large_sample_agrees_with_the_normal_interval():
    x = np.random.default_rng(123).beta(2.0, 5.0, size=400)
    lo, hi = stats.bootstrap_ci(x)
    # mean +- z_0.975 * s / sqrt(n), computed here without scipy
    half = 1.959964 * statistics.stdev(x) / math.sqrt(len(x))
    m = statistics.fmean(x)
    assert lo == pytest.approx(m - half, abs=0.1 * half)
    assert hi == pytest.approx(m + half, abs=0.1 * half)


def test_small_and_degenerate_samples():
    # two values: the resampled means are 0.2, 0.3, 0.4 with chances 1/4, 1/2, 1/4 -> [0.2, 0.4]
    assert stats.bootstrap_ci([0.2, 0.4]) == pytest.approx((0.2, 0.4))
    assert stats.bootstrap_ci([0.5, 0.5, 0.5]) == pytest.approx((0.5, 0.5))  # BCa would give NaN here
    assert stats.bootstrap_ci([0.5]) is None and stats.bootstrap_ci([]) is None
    assert stats.bootstrap_ci([0.3, 0.5], ["e1", "e1"]) is None  # two values, one entry


def test_repeated_entries_are_resampled_as_clusters():
    entries = [f"e{i}" for i in range(len(SAMPLE))]
    single = stats.bootstrap_ci(SAMPLE, entries)
    assert single == pytest.approx(scipy_percentile_ci(SAMPLE, seed=0), abs=1e-12)
    # the same run concatenated twice: every entry twice; the interval must not shrink
    assert stats.bootstrap_ci(SAMPLE * 2, entries * 2) == pytest.approx(single, abs=1e-12)
    naive = stats.bootstrap_ci(SAMPLE * 2)  # 20 "independent" values: narrower, wrongly
    assert naive[1] - naive[0] < 0.9 * (single[1] - single[0])


def test_add_ci_sets_cells_of_tables_iii_v_vi_only(tmp_path):
    tables = reports.build_tables(reports.load(write(tmp_path, distinct(WJI_LINES + REPAIR_LINES))))
    assert tables["III"].cell("CLP", "narrow", "VGG-13") == Cell(pytest.approx(0.3), 2, "fixed3")
    stats.add_ci(tables)
    cell = tables["III"].cell("CLP", "narrow", "VGG-13")      # values 0.2, 0.4
    assert cell == Cell(pytest.approx(0.3), 2, "fixed3", pytest.approx(0.2), pytest.approx(0.4))
    assert cell.ci_text() == "[0.200, 0.400]" and cell.text() == "0.300"   # the mean is unchanged
    mean = tables["III"].cell("CLP", "mean")                  # 0.2, 0.4, 0.9, 0.1 on four entries
    assert (mean.lo, mean.hi) == pytest.approx(scipy_percentile_ci([0.2, 0.4, 0.9, 0.1], seed=0), abs=1e-12)
    assert tables["III"].cell("FP", "narrow", "VGG-13").ci_text() == ""    # one value: no interval
    assert tables["V"].cell(("CLP", "CAD"), "narrow", "VGG-13").ci_text() == "[1.0, 3.0]"  # percent
    assert all(c.ci for c in tables["III"].columns) and not any(c.ci for c in tables["IV"].columns)
    assert all(c.lo is None for r in tables["IV"].rows for c in r.cells)


# ------------------------------------------------------------------------------ signed-rank tests

D8 = [0.15, -0.02, 0.23, 0.07, 0.31, -0.11, 0.04, 0.29]  # 8 pairs, no ties, no zeros


def test_signed_rank_matches_a_hand_computed_exact_test():
    # |d| in order: .02 .04 .07 .11 .15 .23 .29 .31 -> ranks 1..8; the negative ones are .02 (1) and .11 (4)
    ranks = ranks_by_hand(D8)
    assert ranks == [5, 1, 6, 3, 8, 4, 2, 7]
    r_minus = sum(r for r, x in zip(ranks, D8) if x < 0)
    r_plus = sum(r for r, x in zip(ranks, D8) if x > 0)
    assert (r_plus, r_minus) == (31, 5)
    # P(R+ >= 31) = P(R- <= 5): subsets of 1..8 summing to <= 5 are {}, 1, 2, 3, 4, 5, 12, 13, 14, 23 -> 10
    assert exact_two_sided_p(ranks, r_plus) == 2 * 10 / 256
    t = stats.signed_rank(D8)
    assert (t.n, t.nonzero, t.statistic, t.method) == (8, 8, 5.0, "exact")
    assert t.p == pytest.approx(20 / 256, abs=1e-12)
    assert t.median == pytest.approx((0.07 + 0.15) / 2)     # sorted: -.11 -.02 .04 .07 | .15 .23 .29 .31
    flipped = stats.signed_rank([-x for x in D8])          # A and B swapped: same W and p
    assert (flipped.statistic, flipped.p) == (t.statistic, t.p)


def test_signed_rank_with_ties_and_zeros_enumerates_the_sign_flips():
    d = [0.1, 0.1, -0.2, 0.3, 0.0, 0.4, -0.1]
    nonzero = [x for x in d if x != 0]                   # Wilcoxon drops the zero
    ranks = ranks_by_hand(nonzero)                       # |.1| x3 -> ranks 1, 2, 3 -> 2 each
    assert ranks == [2, 2, 4, 5, 6, 2]
    r_plus = sum(r for r, x in zip(ranks, nonzero) if x > 0)
    r_minus = sum(r for r, x in zip(ranks, nonzero) if x < 0)
    assert (r_plus, r_minus) == (15, 6)
    t = stats.signed_rank(d)
    assert (t.n, t.nonzero, t.statistic) == (7, 6, 6.0)
    if SIGN_FLIPS:
        assert t.method == "exact sign flips"
        assert t.p == pytest.approx(exact_two_sided_p(ranks, r_plus), abs=1e-12)
    else:
        assert t.method == "normal" and 0 < t.p <= 1


def test_no_test_for_all_zero_differences_or_too_few_pairs():
    zero = stats.signed_rank([0.0, 0.0, 0.0])
    assert zero.p is None and zero.statistic is None and zero.reason == "all 3 differences are zero"
    assert zero.median == 0.0 and zero.n == 3
    one = stats.signed_rank([0.25])
    assert one.p is None and one.reason == "fewer than 2 pairs (1)" and one.median == 0.25
    none = stats.signed_rank([])
    assert none.p is None and none.median is None and none.n == 0


def test_floating_point_noise_is_not_a_difference():
    a, b = [0.1 + 0.2, 0.7, 0.5], [0.3, 0.7, 0.5]          # 0.1 + 0.2 = 0.30000000000000004
    assert b[0] - a[0] != 0
    t = stats.signed_rank([y - x for x, y in zip(a, b)])
    assert t.nonzero == 0 and t.p is None


def test_holm_adjustment():
    # sorted: .005 x4 = .02, .01 x3 = .03, .03 x2 = .06, .04 x1 = .04 -> running max .06
    assert stats.holm([0.01, 0.04, 0.03, None, 0.005]) == pytest.approx([0.03, 0.06, 0.06, None, 0.02])
    assert stats.holm([0.6, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert stats.holm([]) == []


A8 = [0.30, 0.25, 0.40, 0.35, 0.20, 0.45, 0.33, 0.28]


def pair_lines() -> list[dict]:
    """CLP on 8 entries (A8), PFL = CLP + D8, FP = CLP exactly, Random on one entry only."""
    lines = []
    for i, (a, d) in enumerate(zip(A8, D8)):
        e = f"cifar10-vgg13-badnets-narrow-{i:02d}"
        lines += [case(entry=e, candidate=i, localizer="clp", wji=a),
                  case(entry=e, candidate=i, localizer="pfl", wji=round(a + d, 10)),
                  case(entry=e, candidate=i, localizer="fp", wji=a)]
    lines.append(case(entry="cifar10-vgg13-badnets-narrow-00", localizer="random", wji=0.0))
    lines.append(case(entry="cifar10-vgg13-badnets-narrow-01", localizer="pfl", wji=0.99, outcome="skipped"))
    return lines


def test_pairs_table(tmp_path):
    t = stats.pairs_table(reports.load(write(tmp_path, pair_lines())))
    assert t.label == "Paired tests" and t.file_stem == "pairs"
    assert [r.keys for r in t.rows] == [("FP", "CLP"), ("FP", "PFL"), ("FP", "Random"), ("CLP", "PFL"),
                                        ("CLP", "Random"), ("PFL", "Random")]
    cols = [c.label for c in t.columns]
    row = dict(zip(cols, t.rows[3].cells))                # CLP vs PFL: B - A = D8
    assert row["n"].value == 8 and row["W"].value == 5.0
    assert row["p"].value == pytest.approx(20 / 256) and row["p"].text() == "0.0781"
    assert row["median B - A"].text() == "0.110"
    assert row["mean A"].value == pytest.approx(statistics.mean(A8))
    assert row["mean B"].value == pytest.approx(statistics.mean(A8) + statistics.mean(D8))
    # FP vs PFL has the same differences; Holm over these two tests: max(2 x .078125, .078125)
    assert row["p (Holm)"].value == pytest.approx(2 * 20 / 256)
    zero = dict(zip(cols, t.rows[0].cells))               # FP = CLP on every entry
    assert zero["n"].value == 8 and zero["p"].text() == "—" and zero["W"].text() == "—"
    few = dict(zip(cols, t.rows[2].cells))                # Random: one common entry
    assert few["n"].value == 1 and few["p"].value is None
    md = reports.render(t, "md")
    assert "No test (p —), fewer than 2 pairs: FP vs Random (n = 1); CLP vs Random (n = 1); " \
           "PFL vs Random (n = 1)." in md
    assert "No test (p —), all differences are zero: FP vs CLP (n = 8)." in md
    assert "Holm-adjusted over the 2 tests" in md


# ------------------------------------------------------------------------------ compare

D_NARROW = [0.1, 0.2, 0.0]     # mean 0.1
D_SMALL = [-0.1, 0.3, 0.4]     # mean 0.2
A6 = [0.2, 0.3, 0.4, 0.5, 0.1, 0.35]


def compare_runs(tmp_path: Path) -> tuple[Path, Path]:
    """Run A and run B of CLP on 6 entries (3 narrow, 3 small), B = A + D_NARROW / D_SMALL, plus
    an entry only in A and one whose B case is skipped (both left out)."""
    a_lines, b_lines = [], []
    for i, (a, d) in enumerate(zip(A6, D_NARROW + D_SMALL)):
        level = "narrow" if i < 3 else "small"
        e = f"cifar10-vgg13-badnets-{level}-{i:02d}"
        a_lines.append(case(entry=e, level=level, candidate=i, wji=a))
        b_lines.append(case(entry=e, level=level, candidate=i, wji=round(a + d, 10)))
    a_lines += [case(entry="only-a", wji=0.99), case(entry="skipped-in-b", wji=0.98)]
    b_lines += [case(entry="skipped-in-b", wji=0.01, outcome="skipped")]
    return (write(tmp_path, a_lines, "a.jsonl"),
            write(tmp_path, b_lines, "b.jsonl", header={**HEADER, "run": "run-b"}))


def test_compare_gives_the_known_paired_difference(tmp_path):
    a, b = compare_runs(tmp_path)
    t = compare(a, b)
    assert t.label == "Comparison" and t.file_stem == "compare"
    assert t.key_headers == ["method", "arch", "level"]
    assert [r.keys for r in t.rows] == [("CLP", "VGG-13", "narrow"), ("CLP", "VGG-13", "small"),
                                        ("CLP", "VGG-13", "all"), ("CLP", "all", "all")]
    cols = [c.label for c in t.columns]
    narrow, small, everything = (dict(zip(cols, t.rows[i].cells)) for i in (0, 1, 3))
    assert narrow["n"].value == 3 and narrow["A"].value == pytest.approx(0.3)   # (.2 + .3 + .4) / 3
    assert narrow["B - A"].value == pytest.approx(0.1) and small["B - A"].value == pytest.approx(0.2)
    assert everything["B - A"].value == pytest.approx(0.15) and everything["n"].value == 6
    assert everything["A"].value == pytest.approx(statistics.mean(A6))           # "only-a" left out
    d_all = D_NARROW + D_SMALL
    assert (everything["B - A"].lo, everything["B - A"].hi) == pytest.approx(scipy_percentile_ci(d_all, 0), abs=1e-9)
    # narrow: nonzero .1, .2 -> ranks 1, 2, all positive: R+ = 3 is the largest of 4 flips -> p = 2 x 1/4
    if SIGN_FLIPS:
        assert narrow["p"].value == pytest.approx(0.5)
        ranks = ranks_by_hand([x for x in d_all if x])   # .1 and -.1 tie
        r_plus = sum(r for r, x in zip(ranks, [x for x in d_all if x]) if x > 0)
        assert everything["p"].value == pytest.approx(exact_two_sided_p(ranks, r_plus))
    assert everything["B - A"].text() == "0.150"
    md = reports.render(t, "md")
    assert md_row(md, "CLP")[3:] == ["3", "0.300", "0.400",
                                     "0.100 [{:.3f}, {:.3f}]".format(*scipy_percentile_ci(D_NARROW, 0)),
                                     narrow["p"].text()]
    assert "Left out, not in both runs: 2 localizer-entry pairs only in A, 0 only in B." in md
    assert "A = a.jsonl: run 20261123-130501" in md and "B = b.jsonl: run run-b" in md
    assert compare(a, a).rows[3].cells[3].value == 0.0  # a run against itself


def test_compare_cad_per_repair_in_percentage_points(tmp_path):
    a = write(tmp_path, REPAIR_LINES, "a.jsonl")
    shifted = [{**x, "cad": x["cad"] + 0.02} if x.get("cad") is not None else x for x in REPAIR_LINES]
    b = write(tmp_path, shifted, "b.jsonl")
    t = compare(a, b, "cad")
    assert t.key_headers == ["method", "repair", "arch", "level"]
    row = t.rows[0]
    assert row.keys == ("CLP", "prune", "VGG-13", "narrow")
    # REPAIR_LINES' two CLP prune narrow cases share one entry: its CAD is their mean in each run
    assert row.cells[0].value == 1 and row.cells[3].text() == "2.0" and row.cells[3].ci_text() == ""
    assert [r.keys for r in compare(a, b, "cad", repair="finetune").rows][0] == ("CLP", "finetune", "VGG-13", "narrow")
    with pytest.raises(ValueError, match="--repair applies"):
        compare(a, b, "wji", repair="prune")


@pytest.mark.parametrize("fmt", ["md", "latex", "csv", "html"])
def test_compare_command_line_renders(tmp_path, capsys, fmt):
    a, b = compare_runs(tmp_path)
    assert compare_main([str(a), str(b), "--format", fmt]) == 0
    out = capsys.readouterr().out
    lo, hi = scipy_percentile_ci(D_NARROW, 0)
    if fmt == "csv":
        rows = list(csv.reader(io.StringIO(out)))
        assert rows[0] == ["method", "arch", "level", "n", "A", "B", "B - A", "B - A lo", "B - A hi", "p"]
        assert [float(x) for x in rows[1][6:9]] == pytest.approx([0.1, lo, hi])
    else:
        assert f"0.100 [{lo:.3f}, {hi:.3f}]" in out
        assert {"md": "**Comparison.**", "latex": r"\label{tab:bd4nn-compare}", "html": "<h2>Comparison</h2>"}[fmt] in out


def test_compare_command_line_errors(tmp_path, capsys):
    a, _ = compare_runs(tmp_path)
    assert compare_main([str(a), str(tmp_path / "nope.jsonl")]) == 2
    assert capsys.readouterr().err.startswith("reports.compare: error: ")
    assert compare_main([str(a), str(a), "--repair", "prune"]) == 2
    assert "--repair applies to --metric asrd or cad only" in capsys.readouterr().err


def test_python_dash_m_reports_compare_on_the_baseline():
    out = subprocess.run([sys.executable, "-m", "reports.compare", str(BASELINE), str(BASELINE)],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert md_row(out.stdout, "CLP")[3:6] == ["4", "0.624", "0.624"]   # Table III's CLP VGG-13 narrow
    assert "No test (p —), all differences are zero: 72 of 72 rows." in out.stdout


# ------------------------------------------------------------------------------ python -m reports


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = reports_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_ci_flag_in_every_format(tmp_path, capsys):
    path = write(tmp_path, distinct(WJI_LINES + REPAIR_LINES))
    code, out, _ = run_cli(capsys, path, "--tables", "III,V", "--ci")
    assert code == 0
    assert md_row(out, "CLP")[1:3] == ["0.300 [0.200, 0.400]", "0.900"]   # the second has one value
    assert md_row(out, "FP")[1] == "0.700"
    assert "2.0 [1.0, 3.0]" in out                                       # Table V: CAD 1 % and 3 %
    _, out, _ = run_cli(capsys, path, "--tables", "III", "--ci", "--show-n")
    assert md_row(out, "CLP")[1] == "0.300 [0.200, 0.400] (2)"
    _, out, _ = run_cli(capsys, path, "--tables", "III", "--ci", "--format", "latex")
    assert r"CLP & 0.300 [0.200, 0.400] & 0.900 &" in out
    _, out, _ = run_cli(capsys, path, "--tables", "III", "--ci", "--format", "html", "--no-plots")
    assert "<td>0.300 [0.200, 0.400]</td>" in out
    _, out, _ = run_cli(capsys, path, "--tables", "III", "--ci", "--format", "csv")
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0][:5] == ["method", "VGG-13 narrow", "VGG-13 narrow lo", "VGG-13 narrow hi", "VGG-13 small"]
    values = {r[0]: r[1:] for r in rows[1:]}
    assert [float(x) for x in values["CLP"][:3]] == pytest.approx([0.3, 0.2, 0.4])
    assert values["FP"][:3] == ["0.7", "", ""]                            # no interval: empty fields


def test_cli_without_flags_is_unchanged(tmp_path, capsys):
    path = write(tmp_path, WJI_LINES + REPAIR_LINES)
    _, out, _ = run_cli(capsys, path)
    assert "[" not in out and "Paired tests" not in out
    _, out, _ = run_cli(capsys, path, "--tables", "III", "--format", "csv")
    assert " lo" not in out.splitlines()[0]


def test_cli_pairs_flag(tmp_path, capsys):
    path = write(tmp_path, pair_lines())
    code, out, _ = run_cli(capsys, path, "--tables", "III", "--pairs")
    assert code == 0 and "**Table III.**" in out and "**Paired tests.**" in out
    pairs = out.split("**Paired tests.**")[1]
    # CLP vs PFL: mean A8 = 2.56 / 8, mean D8 = 0.96 / 8, W 5, p 20/256, Holm 2 x 20/256
    assert md_row(pairs, "CLP")[1:] == ["PFL", "8", "0.320", "0.440", "0.110", "5", "0.0781", "0.156"]
    code, _, err = run_cli(capsys, path, "--tables", "III", "--pairs", "--out", tmp_path / "o", "--no-plots")
    assert code == 0 and sorted(p.name for p in (tmp_path / "o").iterdir()) == ["pairs.md", "table3.md"]
    assert "No test (p —)" in (tmp_path / "o" / "pairs.md").read_text()
    _, out, _ = run_cli(capsys, path, "--tables", "III", "--pairs", "--format", "latex")
    assert r"\label{tab:bd4nn-pairs}" in out and r"{\footnotesize Differences:" in out
    _, out, _ = run_cli(capsys, path, "--tables", "III", "--pairs", "--format", "html", "--no-plots")
    assert '<section id="pairs">' in out and '<p class="note">No test (p —)' in out


def test_python_dash_m_reports_ci_and_pairs_on_the_baseline():
    out = subprocess.run([sys.executable, "-m", "reports", str(BASELINE), "--tables", "III", "--ci", "--pairs"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    # CLP's VGG-13 narrow cell recomputed from the file itself, with scipy
    wji = [json.loads(line)["wji"] for line in BASELINE.read_text().splitlines()
           if '"kind": "case"' in line and '"case": "localization"' in line
           and '"localizer": "clp"' in line and '"arch": "vgg13"' in line and '"level": "narrow"' in line]
    assert len(wji) == 4
    lo, hi = scipy_percentile_ci(wji, seed=0)
    assert md_row(out.stdout, "CLP")[1] == f"{statistics.mean(wji):.3f} [{lo:.3f}, {hi:.3f}]"
    pairs = out.stdout.split("**Paired tests.**")[1]
    assert md_row(pairs, "CLP")[:3] == ["CLP", "deepmufl", "24"] and "Holm-adjusted over the 28 tests" in pairs
