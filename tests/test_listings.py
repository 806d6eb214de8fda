"""``bd4nn localizers``, ``bd4nn attacks`` and ``bd4nn profiles``: what is there, with its settings
and defaults (the way timm lists its models)."""

from __future__ import annotations

import dataclasses

from bd4nn.build import load_profile
from bd4nn.cli import main
from bd4nn.settings import describe_settings


@dataclasses.dataclass
class _Demo:
    steps: int = 100  # the paper, section 4
    rate: float = 0.5
    tags: list = dataclasses.field(default_factory=lambda: ["a"])  # a factory default


def test_describe_settings_reads_defaults_and_the_source_comments():
    assert describe_settings(_Demo) == [("steps", "100", "the paper, section 4"), ("rate", "0.5", ""),
                                        ("tags", "['a']", "a factory default")]


def test_localizers_lists_all_eight_with_their_settings(capsys):
    assert main(["localizers"]) == 0
    out = capsys.readouterr().out
    for name in ("fp", "nc", "anp", "clp", "deepmufl", "slicer", "pfl", "random"):
        assert f"\n{name} (scope: " in f"\n{out}", name
    assert "nb_iter" in out and "2000" in out  # ANP's published budget
    assert "BB nc_epoch" in out  # where NC's default comes from
    assert main(["localizers", "clp"]) == 0
    one = capsys.readouterr().out
    assert one.startswith("clp (scope: all): ") and "standardize" in one and "anp" not in one


def test_attacks_and_profiles(capsys):
    assert main(["attacks"]) == 0
    out = capsys.readouterr().out
    assert all(f"{a} (" in out for a in ("badnets", "blended", "trojannn", "sra")) and "patch_size" in out
    assert main(["profiles", "small"]) == 0
    out = capsys.readouterr().out
    p = load_profile("small")
    # candidates = datasets x archs x attacks x (windows per level), counted here from the profile
    expected = len(p.datasets) * len(p.archs) * len(p.attacks) * sum(len(p.candidates[lv]) for lv in p.levels)
    assert expected == 64 and " 64 " in out and "vgg13, resnet18" in out
    assert f"build time: {p.build_time}" in out and p.build_time.startswith("65 min")


def test_list_entries_prints_every_id_with_rounded_figures(tmp_path, capsys):
    from bd4nn.build import build
    from bd4nn.db import Database
    from synthetic import micro_profile, three_colours

    build(tmp_path / "db", micro_profile(), device="cpu", data={"cifar10": three_colours()}, progress=False)
    lines = Database(tmp_path / "db").entries(kept=None)
    assert main(["list", str(tmp_path / "db"), "--entries"]) == 0
    out = capsys.readouterr().out
    for ln in lines:
        row = next(r for r in out.splitlines() if r.startswith(ln["id"] + " "))
        assert ("kept" if ln["kept"] else "rejected") in row
        assert f"{ln['asr_cor']:.3f}" in row and f"{100 * ln['ca']:.1f}" in row and str(ln["n_fault"]) in row
        assert all(len(cell.split(".")[-1]) <= 3 for cell in row.split() if cell.replace(".", "").isdigit())
    assert main(["list", str(tmp_path / "db"), "--entries", "*-large-*"]) == 0
    picked = capsys.readouterr().out
    assert "-large-00" in picked and "-narrow-00" not in picked
