"""The import rules between the packages (issue 13), checked on the source.

- A localizer reads a model and clean data only: it imports neither the database
  (``bd4nn.db``), the attacks (``bd4nn.attacks``), the harness (``bd4nn.harness``) nor another
  localizer (``localizers.base`` is their shared base; ``localizers/__init__.py`` registers them).
- ``reports`` reads results files only: it imports neither ``bd4nn`` nor ``localizers``.
- ``bd4nn`` imports ``localizers`` or ``reports`` only in the harness, the CLI and ``bd4nn scan``
  (the harness of a user's own model), the places that join the packages.

Every import counts, also one inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, module) of every import in the source file ``path`` of ``package`` (dotted), with
    relative imports resolved; ``from m import n`` yields both ``m`` and ``m.n``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = parts[: len(parts) - node.level + 1] if node.level else []
            mod = ".".join([*base, *([node.module] if node.module else [])])
            out.append((node.lineno, mod))
            out += [(node.lineno, f"{mod}.{alias.name}") for alias in node.names]
    return out


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def violations(root: Path) -> list[str]:
    """Every import that breaks a rule, as ``file:line: module (rule)``."""
    found = []
    for path in sorted(root.glob("*/**/*.py")):
        rel = path.relative_to(root)
        package = rel.parts[0]
        if package not in ("bd4nn", "localizers", "reports"):
            continue
        package_of_file = ".".join(rel.parts[:-1])
        for line, mod in imported_modules(path, package_of_file):
            rule = None
            if package == "localizers" and rel.name != "__init__.py":
                own = "localizers." + rel.with_suffix("").name
                if any(_under(mod, p) for p in ("bd4nn.db", "bd4nn.attacks", "bd4nn.harness")):
                    rule = "a localizer imports the database, the attacks or the harness"
                elif (_under(mod, "localizers") and mod != "localizers" and not _under(mod, "localizers.base")
                      and not _under(mod, own)):
                    rule = "a localizer imports another localizer"
            elif package == "reports" and (_under(mod, "bd4nn") or _under(mod, "localizers")):
                rule = "reports imports bd4nn or localizers"
            elif package == "bd4nn" and rel.as_posix() not in ("bd4nn/harness.py", "bd4nn/cli.py", "bd4nn/scan.py") and (
                    _under(mod, "localizers") or _under(mod, "reports")):
                rule = "bd4nn imports localizers or reports outside the harness and the CLI"
            if rule:
                found.append(f"{rel}:{line}: {mod} ({rule})")
    return sorted(set(found))


def test_the_project_keeps_its_import_rules():
    assert violations(ROOT) == []


def test_a_forbidden_import_is_found(tmp_path):
    for package in ("bd4nn", "localizers", "reports"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "localizers" / "base.py").write_text("import torch\n")
    (tmp_path / "localizers" / "good.py").write_text("from localizers.base import x\nfrom bd4nn.neurons import y\n")
    (tmp_path / "localizers" / "peek.py").write_text(
        "import torch\n\ndef scores():\n    from bd4nn.db import Database\n    return Database\n")
    (tmp_path / "localizers" / "borrow.py").write_text("from .good import helper\n")
    (tmp_path / "reports" / "table.py").write_text("import bd4nn.metrics\n")
    (tmp_path / "bd4nn" / "train.py").write_text("from localizers import get_localizer\n")
    (tmp_path / "bd4nn" / "harness.py").write_text("from localizers import get_localizer\n")
    assert violations(tmp_path) == [
        "bd4nn/train.py:1: localizers (bd4nn imports localizers or reports outside the harness and the CLI)",
        "bd4nn/train.py:1: localizers.get_localizer (bd4nn imports localizers or reports outside the harness "
        "and the CLI)",
        "localizers/borrow.py:1: localizers.good (a localizer imports another localizer)",
        "localizers/borrow.py:1: localizers.good.helper (a localizer imports another localizer)",
        "localizers/peek.py:4: bd4nn.db (a localizer imports the database, the attacks or the harness)",
        "localizers/peek.py:4: bd4nn.db.Database (a localizer imports the database, the attacks or the harness)",
        "reports/table.py:1: bd4nn.metrics (reports imports bd4nn or localizers)",
    ]


def test_one_home_for_frozen_and_the_data_variables():
    """``frozen`` is defined once (``bd4nn.runtime``); ``BD4NN_DATA`` and ``BD4NN_CACHE`` are
    read in one module (``bd4nn.data``), so every entry point finds the same files."""
    sources = {p.relative_to(ROOT).as_posix(): p.read_text()
               for folder in ("bd4nn", "localizers", "reports", "bench") for p in (ROOT / folder).rglob("*.py")}
    sources["conftest.py"] = (ROOT / "conftest.py").read_text()
    assert [f for f, text in sources.items() if "def frozen(" in text] == ["bd4nn/runtime.py"]
    for var in ("BD4NN_DATA", "BD4NN_CACHE"):
        readers = [f for f, text in sources.items() if f'"{var}"' in text]
        assert readers == ["bd4nn/data.py"], (var, readers)
