"""Issue 12, class 9: bit-equality where NaN can appear. A localizer that leaves a NaN weight
as it found it has not modified the model (``torch.equal`` would say it had)."""

from __future__ import annotations

import torch

from bd4nn.harness import model_unchanged, snapshot
from bd4nn.models import get_model


def test_nan_weights_left_alone_count_as_unchanged_and_edits_still_show():
    model = get_model("vgg13", 10, width=0.0625, seed=0)
    with torch.no_grad():
        model.features[0].weight[0, 0, 0, 0] = float("nan")
        model.features[1].running_mean[1] = float("nan")
    before = snapshot(model)
    assert not torch.equal(before["features.0.weight"], model.features[0].weight.detach())  # the old check
    assert model_unchanged(before, model)
    with torch.no_grad():
        model.features[0].weight[0, 0, 0, 1] += 1.0
    assert not model_unchanged(before, model)
    with torch.no_grad():  # -0.0 and 0.0 differ in their bits: an edit, even if torch.equal says no
        model.features[0].weight[0, 0, 0, 1] = 0.0
    before = snapshot(model)
    with torch.no_grad():
        model.features[0].weight[0, 0, 0, 1] = -0.0
    assert not model_unchanged(before, model)
