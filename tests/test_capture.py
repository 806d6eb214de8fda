"""frozen/capture restore the model exactly, also a model in mixed train/eval modes."""

import pytest
import torch

from bd4nn.capture import capture
from bd4nn.models import get_model
from bd4nn.neurons import NeuronMap
from bd4nn.runtime import frozen


def test_frozen_restores_each_modules_mode_and_requires_grad():
    model = get_model("vgg13", 2, width=1 / 16, seed=0).train()
    nm = NeuronMap(model)
    nm.bn(nm.layers[2]).eval()  # a mixed-mode model
    first = next(model.parameters())
    first.requires_grad_(False)
    modes = [m.training for m in model.modules()]
    req = [p.requires_grad for p in model.parameters()]
    with pytest.raises(RuntimeError), frozen(model):
        assert not any(m.training for m in model.modules())
        assert not any(p.requires_grad for p in model.parameters())
        raise RuntimeError("restored on an exception too")
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == req


def test_capture_records_bn_outputs_and_removes_its_hooks():
    model = get_model("resnet18", 2, width=1 / 16, seed=0).eval()
    nm = NeuronMap(model)
    layer = nm.layers[3]
    bn = nm.bn(layer)
    with torch.no_grad(), capture(nm, [layer]) as got:
        x = torch.rand(2, 3, 32, 32)
        model(x)
    assert got[layer].shape[:2] == (2, nm.sizes[layer])
    assert not bn._forward_hooks
