"""bd4nn.pack: a database packs into one reproducible archive, comes back intact from a file, an
HTTP server or the Hub (mocked), and a tampered archive is refused before anything reaches the
destination."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from synthetic import repro_profile, three_colours

from bd4nn.build import build, load_profile
from bd4nn.db import Database, database_fingerprint, sha256_file
from bd4nn.errors import BadInputError
from bd4nn.pack import HUB_FILE, MANIFEST, TOP, pack, pull, unpack

ROOT = Path(__file__).resolve().parents[1]

Members = list[tuple[tarfile.TarInfo, "bytes | None"]]


# ------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def micro_db(tmp_path_factory) -> Path:
    """A synthetic database built in about a second (one kept entry, seven rejected ones, a
    benign parent, timings and lock files). Tests that break a database copy it first."""
    root = tmp_path_factory.mktemp("micro") / "db"
    build(root, repro_profile(), device="cpu", data={"cifar10": three_colours()}, progress=False)
    return root


@pytest.fixture(scope="module")
def archive(micro_db, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("packed") / "db.tar"
    pack(micro_db, out)
    return out


def _fingerprint(root: Path) -> str:
    return database_fingerprint(Database(root).entries(kept=None))


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass


@contextmanager
def _serving(folder: Path) -> Iterator[str]:
    """``folder`` over HTTP on 127.0.0.1 (a free port) while the block runs; its base address."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def no_proxy(monkeypatch):
    """A proxy set in the environment must not take the requests to 127.0.0.1."""
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


# ------------------------------------------------------------------------------ archives by hand

def _members(path: Path) -> Members:
    with tarfile.open(path) as tar:
        return [(m, tar.extractfile(m).read() if m.isreg() else None) for m in tar.getmembers()]


def _write(path: Path, members: Members) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)


def _manifest(members: Members) -> dict:
    return json.loads(members[0][1])


def _weights_member(members: Members) -> int:
    """The index of a kept entry's weights member, else the benign parent's."""
    names = [m.name for m, _ in members]
    entries = [i for i, n in enumerate(names) if n.endswith(".safetensors") and "/benign." not in n]
    return (entries or [names.index(f"{TOP}/cifar10/vgg13/benign.safetensors")])[0]


def _flip_weights(members: Members) -> Members:
    i = _weights_member(members)
    info, data = members[i]
    mid = len(data) // 2
    members[i] = (info, data[:mid] + bytes([data[mid] ^ 0x01]) + data[mid + 1:])
    return members


def _added(info: tarfile.TarInfo, data: bytes | None = None) -> Callable[[Members], Members]:
    return lambda members: [*members, (info, data)]


def _link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def _edit_manifest(edit: Callable[[dict], None]) -> Callable[[Members], Members]:
    def apply(members: Members) -> Members:
        manifest = _manifest(members)
        edit(manifest)
        return [(members[0][0], json.dumps(manifest).encode()), *members[1:]]
    return apply


def _set_hash(path: str, sha256: str) -> Callable[[dict], None]:
    def edit(manifest: dict) -> None:
        next(f for f in manifest["files"] if f["path"] == path)["sha256"] = sha256
    return edit


def _without(suffix: str) -> Callable[[Members], Members]:
    return lambda members: [(m, d) for m, d in members if not m.name.endswith(suffix)]


def _relabelled(members: Members) -> Members:
    """A label edited and the manifest updated to match: only ``Database.verify`` can tell."""
    i = next(i for i, (m, _) in enumerate(members) if m.name.endswith("-narrow-00.json"))
    info, data = members[i]
    data = data.replace(b'"target":', b'"target": ', 1)
    members[i] = (info, data)
    rel = info.name[len(TOP) + 1:]
    manifest = _manifest(members)
    entry = next(f for f in manifest["files"] if f["path"] == rel)
    entry["sha256"], entry["bytes"] = hashlib.sha256(data).hexdigest(), len(data)
    return [(members[0][0], json.dumps(manifest).encode()), *members[1:]]


def _plain(name: str) -> tarfile.TarInfo:
    return tarfile.TarInfo(name)


