"""Statistics a paper can cite (issue 15): bootstrap confidence intervals of the tables' means and
paired Wilcoxon signed-rank tests between localizers.

**Confidence intervals** (``bootstrap_ci``, ``add_ci``; ``python -m reports --ci``). Every mean
of WJI, CAD and ASRD that Tables III, V and VI print (each localizer x arch x level cell and the
mean columns) gets a two-sided 95 % bootstrap confidence interval, computed by
``scipy.stats.bootstrap`` with the **percentile** method and 10,000 resamples, from a NumPy
``Generator`` seeded afresh for every cell (``seed``, default 0): a cell's interval depends on
its own values and the seed only, never on which other cells or tables were computed, and the
same results file always prints the same intervals. The cell's mean itself is unchanged; a
cell with fewer than 2 entries has no interval.

*Why percentile rather than BCa* (scipy's default): the cells of a benchmark run are small (2
to ~30 entries per localizer x arch x level) and often degenerate or bounded (a localizer with
WJI 0 on every entry, CAD values all equal). On such data BCa's jackknife acceleration is
unstable, and on constant data scipy's BCa returns NaN with a ``DegenerateDataWarning``; the
percentile interval is always defined, always lies within [min, max] of the values (so a WJI
interval stays inside [0, 1]), and is the textbook interval (Efron & Tibshirani 1993, ch. 13)
a reader can reproduce from the stated method, resamples and seed. Caveat for the reader: with
fewer than ~10 entries any bootstrap interval of a mean is too narrow (the percentile interval
behaves like a z-interval with the plug-in standard deviation); treat those as descriptive.

*Resampling unit: the entry.* A cell's values are resampled with replacement, one value per
entry. When an entry contributes several values to one cell (several results files of the same
entries concatenated), the entries are resampled as clusters: ``scipy.stats.bootstrap`` with
``paired=True`` on each entry's (sum, count), statistic sum(sums) / sum(counts), which is the
cell's mean over cases; with one value per entry this is exactly the ordinary bootstrap of the
mean, and repeating every entry's value k times leaves the interval unchanged.

**Paired tests** (``pairs_table``; ``python -m reports --pairs``): for every pair of localizers
A, B (paper order, A first), the entries localized by both, pooled over every dataset, arch and
level shown (``--dataset``/``--attack`` narrow them; a localizer's WJI on an entry is the mean
of its counted cases there), the differences d = WJI_B - WJI_A, rounded to 12 decimals so that
floating-point noise does not break ties or zeros, and ``signed_rank(d)``: n, the median of d,
and the two-sided Wilcoxon signed-rank test (``scipy.stats.wilcoxon``, zero differences
dropped, as Wilcoxon did): W = min(R+, R-), and p from the exact null distribution when there
are at most 50 differences, none zero and no ties; from the exact enumeration of all sign flips
(scipy's ``PermutationMethod``) when there are ties or zeros and at most 13 differences;
otherwise from the normal approximation (tie-corrected, no continuity correction). Fewer than 2
pairs, or all differences zero, give no test: W and p are "—" and a note under the table says
why. "p (Holm)" is Holm's step-down adjustment over the tests in the table (28 pairs for 8
localizers), for a reader who wants family-wise error control.
"""

from __future__ import annotations

import inspect
import warnings
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from .names import METHODS, display, ordered
from .results import Results
from .tables import Cell, Column, Row, Table

__all__ = ["SEED", "RESAMPLES", "CONFIDENCE", "CI_TABLES", "MIN_PAIRS", "bootstrap_ci", "add_ci",
           "SignedRank", "signed_rank", "holm", "signed_rank_notes", "pairs_table", "PAIRS_TITLE"]

SEED = 0
RESAMPLES = 10_000
CONFIDENCE = 0.95
CI_TABLES = ("III", "V", "VI")  # the tables whose means (WJI, CAD, ASRD) get intervals: add new ones here
MIN_PAIRS = 2
LIST_ROWS = 6  # a note names at most this many rows, else counts them
DECIMALS = 12  # differences are rounded to this many decimals before ranking
_MAX_BATCH_VALUES = 20_000_000  # resamples x entries held in memory at once (160 MB of float64)

PAIRS_TITLE = ("WJI of method B minus method A on the entries both localized: Wilcoxon signed-rank "
               "test per pair of methods (two-sided)")


# ------------------------------------------------------------------------------ bootstrap CIs


def _ratio(sums, counts, axis=-1):
    """The mean over cases of resampled entries: total of their values / number of values."""
    return sums.sum(axis=axis) / counts.sum(axis=axis)


