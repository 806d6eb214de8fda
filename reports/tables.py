"""The paper's tables as data: ``build_tables(results) -> {"I": Table, ..., "counts": Table}``.

Every cell is a mean over cases (``Cell.value``, ``Cell.n``); skipped cases and null metrics do
not count, and a cell without data has ``value is None`` (printed "—", never 0). How a value is
printed is the cell's ``kind``: ``pct`` (a fraction shown as a percentage, one decimal),
``fixed3`` (three decimals), ``sig3`` (three significant figures), ``int``, ``g`` (up to six
significant figures, e.g. a rank sum "10.5") and ``p`` (a p-value: three significant figures,
below 0.001 as "1.23e-05").

The cells of tables III, V and VI (means of WJI, CAD, ASRD) keep the values they average and
the entry each came from (``Cell.values``, ``Cell.entries``), so that ``reports.stats.add_ci``
can give them a bootstrap confidence interval (``Cell.lo``, ``Cell.hi``) on request; a cell
prints its interval only once it has one, and ``Cell`` equality ignores the kept values.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .names import ARCHS, ATTACKS, DATASETS, LEVELS, METHODS, display, ordered
from .controls import benign_asr_by_model, detection_table
from .results import Case, Results

__all__ = ["Cell", "Column", "Row", "Table", "TABLE_KEYS", "build_tables"]

TABLE_KEYS = ("I", "II", "III", "IV", "V", "VI", "detection", "counts")
EMPTY = "—"


@dataclass(frozen=True)
class Cell:
    """A mean over ``n`` values (``value`` None when n == 0) and how to print it.

    ``lo``/``hi``: a confidence interval of ``value`` (same unit), None unless one was computed
    (``reports.stats.add_ci``). ``values``/``entries``: the values averaged and the entry key of
    each (empty when not kept); not part of equality.
    """

    value: float | None
    n: int
    kind: str = "fixed3"
    lo: float | None = None
    hi: float | None = None
    values: tuple[float, ...] = field(default=(), compare=False, repr=False)
    entries: tuple = field(default=(), compare=False, repr=False)

    @classmethod
    def mean(cls, values: Iterable[float | None], kind: str, entries: Iterable[object] | None = None) -> Cell:
        """The mean of the non-None ``values``; with ``entries`` (one key per value) the cell
        keeps both, for a bootstrap CI over entries later."""
        if entries is None:
            xs = [v for v in values if v is not None]
            return cls(sum(xs) / len(xs) if xs else None, len(xs), kind)
        pairs = [(v, e) for v, e in zip(values, entries, strict=True) if v is not None]
        xs = [v for v, _ in pairs]
        return cls(sum(xs) / len(xs) if xs else None, len(xs), kind,
                   values=tuple(xs), entries=tuple(e for _, e in pairs))

    @property
    def number(self) -> float | None:
        """The value in the printed unit (percent for ``pct``), unrounded."""
        if self.value is None:
            return None
        return self.value * 100.0 if self.kind == "pct" else self.value

    @property
    def bounds(self) -> tuple[float, float] | None:
        """The confidence interval in the printed unit (percent for ``pct``), or None."""
        if self.lo is None or self.hi is None:
            return None
        scale = 100.0 if self.kind == "pct" else 1.0
        return self.lo * scale, self.hi * scale

    def text(self) -> str:
        """The printed form: "93.4", "0.300", "1.23", "12", or "—" without data."""
        x = self.number
        return EMPTY if x is None else _format(x, self.kind)

    def ci_text(self) -> str:
        """The interval as printed after the value, "[0.410, 0.530]"; "" without one."""
        b = self.bounds
        return "" if b is None else f"[{_format(b[0], self.kind)}, {_format(b[1], self.kind)}]"


def _format(x: float, kind: str) -> str:
    """``x`` (in the printed unit) as a cell of ``kind`` prints it."""
    if kind == "pct":
        s = f"{x:.1f}"
    elif kind == "sig3":
        s = _sig3(x)
    elif kind == "int":
        s = str(round(x))
    elif kind == "g":
        s = f"{x:.6g}"
    elif kind == "p":
        s = _sig3(x) if x >= 1e-3 or x == 0 else f"{x:.2e}"
    else:
        s = f"{x:.3f}"
    return s[1:] if s.startswith("-") and not s.strip("-0.") else s  # no "-0.0"


def _sig3(x: float) -> str:
    if x == 0:
        return "0"
    r = float(f"{x:.3g}")
    decimals = 2 - math.floor(math.log10(abs(r)))
    return f"{r:.{max(decimals, 0)}f}"


@dataclass(frozen=True)
class Column:
    """A value column: ``label`` (e.g. "narrow") under an optional ``group`` (e.g. "VGG-13")."""

    label: str
    group: str | None = None
    ci: bool = False  # its cells carry confidence intervals (csv: "<name> lo", "<name> hi" columns)

    @property
    def name(self) -> str:
        return f"{self.group} {self.label}" if self.group else self.label


@dataclass
class Row:
    keys: tuple[str, ...]
    cells: list[Cell]


@dataclass
class Table:
    """One table: row key columns (``key_headers``), value ``columns`` and ``rows``."""

    key: str
    title: str
    key_headers: list[str]
    columns: list[Column]
    rows: list[Row] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    empty_note: str = "no data"
    notes: list[str] = field(default_factory=list)  # printed under the table (not in csv)

    @property
    def label(self) -> str:
        """"Table III" for a numbered table, else a name ("Counts", "Paired tests")."""
        if self.key in _ROMAN:
            return f"Table {self.key}"
        return _LABELS.get(self.key, self.key.capitalize())

    @property
    def file_stem(self) -> str:
        """``table3`` for Table III, else the key (``counts``, ``pairs``)."""
        return f"table{_ROMAN[self.key]}" if self.key in _ROMAN else self.key.lower()

    def cell(self, row: str | tuple[str, ...], column: str, group: str | None = None) -> Cell:
        """The cell at row keys ``row`` (display names) and the column ``label`` (in ``group``)."""
        keys = (row,) if isinstance(row, str) else tuple(row)
        j = next((j for j, c in enumerate(self.columns) if c.label == column and c.group == group), None)
        if j is None:
            raise KeyError(f"{self.label} has no column {column!r} in group {group!r}")
        for r in self.rows:
            if r.keys == keys:
                return r.cells[j]
        raise KeyError(f"{self.label} has no row {keys!r}")


_ROMAN = {"I": 1, "II": 2, "III": 3, "IV": 4, "V": 5, "VI": 6, "VII": 7, "VIII": 8, "IX": 9, "X": 10}
_LABELS = {"counts": "Counts", "pairs": "Paired tests", "compare": "Comparison", "detection": "Detection"}

TITLES = {
    "I": "Clean accuracy (CA, %) of the infected entries per dataset, architecture and level; "
         "benign = CA of the benign parent model",
    "II": "Attack success rate (ASR, %) of the infected entries per dataset, architecture and level; "
          "benign = ASR of the same triggers on the benign parent model (natural backdoors)",
    "III": "Localization: mean WJI per method, architecture and level",
    "IV": "Localization time: mean seconds per model, per method and architecture",
    "V": "Repair by neuron pruning: CAD and ASRD (%) per method, architecture and level",
    "VI": "Repair by neuron fine-tuning: CAD and ASRD (%) per method, architecture and level",
    "counts": "Database: kept and rejected candidates per directory (kept iff ASR.Cor > 0.5)",
}


# ------------------------------------------------------------------------------------- helpers


def _counted(cases: Iterable[Case], kind: str | None = None, repair: str | None = None) -> list[Case]:
    """Cases that count (not skipped) with a localizer, of case ``kind`` / ``repair`` if given."""
    return [c for c in cases if c.counted and c.localizer is not None
            and (kind is None or c.case == kind) and (repair is None or c.repair == repair)]


def _entry_values(results: Results, metric: str) -> list[Case]:
    """One case per entry carrying ``metric``: its database case if any, else the first other."""
    best: dict[object, Case] = {}
    for c in results.cases:
        if not c.counted or getattr(c, metric) is None:
            continue
        old = best.get(c.entry_key)
        if old is None or (c.case == "database" and old.case != "database"):
            best[c.entry_key] = c
    return list(best.values())


ALL = object()  # the "mean" bucket: all archs or all levels


def _collect(cases: Iterable[Case], metric: str, keys: Callable[[Case], Iterable[tuple]], *,
             entries: bool = False) -> dict[tuple, list]:
    """The non-null ``metric`` values of ``cases`` in every bucket ``keys(case)`` names; with
    ``entries``, (value, entry key) pairs."""
    out: dict[tuple, list] = defaultdict(list)
    for c in cases:
        v = getattr(c, metric)
        if v is not None:
            for k in keys(c):
                out[k].append((v, c.entry_key) if entries else v)
    return out


def _entry_mean(pairs: Iterable[tuple[float, object]], kind: str) -> Cell:
    """The mean cell of (value, entry key) pairs, keeping both (for a CI over entries)."""
    pairs = list(pairs)
    return Cell.mean([v for v, _ in pairs], kind, [e for _, e in pairs])


def _grouped(cases: list[Case], row_of: Callable[[Case], tuple], rows: list[tuple], archs: list[str],
             levels: list[str], metric: str, kind: str) -> list[list[Cell]]:
    """Cells of each row: for each arch its levels then "mean", then the overall mean."""
    def keys(c: Case) -> list[tuple]:
        r = row_of(c)
        return [(r, c.arch, c.level), (r, c.arch, ALL), (r, ALL, ALL)]

    b = _collect(cases, metric, keys, entries=True)
    cols = [(a, lv) for a in archs for lv in [*levels, ALL]] + [(ALL, ALL)]
    return [[_entry_mean(b.get((r, a, lv), ()), kind) for a, lv in cols] for r in rows]


def _arch_level_columns(archs: list[str], levels: list[str]) -> list[Column]:
    cols = []
    for arch in archs:
        group = display(arch, ARCHS)
        cols += [Column(display(lv, LEVELS), group) for lv in levels] + [Column("mean", group)]
    return cols + [Column("mean")]


def _method_rows(cases: list[Case], multi: bool) -> list[tuple[str | None, str]]:
    """(dataset, method) in paper order; dataset is None unless several datasets are shown."""
    datasets = ordered((c.dataset for c in cases), DATASETS) if multi else [None]
    rows = []
    for ds in datasets:
        in_ds = [c for c in cases if ds is None or c.dataset == ds]
        rows += [(ds, m) for m in ordered((c.localizer for c in in_ds), METHODS)]
    return rows


def _row_of(multi: bool) -> Callable[[Case], tuple[str | None, str | None]]:
    """A case's row in tables III-VI: (dataset or None, method)."""
    return (lambda c: (c.dataset, c.localizer)) if multi else (lambda c: (None, c.localizer))


