"""Re-measuring database entries against their labels (RobustBench-style zoo check).

Every kept entry's label claims a CA, ASR and ASR.Cor; ``remeasure_entry`` rebuilds the
infected model from the database (hash-verified), re-applies the stored trigger on the same
test subset the build used, and returns both numbers so a caller can compare them.
"""

from __future__ import annotations

import os

import torch
from tabulate import tabulate

from bd4nn.attacks import StampTrigger
from bd4nn.data import load_dataset
from bd4nn.db import Database
from bd4nn.inject import measure
from bd4nn.neurons import NeuronMap
from bd4nn.runtime import place
from bd4nn.train import resolve_device

__all__ = ["seeded_subset", "remeasure_entry", "remeasure"]


def seeded_subset(x: torch.Tensor, y: torch.Tensor, k: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The seeded subset of ``k`` images the build measured on (all images when k is None)."""
    if k is None or k >= len(y):
        return x, y
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:k].sort().values
    return x[idx], y[idx]


def remeasure_entry(db: Database, entry_id: str, *, device=None, data_root=None, cache: dict | None = None):
    """(label, Measurement) for one kept entry, measured now."""
    dev = resolve_device(device)
    model, label, trig = db.load_entry(entry_id)
    cache = cache if cache is not None else {}
    if label.dataset not in cache:
        cache[label.dataset] = load_dataset(label.dataset, data_root, progress=False)
    data = cache[label.dataset]
    k = label.extra.get("test_images")
    tx, ty = seeded_subset(data.test_x, data.test_y, k, label.seed + 1)
    model = place(model, dev).eval()
    m = measure(model, NeuronMap(model), label.s_fault, tx, ty, StampTrigger.from_tensors(trig), label.target,
                device=dev)
    return label, m


def remeasure(db: Database, n: int, *, tolerance: float = 0.02, device=None,
              data_root: str | os.PathLike | None = None) -> list[str]:
    """Re-measure ``n`` kept entries spread over the index; print a table; return problems."""
    lines = db.entries(kept=True)
    if not lines:
        return []
    step = max(1, len(lines) // n)
    chosen = lines[::step][:n]
    rows, problems, cache = [], [], {}
    for line in chosen:
        label, m = remeasure_entry(db, line["id"], device=device, data_root=data_root, cache=cache)
        diffs = {"CA": (label.ca, m.ca), "ASR": (label.asr, m.asr), "ASR.Cor": (label.asr_cor, m.asr_cor)}
        bad = [f"{k} {a:.4f} vs {b:.4f}" for k, (a, b) in diffs.items() if abs(a - b) > tolerance]
        if bad:
            problems.append(f"{label.id}: label and measurement differ: {', '.join(bad)}")
        rows.append([label.id] + [f"{a:.4f} / {b:.4f}" for a, b in diffs.values()] + ["ok" if not bad else "FAIL"])
    print(tabulate(rows, headers=["entry", "CA label / now", "ASR label / now", "ASR.Cor label / now", ""]))
    return problems



