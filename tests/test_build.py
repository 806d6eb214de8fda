"""The build loop: profiles, the plan, resumption after an interruption, and the CLI tables."""

import json

import pytest
import torch

from bd4nn.build import Profile, build, load_profile, plan
from bd4nn.cli import main
from bd4nn.data import ImageData, get_spec
from bd4nn.db import Database


def synthetic(n_train=128, n_test=64, seed=0) -> ImageData:
    """Three colour classes (a 10-class spec: the other classes are simply absent)."""
    g = torch.Generator().manual_seed(seed)

    def make(n):
        y = torch.randint(0, 3, (n,), generator=g)
        x = torch.randint(0, 100, (n, 3, 32, 32), generator=g)
        for c in range(3):
            x[y == c, c] += 150
        return x.to(torch.uint8), y

    (tx, ty), (vx, vy) = make(n_train), make(n_test)
    return ImageData("cifar10", tx, ty, vx, vy, [str(i) for i in range(10)], "synthetic", get_spec("cifar10"))


def micro_profile() -> Profile:
    return Profile(
        name="micro", datasets=["cifar10"], archs=["vgg13"], attacks=["badnets", "blended"],
        levels=["narrow", "large"], width=0.0625, candidates={"narrow": [0], "large": [0]},
        rc_images=16, benign={"epochs": 2, "batch_size": 32, "lr": 0.05},
        recipe={"epochs": 1, "batch_size": 32, "lr": 0.05},
    ).validate()


def comparable(db: Database) -> dict:
    """Index content that must not depend on how the build was scheduled (no timings)."""
    out = {}
    for line in db.entries(kept=None):
        label = db.load_label(line["id"])
        weights = line["files"]["weights"]
        out[line["id"]] = (label.kept, label.ca, label.asr, label.asr_cor, label.ca_cor, label.asr_cor_r,
                           json.dumps(label.rc), json.dumps(label.s_fault),
                           weights["sha256"] if weights else None)
    return out


def test_builtin_profiles_load_and_plan():
    tiny = load_profile("tiny")
    items = plan(tiny)
    # VGG-13 at 4 levels and ResNet-18 at narrow and large (its `exclude`), 1 candidate each
    assert len(items) == len(tiny.attacks) * (4 + 2)
    assert not [it for it in items if it.arch == "resnet18" and it.level in ("small", "middle")]
    assert {it.level for it in items if it.arch == "vgg13"} == {"narrow", "small", "middle", "large"}
    paper = load_profile("paper")
    assert len(plan(paper)) == 3 * 4 * 4 * 55  # METHODS §2: 55 candidates per (model, attack)
    assert plan(paper, shard=(1, 4))[0] == plan(paper)[1]
    ids = [it.id for it in plan(paper)]
    assert len(set(ids)) == len(ids) and "cifar10-vgg13-badnets-narrow-03" in ids


def test_bad_profile_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('name="x"\ndatasets=["cifar10"]\narchs=["alexnet"]\nattacks=["badnets"]\nlevels=["small"]\n')
    with pytest.raises(ValueError, match="alexnet"):
        load_profile(bad)
    with pytest.raises(ValueError, match="unknown profile"):
        load_profile("nope")


@pytest.mark.slow
def test_interrupted_build_resumes_to_the_same_index(tmp_path):
    data = {"cifar10": synthetic()}
    prof = micro_profile()
    full = build(tmp_path / "a", prof, device="cpu", data=data, progress=False)
    assert full.built == 4 and full.skipped == 0
    first = build(tmp_path / "b", prof, device="cpu", data=data, progress=False, limit=1)
    assert first.built == 1
    rest = build(tmp_path / "b", prof, device="cpu", data=data, progress=False)
    assert rest.skipped == 1 and rest.built == 3
    again = build(tmp_path / "b", prof, device="cpu", data=data, progress=False)
    assert again.built == 0 and again.skipped == 4
    a, b = comparable(Database(tmp_path / "a")), comparable(Database(tmp_path / "b"))
    assert a == b and len(a) == 4
    assert Database(tmp_path / "b").verify(progress=False) == []
    # Kept entries rebuild to a model that reproduces the label's numbers.
    db = Database(tmp_path / "a")
    for line in db.entries(kept=True):
        model, label, trig = db.load_entry(line["id"])
        assert set(label.s_fault) <= {n for n, _ in model.named_modules()}
    assert main(["info", str(tmp_path / "a")]) == 0
    # the summary that `bd4nn info` and the fidelity reports print, recomputed from the labels
    from bd4nn.results import database_summary

    dirs, parents = database_summary(db)
    rec = db.benign_record("cifar10", "vgg13")
    assert [(p["arch"], p["ca"], p["epochs"], p["train_images"]) for p in parents] == [("vgg13", rec.ca, 2, 128)]
    assert {(d["attack"], d["level"]) for d in dirs} == {(a, lv) for a in ("badnets", "blended")
                                                         for lv in ("narrow", "large")}
    for d in dirs:
        labels = [db.load_label(ln["id"]) for ln in db.entries(kept=None, attack=d["attack"], level=d["level"])]
        kept = [lab for lab in labels if lab.kept]
        assert (d["kept"], d["rejected"]) == (len(kept), len(labels) - len(kept))
        if kept:
            assert d["ca_drop"] == pytest.approx(rec.ca - sum(lab.ca for lab in kept) / len(kept))
        else:
            assert d["ca_drop"] is None and d["size"] is None


def test_benign_overrides_per_architecture_and_bad_keys():
    prof = Profile(name="p", datasets=["cifar10"], archs=["vgg13", "resnet18"], attacks=["badnets"],
                   levels=["narrow"], benign={"epochs": 30, "lr": 0.2, "resnet18": {"epochs": 20}}).validate()
    assert prof.benign_overrides("vgg13") == {"epochs": 30, "lr": 0.2}
    assert prof.benign_overrides("resnet18") == {"epochs": 20, "lr": 0.2}
    with pytest.raises(ValueError, match=r"\[benign.resnet99\]"):
        Profile(name="p", datasets=["cifar10"], archs=["vgg13"], attacks=["badnets"], levels=["narrow"],
                benign={"resnet99": {"epochs": 1}}).validate()
    with pytest.raises(ValueError, match=r"\[benign\]"):
        Profile(name="p", datasets=["cifar10"], archs=["vgg13"], attacks=["badnets"], levels=["narrow"],
                benign={"epoch": 3}).validate()


def test_small_profile_keeps_the_paper_attack_recipe():
    prof = load_profile("small")
    assert prof.train_subset is None and prof.test_subset is None  # the full CIFAR-10 sets
    assert set(prof.attacks) == {"badnets", "blended", "trojannn", "sra"} and len(prof.levels) == 4
    # only the injection's epochs, lr and batch size may differ from the paper recipe
    from bd4nn.attacks import InjectionRecipe, get_attack

    paper, small = InjectionRecipe(), prof.injection_recipe()
    for name in ("poison_rate", "augment", "train_head", "momentum", "weight_decay", "schedule"):
        assert getattr(small, name) == getattr(paper, name), name
    assert small.poison_rate == 0.1
    assert get_attack("badnets", **prof.attack.get("badnets", {})).settings.patch_size == 3
    assert get_attack("blended", **prof.attack.get("blended", {})).settings.alpha == 0.2
    assert not prof.attack  # every attack at its defaults
    for level in prof.levels:  # the first window and a middle one
        assert prof.candidate_indices(level)[0] == 0 and len(prof.candidate_indices(level)) >= 2
