"""SIG and WaNet (issue 16): the triggers against their formulas computed by hand, the poisoning
rules (clean label; noise mode), the stored trigger round trip, and a micro build of each."""

import dataclasses
import math

import pytest
import torch
from safetensors.torch import load as st_load, save as st_save

from bd4nn.attacks import InjectionRecipe, StampTrigger, get_attack, list_attacks
from bd4nn.attacks.base import trigger_from_tensors
from bd4nn.attacks.sig import AdditiveTrigger, clean_label_indices, sig_signal
from bd4nn.attacks.wanet import WarpTrigger, identity_grid, random_offsets, upsample_offsets, warp_grid
from bd4nn.build import build, load_profile
from bd4nn.db import Database
from bd4nn.models import get_model
from bd4nn.neurons import NeuronMap
from synthetic import micro_profile, three_colours

CPU = torch.device("cpu")


def captured_hook(monkeypatch, module, attack, x, y, recipe):
    """Run ``attack.inject`` with the shared training loop (``bd4nn.attacks.base.train``, which
    ``PoisoningAttack.train_poisoned`` calls) replaced by a recorder; return its batch hook."""
    seen = {}

    def fake_train(model, x, y, cfg, **kw):
        seen["hook"] = kw["batch_hook"]
        return type("R", (), {"final_loss": 0.0, "train_accuracy": 1.0})()

    monkeypatch.setattr("bd4nn.attacks.base.train", fake_train)
    model = get_model("vgg13", 10, width=1 / 16, seed=0)
    nm = NeuronMap(model)
    info = attack.inject(model, nm, {nm.layers[0]: [0]}, attack.make_trigger(), x, y, recipe, device=CPU)
    return seen["hook"], info


# ------------------------------------------------------------------------------------ SIG


def test_registry_lists_the_new_attacks():
    assert {"sig", "wanet"} <= set(list_attacks())
    assert get_attack("sig").kind == get_attack("wanet").kind == "poisoning"
    s, w = get_attack("sig").settings, get_attack("wanet").settings
    assert (s.delta, s.f) == (40.0, 6.0)  # BackdoorBench config/attack/sig/default.yaml
    assert (w.k, w.s, w.cross_ratio, w.grid_rescale) == (4, 0.5, 2.0, 1.0)  # WaNet config.py


def test_sig_signal_matches_the_formula_by_hand():
    trig = get_attack("sig", delta=20).make_trigger()
    x = torch.full((2, 3, 32, 32), 0.5)
    out = trig(x)
    # column j = 4 of a 32-wide image: 20/255 · sin(2π·4·6/32) = 20/255 · sin(3π/2) = −20/255
    assert out[0, 0, 0, 4].item() == pytest.approx(0.5 - 20 / 255, abs=1e-6)
    for j in (0, 1, 4, 7, 16, 31):
        want = 0.5 + 20 / 255 * math.sin(2 * math.pi * j * 6 / 32)
        assert torch.allclose(out[:, :, :, j], torch.full((2, 3, 32), want), atol=1e-6), j  # every row, channel
    assert torch.equal(trig.signal, sig_signal(20, 6, 32, 32)) and trig.signal.shape == (1, 32, 32)
    # clipping: column 1 adds 40/255·sin(3π/8) ≈ +0.145 (default Δ = 40), column 4 subtracts 40/255
    default = get_attack("sig").make_trigger()
    assert default(torch.full((1, 3, 32, 32), 0.95))[0, :, :, 1].eq(1.0).all()
    assert default(torch.full((1, 3, 32, 32), 0.05))[0, :, :, 4].eq(0.0).all()
    assert default(torch.full((1, 3, 32, 32), 0.5))[0, 0, 0, 1].item() == pytest.approx(
        0.5 + 40 / 255 * math.sin(3 * math.pi / 8), abs=1e-6)


