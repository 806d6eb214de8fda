"""Issue 12, class 3: reads stay safe. Real FIFOs, real symlinks and real oversize files in a
real database: every read refuses them at once with a message naming the file (nothing blocks,
nothing reads /dev/zero until memory runs out, nothing outside the root is read)."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest

from bd4nn.db import Database, DatabaseError

from test_db import built  # noqa: F401  (the fixture: a small real database)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="FIFOs and /dev/zero: Linux")


def _label_path(db: Database, id_: str) -> Path:
    return db.root / db.entry(id_)["files"]["label"]["path"]


def _with_timeout(fn, seconds: float = 20.0):
    """Run ``fn``; fail (instead of hanging the suite) if it blocks."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "the read blocked"
    if "error" in out:
        raise out["error"]
    return out.get("value")


def test_a_fifo_as_a_label_is_refused_without_blocking(built):  # noqa: F811
    db, id_, _ = built
    path = _label_path(db, id_)
    path.unlink()
    os.mkfifo(path)
    with pytest.raises(DatabaseError, match="not a regular file"):
        _with_timeout(lambda: Database(db.root).load_label(id_))
    problems = _with_timeout(lambda: Database(db.root).verify(progress=False))
    assert any("not a regular file" in p for p in problems)


def test_a_label_linked_to_dev_zero_or_outside_the_root_is_refused(built, tmp_path):  # noqa: F811
    db, id_, _ = built
    path = _label_path(db, id_)
    original = path.read_bytes()
    path.unlink()
    path.symlink_to("/dev/zero")
    with pytest.raises(DatabaseError, match="outside the database"):
        _with_timeout(lambda: Database(db.root).load_label(id_))
    outside = tmp_path / "outside.json"
    outside.write_bytes(original)  # the right bytes, but not under the root
    path.unlink()
    path.symlink_to(outside)
    with pytest.raises(DatabaseError, match="outside the database"):
        Database(db.root).load_label(id_)
    path.unlink()
    path.write_bytes(original + b" " * 10)  # longer than the index records
    with pytest.raises(DatabaseError, match="more than the"):
        Database(db.root).load_label(id_)
