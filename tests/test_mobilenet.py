"""MobileNetV2 (CIFAR variant): structure, neuron totals counted by hand, masking, restricted
training, rule 1, SRA's refusal, the ``models`` command, and the localizer contract.

Expected values come from the architecture table written out here (not from ``bd4nn.mobilenet``)
and from independent computations (per-image autograd, zeroed BN affine); the masking, rule 1 and
contract checks reuse the helpers of the VGG/ResNet tests so that the same checks run.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import test_loc_fp_clp_slicer as loc_helpers
import test_localizer_contract as contract
from bd4nn.attacks import InjectionRecipe, get_attack
from bd4nn.cli import main
from bd4nn.dataflow import DataflowError, analyze
from bd4nn.errors import BadInputError
from bd4nn.models import Normalize, get_model, list_models
from bd4nn.neurons import NeuronMap
from synthetic import colour_data
from test_neurons import bn_outputs, bn_zeroed_copy, check_hand_count

ARCH = "mobilenetv2"
_one_thread = loc_helpers._one_thread  # the shared autouse fixture: one intra-op thread

# MobileNetV2's table (Sandler et al., Table 2) with the CIFAR strides: (t, c, n, s).
TABLE = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def hand_layers(width: float) -> list[tuple[str, int]]:
    """(conv name, channels) of every conv→BN pair, from the table; widths rounded like bd4nn."""
    s = lambda c: max(1, int(round(c * width)))  # noqa: E731
    cin = s(32)
    out = [("conv1", cin)]
    b = 0
    for t, c, n, _ in TABLE:
        for _ in range(n):
            hidden = t * cin
            if t != 1:
                out.append((f"blocks.{b}.expand", hidden))
            out.append((f"blocks.{b}.depthwise", hidden))
            out.append((f"blocks.{b}.project", s(c)))
            cin = s(c)
            b += 1
    return out + [("conv_last", s(1280))]


def tiny(seed: int = 0) -> nn.Module:
    return get_model(ARCH, 10, width=0.125, seed=seed)


def calibrate_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Running statistics = the batch statistics of 16 random images, then eval mode.

    With arbitrary running statistics a random 52-layer net loses its input signal on the way to
    the logits (they vary by ~1e-7); calibrated, a masked channel visibly moves them.
    """
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum, momentum = None, m.momentum  # cumulative average over the one batch
    model.train()
    with torch.no_grad():
        model(torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(seed)))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
    return model.eval()


# ------------------------------------------------------------------------------ structure
def test_registered_and_cifar_shaped():
    assert ARCH in list_models() and list_models("mobilenet*") == [ARCH]
    model = get_model(ARCH, 43, width=0.125, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)).eval()
    first_name, first = next(iter(model.named_children()))
    assert first_name == "normalize" and isinstance(first, Normalize)
    assert torch.equal(first(torch.full((1, 3, 1, 1), 0.75)), torch.full((1, 3, 1, 1), 1.0))
    sizes = {}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: sizes.__setitem__(n, o.shape[-1]))
             for n in ("bn1", "blocks.1.depthwise_bn", "blocks.3.depthwise_bn", "bn_last")]
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 43)
    for h in hooks:
        h.remove()
    # stride 1 in the stem and the 24-channel stage; three stride-2 stages leave 4x4
    assert sizes == {"bn1": 32, "blocks.1.depthwise_bn": 32, "blocks.3.depthwise_bn": 16, "bn_last": 4}


def test_blocks_follow_the_table():
    model = get_model(ARCH, 10)
    blocks = list(model.blocks)
    assert len(blocks) == sum(n for _, _, n, _ in TABLE) == 17
    b, cin = 0, 32
    for t, c, n, s in TABLE:
        for i in range(n):
            blk = blocks[b]
            dw = blk.depthwise
            assert dw.groups == dw.in_channels == dw.out_channels == t * cin and dw.kernel_size == (3, 3)
            assert dw.stride == ((s, s) if i == 0 else (1, 1))
            assert (blk.expand is None) == (t == 1)
            assert blk.project.out_channels == c and blk.project.kernel_size == (1, 1)
            assert blk.use_residual == ((s if i == 0 else 1) == 1 and cin == c)
            cin, b = c, b + 1
    with torch.no_grad():  # linear bottleneck: no activation after the project BN (blocks.1 has no add)
        assert not blocks[1].use_residual and float(blocks[1].eval()(torch.randn(1, 16, 8, 8)).min()) < 0
    # torchvision's mobilenet_v2(num_classes=10) has the same parameter count (strides add none)
    assert sum(p.numel() for p in model.parameters()) == 2_236_682


@pytest.mark.parametrize("width,total", [(1.0, 17056), (0.125, 2132)])
def test_neuron_totals_match_the_hand_count(width, total):
    nm = check_hand_count(get_model(ARCH, 10, width=width), hand_layers(width), total, 52)
    assert nm.layer("blocks.5.depthwise").bn_name == "blocks.5.depthwise_bn"
    assert nm.penultimate == "conv_last" and nm.head_name == "linear"