TAMPERINGS = {
    "flipped weights byte": (_flip_weights, r"sha256 mismatch"),
    "member the manifest lacks": (_added(_plain(f"{TOP}/notes.txt"), b"hello"), r"not listed in MANIFEST\.json"),
    "symlink member": (_added(_link(f"{TOP}/link", "/etc/passwd", tarfile.SYMTYPE)), r"symbolic link"),
    "hard link member": (_added(_link(f"{TOP}/hard", f"{TOP}/index.jsonl", tarfile.LNKTYPE)), r"hard link"),
    "../escape member": (_added(_plain("../escape"), b"x"), r"climbs out with '\.\.'"),
    "climbing inside the top folder": (_added(_plain(f"{TOP}/../../escape"), b"x"), r"climbs out with '\.\.'"),
    "absolute member": (_added(_plain("/tmp/bd4nn-escape"), b"x"), r"absolute path"),
    "member outside the top folder": (_added(_plain("other/file"), b"x"), r"outside the archive's top folder"),
    "manifest hash edited": (_edit_manifest(_set_hash("index.jsonl", "0" * 64)), r"index\.jsonl: sha256 mismatch"),
    "manifest fingerprint edited": (_edit_manifest(lambda m: m.update(fingerprint="0" * 16)), r"fingerprint"),
    "file missing from the archive": (_without("-narrow-01.json"), r"missing from the archive.*narrow-01\.json"),
    "manifest not first": (lambda ms: [*ms[1:], ms[0]], r"first member is .* not MANIFEST\.json"),
    "label edited, manifest updated": (_relabelled, r"fails `bd4nn verify`"),
}


# ------------------------------------------------------------------------------ pack

def test_pack_is_reproducible_and_lists_every_database_file(micro_db, tmp_path):
    first, second = tmp_path / "a.tar", tmp_path / "b.tar"
    summary = pack(micro_db, first)
    pack(micro_db, second)
    assert first.read_bytes() == second.read_bytes()
    assert summary["sha256"] == sha256_file(first) and summary["bytes"] == first.stat().st_size
    assert summary["fingerprint"] == _fingerprint(micro_db) and summary["entries"] == 8 == summary["files"] - 5
    members = _members(first)
    assert members[0][0].name == MANIFEST
    assert all((m.mtime, m.uid, m.gid, m.mode, m.uname) == (0, 0, 0, 0o644, "") for m, _ in members)
    manifest = _manifest(members)
    assert manifest["format"] == "bd4nn.pack/1" and manifest["fingerprint"] == summary["fingerprint"]
    paths = [f["path"] for f in manifest["files"]]
    assert paths == sorted(paths) and [m.name for m, _ in members[1:]] == [f"{TOP}/{p}" for p in paths]
    assert {"index.jsonl", "timings.jsonl", "cifar10/vgg13/benign.safetensors"} <= set(paths)
    assert not [p for p in paths if p.endswith(".lock") or p.startswith(".")]  # locks and claims stay home
    for f in manifest["files"]:
        assert f["sha256"] == sha256_file(micro_db / f["path"]) and f["bytes"] == (micro_db / f["path"]).stat().st_size
    # gzip: reproducible too (no name or time in its header), and it unpacks
    gz_a, gz_b = tmp_path / "a.tar.gz", tmp_path / "b.tgz"
    pack(micro_db, gz_a)
    pack(micro_db, gz_b)
    assert gz_a.read_bytes() == gz_b.read_bytes() and gz_a.read_bytes()[:2] == b"\x1f\x8b"
    assert _fingerprint(unpack(gz_a, tmp_path / "from-gz")) == summary["fingerprint"]
    assert not list(tmp_path.glob(".*"))  # no temporary file left


