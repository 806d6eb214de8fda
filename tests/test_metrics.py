"""Tests of bd4nn.metrics.

Every expected value is either worked out by hand in a comment next to it or computed by an
independent brute-force reference written in this file (pair counting for AUROC, a threshold
loop for AP, Python sets for Jaccard).
"""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
import torch

from bd4nn import metrics as M


# --------------------------------------------------------------------------------------------
# brute-force references (independent of bd4nn.metrics)
# --------------------------------------------------------------------------------------------


def brute_auroc(scores: list[float], labels: list[int]) -> float:
    """P(s_pos > s_neg) + 0.5 P(s_pos == s_neg), by enumerating every pos/neg pair."""
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    total = 0.0
    for p, n in itertools.product(pos, neg):
        total += 1.0 if p > n else 0.5 if p == n else 0.0
    return total / (len(pos) * len(neg))


def brute_ap(scores: list[float], labels: list[int]) -> float:
    """sum_k (R_k - R_{k-1}) P_k over distinct thresholds, descending, predicting score >= t."""
    n_pos = sum(labels)
    ap, r_prev = 0.0, 0.0
    for t in sorted(set(scores), reverse=True):
        predicted = [y for s, y in zip(scores, labels) if s >= t]
        tp = sum(predicted)
        precision = tp / len(predicted)
        recall = tp / n_pos
        ap += (recall - r_prev) * precision
        r_prev = recall
    return ap


def brute_jaccard(a: dict[str, list[int]], b: dict[str, list[int]]) -> float:
    sa = {(layer, c) for layer, cs in a.items() for c in cs}
    sb = {(layer, c) for layer, cs in b.items() for c in cs}
    return len(sa & sb) / len(sa | sb)


# --------------------------------------------------------------------------------------------
# CA / ASR
# --------------------------------------------------------------------------------------------


def test_clean_accuracy_hand():
    # preds  1 2 3 4 0
    # labels 1 2 0 4 1  -> correct at positions 0, 1, 3 -> 3/5 = 0.6
    preds = torch.tensor([1, 2, 3, 4, 0])
    labels = torch.tensor([1, 2, 0, 4, 1])
    assert M.clean_accuracy(preds, labels) == pytest.approx(0.6)


def test_clean_accuracy_from_logits():
    # argmax of each row: 1, 0, 2 ; labels 1, 2, 2 -> 2 of 3 correct
    logits = torch.tensor([[0.1, 0.9, 0.0], [2.0, 1.0, 0.5], [0.0, 0.1, 0.3]])
    assert M.clean_accuracy(logits, torch.tensor([1, 2, 2])) == pytest.approx(2 / 3)


def test_clean_accuracy_errors():
    with pytest.raises(ValueError):
        M.clean_accuracy(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError):
        M.clean_accuracy(torch.tensor([1, 2]), torch.tensor([1, 2, 3]))


def test_asr_excludes_target_class_images():
    # true labels       0 0 1 1 2 2 ; target 0
    # triggered preds   0 0 0 1 0 2
    # non-target images are positions 2..5 with preds 0, 1, 0, 2 -> 2 hits of 4 = 0.5
    # (counting all six images would give 4/6 = 0.667: the two target-class images must not count)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    preds = torch.tensor([0, 0, 0, 1, 0, 2])
    asr = M.attack_success_rate(preds, labels, target=0)
    assert asr == pytest.approx(0.5)
    assert asr != pytest.approx(4 / 6)


def test_asr_other_target_and_logits():
    # target 2; labels 0 1 2 2 ; preds (argmax) 2 2 0 2
    # non-target images are positions 0, 1, both predicted 2 -> 2/2 = 1.0
    logits = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.2, 0.3], [5.0, 0.0, 0.0], [0.0, 0.0, 9.0]])
    assert M.attack_success_rate(logits, torch.tensor([0, 1, 2, 2]), target=2) == pytest.approx(1.0)


def test_asr_no_nontarget_images_raises():
    with pytest.raises(ValueError):
        M.attack_success_rate(torch.tensor([0, 0]), torch.tensor([0, 0]), target=0)