def bootstrap_ci(values: Sequence[float], entries: Sequence[object] | None = None, *, seed: int = SEED,
                 resamples: int = RESAMPLES, confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """The percentile bootstrap ``confidence`` interval (lo, hi) of the mean of ``values``,
    resampling entries (``entries[i]`` is the entry of ``values[i]``; None: one entry per value);
    None with fewer than 2 entries. See the module docstring for the method."""
    import numpy as np
    from scipy.stats import bootstrap

    xs = np.asarray(values, dtype=float)
    if entries is not None and len(entries) != len(xs):
        raise ValueError(f"bootstrap_ci: {len(xs)} values but {len(entries)} entries")
    if entries is None or len(set(entries)) == len(xs):
        data, statistic, paired = (xs,), np.mean, False
    else:
        sums: dict[object, float] = defaultdict(float)
        counts: dict[object, int] = defaultdict(int)
        for x, e in zip(xs, entries):
            sums[e] += x
            counts[e] += 1
        data = (np.array(list(sums.values())), np.array([float(counts[e]) for e in sums]))
        statistic, paired = _ratio, True
    n = len(data[0])
    if n < 2:
        return None
    batch = None if n * resamples <= _MAX_BATCH_VALUES else max(1, _MAX_BATCH_VALUES // n)
    generator = np.random.default_rng(seed)
    # scipy >= 1.15 takes the generator as ``rng``, older versions as ``random_state`` (same draws)
    seeded = {"rng" if "rng" in inspect.signature(bootstrap).parameters else "random_state": generator}
    res = bootstrap(data, statistic, n_resamples=resamples, confidence_level=confidence, method="percentile",
                    paired=paired, batch=batch, **seeded)
    lo, hi = res.confidence_interval
    return float(lo), float(hi)


def _cell_ci(cell: Cell, **kw) -> Cell:
    if cell.value is None or len(cell.values) < 2:
        return cell
    ci = bootstrap_ci(cell.values, cell.entries or None, **kw)
    return cell if ci is None else replace(cell, lo=ci[0], hi=ci[1])


def add_ci(tables: dict[str, Table] | Iterable[Table], keys: Iterable[str] = CI_TABLES, *, seed: int = SEED,
           resamples: int = RESAMPLES, confidence: float = CONFIDENCE):
    """Give every cell of the tables whose key is in ``keys`` its bootstrap CI (``Cell.lo``,
    ``Cell.hi``) and flag their columns ``ci``; changes the tables in place and returns them."""
    keys = set(keys)
    for table in tables.values() if isinstance(tables, dict) else tables:
        if table.key not in keys:
            continue
        table.columns = [replace(c, ci=True) for c in table.columns]
        for row in table.rows:
            row.cells = [_cell_ci(c, seed=seed, resamples=resamples, confidence=confidence) for c in row.cells]
    return tables


# ------------------------------------------------------------------------------ paired tests


@dataclass(frozen=True)
class SignedRank:
    """A paired comparison: ``n`` differences, ``nonzero`` of them not zero, their ``median``,
    and the Wilcoxon signed-rank ``statistic`` W = min(R+, R-) and two-sided ``p`` (None, with
    ``reason``, when there is no test). ``method``: "exact", "exact sign flips" or "normal"."""

    n: int
    nonzero: int
    median: float | None
    statistic: float | None = None
    p: float | None = None
    method: str | None = None
    reason: str | None = None


def signed_rank(differences: Sequence[float]) -> SignedRank:
    """The two-sided Wilcoxon signed-rank test of ``differences`` (B - A per pair), zeros dropped;
    see the module docstring for the choice of null distribution."""
    import numpy as np
    from scipy import stats

    d = np.round(np.asarray(differences, dtype=float), DECIMALS) + 0.0  # + 0.0: no -0.0
    n = len(d)
    nonzero = d[d != 0]
    median = float(np.median(d)) if n else None
    base = SignedRank(n, len(nonzero), median)
    if n < MIN_PAIRS:
        return replace(base, reason=f"fewer than {MIN_PAIRS} pairs ({n})")
    if not len(nonzero):
        return replace(base, reason=f"all {n} differences are zero")
    ties = len(np.unique(np.abs(nonzero))) < len(nonzero)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's notes on ties / small samples: the method is chosen here
        if not ties and len(nonzero) == n and n <= 50:
            res, method = stats.wilcoxon(d, method="exact"), "exact"
        else:
            res = None
            if len(nonzero) <= 13 and hasattr(stats, "PermutationMethod"):
                try:  # every one of the 2^n sign flips (< 9999 resamples): exact, no randomness
                    res, method = stats.wilcoxon(nonzero, method=stats.PermutationMethod()), "exact sign flips"
                except (TypeError, ValueError):  # scipy < 1.15 takes no PermutationMethod here
                    res = None
            if res is None:
                try:
                    res = stats.wilcoxon(d, method="asymptotic")
                except ValueError:  # scipy < 1.15 calls the normal approximation "approx"
                    res = stats.wilcoxon(d, method="approx")
                method = "normal"
    return replace(base, statistic=float(res.statistic), p=float(res.pvalue), method=method)


def holm(ps: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values (None stays None; the family is the non-None ones)."""
    present = sorted((p, i) for i, p in enumerate(ps) if p is not None)
    m = len(present)
    out: list[float | None] = [None] * len(ps)
    running = 0.0
    for rank, (p, i) in enumerate(present):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def _entry_means(results: Results, metric: str) -> dict[str, dict[object, float]]:
    """localizer -> entry key -> mean ``metric`` of its counted localization cases there."""
    acc: dict[str, dict[object, list[float]]] = defaultdict(lambda: defaultdict(list))
    for c in results.cases:
        v = getattr(c, metric)
        if c.counted and c.case == "localization" and c.localizer is not None and v is not None:
            acc[c.localizer][c.entry_key].append(v)
    return {m: {e: sum(vs) / len(vs) for e, vs in per.items()} for m, per in acc.items()}


def pairs_table(results: Results, metric: str = "wji") -> Table:
    """Table "pairs": one row per pair of localizers (A before B in paper order): n entries both
    localized, the mean ``metric`` of A and of B over them, the median of B - A, the Wilcoxon
    signed-rank W and p, and Holm's adjusted p; notes say where there is no test, and why."""
    per = _entry_means(results, metric)
    methods = ordered(per, METHODS)
    table = Table("pairs", PAIRS_TITLE if metric == "wji" else PAIRS_TITLE.replace("WJI", metric.upper()),
                  ["method A", "method B"],
                  [Column("n"), Column("mean A"), Column("mean B"), Column("median B - A"), Column("W"),
                   Column("p"), Column("p (Holm)")],
                  empty_note="no data: fewer than two localizers with localization cases",
                  sources=results.provenance())
    tests, names = [], []
    for i, a in enumerate(methods):
        for b in methods[i + 1:]:
            common = [e for e in per[a] if e in per[b]]
            xa = [per[a][e] for e in common]
            xb = [per[b][e] for e in common]
            tests.append((signed_rank([y - x for x, y in zip(xa, xb)]), xa, xb))
            names.append((display(a, METHODS), display(b, METHODS)))
    adjusted = holm([t.p for t, _, _ in tests])
    for (t, xa, xb), keys, p_holm in zip(tests, names, adjusted):
        table.rows.append(Row(keys, [
            Cell(t.n, 1, "int"), Cell.mean(xa, "fixed3"), Cell.mean(xb, "fixed3"),
            Cell(t.median, t.n, "fixed3"),
            Cell(t.statistic, t.nonzero if t.statistic is not None else 0, "g"),
            Cell(t.p, t.nonzero if t.p is not None else 0, "p"),
            Cell(p_holm, t.nonzero if p_holm is not None else 0, "p")]))
    if table.rows:
        table.notes = signed_rank_notes([f"{a} vs {b}" for a, b in names], [t for t, _, _ in tests],
                                 f"{metric.upper()} of B minus A on the same entry")
        if any(t.p is not None for t, _, _ in tests):
            table.notes.append(f"p (Holm): Holm-adjusted over the {sum(t.p is not None for t, _, _ in tests)} "
                               "tests of this table.")
    return table


def signed_rank_notes(names: Sequence[str], tests: Sequence[SignedRank], what: str) -> list[str]:
    """The notes under a table of signed-rank tests (``names[i]`` names the row of ``tests[i]``):
    the method, the rows without a test and why, and the rows whose p is not from the exact null
    distribution (named when at most ``LIST_ROWS``, else counted)."""
    notes = [f"Differences: {what}; zero differences are dropped from the test. W = min(R+, R-); "
             "p two-sided (scipy.stats.wilcoxon), from the exact null distribution unless said below."]
    groups = [
        (lambda t: t.p is None and t.n < MIN_PAIRS, f"No test (p —), fewer than {MIN_PAIRS} pairs"),
        (lambda t: t.p is None and t.n >= MIN_PAIRS, "No test (p —), all differences are zero"),
        (lambda t: t.method == "exact sign flips",
         "p by exact enumeration of all sign flips (ties or zeros, at most 13 non-zero differences)"),
        (lambda t: t.method == "normal",
         "p by normal approximation, tie-corrected (ties or zeros, or more than 50 pairs)"),
    ]
    for match, text in groups:
        rows = [f"{name} (n = {t.n})" for t, name in zip(tests, names) if match(t)]
        if not rows:
            continue
        if len(rows) <= LIST_ROWS:
            notes.append(f"{text}: {'; '.join(rows)}.")
        else:
            notes.append(f"{text}: {len(rows)} of {len(tests)} rows.")
    return notes