def test_pack_refuses_a_missing_empty_or_broken_database(micro_db, tmp_path):
    with pytest.raises(BadInputError, match="no bd4nn database"):
        pack(tmp_path / "nowhere", tmp_path / "x.tar")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "index.jsonl").write_bytes(b"")
    with pytest.raises(BadInputError, match="no entries"):
        pack(tmp_path / "empty", tmp_path / "x.tar")
    broken = tmp_path / "broken"
    shutil.copytree(micro_db, broken)
    weights = broken / "cifar10" / "vgg13" / "benign.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(BadInputError, match=r"`bd4nn verify` finds .*benign\.safetensors"):
        pack(broken, tmp_path / "x.tar")
    with pytest.raises(BadInputError, match="is a folder"):
        pack(micro_db, tmp_path)
    assert not (tmp_path / "x.tar").exists()


# ------------------------------------------------------------------------------ unpack / pull

def test_pull_over_http_gives_the_same_database(micro_db, archive, tmp_path, no_proxy):
    digest = sha256_file(archive)
    with _serving(archive.parent) as base:
        dest = pull(f"{base}/{archive.name}", tmp_path / "pulled", sha256=digest.upper())
        assert Database(dest).verify(progress=False) == []
        assert _fingerprint(dest) == _fingerprint(micro_db)
        assert (dest / "index.jsonl").read_bytes() == (micro_db / "index.jsonl").read_bytes()
        assert not (dest / "index.lock").exists() and not (dest / ".locks").exists()
        # failures: HTTP status, sha256, size cap; none leaves a destination or a download behind
        for kwargs, problem in [({"source": f"{base}/nothing.tar"}, r"HTTP 404"),
                                ({"source": f"{base}/{archive.name}", "sha256": "0" * 64}, r"sha256 is .* not the expected"),
                                ({"source": f"{base}/{archive.name}", "max_bytes": 1000}, r"more than the cap of 1000")]:
            with pytest.raises(BadInputError, match=problem):
                pull(dest=tmp_path / "refused", **kwargs)
            assert not (tmp_path / "refused").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pulled"]


