"""The database on disk: deltas round-trip bit-exactly, hashes catch tampering, writes are atomic,
the index survives a kill, parallel shards do not interleave, and no pickle is ever read."""

from __future__ import annotations

import copy
import fcntl
import json
import os
import pickle
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from bd4nn import db as dbmod
from bd4nn.attacks.base import StampTrigger
from bd4nn.db import (
    BenignRecord,
    Database,
    DatabaseError,
    DatabaseWarning,
    DefectLabel,
    apply_delta,
    bit_equal,
    encode_delta,
    entry_id,
)
from bd4nn.models import get_model

WIDTH = 0.125
MEAN = [0.4914, 0.4822, 0.4465]
STD = [0.2470, 0.2435, 0.2616]


# ------------------------------------------------------------------------------ helpers


def bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bytes, so NaN == NaN and -0.0 != 0.0."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape, k
        assert torch.equal(bits(sa[k]), bits(sb[k])), f"{k} differs"


def make_db(tmp_path: Path, arch: str = "vgg13", parent: torch.nn.Module | None = None):
    db = Database(tmp_path / "db")
    parent = parent if parent is not None else get_model(arch, 10, width=WIDTH, seed=0)
    record = BenignRecord(dataset="cifar10", arch=arch, width=WIDTH, num_classes=10, mean=MEAN, std=STD,
                          seed=0, ca=0.9012, config={"train": {"epochs": 1}})
    db.save_benign(parent, record)
    return db, parent


def make_label(arch: str = "vgg13", s_fault: dict | None = None, *, attack: str = "badnets",
               level: str = "narrow", candidate: int = 0, kept: bool = True) -> DefectLabel:
    s_fault = s_fault if s_fault is not None else {"features.24": [3, 17]}
    n = sum(len(v) for v in s_fault.values())
    return DefectLabel(
        id=entry_id("cifar10", arch, attack, level, candidate), dataset="cifar10", arch=arch,
        width=WIDTH, attack=attack, level=level, candidate=candidate, kept=kept, s_fault=s_fault,
        rc={k: [1.0 / n] * len(v) for k, v in s_fault.items()},
        trigger={"attack": attack, "settings": {"size": 3}}, target=0, seed=0,
        recipe={"epochs": 10, "lr": 0.05}, ca=0.8812, asr=0.981, asr_cor=0.93 if kept else 0.31,
        ca_cor=0.02, ca_cor_r=0.6, asr_cor_r=0.05, benign_ca=0.9012,
        extra={"note": "test"},
    )


def trigger_tensors() -> dict[str, torch.Tensor]:
    mask = torch.zeros(1, 32, 32)
    mask[:, -3:, -3:] = 1
    pattern = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1))
    return StampTrigger(mask, pattern).tensors()


def parent_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def rows_infected(parent: torch.nn.Module) -> torch.nn.Module:
    """A poisoning-style change: neurons 3 and 17 of features.24 (conv rows, bias, BN) + the head."""
    m = copy.deepcopy(parent)
    sd = m.state_dict()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        sd["features.24.weight"][[3, 17]] += torch.randn(2, 64, 3, 3, generator=g)
        for k in ("features.24.bias", "features.25.weight", "features.25.bias",
                  "features.25.running_mean", "features.25.running_var"):
            sd[k][[3, 17]] += 0.25
        sd["features.25.num_batches_tracked"] += 5
        sd["classifier.weight"] += 0.01 * torch.randn(10, 64, generator=g)
        sd["classifier.bias"] -= 0.5
    return m


def entry_files(db: Database, id: str) -> tuple[Path, Path]:
    line = db.entry(id)
    return db.root / line["files"]["weights"]["path"], db.root / line["files"]["label"]["path"]


def stored_keys(path: Path) -> set[str]:
    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


# ------------------------------------------------------------------------------ deltas


