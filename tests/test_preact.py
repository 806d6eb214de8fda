"""PreAct-ResNet-18 (BackdoorBench's definition): structure, neuron totals counted by hand, the
neuron = conv output channel (masked after the conv), pruning, rule 1, ANP's and CLP's conv-only
forms, SRA's dataflow, the ``models`` command, and a micro build.

Expected values come from the architecture written out here (not from ``bd4nn.preact``) and from
independent computations (zeroed / scaled conv rows, per-image autograd, numpy's SVD). The
localizer contract runs on it in tests/test_localizer_contract.py, restricted training in
tests/test_train.py, deepmufl's mutants against explicitly built ones in
tests/test_loc_deepmufl.py, SRA's injection with the VGG/ResNet ones in tests/test_sra.py.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

import test_loc_fp_clp_slicer as loc_helpers
from bd4nn.cli import main
from bd4nn.dataflow import analyze
from bd4nn.models import get_model, list_models
from bd4nn.neurons import NeuronMap
from bd4nn.repair import prune
from localizers.anp import NoisyBN
from localizers.clp import CLP
from test_mobilenet import calibrate_bn
from test_neurons import bn_outputs, bn_zeroed_copy, check_hand_count

ARCH = "preactresnet18"
_one_thread = loc_helpers._one_thread  # the shared autouse fixture: one intra-op thread
STAGES = [(64, 1), (128, 2), (256, 2), (512, 2)]  # (width, stride of the first block), two blocks each


def hand_layers(width: float) -> list[tuple[str, int]]:
    """(conv name, channels) of every conv in registration order, from the architecture."""
    s = lambda c: max(1, int(round(c * width)))  # noqa: E731
    out = [("conv1", s(64))]
    cin = s(64)
    for i, (c, stride) in enumerate(STAGES, start=1):
        for b in range(2):
            out += [(f"layer{i}.{b}.conv1", s(c)), (f"layer{i}.{b}.conv2", s(c))]
            if b == 0 and (stride != 1 or cin != s(c)):
                out.append((f"layer{i}.{b}.shortcut.0", s(c)))
            cin = s(c)
    return out


def hand_parameter_count(num_classes: int = 10) -> int:
    """Convs (no bias), two BNs per block (γ, β on its input / middle width), the linear head."""
    total, cin = 3 * 64 * 9, 64
    for c, stride in STAGES:
        for b in range(2):
            total += 2 * cin + cin * c * 9 + 2 * c + c * c * 9  # bn1, conv1, bn2, conv2
            if b == 0 and (stride != 1 or cin != c):
                total += cin * c  # 1x1 shortcut
            cin = c
    return total + 512 * num_classes + num_classes


def tiny(seed: int = 0) -> nn.Module:
    return get_model(ARCH, 10, width=0.125, seed=seed)


def conv_outputs(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The outputs of the named convs, read by hooks on the conv modules themselves."""
    got = {}
    handles = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: got.__setitem__(n, o.detach().clone()))
               for n in names]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return got


# ------------------------------------------------------------------------------ structure
def test_registered_shaped_and_counted_like_backdoorbench():
    assert ARCH in list_models() and list_models("preact*") == [ARCH]
    model = get_model(ARCH, 10).eval()
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert sum(p.numel() for p in model.parameters()) == hand_parameter_count() == 11_171_146
    keys = set(model.state_dict())
    # BackdoorBench's module names: BN before the conv, a BN-free 1x1 shortcut, no final BN
    assert {"conv1.weight", "layer1.0.bn1.weight", "layer1.0.conv1.weight", "layer1.0.bn2.running_var",
            "layer2.0.shortcut.0.weight", "linear.weight"} <= keys
    assert not any(k.startswith(("bn1.", "layer1.0.shortcut", "layer2.1.shortcut")) for k in keys)
    assert not [k for k in keys if k.startswith("layer2.0.shortcut.1")]
    blk = model.layer2[0]
    with torch.no_grad():  # the shortcut reads relu(bn1(x)), not x: zeroing bn1's γ and β silences it
        x = torch.randn(1, 64, 8, 8)
        blk.bn1.weight.zero_()
        blk.bn1.bias.zero_()
        assert torch.count_nonzero(blk.shortcut(blk.relu1(blk.bn1(x)))) == 0
        assert torch.count_nonzero(blk(x)) == 0


@pytest.mark.parametrize("width,total", [(1.0, 4800), (0.125, 600)])
def test_neuron_totals_match_the_hand_count(width, total):
    nm = check_hand_count(get_model(ARCH, 10, width=width), hand_layers(width), total, 20)
    assert all(layer.bn_name is None and layer.output_name == layer.name for layer in nm)
    assert nm.bn("layer1.0.conv1") is None and nm.output("layer1.0.conv1") is nm.conv("layer1.0.conv1")
    assert nm.penultimate == "layer4.1.conv2" and nm.head_name == "linear"


def test_an_unknown_neuron_unit_is_refused():
    model = tiny()
    model.neuron_unit = "bn"
    with pytest.raises(ValueError, match=r"neuron_unit is 'bn'; expected one of \('conv\+bn', 'conv'\)"):
        NeuronMap(model)


