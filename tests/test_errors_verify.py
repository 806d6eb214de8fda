"""Issue 12, class 4: ``verify`` checks everything ``load`` checks, through one shared validation.

Each case forges one real file of a real (micro) database and then repairs every hash that
covers it — the index line's sha256 and size, a benign record's own ``content_sha256`` — so that
only the validation of the content can catch it. ``verify`` must report it, naming the file,
and loading must refuse it with the same message.
"""

import json
import shutil

import pytest
import torch

from bd4nn.build import build
from bd4nn.db import BENIGN_RECORD, INDEX, Database, DatabaseError, _canonical, _st_load, _st_save, sha256_bytes
from synthetic import repro_profile, three_colours


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify") / "db"
    build(root, repro_profile(), device="cpu", data={"cifar10": three_colours()}, progress=False)  # at 1 thread
    db = Database(root)
    assert db.verify(progress=False) == []
    assert db.entries(kept=True) and db.entries(kept=False)
    return root


@pytest.fixture
def db(built, tmp_path) -> Database:
    shutil.copytree(built, tmp_path / "db")
    return Database(tmp_path / "db")


def lines(db: Database) -> list[dict]:
    return [json.loads(x) for x in (db.root / INDEX).read_text().splitlines()]


def write_lines(db: Database, rows: list[dict]) -> None:
    (db.root / INDEX).write_text("".join(json.dumps(r, sort_keys=True, separators=(",", ":")) + "\n" for r in rows))


def rehash(db: Database, role: str, rel: str, data: bytes) -> None:
    """Write ``data`` at ``rel`` and make every index line that names it agree."""
    (db.root / rel).write_bytes(data)
    rows = lines(db)
    for r in rows:
        info = r["files"].get(role)
        if info and info["path"] == rel:
            info.update(sha256=sha256_bytes(data), bytes=len(data))
    write_lines(db, rows)


def forge_label(db: Database, kept: bool, change) -> tuple[str, str]:
    line = db.entries(kept=kept)[0]
    rel = line["files"]["label"]["path"]
    doc = json.loads((db.root / rel).read_text())
    change(doc)
    rehash(db, "label", rel, (json.dumps(doc, sort_keys=True, indent=1) + "\n").encode())
    return line["id"], rel


def forge_benign(db: Database, change) -> str:
    rel = f"cifar10/vgg13/{BENIGN_RECORD}"
    doc = json.loads((db.root / rel).read_text())
    change(doc)
    doc["content_sha256"] = sha256_bytes(_canonical({k: v for k, v in doc.items() if k != "content_sha256"}))
    rehash(db, "parent_record", rel, (json.dumps(doc, sort_keys=True, indent=1) + "\n").encode())
    return rel


def forge_delta(db: Database, change) -> tuple[str, str]:
    line = db.entries(kept=True)[0]
    rel = line["files"]["weights"]["path"]
    path = db.root / rel
    tensors, meta = _st_load(path.read_bytes(), path, "delta")
    change(tensors)
    rehash(db, "weights", rel, _st_save(tensors, meta))
    return line["id"], rel


def reported(db: Database, rel: str, pattern: str) -> str:
    problems = db.verify(progress=False)
    hits = [p for p in problems if rel in p and pattern in p]
    assert hits, f"verify missed {pattern!r} in {rel}: {problems}"
    return hits[0]


@pytest.mark.parametrize("field, value, pattern", [
    ("width", 1e9, "width must be a number in (0, 64]"),
    ("num_classes", 10**9, "num_classes must be an integer in [2, 100000]"),
    ("std", [0.2, 0.0, 0.2], "std must be a list of 3 finite numbers > 0"),
    ("ca", 1.7, "ca must be a number in [0, 1]"),
])
def test_a_forged_benign_record_is_reported_and_never_built(db, field, value, pattern):
    rel = forge_benign(db, lambda d: d.__setitem__(field, value))
    msg = reported(db, rel, pattern)
    with pytest.raises(DatabaseError) as exc:  # refused from the record, before any allocation
        db.load_benign("cifar10", "vgg13")
    assert str(exc.value) == msg
    with pytest.raises(DatabaseError, match="must be"):
        db.load_entry(db.entries(kept=True)[0]["id"])


