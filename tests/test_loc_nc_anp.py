"""Neural Cleanse and ANP localizers (localizers/nc.py, localizers/anp.py).

Expected values come from the methods' definitions, hand computation or an independent
re-computation with plain torch (torch.optim.Adam, torch.func.functional_call), never from the
localizers' own output. The planted model (tests/planted.py) has a known backdoor: a 3×3 white
patch → class 0, carried by a known selection of channels.
"""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bd4nn.models import get_model
from bd4nn.neurons import NeuronMap
from localizers.anp import ANP, NoisyBN, _anp_mode, anp_masks
from localizers.base import CleanData
from localizers.nc import NeuralCleanse, _Schedule, mad_outliers, reverse_engineer
from planted import colour4, planted


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors on a shared 2-core CPU: one thread is several times faster."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def snapshot(model):
    return (
        {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
        [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()],
        [getattr(m, "track_running_stats", None) for m in model.modules()],
        [None if p.grad is None else p.grad.clone() for p in model.parameters()],
    )


def assert_unchanged(model, snap):
    state, modes, req, hooks, track, grads = snap
    now = model.state_dict(keep_vars=True)
    assert set(now) == set(state)
    for k, v in state.items():
        assert torch.equal(now[k].detach(), v), k
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == req
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] == hooks
    assert [getattr(m, "track_running_stats", None) for m in model.modules()] == track
    for p, g in zip(model.parameters(), grads):
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)