def test_sig_poisons_only_target_class_images_and_keeps_their_labels(monkeypatch):
    y = torch.arange(1000) % 10
    # BackdoorBench's rate: round(rate·N) of the whole set, drawn from the target class, capped
    assert torch.equal(clean_label_indices(y, 0.1, 3, seed=0), torch.nonzero(y == 3).flatten())
    half = clean_label_indices(y, 0.05, 3, seed=0)
    assert len(half) == 50 and (y[half] == 3).all()
    assert torch.equal(half, clean_label_indices(y, 0.05, 3, seed=0))
    assert not torch.equal(half, clean_label_indices(y, 0.05, 3, seed=1))

    import bd4nn.attacks.sig as sig_module

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (60, 3, 32, 32), generator=g, dtype=torch.uint8)
    yy = torch.arange(60) % 3
    attack = get_attack("sig", target=1)
    hook, info = captured_hook(monkeypatch, sig_module, attack, x, yy, InjectionRecipe(poison_rate=0.1))
    assert info.details["poisoned"] == 6
    xb = x.float() / 255
    out_x, out_y = hook(xb, yy.clone(), torch.arange(60))
    assert torch.equal(out_y, yy)  # clean label: no label changes
    changed = (out_x != xb).flatten(1).any(1)
    poisoned = clean_label_indices(yy, 0.1, 1, attack.seed)
    assert torch.equal(torch.nonzero(changed).flatten(), poisoned) and (yy[changed] == 1).all()
    assert torch.equal(out_x[changed], attack.make_trigger()(xb[changed]))


# ---------------------------------------------------------------------------------- WaNet


def test_identity_grid_and_upsampled_field_conventions():
    g = identity_grid(32)
    i, j = 5, 20
    assert g[i, j, 0].item() == pytest.approx(-1 + 2 * j / 31, abs=1e-6)  # x = column
    assert g[i, j, 1].item() == pytest.approx(-1 + 2 * i / 31, abs=1e-6)  # y = row
    off = torch.arange(32, dtype=torch.float32).reshape(2, 4, 4) / 10
    up = upsample_offsets(off, 32)
    # align_corners=True: the image corners sit on the control points; channel 0 is x
    for (r, c), (kr, kc) in {(0, 0): (0, 0), (0, 31): (0, 3), (31, 0): (3, 0), (31, 31): (3, 3)}.items():
        assert torch.allclose(up[r, c], off[:, kr, kc], atol=1e-6), (r, c)


def test_warp_grid_with_hand_made_offsets_matches_the_formula():
    s, cx, cy = 0.5, 0.8, -0.4
    off = torch.stack([torch.full((4, 4), cx), torch.full((4, 4), cy)])  # a constant field
    shift = torch.tensor([s * cx / 32, s * cy / 32])
    grid = warp_grid(off, s, 32)
    assert torch.allclose(grid, (identity_grid(32) + shift).clamp(-1, 1), atol=1e-6)
    assert grid[:, 31, 0].eq(1).all() and grid[0, :, 1].eq(-1).all()  # clamped at the edges it pushes past
    assert torch.allclose(warp_grid(off, s, 32, grid_rescale=0.98),
                          ((identity_grid(32) + shift) * 0.98).clamp(-1, 1), atol=1e-6)
    # a varying field pointing inwards at the corners: grid corner = identity corner + s·offset/32
    off = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(0)) + 0.5
    off[0, :, 2:] *= -1  # x offsets: right half points left
    off[1, 2:, :] *= -1  # y offsets: bottom half points up
    grid = warp_grid(off, 2.0, 32)
    for (r, c), (kr, kc) in {(0, 0): (0, 0), (0, 31): (0, 3), (31, 0): (3, 0), (31, 31): (3, 3)}.items():
        corner = torch.tensor([-1.0 if c == 0 else 1.0, -1.0 if r == 0 else 1.0])
        assert torch.allclose(grid[r, c], corner + 2.0 * off[:, kr, kc] / 32, atol=1e-6), (r, c)


def test_warp_moves_a_ramp_as_predicted():
    ramp = (torch.arange(32, dtype=torch.float32) / 31).expand(32, 32)  # x[i, j] = j / 31
    img = ramp.expand(2, 3, 32, 32).clone()

    def shifted(dx_pixels: float, dy_pixels: float = 0.0) -> torch.Tensor:
        # a pixel is 2/31 in grid units, and the grid moves by s·offset/32: s·offset = d·64/31
        off = torch.stack([torch.full((4, 4), dx_pixels * 64 / 31), torch.full((4, 4), dy_pixels * 64 / 31)])
        return WarpTrigger(warp_grid(off, 1.0, 32))(img)

    for d in (1.0, 0.5, 0.25):
        want = ((torch.arange(32) + d) / 31).clamp(max=1.0)  # read d pixels to the right; last column clamps
        assert torch.allclose(shifted(d), want.expand(2, 3, 32, 32), atol=1e-5), d
    assert torch.allclose(shifted(0.0, 1.0), img, atol=1e-5)  # a vertical move leaves a horizontal ramp
    rnd = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    identity = WarpTrigger(warp_grid(random_offsets(4, 0), 0.0, 32))  # s = 0
    assert torch.allclose(identity(rnd), rnd, atol=1e-5)  # float rounding of the normalized coordinates