def test_rows_delta_round_trips_bit_exactly_and_stores_only_the_changed_rows(tmp_path):
    db, parent = make_db(tmp_path)
    infected = rows_infected(parent)
    label = make_label()
    line = db.save_entry(label, infected, parent_state(parent), trigger_tensors())

    model, got_label, trig = db.load_entry(label.id)
    assert_same_state(model, infected)
    assert got_label == label
    assert torch.equal(trig["trigger.pattern"], trigger_tensors()["trigger.pattern"])
    assert StampTrigger.from_tensors(trig) == StampTrigger.from_tensors(trigger_tensors())

    wpath, lpath = entry_files(db, label.id)
    assert wpath == db.root / "cifar10/vgg13/badnets/narrow/cifar10-vgg13-badnets-narrow-00.safetensors"
    assert lpath == wpath.with_suffix(".json")
    small = ("features.24.bias", "features.25.weight", "features.25.bias", "features.25.running_mean",
             "features.25.running_var")
    assert stored_keys(wpath) == {
        "delta.features.24.weight.rows", "delta.features.24.weight.rowidx",
        *(f"delta.{k}.rows" for k in small), *(f"delta.{k}.rowidx" for k in small),
        "delta.features.25.num_batches_tracked.full",
        "delta.classifier.weight.full", "delta.classifier.bias.full",
        "trigger.mask", "trigger.pattern",
    }
    with safe_open(str(wpath), framework="pt") as f:
        assert f.get_tensor("delta.features.24.weight.rowidx").tolist() == [3, 17]
        assert torch.equal(f.get_tensor("delta.features.24.weight.rows"),
                           infected.state_dict()["features.24.weight"][[3, 17]])

    # expected payload, counted by hand: 2 conv rows of 64*3*3 floats + their int64 index;
    # 5 per-channel vectors with 2 changed values each (+ index); one int64 scalar; the head;
    # the trigger (1 + 3 channels of 32x32 floats)
    payload = (2 * 64 * 9 * 4 + 2 * 8) + 5 * (2 * 4 + 2 * 8) + 8 + (10 * 64 + 10) * 4 + 4 * 32 * 32 * 4
    size = wpath.stat().st_size
    assert payload <= size <= payload + 4096  # + the safetensors JSON header
    assert line["bytes"] == size
    assert line["full_bytes"] == db.benign_path("cifar10", "vgg13").stat().st_size
    full_payload = sum(v.numel() * v.element_size() for v in parent.state_dict().values())
    assert line["full_bytes"] >= full_payload
    assert size < 0.1 * line["full_bytes"]


def test_elementwise_sparse_delta_round_trips_nan_and_signed_zero(tmp_path):
    parent = get_model("resnet18", 10, width=WIDTH, seed=0)
    with torch.no_grad():
        parent.layer2[0].conv2.weight[5, 0, 0, 0] = 0.0  # becomes -0.0: torch.equal can't see it
    db, parent = make_db(tmp_path, "resnet18", parent)
    infected = copy.deepcopy(parent)
    w = infected.layer2[0].conv2.weight
    with torch.no_grad():
        others = [r for r in range(16) if r != 0]
        w[others, 1:3] = 0.0  # SRA-like severing: unselected channels stop reading channels 1, 2
        w[5, 0, 0, 0] = -0.0
    label = make_label("resnet18", {"layer2.0.conv2": [0]}, attack="sra")
    # the encoding itself is bitwise: a NaN payload round-trips through encode/apply ...
    nan_state = {k: v.clone() for k, v in infected.state_dict().items()}
    nan_state["layer2.0.conv2.weight"][0, 3, 1, 1] = float("nan")
    rebuilt = apply_delta(parent_state(parent), encode_delta(nan_state, parent_state(parent)))
    assert all(bit_equal(rebuilt[k], nan_state[k]) for k in nan_state)
    # ... but the database stores no model with NaN or inf weights (loading would refuse it)
    nan_model = copy.deepcopy(infected)
    nan_model.load_state_dict(nan_state)
    with pytest.raises(DatabaseError, match="NaN or inf in layer2.0.conv2.weight"):
        db.save_entry(label, nan_model, parent_state(parent), trigger_tensors())
    with torch.no_grad():
        w[0, 3, 1, 1] = 0.5  # instead of the NaN: one more changed element
    db.save_entry(label, infected, parent_state(parent), trigger_tensors())

    model, _, _ = db.load_entry(label.id)
    assert_same_state(model, infected)
    lw = model.layer2[0].conv2.weight
    assert torch.signbit(lw[5, 0, 0, 0]) and lw[0, 3, 1, 1].item() == 0.5

    wpath, _ = entry_files(db, label.id)
    assert stored_keys(wpath) == {"delta.layer2.0.conv2.weight.values", "delta.layer2.0.conv2.weight.flatidx",
                                  "trigger.mask", "trigger.pattern"}
    old = parent.layer2[0].conv2.weight.detach().reshape(-1)
    new = w.detach().reshape(-1)
    changed = [i for i in range(new.numel()) if new[i].item() != old[i].item() or i == 5 * 144]
    with safe_open(str(wpath), framework="pt") as f:
        assert f.get_tensor("delta.layer2.0.conv2.weight.flatidx").tolist() == sorted(changed)
    assert len(changed) == 15 * 2 * 9 + 2


