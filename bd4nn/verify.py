"""Re-measuring database entries against their labels (RobustBench-style zoo check).

The one home of the check that ``bd4nn verify --remeasure`` and the database cases of
``pytest bench/`` both run: load the entry as the harness does (``bd4nn.harness.load_context``:
the hash-verified model, the stored trigger, the test images the build measured on), measure CA,
ASR and ASR.Cor again (``bd4nn.inject.measure``), and compare with the label within ``TOLERANCE``.
"""

from __future__ import annotations

import os

from tabulate import tabulate

from bd4nn.db import Database, DefectLabel
from bd4nn.harness import EntryContext, load_context
from bd4nn.inject import Measurement, measure
from bd4nn.train import resolve_device

__all__ = ["TOLERANCE", "remeasure_context", "remeasure_entry", "differences", "remeasure"]

TOLERANCE = 0.02  # largest allowed |label - measurement| of CA, ASR and ASR.Cor (fractions)


def remeasure_context(ctx: EntryContext) -> Measurement:
    """CA, ASR and ASR.Cor of a loaded entry, measured now on the label's test images."""
    lab = ctx.label
    return measure(ctx.model, ctx.neuron_map, lab.s_fault, ctx.test_x, ctx.test_y, ctx.trigger, lab.target,
                   device=ctx.device)


def remeasure_entry(db: Database, entry_id: str, *, device=None, data_root=None,
                    cache: dict | None = None) -> tuple[DefectLabel, Measurement]:
    """(label, Measurement) for one kept entry; ``cache`` keeps loaded datasets by name."""
    from bd4nn.data import load_dataset

    cache = cache if cache is not None else {}
    dataset = db.entry(entry_id)["dataset"]
    if dataset not in cache:
        cache[dataset] = load_dataset(dataset, data_root, progress=False)
    ctx = load_context(db, entry_id, device=resolve_device(device), data=cache)
    return ctx.label, remeasure_context(ctx)


def differences(label: DefectLabel, m: Measurement, tolerance: float = TOLERANCE) -> list[str]:
    """What differs from the label by more than ``tolerance`` (empty: the entry reproduces)."""
    pairs = {"CA": (label.ca, m.ca), "ASR": (label.asr, m.asr), "ASR.Cor": (label.asr_cor, m.asr_cor)}
    return [f"{k} {now:.4f} vs label {then:.4f}" for k, (then, now) in pairs.items() if abs(then - now) > tolerance]


def remeasure(db: Database, n: int, *, tolerance: float | None = None, device=None,
              data_root: str | os.PathLike | None = None) -> list[str]:
    """Re-measure ``n`` kept entries spread over the index; print a table; return problems.
    ``tolerance`` defaults to ``TOLERANCE``."""
    tolerance = TOLERANCE if tolerance is None else tolerance
    lines = db.entries(kept=True)
    if not lines:
        return []
    chosen = lines[::max(1, len(lines) // n)][:n]
    rows, problems, cache = [], [], {}
    for line in chosen:
        label, m = remeasure_entry(db, line["id"], device=device, data_root=data_root, cache=cache)
        bad = differences(label, m, tolerance)
        if bad:
            problems.append(f"{label.id}: label and measurement differ: {', '.join(bad)}")
        rows.append([label.id] + [f"{a:.4f} / {b:.4f}" for a, b in
                                  ((label.ca, m.ca), (label.asr, m.asr), (label.asr_cor, m.asr_cor))]
                    + ["ok" if not bad else "FAIL"])
    print(tabulate(rows, headers=["entry", "CA label / now", "ASR label / now", "ASR.Cor label / now", ""]))
    return problems
