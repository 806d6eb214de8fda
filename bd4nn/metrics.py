"""Metrics of the bd4nn benchmark: pure functions on CPU tensors / numpy arrays.

What each function computes, and where in METHODS.md it is defined:

- :func:`clean_accuracy`, :func:`attack_success_rate` — CA and ASR (METHODS.md §1, "Terms").
  ASR counts only test images whose *true* label is not the target.
- :func:`correlation` — ASR.Cor / CA.Cor / Cor.R: the metric of the full infected model minus the
  metric with a selection masked (METHODS.md §2, rule 3).
- :func:`wji`, :func:`jaccard`, :func:`hits`, :func:`selection_size` — localization quality
  (METHODS.md §3): ``WJI = sum_{i in S_fault ∩ S_localized} RC_i * m / |S_fault ∪ S_localized|``
  with ``m = |S_fault|``; uniform RC gives the Jaccard index.
- :func:`top_k_selection` — the budget rule of METHODS.md §3: in each covered layer the top-k
  neurons by score, ``k = |S_fault ∩ layer|``, ties broken by a seeded random order;
  :func:`tied_layers` — where a tie decided the cut.
- :func:`auroc`, :func:`average_precision`, :func:`flatten_scores` — the threshold-free ranking
  quality over all covered neurons [decision, METHODS.md §3 "Beyond the paper"].
- :func:`cad`, :func:`asrd` — repair effect ``CA(infected) - CA(repaired)`` and
  ``ASR(infected) - ASR(repaired)`` (METHODS.md §4).

Conventions (DESIGN.md, "Core notions"):

- a **selection** is ``dict[str, list[int]]``: layer name -> sorted channel indices; a neuron is
  the pair ``(layer, channel)``, so the same channel index in two layers is two neurons.
- an **RC** is ``dict[str, list[float]]`` aligned with the fault selection (same layers, same
  channel order, same lengths), non-negative, summing to 1 over all fault neurons.
"""

from __future__ import annotations

import math
import operator
import zlib
from collections.abc import Mapping, Sequence
from typing import Union

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "Selection",
    "RC",
    "ArrayLike",
    "RC_SUM_TOL",
    "clean_accuracy",
    "attack_success_rate",
    "wji",
    "jaccard",
    "hits",
    "selection_size",
    "cad",
    "asrd",
    "correlation",
    "auroc",
    "average_precision",
    "flatten_scores",
    "top_k_selection",
    "tied_layers",
]

Selection = dict[str, list[int]]
RC = dict[str, list[float]]
ArrayLike = Union[Tensor, np.ndarray, Sequence[float]]

#: Tolerance on ``sum(RC) == 1`` (METHODS.md §2, "RC").
RC_SUM_TOL = 1e-4


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _as_numpy(x: ArrayLike, name: str) -> np.ndarray:
    """A 1-D float64 numpy copy of a tensor / array / sequence."""
    if isinstance(x, Tensor):
        arr = x.detach().cpu().to(torch.float64).numpy()
    else:
        arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(arr.shape)}")
    return arr


def _binary_labels(labels: ArrayLike, n: int) -> np.ndarray:
    """Validate 0/1 (or bool) labels of length ``n``; return them as a bool array."""
    lab = _as_numpy(labels, "labels")
    if lab.shape[0] != n:
        raise ValueError(f"scores and labels differ in length: {n} vs {lab.shape[0]}")
    if not np.all((lab == 0) | (lab == 1)):
        bad = np.unique(lab[(lab != 0) & (lab != 1)])[:5]
        raise ValueError(f"labels must be 0/1 (or bool); found values {bad.tolist()}")
    return lab == 1


def _scores_1d(scores: ArrayLike) -> np.ndarray:
    s = _as_numpy(scores, "scores")
    if np.isnan(s).any():
        raise ValueError(
            f"scores contain {int(np.isnan(s).sum())} NaN value(s); a localizer must return "
            "comparable scores for every neuron it covers"
        )
    return s


