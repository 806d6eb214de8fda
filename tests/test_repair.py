"""Repairs: pruning equals masking, fine-tuning touches only the localized neurons."""

from __future__ import annotations

import copy

import pytest
import torch

from bd4nn.models import get_model
from bd4nn.neurons import NeuronMap
from bd4nn.repair import FinetuneSettings, finetune, prune, repair
from synthetic import colour_data


@pytest.fixture(params=["vgg13", "resnet18"])
def net(request):
    model = get_model(request.param, 2, width=1 / 16, seed=0).eval()
    with torch.no_grad():  # non-trivial BN statistics so that pruning changes something
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.5, 0.5)
    return model, NeuronMap(model)


def _selection(nm):
    return {nm.layers[0]: [0, 2], nm.layers[3]: [1], nm.penultimate: [0, 3]}


def test_prune_equals_masking_the_selection(net):
    model, nm = net
    sel = _selection(nm)
    x = torch.rand(6, 3, 32, 32)
    with torch.no_grad(), nm.mask(sel):
        masked = model(x)
    m2 = copy.deepcopy(model)
    prune(m2, NeuronMap(m2), sel)
    with torch.no_grad():
        out = m2(x)
    assert torch.allclose(out, masked, atol=1e-5)
    nm2 = NeuronMap(m2)
    for layer, chans in sel.items():
        assert torch.all(nm2.bn(layer).weight[chans] == 0) and torch.all(nm2.bn(layer).bias[chans] == 0)
    # nothing else moved
    changed = [k for k, v in m2.state_dict().items() if not torch.equal(v, model.state_dict()[k])]
    assert sorted(changed) == sorted({f"{nm.layer(l).bn_name}.{p}" for l in sel for p in ("weight", "bias")})


def test_finetune_changes_only_the_localized_neurons(net):
    model, nm = net
    sel = _selection(nm)
    x, y = colour_data(64, seed=1)
    m2 = copy.deepcopy(model)
    nm2 = NeuronMap(m2)
    finetune(m2, nm2, sel, clean_x=x, clean_y=y, settings=FinetuneSettings(epochs=2, batch_size=16, lr=0.05),
             progress=False)
    before, after = model.state_dict(), m2.state_dict()
    for layer in nm.layers:
        info = nm.layer(layer)
        chans = torch.zeros(info.size, dtype=torch.bool)
        chans[sel.get(layer, [])] = True
        for name in (f"{info.name}.weight", f"{info.bn_name}.weight", f"{info.bn_name}.bias",
                     f"{info.bn_name}.running_mean", f"{info.bn_name}.running_var"):
            diff = (before[name] != after[name]).reshape(info.size, -1).any(1)
            assert not diff[~chans].any(), f"{name}: an unselected channel changed"
            if name.endswith("weight") and "running" not in name and chans.any():
                assert diff[chans].any(), f"{name}: the selected channels did not train"
    head = nm.head_name
    assert torch.equal(before[f"{head}.weight"], after[f"{head}.weight"]), "the head must stay frozen"


def test_empty_selection_is_a_no_op_and_repair_reports_cad_asrd(net):
    model, nm = net
    x, y = colour_data(32, seed=2)

    def trigger(b):
        b = b.clone()
        b[:, :, -4:, -4:] = 1.0
        return b

    res = repair("finetune", model, {}, clean_x=x, clean_y=y, test_x=x, test_y=y, trigger=trigger, target=0)
    assert res.cad == 0.0 and res.asrd == 0.0 and res.n_neurons == 0
    res = repair("prune", model, nm.full(), clean_x=x, clean_y=y, test_x=x, test_y=y, trigger=trigger, target=0)
    # every neuron pruned: the output is the head bias, one class for all images
    assert res.asr_after in (0.0, 1.0)
    assert res.cad == pytest.approx(res.ca_before - res.ca_after)
    assert res.asrd == pytest.approx(res.asr_before - res.asr_after)
    with pytest.raises(KeyError, match="unknown repair .burn."):
        repair("burn", model, {}, clean_x=x, clean_y=y, test_x=x, test_y=y, trigger=trigger, target=0)
