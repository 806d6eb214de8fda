"""Training loop: augmentation, determinism, learning, and the restricted mode's bit-identity."""

import pytest
import torch
import torch.nn.functional as F

from bd4nn.models import get_model
from bd4nn.neurons import NeuronMap
from bd4nn.train import SCHEDULES, TrainConfig, augment, evaluate_asr, evaluate_ca, predict, train
from synthetic import colour_data


TINY = TrainConfig(epochs=2, batch_size=32, lr=0.05, seed=0)


def test_augment_is_a_padded_shift_or_its_mirror():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8) + 1
    g = torch.Generator().manual_seed(0)
    out = augment(x, g, padding=2, flip=True)
    padded = F.pad(x, (2, 2, 2, 2))
    for i in range(2):
        windows = [padded[i, :, r : r + 8, c : c + 8] for r in range(5) for c in range(5)]
        candidates = windows + [w.flip(2) for w in windows]
        assert any(torch.equal(out[i], w) for w in candidates)
    same = augment(x, torch.Generator(), padding=0, flip=False)
    assert torch.equal(same, x)


def test_schedules():
    assert SCHEDULES["onecycle"](0.0, 0.2) == 0.0
    assert SCHEDULES["onecycle"](0.2, 0.2) == pytest.approx(1.0)
    assert SCHEDULES["onecycle"](0.6, 0.2) == pytest.approx(0.5)  # (1-0.6)/(1-0.2)
    assert SCHEDULES["cosine"](0.2, 0.2) == pytest.approx(1.0)
    assert SCHEDULES["cosine"](0.6, 0.2) == pytest.approx(0.5)  # half-way through the cosine
    assert SCHEDULES["cosine"](1.0, 0.2) == pytest.approx(0.0)


def test_tiny_model_learns_separable_data():
    x, y = colour_data(512)
    xt, yt = colour_data(256, seed=1)
    model = get_model("vgg13", 2, width=0.125, seed=0)
    before = evaluate_ca(model, xt, yt, device="cpu")
    res = train(model, x, y, TrainConfig(epochs=3, batch_size=64, lr=0.05), device="cpu", progress=False)
    after = evaluate_ca(model, xt, yt, device="cpu")
    assert after > 0.95 and after > before
    assert res.steps == 3 * (512 // 64) and res.seconds > 0
    assert res.history[-1]["loss"] < res.history[0]["loss"]


def test_same_seed_same_model_other_seed_other_model():
    x, y = colour_data(128)
    models = []
    for seed in (0, 0, 1):
        m = get_model("resnet18", 2, width=0.125, seed=3)
        train(m, x, y, TrainConfig(epochs=1, batch_size=32, seed=seed), device="cpu", progress=False)
        models.append(m.state_dict())
    a, b, c = models
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


# mobilenetv2: layers[4] is depthwise; preactresnet18: no neuron has a BN, every BN must stay
@pytest.mark.parametrize("arch", ["vgg13", "resnet18", "mobilenetv2", "preactresnet18"])
@pytest.mark.parametrize("train_head", [True, False])
def test_restricted_training_changes_only_the_selection(arch, train_head):
    x, y = colour_data(128)
    model = get_model(arch, 2, width=0.125, seed=0)
    nm = NeuronMap(model)
    sel = {nm.layers[0]: [1], nm.layers[4]: [0, 3], nm.penultimate: [2, 5]}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.1, weight_decay=5e-3, momentum=0.9, seed=0)
    train(model, x, y, cfg, device="cpu", restrict=sel, neuron_map=nm, train_head=train_head, progress=False)
    after = model.state_dict()

    # Which entries may change, written out independently of the implementation.
    allowed: dict[str, torch.Tensor] = {}
    for layer, chans in sel.items():
        lay = nm.layer(layer)
        for key in (f"{lay.name}.weight", f"{lay.name}.bias", f"{lay.bn_name}.weight",
                    f"{lay.bn_name}.bias", f"{lay.bn_name}.running_mean", f"{lay.bn_name}.running_var"):
            if key in before:
                m = torch.zeros_like(before[key], dtype=torch.bool)
                m[chans] = True
                allowed[key] = m
    for key in before:
        if key.startswith(nm.head_name + "."):
            allowed[key] = torch.full_like(before[key], train_head, dtype=torch.bool)

    for key, old in before.items():
        new = after[key]
        mask = allowed.get(key)
        if mask is None:
            assert torch.equal(new, old), f"{key} changed"
            continue
        assert torch.equal(new[~mask], old[~mask]), f"unselected entries of {key} changed"
        if mask.any():
            changed = (new[mask] != old[mask]).any()
            assert changed, f"selected entries of {key} did not change"
    # Every num_batches_tracked stays too (train-mode BN would have incremented it).
    assert all(torch.equal(after[k], before[k]) for k in before if k.endswith("num_batches_tracked"))
    assert all(p.requires_grad for p in model.parameters())  # flags restored


def test_restricted_training_rejects_bad_selection():
    x, y = colour_data(32)
    model = get_model("vgg13", 2, width=0.125)
    with pytest.raises(ValueError, match="unknown neuron layer"):
        train(model, x, y, TINY, device="cpu", restrict={"nope": [0]}, progress=False)


def test_asr_counts_only_non_target_images():
    class Constant(torch.nn.Module):
        """Predicts class 0 for every input: ASR toward 0 must be 1, CA = share of class 0."""

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            out = torch.zeros(x.shape[0], 3)
            out[:, 0] = 1
            return out + 0 * self.w

    x = torch.zeros(10, 3, 4, 4, dtype=torch.uint8)
    y = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
    model = Constant()
    assert evaluate_ca(model, x, y, device="cpu") == pytest.approx(0.4)
    assert evaluate_asr(model, x, y, lambda b: b, target=0, device="cpu") == 1.0
    assert evaluate_asr(model, x, y, lambda b: b, target=1, device="cpu") == 0.0
    seen = []
    predict(model, x, device="cpu", transform=lambda b: seen.append(b.max().item()) or b, batch_size=4)
    assert len(seen) == 3  # 10 images in batches of 4