# --------------------------------------------------------------------------------------------
# CAD, ASRD, correlation
# --------------------------------------------------------------------------------------------


def test_cad_asrd_hand():
    # CAD = CA(infected) - CA(repaired) = 0.92 - 0.89 = 0.03
    assert M.cad(0.92, 0.89) == pytest.approx(0.03)
    # ASRD = 0.99 - 0.05 = 0.94
    assert M.asrd(0.99, 0.05) == pytest.approx(0.94)
    # a repair that raised CA has a negative CAD: 0.80 - 0.85 = -0.05
    assert M.cad(0.80, 0.85) == pytest.approx(-0.05)


def test_correlation_hand():
    # ASR.Cor = ASR(full) - ASR(masked) = 0.98 - 0.12 = 0.86 (> 0.5: kept by rule 3)
    assert M.correlation(0.98, 0.12) == pytest.approx(0.86)
    # CA.Cor = 0.90 - 0.85 = 0.05
    assert M.correlation(0.90, 0.85) == pytest.approx(0.05)
    # order matters: 0.5 - 0.6 = -0.1
    assert M.correlation(0.5, 0.6) == pytest.approx(-0.1)


# --------------------------------------------------------------------------------------------
# set metrics
# --------------------------------------------------------------------------------------------


def test_wji_nonuniform_hand():
    # intersection = {a1, b3} -> RC 0.3 + 0.2 = 0.5 ; m = 3 ; union = {a0, a1, a2, b3} = 4
    # WJI = 0.5 * 3 / 4 = 0.375
    fault = {"a": [0, 1], "b": [3]}
    rc = {"a": [0.5, 0.3], "b": [0.2]}
    loc = {"a": [1, 2], "b": [3]}
    assert M.wji(fault, loc, rc) == pytest.approx(0.375)


def test_wji_identical_sets_nonuniform_rc_is_one():
    # S_loc = S_fault: sum RC = 1, m = |union| = 3 -> 1 * 3 / 3 = 1
    fault = {"a": [0, 1], "b": [3]}
    rc = {"a": [0.7, 0.25], "b": [0.05]}
    assert M.wji(fault, {"a": [0, 1], "b": [3]}, rc) == pytest.approx(1.0)


def test_wji_disjoint_is_zero():
    fault = {"a": [0, 1], "b": [3]}
    rc = {"a": [0.5, 0.3], "b": [0.2]}
    assert M.wji(fault, {"a": [2, 3], "b": [0], "c": [1]}, rc) == 0.0
    assert M.wji(fault, {}, rc) == 0.0


def test_wji_union_larger_than_both():
    # fault {a0,a1,a2} RC 0.6,0.3,0.1 ; localized {a2,a3,a4}
    # intersection {a2} -> 0.1 ; m = 3 ; union {a0..a4} = 5 (bigger than |fault| = |loc| = 3)
    # WJI = 0.1 * 3 / 5 = 0.06   (a denominator of 3 would give 0.1)
    fault = {"a": [0, 1, 2]}
    rc = {"a": [0.6, 0.3, 0.1]}
    assert M.wji(fault, {"a": [2, 3, 4]}, rc) == pytest.approx(0.06)


def test_wji_uncovered_localized_layer_counts_in_union():
    # fault {a0,a1} uniform-ish RC 0.5,0.5 ; localized {a0, z9}
    # intersection {a0} -> 0.5 ; m = 2 ; union {a0,a1,z9} = 3 -> 0.5 * 2 / 3 = 1/3
    assert M.wji({"a": [0, 1]}, {"a": [0], "z": [9]}, {"a": [0.5, 0.5]}) == pytest.approx(1 / 3)