def _predictions(preds: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Class predictions and labels as flat CPU int64 tensors of equal length.

    ``preds`` may be class indices (same shape as ``labels``) or logits / probabilities with one
    extra trailing class dimension, in which case the argmax is taken.
    """
    preds = torch.as_tensor(preds).detach().cpu()
    labels = torch.as_tensor(labels).detach().cpu()
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {tuple(labels.shape)}")
    if preds.ndim == 2:
        preds = preds.argmax(dim=1)
    elif preds.ndim != 1:
        raise ValueError(
            f"preds must be class indices (N,) or logits (N, C), got shape {tuple(preds.shape)}"
        )
    if preds.shape[0] != labels.shape[0]:
        raise ValueError(
            f"preds and labels differ in length: {preds.shape[0]} vs {labels.shape[0]}"
        )
    if preds.is_floating_point() or labels.is_floating_point():
        raise ValueError("preds and labels must be integer class indices (or preds logits (N, C))")
    return preds.to(torch.int64), labels.to(torch.int64)


def _channel(c: object, layer: str, what: str) -> int:
    if isinstance(c, (bool, np.bool_)) or (isinstance(c, Tensor) and c.dtype == torch.bool):
        raise ValueError(f"{what}: channel {c!r} in layer {layer!r} is a bool, not an index")
    try:
        i = operator.index(c)
    except TypeError:
        raise ValueError(
            f"{what}: channel {c!r} in layer {layer!r} is not an integer index"
        ) from None
    if i < 0:
        raise ValueError(f"{what}: channel {i} in layer {layer!r} is negative")
    return i


def _neurons(sel: Mapping[str, Sequence[int]], what: str) -> set[tuple[str, int]]:
    """The set of ``(layer, channel)`` neurons of a selection, validated."""
    if not isinstance(sel, Mapping):
        raise TypeError(f"{what} must be a dict {{layer: [channels]}}, got {type(sel).__name__}")
    out: set[tuple[str, int]] = set()
    for layer, channels in sel.items():
        if not isinstance(layer, str):
            raise TypeError(f"{what}: layer names must be str, got {layer!r}")
        listlike = (Sequence, set, frozenset, np.ndarray, Tensor)
        if isinstance(channels, (str, bytes)) or not isinstance(channels, listlike):
            raise TypeError(f"{what}: layer {layer!r} must map to a list of channels")
        seen: set[int] = set()
        for c in channels:
            i = _channel(c, layer, what)
            if i in seen:
                raise ValueError(f"{what}: channel {i} appears twice in layer {layer!r}")
            seen.add(i)
            out.add((layer, i))
    return out


def _validated_rc(
    fault: Mapping[str, Sequence[int]], rc: Mapping[str, Sequence[float]]
) -> dict[tuple[str, int], float]:
    """Map each fault neuron to its RC weight, after checking alignment and normalization."""
    if not isinstance(rc, Mapping):
        raise TypeError(f"rc must be a dict {{layer: [weights]}}, got {type(rc).__name__}")
    for layer, weights in rc.items():
        if layer not in fault and len(weights) > 0:
            raise ValueError(
                f"rc has weights for layer {layer!r}, which is not in the fault selection"
            )
    weight_of: dict[tuple[str, int], float] = {}
    total = 0.0
    for layer, channels in fault.items():
        weights = rc.get(layer, [])
        if len(weights) != len(channels):
            raise ValueError(
                f"rc is not aligned with the fault selection in layer {layer!r}: "
                f"{len(weights)} weight(s) for {len(channels)} channel(s)"
            )
        for c, w in zip(channels, weights):
            w = float(w)
            if not math.isfinite(w) or w < 0:
                raise ValueError(
                    f"rc weight of ({layer!r}, {int(c)}) is {w}; must be finite and >= 0"
                )
            weight_of[(layer, int(c))] = w
            total += w
    if abs(total - 1.0) > RC_SUM_TOL:
        raise ValueError(f"rc weights sum to {total:.6g}, not 1 (tolerance {RC_SUM_TOL})")
    return weight_of


# --------------------------------------------------------------------------------------------
# CA / ASR and differences (METHODS.md §1, §2 rule 3, §4)
# --------------------------------------------------------------------------------------------


def clean_accuracy(preds: Tensor, labels: Tensor) -> float:
    """Fraction of ``preds`` equal to ``labels`` (METHODS.md §1).

    ``preds``: class indices ``(N,)`` or logits ``(N, C)``. Empty input raises ``ValueError``.
    """
    p, y = _predictions(preds, labels)
    if y.numel() == 0:
        raise ValueError("clean_accuracy of an empty set is undefined")
    return float((p == y).to(torch.float64).mean().item())


def attack_success_rate(preds_triggered: Tensor, labels: Tensor, target: int) -> float:
    """ASR (METHODS.md §1): among images whose TRUE label is not ``target``, the fraction that the
    model classifies as ``target`` once the trigger is applied.

    ``preds_triggered``: predictions (or logits ``(N, C)``) on the triggered images; ``labels``:
    their true (clean) labels. Raises ``ValueError`` if no image has a non-target label.
    """
    p, y = _predictions(preds_triggered, labels)
    target = operator.index(target)
    keep = y != target
    n = int(keep.sum().item())
    if n == 0:
        raise ValueError(
            f"attack_success_rate: no test image has a true label other than the target {target}"
        )
    return float((p[keep] == target).to(torch.float64).sum().item() / n)


def cad(ca_before: float, ca_after: float) -> float:
    """Clean-accuracy drop of a repair: ``CA(infected) - CA(repaired)`` (METHODS.md §4)."""
    return float(ca_before) - float(ca_after)


def asrd(asr_before: float, asr_after: float) -> float:
    """Attack-success-rate drop of a repair: ``ASR(infected) - ASR(repaired)`` (METHODS.md §4)."""
    return float(asr_before) - float(asr_after)


def correlation(metric_full: float, metric_masked: float) -> float:
    """ASR.Cor / CA.Cor / Cor.R (METHODS.md §2, rule 3): metric of the infected model minus the
    same metric with a selection masked, e.g. ``ASR.Cor = ASR(Θ̂) - ASR(Θ̂ with S_fault masked)``."""
    return float(metric_full) - float(metric_masked)


# --------------------------------------------------------------------------------------------
# set metrics (METHODS.md §3)
# --------------------------------------------------------------------------------------------


def selection_size(sel: Selection) -> int:
    """Number of neurons ``(layer, channel)`` in a selection."""
    return len(_neurons(sel, "selection"))


def hits(fault: Selection, localized: Selection) -> int:
    """``|S_fault ∩ S_localized|`` over ``(layer, channel)`` neurons."""
    return len(_neurons(fault, "fault") & _neurons(localized, "localized"))


def jaccard(a: Selection, b: Selection) -> float:
    """``|A ∩ B| / |A ∪ B|`` over ``(layer, channel)`` neurons; both empty raises ``ValueError``."""
    na, nb = _neurons(a, "a"), _neurons(b, "b")
    union = na | nb
    if not union:
        raise ValueError("jaccard of two empty selections is undefined")
    return len(na & nb) / len(union)


def wji(fault: Selection, localized: Selection, rc: RC | None = None) -> float:
    """Weighted Jaccard index (METHODS.md §3).

    ``WJI = sum_{i in S_fault ∩ S_localized} RC_i * m / |S_fault ∪ S_localized|``, ``m = |S_fault|``.
    ``rc=None`` means uniform weights ``1/m``, in which case WJI equals :func:`jaccard`.

    Raises ``ValueError`` for an empty fault selection, duplicate channels, or an ``rc`` that is
    not aligned with ``fault`` (same layers, same lengths), not finite, negative, or does not sum
    to 1 within :data:`RC_SUM_TOL`.
    """
    nf = _neurons(fault, "fault")
    nl = _neurons(localized, "localized")
    m = len(nf)
    if m == 0:
        raise ValueError("wji: the fault selection is empty")
    if rc is None:
        weight_of = {n: 1.0 / m for n in nf}
    else:
        weight_of = _validated_rc(fault, rc)
    inter = nf & nl
    union = nf | nl
    return math.fsum(weight_of[n] for n in inter) * m / len(union)


# --------------------------------------------------------------------------------------------
# ranking metrics ([decision] METHODS.md §3, "Beyond the paper")
# --------------------------------------------------------------------------------------------


def _average_ranks(s: np.ndarray) -> np.ndarray:
    """1-based ranks of ``s`` (ascending), tied values sharing their average rank."""
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)  # rank of the last member of each tie group
    avg = ends - (counts - 1) / 2.0
    return avg[inverse.reshape(-1)]


def auroc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Area under the ROC curve of ``scores`` (higher = more positive) against 0/1 ``labels``.

    Mann-Whitney U with average ranks for ties, i.e. ``P(s_pos > s_neg) + 0.5 P(s_pos = s_neg)``.
    Returns ``nan`` if only one class is present (or the input is empty). NaN scores raise.
    """
    s = _scores_1d(scores)
    y = _binary_labels(labels, s.shape[0])
    n_pos = int(y.sum())
    n_neg = int(y.shape[0] - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(s)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def average_precision(scores: ArrayLike, labels: ArrayLike) -> float:
    """Average precision, the step form used by scikit-learn: ``sum_k (R_k - R_{k-1}) P_k``.

    Thresholds are the distinct score values in descending order (tied scores form one
    threshold); ``P_k`` and ``R_k`` are precision and recall of "score >= threshold_k", ``R_0 = 0``.
    Returns ``nan`` if there is no positive label. NaN scores raise.
    """
    s = _scores_1d(scores)
    y = _binary_labels(labels, s.shape[0])
    n_pos = int(y.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-s, kind="stable")
    s_sorted = s[order]
    tp_cum = np.cumsum(y[order])
    # last index of each tie group: where the next score differs, plus the final element
    last = np.flatnonzero(np.r_[s_sorted[1:] != s_sorted[:-1], True])
    tp = tp_cum[last].astype(np.float64)
    precision = tp / (last + 1)
    recall = tp / n_pos
    recall_prev = np.r_[0.0, recall[:-1]]
    return float(np.sum((recall - recall_prev) * precision))


def _layer_scores(scores: Mapping[str, ArrayLike], layer: str) -> Tensor:
    if layer not in scores:
        raise KeyError(f"no scores for layer {layer!r}; scored layers: {list(scores)}")
    t = torch.as_tensor(scores[layer]).detach().cpu()
    if t.ndim != 1:
        raise ValueError(f"scores of layer {layer!r} must be 1-D, got shape {tuple(t.shape)}")
    return t


def _fault_channels_in(fault: Selection, layer: str, n: int) -> list[int]:
    channels = [_channel(c, layer, "fault") for c in fault.get(layer, [])]
    if len(set(channels)) != len(channels):
        raise ValueError(f"fault: duplicate channel in layer {layer!r}")
    for c in channels:
        if c >= n:
            raise ValueError(
                f"fault channel {c} of layer {layer!r} is out of range: "
                f"the scores cover {n} channels"
            )
    return channels


def flatten_scores(
    scores: Mapping[str, ArrayLike],
    fault: Selection,
    layers: list[str] | None = None,
) -> tuple[Tensor, Tensor]:
    """Concatenate per-layer scores and build the aligned 0/1 fault labels.

    ``scores``: ``{layer: 1-D scores}`` of the covered layers; ``layers``: which layers, in which
    order (default: ``scores``' own order). Returns ``(flat_scores float64, labels int64)`` where
    ``labels[j] = 1`` iff neuron ``j`` is in ``fault``. Fault neurons in layers outside ``layers``
    are not covered and do not appear. Feeds :func:`auroc` / :func:`average_precision`.
    """
    _neurons(fault, "fault")
    names = list(scores) if layers is None else list(layers)
    if len(set(names)) != len(names):
        raise ValueError(f"layers lists a layer twice: {names}")
    flat: list[Tensor] = []
    labs: list[Tensor] = []
    for layer in names:
        t = _layer_scores(scores, layer).to(torch.float64)
        lab = torch.zeros(t.shape[0], dtype=torch.int64)
        ch = _fault_channels_in(fault, layer, t.shape[0])
        if ch:
            lab[torch.tensor(ch, dtype=torch.int64)] = 1
        flat.append(t)
        labs.append(lab)
    if not flat:
        return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.int64)
    return torch.cat(flat), torch.cat(labs)


def _tie_keys(layer: str, n: int, seed: int) -> np.ndarray:
    """A seeded random order of ``n`` channels, one per (layer, seed): the tie-break of the budget."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(layer.encode())]).permutation(n)


def top_k_selection(scores: Mapping[str, ArrayLike], fault: Selection, *, seed: int = 0) -> Selection:
    """``S_localized`` under the benchmark's budget (METHODS.md §3).

    In each covered layer (a key of ``scores``) take the ``k`` highest-scoring channels with
    ``k = |S_fault ∩ layer|``. Channels with equal scores are ordered by a random permutation
    seeded with ``(seed, layer)`` — never by channel index, which would hand a tie to the
    lowest channels (issue 11: a localizer whose scores are all 0 would "find" channels 0..k-1).
    ``tied_layers`` says where a tie decided the cut. Layers with ``k = 0`` are left out; fault
    layers that are not covered contribute nothing. Channel lists come back sorted.
    """
    _neurons(fault, "fault")
    out: Selection = {}
    for layer in scores:
        t = _layer_scores(scores, layer)
        n = t.shape[0]
        k = len(_fault_channels_in(fault, layer, n))
        if k == 0:
            continue
        s = t.to(torch.float64).numpy()
        if np.isnan(s).any():
            raise ValueError(f"scores of layer {layer!r} contain NaN; cannot rank its channels")
        # primary key: score descending; secondary: the seeded random tie-break
        order = np.lexsort((_tie_keys(layer, n, seed), -s))
        out[layer] = sorted(int(i) for i in order[:k])
    return out


def tied_layers(scores: Mapping[str, ArrayLike], fault: Selection) -> list[str]:
    """Covered layers where a tie decided the budget's cut: the ``k``-th highest score equals the
    ``(k+1)``-th, so which of the tied channels made it was up to the seeded tie-break."""
    _neurons(fault, "fault")
    tied = []
    for layer in scores:
        t = _layer_scores(scores, layer)
        n = t.shape[0]
        k = len(_fault_channels_in(fault, layer, n))
        if 0 < k < n:
            top = np.sort(t.to(torch.float64).numpy())[::-1]
            if top[k - 1] == top[k]:
                tied.append(layer)
    return tied