def test_unchanged_model_stores_no_weight_tensor(tmp_path):
    db, parent = make_db(tmp_path)
    label = make_label()
    db.save_entry(label, copy.deepcopy(parent), parent_state(parent), trigger_tensors())
    wpath, _ = entry_files(db, label.id)
    assert stored_keys(wpath) == {"trigger.mask", "trigger.pattern"}
    model, _, _ = db.load_entry(label.id)
    assert_same_state(model, parent)


def test_resnet_rows_and_head_round_trip(tmp_path):
    db, parent = make_db(tmp_path, "resnet18")
    infected = copy.deepcopy(parent)
    with torch.no_grad():
        infected.layer2[0].shortcut[0].weight[[2, 9]] *= 1.5
        infected.layer2[0].shortcut[1].running_var[[2, 9]] += 1.0
        infected.linear.weight.add_(0.1)
    label = make_label("resnet18", {"layer2.0.shortcut.0": [2, 9]}, level="small", candidate=7)
    db.save_entry(label, infected, parent_state(parent), trigger_tensors())
    model, got, _ = db.load_entry("cifar10-resnet18-badnets-small-07")
    assert_same_state(model, infected)
    assert got.s_fault == {"layer2.0.shortcut.0": [2, 9]}
    # the parent itself loads back exactly too, in eval mode
    benign, record = db.load_benign("cifar10", "resnet18")
    assert_same_state(benign, parent)
    assert not benign.training and record.ca == 0.9012 and record.config == {"train": {"epochs": 1}}


def test_encode_delta_picks_the_cheapest_encoding():
    parent = {"w": torch.zeros(8, 100), "v": torch.zeros(8, 100), "f": torch.zeros(8, 100)}
    new = {k: v.clone() for k, v in parent.items()}
    new["w"][2] = 1.0  # one whole row: rows (400 B + 8) beats 100 values (1200 B) and full (3200 B)
    new["v"][:, 7] = 1.0  # one column: 8 values (96 B) beat 8 rows (3264 B)
    new["f"] += 1.0  # everything: full
    d = encode_delta(new, parent)
    assert set(d) == {"delta.w.rows", "delta.w.rowidx", "delta.v.values", "delta.v.flatidx", "delta.f.full"}
    assert d["delta.v.flatidx"].tolist() == [7 + 100 * r for r in range(8)]
    out = apply_delta(parent, d)
    assert all(torch.equal(out[k], new[k]) for k in new)
    assert torch.equal(parent["w"], torch.zeros(8, 100))  # the parent is not modified


# ------------------------------------------------------------------------------ labels and index


