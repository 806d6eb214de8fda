"""Project wiring: CI runs the README's test command; the CLI answers as documented."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from bd4nn.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"The test command CI runs.*?```bash\n(.+?)\n```", readme, re.S)
    assert m, "README must state the test command CI runs"
    command = m.group(1).strip()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert command in ci_lines


def test_models_command_prints_paper_totals(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name, total in [("vgg13", 2944), ("vgg16", 4224), ("resnet18", 4800), ("resnet34", 8512)]:
        assert re.search(rf"^{name}\s+\d+\s+{total}\s", out, re.M), out


def test_unknown_model_is_a_one_line_error(capsys):
    assert main(["models", "alexnet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "alexnet" in err[0] and "vgg13" in err[0]


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "bd4nn.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "models" in out.stdout and "data" in out.stdout