def test_pull_and_unpack_refuse_bad_sources_and_destinations(archive, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(BadInputError, match="is not empty"):
        pull(archive, tmp_path / "full")
    with pytest.raises(BadInputError, match="unknown source"):
        pull("ftp://example.org/db.tar", tmp_path / "a")
    with pytest.raises(BadInputError, match="no such archive file"):
        pull(tmp_path / "missing.tar", tmp_path / "a")
    with pytest.raises(BadInputError, match=r"hf://OWNER/NAME"):
        pull("hf://only-owner", tmp_path / "a")
    with pytest.raises(BadInputError, match="64 hexadecimal digits"):
        pull(archive, tmp_path / "a", sha256="abc")
    (tmp_path / "junk.tar").write_bytes(b"not a tar archive" * 100)
    with pytest.raises(BadInputError, match="not a readable tar archive"):
        unpack(tmp_path / "junk.tar", tmp_path / "a")
    assert not (tmp_path / "a").exists()
    (tmp_path / "empty").mkdir()  # an empty folder is a fine destination
    assert _fingerprint(pull(archive, tmp_path / "empty")) == json.loads(_members(archive)[0][1])["fingerprint"]


def test_an_archive_remade_with_folder_members_unpacks(archive, tmp_path):
    """``tar -cf new.tar MANIFEST.json bd4nn-db`` lists the folders too: they are allowed."""
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    remade = tmp_path / "remade.tar"
    with tarfile.open(remade, "w") as tar:
        tar.add(tmp_path / "x" / MANIFEST, MANIFEST)
        tar.add(tmp_path / "x" / TOP, TOP)
    assert any(m.isdir() for m, _ in _members(remade))
    assert Database(unpack(remade, tmp_path / "db")).verify(progress=False) == []


@pytest.mark.parametrize("tampering", list(TAMPERINGS))
def test_a_tampered_archive_is_refused_and_leaves_nothing(archive, tmp_path, tampering):
    change, problem = TAMPERINGS[tampering]
    bad = tmp_path / "bad.tar"
    _write(bad, change(_members(archive)))
    dest = tmp_path / "out" / "db"
    with pytest.raises(BadInputError, match=problem):
        unpack(bad, dest)
    assert not dest.exists() and list((tmp_path / "out").iterdir()) == []  # no temporary folder either
    assert not (tmp_path / "escape").exists() and not Path("/tmp/bd4nn-escape").exists()


# ------------------------------------------------------------------------------ Hugging Face Hub

def test_pull_from_the_hub_downloads_the_dataset_repo_file(archive, tmp_path, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    calls = []

    def fake_download(**kwargs):
        calls.append(kwargs)
        return str(archive)

    monkeypatch.setattr(hub, "hf_hub_download", fake_download)
    assert Database(pull("hf://my-lab/bd4nn-small", tmp_path / "a")).verify(progress=False) == []
    pull("hf://my-lab/bd4nn-small/dbs/v2.tar@refs/pr/1", tmp_path / "b")
    assert calls == [
        {"repo_id": "my-lab/bd4nn-small", "filename": HUB_FILE, "repo_type": "dataset", "revision": None},
        {"repo_id": "my-lab/bd4nn-small", "filename": "dbs/v2.tar", "repo_type": "dataset", "revision": "refs/pr/1"},
    ]

    def failing_download(**kwargs):
        raise OSError("404 Client Error: Repository Not Found")

    monkeypatch.setattr(hub, "hf_hub_download", failing_download)
    with pytest.raises(BadInputError, match=r"cannot download bd4nn-db\.tar from the dataset repo my-lab/nope"):
        pull("hf://my-lab/nope", tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_pull_from_the_hub_without_huggingface_hub_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if not installed
    with pytest.raises(BadInputError, match=r'pip install "bd4nn\[hub\]"'):
        pull("hf://my-lab/bd4nn-small", tmp_path / "db")
    assert not (tmp_path / "db").exists()


# ------------------------------------------------------------------------------ end to end

@pytest.mark.slow
@pytest.mark.data
def test_a_pulled_database_runs_the_benchmark(tmp_path, data_dir, no_proxy):
    """Build the harness test's micro database from CIFAR-10, pack it, serve it over HTTP, pull
    it into a new folder and run the benchmark's CLP cases on the pulled copy."""
    from test_bench import MICRO  # the one micro profile of the harness tests

    (tmp_path / "micro.toml").write_text(MICRO)
    built = tmp_path / "built"
    build(built, load_profile(tmp_path / "micro.toml"), device="cpu", data_root=data_dir, progress=False)
    assert Database(built).entries(kept=True), "the micro profile kept no entry"
    served = tmp_path / "served"
    pack(built, served / "db.tar")
    with _serving(served) as base:
        dest = pull(f"{base}/db.tar", tmp_path / "pulled")
    assert Database(dest).verify(progress=False) == []
    assert _fingerprint(dest) == _fingerprint(built)
    results = tmp_path / "results.jsonl"
    env = {**os.environ, "BD4NN_DATA": str(data_dir),
           "BD4NN_CACHE": os.environ.get("BD4NN_CACHE", str(tmp_path / "cache"))}
    run = subprocess.run([sys.executable, "-m", "pytest", "bench/", "--db", str(dest), "-k", "clp",
                          "-p", "no:cacheprovider", "-q", "--results", str(results)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    cases = [json.loads(x) for x in results.read_text().splitlines()]
    assert [c for c in cases if c.get("kind") == "case" and c.get("localizer") == "clp"]


def test_the_command_line_packs_pulls_and_refuses_a_wrong_sha256(micro_db, tmp_path, capsys):
    from bd4nn.cli import main

    out = tmp_path / "db.tar"
    assert main(["pack", str(micro_db), str(out)]) == 0
    printed = capsys.readouterr().out
    digest = sha256_file(out)
    assert f"sha256 {digest}" in printed and _fingerprint(micro_db) in printed
    assert main(["pull", str(out), str(tmp_path / "pulled"), "--sha256", digest]) == 0
    assert _fingerprint(tmp_path / "pulled") == _fingerprint(micro_db)
    assert f"pytest bench/ --db {tmp_path / 'pulled'}" in capsys.readouterr().out
    assert main(["unpack", str(out), str(tmp_path / "other"), "--sha256", "0" * 64]) == 2
    assert "sha256" in capsys.readouterr().err and not (tmp_path / "other").exists()