def test_label_json_is_sorted_indent_1_and_validated(tmp_path):
    db, parent = make_db(tmp_path)
    label = make_label()
    db.save_entry(label, rows_infected(parent), parent_state(parent), trigger_tensors())
    _, lpath = entry_files(db, label.id)
    text = lpath.read_text()
    doc = json.loads(text)
    assert text == json.dumps(doc, sort_keys=True, indent=1) + "\n"
    assert doc["ca"] == 0.8812 and doc["rc"] == {"features.24": [0.5, 0.5]}
    assert DefectLabel.from_json(text) == label

    del doc["asr_cor"]
    with pytest.raises(DatabaseError, match=r"x\.json: missing fields \['asr_cor'\]"):
        DefectLabel.from_json(doc, source="x.json")
    bad = make_label().to_dict()
    bad["rc"] = {"features.24": [1.0]}
    with pytest.raises(DatabaseError, match="rc\\['features.24'\\] has 1 weights for 2 fault neurons"):
        DefectLabel.from_json(bad)
    bad = make_label(s_fault={"features.24": [17, 3]}).to_dict()
    with pytest.raises(DatabaseError, match="sorted"):
        DefectLabel.from_json(bad)


def test_rejected_candidate_has_label_and_index_line_but_no_weights(tmp_path):
    db, parent = make_db(tmp_path)
    label = make_label(kept=False, candidate=4)
    line = db.save_entry(label, None, None, trigger_tensors())
    edir = db.root / "cifar10/vgg13/badnets/narrow"
    assert sorted(p.name for p in edir.iterdir()) == ["cifar10-vgg13-badnets-narrow-04.json"]
    assert line["kept"] is False and line["bytes"] == 0 and line["files"]["weights"] is None
    assert db.has_entry(label.id)
    assert db.entries() == []
    assert [e["id"] for e in db.entries(kept=False)] == [label.id]
    assert [e["id"] for e in db.entries(kept=None)] == [label.id]
    assert db.load_label(label.id) == label
    with pytest.raises(DatabaseError, match="cifar10-vgg13-badnets-narrow-04 was rejected"):
        db.load_entry(label.id)
    assert db.verify(progress=False) == []


def test_entries_filters_and_resume_reads_the_index(tmp_path):
    db, parent = make_db(tmp_path)
    infected = rows_infected(parent)
    for level, cand in [("narrow", 0), ("narrow", 1), ("small", 0)]:
        db.save_entry(make_label(level=level, candidate=cand), infected, parent_state(parent), trigger_tensors())
    db.save_entry(make_label(attack="blended", candidate=2), infected, parent_state(parent), trigger_tensors())
    assert [e["id"] for e in db.entries(attack="badnets", level="narrow")] == [
        "cifar10-vgg13-badnets-narrow-00", "cifar10-vgg13-badnets-narrow-01"]
    assert len(db.entries(level=["narrow", "small"])) == 4
    assert [e["id"] for e in db.entries(attack="blended")] == ["cifar10-vgg13-blended-narrow-02"]
    assert db.entries(dataset="gtsrb") == []
    e = db.entries(candidate=2)[0]
    assert e["n_fault"] == 2 and e["asr_cor"] == 0.93 and e["files"]["label"]["sha256"]
    with pytest.raises(ValueError, match="unknown entry filters \\['atack'\\]"):
        db.entries(atack="badnets")
    # a second process's Database sees the new lines (the cache follows the file)
    assert Database(db.root).has_entry("cifar10-vgg13-blended-narrow-02")
    # files on disk without an index line do not count as built
    wpath, _ = entry_files(db, "cifar10-vgg13-badnets-small-00")
    os.link(wpath, wpath.parent / "cifar10-vgg13-badnets-small-05.safetensors")
    assert not db.has_entry("cifar10-vgg13-badnets-small-05")
    with pytest.raises(DatabaseError, match="already in the index"):
        db.save_entry(make_label(level="small"), infected, parent_state(parent), trigger_tensors())


