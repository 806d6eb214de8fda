"""The benign controls' tables (issue 15): how well a localizer's score summary tells infected
models from benign ones, and the ASR each trigger already has on its benign parent.

* **Detection.** Per localizer, the AUROC of separating the infected entries (its
  ``localization`` cases) from the benign parents (its ``benign`` cases) by ``score_max_z``, the
  largest per-layer standardized score: ``P(infected > benign) + 0.5 P(tie)``, the Mann-Whitney
  U statistic over the product of the two sample sizes (``scipy.stats.mannwhitneyu``). 0.5 is
  chance; a localizer that flags neurons as strongly on a clean model as on an infected one
  scores about 0.5. The table also gives both sample sizes and both means.
* **Natural-backdoor baseline.** ``benign_asr_by_model``: per (dataset, arch), the mean ASR of
  the entries' triggers on their benign parent (``benign_trigger`` cases); Table II prints it as
  its "benign" column, as Table I prints the parent's CA.
"""

from __future__ import annotations

from collections import defaultdict

from scipy.stats import mannwhitneyu

from .names import METHODS, display, ordered
from .results import Case, Results

__all__ = ["detection_auroc", "detection_table", "benign_asr_by_model", "DETECTION_TITLE"]

DETECTION_TITLE = ("AUROC of telling infected entries from benign parents by the largest per-layer "
                   "standardized score, per method (0.5 = chance); n and mean max z of each")


def detection_auroc(infected: list[float], benign: list[float]) -> float | None:
    """``P(x > y) + 0.5 P(x = y)`` for x from ``infected``, y from ``benign``; None if either is empty."""
    if not infected or not benign:
        return None
    u = mannwhitneyu(infected, benign, alternative="two-sided").statistic  # U of the first sample
    return float(u) / (len(infected) * len(benign))


def _summaries(cases: list[Case], kind: str) -> dict[str, list[float]]:
    out: dict[str, list[float]] = defaultdict(list)
    for c in cases:
        if c.counted and c.case == kind and c.localizer is not None and c.score_max_z is not None:
            out[c.localizer].append(c.score_max_z)
    return out


def detection_table(results: Results):
    """Table "detection": one row per localizer with both kinds of case."""
    from .tables import Cell, Column, Row, Table  # noqa: PLC0415 (tables imports this module)

    infected, benign = _summaries(results.cases, "localization"), _summaries(results.cases, "benign")
    table = Table("detection", DETECTION_TITLE, ["method"],
                  [Column("AUROC"), Column("infected"), Column("benign"), Column("max z, infected"),
                   Column("max z, benign")],
                  empty_note="no data: needs localization cases and benign control cases of the same "
                             "method (pytest bench/ -k benign)")
    for m in ordered((m for m in infected if m in benign), METHODS):
        x, y = infected[m], benign[m]
        table.rows.append(Row((display(m, METHODS),), [
            Cell(detection_auroc(x, y), 1, "fixed3"), Cell(len(x), 1, "int"), Cell(len(y), 1, "int"),
            Cell.mean(x, "sig3"), Cell.mean(y, "sig3")]))
    return table


def benign_asr_by_model(results: Results) -> dict[tuple[str | None, str | None], list[float]]:
    """(dataset, arch) -> the ``benign_asr`` of every entry (one value per entry)."""
    seen: dict[object, Case] = {}
    for c in results.cases:
        if c.counted and c.case == "benign_trigger" and c.benign_asr is not None:
            seen.setdefault(c.entry_key, c)
    out: dict[tuple, list[float]] = defaultdict(list)
    for c in seen.values():
        out[(c.dataset, c.arch)].append(c.benign_asr)
    return dict(out)
