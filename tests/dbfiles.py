"""Comparing two database folders file by file: the tests that show a build reproducible, or a
parallel, threaded or Ray build equal to a serial one, share these."""

from __future__ import annotations

from pathlib import Path

from bd4nn.db import INDEX, TIMINGS

# Files that are allowed to differ between builds: the timings (wall-clock, by design) and the
# empty lock files that only carry flocks.
NOT_COMPARED = {TIMINGS}


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file of the database by relative path, except the timings and lock files."""
    files = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and rel not in NOT_COMPARED and not rel.endswith(".lock"):
            files[rel] = path.read_bytes()
    return files


def differences(a: Path, b: Path) -> list[str]:
    """What differs between the databases ``a`` and ``b``: each file only one holds, each file
    whose bytes differ, and the index if its lines differ (as a set: builds that run candidates
    at the same time append them in another order). Empty: the same database."""
    sa, sb = snapshot(a), snapshot(b)
    out = [f"only in {a}: {k}" for k in sorted(set(sa) - set(sb))]
    out += [f"only in {b}: {k}" for k in sorted(set(sb) - set(sa))]
    out += [f"differs: {k}" for k in sorted(set(sa) & set(sb))
            if (sorted(sa[k].splitlines()) != sorted(sb[k].splitlines()) if k == INDEX else sa[k] != sb[k])]
    return out
