"""Issue 12, class 7: the pytest harness. A bad --db, --profile or --baseline is a pytest usage
error (one "ERROR:" line, exit 4), not an INTERNALERROR traceback; a baseline is validated;
one that matches no case is reported (PytestConfigWarning in the run, ``Baseline.matching``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bd4nn.results import Baseline

ROOT = Path(__file__).resolve().parent.parent


def _bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", str(ROOT / "bench"), "-q", "-p", "no:cacheprovider",
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("make,args,needle", [
    (lambda d: (d / "afile").write_text("x"), ["--db", "{d}/afile"], "is a file"),
    (lambda d: None, ["--profile", "no-such-profile"], "unknown profile"),
    (lambda d: None, ["--db", "{d}/empty", "--profile", "tiny", "--baseline", "{d}/missing.jsonl"], "no such results file"),
])
def test_bad_harness_options_are_usage_errors(tmp_path, make, args, needle):
    make(tmp_path)
    out = _bench(*[a.format(d=tmp_path) for a in args])
    text = out.stdout + out.stderr
    assert out.returncode == 4, text[-2000:]
    assert "INTERNALERROR" not in text and "ERROR: bd4nn:" in text and needle in text, text[-2000:]


def _write(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(ln) + "\n" for ln in lines))
    return path


def test_baseline_numbers_must_be_numbers(tmp_path):
    good = {"kind": "case", "case": "localization", "outcome": "passed", "localizer": "clp", "entry": "e1", "wji": 0.5,
            "time_s": 1.0}
    assert Baseline.load(_write(tmp_path / "ok.jsonl", [good])).cases
    for key, bad in (("wji", "high"), ("wji", True), ("time_s", float("inf"))):
        with pytest.raises(ValueError, match=f"{key} must be a finite number"):
            Baseline.load(_write(tmp_path / "bad.jsonl", [{**good, key: bad}]))
    with pytest.raises(ValueError, match="not a bd4nn results file"):
        Baseline.load(_write(tmp_path / "alien.jsonl", [{"kind": "case", "wji": 0.1}]))
    with pytest.raises(ValueError, match="not JSON"):
        (tmp_path / "garbage.jsonl").write_text("not json\n")
        Baseline.load(tmp_path / "garbage.jsonl")


def test_baseline_matching_counts_the_cases_it_can_compare(tmp_path):
    base = Baseline.load(_write(tmp_path / "b.jsonl", [
        {"kind": "case", "case": "localization", "outcome": "passed", "localizer": "clp", "entry": "e1", "wji": 0.5},
        {"kind": "case", "case": "repair", "outcome": "passed", "localizer": "clp", "repair": "prune", "entry": "e1",
         "wji": 0.5},
    ]))
    loc = {"case": "localization", "localizer": "clp", "entry": "e1"}
    assert base.matching([loc, {**loc, "case": "repair", "repair": "prune"}, {**loc, "localizer": "fp"}]) == 2
    assert base.matching([{**loc, "entry": "e2"}]) == 0
