"""``bench/smoke.py`` (the full-width smoke run, a benchmark) kept working: the same stages at a
toy width on the CPU, every stage ok and with a peak-memory figure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.data]


def test_smoke_script_runs_every_stage_and_measures_memory(tmp_path, data_dir):
    out = tmp_path / "smoke"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "smoke.py"), "--archs", "vgg13", "--width", "0.0625",
         "--batches", "1", "--device", "cpu", "--out", str(out)],
        env={**os.environ, "BD4NN_DATA": str(data_dir)}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(ln) for ln in (out / "smoke.jsonl").read_text().splitlines()]
    stages = {r["stage"] for r in rows}
    for attack in ("badnets", "blended", "trojannn", "sra"):
        assert f"inject {attack} + rule 3" in stages
    for name in ("fp", "nc", "anp", "clp", "deepmufl", "slicer", "pfl", "random"):
        assert f"localize {name}" in stages
    assert {"repair prune", "repair finetune"} <= stages
    assert all(r["error"] is None for r in rows)
    if sys.platform.startswith("linux"):
        assert all(r["peak_mib"] and r["peak_mib"] > 0 for r in rows)
    assert "peak RSS MiB" in (out / "smoke.md").read_text()
