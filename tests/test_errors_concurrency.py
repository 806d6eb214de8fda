"""Issue 12, class 6: two builds into one ``--db`` at once both finish, each skipping what the
other built, and the index stays consistent (one line per candidate, the same bytes as a
build that ran alone)."""

import json
from pathlib import Path

import pytest

from bd4nn.db import Database
from dbfiles import differences
from test_errors_repro import PLANNED, build_to_end, run_child


def test_a_claimed_candidate_is_not_claimed_twice(tmp_path):
    db = Database(tmp_path / "db")
    with db.claim("cifar10-vgg13-badnets-narrow-00") as first:
        assert first is True
        with db.claim("cifar10-vgg13-badnets-narrow-00") as second:  # another open file: flock refuses
            assert second is False
        with db.claim("cifar10-vgg13-badnets-narrow-01") as other:
            assert other is True
    with db.claim("cifar10-vgg13-badnets-narrow-00") as again:  # released on exit
        assert again is True
    with pytest.raises(ValueError, match="cannot be a directory name"):
        with db.claim("../../escape"):
            pass


@pytest.mark.slow
def test_two_concurrent_builds_into_one_db_both_finish(tmp_path):
    alone = tmp_path / "alone"
    build_to_end(alone)
    shared = tmp_path / "shared"
    procs = [run_child(shared), run_child(shared)]
    stats = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        stats.append(json.loads(out.strip().splitlines()[-1]))
    # between them they built each candidate once; each skipped what the other built
    assert sum(s["built"] for s in stats) == PLANNED
    for s in stats:
        assert s["built"] + s["skipped"] == PLANNED
    lines = [json.loads(line) for line in (shared / "index.jsonl").read_text().splitlines()]
    assert len(lines) == PLANNED and len({ln["id"] for ln in lines}) == PLANNED
    assert Database(shared).verify(progress=False) == []
    # the same files as a build that ran alone; the index has the same lines (in any order)
    assert differences(alone, shared) == []


def test_a_third_build_after_both_builds_nothing(tmp_path):
    db = tmp_path / "db"
    build_to_end(db)
    assert build_to_end(db)["built"] == 0
    assert not list(Path(db).rglob("*.tmp"))
