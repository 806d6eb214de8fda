"""NeuronMap: discovery by walking the module tree, selections, and masking."""

import copy

import pytest
import torch
from torch import nn

from bd4nn.models import get_model
from bd4nn.neurons import NeuronMap, SelectionError


def bn_outputs(model: nn.Module, nm: NeuronMap, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Capture every neuron layer's BN output (the conv output of a pre-activation net's neuron;
    after any mask hook, registered later)."""
    got, handles = {}, []
    for layer in nm:
        handles.append(
            nm.output(layer.name).register_forward_hook(lambda m, i, o, n=layer.name: got.__setitem__(n, o.detach().clone()))
        )
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return got


def test_resnet_layers_include_shortcuts_in_registration_order():
    nm = NeuronMap(get_model("resnet18", 10, width=0.125))
    layers = nm.layers
    assert layers[0] == "conv1"
    assert layers[5:8] == ["layer2.0.conv1", "layer2.0.conv2", "layer2.0.shortcut.0"]
    assert nm.layer("layer2.0.shortcut.0").bn_name == "layer2.0.shortcut.1"
    assert nm.penultimate == "layer4.1.conv2"
    assert nm.head_name == "linear"


def test_custom_conv_bn_net_is_understood_without_a_table():
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3), nn.ReLU(),  # conv without BN: not a neuron layer
        nn.Conv2d(6, 5, 1), nn.BatchNorm2d(5), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 2),
    )
    nm = NeuronMap(net)
    assert nm.layers == ["0", "5"] and nm.sizes == {"0": 4, "5": 5} and nm.total == 9
    assert nm.head_name == "10"


def test_selection_validation_and_flat_round_trip():
    nm = NeuronMap(get_model("vgg13", 10, width=0.125))  # 8, 8, 16, 16, 32, ...
    with pytest.raises(SelectionError, match="unknown neuron layer"):
        nm.validate({"features.99": [0]})
    with pytest.raises(SelectionError, match="out of range"):
        nm.validate({"features.0": [8]})
    with pytest.raises(SelectionError, match="duplicate"):
        nm.validate({"features.0": [1, 1]})
    sel = {"features.3": [5, 0], "features.0": [7]}
    assert nm.validate(sel) == {"features.0": [7], "features.3": [0, 5]}  # model order, sorted
    flat = nm.to_flat(sel)
    assert flat.tolist() == [7, 8 + 0, 8 + 5]  # features.3 starts after the 8 channels of features.0
    assert nm.from_flat(flat) == {"features.0": [7], "features.3": [0, 5]}
    comp = nm.complement(sel)
    assert sum(len(v) for v in comp.values()) == nm.total - 3
    assert 7 not in comp["features.0"] and comp["features.0"] == list(range(7))


@pytest.mark.parametrize("arch", ["vgg13", "resnet18"])
def test_mask_zeroes_exactly_the_selected_activations(arch):
    torch.manual_seed(0)
    model = get_model(arch, 10, width=0.25, seed=0).eval()
    nm = NeuronMap(model)
    x = torch.rand(4, 3, 32, 32)
    layer = nm.layers[3]
    chans = [0, 2, nm.sizes[layer] - 1]
    clean = bn_outputs(model, nm, x)
    with nm.mask({layer: chans}):
        masked = bn_outputs(model, nm, x)
    keep = torch.ones(nm.sizes[layer], dtype=torch.bool)
    keep[chans] = False
    assert torch.count_nonzero(masked[layer][:, chans]) == 0
    assert torch.count_nonzero(clean[layer][:, chans]) > 0  # the mask did something
    assert torch.equal(masked[layer][:, keep], clean[layer][:, keep])  # the rest untouched
    for upstream in nm.layers[:3]:
        assert torch.equal(masked[upstream], clean[upstream])
    # Hooks are gone after the block.
    assert torch.equal(bn_outputs(model, nm, x)[layer], clean[layer])


def check_hand_count(model: nn.Module, expected: list[tuple[str, int]], total: int, n_layers: int) -> NeuronMap:
    """The model's neuron layers are ``expected`` ((conv name, channels), counted by hand from the
    architecture), ``n_layers`` of them with ``total`` neurons; returns its map."""
    assert sum(size for _, size in expected) == total and len(expected) == n_layers
    nm = NeuronMap(model)
    assert [(layer.name, layer.size) for layer in nm] == expected
    assert nm.total == total and len(nm) == n_layers
    return nm


def bn_zeroed_copy(model: nn.Module, sel: dict[str, list[int]]) -> nn.Module:
    """A copy of ``model`` with BN γ = β = 0 on ``sel`` (the conv's filter rows and bias for a
    pre-activation net's neuron, which has no BN): what masking must equal in eval mode, written
    without the mask's hooks."""
    pruned = copy.deepcopy(model)
    pnm = NeuronMap(pruned)
    with torch.no_grad():
        for layer, chans in sel.items():
            unit = pnm.bn(layer) if pnm.layer(layer).bn_name is not None else pnm.conv(layer)
            unit.weight[chans] = 0
            if unit.bias is not None:
                unit.bias[chans] = 0
    return pruned


def test_mask_equals_zeroing_bn_gamma_and_beta():
    """Independent check: in eval mode, masking == setting BN γ=β=0 on those channels."""
    model = get_model("resnet18", 10, width=0.25, seed=1).eval()
    # Non-trivial running statistics so BN is not the identity.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    nm = NeuronMap(model)
    sel = {"conv1": [1, 3], "layer2.0.shortcut.0": [0, 5, 9], "layer4.1.conv2": [2]}
    pruned = bn_zeroed_copy(model, sel)
    x = torch.rand(3, 3, 32, 32)
    with nm.mask(sel):
        a = model(x)
    b = pruned(x)
    assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(model(x), b, atol=1e-3)