def _method_keys(ds: str | None, method: str) -> tuple[str, ...]:
    keys = (display(method, METHODS),)
    return keys if ds is None else (display(ds, DATASETS),) + keys


# -------------------------------------------------------------------------------------- tables


def _entry_table(results: Results, key: str, metric: str, title: str) -> Table:
    entries = _entry_values(results, metric)
    levels = ordered([c.level for c in results.cases if c.counted]
                     + [d.level for d in results.directories], LEVELS)  # same columns in I and II
    pairs = {(c.dataset, c.arch) for c in entries} | {(d.dataset, d.arch) for d in results.directories}
    pairs = {(ds, a) for ds, a in pairs if ds is not None and a is not None}
    benign_of: dict[tuple, list[float]] = {}
    if metric == "ca":  # the benign parent's CA: from directory lines, else from the entries' cases
        benign_of = _collect(_entry_values(results, "benign_ca"), "benign_ca", lambda c: [(c.dataset, c.arch)])
        benign_of.update(_collect(results.directories, "benign_ca", lambda d: [(d.dataset, d.arch)]))
    else:  # the triggers on the benign parent (bench/test_benign.py)
        benign_of = benign_asr_by_model(results)
    benign = bool(benign_of)
    columns = [Column(display(lv, LEVELS)) for lv in levels] + [Column("mean")]
    if benign:
        columns.append(Column("benign"))
    table = Table(key, title, ["dataset", "arch"], columns,
                  empty_note="no data: no case carries an entry's " + metric.upper())
    b = _collect(entries, metric, lambda c: [(c.dataset, c.arch, c.level), (c.dataset, c.arch, ALL)])
    for ds in ordered((p[0] for p in pairs), DATASETS):
        for arch in ordered((a for d, a in pairs if d == ds), ARCHS):
            cells = [Cell.mean(b.get((ds, arch, lv), ()), "pct") for lv in [*levels, ALL]]
            if benign:
                cells.append(Cell.mean(benign_of.get((ds, arch), ()), "pct"))
            table.rows.append(Row((display(ds, DATASETS), display(arch, ARCHS)), cells))
    return table


