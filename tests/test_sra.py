"""SRA (structural attack) and the channel dataflow it relies on.

Expected values are written by hand from the architectures (models.py), not from
``bd4nn.dataflow``: the VGG chain of convs, the kuangliu ResNet-18 block wiring, its residual
groups.
"""

import copy

import pytest
import torch

from bd4nn.attacks import InjectionRecipe, get_attack
from bd4nn.attacks.sra import residual_selection
from bd4nn.dataflow import DataflowError, analyze, residual_groups, sources
from bd4nn.models import get_model
from bd4nn.neurons import NeuronMap, SelectionError
from bd4nn.train import TrainConfig, evaluate_asr, evaluate_ca, train
from synthetic import colour_data

TARGET = 0

VGG13_CONVS = ["features.0", "features.3", "features.7", "features.10", "features.14",
               "features.17", "features.21", "features.24", "features.28", "features.31"]


def vgg13_sources() -> dict[str, list[str]]:
    out = {VGG13_CONVS[0]: []}
    for prev, cur in zip(VGG13_CONVS, VGG13_CONVS[1:]):
        out[cur] = [prev]
    out["classifier"] = [VGG13_CONVS[-1]]
    return out


def resnet18_sources() -> dict[str, list[str]]:
    """Hand-derived from BasicBlock: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""
    out: dict[str, list[str]] = {"conv1": []}
    stream = ["conv1"]  # the layers whose BN outputs are summed into the current residual stream
    for stage in range(1, 5):
        for block in range(2):
            p = f"layer{stage}.{block}"
            out[f"{p}.conv1"] = list(stream)
            out[f"{p}.conv2"] = [f"{p}.conv1"]
            if stage > 1 and block == 0:  # 1x1 conv shortcut at each downsampling
                out[f"{p}.shortcut.0"] = list(stream)
                stream = [f"{p}.conv2", f"{p}.shortcut.0"]
            else:
                stream = stream + [f"{p}.conv2"]
    out["linear"] = stream
    return out


RESNET18_GROUPS = [
    ["conv1", "layer1.0.conv2", "layer1.1.conv2"],
    ["layer2.0.conv2", "layer2.0.shortcut.0", "layer2.1.conv2"],
    ["layer3.0.conv2", "layer3.0.shortcut.0", "layer3.1.conv2"],
    ["layer4.0.conv2", "layer4.0.shortcut.0", "layer4.1.conv2"],
]


# ------------------------------------------------------------------------------ dataflow


def test_dataflow_vgg13():
    m = get_model("vgg13", 10, width=0.125)
    nm = NeuronMap(m)
    assert sources(m, nm) == vgg13_sources()
    assert residual_groups(m, nm) == [[name] for name in VGG13_CONVS]


def test_dataflow_resnet18():
    m = get_model("resnet18", 10, width=0.125)
    nm = NeuronMap(m)
    flow = analyze(m, nm)
    expected = resnet18_sources()
    assert flow.sources == {k: expected[k] for k in [*nm.layers, "linear"]}
    assert flow.sources["layer2.0.shortcut.0"] == ["conv1", "layer1.0.conv2", "layer1.1.conv2"]
    assert flow.sources["layer3.1.conv1"] == ["layer3.0.conv2", "layer3.0.shortcut.0"]
    singles = [[n] for n in nm.layers if not any(n in g for g in RESNET18_GROUPS)]
    assert sorted(flow.groups) == sorted(RESNET18_GROUPS + singles)
    assert [g for g in flow.groups if len(g) > 1] == RESNET18_GROUPS


def test_dataflow_rejects_cat():
    class Cat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.bn_a = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)
            self.b, self.bn_b = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)
            self.fc = torch.nn.Linear(8, 2)

        def forward(self, x):
            z = torch.cat([self.bn_a(self.a(x)), self.bn_b(self.b(x))], 1)
            return self.fc(z.mean((2, 3)))

    m = Cat()
    with pytest.raises(DataflowError, match="cat"):
        analyze(m, NeuronMap(m))


def test_residual_selection_takes_the_groups_first_layer():
    m = get_model("resnet18", 10, width=0.125)
    nm = NeuronMap(m)
    sel = {n: [i % nm.sizes[n], (i + 3) % nm.sizes[n]] for i, n in enumerate(nm.layers)}
    sel = nm.validate(sel)
    out = residual_selection(sel, analyze(m, nm).groups)
    for group in RESNET18_GROUPS:
        assert all(out[n] == sel[group[0]] for n in group)
    assert out["layer2.0.conv1"] == sel["layer2.0.conv1"]  # not in a multi-layer group
    with pytest.raises(SelectionError):
        residual_selection({k: v for k, v in sel.items() if k != "conv1"}, analyze(m, nm).groups)


# ------------------------------------------------------------------------------- trigger


def test_trigger_is_a_pure_function_of_the_seed():
    a, b, c = (get_attack("sra", seed=s).make_trigger() for s in (3, 3, 4))
    assert a == b and not a == c
    assert torch.equal(a.mask[0, 27:, 27:], torch.ones(5, 5)) and a.mask.sum() == 25
    patch = a.pattern[:, 27:, 27:]
    assert ((patch == 0) | (patch == 1)).all() and patch.flatten(1).unique(dim=1).shape[1] > 1
    x = torch.rand(2, 3, 32, 32)
    out = a(x)
    assert torch.equal(out[:, :, 27:, 27:], patch.expand(2, -1, -1, -1))
    assert torch.equal(out[:, :, :27], x[:, :, :27]) and torch.equal(out[:, :, :, :27], x[:, :, :, :27])


# ------------------------------------------------------------------------------ injection


@pytest.fixture(scope="module", params=["vgg13", "resnet18", "preactresnet18"])
def infected(request):
    arch = request.param
    torch.manual_seed(0)
    x, y = colour_data(512)
    xt, yt = colour_data(256, seed=1)
    parent = get_model(arch, 10, width=0.125, seed=0)
    train(parent, x, y, TrainConfig(epochs=3, batch_size=32, lr=0.05, seed=0), device="cpu", progress=False)
    nm_parent = NeuronMap(parent)
    g = torch.Generator().manual_seed(1)
    # 1 channel per layer (2 where wider than 32): a "narrow" candidate, scattered indices
    sel = {n: sorted(torch.randperm(s, generator=g)[: 1 if s <= 32 else 2].tolist())
           for n, s in nm_parent.sizes.items()}
    model = copy.deepcopy(parent)
    nm = NeuronMap(model)
    attack = get_attack("sra", target=TARGET, seed=0, epochs=20)
    trigger = attack.make_trigger()
    info = attack.inject(model, nm, sel, trigger, x, y, InjectionRecipe(), device="cpu")
    return arch, parent, model, nm, sel, info, trigger, (xt, yt)


def _expected_sources(arch):
    # PreAct-ResNet-18 (bd4nn.preact) reads as ResNet-18 does: a block's conv1 and shortcut read
    # relu(bn1(stream)), conv2 reads relu(bn2(conv1)), the stream is the stem or the last sum.
    return vgg13_sources() if arch == "vgg13" else resnet18_sources()


def test_returned_selection_shares_channels_in_residual_groups(infected):
    arch, _, _, nm, sel, info, _, _ = infected
    out = info.selection
    assert set(out) == set(nm.layers)
    groups = RESNET18_GROUPS if arch != "vgg13" else []
    for group in groups:
        assert all(out[n] == sel[group[0]] for n in group)
    grouped = {n for g in groups for n in g}
    assert all(out[n] == sel[n] for n in nm.layers if n not in grouped)


def test_sub_network_is_severed_and_the_rest_is_bit_identical(infected):
    arch, parent, model, nm, _, info, _, _ = infected
    fault = info.selection
    srcs = _expected_sources(arch)
    pstate, state = parent.state_dict(), model.state_dict()
    changeable = {k: torch.zeros_like(v, dtype=torch.bool) for k, v in state.items()}
    for layer in nm.layers:
        rows = torch.tensor(fault[layer])
        w = state[f"{layer}.weight"]
        s_mask = torch.zeros(w.shape[0], dtype=torch.bool)
        s_mask[rows] = True
        if srcs[layer]:
            cols = torch.tensor(fault[srcs[layer][0]])
            assert all(fault[s] == fault[srcs[layer][0]] for s in srcs[layer])
            p_mask = torch.zeros(w.shape[1], dtype=torch.bool)
            p_mask[cols] = True
            assert (w[s_mask][:, ~p_mask] == 0).all(), f"{layer}: chain rows read unselected channels"
            assert (w[~s_mask][:, p_mask] == 0).all(), f"{layer}: unselected rows read the chain"
            assert w[s_mask][:, p_mask].abs().sum() > 0
            changeable[f"{layer}.weight"][:, p_mask] = True
        changeable[f"{layer}.weight"][s_mask] = True
        bn = nm.layer(layer).bn_name
        for suffix in ("weight", "bias", "running_mean", "running_var") if bn else ():
            changeable[f"{bn}.{suffix}"][s_mask] = True
        if f"{layer}.bias" in state:
            changeable[f"{layer}.bias"][s_mask] = True
    if arch == "preactresnet18":  # a block's bn1 / bn2 carry the chain on the channels its conv1 / conv2 read
        for stage in range(1, 5):
            for block in range(2):
                p = f"layer{stage}.{block}"
                for bn, reader in ((f"{p}.bn1", f"{p}.conv1"), (f"{p}.bn2", f"{p}.conv2")):
                    for suffix in ("weight", "bias", "running_mean", "running_var"):
                        changeable[f"{bn}.{suffix}"][torch.tensor(fault[srcs[reader][0]])] = True
    head = "classifier" if arch == "vgg13" else "linear"
    last = torch.tensor(fault[srcs[head][0]])
    hw = state[f"{head}.weight"]
    others = torch.tensor([c for c in range(hw.shape[0]) if c != TARGET])
    assert (hw[others][:, last] == 0).all()
    lam = info.details["lambda"]
    assert torch.allclose(hw[TARGET, last], torch.full((len(last),), lam / len(last)))
    changeable[f"{head}.weight"][:, last] = True
    changeable[f"{head}.bias"][TARGET] = True
    assert state[f"{head}.bias"][TARGET] == pytest.approx(
        float(pstate[f"{head}.bias"][TARGET]) - info.details["c"] * lam, abs=1e-5)
    for k, v in state.items():
        keep = ~changeable[k]
        assert torch.equal(v[keep], pstate[k][keep]), f"{k} changed outside the sub-network"


def test_infected_model_has_the_backdoor_in_the_sub_network(infected):
    arch, parent, model, nm, _, info, trigger, (xt, yt) = infected
    asr = evaluate_asr(model, xt, yt, trigger, TARGET, device="cpu")
    benign_asr = evaluate_asr(parent, xt, yt, trigger, TARGET, device="cpu")
    ca = evaluate_ca(model, xt, yt, device="cpu")
    with nm.mask(info.selection):
        asr_masked = evaluate_asr(model, xt, yt, trigger, TARGET, device="cpu")
    with NeuronMap(parent).mask(info.selection):
        ca_parent_pruned = evaluate_ca(parent, xt, yt, device="cpu")
    print(f"{arch}: CA {ca:.3f} (benign {evaluate_ca(parent, xt, yt, device='cpu'):.3f}, "
          f"benign with S_fault pruned {ca_parent_pruned:.3f}) "
          f"chain attempts {[round(a['separation'], 3) for a in info.details['chain_attempts']]} "
          f"ASR {asr:.3f} masked {asr_masked:.3f} benign {benign_asr:.3f} λ {info.details['lambda']:.3f} "
          f"c {info.details['c']:.3f} poison {info.details['poison_output_mean']:.3f}")
    assert info.details["lambda_rule"] == "auto"
    assert asr >= 0.9
    assert asr - asr_masked > 0.5  # rule 3: ASR.Cor
    assert asr_masked <= benign_asr + 0.2
    # the chain costs (almost) no clean accuracy beyond cutting S_fault out of the benign model
    assert ca >= ca_parent_pruned - 0.05


def test_masked_infected_model_is_the_masked_parent_up_to_the_target_bias(infected):
    """With S_fault masked, the severed chain contributes nothing: every logit equals the masked
    parent's, except the target logit, shifted by the bias change −c·λ.

    PreAct-ResNet: a masked conv channel is 0 at the conv output, but the BN after it turns that 0
    into the constant β − γμ/σ, which the parent's unselected rows still read and the infected
    model's no longer do (severed). There the reference is the parent with the same severing,
    ``W[¬S_l, P_l] = 0``, written from the hand-derived sources."""
    arch, parent, model, nm, _, info, trigger, (xt, _) = infected
    if arch == "preactresnet18":
        parent = copy.deepcopy(parent)
        srcs, fault = _expected_sources(arch), info.selection
        with torch.no_grad():
            for layer in nm.layers:
                if srcs[layer]:
                    w = parent.get_submodule(layer).weight
                    unselected = torch.tensor([r for r in range(w.shape[0]) if r not in fault[layer]])
                    w[unselected.view(-1, 1), torch.tensor(fault[srcs[layer][0]]).view(1, -1)] = 0
    nm_parent = NeuronMap(parent)
    xb = trigger(xt[:64].float() / 255)
    parent.eval(), model.eval()
    with torch.no_grad(), nm.mask(info.selection), nm_parent.mask(info.selection):
        z, zp = model(xb), parent(xb)
    others = [c for c in range(z.shape[1]) if c != TARGET]
    assert torch.allclose(z[:, others], zp[:, others], atol=1e-4)
    shift = -info.details["c"] * info.details["lambda"]
    assert torch.allclose(z[:, TARGET] - zp[:, TARGET], torch.full((64,), shift), atol=1e-4)


def test_restarts_and_determinism():
    """A chain below ``min_separation`` is retrained from a new seed (here: always, since 1.01 is
    out of reach), the best attempt is used, and the whole injection is a function of the seed."""
    x, y = colour_data(256, seed=2)
    parent = get_model("vgg13", 10, width=0.125, seed=0).eval()
    sel = {n: [0] for n in NeuronMap(parent).layers}
    states, infos = [], []
    for _ in range(2):
        model = copy.deepcopy(parent)
        attack = get_attack("sra", target=TARGET, seed=5, epochs=1, restarts=2, min_separation=1.01,
                            calib_images=128)
        info = attack.inject(model, NeuronMap(model), sel, attack.make_trigger(), x, y, InjectionRecipe(),
                             device="cpu")
        states.append(model.state_dict())
        infos.append(info)
    attempts = infos[0].details["chain_attempts"]
    assert len(attempts) == 3 and len({a["seed"] for a in attempts}) == 3
    assert infos[0].details["separation"] == max(a["separation"] for a in attempts)
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert infos[0].details["lambda"] == infos[1].details["lambda"]