def test_wji_same_channel_in_two_layers_not_conflated():
    # fault {a5, b7}; localized {a7, b5}: no (layer, channel) pair in common -> 0
    # (matching channel numbers alone would see {5, 7} on both sides and give 1)
    assert M.wji({"a": [5], "b": [7]}, {"a": [7], "b": [5]}, {"a": [0.9], "b": [0.1]}) == 0.0
    # fault {a5, b5} RC 0.9, 0.1 ; localized {b5}
    # intersection {b5} -> 0.1 ; m = 2 ; union {a5, b5} = 2 -> 0.1 * 2 / 2 = 0.1
    assert M.wji({"a": [5], "b": [5]}, {"b": [5]}, {"a": [0.9], "b": [0.1]}) == pytest.approx(0.1)
    # uniform: intersection 1, union 2 -> 0.5
    assert M.wji({"a": [5], "b": [5]}, {"b": [5]}) == pytest.approx(0.5)


def test_wji_rc_follows_fault_list_order():
    # RC is aligned with the fault list as given: fault a=[2, 0] with RC [0.8, 0.2] gives a2 -> 0.8
    # localized {a2}: 0.8 * 2 / |{a0, a2}| = 0.8
    assert M.wji({"a": [2, 0]}, {"a": [2]}, {"a": [0.8, 0.2]}) == pytest.approx(0.8)


@pytest.mark.parametrize("seed", range(5))
def test_wji_uniform_equals_jaccard(seed):
    rng = random.Random(seed)
    layers = ["features.0", "features.3", "layer1.0.conv1"]
    fault = {l: sorted(rng.sample(range(16), rng.randint(1, 5))) for l in layers}
    loc = {l: sorted(rng.sample(range(16), rng.randint(0, 6))) for l in layers}
    expected = brute_jaccard(fault, loc)
    m = sum(len(v) for v in fault.values())
    uniform = {l: [1.0 / m] * len(v) for l, v in fault.items()}
    assert M.jaccard(fault, loc) == pytest.approx(expected)
    assert M.wji(fault, loc) == pytest.approx(expected)
    assert M.wji(fault, loc, uniform) == pytest.approx(expected)


def test_wji_accepts_rc_within_tolerance():
    # 0.5 + 0.30005 + 0.2 = 1.00005, within 1e-4 ; intersection {a1, b3} -> 0.50005 * 3 / 4
    fault = {"a": [0, 1], "b": [3]}
    rc = {"a": [0.5, 0.30005], "b": [0.2]}
    assert M.wji(fault, {"a": [1, 2], "b": [3]}, rc) == pytest.approx(0.50005 * 3 / 4)


@pytest.mark.parametrize(
    "rc",
    [
        {"a": [0.5, 0.3], "b": [0.1]},          # sums to 0.9
        {"a": [0.6, 0.3], "b": [0.2]},          # sums to 1.1
        {"a": [0.5, 0.5]},                      # layer b missing
        {"a": [0.5, 0.3, 0.0], "b": [0.2]},     # wrong length in a
        {"a": [0.5, 0.3], "b": [0.2], "c": [0.0]},  # extra layer
        {"a": [1.2, -0.4], "b": [0.2]},         # negative weight (sums to 1)
        {"a": [float("nan"), 0.3], "b": [0.2]},  # not finite
        {"a": [float("inf"), 0.3], "b": [0.2]},
    ],
)
def test_wji_bad_rc_raises(rc):
    with pytest.raises(ValueError):
        M.wji({"a": [0, 1], "b": [3]}, {"a": [1]}, rc)


def test_wji_bad_selections_raise():
    with pytest.raises(ValueError):  # empty fault
        M.wji({}, {"a": [0]})
    with pytest.raises(ValueError):  # empty fault lists
        M.wji({"a": []}, {"a": [0]})
    with pytest.raises(ValueError):  # duplicate channel in fault
        M.wji({"a": [1, 1]}, {"a": [1]})
    with pytest.raises(ValueError):  # duplicate channel in localized
        M.wji({"a": [1, 2]}, {"a": [1, 1]})
    with pytest.raises(ValueError):  # negative channel
        M.wji({"a": [-1]}, {"a": [1]})


