"""A database does not depend on the core count of the machine that built it (issue 14): the
build runs at ``BUILD_THREADS`` whatever the process's torch thread count, and restores it."""

import torch

from bd4nn.build import build
from bd4nn.db import Database, database_fingerprint
from bd4nn.runtime import BUILD_THREADS
from synthetic import micro_profile, three_colours
from dbfiles import differences


def test_builds_at_one_and_two_threads_write_identical_databases(tmp_path):
    before = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)  # what `--threads N` or another core count gives the process
            build(tmp_path / f"t{n}", micro_profile(), device="cpu", data={"cifar10": three_colours()}, progress=False)
            assert torch.get_num_threads() == n  # restored after the build
    finally:
        torch.set_num_threads(before)
    assert differences(tmp_path / "t1", tmp_path / "t2") == []
    fp = [database_fingerprint(Database(tmp_path / f"t{n}").entries(kept=None)) for n in (1, 2)]
    assert fp[0] == fp[1]
    label = Database(tmp_path / "t2").load_label(Database(tmp_path / "t2").entries(kept=None)[0]["id"])
    assert label.extra["threads"] == BUILD_THREADS


def test_an_explicit_thread_count_is_recorded_in_the_labels(tmp_path):
    """``build(threads=N)`` (``bd4nn build --threads N``) overrides the pin, and says so in every
    label, so entries built at another count are recognisable."""
    data = {"cifar10": three_colours()}
    build(tmp_path / "t1", micro_profile(), device="cpu", data=data, progress=False)
    build(tmp_path / "t2", micro_profile(), device="cpu", data=data, progress=False, threads=2)
    label = Database(tmp_path / "t2").load_label(Database(tmp_path / "t2").entries(kept=None)[0]["id"])
    assert label.extra["threads"] == 2  # the count a build ran at is recorded in its labels
