"""Comparing two runs (issue 15): ``compare(run_a, run_b) -> Table`` and
``python -m reports.compare A.jsonl B.jsonl [--metric wji|asrd|cad] [--format md|latex|csv|html]``.

Pairing is by entry: an entry's value in a run is the mean of its counted (not skipped, non-null)
cases there for that localizer (and repair), and only the entries that have a value in both runs
count. For each localizer (each localizer and repair for CAD/ASRD) the table has a row per arch
and level, per arch over all its levels ("all"), and over all archs ("all", "all"); with several
datasets, per dataset first. Columns:

- ``n``: entries in both runs; ``A``, ``B``: the mean of each run over those entries;
- ``B - A``: the mean paired difference, with its 95 % percentile bootstrap CI over entries
  (``reports.stats.bootstrap_ci``: ``scipy.stats.bootstrap``, 10,000 resamples, seed 0 unless
  told otherwise); csv gives the bounds as "B - A lo" and "B - A hi" columns;
- ``p``: the two-sided Wilcoxon signed-rank p-value of the differences
  (``reports.stats.signed_rank``); "—" with a note under the table when there are fewer than 2
  pairs or every difference is zero.

WJI is printed with three decimals; CAD and ASRD in percent (differences in percentage points).
``add_arguments(parser)`` / ``run(args)`` are the pair a ``bd4nn compare`` command registers
(``run`` raises ``ResultsError``, a ``ValueError``, for a bad results file or bad options);
``main(argv)`` is the standalone entry point (one ``reports.compare: error: ...`` line on stderr,
exit status 2).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from .cli import _filtered, _names, _positive, standalone
from .formats import FORMATS, render
from .names import ARCHS, DATASETS, LEVELS, METHODS, display, ordered
from .results import Results, ResultsError, load
from .stats import CONFIDENCE, RESAMPLES, SEED, bootstrap_ci, signed_rank, signed_rank_notes
from .tables import Cell, Column, Row, Table

__all__ = ["METRICS", "REPAIRS", "compare", "add_arguments", "run", "main"]

METRICS = {"wji": "fixed3", "asrd": "pct", "cad": "pct"}  # metric -> cell kind
REPAIRS = ("prune", "finetune")
ALL = "all"

DESCRIPTION = """\
Compare two bd4nn results files (JSON Lines written by `bd4nn bench`), run A and run B, entry by
entry: per localizer, arch and level (and over all levels, all archs), the mean of B - A over the
entries in both runs, with a seeded 95 % bootstrap confidence interval and the Wilcoxon
signed-rank p-value of the paired differences."""

EPILOG = """\
examples:
  python -m reports.compare before.jsonl after.jsonl
  python -m reports.compare before.jsonl after.jsonl --metric asrd --repair prune --format latex