def _wji_table(results: Results, multi: bool) -> Table:
    cases = _counted(results.cases, "localization")
    archs, levels = ordered((c.arch for c in cases), ARCHS), ordered((c.level for c in cases), LEVELS)
    table = Table("III", TITLES["III"], (["dataset"] if multi else []) + ["method"],
                  _arch_level_columns(archs, levels), empty_note="no data: no localization cases")
    rows = _method_rows(cases, multi)
    cells = _grouped(cases, _row_of(multi), rows, archs, levels, "wji", "fixed3")
    table.rows = [Row(_method_keys(*r), cs) for r, cs in zip(rows, cells)]
    return table


def _time_table(results: Results, multi: bool) -> Table:
    cases = _counted(results.cases, "localization")
    archs = ordered((c.arch for c in cases), ARCHS)
    table = Table("IV", TITLES["IV"], (["dataset"] if multi else []) + ["method"],
                  [Column(display(a, ARCHS)) for a in archs] + [Column("mean")],
                  empty_note="no data: no localization cases")
    row_of = _row_of(multi)
    b = _collect(cases, "time_s", lambda c: [(row_of(c), c.arch), (row_of(c), ALL)])
    for r in _method_rows(cases, multi):
        table.rows.append(Row(_method_keys(*r), [Cell.mean(b.get((r, a), ()), "sig3") for a in [*archs, ALL]]))
    return table