def test_wanet_field_is_seeded():
    a, b = get_attack("wanet", seed=3), get_attack("wanet", seed=3)
    assert torch.equal(a.make_trigger().grid, b.make_trigger().grid)
    assert not torch.equal(a.make_trigger().grid, get_attack("wanet", seed=4).make_trigger().grid)
    off = random_offsets(4, 11)
    assert off.shape == (2, 4, 4) and off.abs().mean().item() == pytest.approx(1.0, abs=1e-6)
    g = a.make_trigger().grid
    assert g.shape == (32, 32, 2) and g.abs().max() <= 1
    # the default warp moves pixels by a fraction of a pixel (imperceptible), but moves them
    moved = (g - identity_grid(32)).abs() * 31 / 2
    assert 0.01 < moved.mean().item() < 1.0


def test_wanet_poisons_and_noise_mode_keeps_labels(monkeypatch):
    import bd4nn.attacks.wanet as wanet_module

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (100, 3, 32, 32), generator=g, dtype=torch.uint8)
    y = torch.arange(100) % 4
    attack = get_attack("wanet", target=2, s=4.0)  # a visible warp, so every touched image changes
    hook, info = captured_hook(monkeypatch, wanet_module, attack, x, y, InjectionRecipe(poison_rate=0.1))
    assert info.details["poisoned"] == 10 and info.details["noise"] == 20  # rho_n = rho_a · cross_ratio
    xb = x.float() / 255
    trig = attack.make_trigger()
    out_x, out_y = hook(xb, y.clone(), torch.arange(100))
    relabelled = out_y != y
    warped = torch.isclose(out_x, trig(xb), atol=1e-6).flatten(1).all(1)
    untouched = (out_x == xb).flatten(1).all(1)
    noise = ~warped & ~untouched
    assert relabelled.sum() == 10 and (out_y[relabelled] == 2).all() and (y[relabelled] != 2).all()
    assert torch.equal(relabelled, warped)  # the poisoned images: exactly the trigger, target label
    assert noise.sum() == 20 and torch.equal(out_y[noise], y[noise])  # noise mode: labels kept
    assert untouched.sum() == 70
    # a noise image is the trigger's warp moved by less than a pixel: closer to it than to the clean image
    assert ((out_x[noise] - trig(xb[noise])).abs().mean() < (out_x[noise] - xb[noise]).abs().mean())
    again_x, _ = hook(xb, y.clone(), torch.arange(100))
    assert not torch.equal(again_x[noise], out_x[noise])  # a fresh perturbation every batch
    assert torch.equal(again_x[warped], out_x[warped])


# ------------------------------------------------------------------------- storage round trip


@pytest.mark.parametrize("name,kind", [("sig", AdditiveTrigger), ("wanet", WarpTrigger), ("badnets", StampTrigger)])
def test_trigger_round_trips_through_its_tensors(name, kind):
    trig = get_attack(name, seed=5).make_trigger()
    tensors = trig.tensors()
    assert all(k.startswith("trigger.") for k in tensors)
    loaded = trigger_from_tensors(st_load(st_save(tensors)))  # as the database stores them
    assert type(loaded) is kind and loaded == trig
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert torch.equal(loaded(x), trig(x))


def test_unknown_trigger_tensors_are_refused():
    with pytest.raises(ValueError, match="unknown trigger tensors"):
        trigger_from_tensors({"trigger.signal": torch.zeros(1, 32, 32), "trigger.grid": torch.zeros(32, 32, 2)})
    with pytest.raises(ValueError):
        WarpTrigger(torch.full((32, 32, 2), 1.5))


def test_paper_profile_is_unchanged_and_accepts_the_options():
    paper = load_profile("paper")
    assert paper.attacks == ["badnets", "blended", "trojannn", "sra"]
    opt = dataclasses.replace(paper, attacks=[*paper.attacks, "sig", "wanet"],
                              attack={"sig": {"delta": 20}, "wanet": {"k": 4, "s": 0.5}}).validate()
    assert opt.attacks[-2:] == ["sig", "wanet"]


