"""Issue 17: the build and the benchmark on a Ray cluster (``--ray``, ``bd4nn.cluster``).

A local Ray cluster of 2 CPUs builds a micro profile (two benign parents, eight candidates) with
``bd4nn build --ray``; the database must be the one a serial build writes, file for file. Then
``bd4nn bench --ray`` on it must record the case set and the WJI of a serial ``pytest bench/``.
The data is a synthetic three-colour ImageFolder on disk, loaded by name as Ray workers and
pytest subprocesses load a real dataset (``BD4NN_DATA``). Skipped when Ray is not installed
(CI installs it: ``.[dev,ray]``); the one-line error without Ray is tested either way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bd4nn.build import build, load_profile, plan
from bd4nn.cli import main
from bd4nn.db import Database
from bd4nn.results import build_runs
from dbfiles import differences
from synthetic import three_colours, write_imagefolder

ROOT = Path(__file__).resolve().parents[1]

MICRO = """
name = "micro-ray"
datasets = ["colours"]
archs = ["vgg13", "resnet18"]
attacks = ["badnets", "sra"]
levels = ["narrow", "large"]
width = 0.125
rc_images = 16

[candidates]
narrow = [0]
large = [0]

[benign]
epochs = 4
batch_size = 32
lr = 0.05

[recipe]
epochs = 3
batch_size = 32
lr = 0.05
poison_rate = 0.5

[attack.badnets]
patch_size = 5

[attack.sra]
epochs = 2
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The profile file and the data folder (``BD4NN_DATA``, a fresh ``BD4NN_CACHE``) for this
    process, the Ray workers it starts and the pytest subprocesses."""
    tmp = tmp_path_factory.mktemp("ray")
    profile = tmp / "micro.toml"
    profile.write_text(MICRO)
    data = tmp / "data"
    write_imagefolder(data / "colours", three_colours(n_train=400, n_test=200))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BD4NN_DATA", str(data))
        mp.setenv("BD4NN_CACHE", str(tmp / "cache"))
        yield tmp, profile, data


@pytest.fixture(scope="module")
def cluster(setup):
    """A local Ray cluster of 2 CPUs, shut down after the module; its address."""
    ray = pytest.importorskip("ray", reason='Ray is not installed (pip install -e ".[ray]"; CI installs it)')
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_db(setup, cluster):
    """The micro profile built with ``bd4nn build --ray`` on the cluster."""
    tmp, profile, data = setup
    db = tmp / "ray-db"
    assert main(["build", "--db", str(db), "--profile", str(profile), "--data", str(data), "--ray", cluster]) == 0
    return db


@pytest.mark.slow
def test_a_ray_build_writes_the_database_a_serial_build_writes(setup, ray_db, cluster, capsys):
    tmp, profile, data = setup
    serial = tmp / "serial-db"
    stats = build(serial, load_profile(profile), data_root=data, progress=False)
    assert stats.built == len(plan(load_profile(profile))) == 8
    db = Database(ray_db)
    assert len(db.entries(kept=None)) == 8 and db.entries(kept=True)  # kept entries: stored deltas compared
    assert differences(serial, ray_db) == []
    assert db.verify(progress=False) == []
    runs = build_runs(db)
    assert [(r["built"], r["threads"]) for r in runs] == [(8, 1)]
    # built: a second run through Ray finds everything in the index
    capsys.readouterr()
    assert main(["build", "--db", str(ray_db), "--profile", str(profile), "--ray", cluster]) == 0
    assert "8 planned, 8 already built, 0 built" in capsys.readouterr().out
    assert differences(serial, ray_db) == []


def _cases(path: Path) -> dict[str, dict]:
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines[0]["kind"] == "header"
    return {d["nodeid"]: d for d in lines if d["kind"] == "case"}


@pytest.mark.slow
def test_bench_on_ray_records_what_pytest_bench_records(setup, ray_db, cluster):
    tmp, profile, _ = setup
    args = ["--db", str(ray_db), "--profile", str(profile), "--localizers", "clp,fp,slicer,pfl", "--repairs", "prune"]
    serial, on_ray = tmp / "serial.jsonl", tmp / "ray.jsonl"
    r = subprocess.run([sys.executable, "-m", "pytest", "bench", "-p", "no:cacheprovider", "-q", *args,
                        "--results", str(serial)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = subprocess.run([sys.executable, "-m", "bd4nn.cli", "bench", "--ray", cluster, *args, "--results", str(on_ray)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Table III" in r.stdout  # the tables of the same results file, as without --ray
    a, b = _cases(serial), _cases(on_ray)
    kinds = {d["case"] for d in a.values()}
    assert kinds == {"localization", "repair", "benign", "benign_trigger", "database"}
    assert sorted(a) == sorted(b)  # the same cases under the same node ids
    assert all(d["outcome"] == "passed" for d in [*a.values(), *b.values()])
    for key in ("case", "localizer", "repair", "entry", "weights_sha", "wji", "hits", "n_localized", "asrd",
                "benign_asr", "ca_now"):
        assert {n: d.get(key) for n, d in a.items()} == {n: d.get(key) for n, d in b.items()}, key
    head = json.loads(on_ray.read_text().splitlines()[0])
    assert head["options"]["ray"] == cluster and head["threads"] == 1 and head["calibration_s"] > 0
    assert head["db_fingerprint"] == json.loads(serial.read_text().splitlines()[0])["db_fingerprint"]


def test_without_ray_the_flag_is_a_one_line_error_naming_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    for argv in (["build", "--db", str(tmp_path / "db"), "--ray"], ["bench", "--ray", "auto"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err == 'bd4nn: error: --ray needs Ray, an optional dependency: pip install -e ".[ray]"'
    assert not (tmp_path / "db").exists()
