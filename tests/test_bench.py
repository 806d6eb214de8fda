"""The harness end to end on a micro database: case ids, results file, serial = xdist."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

MICRO = """
name = "micro"
datasets = ["cifar10"]
archs = ["vgg13"]
attacks = ["sra"]
levels = ["narrow", "large"]
width = 0.125
train_subset = 2000
test_subset = 200
rc_images = 64

[candidates]
narrow = [0]
large = [0]

[benign]
epochs = 2
batch_size = 128
lr = 0.1

[attack.sra]
epochs = 2

[bench]
clean_images = 64
"""


def _pytest(args, env, module="bench/test_localization.py"):
    return subprocess.run([sys.executable, "-m", "pytest", module, "-p", "no:cacheprovider", "-q", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def _wji(path: Path) -> dict[str, float]:
    out = {}
    for line in path.read_text().splitlines():
        d = json.loads(line)
        if d.get("kind") == "case" and d.get("case") == "localization":
            out[d["nodeid"]] = d["wji"]
    return out


@pytest.mark.slow
@pytest.mark.data
def test_serial_and_xdist_runs_record_the_same_wji(tmp_path, data_dir):
    profile = tmp_path / "micro.toml"
    profile.write_text(MICRO)
    db = tmp_path / "db"
    env = {**os.environ, "BD4NN_DATA": str(data_dir), "BD4NN_CACHE": os.environ.get("BD4NN_CACHE", str(tmp_path / "cache"))}
    serial = tmp_path / "serial.jsonl"
    r = _pytest(["--db", str(db), "--profile", str(profile), "-k", "clp or slicer or pfl",
                 "--results", str(serial)], env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = [json.loads(x) for x in serial.read_text().splitlines()]
    assert lines[0]["kind"] == "header" and lines[0]["profile"] == "micro"
    from bd4nn.db import Database, database_fingerprint, weights_fingerprint
    head, index = lines[0], {ln["id"]: ln for ln in Database(db).entries(kept=None)}
    assert head["db_fingerprint"] == database_fingerprint(index.values())
    assert head["calibration_s"] > 0 and head["machine"]["device_kind"] == "cpu" and head["machine"]["cores"] >= 1
    assert {d["level"] for d in lines if d["kind"] == "directory"} == {"narrow", "large"}
    cases = [d for d in lines if d["kind"] == "case"]
    assert cases and {d["localizer"] for d in cases} <= {"clp", "slicer", "pfl"}
    # readable ids: localizer-dataset-arch-attack-level-candidate
    assert all(d["nodeid"].endswith(f"[{d['localizer']}-{d['entry']}]") for d in cases)
    assert all(d["wji"] == 1.0 for d in cases if d["localizer"] == "pfl")
    assert all(d["weights_sha"] == weights_fingerprint(index[d["entry"]]) for d in cases)
    assert f"python -m reports {serial}" in r.stdout  # the one command that renders its tables
    parallel = tmp_path / "parallel.jsonl"
    # the same profile (its [bench] settings: 64 clean images) in both runs
    r = _pytest(["--db", str(db), "--profile", str(profile), "-n", "2", "-k", "clp or slicer or pfl",
                 "--results", str(parallel)], env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert _wji(serial) == _wji(parallel)
    # -k selects by localizer name only
    only = tmp_path / "only.jsonl"
    r = _pytest(["--db", str(db), "-k", "clp", "--results", str(only)], env)
    assert r.returncode == 0
    assert {n.split("[")[1].split("-")[0] for n in _wji(only)} == {"clp"}
    # benign controls: CLP on the benign parent, each trigger on it; the reports' detection table
    ctl = tmp_path / "controls.jsonl"
    r = _pytest(["--db", str(db), "-k", "(clp or benign_trigger) and not prune and not finetune",
                 "--results", str(ctl)], env, "bench")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(x) for x in ctl.read_text().splitlines()]
    benign = [d for d in rows if d.get("case") == "benign"]
    assert [(d["localizer"], d["entry"]) for d in benign] == [("clp", "benign-cifar10-vgg13")]
    assert all(d["score_max_z"] is not None for d in rows if d.get("case") in ("benign", "localization"))
    triggers = [d for d in rows if d.get("case") == "benign_trigger"]
    assert len(triggers) == sum(bool(ln["kept"]) for ln in index.values()) and all(0 <= d["benign_asr"] <= 1 for d in triggers)
    rep = subprocess.run([sys.executable, "-m", "reports", str(ctl), "--tables", "II,detection"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert rep.returncode == 0 and "| CLP " in rep.stdout and "benign" in rep.stdout, rep.stdout + rep.stderr
    # a repair whose ASRD falls by more than the tolerance against the baseline fails the run
    repaired = tmp_path / "repair.jsonl"
    args = ["--db", str(db), "-k", "pfl", "--repairs", "prune"]
    r = _pytest([*args, "--results", str(repaired)], env, "bench/test_repair.py")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(x) for x in repaired.read_text().splitlines()]
    assert [d for d in rows if d.get("case") == "repair"]
    r = _pytest([*args, "--baseline", str(repaired)], env, "bench/test_repair.py")
    assert r.returncode == 0, r.stdout[-3000:]  # the same run against itself: no regression
    raised = tmp_path / "raised.jsonl"
    raised.write_text("".join(json.dumps({**d, "asrd": d["asrd"] + 0.06} if d.get("case") == "repair" else d) + "\n"
                              for d in rows))
    r = _pytest([*args, "--baseline", str(raised)], env, "bench/test_repair.py")
    assert r.returncode == 1 and "ASRD" in r.stdout, r.stdout[-3000:]
    # every case ran and passed; the regressions are listed once, at the end of the session
    n = len([d for d in rows if d.get("case") == "repair"])
    table = [ln for ln in r.stdout.splitlines() if ln.startswith("repair:pfl:prune:")]
    assert f"{n} passed" in r.stdout and len(table) == n and all(" ASRD " in ln for ln in table), r.stdout[-3000:]
    # the same baseline, but its entries' weights differ from this database's: another model, so
    # its ASRD is not compared ("database differs"), and the run passes
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({**d, "weights_sha": "0" * 16} if d.get("kind") == "case" else
                                        {**d, "db_fingerprint": "0" * 16} if d.get("kind") == "header" else d) + "\n"
                             for d in (json.loads(x) for x in raised.read_text().splitlines())))
    r = _pytest([*args, "--baseline", str(other)], env, "bench/test_repair.py")
    assert r.returncode == 0 and "database differs" in r.stdout and f"{n} cases ran on models other" in r.stdout, \
        r.stdout[-3000:]
