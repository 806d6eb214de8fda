"""The one re-measurement (``bd4nn.verify``) behind ``bd4nn verify --remeasure`` and the database
cases of ``pytest bench/``: it reproduces a fresh entry's label and names what a changed label
gets wrong."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from bd4nn.build import build
from bd4nn.db import Database
from bd4nn.verify import TOLERANCE, differences, remeasure_entry
from synthetic import repro_profile, three_colours


@pytest.fixture(scope="module")
def kept_entry(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # repro_profile keeps its BadNets large candidate on one thread
    try:
        root = tmp_path_factory.mktemp("verify") / "db"
        data = {"cifar10": three_colours()}
        build(root, repro_profile(), device="cpu", data=data, attacks=["badnets"], levels=["large"], progress=False)
        db = Database(root)
        kept = db.entries(kept=True)
        assert kept, "the repro profile's BadNets large candidate should be kept"
        yield db, kept[0]["id"], data
    finally:
        torch.set_num_threads(before)


def test_a_fresh_entry_reproduces_its_label(kept_entry):
    db, entry_id, data = kept_entry
    label, m = remeasure_entry(db, entry_id, device="cpu", cache=data)
    assert label.id == entry_id
    assert differences(label, m) == []
    assert abs(m.ca - label.ca) <= TOLERANCE and abs(m.asr_cor - label.asr_cor) <= TOLERANCE


def test_a_changed_label_is_named_with_both_numbers(kept_entry):
    db, entry_id, data = kept_entry
    label, m = remeasure_entry(db, entry_id, device="cpu", cache=data)
    wrong = replace(label, ca=label.ca + 2 * TOLERANCE, asr=label.asr - 2 * TOLERANCE)
    found = differences(wrong, m)
    assert [d.split()[0] for d in found] == ["CA", "ASR"]
    assert f"vs label {wrong.ca:.4f}" in found[0]
    assert differences(wrong, m, tolerance=1.0) == []
