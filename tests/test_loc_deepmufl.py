"""deepmufl: batched mutant outcomes equal explicitly built mutants; score formulas by hand."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from bd4nn.models import get_model
from bd4nn.neurons import NeuronMap
from localizers.base import CleanData
from localizers.deepmufl import MUTANTS, DeepMufl, MutationResult, metallaxis, muse, mutant_counts, score_result

N_CLASSES = 4


def _model(arch: str, dtype=torch.float32):
    """A tiny model with non-trivial BN statistics (fresh BN is the identity)."""
    m = get_model(arch, N_CLASSES, width=1 / 16, seed=0).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                n = mod.num_features
                mod.running_mean.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
                mod.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                mod.weight.copy_(torch.rand(n, generator=g) + 0.5)
                mod.bias.copy_(torch.rand(n, generator=g) * 0.6 - 0.3)
    return m.to(dtype)


def _tests(model, n=48):
    """Random images labelled with the model's own predictions, a third of them flipped."""
    g = torch.Generator().manual_seed(3)
    x = torch.rand(n, 3, 32, 32, generator=g)
    with torch.no_grad():
        y = model(x.to(next(model.parameters()).dtype)).argmax(1)
    y[::3] = (y[::3] + 1) % N_CLASSES
    return x, y


def _explicit(model, layer, x, y):
    """The counts with every mutant built as a modified deep copy of the model."""
    x = x.to(next(model.parameters()).dtype)
    with torch.no_grad():
        orig = model(x).argmax(1)
    passing = orig == y
    n = NeuronMap(model).sizes[layer]
    rows = []
    for c in range(n):
        for target, op, v in MUTANTS:
            m = copy.deepcopy(model)
            nm = NeuronMap(m)
            conv = nm.conv(layer)
            if conv.bias is None and nm.bn(layer) is None:  # PreAct: the absent bias is a zero one
                conv.bias = torch.nn.Parameter(torch.zeros(conv.out_channels, dtype=conv.weight.dtype))
            p = conv.weight if target == "w" else (conv.bias if conv.bias is not None else nm.bn(layer).bias)
            with torch.no_grad():
                if op == "add":
                    p[c] += v
                else:
                    p[c] *= v
                pred = m(x).argmax(1)
            correct, changed = pred == y, pred != orig
            rows.append([int((correct & ~passing).sum()), int((~correct & passing).sum()),
                         int((changed & ~passing).sum()), int((changed & passing).sum())])
    return torch.tensor(rows).view(n, len(MUTANTS), 4)


CASES = [
    ("vgg13", ["features.0", "features.7", "features.31"]),  # first (RGB input), middle, penultimate
    ("resnet18", ["conv1", "layer1.0.conv2", "layer2.0.shortcut.0", "layer3.1.conv1", "layer4.1.conv2"]),
    ("preactresnet18", ["conv1", "layer1.0.conv1", "layer2.0.shortcut.0"]),  # no BN of their own
]


@pytest.mark.parametrize("arch,layers", CASES)
def test_batched_counts_equal_explicit_mutants_float64(arch, layers):
    model = _model(arch, torch.float64)
    nm = NeuronMap(model)
    x, y = _tests(model)
    # small chunks: a forward mixes channels and kinds, tests split over two clean passes
    res = mutant_counts(model, nm, x.double(), y, layers, batch_size=32, max_rows=32 * 5)
    assert res.backend == "fx"
    assert res.n_fail > 0 and res.n_pass > 0
    for name in layers:
        want = _explicit(model, name, x, y)
        assert torch.equal(res.counts[name], want), name
    assert sum(int(res.counts[n][..., :2].sum()) for n in layers) > 0  # mutants do flip outcomes


@pytest.mark.parametrize("arch,layers", [("resnet18", ["layer2.0.shortcut.0", "layer3.1.conv1"]),
                                         ("preactresnet18", ["layer1.1.conv2", "layer3.0.shortcut.0"])])
def test_hook_backend_and_channels_last_agree(arch, layers):
    model = _model(arch, torch.float64)
    nm = NeuronMap(model)
    x, y = _tests(model)
    want = {n: _explicit(model, n, x, y) for n in layers}
    for kw in ({"backend": "hooks"}, {"channels_last": True}):
        res = mutant_counts(model, nm, x.double(), y, layers, batch_size=48, max_rows=48 * 7, **kw)
        assert res.backend == kw.get("backend", "fx")
        for n in layers:
            assert torch.equal(res.counts[n], want[n]), (kw, n)


def test_float32_counts_match_explicit_mutants():
    model = _model("resnet18")
    nm = NeuronMap(model)
    x, y = _tests(model)
    layers = ["layer2.0.conv1", "layer2.0.shortcut.0"]
    res = mutant_counts(model, nm, x, y, layers)
    for n in layers:
        assert torch.equal(res.counts[n], _explicit(model, n, x, y)), n