@pytest.mark.parametrize("kept", [True, False], ids=["kept", "rejected"])
@pytest.mark.parametrize("change, pattern", [
    (lambda d: d["rc"].__setitem__(next(iter(d["rc"])), [float("nan")] * len(next(iter(d["rc"].values())))),
     "must be a list of finite numbers >= 0"),
    (lambda d: d.__setitem__("rc", {k: [2 * w for w in v] for k, v in d["rc"].items()}), "rc must sum to 1"),
    (lambda d: d.__setitem__("ca", 1.5), "ca must be a number in [0, 1]"),
    (lambda d: d.__setitem__("asr_cor", float("inf")), "asr_cor must be a number in [-1, 1]"),
    (lambda d: d.__setitem__("target", 10), "target 10 but the parent has 10 classes"),
    (lambda d: (d.__setitem__("s_fault", {"features.99": [0]}), d.__setitem__("rc", {"features.99": [1.0]})),
     "S_fault does not fit vgg13"),
    (lambda d: (d.__setitem__("s_fault", {"features.0": [999]}), d.__setitem__("rc", {"features.0": [1.0]})),
     "S_fault does not fit vgg13"),
], ids=["rc-nan", "rc-sum", "ca-range", "cor-inf", "target", "layer", "channel"])
def test_a_forged_label_is_reported_and_refused(db, kept, change, pattern):
    id_, rel = forge_label(db, kept, change)
    msg = reported(db, rel, pattern)
    with pytest.raises(DatabaseError) as exc:
        if kept:
            db.load_entry(id_)
        else:
            db._check_rejected(db.entry(id_))
    assert str(exc.value) == msg


def test_a_label_must_live_at_its_ids_path(db):
    line = db.entries(kept=True)[0]
    src = line["files"]["label"]["path"]
    moved = src.replace("/large/", "/narrow/")
    assert moved != src
    shutil.copy(db.root / src, db.root / moved)
    rows = lines(db)
    for r in rows:
        if r["id"] == line["id"]:
            r["files"]["label"]["path"] = moved  # same bytes, same hash: only the path is wrong
    write_lines(db, rows)
    msg = reported(db, moved, f"must be {src}")
    with pytest.raises(DatabaseError, match="must be"):
        db.load_entry(line["id"])
    assert msg


@pytest.mark.parametrize("change, pattern", [
    (lambda t: t.__setitem__("trigger.pattern", torch.full_like(t["trigger.pattern"], float("nan"))),
     "the trigger holds NaN or inf"),
    (lambda t: [t.__setitem__(k, torch.full_like(v, float("inf"))) for k, v in list(t.items())
                if k.startswith("delta.") and v.is_floating_point()][:1],
     "the model holds NaN or inf"),
    (lambda t: [t.__setitem__(k, torch.zeros(3, 3)) for k in list(t) if k.startswith("delta.")
                and (k.endswith(".full") or k.endswith(".rows") or k.endswith(".values"))][:1],
     "delta of"),
], ids=["trigger-nan", "weights-inf", "shape"])
def test_a_forged_delta_is_reported_and_refused(db, change, pattern):
    id_, rel = forge_delta(db, change)
    msg = reported(db, rel, pattern)
    with pytest.raises(DatabaseError) as exc:
        db.load_entry(id_)
    assert str(exc.value) == msg


def test_duplicate_index_lines_are_reported(db):
    rows = lines(db)
    write_lines(db, rows + [rows[0]])
    problems = db.verify(progress=False)
    assert f"{db.root / INDEX}: entry {rows[0]['id']} has 2 index lines (one expected)" in problems[0]


@pytest.mark.parametrize("change, pattern", [
    (lambda r: r.pop("n_fault"), "n_fault must be an integer >= 0"),
    (lambda r: r.__setitem__("kept", "yes"), "kept must be true or false"),
    (lambda r: r["files"]["label"].__setitem__("sha256", "abc"), "files.label must be"),
    (lambda r: r.__setitem__("bytes", -1), "bytes must be an integer >= 0"),
], ids=["missing", "type", "sha", "negative"])
def test_an_index_line_outside_the_schema_is_reported_and_refused(db, change, pattern):
    rows = lines(db)
    change(rows[0])
    write_lines(db, rows)
    problems = db.verify(progress=False)
    assert len(problems) == 1 and "line 1" in problems[0] and pattern in problems[0]
    with pytest.raises(DatabaseError, match=pattern):
        db.entries()


def test_verify_and_load_share_their_messages_on_a_clean_database(db):
    assert db.verify(progress=False) == []
    for line in db.entries(kept=True):
        db.load_entry(line["id"])
