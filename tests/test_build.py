"""The build loop: profiles, the plan, resumption after an interruption, and the CLI tables."""

import json

import pytest

from bd4nn.build import Profile, build, load_profile, plan
from bd4nn.cli import main
from bd4nn.db import Database
from synthetic import micro_profile, three_colours as synthetic


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


def test_recipe_tables_layer_from_general_to_specific():
    prof = Profile(name="p", datasets=["cifar10"], archs=["vgg13", "resnet18"], attacks=["badnets", "blended"],
                   levels=["narrow"], recipe={"epochs": 4, "lr": 0.1, "resnet18": {"epochs": 2, "blended": {"lr": 0.02}},
                                              "blended": {"epochs": 6, "lr": 0.05}}).validate()
    assert (prof.injection_recipe("vgg13", "badnets").epochs, prof.injection_recipe("vgg13", "badnets").lr) == (4, 0.1)
    assert (prof.injection_recipe("resnet18", "badnets").epochs, prof.injection_recipe("resnet18", "badnets").lr) == (2, 0.1)
    assert (prof.injection_recipe("vgg13", "blended").epochs, prof.injection_recipe("vgg13", "blended").lr) == (6, 0.05)
    # [recipe.<attack>] beats [recipe.<arch>]; [recipe.<arch>.<attack>] beats both
    assert (prof.injection_recipe("resnet18", "blended").epochs, prof.injection_recipe("resnet18", "blended").lr) == (6, 0.02)
    for bad, match in (({"vgg99": {"epochs": 1}}, r"\[recipe.vgg99\]: not an architecture or attack"),
                       ({"badnets": {"vgg13": {"epochs": 1}}}, r"\[recipe.badnets.vgg13\]: only"),
                       ({"vgg13": {"blended": {"epochs": 0}}}, r"vgg13 blended: setting epochs=0 must be >= 1")):
        with pytest.raises(ValueError, match=match):
            Profile(name="p", datasets=["cifar10"], archs=["vgg13"], attacks=["badnets", "blended"],
                    levels=["narrow"], recipe=bad).validate()


def test_small_profile_keeps_the_paper_attack_recipe():
    prof = load_profile("small")
    assert prof.train_subset is None and prof.test_subset is None  # the full CIFAR-10 sets
    assert set(prof.attacks) == {"badnets", "blended", "trojannn", "sra"} and len(prof.levels) == 4
    # only the injection's epochs, lr and batch size may differ from the paper recipe
    from bd4nn.attacks import InjectionRecipe, get_attack

    paper = InjectionRecipe()
    for arch in prof.archs:
        for attack in prof.attacks:
            small = prof.injection_recipe(arch, attack)
            for name in ("poison_rate", "augment", "train_head", "momentum", "weight_decay", "schedule", "warmup"):
                assert getattr(small, name) == getattr(paper, name), (arch, attack, name)
            assert small.poison_rate == 0.1
    assert get_attack("badnets", **prof.attack.get("badnets", {})).settings.patch_size == 3
    assert get_attack("blended", **prof.attack.get("blended", {})).settings.alpha == 0.2
    assert not prof.attack  # every attack at its defaults
    for level in prof.levels:  # the first window and a middle one
        assert prof.candidate_indices(level)[0] == 0 and len(prof.candidate_indices(level)) >= 2