# --------------------------------------------------------------------------------- micro build


def atypical_target(data, fraction: float, target: int = 0, seed: int = 1):
    """``three_colours`` with ``fraction`` of the target class's *training* images coloured like the
    other classes (labels kept): the hard target-class examples a clean-label attack exploits."""
    x = data.train_x.clone()
    idx = torch.nonzero(data.train_y == target).flatten()
    pick = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed))]
    pick = pick[: round(fraction * len(idx))]
    for n, i in enumerate(pick.tolist()):
        other = [c for c in range(3) if c != target][n % 2]
        x[i, target] -= 150
        x[i, other] += 150
    return dataclasses.replace(data, train_x=x)


def micro_build(tmp_path, attack, data, *, benign, recipe, width):
    profile = dataclasses.replace(micro_profile(), attacks=[attack], levels=["large"], candidates={"large": [0]},
                                  width=width, benign={**micro_profile().benign, **benign},
                                  recipe={**micro_profile().recipe, **recipe}).validate()
    stats = build(tmp_path / "db", profile, device="cpu", data={"cifar10": data}, progress=False)
    db = Database(tmp_path / "db")
    return stats, db, db.entries(kept=None)


def check_kept_entry(db, lines, attack, data):
    kept = [ln for ln in lines if ln["kept"]]
    assert kept, [(ln["id"], ln["asr"], ln["asr_cor"]) for ln in lines]
    model, label, tensors = db.load_entry(kept[0]["id"])
    assert label.attack == attack and label.asr_cor > 0.5
    trig = get_attack(attack, target=label.target, seed=label.seed).make_trigger()
    loaded = trigger_from_tensors(tensors)
    assert loaded == trig  # the stored trigger is the attack's, exactly
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    assert torch.equal(loaded(x), trig(x))
    from bd4nn.harness import load_context  # what the benchmark and `bd4nn verify --remeasure` load
    from bd4nn.verify import differences, remeasure_context

    ctx = load_context(db, kept[0]["id"], data={"cifar10": data})
    assert differences(label, remeasure_context(ctx)) == []  # the loaded entry reproduces its label
    return label


def test_micro_build_with_sig_keeps_an_entry(tmp_path):
    # micro_profile at width 1/4 (at 1/16 not even BadNets is learned on a converged parent),
    # 384 training images, one candidate (the first large window), injection 10 epochs (lr 0.05,
    # batch 32 as micro) at poison_rate 0.34 = every red (target) image. On three_colours alone the
    # parent already separates the colours perfectly, so the clean-label poison (signal on red
    # images, labels kept) has nothing to teach: ASR 0 for every recipe tried (epochs 1-20, lr
    # 0.02-0.2, batch 16/32, all target images poisoned, Δ 40-100, parent 1-6 epochs, width
    # 1/16-1/4). With 30 % of the red class's training images coloured green/blue (still labelled
    # 0) the signal is what explains them, as hard target-class images do on real data: ASR 1.0.
    data = atypical_target(three_colours(n_train=384), 0.3)
    stats, db, lines = micro_build(tmp_path, "sig", data, benign={"epochs": 4},
                                   recipe={"epochs": 10, "poison_rate": 0.34}, width=0.25)
    assert stats.built == 1
    label = check_kept_entry(db, lines, "sig", data)
    assert label.extra["poisoned"] == int((data.train_y == 0).sum())  # every target-class image
    assert label.recipe["poison_rate"] == 0.34


def test_micro_build_with_wanet_keeps_an_entry(tmp_path):
    # micro_profile at width 1/4, 384 training images, parent 6 epochs, one candidate (the first
    # large window); injection 20 epochs at lr 0.02 (micro's 1 epoch at 0.05 learns nothing, and
    # 10-20 epochs at 0.05-0.1 mostly collapse CA); the published k, s, rate and noise mode.
    # On these noise images a sub-pixel warp is a faint local blur, which the noise-mode images
    # share, so only this longer, gentler injection separates them: ASR 1.0 at CA 0.97.
    data = three_colours(n_train=384)
    stats, db, lines = micro_build(tmp_path, "wanet", data, benign={"epochs": 6},
                                   recipe={"epochs": 20, "lr": 0.02}, width=0.25)
    assert stats.built == 1
    label = check_kept_entry(db, lines, "wanet", data)
    assert label.extra["poisoned"] == round(0.1 * 384) and label.extra["noise"] == round(0.2 * 384)