def test_truncated_last_index_line_is_ignored_and_cut_off_on_the_next_append(tmp_path):
    db, parent = make_db(tmp_path)
    infected = rows_infected(parent)
    db.save_entry(make_label(candidate=0), infected, parent_state(parent), trigger_tensors())
    index = db.root / "index.jsonl"
    whole = index.read_bytes()
    with open(index, "ab") as fh:  # a kill in the middle of the next append
        fh.write(whole[: len(whole) // 2].replace(b"narrow-00", b"narrow-01"))
    fresh = Database(db.root)
    with pytest.warns(DatabaseWarning, match="truncated last line"):
        assert [e["id"] for e in fresh.entries()] == ["cifar10-vgg13-badnets-narrow-00"]
    assert not fresh.has_entry("cifar10-vgg13-badnets-narrow-01")  # so a resumed build redoes it
    with pytest.warns(DatabaseWarning, match="cutting off"):
        fresh.save_entry(make_label(candidate=1), infected, parent_state(parent), trigger_tensors())
    lines = index.read_bytes().split(b"\n")
    assert lines[-1] == b"" and [json.loads(x)["id"] for x in lines[:-1]] == [
        "cifar10-vgg13-badnets-narrow-00", "cifar10-vgg13-badnets-narrow-01"]
    model, _, _ = Database(db.root).load_entry("cifar10-vgg13-badnets-narrow-01")
    assert_same_state(model, infected)
    # a bad line in the middle is not a kill: it is an error naming the line
    index.write_bytes(lines[0] + b"\n{oops\n" + lines[1] + b"\n")
    with pytest.raises(DatabaseError, match=r"index\.jsonl: line 2 is not a valid entry"):
        Database(db.root).entries()


def test_atomic_writes_leave_no_temp_file_and_no_index_line_on_failure(tmp_path, monkeypatch):
    db, parent = make_db(tmp_path)
    infected = rows_infected(parent)
    db.save_entry(make_label(candidate=0), infected, parent_state(parent), trigger_tensors())
    every = [p.name for p in db.root.rglob("*")]
    assert not [n for n in every if n.endswith(".tmp") or n.startswith(".")], every

    real_replace = os.replace

    def failing_replace(src, dst):
        if str(dst).endswith(".json"):  # the weights land, then the label write is killed
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(dbmod.os, "replace", failing_replace)
    label = make_label(candidate=1)
    with pytest.raises(OSError, match="No space"):
        db.save_entry(label, infected, parent_state(parent), trigger_tensors())
    monkeypatch.setattr(dbmod.os, "replace", real_replace)
    assert not db.has_entry(label.id)
    assert len((db.root / "index.jsonl").read_text().splitlines()) == 1
    assert not [p for p in db.root.rglob("*.tmp")]
    # resuming overwrites the orphan weights file and completes the entry
    db.save_entry(label, infected, parent_state(parent), trigger_tensors())
    model, _, _ = db.load_entry(label.id)
    assert_same_state(model, infected)


def test_save_waits_for_the_index_lock(tmp_path):
    """Another process holding ``index.lock`` (flock) blocks the append until it lets go."""
    db, parent = make_db(tmp_path)
    label = make_label(kept=False)
    done = threading.Event()
    errors: list[BaseException] = []

    def save():
        try:
            Database(db.root).save_entry(label, None, None, trigger_tensors())
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            done.set()

    with open(db.root / "index.lock", "a+b") as fh:  # a separate open file: flock conflicts
        fcntl.flock(fh, fcntl.LOCK_EX)
        t = threading.Thread(target=save)
        t.start()
        assert not done.wait(1.0)  # blocked
        assert not (db.root / "index.jsonl").exists()
        fcntl.flock(fh, fcntl.LOCK_UN)
    assert done.wait(60) and not errors
    t.join()
    assert db.has_entry(label.id)


@pytest.mark.slow
def test_parallel_shards_append_whole_lines(tmp_path):
    db, parent = make_db(tmp_path)
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_db import make_label, trigger_tensors
        from bd4nn.db import Database
        db = Database({str(db.root)!r})
        shard = int(sys.argv[1])
        for c in range(shard, 12, 2):
            db.save_entry(make_label(candidate=c, kept=False), None, None, trigger_tensors())
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(i)], stderr=subprocess.PIPE, env=env)
             for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err.decode()[-2000:]
    lines = (db.root / "index.jsonl").read_text().splitlines()
    assert sorted(json.loads(x)["candidate"] for x in lines) == list(range(12))
    assert db.verify(progress=False) == []