def test_models_command_lists_it_with_its_total(capsys):
    # --threads 1: the command would otherwise set torch's thread count to every core for the
    # rest of the session, past this module's one-thread fixture.
    assert main(["models", "--width", "0.125", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"^{ARCH}\s+52\s+2132\s+conv_last\s", out, re.M), out
    assert re.search(r"^vgg13\s", out, re.M)  # the others are still listed
    assert main(["models", ARCH, "--threads", "1"]) == 0
    assert re.search(rf"^{ARCH}\s+52\s+17056\s", capsys.readouterr().out, re.M)


# ------------------------------------------------------------------------------ masking
def test_mask_zeroes_depthwise_and_project_channels():
    model = tiny(seed=0)
    loc_helpers.randomize_bn(model, seed=3)  # random γ (some negative) and β
    calibrate_bn(model, seed=1)
    nm = NeuronMap(model)
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    sel = {"blocks.4.depthwise": [0, 5, 23], "blocks.4.project": [1]}  # blocks.4 has a residual add
    assert model.blocks[4].use_residual
    clean = bn_outputs(model, nm, x)
    for layer, chans in sel.items():  # one layer at a time: each is downstream of the other's mask
        with nm.mask({layer: chans}):
            masked = bn_outputs(model, nm, x)
        keep = torch.ones(nm.sizes[layer], dtype=torch.bool)
        keep[chans] = False
        assert torch.count_nonzero(masked[layer][:, chans]) == 0
        assert torch.count_nonzero(clean[layer][:, chans]) > 0
        assert torch.equal(masked[layer][:, keep], clean[layer][:, keep])
        assert all(torch.equal(masked[u], clean[u]) for u in nm.layers[: nm.layers.index(layer)])
    with nm.mask(sel):
        both = bn_outputs(model, nm, x)
    assert all(torch.count_nonzero(both[layer][:, chans]) == 0 for layer, chans in sel.items())
    assert torch.equal(bn_outputs(model, nm, x)["blocks.4.depthwise"], clean["blocks.4.depthwise"])  # hooks gone

    # Independently: in eval mode the mask equals γ = β = 0 on those channels.
    pruned = bn_zeroed_copy(model, sel)
    with nm.mask(sel):
        a = model(x)
    assert torch.allclose(a, pruned(x), atol=1e-5)
    assert (model(x) - pruned(x)).abs().max() > 0.05  # the mask did something at the logits


# restricted training: tests/test_train.py runs its check on MobileNetV2 too (a depthwise layer included)


# ------------------------------------------------------------------------------ rule 1
def test_rule1_contribution_matches_per_image_autograd():
    c = loc_helpers.check_rule1_against_autograd(tiny(seed=2))
    assert c["blocks.4.depthwise"].sum() > 0


# ------------------------------------------------------------------------------ SRA
def test_sra_refuses_depthwise_convs_clearly():
    model = tiny()
    nm = NeuronMap(model)
    with pytest.raises(DataflowError, match=r"^MobileNetV2: .*blocks\.0\.depthwise.*depthwise conv"):
        analyze(model, nm)
    attack = get_attack("sra", target=0, seed=0)
    x, y = colour_data(8)
    sel = {layer: [0] for layer in nm.layers}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(BadInputError, match="MobileNetV2.*grouped/depthwise conv"):
        attack.inject(model, nm, sel, attack.make_trigger(), x, y, InjectionRecipe(), device="cpu")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # refused before writing


# ------------------------------------------------------------------------------ localizer contract
# MobileNetV2 at width 1/8 has 2132 neurons (ResNet-18 at the contract's width 1/16: 300), which
# makes two methods slow on the CPU: ANP gets smaller batches (default 128, drawn with replacement
# from the 4 images), and deepmufl (8 mutants per neuron, each run on every test, ≈ 50 CPU-s here
# at width 1/8) runs at the contract's own width 1/16 (1079 neurons) with its contract budget.
MOBILENET_BUDGETS: dict[str, dict] = {"anp": {"batch_size": 16}}
MOBILENET_WIDTHS: dict[str, float] = {"deepmufl": 0.0625}


@pytest.mark.parametrize("name,settings", contract.CASES,
                         ids=[f"{n}{'-' + '-'.join(map(str, s.values())) if s else ''}" for n, s in contract.CASES])
def test_localizer_contract_on_mobilenetv2(monkeypatch, name, settings):
    """The contract test itself, with its tiny model swapped for a width-1/8 MobileNetV2."""
    width = MOBILENET_WIDTHS.get(name, 0.125)
    monkeypatch.setattr(contract, "tiny", lambda arch, seed=0: get_model(arch, 10, width=width, seed=seed))
    settings = {**settings, **MOBILENET_BUDGETS.get(name, {})}
    contract.test_contract_scope_sizes_determinism_and_model_untouched(ARCH, name, settings)


def test_a_micro_build_keeps_an_entry(tmp_path):
    """The whole build on MobileNetV2 (issue 16): benign parent, rule 1, injection, rule 3. At this
    scale the backdoor needs a strong recipe (half the images poisoned, a 5x5 patch, 10 epochs);
    the large window keeps its entry (the narrow one, 10 neurons, does not: masking it moves the
    whole output, ASR.Cor < 0)."""
    import dataclasses

    from synthetic import micro_profile, three_colours

    from bd4nn.build import build
    from bd4nn.db import Database

    profile = dataclasses.replace(
        micro_profile(), archs=["mobilenetv2"], attacks=["badnets"], levels=["large"], width=0.125,
        candidates={"large": [0]}, benign={"epochs": 8, "batch_size": 32, "lr": 0.05},
        recipe={"epochs": 10, "batch_size": 32, "lr": 0.05, "poison_rate": 0.5, "augment": False},
        attack={"badnets": {"patch_size": 5}}).validate()
    build(tmp_path / "db", profile, device="cpu", data={"cifar10": three_colours(n_train=256)}, progress=False)
    db = Database(tmp_path / "db")
    (kept,) = db.entries(kept=True)
    assert kept["id"] == "cifar10-mobilenetv2-badnets-large-00" and kept["asr_cor"] > 0.5
    assert db.verify(progress=False) == []
