"""Builds in several processes: a build leaves a parent that another build is training for
last, and ``build_parallel`` writes the same database as one process."""

import fcntl
from dataclasses import replace

import pytest

from bd4nn.build import build, build_parallel
from bd4nn.db import Database
from bd4nn.results import build_runs
from synthetic import micro_profile, three_colours
from dbfiles import differences


def two_arch_profile():
    p = micro_profile()
    return replace(p, archs=["vgg13", "resnet18"], attacks=["badnets"], levels=["narrow"],
                   candidates={"narrow": [0]}).validate()


def test_a_parent_another_build_is_training_is_left_for_last(tmp_path):
    profile, data = two_arch_profile(), {"cifar10": three_colours()}
    db = Database(tmp_path / "db")
    lock = db.root / "cifar10" / "vgg13" / "benign.lock"
    lock.parent.mkdir(parents=True)
    with open(lock, "a+") as fh:  # "another build" trains the VGG-13 parent, first in plan order
        fcntl.flock(fh, fcntl.LOCK_EX)
        stats = build(db.root, profile, device="cpu", data=data, progress=False, limit=1)
        assert stats.built == 1
        assert db.has_entry("cifar10-resnet18-badnets-narrow-00") and db.has_benign("cifar10", "resnet18")
        assert not db.has_benign("cifar10", "vgg13") and not db.has_entry("cifar10-vgg13-badnets-narrow-00")
    stats = build(db.root, profile, device="cpu", data=data, progress=False)  # the lock is free again
    assert (stats.built, stats.skipped) == (1, 1) and db.has_entry("cifar10-vgg13-badnets-narrow-00")
    assert [r["built"] for r in build_runs(db)] == [1, 1]  # a build that spans two runs: both recorded


@pytest.mark.slow
def test_two_processes_build_what_one_builds(tmp_path):
    profile, data = two_arch_profile(), {"cifar10": three_colours()}
    build_parallel(tmp_path / "one", profile, workers=1, threads=1, device="cpu", data=data, progress=False)
    stats = build_parallel(tmp_path / "two", profile, workers=2, threads=1, device="cpu", data=data, progress=False)
    assert (stats.planned, stats.built, stats.skipped) == (2, 2, 0)
    assert stats.kept + stats.rejected == 2 and len(stats.candidate_seconds) == 2
    runs = build_runs(Database(tmp_path / "two"))  # the run as a whole, not one line per process
    assert [(r["built"], r["workers"], r["threads"], r["profile"]) for r in runs] == [(2, 2, 1, "micro")]
    assert runs[0]["seconds"] >= max(stats.candidate_seconds)
    assert differences(tmp_path / "one", tmp_path / "two") == []
    with pytest.raises(ValueError, match="workers must be >= 1"):
        build_parallel(tmp_path / "none", profile, workers=0)