# ------------------------------------------------------------------------------ integrity


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def built(tmp_path):
    db, parent = make_db(tmp_path)
    label = make_label()
    infected = rows_infected(parent)
    db.save_entry(label, infected, parent_state(parent), trigger_tensors())
    assert db.verify(progress=False) == []
    return db, label.id, infected


def test_flipped_byte_in_entry_weights_fails_load_and_verify(built):
    db, id, _ = built
    wpath, _ = entry_files(db, id)
    flip_byte(wpath, wpath.stat().st_size - 10)  # inside the trigger pattern, still valid safetensors
    with pytest.raises(DatabaseError, match=rf"{wpath.name}: sha256 mismatch .*bd4nn build"):
        db.load_entry(id)
    problems = db.verify(progress=False)
    assert len(problems) == 1 and wpath.name in problems[0] and "sha256 mismatch" in problems[0]


def test_edited_label_fails_load_and_verify(built):
    db, id, _ = built
    _, lpath = entry_files(db, id)
    lpath.write_text(lpath.read_text().replace('"ca": 0.8812', '"ca": 0.9999'))
    with pytest.raises(DatabaseError, match=rf"{lpath.name}: sha256 mismatch"):
        db.load_entry(id)
    with pytest.raises(DatabaseError, match=rf"{lpath.name}: sha256 mismatch"):
        db.load_label(id)
    assert any(lpath.name in p for p in db.verify(progress=False))


def test_tampered_benign_weights_fail_entry_benign_and_verify(built):
    db, id, _ = built
    bpath = db.benign_path("cifar10", "vgg13")
    flip_byte(bpath, bpath.stat().st_size - 4)
    for load in (lambda: db.load_entry(id), lambda: db.load_benign("cifar10", "vgg13")):
        with pytest.raises(DatabaseError, match=r"vgg13/benign\.safetensors: sha256 mismatch"):
            load()
    problems = db.verify(progress=False)
    assert problems and all("benign.safetensors" in p for p in problems)


def test_edited_benign_record_fails_without_and_with_entries(built):
    db, id, _ = built
    rpath = db.benign_record_path("cifar10", "vgg13")
    rpath.write_text(rpath.read_text().replace('"ca": 0.9012', '"ca": 0.95'))
    with pytest.raises(DatabaseError, match=r"benign\.json: sha256 mismatch"):
        db.load_benign("cifar10", "vgg13")  # caught by its own content hash
    with pytest.raises(DatabaseError, match=r"benign\.json: sha256 mismatch"):
        db.load_entry(id)
    assert any("benign.json" in p for p in db.verify(progress=False))


def test_missing_file_and_unknown_id_are_clear_errors(built):
    db, id, _ = built
    with pytest.raises(DatabaseError, match="unknown entry 'cifar10-vgg13-badnets-narrow-0'; did you mean "
                                            "cifar10-vgg13-badnets-narrow-00"):
        db.load_entry("cifar10-vgg13-badnets-narrow-0")
    with pytest.raises(DatabaseError, match="unknown entry 'nope'.*bd4nn list"):
        db.load_entry("nope")
    with pytest.raises(DatabaseError, match="has no entries"):
        Database(db.root / "empty").load_entry(id)
    with pytest.raises(DatabaseError, match="no benign parent for cifar10/resnet18"):
        db.load_benign("cifar10", "resnet18")
    wpath, _ = entry_files(db, id)
    wpath.unlink()
    with pytest.raises(DatabaseError, match=rf"{wpath.name}: the weights of {id} is missing"):
        db.load_entry(id)
    assert db.verify(progress=False) == [f"{wpath}: the weights of {id} is missing; rebuild with `bd4nn build` or restore it"]