def test_formulas_by_hand():
    # one neuron, two mutants (the rest of the 8 are all-zero rows)
    counts = torch.zeros(1, 8, 4, dtype=torch.long)
    counts[0, 0] = torch.tensor([3, 1, 4, 1])  # n_f2p, n_p2f, n_i_f, n_i_p
    counts[0, 1] = torch.tensor([0, 0, 2, 0])
    counts[0, 2] = torch.tensor([1, 3, 1, 3])
    f, p = 5, 10
    och = metallaxis(counts, f, "ochiai", 1)
    assert och[0, 0].item() == pytest.approx(3 / math.sqrt(5 * 4))
    assert och[0, 1].item() == 0.0 and och[0, 2].item() == pytest.approx(1 / math.sqrt(5 * 4))
    assert metallaxis(counts, f, "sbi", 1)[0, 0].item() == pytest.approx(3 / 4)
    assert metallaxis(counts, f, "sbi", 1)[0, 2].item() == pytest.approx(1 / 4)
    assert metallaxis(counts, f, "ochiai", 2)[0, 1].item() == pytest.approx(2 / math.sqrt(5 * 2))
    assert metallaxis(counts, f, "ochiai", 2)[0, 0].item() == pytest.approx(4 / math.sqrt(5 * 5))
    assert metallaxis(counts, 0, "ochiai", 1).abs().sum().item() == 0.0  # F = 0
    m = muse(counts, f, p, torch.tensor([3]), torch.tensor([4]))
    alpha = (3 / f) * (4 / p)
    want = (abs(3 / f - alpha * 1 / p) + 0 + abs(1 / f - alpha * 3 / p)) / 8
    assert m[0].item() == pytest.approx(want)
    # the localizer's aggregation over a neuron's mutants
    res = MutationResult({"L": counts}, torch.zeros(15), torch.tensor([True] * p + [False] * f),
                         {"L": torch.tensor([3])}, {"L": torch.tensor([4])}, "fx")
    assert score_result(res)["L"].item() == pytest.approx(3 / math.sqrt(20))  # ochiai, type 1, max
    assert score_result(res, aggregation="mean")["L"].item() == pytest.approx(4 / math.sqrt(20) / 8)
    assert score_result(res, "sbi")["L"].item() == pytest.approx(3 / 4)
    assert score_result(res, "muse")["L"].item() == pytest.approx(want)


def test_distinct_flips_for_muse():
    model = _model("vgg13")
    nm = NeuronMap(model)
    x, y = _tests(model)
    layer = "features.7"
    res = mutant_counts(model, nm, x, y, [layer], max_rows=100)
    c = res.counts[layer]
    # distinct tests are at least the largest single mutant's and at most the sum / the total
    assert torch.all(res.f2p_distinct[layer] >= c[..., 0].max(1).values)
    assert torch.all(res.f2p_distinct[layer] <= torch.minimum(c[..., 0].sum(1), torch.tensor(res.n_fail)))
    assert torch.all(res.p2f_distinct[layer] >= c[..., 1].max(1).values)
    assert torch.all(res.p2f_distinct[layer] <= torch.minimum(c[..., 1].sum(1), torch.tensor(res.n_pass)))


@pytest.mark.parametrize("arch", ["vgg13", "resnet18"])
def test_scores_cover_all_layers_deterministic_and_leave_the_model_alone(arch):
    model = _model(arch)
    model.layer1.train() if arch == "resnet18" else model.features[4].train()  # mixed modes survive
    nm = NeuronMap(model)
    x, y = _tests(model, 24)
    clean = CleanData((x * 255).to(torch.uint8), y, N_CLASSES)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    loc = DeepMufl(max_tests=16, progress=False)
    a = loc(model, nm, clean, seed=1)
    b = loc(model, nm, clean, seed=1)
    assert list(a) == nm.layers and all(a[n].numel() == nm.sizes[n] for n in a)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [m.training for m in model.modules()] == modes
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert all(0.0 <= float(v.min()) and float(v.max()) <= 1.0 for v in a.values())
    assert any(float(v.max()) > 0 for v in a.values())
    for kw in ({"formula": "muse"}, {"formula": "sbi", "metallaxis_type": 2, "aggregation": "mean"}):
        out = DeepMufl(max_tests=16, progress=False, **kw)(model, nm, clean)
        assert list(out) == nm.layers


def test_bad_settings():
    from localizers.base import LocalizerError

    model = _model("vgg13")
    nm = NeuronMap(model)
    x, y = _tests(model, 4)
    clean = CleanData(x, y, N_CLASSES)
    for kw in ({"formula": "dstar"}, {"aggregation": "median"}, {"metallaxis_type": 3}):
        with pytest.raises(LocalizerError):
            DeepMufl(progress=False, **kw)(model, nm, clean)


class _Untraceable(torch.nn.Module):
    """A VGG whose forward branches on a tensor value: torch.fx cannot trace it."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        if x.sum() > -1.0:  # data-dependent control flow
            return self.inner(x)
        return -self.inner(x)


def test_fallback_only_when_fx_cannot_trace_and_the_backend_is_recorded(monkeypatch):
    import localizers.deepmufl as dm

    model = _model("vgg13")
    x, y = _tests(model, 16)
    clean = CleanData((x * 255).to(torch.uint8), y, N_CLASSES)
    loc = DeepMufl(max_tests=8, progress=False)
    loc(model, NeuronMap(model), clean)
    assert loc.report()["backend"] == "fx" and loc.report()["fallback"] is None

    wrapped = _Untraceable(copy.deepcopy(model)).eval()
    loc(wrapped, NeuronMap(wrapped), clean)
    assert loc.report()["backend"] == "hooks" and "TraceError" in loc.report()["fallback"]

    # any other failure of the fast path is a bug and surfaces, not a silent slowdown
    def broken_check(runner, *args, **kwargs):
        if runner.backend == "fx":
            raise RuntimeError("a bug in the fx path")
        return real_check(runner, *args, **kwargs)

    real_check = dm._check
    monkeypatch.setattr(dm, "_check", broken_check)
    with pytest.raises(RuntimeError, match="a bug in the fx path"):
        loc(model, NeuronMap(model), clean)