def mean_rank_fraction(scores, neuron_map, selection):
    """Mean rank (0 = most suspicious, 1 = least) of the selection among all scored neurons."""
    flat = torch.cat([scores[l] for l in neuron_map.layers])
    order = flat.argsort(descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    return rank[neuron_map.to_flat(selection)].float().mean().item() / (len(order) - 1)


# ------------------------------------------------------------------------------- NC: parts


def test_mad_outliers_hand_computed():
    # odd count: median 11, |dev| = [10,1,0,1,2] -> median 1, MAD = 1.4826
    a, flagged, med, mad = mad_outliers([1.0, 10.0, 11.0, 12.0, 13.0])
    assert med == 11.0 and mad == pytest.approx(1.4826)
    assert a == pytest.approx(10 / 1.4826)
    assert flagged == [0]  # class 1 is below the median but only 0.67 MADs away
    # even count, numpy median (NC) = mean of the middle two: median 9, |dev| = [7,1,1,3] -> 2
    a, flagged, med, mad = mad_outliers([2.0, 8.0, 10.0, 12.0], median="numpy")
    assert med == 9.0 and mad == pytest.approx(2 * 1.4826)
    assert a == pytest.approx(7 / (2 * 1.4826)) and flagged == [0]
    # even count, torch.median (BB, the default) = lower middle: median 8, |dev| = [6,0,2,4] -> 2
    a, flagged, med, mad = mad_outliers([2.0, 8.0, 10.0, 12.0])
    assert med == 8.0 and mad == pytest.approx(2 * 1.4826)
    assert a == pytest.approx(6 / (2 * 1.4826)) and flagged == [0]
    # large norms are never flagged, however far away
    a, flagged, _, _ = mad_outliers([10.0, 10.5, 11.0, 100.0, 9.5])
    assert flagged == [] and a == pytest.approx(1.0 / (1.4826 * 0.5))
    # no spread at all: nothing is anomalous
    a, flagged, _, _ = mad_outliers([5.0, 5.0, 5.0])
    assert a == 0.0 and flagged == []


def test_nc_cost_schedule_follows_the_published_rules():
    assert _Schedule(NeuralCleanse.Settings()).cost == pytest.approx(1e-3)  # BB: starts at init_cost
    s = NeuralCleanse.Settings(patience=2, init_cost=1e-3, cost_multiplier=2.0, attack_succ_threshold=0.99,
                               early_stop_patience=3, reset_cost_to_zero=True, early_stop_threshold=1.0)
    sc = _Schedule(s)
    assert sc.cost == 0.0  # NC: RESET_COST_TO_ZERO
    assert sc.update(1.0, 500.0) is True and sc.cost == 0.0  # first success is kept
    sc.update(1.0, 600.0)  # 2nd successful epoch at cost 0 -> cost = init_cost
    assert sc.cost == pytest.approx(1e-3)
    sc.update(1.0, 400.0)  # 2 successes since the reset -> up x2
    assert sc.cost == pytest.approx(2e-3) and sc.up_flag and not sc.down_flag
    assert sc.update(0.5, 100.0) is False  # failed epochs are never kept
    sc.update(0.5, 100.0)  # 2 failures -> down /2**1.5
    assert sc.cost == pytest.approx(2e-3 / 2**1.5) and sc.down_flag
    assert sc.reg_best == 400.0
    # early stop: both flags set; best unchanged (>= 1.0 x previous) for 3 epochs
    assert not sc.stopped
    for _ in range(3):
        sc.update(0.5, 100.0)
    assert sc.stopped


def _tiny_vgg(num_classes=3, seed=0):
    return get_model("vgg13", num_classes, width=1 / 16, seed=seed).eval()


def test_nc_batched_classes_are_independent_problems():
    model = _tiny_vgg(3)
    x, y = colour4(16, seed=5)
    clean = CleanData(x, y % 3, 3)
    g = torch.Generator().manual_seed(7)
    init = (torch.rand(3, 1, 32, 32, generator=g), torch.rand(3, 3, 32, 32, generator=g))
    # cost fixed at init_cost and no schedule move within 6 epochs (patience 10)
    s = NeuralCleanse.Settings(epochs=6, batch_size=16, init_cost=1e-2, reset_cost_to_zero=False,
                               patience=10, early_stop=False, augment=False)
    batched = reverse_engineer(model, clean, None, s, seed=3, init=init)
    for k in range(3):
        alone = reverse_engineer(model, clean, [k], s, seed=3, init=init)
        torch.testing.assert_close(alone.final_masks[0], batched.final_masks[k], atol=1e-5, rtol=0)
        torch.testing.assert_close(alone.final_patterns[0], batched.final_patterns[k], atol=1e-5, rtol=0)

    # independent re-computation with torch's Adam: one mini-batch = all 16 images per epoch
    xf = x.float() / 255
    k = 1
    eps = s.tanh_eps
    tm = torch.atanh(((init[0][k] - 0.5) * (2 - eps)).clamp(-1 + 1e-6, 1 - 1e-6)).requires_grad_()
    tp = torch.atanh(((init[1][k] - 0.5) * (2 - eps)).clamp(-1 + 1e-6, 1 - 1e-6)).requires_grad_()
    opt = torch.optim.Adam([tm, tp], lr=0.1, betas=(0.5, 0.9), eps=1e-8)
    for _ in range(6):
        m = torch.tanh(tm) / (2 - eps) + 0.5
        p = torch.tanh(tp) / (2 - eps) + 0.5
        out = model((1 - m) * xf + m * p)
        loss = F.cross_entropy(out, torch.full((16,), k)) + 1e-2 * m.abs().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        torch.testing.assert_close(batched.final_masks[k], torch.tanh(tm) / (2 - eps) + 0.5, atol=1e-4, rtol=0)
        torch.testing.assert_close(batched.final_patterns[k], torch.tanh(tp) / (2 - eps) + 0.5, atol=1e-4, rtol=0)
    assert batched.final_costs == [1e-2] * 3


def test_nc_batched_equals_alone_with_several_minibatches_and_schedule():
    model = _tiny_vgg(3, seed=1)
    x, y = colour4(24, seed=6)
    clean = CleanData(x, y % 3, 3)
    s = NeuralCleanse.Settings(epochs=4, batch_size=8, patience=1, init_cost=1e-2, init="random")
    batched = reverse_engineer(model, clean, None, s, seed=11)
    alone = reverse_engineer(model, clean, [2], s, seed=11)
    torch.testing.assert_close(alone.final_masks[0], batched.final_masks[2], atol=1e-5, rtol=0)
    torch.testing.assert_close(alone.masks[0], batched.masks[2], atol=1e-5, rtol=0)
    assert alone.final_costs[0] == pytest.approx(batched.final_costs[2])
    assert alone.epochs_run[0] == batched.epochs_run[2]


# ------------------------------------------------------------------------- NC: planted model


NC_TEST = dict(epochs=40, batch_size=16, init_cost=1e-2, patience=2, early_stop_patience=10)


def test_nc_recovers_the_planted_target_and_trigger_neurons():
    pl = planted()
    model = pl.model
    clean = CleanData(pl.clean.x[:64], pl.clean.y[:64], pl.clean.num_classes)
    x_before = clean.x.clone()
    snap = snapshot(model)
    nc = NeuralCleanse(**NC_TEST)
    scores = nc(model, pl.neuron_map, clean, seed=0)
    assert_unchanged(model, snap)
    assert torch.equal(clean.x, x_before)

    pen = pl.neuron_map.penultimate
    assert list(scores) == [pen] and scores[pen].shape == (pl.neuron_map.sizes[pen],)
    norms = nc.search.norms
    assert nc.target == pl.target == int(norms.argmin())
    # the planted trigger covers 9 pixels; the reversed mask must be of that order and far
    # below every other class's
    assert norms[pl.target] <= 2 * 9
    assert all(norms[pl.target] < 0.1 * norms[c] for c in range(4) if c != pl.target)
    assert nc.report()["target"] == pl.target and len(nc.norms) == 4
    def lower_median(v):  # torch.median's convention (BackdoorBench), by hand
        return sorted(v)[(len(v) - 1) // 2]

    med = lower_median(norms.tolist())  # independent median / MAD
    mad = 1.4826 * lower_median([abs(v - med) for v in norms.tolist()])
    assert nc.anomaly_index == pytest.approx((med - norms.min().item()) / mad, rel=1e-5)
    # the stamped trigger drives the planted last-layer channels: most of the top-k are planted
    k = len(pl.selection[pen])
    top = set(scores[pen].topk(k).indices.tolist())
    assert len(top & set(pl.selection[pen])) >= max(2, math.ceil(0.6 * k))  # chance: k²/n = 2


# ----------------------------------------------------------------------------------- ANP


def test_noisy_bn_hooks_equal_the_noisy_batchnorm_definition():
    """a⊙out + b equals BN with weight γ·(m+δ) and bias β·(1+ξ) (ANP anp_batchnorm.py), in
    batch-statistics mode, on a ResNet with shortcut convs."""
    model = get_model("resnet18", 4, width=1 / 16, seed=0)
    nm = NeuronMap(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in nm.layers:
            bn = nm.bn(layer)
            bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
            bn.bias.copy_(torch.rand(bn.num_features, generator=g) - 0.5)
    x = torch.rand(8, 3, 32, 32, generator=g)
    t = nm.total
    m, d, xi = torch.rand(t, generator=g), torch.rand(t, generator=g) - 0.5, torch.rand(t, generator=g) - 0.5
    sizes = [nm.sizes[l] for l in nm.layers]
    params = {}
    for layer, ms, ds, xs in zip(nm.layers, m.split(sizes), d.split(sizes), xi.split(sizes)):
        bn, name = nm.bn(layer), nm.layer(layer).bn_name
        params[f"{name}.weight"] = bn.weight.detach() * (ms + ds)
        params[f"{name}.bias"] = bn.bias.detach() * (1 + xs)
    snap = snapshot(model)
    with _anp_mode(model, True):
        expected = torch.func.functional_call(model, params, (x,))
        noisy = NoisyBN(nm)
        with noisy:
            noisy.set(*NoisyBN.coefficients(m, noisy.beta("cpu"), d, xi))
            got = model(x)
            noisy.set(*NoisyBN.coefficients(torch.ones(t), noisy.beta("cpu")))
            plain = model(x)
        reference_plain = model(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain, reference_plain, atol=1e-5, rtol=1e-5)
    assert_unchanged(model, snap)


def test_anp_one_step_without_noise_is_one_sgd_step_on_the_clean_loss():
    """eps = 0: the mask moves by lr·α·∂CE/∂m once (SGD's first momentum step is the gradient).
    With a single clean image every batch is that image repeated."""
    model = get_model("resnet18", 3, width=1 / 16, seed=2)
    nm = NeuronMap(model)
    xf = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    clean = CleanData(xf, torch.tensor([2]), 3)
    masks = anp_masks(model, nm, clean, ANP.Settings(eps=0.0, nb_iter=1, batch_size=4, augment=False), seed=0)

    ref = copy.deepcopy(model).train()
    mask = torch.ones(nm.total, requires_grad=True)
    sizes = [nm.sizes[l] for l in nm.layers]
    params = {f"{nm.layer(l).bn_name}.weight": nm.bn(l).weight.detach() * ms
              for l, ms in zip(nm.layers, mask.split(sizes))}
    out = torch.func.functional_call(ref, params, (xf.repeat(4, 1, 1, 1),))
    loss = 0.2 * F.cross_entropy(out, torch.tensor([2] * 4))
    (grad,) = torch.autograd.grad(loss, [mask])
    expected = (1 - 0.2 * grad).clamp(0, 1)
    got = torch.cat([masks[l] for l in nm.layers])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert (got < 1).any()  # a real step happened


def test_anp_ranks_the_planted_channels_in_the_top_half():
    pl = planted()
    model = pl.model
    snap = snapshot(model)
    x_before = pl.clean.x.clone()
    # ε = 0.2: at ANP's 0.4 every channel of a 4-channel-wide net is "sensitive" and the masks
    # of all layers collapse; fewer iterations than the published 2,000 keep the test short.
    anp = ANP(nb_iter=300, batch_size=32, eps=0.2)
    scores = anp(model, pl.neuron_map, pl.clean, seed=0)
    assert_unchanged(model, snap)
    assert torch.equal(pl.clean.x, x_before)
    assert list(scores) == pl.neuron_map.layers
    for layer, n in pl.neuron_map.sizes.items():
        assert scores[layer].shape == (n,)
        assert torch.equal(scores[layer], 1 - anp.masks[layer])
        assert ((anp.masks[layer] >= 0) & (anp.masks[layer] <= 1)).all()
    assert mean_rank_fraction(scores, pl.neuron_map, pl.selection) < 0.45  # random: 0.5


# ------------------------------------------------------ both: determinism, scope, any model


@pytest.mark.parametrize("arch", ["vgg13", "resnet18"])
def test_scores_cover_the_scope_deterministically_and_leave_the_model_alone(arch):
    model = get_model(arch, 3, width=1 / 16, seed=4)
    model.train()  # a caller's model in train mode must come back in train mode
    (model.features[1] if arch == "vgg13" else model.bn1).eval()  # ... and mixed modes too
    nm = NeuronMap(model)
    x, y = colour4(12, seed=9)
    clean = CleanData(x.float() / 255, y % 3, 3)  # float input works as well as uint8
    x_before = clean.x.clone()
    snap = snapshot(model)

    nc_settings = dict(epochs=2, batch_size=8, init="random")
    anp_settings = dict(nb_iter=3, batch_size=8)
    runs = {}
    for name, cls, kw in (("nc", NeuralCleanse, nc_settings), ("anp", ANP, anp_settings)):
        a = cls(**kw)(model, nm, clean, seed=5)
        b = cls(**kw)(model, nm, clean, seed=5, device="cpu")
        c = cls(**kw)(model, nm, clean, seed=6)
        assert list(a) == list(b) and all(torch.equal(a[l], b[l]) for l in a)  # same seed
        assert any(not torch.equal(a[l], c[l]) for l in a)  # another seed, other scores
        runs[name] = a
        assert_unchanged(model, snap)
        assert torch.equal(clean.x, x_before)

    assert list(runs["nc"]) == [nm.penultimate]
    assert runs["nc"][nm.penultimate].shape == (nm.sizes[nm.penultimate],)
    assert list(runs["anp"]) == nm.layers
    assert all(runs["anp"][l].shape == (nm.sizes[l],) for l in nm.layers)
    if arch == "resnet18":
        assert any("shortcut" in l for l in runs["anp"])  # shortcut BNs are neurons too


def test_settings_defaults_are_the_published_ones():
    nc = NeuralCleanse.Settings()
    assert (nc.lr, nc.betas, nc.init_cost, nc.patience, nc.cost_multiplier) == (0.1, (0.5, 0.9), 1e-3, 5, 2.0)
    assert (nc.attack_succ_threshold, nc.early_stop_patience, nc.reset_cost_to_zero) == (0.98, 25, False)
    assert (nc.epochs, nc.batch_size) == (80, 256)  # BackdoorBench's budget
    anp = ANP.Settings()
    assert (anp.eps, anp.steps, anp.alpha, anp.nb_iter, anp.batch_size, anp.lr, anp.momentum) == (
        0.4, 1, 0.2, 2000, 128, 0.2, 0.9)
    assert NeuralCleanse.scope == "penultimate" and ANP.scope == "all"


# BackdoorBench's Neural Cleanse, the one source of NC's defaults (issue 11); values read from
# SCLBD/BackdoorBench config/defense/nc/cifar10.yaml (yaml) and defense/nc.py (py).
BACKDOORBENCH_NC = {
    "epochs": 80,                    # yaml nc_epoch
    "batch_size": 256,               # yaml batch_size
    "lr": 0.1,                       # yaml mask_lr
    "betas": (0.5, 0.9),             # py: torch.optim.Adam(..., betas=(0.5, 0.9))
    "adam_eps": 1e-8,                # py: torch's Adam default
    "init_cost": 1e-3,               # yaml init_cost
    "cost_multiplier": 2.0,          # yaml cost_multiplier
    "patience": 5,                   # yaml patience
    "reset_cost_to_zero": False,     # py: each label's Recorder starts at init_cost
    "attack_succ_threshold": 0.98,   # yaml atk_succ_threshold 98.0 (percent)
    "early_stop": True,              # yaml early_stop
    "early_stop_threshold": 0.99,    # yaml early_stop_threshold
    "early_stop_patience": 25,       # yaml early_stop_patience
    "tanh_eps": 1e-7,                # yaml EPSILON
    "init": "ones",                  # py: np.ones mask and pattern init
    "augment": True,                 # py: the clean subset uses the train transform (crop 4 + flip)
    "mad_threshold": 2.0,            # py: anomaly index against 2
    "mad_consistency": 1.4826,       # py: consistency constant
    "median": "torch",               # py: torch.median (the lower middle value)
    "unreached": "first",            # py: the first epoch's mask when the threshold is never reached
}


def test_nc_defaults_are_backdoorbenchs():
    from localizers.nc import NeuralCleanse

    got = NeuralCleanse().config()
    for key, want in BACKDOORBENCH_NC.items():
        assert got[key] == (list(want) if isinstance(want, tuple) and isinstance(got[key], list) else want), key


def test_nc_median_conventions():
    from localizers.nc import mad_outliers

    norms = [10.0, 11.0, 12.0, 13.0, 2.0, 14.0, 15.0, 16.0, 17.0, 18.0]  # even count
    # torch.median = lower middle = 13; np.median = 13.5
    assert mad_outliers(norms, median="torch")[2] == float(torch.median(torch.tensor(norms)))
    assert mad_outliers(norms, median="numpy")[2] == pytest.approx(float(np.median(norms)))


def test_nc_unreached_class_keeps_its_first_epoch_mask_as_backdoorbench():
    model = _tiny_vgg(3)
    x, y = colour4(16, seed=5)
    clean = CleanData(x, y % 3, 3)
    never = dict(batch_size=8, attack_succ_threshold=2.0, early_stop=False)  # success is impossible
    one = reverse_engineer(model, clean, None, NeuralCleanse.Settings(epochs=1, **never), seed=4)
    three = reverse_engineer(model, clean, None, NeuralCleanse.Settings(epochs=3, **never), seed=4)
    last = reverse_engineer(model, clean, None, NeuralCleanse.Settings(epochs=3, unreached="last", **never), seed=4)
    assert not three.reached.any()
    torch.testing.assert_close(three.masks, one.final_masks, atol=0, rtol=0)
    torch.testing.assert_close(last.masks, three.final_masks, atol=0, rtol=0)
    assert not torch.equal(three.masks, three.final_masks)


def test_nc_ranks_the_pooled_feature_the_head_reads():
    from localizers.nc import activation_gap

    model = _tiny_vgg(3)
    nm = NeuronMap(model)
    x, y = colour4(12, seed=2)
    clean = CleanData(x, y % 3, 3)
    g = torch.Generator().manual_seed(0)
    mask, pattern = torch.rand(1, 32, 32, generator=g), torch.rand(3, 32, 32, generator=g)
    got = activation_gap(model, nm, nm.penultimate, clean, mask, pattern, batch_size=5)
    # by hand: the VGG head reads flatten(max_pool2d(relu(BN(last conv)), 2)); stamped minus clean
    xf = x.float() / 255
    feats = {}
    h = nm.bn(nm.penultimate).register_forward_hook(lambda m, i, o: feats.__setitem__("a", o))
    with torch.no_grad():
        pooled = []
        for xin in (xf, (1 - mask) * xf + mask * pattern):
            model(xin)
            pooled.append(F.max_pool2d(torch.relu(feats["a"]), 2).flatten(1).double().mean(0))
    h.remove()
    torch.testing.assert_close(got.double(), pooled[1] - pooled[0], atol=1e-5, rtol=1e-5)