def test_jaccard_hits_size_hand():
    a = {"a": [0, 1, 2]}
    b = {"a": [1, 2, 3], "b": [0]}
    # intersection {a1, a2} = 2 ; union {a0, a1, a2, a3, b0} = 5 -> 0.4
    assert M.jaccard(a, b) == pytest.approx(0.4)
    assert M.hits(a, b) == 2
    assert M.hits(b, a) == 2
    # same channel in two layers is two neurons; empty lists count nothing
    assert M.selection_size({"a": [0, 1], "b": [0], "c": []}) == 3
    assert M.hits({"a": [0]}, {"b": [0]}) == 0
    with pytest.raises(ValueError):
        M.jaccard({}, {"a": []})
    with pytest.raises(ValueError):
        M.selection_size({"a": [3, 3]})


def test_selection_accepts_numpy_and_tensor_channels():
    # np.int64 / tensor channel lists are the same neurons as plain ints
    fault = {"a": np.array([0, 1]), "b": torch.tensor([3])}
    assert M.hits(fault, {"a": [1], "b": [3]}) == 2
    assert M.wji(fault, {"a": [1], "b": [3]}) == pytest.approx(2 / 3)


# --------------------------------------------------------------------------------------------
# AUROC / AP
# --------------------------------------------------------------------------------------------


def test_auroc_hand():
    assert M.auroc([0.9, 0.8, 0.2, 0.1], [1, 1, 0, 0]) == 1.0  # perfect ranking
    assert M.auroc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0  # reversed
    assert M.auroc([0.5, 0.5, 0.5], [1, 0, 0]) == 0.5  # all tied
    # scores 3 2 2 1, labels 1 1 0 0: pairs (3,2)=1 (3,1)=1 (2,2)=0.5 (2,1)=1 -> 3.5 / 4 = 0.875
    assert M.auroc([3.0, 2.0, 2.0, 1.0], [1, 1, 0, 0]) == pytest.approx(0.875)


def test_auroc_one_class_is_nan():
    assert math.isnan(M.auroc([0.1, 0.2], [1, 1]))
    assert math.isnan(M.auroc([0.1, 0.2], [0, 0]))
    assert math.isnan(M.auroc([], []))