def test_models_command_lists_it_with_its_total(capsys):
    assert main(["models", ARCH, "--threads", "1"]) == 0
    assert re.search(rf"^{ARCH}\s+20\s+4800\s+layer4\.1\.conv2\s", capsys.readouterr().out, re.M)
    assert main(["models", ARCH, "--width", "0.125", "--layers", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"^{ARCH}\s+20\s+600\s", out, re.M)
    assert re.search(r"^layer2\.0\.shortcut\.0\s+\(none: masked after the conv\)\s+16$", out, re.M), out


# ------------------------------------------------------------------------------ masking, pruning
def test_mask_zeroes_the_conv_output_and_equals_zeroed_filters():
    model = tiny(seed=0)
    loc_helpers.randomize_bn(model, seed=3)
    calibrate_bn(model, seed=1)
    nm = NeuronMap(model)
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    # conv1 feeds the identity shortcuts of layer1; layer2.0.conv1 feeds bn2; a shortcut feeds a sum
    sel = {"conv1": [0, 5], "layer2.0.conv1": [3], "layer2.0.shortcut.0": [1, 2]}
    names = list(sel)
    clean = conv_outputs(model, names, x)
    for layer, chans in sel.items():
        with nm.mask({layer: chans}):
            masked = bn_outputs(model, nm, x)  # the activations after the mask hook
        keep = torch.ones(nm.sizes[layer], dtype=torch.bool)
        keep[chans] = False
        assert torch.count_nonzero(masked[layer][:, chans]) == 0
        assert torch.count_nonzero(clean[layer][:, chans]) > 0
        assert torch.equal(masked[layer][:, keep], clean[layer][:, keep])
    assert torch.equal(conv_outputs(model, names, x)["conv1"], clean["conv1"])  # hooks gone

    # Independently: the mask equals zeroed filter rows (the convs have no bias), and so does prune.
    zeroed = bn_zeroed_copy(model, sel)
    for name, chans in sel.items():
        assert torch.count_nonzero(zeroed.get_submodule(name).weight[chans]) == 0
    with nm.mask(sel):
        a = model(x)
    assert torch.allclose(a, zeroed(x), atol=1e-5)
    assert (model(x) - a).abs().max() > 0.05  # the mask did something at the logits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prune(model, nm, sel)
    assert torch.allclose(model(x), a, atol=1e-5)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {f"{n}.weight" for n in sel}  # the conv filters only; every BN stays


def test_restricted_training_runs_the_bns_in_eval_mode():
    """No BN is a neuron's, so restricted training freezes them whole and in eval mode (which
    entries change is checked in tests/test_train.py); the selected convs still train."""
    from bd4nn.train import TrainConfig, train
    from synthetic import colour_data

    model = tiny(seed=0)
    nm = NeuronMap(model)
    modes: set[tuple[bool, bool]] = set()  # (a BN in train mode, a conv in train mode) per call
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    hooks = [m.register_forward_pre_hook(lambda m, i: modes.add(("bn", m.training))) for m in bns]
    hooks.append(model.conv1.register_forward_pre_hook(lambda m, i: modes.add(("conv", m.training))))
    x, y = colour_data(64)
    before = model.conv1.weight.detach().clone()
    train(model, x, y, TrainConfig(epochs=1, batch_size=32, lr=0.01, seed=0), device="cpu",
          restrict={"conv1": [0]}, neuron_map=nm, progress=False)
    for h in hooks:
        h.remove()
    assert modes == {("bn", False), ("conv", True)}
    assert not torch.equal(model.conv1.weight[0], before[0]) and torch.equal(model.conv1.weight[1:], before[1:])


# ------------------------------------------------------------------------------ rule 1
def test_rule1_contribution_matches_per_image_autograd():
    c = loc_helpers.check_rule1_against_autograd(tiny(seed=2))
    assert c["layer1.0.conv1"].sum() > 0


# ------------------------------------------------------------------------------ localizers' conv-only forms
def test_clp_is_the_filter_spectral_norm_without_a_bn_to_fold():
    model = tiny(seed=1)
    loc_helpers.randomize_bn(model, seed=2)  # would change the scores if a BN were folded in
    nm = NeuronMap(model)
    scores = CLP()(model, nm, None)
    for layer in ("conv1", "layer1.0.conv1", "layer3.0.shortcut.0", "layer4.1.conv2"):
        w = nm.conv(layer).weight.detach().double().numpy()
        want = [np.linalg.norm(w[k].reshape(w.shape[1], -1), 2) for k in range(w.shape[0])]
        assert np.allclose(scores[layer].numpy(), want, rtol=1e-5), layer


def test_anp_perturbs_the_conv_channel_output():
    """ANP's coefficients a (= m+δ) scale a conv neuron's output: equal to scaling its filter."""
    model = tiny(seed=0).eval()
    loc_helpers.randomize_bn(model, seed=1)
    nm = NeuronMap(model)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    noisy = NoisyBN(nm)
    a = torch.ones(nm.total)
    layer, ch = "layer2.0.conv2", 4
    a[nm.layer(layer).offset + ch] = 0.3
    beta = noisy.beta("cpu")
    assert torch.count_nonzero(beta) == 0  # the convs have no bias
    with noisy, torch.no_grad():
        noisy.set(*NoisyBN.coefficients(a, beta))
        got = model(x)
    scaled = get_model(ARCH, 10, width=0.125, seed=0).eval()
    scaled.load_state_dict(model.state_dict())
    with torch.no_grad():
        scaled.get_submodule(layer).weight[ch] *= 0.3
        assert torch.allclose(got, scaled(x), atol=1e-5)
        assert (got - model(x)).abs().max() > 1e-4


# ------------------------------------------------------------------------------ SRA
def test_sra_dataflow_groups_and_the_bns_it_narrows():
    """SRA's dataflow: residual groups and sources as in ResNet-18, and each block's BNs, which
    belong to no neuron, read the channels of the stream (bn1) or of the block's conv1 (bn2). The
    injection itself is checked with the VGG/ResNet ones in tests/test_sra.py."""
    model = tiny()
    nm = NeuronMap(model)
    flow = analyze(model, nm)
    # The residual stream of each stage: the stem (or the stage's shortcut conv) with its conv2s.
    streams = [["conv1", "layer1.0.conv2", "layer1.1.conv2"]] + [
        [f"layer{i}.0.conv2", f"layer{i}.0.shortcut.0", f"layer{i}.1.conv2"] for i in (2, 3, 4)]
    assert sorted(flow.groups) == sorted(streams + [[f"layer{i}.{b}.conv1"] for i in range(1, 5) for b in (0, 1)])
    assert flow.sources["layer2.0.shortcut.0"] == flow.sources["layer2.0.conv1"] == streams[0]
    assert flow.sources["layer2.0.conv2"] == ["layer2.0.conv1"] and flow.sources["linear"] == streams[-1]
    stream_before = {"layer1.0": ["conv1"], "layer1.1": ["conv1", "layer1.0.conv2"], "layer2.0": streams[0],
                     "layer2.1": streams[1][:2], "layer3.0": streams[1], "layer3.1": streams[2][:2],
                     "layer4.0": streams[2], "layer4.1": streams[3][:2]}
    expected = {}
    for p, stream in stream_before.items():
        expected[f"{p}.bn1"], expected[f"{p}.bn2"] = stream, [f"{p}.conv1"]
    assert flow.carried == expected


# ------------------------------------------------------------------------------ the build
def test_a_micro_build_keeps_an_entry(tmp_path):
    """The whole build on PreAct-ResNet-18: benign parent, rule 1, injection, rule 3. Its restricted
    training has no BN of the neuron's own (every BN stays frozen, in eval mode), so it runs at a
    lower learning rate than the other micro builds (it diverges at 0.05), with an 8x8 patch."""
    import dataclasses

    from synthetic import micro_profile, three_colours

    from bd4nn.build import build
    from bd4nn.db import Database

    profile = dataclasses.replace(
        micro_profile(), archs=[ARCH], attacks=["badnets"], levels=["large"], width=0.125,
        candidates={"large": [0]}, benign={"epochs": 8, "batch_size": 32, "lr": 0.05},
        recipe={"epochs": 20, "batch_size": 32, "lr": 0.02, "poison_rate": 0.3, "augment": False},
        attack={"badnets": {"patch_size": 8}}).validate()
    build(tmp_path / "db", profile, device="cpu", data={"cifar10": three_colours(n_train=512)}, progress=False)
    db = Database(tmp_path / "db")
    (kept,) = db.entries(kept=True)
    assert kept["id"] == f"cifar10-{ARCH}-badnets-large-00" and kept["asr_cor"] > 0.5
    assert db.verify(progress=False) == []


def test_a_diverged_injection_is_rejected_and_the_build_goes_on(tmp_path):
    """At lr 2 the restricted run overflows (nothing normalizes the trained channels): the
    candidate is rejected with ``diverged`` in its label instead of stopping the build or being
    kept on the strength of NaN logits."""
    import dataclasses
    import math

    from synthetic import micro_profile, three_colours

    from bd4nn.build import build
    from bd4nn.db import Database

    profile = dataclasses.replace(
        micro_profile(), archs=[ARCH], attacks=["badnets"], levels=["narrow", "large"], width=0.125,
        candidates={"narrow": [0], "large": [0]}, benign={"epochs": 1, "batch_size": 32, "lr": 0.05},
        recipe={"epochs": 2, "batch_size": 32, "lr": 2.0, "augment": False}).validate()
    stats = build(tmp_path / "db", profile, device="cpu", data={"cifar10": three_colours(n_train=128)},
                  progress=False)
    assert stats.built == 2 and stats.kept == 0
    db = Database(tmp_path / "db")
    for entry in db.entries(kept=False):
        label = db.load_label(entry["id"])
        assert label.extra["diverged"] is True
        assert math.isclose(sum(v for vs in label.rc.values() for v in vs), 1.0)
