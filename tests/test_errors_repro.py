"""Issue 12, class 5: byte-reproducible builds.

No wall-clock figure sits in a hashed file, so the same profile built twice gives the same
bytes; a build killed with SIGKILL at random points and resumed gives the same bytes as an
uninterrupted one; orphan temporary files of a killed writer are swept, a live writer's kept.
Each build runs in its own process (``tests/build_child.py``, one torch thread).
"""

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bd4nn.build import RUN_KEY
from bd4nn.db import Database
from dbfiles import snapshot

HERE = Path(__file__).parent


def run_child(db: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, str(HERE / "build_child.py"), str(db)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def build_to_end(db: Path) -> dict:
    proc = run_child(db)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


PLANNED = 8  # candidates of tests/synthetic.py's repro_profile


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, float, float]:
    """One uninterrupted build; how long its process ran, and how long the build itself."""
    db = tmp_path_factory.mktemp("reference") / "db"
    t0 = time.perf_counter()
    stats = build_to_end(db)
    assert stats["planned"] == PLANNED and stats["built"] == PLANNED and stats["skipped"] == 0
    return db, time.perf_counter() - t0, stats["seconds"]


def test_hashed_files_hold_no_timings(reference):
    db_root, _, _ = reference
    db = Database(db_root)

    def keys(obj, prefix=""):
        if isinstance(obj, dict):
            for k, v in obj.items():
                yield f"{prefix}{k}"
                yield from keys(v, f"{prefix}{k}.")

    hashed = [p for p in db_root.rglob("*.json")] + [db_root / "index.jsonl"]
    assert len(hashed) == 1 + PLANNED + 1  # benign.json, the labels, the index
    for path in hashed:
        for line in path.read_text().splitlines() if path.suffix == ".jsonl" else [path.read_text()]:
            timed = [k for k in keys(json.loads(line)) if k.endswith("seconds")]
            assert not timed, (path, timed)
    # ... and the timings are kept in timings.jsonl instead, one per candidate and benign parent
    timings = db.timings()
    runs = {k for k in timings if k.startswith(RUN_KEY)}  # one line per build run (bd4nn.build.record_run)
    assert len(runs) == 1
    assert set(timings) - runs == {ln["id"] for ln in db.entries(kept=None)} | {"benign:cifar10/vgg13"}
    for figures in timings.values():
        assert figures["seconds"] > 0 and figures["threads"] == 1


def test_the_same_profile_built_twice_is_byte_identical(reference, tmp_path):
    db_root, _, _ = reference
    build_to_end(tmp_path / "again")
    a, b = snapshot(db_root), snapshot(tmp_path / "again")
    assert sorted(a) == sorted(b)
    assert len([k for k in a if k.endswith(".safetensors")]) >= 2  # the parent and a kept entry
    assert [k for k in a if a[k] != b[k]] == []


@pytest.mark.slow
def test_kill_9_at_random_points_then_resume_is_byte_identical(reference, tmp_path):
    db_root, total, build_seconds = reference
    per_candidate = build_seconds / PLANNED
    db = tmp_path / "killed"
    index = db / "index.jsonl"

    def stored() -> int:
        return len(index.read_bytes().splitlines()) if index.exists() else 0

    rng = random.Random(12)
    # three kill points: once that many entries are stored, plus a random part of a candidate's time
    # (the first may land in the imports or the benign training); never after the last candidate
    points = sorted(rng.sample(range(PLANNED - 1), 3))
    progress = []
    for at in points:
        proc = run_child(db)
        while stored() < at and proc.poll() is None:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.5) * per_candidate)
        assert proc.poll() is None, f"the build finished before the kill at {at} entries"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        progress.append(stored())
    assert progress[-1] < PLANNED, f"entries stored at each kill: {progress}"
    stats = build_to_end(db)
    assert stats["built"] + stats["skipped"] == PLANNED and stats["built"] >= 1
    assert not [p for p in db.rglob("*.tmp")], "orphan temporary files survived the resume"
    a, b = snapshot(db_root), snapshot(db)
    assert sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k]] == []
    assert Database(db).verify(progress=False) == []


def test_orphans_of_dead_writers_are_swept_and_a_live_writers_kept(tmp_path):
    db = Database(tmp_path / "db")
    folder = db.root / "cifar10" / "vgg13"
    folder.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    live = folder / f".benign.json.{os.getpid()}.abc123_x.tmp"
    orphan = folder / f".benign.json.{dead_pid}.k9zq_01.tmp"
    legacy = folder / ".benign.json.zz81k2ab.tmp"  # written before temp names carried a pid
    keep = folder / "notes.tmp"  # not one of ours: no leading dot
    # Since temp names carry the host (builds on a Ray cluster share the folder across nodes):
    host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())
    live_here = folder / f".benign.json.{os.getpid()}@{host}.q1w2e3.tmp"
    dead_here = folder / f".benign.json.{dead_pid}@{host}.r4t5y6.tmp"
    # another node's writer: its pid (here: a dead one) says nothing on this host, so it is kept
    # while young, and deleted once a day old (no write lasts that long)
    other_young = folder / f".benign.json.{dead_pid}@node-{host}-2.u7i8o9.tmp"
    other_old = folder / f".benign.json.{os.getpid()}@node-{host}-3.p0a1s2.tmp"
    for p in (live, orphan, legacy, keep, live_here, dead_here, other_young, other_old):
        p.write_bytes(b"partial")
    two_days_ago = time.time() - 2 * 86_400
    os.utime(other_old, (two_days_ago, two_days_ago))
    assert sorted(db.sweep_orphans()) == sorted([orphan, legacy, dead_here, other_old])
    assert all(p.exists() for p in (live, keep, live_here, other_young))


def test_a_label_written_before_timings_moved_out_still_loads(reference, tmp_path):
    """Databases built before this change carry ``seconds`` in their labels: still readable."""
    db_root, _, _ = reference
    db = Database(db_root)
    line = db.entries(kept=None)[0]
    text = (db_root / line["files"]["label"]["path"]).read_text()
    from bd4nn.db import DefectLabel

    legacy = json.loads(text)
    legacy["seconds"] = 12.5
    label = DefectLabel.from_json(json.dumps(legacy))
    assert label.to_json() == text