def test_ap_hand():
    # thresholds 0.9: P=1/1 R=1/2 ; 0.8: P=1/2 R=1/2 ; 0.7: P=2/3 R=1 ; 0.6: P=2/4 R=1
    # AP = 0.5*1 + 0*0.5 + 0.5*(2/3) + 0*0.5 = (1 + 2/3) / 2 = 0.8333
    assert M.average_precision([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx(5 / 6)
    assert M.average_precision([0.9, 0.8, 0.2, 0.1], [1, 1, 0, 0]) == pytest.approx(1.0)
    # positives last: 0.9: P=0 R=0 ; 0.8: P=0 R=0 ; 0.2: P=1/3 R=1/2 ; 0.1: P=2/4 R=1
    # AP = 0.5*(1/3) + 0.5*(1/2) = 5/12
    assert M.average_precision([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == pytest.approx(5 / 12)


def test_ap_ties_form_one_threshold():
    # scores 0.5 0.5 0.1, labels 1 0 1
    # threshold 0.5 takes both tied items: P = 1/2, R = 1/2 ; threshold 0.1: P = 2/3, R = 1
    # AP = 0.5*0.5 + 0.5*(2/3) = 0.58333  (breaking the tie positive-first would give 0.8333)
    assert M.average_precision([0.5, 0.5, 0.1], [1, 0, 1]) == pytest.approx(0.25 + 1 / 3)
    # and the answer does not depend on the order of tied items
    assert M.average_precision([0.5, 0.5, 0.1], [0, 1, 1]) == pytest.approx(0.25 + 1 / 3)


def test_ap_no_positive_is_nan():
    assert math.isnan(M.average_precision([0.3, 0.1], [0, 0]))


@pytest.mark.parametrize("seed", range(8))
def test_auroc_ap_match_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 60))
    # few distinct values -> many ties
    scores = rng.integers(0, 6, size=n).astype(np.float64) / 5.0
    labels = rng.integers(0, 2, size=n)
    labels[0], labels[1] = 0, 1  # both classes present
    s_list, y_list = scores.tolist(), [int(v) for v in labels]
    want_auc = brute_auroc(s_list, y_list)
    want_ap = brute_ap(s_list, y_list)
    # numpy, torch float32 and bool labels all give the same answer
    assert M.auroc(scores, labels) == pytest.approx(want_auc, abs=1e-12)
    assert M.average_precision(scores, labels) == pytest.approx(want_ap, abs=1e-12)
    ts, ty = torch.tensor(scores, dtype=torch.float32), torch.tensor(labels).bool()
    assert M.auroc(ts, ty) == pytest.approx(want_auc, abs=1e-12)
    assert M.average_precision(ts, ty) == pytest.approx(want_ap, abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_auroc_ap_match_brute_force_continuous(seed):
    rng = np.random.default_rng(100 + seed)
    scores = rng.normal(size=40)
    labels = (rng.random(40) < 0.3).astype(int)
    labels[0], labels[1] = 0, 1
    assert M.auroc(scores, labels) == pytest.approx(brute_auroc(scores.tolist(), labels.tolist()))
    want_ap = brute_ap(scores.tolist(), labels.tolist())
    assert M.average_precision(scores, labels) == pytest.approx(want_ap)


def test_rank_metric_input_errors():
    with pytest.raises(ValueError):
        M.auroc([0.1, 0.2, 0.3], [0, 1])  # length mismatch
    with pytest.raises(ValueError):
        M.auroc([0.1, 0.2], [0, 2])  # labels not 0/1
    with pytest.raises(ValueError):
        M.average_precision([0.1, float("nan")], [0, 1])  # NaN score


# --------------------------------------------------------------------------------------------
# flatten_scores
# --------------------------------------------------------------------------------------------


def test_flatten_scores_alignment():
    scores = {"x": torch.tensor([0.1, 0.2, 0.3]), "y": torch.tensor([0.4, 0.5])}
    fault = {"y": [1], "x": [0], "z": [2]}  # z is not covered: it must not appear
    flat, lab = M.flatten_scores(scores, fault)
    # default order = scores' order: x0 x1 x2 y0 y1 ; fault x0, y1
    assert flat.tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    assert lab.tolist() == [1, 0, 0, 0, 1]
    flat, lab = M.flatten_scores(scores, fault, layers=["y", "x"])
    # y0 y1 x0 x1 x2
    assert flat.tolist() == pytest.approx([0.4, 0.5, 0.1, 0.2, 0.3])
    assert lab.tolist() == [0, 1, 1, 0, 0]
    flat, lab = M.flatten_scores(scores, fault, layers=["y"])
    assert flat.tolist() == pytest.approx([0.4, 0.5])
    assert lab.tolist() == [0, 1]


def test_flatten_scores_feeds_auroc():
    # flattened: scores .1 .2 .3 .4 .5, labels 1 0 0 0 1
    # pairs: positive .5 beats the 3 negatives (3), positive .1 beats none (0) -> 3 / 6 = 0.5
    scores = {"x": np.array([0.1, 0.2, 0.3]), "y": np.array([0.4, 0.5])}
    flat, lab = M.flatten_scores(scores, {"x": [0], "y": [1]})
    assert M.auroc(flat, lab) == pytest.approx(0.5)


def test_flatten_scores_errors():
    scores = {"x": torch.tensor([0.1, 0.2])}
    with pytest.raises(KeyError):
        M.flatten_scores(scores, {"x": [0]}, layers=["x", "missing"])
    with pytest.raises(ValueError):  # fault channel beyond the layer's width
        M.flatten_scores(scores, {"x": [2]})
    with pytest.raises(ValueError):  # 2-D scores
        M.flatten_scores({"x": torch.zeros(2, 2)}, {"x": [0]})


# --------------------------------------------------------------------------------------------
# top_k_selection
# --------------------------------------------------------------------------------------------


def test_top_k_selection_per_layer_budget():
    scores = {
        "a": torch.tensor([0.1, 0.9, 0.5, 0.9]),
        "b": torch.tensor([1.0, 2.0, 3.0]),
        "c": torch.tensor([5.0, 4.0]),
    }
    fault = {"a": [0, 2], "c": [1], "d": [0]}
    # a: k = 2 -> the two 0.9s at channels 1 and 3 ; b: k = 0 -> nothing ;
    # c: k = 1 -> channel 0 (5.0) ; d: not scored (not covered) -> nothing
    assert M.top_k_selection(scores, fault) == {"a": [1, 3], "c": [0]}


def test_top_k_selection_breaks_ties_by_a_seeded_random_order_never_by_index():
    # all tied, k = 2 of 4: a seeded random pair; the same seed gives the same pair
    tied = {"a": torch.zeros(4)}
    picks = [tuple(M.top_k_selection(tied, {"a": [2, 3]}, seed=s)["a"]) for s in range(400)]
    assert all(M.top_k_selection(tied, {"a": [2, 3]}, seed=s)["a"] == list(p) for s, p in enumerate(picks[:20]))
    # every channel is picked about half of the time (binomial(400, 0.5): ±5 sigma = ±50)
    counts = [sum(c in p for p in picks) for c in range(4)]
    assert all(150 <= n <= 250 for n in counts), counts
    assert len(set(picks)) == 6  # all C(4,2) pairs occur
    # a tie below a clear winner: 9 at channel 4, then 1.0 at channels 0 and 2; k = 2
    s = {"a": np.array([1.0, 0.0, 1.0, 0.5, 9.0])}
    got = [M.top_k_selection(s, {"a": [1, 3]}, seed=seed)["a"] for seed in range(40)]
    assert all(g in ([0, 4], [2, 4]) for g in got) and [0, 4] in got and [2, 4] in got
    assert M.tied_layers(s, {"a": [1, 3]}) == ["a"]
    assert M.tied_layers(s, {"a": [3]}) == []  # k = 1: the 9 alone, no tie at the cut
    assert M.tied_layers({"a": torch.arange(4.0)}, {"a": [0, 1]}) == []


def test_top_k_selection_large_layer_ties_fill_from_the_tied_group():
    # 600 channels with scores in {0,1,2}: every higher score is taken before any tied one, and
    # the tied group at the cut supplies exactly the rest
    rng = np.random.default_rng(7)
    s = rng.integers(0, 3, size=600).astype(np.float32)
    fault = {"l": sorted(rng.choice(600, size=250, replace=False).tolist())}
    got = set(M.top_k_selection({"l": torch.from_numpy(s)}, fault, seed=3)["l"])
    above = {i for i in range(600) if s[i] == 2}
    assert len(got) == 250 and above <= got and len(above) < 250
    assert all(s[i] == 1 for i in got - above)
    assert M.tied_layers({"l": torch.from_numpy(s)}, fault) == ["l"]


def test_top_k_selection_budget_matches_fault_sizes():
    scores = {"a": torch.arange(8.0), "b": -torch.arange(5.0)}
    fault = {"a": [0, 1, 2], "b": [4]}
    got = M.top_k_selection(scores, fault)
    # a: k = 3 -> highest 7, 6, 5 ; b: k = 1 -> highest is 0 at channel 0
    assert got == {"a": [5, 6, 7], "b": [0]}
    assert all(isinstance(c, int) for v in got.values() for c in v)
    # k = layer width takes the whole layer
    assert M.top_k_selection({"a": torch.arange(3.0)}, {"a": [0, 1, 2]}) == {"a": [0, 1, 2]}
    # PFL-style scores (1 on fault, 0 elsewhere) recover the fault exactly -> WJI 1
    f = {"a": [1, 4], "b": [0]}
    pfl = {"a": torch.tensor([0, 1, 0, 0, 1.0]), "b": torch.tensor([1.0, 0, 0])}
    assert M.top_k_selection(pfl, f) == f
    assert M.wji(f, M.top_k_selection(pfl, f), {"a": [0.2, 0.3], "b": [0.5]}) == pytest.approx(1.0)


def test_top_k_selection_errors():
    with pytest.raises(ValueError):  # fault channel out of range
        M.top_k_selection({"a": torch.zeros(3)}, {"a": [3]})
    with pytest.raises(ValueError):  # NaN in a ranked layer
        M.top_k_selection({"a": torch.tensor([0.0, float("nan")])}, {"a": [0]})