def _repair_table(results: Results, key: str, repair: str, title: str, multi: bool) -> Table:
    cases = _counted(results.cases, repair=repair)
    archs, levels = ordered((c.arch for c in cases), ARCHS), ordered((c.level for c in cases), LEVELS)
    table = Table(key, title, (["dataset"] if multi else []) + ["method", "metric"],
                  _arch_level_columns(archs, levels), empty_note=f"no data: no {repair} cases")
    rows = _method_rows(cases, multi)
    cad = _grouped(cases, _row_of(multi), rows, archs, levels, "cad", "pct")
    asrd = _grouped(cases, _row_of(multi), rows, archs, levels, "asrd", "pct")
    for r, cad_cells, asrd_cells in zip(rows, cad, asrd):
        table.rows += [Row(_method_keys(*r) + ("CAD",), cad_cells), Row(_method_keys(*r) + ("ASRD",), asrd_cells)]
    return table


def _counts_table(results: Results) -> Table:
    table = Table("counts", TITLES["counts"],
                  ["dataset", "arch", "attack", "level"],
                  [Column("kept"), Column("rejected"), Column("kept %")],
                  empty_note="no data: no directory lines")

    dirs = results.directories
    rank = {name: {v: i for i, v in enumerate(ordered((getattr(d, name) for d in dirs), known))}
            for name, known in [("dataset", DATASETS), ("arch", ARCHS), ("attack", ATTACKS), ("level", LEVELS)]}

    def order(d) -> tuple[int, ...]:
        return tuple(rank[name].get(getattr(d, name), -1) for name in rank)

    total_kept = total_rejected = 0
    for d in sorted(dirs, key=order):
        kept, rejected = d.kept, d.rejected
        share = kept / (kept + rejected) if kept is not None and rejected is not None and kept + rejected else None
        table.rows.append(Row(
            (display(d.dataset or "—", DATASETS), display(d.arch or "—", ARCHS),
             display(d.attack or "—", ATTACKS), display(d.level or "—", LEVELS)),
            [Cell(kept, int(kept is not None), "int"), Cell(rejected, int(rejected is not None), "int"),
             Cell(share, int(share is not None), "pct")]))
        total_kept += kept or 0
        total_rejected += rejected or 0
    if len(dirs) > 1:
        n = total_kept + total_rejected
        table.rows.append(Row(("total", "", "", ""), [
            Cell(total_kept, len(dirs), "int"), Cell(total_rejected, len(dirs), "int"),
            Cell(total_kept / n if n else None, len(dirs) if n else 0, "pct")]))
    return table


def build_tables(results: Results) -> dict[str, Table]:
    """All tables, in order "I", "II", "III", "IV", "V", "VI", "detection", "counts" (empty ones
    included; "detection" and Table II's "benign" column come from the benign controls,
    ``reports.controls``).

    With several datasets in ``results``, tables III–VI put the dataset first in each row.
    """
    multi = len({c.dataset for c in results.cases if c.dataset is not None}) > 1
    tables = {
        "I": _entry_table(results, "I", "ca", TITLES["I"]),
        "II": _entry_table(results, "II", "asr", TITLES["II"]),
        "III": _wji_table(results, multi),
        "IV": _time_table(results, multi),
        "V": _repair_table(results, "V", "prune", TITLES["V"], multi),
        "VI": _repair_table(results, "VI", "finetune", TITLES["VI"], multi),
        "detection": detection_table(results),
        "counts": _counts_table(results),
    }
    sources = results.provenance()
    for t in tables.values():
        t.sources = list(sources)
    return tables
