"""``bench/gpu_run.py`` rehearsed on the CPU (issue 10): the toy budget writes the results, the
tables and the time table, and a second run into the same folder resumes from its database."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.data]


def test_toy_run_writes_results_tables_and_times(tmp_path, data_dir):
    out = tmp_path / "run"
    env = {**os.environ, "BD4NN_DATA": str(data_dir)}
    # a bounded amount of work (four candidates, every localizer on the kept ones) under a deadline loose
    # enough for a loaded 2-core machine: the rehearsal tests the stages, not the machine's speed
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_run.py"), "--device", "cpu", "--minutes", "6", "--toy",
           "--max-candidates", "4", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    lines = [json.loads(ln) for ln in (out / "results.jsonl").read_text().splitlines()]
    assert lines[0]["kind"] == "header" and lines[0]["profile"] == "gpu-run-toy"
    dirs = [ln for ln in lines if ln["kind"] == "directory"]
    cases = [ln for ln in lines if ln["kind"] == "case"]
    assert {d["attack"] for d in dirs} == {"badnets", "sra"}
    assert cases, "no localizer ran on a kept entry"
    db_index = [json.loads(ln) for ln in (out / "db" / "index.jsonl").read_text().splitlines() if ln.strip()]
    kept = {e["id"] for e in db_index if e["kept"]}
    assert {c["entry"] for c in cases} <= kept
    assert {c["localizer"] for c in cases} == {"clp", "fp", "slicer", "anp", "nc", "deepmufl"}
    for c in cases:
        assert 0.0 <= c["wji"] <= 1.0 and c["time_s"] >= 0.0

    tables = (out / "tables.md").read_text()
    for title in ("**Table I.**", "**Table II.**", "**Table III.**", "**Table IV.**"):
        assert title in tables
    times = (out / "times.md").read_text()
    for what in ("benign", "candidate", "clp", "deepmufl"):
        assert f"| {what}" in times
    run = json.loads((out / "run.json").read_text())
    assert run["final"] and run["cases"] == len(cases) and not run["failures"]

    # a second run into the same folder resumes: same parent and entries, earlier cases kept
    index_before = (out / "db" / "index.jsonl").read_text().splitlines()
    again = subprocess.run(cmd[:4] + ["--minutes", "0.5"] + cmd[6:], env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert set(index_before) <= set((out / "db" / "index.jsonl").read_text().splitlines())
    resumed = [json.loads(ln) for ln in (out / "results.jsonl").read_text().splitlines()]
    assert [c for c in resumed if c["kind"] == "case"][: len(cases)] == cases
