"""Issue 12, class 2: names are never paths. Real symlinked folders and files inside a database
cannot carry a write out of its root; names that are not plain directory names are refused."""

from __future__ import annotations

import pytest

from bd4nn.db import Database, DatabaseError
from test_db import make_db, make_label, parent_state, rows_infected, trigger_tensors


def test_a_linked_folder_inside_the_database_cannot_carry_writes_out(tmp_path):
    db, parent = make_db(tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    label = make_label()
    # the attack folder of the entry is a link to a folder outside the database
    arch_dir = db.arch_dir(label.dataset, label.arch)
    arch_dir.mkdir(parents=True, exist_ok=True)
    (arch_dir / label.attack).symlink_to(outside, target_is_directory=True)
    with pytest.raises(DatabaseError, match="outside the database"):
        db.save_entry(label, rows_infected(parent), parent_state(parent), trigger_tensors())
    assert list(outside.rglob("*")) == []  # nothing was written there


def test_a_linked_index_is_refused(tmp_path):
    db, parent = make_db(tmp_path)
    outside = tmp_path / "index-elsewhere.jsonl"
    outside.write_text("")
    (db.root / "index.jsonl").symlink_to(outside)
    with pytest.raises(DatabaseError):
        db.save_entry(make_label(), rows_infected(parent), parent_state(parent), trigger_tensors())
    assert outside.read_text() == ""


@pytest.mark.parametrize("name", ["../../x", "..", "a/b", "/abs", "", "x\x00y"])
def test_names_that_are_not_plain_names_never_become_paths(tmp_path, name):
    db = Database(tmp_path / "db")
    with pytest.raises(ValueError):
        db.arch_dir(name, "vgg13")
    with pytest.raises(ValueError):
        db.entry_dir("cifar10", "vgg13", name, "narrow")
    assert not (tmp_path / "db").exists() and not (tmp_path / "x").exists()