B - A > 0 means run B scores higher (for WJI and ASRD, better; for CAD, a larger accuracy loss)."""


def _as_results(run: Results | str | Path | Iterable[str | Path]) -> Results:
    return run if isinstance(run, Results) else load(run)


def _entry_values(results: Results, metric: str, repair: str | None) -> dict[tuple, tuple[float, str, str]]:
    """(dataset, localizer, repair, entry key) -> (mean metric, arch, level) over counted cases."""
    acc: dict[tuple, list[float]] = defaultdict(list)
    where: dict[tuple, tuple] = {}
    for c in results.cases:
        v = getattr(c, metric)
        if not c.counted or c.localizer is None or v is None:
            continue
        if metric == "wji":
            if c.case != "localization":
                continue
        elif c.case != "repair" or c.repair is None or (repair is not None and c.repair != repair):
            continue
        unit = (c.dataset, c.localizer, c.repair if metric != "wji" else None, c.entry_key)
        acc[unit].append(v)
        where.setdefault(unit, (c.arch, c.level))
    return {u: (sum(vs) / len(vs), *where[u]) for u, vs in acc.items()}


def compare(run_a: Results | str | Path | Iterable[str | Path], run_b: Results | str | Path | Iterable[str | Path],
            metric: str = "wji", *, repair: str | None = None, seed: int = SEED, resamples: int = RESAMPLES,
            confidence: float = CONFIDENCE) -> Table:
    """Table "compare": run B minus run A, paired by entry (see the module docstring). ``run_a``
    and ``run_b`` are ``Results`` or results file path(s); ``metric`` is "wji", "asrd" or "cad";
    ``repair`` ("prune" or "finetune", CAD/ASRD only) keeps one repair (default: both, as rows)."""
    # ResultsError (a ValueError): what `bd4nn` reports as a one-line error, as for a bad file
    if metric not in METRICS:
        raise ResultsError(f"unknown metric {metric!r} (choose from {', '.join(METRICS)})")
    if repair is not None and metric == "wji":
        raise ResultsError("--repair applies to --metric asrd or cad only (WJI comes from localization cases)")
    if repair is not None and repair not in REPAIRS:
        raise ResultsError(f"unknown repair {repair!r} (choose from {', '.join(REPAIRS)})")
    a, b = _as_results(run_a), _as_results(run_b)
    va, vb = _entry_values(a, metric, repair), _entry_values(b, metric, repair)
    common = [u for u in va if u in vb]
    kind = METRICS[metric]
    datasets = ordered((u[0] for u in common), DATASETS)
    multi = len(ordered((u[0] for u in [*va, *vb]), DATASETS)) > 1
    by_repair = metric != "wji"

    buckets: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
    for u in common:
        ds, loc, rep, _ = u
        x, arch, level = va[u]
        y = vb[u][0]
        for key in [(arch, level), (arch, ALL), (ALL, ALL)]:
            buckets[(ds, loc, rep, *key)].append((x, y))

    name = metric.upper()
    title = (f"Run B minus run A: mean {name} over the entries in both runs (paired by entry), "
             f"{confidence * 100:g} % bootstrap CI and Wilcoxon signed-rank p")
    table = Table("compare", title,
                  (["dataset"] if multi else []) + ["method"] + (["repair"] if by_repair else []) + ["arch", "level"],
                  [Column("n"), Column("A"), Column("B"), Column("B - A", ci=True), Column("p")],
                  sources=[f"A = {s}" for s in a.provenance()] + [f"B = {s}" for s in b.provenance()],
                  empty_note=f"no data: no entry has a {name} value in both runs (runs of the same database?)")
    tests, names = [], []
    for ds in datasets:
        in_ds = [u for u in common if u[0] == ds]
        for loc in ordered((u[1] for u in in_ds), METHODS):
            reps = ordered((u[2] for u in in_ds if u[1] == loc), {r: r for r in REPAIRS}) if by_repair else [None]
            for rep in reps:
                mine = [va[u] for u in in_ds if u[1] == loc and u[2] == rep]
                archs = ordered((v[1] for v in mine), ARCHS)
                keys = [(arch, lv) for arch in archs
                        for lv in [*ordered((v[2] for v in mine if v[1] == arch), LEVELS), ALL]] + [(ALL, ALL)]
                for arch, lv in keys:
                    pairs = buckets[(ds, loc, rep, arch, lv)]
                    row_keys = (([display(ds, DATASETS)] if multi else []) + [display(loc, METHODS)]
                                + ([rep] if by_repair else []) + [ALL if arch == ALL else display(arch, ARCHS),
                                                                  ALL if lv == ALL else display(lv, LEVELS)])
                    d = [y - x for x, y in pairs]
                    test = signed_rank(d)
                    ci = bootstrap_ci(d, seed=seed, resamples=resamples, confidence=confidence)
                    diff = Cell.mean(d, kind)
                    if ci is not None:
                        diff = Cell(diff.value, diff.n, kind, lo=ci[0], hi=ci[1])
                    table.rows.append(Row(tuple(row_keys), [
                        Cell(len(pairs), 1, "int"), Cell.mean([x for x, _ in pairs], kind),
                        Cell.mean([y for _, y in pairs], kind), diff,
                        Cell(test.p, test.nonzero if test.p is not None else 0, "p")]))
                    tests.append(test)
                    names.append(", ".join(k for k in row_keys))
    if table.rows:
        unit = "points" if kind == "pct" else ""
        table.notes = [f"B - A: the mean of the paired differences{' (percentage ' + unit + ')' if unit else ''} "
                       f"with its {confidence * 100:g} % percentile bootstrap CI over entries "
                       f"(scipy.stats.bootstrap, {resamples} resamples, seed {seed}); none for n < 2."]
        table.notes += signed_rank_notes(names, tests, f"{name} of run B minus run A on the same entry")
    only_a, only_b = len(va) - len(common), len(vb) - len(common)
    if only_a or only_b:
        what = "localizer-repair-entry" if by_repair else "localizer-entry"
        table.notes.append(f"Left out, not in both runs: {only_a} {what} pairs only in A, {only_b} only in B.")
    return table


# ------------------------------------------------------------------------------ command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_a", type=Path, metavar="A", help="results file of run A (JSON Lines)")
    p.add_argument("run_b", type=Path, metavar="B", help="results file of run B; differences are B - A")
    p.add_argument("--metric", choices=list(METRICS), default="wji",
                   help="wji (localization, default), asrd or cad (repair cases)")
    p.add_argument("--repair", choices=list(REPAIRS), default=None,
                   help="with --metric asrd/cad: only this repair (default: both, as rows)")
    p.add_argument("--format", choices=list(FORMATS), default="md",
                   help="md (default), latex, csv (unrounded; CI bounds as 'B - A lo'/'B - A hi' columns) or html")
    p.add_argument("--seed", type=int, default=SEED, help=f"bootstrap seed (default {SEED})")
    p.add_argument("--resamples", type=_positive, default=RESAMPLES, metavar="N",
                   help=f"bootstrap resamples (default {RESAMPLES})")
    p.add_argument("--dataset", type=_names, action="extend", metavar="NAME[,NAME]",
                   help="only these datasets (repeatable)")
    p.add_argument("--attack", type=_names, action="extend", metavar="NAME[,NAME]",
                   help="only these attacks (repeatable)")


def run(args: argparse.Namespace) -> int:
    """Load both runs, filter, print the comparison table in ``args.format``."""

    runs = []
    for path in (args.run_a, args.run_b):
        res = load(path)
        res = _filtered(res, "dataset", args.dataset)
        runs.append(_filtered(res, "attack", args.attack))
    table = compare(*runs, args.metric, repair=args.repair, seed=args.seed, resamples=args.resamples)
    sys.stdout.write(render(table, args.format))
    return 0


def main(argv: list[str] | None = None) -> int:
    return standalone("python -m reports.compare", DESCRIPTION, EPILOG, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
