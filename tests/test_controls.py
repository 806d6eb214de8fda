"""Benign controls (issue 15): the score summary, the detection AUROC, the benign-trigger ASR."""

from __future__ import annotations

import json

import pytest
import torch

from localizers.base import score_summary
from reports.controls import benign_asr_by_model, detection_auroc
from reports.results import load


def test_score_summary_is_the_largest_per_layer_z_score():
    # layer a: mean 3.25, unbiased std 4.5, so 10 sits (10 - 3.25) / 4.5 = 1.5 std above; layer b: +-0.707
    s = score_summary({"a": torch.tensor([1.0, 1.0, 1.0, 10.0]), "b": torch.tensor([0.0, 1.0])})
    assert s["max_z"] == pytest.approx(1.5) and s["max"] == 10.0
    flat = score_summary({"a": torch.ones(5)})  # no spread: z = 0 everywhere
    assert flat["max_z"] == 0.0 and flat["p99_z"] == 0.0


def test_detection_auroc_counts_pairs_by_hand():
    # (3,1) (4,1) (5,1) (5,4) win, (4,4) ties, (3,4) loses: (4 + 0.5) / 6
    assert detection_auroc([3.0, 4.0, 5.0], [1.0, 4.0]) == pytest.approx(0.75)
    assert detection_auroc([2.0, 3.0], [0.0, 1.0]) == 1.0 and detection_auroc([0.0], [1.0]) == 0.0
    assert detection_auroc([], [1.0]) is None


def _case(kind, **kw):
    return {"kind": "case", "case": kind, "outcome": "passed", **kw}


def test_benign_asr_is_one_value_per_entry_per_model(tmp_path):
    lines = [{"kind": "header", "schema": 1},
             _case("benign_trigger", entry="e1", dataset="cifar10", arch="vgg13", benign_asr=0.1),
             _case("benign_trigger", entry="e1", dataset="cifar10", arch="vgg13", benign_asr=0.9),  # a rerun: first counts
             _case("benign_trigger", entry="e2", dataset="cifar10", arch="vgg13", benign_asr=0.3),
             _case("benign_trigger", entry="e3", dataset="cifar10", arch="resnet18", benign_asr=0.5)]
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert benign_asr_by_model(load([path])) == {("cifar10", "vgg13"): [0.1, 0.3], ("cifar10", "resnet18"): [0.5]}