def test_label_naming_an_unknown_layer_is_refused(built, tmp_path):
    db, id, infected = built
    # at save time
    bad = make_label(s_fault={"features.99": [0]}, candidate=9)
    with pytest.raises(DatabaseError, match="unknown neuron layer 'features.99'"):
        db.save_entry(bad, infected, None, trigger_tensors())
    assert not db.has_entry(bad.id)
    with pytest.raises(DatabaseError, match="out of range"):
        db.save_entry(make_label(s_fault={"features.24": [64]}, candidate=9, kept=False), None, None,
                      trigger_tensors())
    # a hand-edited label (hash check off, so the layer check is what fails)
    _, lpath = entry_files(db, id)
    lpath.write_text(lpath.read_text().replace('"features.24"', '"features.99"'))
    with pytest.raises(DatabaseError, match=rf"{lpath.name}: S_fault does not fit vgg13.*'features.99'"):
        db.load_entry(id, verify=False)


def test_delta_naming_an_unknown_tensor_or_wrong_shape_is_refused(built):
    db, id, _ = built
    wpath, _ = entry_files(db, id)
    meta = {"format": "bd4nn.delta/1", "id": id, "parent_sha256": db.entry(id)["files"]["parent"]["sha256"]}
    save_file({"delta.features.99.weight.full": torch.zeros(3), **trigger_tensors()}, str(wpath), metadata=meta)
    with pytest.raises(DatabaseError, match=r"delta names tensor 'features.99.weight'.*did you mean"):
        db.load_entry(id, verify=False)
    save_file({"delta.classifier.weight.full": torch.zeros(10, 65)}, str(wpath), metadata=meta)
    with pytest.raises(DatabaseError, match=r"'classifier.weight'.*\(10, 65\) stored, model has .*\(10, 64\)"):
        db.load_entry(id, verify=False)
    save_file({"delta.classifier.bias.rows": torch.zeros(1), "delta.classifier.bias.rowidx": torch.tensor([10])},
              str(wpath), metadata=meta)
    with pytest.raises(DatabaseError, match="rowidx out of range"):
        db.load_entry(id, verify=False)
    wpath.write_bytes(b"\x00" * 100)
    with pytest.raises(DatabaseError, match="not a valid safetensors"):
        db.load_entry(id, verify=False)


def test_parent_state_that_is_not_the_stored_parent_is_refused(tmp_path):
    db, parent = make_db(tmp_path)
    wrong = parent_state(parent)
    wrong["features.0.bias"][0] += 1e-6
    with pytest.raises(ValueError, match="parent_state is not the benign parent"):
        db.save_entry(make_label(), rows_infected(parent), wrong, trigger_tensors())
    with pytest.raises(DatabaseError, match="already stored"):
        db.save_benign(parent, BenignRecord("cifar10", "vgg13", WIDTH, 10, MEAN, STD, 0, 0.9))


def test_loading_never_unpickles(built, monkeypatch):
    db, id, infected = built

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used")

    for mod, name in [(torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")]:
        monkeypatch.setattr(mod, name, refuse)
    model, label, trig = db.load_entry(id)
    assert_same_state(model, infected)
    benign, _ = db.load_benign("cifar10", "vgg13")
    assert set(trig) == {"trigger.mask", "trigger.pattern"} and label.id == id
    assert db.verify(progress=False) == []


def test_database_creates_nothing_until_written(tmp_path):
    db = Database(tmp_path / "new")
    assert not db.has_entry("x") and db.entries() == [] and db.verify(progress=False) == []
    assert not db.has_benign("cifar10", "vgg13")
    assert not (tmp_path / "new").exists()
    with pytest.raises(ValueError, match="cannot be a directory name"):
        db.benign_path("../etc", "vgg13")


def test_file_bytes_do_not_depend_on_the_process():
    """The same tensors and metadata give the same bytes (and sha256) in fresh processes
    (safetensors' own metadata map order varies between processes)."""
    import subprocess
    import sys

    code = (
        "import torch, hashlib\n"
        "from bd4nn.db import _st_save\n"
        "t = {'w': torch.arange(6.).view(2, 3), 'b': torch.zeros(2)}\n"
        "m = {'id': 'x', 'format': 'bd4nn.delta/1', 'parent_sha256': 'p', 'z': '1', 'a': '2'}\n"
        "print(hashlib.sha256(_st_save(t, m)).hexdigest())\n"
    )
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(4)}
    assert len(outs) == 1
