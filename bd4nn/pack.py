"""A database as one file that can be published, downloaded and verified: pack, unpack, pull.

**The archive.** ``pack`` writes a tar (plain, or gzip-compressed when the name ends in
``.tar.gz`` or ``.tgz``) whose first member is ``MANIFEST.json`` and whose other members are the
database's files under one top folder, ``bd4nn-db/``::

    MANIFEST.json                                  format, fingerprint, entries, files
    bd4nn-db/index.jsonl
    bd4nn-db/timings.jsonl                         (if the database has one)
    bd4nn-db/<dataset>/<arch>/benign.json | benign.safetensors
    bd4nn-db/<dataset>/<arch>/<attack>/<level>/<id>.json | <id>.safetensors

The database's files are the index, the timings, every file an index line names and every
benign parent (what ``Database.verify`` checks); lock files (``index.lock``, ``.locks/``,
``*.lock``), temporary files and anything else in the folder are left out. ``MANIFEST.json``
lists each packed file's path (relative to the database root), sha256 and size, the pack format
(``bd4nn.pack/1``), the database fingerprint (``bd4nn.db.database_fingerprint``) and the entry
count. The same database always packs to the same bytes: members sorted, mtime 0, uid/gid 0,
mode 0644, and for ``.tar.gz`` a gzip header without a name or a time. Only a database that
``Database.verify`` passes is packed; the archive is written to a temporary file and renamed.

**Unpacking trusts nothing.** ``unpack`` reads ``MANIFEST.json`` first, then refuses a member
that is not a regular file (a link, a device, a FIFO), whose path is absolute, climbs with
``..`` or lies outside ``bd4nn-db/``, that the manifest does not list or lists with another size
or sha256, or that appears twice, and a listed file that is missing. Files are extracted into a
temporary folder beside the destination (through ``tarfile``'s ``data`` filter as well), hashed,
and the database there must pass ``Database.verify`` and match the manifest's fingerprint and
entry count; only then is it renamed to the destination. A refused archive leaves nothing
behind.

**Publishing a database** (a lab with the machine that built it)::

    bd4nn verify DB                      # pack refuses a database that fails verify anyway
    bd4nn pack DB bd4nn-db.tar           # prints the archive's sha256
    huggingface-cli upload OWNER/NAME bd4nn-db.tar bd4nn-db.tar --repo-type dataset
    # or put bd4nn-db.tar on any web server

**Using a published database** (a CPU user, no training)::

    pip install "bd4nn[hub]"                              # only for hf:// sources
    bd4nn pull hf://OWNER/NAME DB                         # or: hf://OWNER/NAME/FILE@REVISION
    bd4nn pull https://example.org/bd4nn-db.tar DB --sha256 <the published sha256>
    pytest bench/ --db DB

A Hub source ``hf://OWNER/NAME[/FILE][@REVISION]`` names a *dataset* repository; ``FILE``
defaults to ``bd4nn-db.tar`` and ``REVISION`` to the default branch (pin a commit hash for a
reproducible benchmark). Giving the sha256 that ``pack`` printed checks the archive itself.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import json
import os
import secrets
import shutil
import stat
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, NamedTuple

from bd4nn.db import (
    BENIGN_RECORD,
    BENIGN_WEIGHTS,
    INDEX,
    TIMINGS,
    Database,
    DatabaseError,
    database_fingerprint,
    sha256_file,
)
from bd4nn.errors import BadInputError

__all__ = ["pack", "unpack", "pull", "FORMAT", "TOP", "MANIFEST", "HUB_FILE", "MAX_DOWNLOAD_BYTES"]

FORMAT = "bd4nn.pack/1"
TOP = "bd4nn-db"  # the one top folder of an archive's database files
MANIFEST = "MANIFEST.json"  # the archive's first member, beside TOP
HUB_FILE = "bd4nn-db.tar"  # the archive's name in a Hub dataset repo unless hf://.../FILE says
MAX_MANIFEST_BYTES = 64 * 2**20
MAX_DOWNLOAD_BYTES = 64 * 2**30  # pull's default cap on a download (a server streaming forever)
DOWNLOAD_TIMEOUT = 60.0  # seconds without a byte before a download is given up
_CHUNK = 1 << 20
_FILTER_ERRORS = (tarfile.FilterError,) if hasattr(tarfile, "FilterError") else ()  # Python >= 3.10.12
_SOURCES = "a local archive, an http(s):// address or hf://OWNER/NAME[/FILE][@REVISION]"


# ---------------------------------------------------------------------------- paths

def _path_problem(path: str) -> str | None:
    """Why ``path`` cannot name a file inside a folder (None if it can): it must be a relative
    POSIX path of plain components, without ``..``, ``.``, empty parts, backslashes or NULs."""
    if not isinstance(path, str) or not path:
        return "an empty path"
    if path.startswith("/"):
        return "an absolute path"
    if "\\" in path or "\0" in path:
        return "a path with a backslash or NUL"
    parts = path.split("/")
    if ".." in parts:
        return "a path that climbs out with '..'"
    if any(p in ("", ".") for p in parts):
        return "a path with an empty or '.' component"
    return None


def _member_path(name: str) -> str:
    """The database path of the archive member ``name`` (``bd4nn-db/<path>`` → ``<path>``), or
    BadInputError saying why the name is refused."""
    problem = _path_problem(name)
    if problem:
        raise BadInputError(f"member {name!r} has {problem}; refused")
    head, _, rest = name.partition("/")
    if head != TOP or not rest:
        raise BadInputError(f"member {name!r} lies outside the archive's top folder {TOP}/; refused")
    return rest


def _member_kind(member: tarfile.TarInfo) -> str | None:
    """What a member is if it is neither a regular file nor a folder (None if it is one)."""
    if member.isreg() or member.isdir():
        return None
    if member.issym():
        return f"a symbolic link (to {member.linkname!r})"
    if member.islnk():
        return f"a hard link (to {member.linkname!r})"
    if member.ischr() or member.isblk():
        return "a device"
    if member.isfifo():
        return "a FIFO"
    return f"a special member (tar type {member.type!r})"


def _free_dest(dest: str | os.PathLike) -> Path:
    """``dest`` if a database may be unpacked there: missing, or an empty folder."""
    path = Path(dest).expanduser()
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise BadInputError(f"{path}: exists and is not a folder; give a new folder for the database")
    if path.is_dir() and any(path.iterdir()):
        raise BadInputError(f"{path}: is not empty; give a new (or empty) folder for the database")
    return path


def _sha256_arg(sha256: str | None) -> str | None:
    """An expected sha256 as given by a user (64 hex digits, any case), lowered."""
    if sha256 is None:
        return None
    value = str(sha256).strip().lower()
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise BadInputError(f"sha256 {sha256!r}: expected 64 hexadecimal digits (what `bd4nn pack` printed)")
    return value


# ---------------------------------------------------------------------------- pack

def _packable(db_root: str | os.PathLike, progress: bool) -> tuple[Database, list[dict]]:
    """The database at ``db_root`` and its index lines, if it can be packed: it exists, has
    entries, its index ends with a complete line and ``Database.verify`` finds no problem."""
    root = Path(db_root).expanduser()
    if not (root / INDEX).is_file():
        raise BadInputError(f"{root}: holds no bd4nn database (no {INDEX}); nothing to pack")
    try:
        db = Database(root, must_exist=True)
        lines = db.entries(kept=None)
    except DatabaseError as exc:
        raise BadInputError(f"cannot pack: {exc}") from None
    if not lines:
        raise BadInputError(f"{root}: the database has no entries; build it first with `bd4nn build`")
    with open(root / INDEX, "rb") as fh:
        fh.seek(-1, os.SEEK_END)
        if fh.read(1) != b"\n":
            raise BadInputError(f"{root / INDEX}: the last line is incomplete (a build was stopped while "
                                "writing it); resume the build, then pack")
    problems = db.verify(progress=progress)
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise BadInputError(f"{root}: `bd4nn verify` finds {len(problems)} problem(s), so it is not packed: {shown}")
    return db, lines


def _database_files(root: Path, lines: Iterable[Mapping[str, Any]]) -> list[str]:
    """The paths (relative, POSIX, sorted) of the files that make up a database: the index, the
    timings if any, every file an index line names, and every benign parent's pair of files."""
    paths = {INDEX}
    if (root / TIMINGS).is_file():
        paths.add(TIMINGS)
    for line in lines:
        paths.update(info["path"] for info in (line.get("files") or {}).values() if info)
    for record in root.glob(f"*/*/{BENIGN_RECORD}"):
        folder = record.parent.relative_to(root).as_posix()
        paths.update({f"{folder}/{BENIGN_RECORD}", f"{folder}/{BENIGN_WEIGHTS}"})
    return sorted(paths)


def _file_record(root: Path, rel: str) -> dict:
    """``{path, sha256, bytes}`` of the database file ``rel``, which must be a regular file under
    ``root`` once links are resolved (a link's target is packed as a plain file)."""
    problem = _path_problem(rel)
    if problem:
        raise DatabaseError(f"{root / INDEX}: names {rel!r}, {problem}; refused")
    path = root / rel
    try:
        real = path.resolve(strict=True)
        st = os.stat(real)
    except FileNotFoundError:
        raise DatabaseError(f"{path}: is missing; cannot pack the database") from None
    base = root.resolve()
    if base not in real.parents:
        raise DatabaseError(f"{path}: resolves to {real}, outside the database {base}; refused")
    if not stat.S_ISREG(st.st_mode):
        raise DatabaseError(f"{path}: is not a regular file; refused")
    return {"path": rel, "sha256": sha256_file(real), "bytes": st.st_size}


def _check_against_index(records: list[dict], lines: Iterable[Mapping[str, Any]], root: Path) -> None:
    """Every file an index line names must still hash as that line says (a file changed after
    ``verify`` would otherwise be packed with a manifest that agrees with it, not with the index)."""
    hashes = {r["path"]: r["sha256"] for r in records}
    for line in lines:
        for info in (line.get("files") or {}).values():
            if info and hashes.get(info["path"]) != info["sha256"]:
                raise DatabaseError(f"{root / info['path']}: changed while packing (its sha256 no longer "
                                    f"matches {line['id']}'s index line); pack again when no build is running")


def _manifest(records: list[dict], lines: list[dict]) -> dict:
    """The archive's ``MANIFEST.json`` content."""
    return {
        "format": FORMAT,
        "top": TOP,
        "fingerprint": database_fingerprint(lines),
        "entries": len(lines),
        "kept": sum(1 for ln in lines if ln.get("kept")),
        "files": records,
    }


def _encode_manifest(manifest: Mapping[str, Any]) -> bytes:
    return (json.dumps(manifest, sort_keys=True, indent=1) + "\n").encode()


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    """A regular-file header that depends only on the name and size (reproducible archives)."""
    info = tarfile.TarInfo(name)
    info.size, info.type, info.mode = size, tarfile.REGTYPE, 0o644
    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
    return info


class _HashingReader:
    """A read-only file that hashes what is read through it (the bytes that go into the tar)."""

    def __init__(self, fh: IO[bytes]) -> None:
        self.fh, self.sha = fh, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.fh.read(n)
        self.sha.update(data)
        return data


@contextmanager
def _atomic_output(out: Path) -> Iterator[IO[bytes]]:
    """A binary file that becomes ``out`` (``os.replace``) only if the block ends normally."""
    out.parent.mkdir(parents=True, exist_ok=True)
    # not mkstemp: its 0600 would make a published archive unreadable to a web server
    tmp = out.parent / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_tar(raw: IO[bytes], manifest: dict, root: Path, *, gz: bool, progress: bool) -> None:
    """Write the archive to ``raw``: the manifest, then each listed file, each checked while it is
    copied against the hash the manifest gives it."""
    from bd4nn.progress import bar

    stream: IO[bytes] = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) if gz else raw
    total = sum(r["bytes"] for r in manifest["files"])
    with tarfile.open(fileobj=stream, mode="w", format=tarfile.PAX_FORMAT) as tar, \
            bar(total=total, desc="pack", unit="B", unit_scale=True, disable=not progress) as shown:
        blob = _encode_manifest(manifest)
        tar.addfile(_tar_info(MANIFEST, len(blob)), io.BytesIO(blob))
        for record in manifest["files"]:
            with open(root / record["path"], "rb") as fh:
                reader = _HashingReader(fh)
                try:
                    tar.addfile(_tar_info(f"{TOP}/{record['path']}", record["bytes"]), reader)
                except OSError as exc:  # shorter than when it was hashed
                    raise DatabaseError(f"{root / record['path']}: changed while packing ({exc}); pack "
                                        "again when no build is running") from None
            if reader.sha.hexdigest() != record["sha256"]:
                raise DatabaseError(f"{root / record['path']}: changed while packing; pack again when no "
                                    "build is running")
            shown.update(record["bytes"])
    if gz:
        stream.close()  # writes the gzip trailer; raw stays open


def _is_gzip_name(path: Path) -> bool:
    return path.name.endswith((".tar.gz", ".tgz"))


def pack(db_root: str | os.PathLike, out_tar: str | os.PathLike, *, progress: bool = False) -> dict:
    """Pack the database at ``db_root`` into the archive ``out_tar`` (module docstring: layout).

    The archive is a plain tar, or a gzip-compressed one if ``out_tar`` ends in ``.tar.gz`` or
    ``.tgz`` (safetensors weights compress little). It is reproducible: the same database gives
    the same bytes. It is written to a temporary file beside ``out_tar`` and renamed, so a reader
    never sees half an archive and an existing file is replaced only by a complete one.

    Refuses (``BadInputError``) a missing or empty database, one with an incomplete last index
    line, and one that ``Database.verify`` finds problems in; a file that changes while it is
    packed (a build still running) raises ``DatabaseError``.

    Returns ``{"archive", "sha256", "bytes", "format", "fingerprint", "entries", "kept",
    "files"}``: the archive's path, sha256 (give it to ``pull(..., sha256=)``) and size, then
    the manifest's summary (``files``: how many database files were packed).
    """
    out = Path(out_tar).expanduser()
    if out.is_dir():
        raise BadInputError(f"{out}: is a folder; give the archive's file name (e.g. {out / HUB_FILE})")
    db, lines = _packable(db_root, progress)
    records = [_file_record(db.root, rel) for rel in _database_files(db.root, lines)]
    _check_against_index(records, lines, db.root)
    manifest = _manifest(records, lines)
    with _atomic_output(out) as raw:
        _write_tar(raw, manifest, db.root, gz=_is_gzip_name(out), progress=progress)
    return {"archive": str(out), "sha256": sha256_file(out), "bytes": out.stat().st_size,
            "format": FORMAT, "fingerprint": manifest["fingerprint"], "entries": manifest["entries"],
            "kept": manifest["kept"], "files": len(records)}


# ---------------------------------------------------------------------------- unpack

def _parse_manifest(data: bytes, where: str) -> dict:
    """The manifest's content, checked field by field (``BadInputError`` naming the first fault)."""
    try:
        manifest = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadInputError(f"{where}: {MANIFEST} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        raise BadInputError(f"{where}: {MANIFEST} has format {got!r}, not {FORMAT!r} (not a bd4nn "
                            "archive, or one from a newer bd4nn: upgrade it)")
    if not isinstance(manifest.get("fingerprint"), str) or not _is_count(manifest.get("entries")):
        raise BadInputError(f"{where}: {MANIFEST} lacks a fingerprint or an entry count")
    files = manifest.get("files")
    if not isinstance(files, list) or not files:
        raise BadInputError(f"{where}: {MANIFEST} lists no files")
    seen: set[str] = set()
    for item in files:
        path = item.get("path") if isinstance(item, dict) else None
        problem = _path_problem(path) if isinstance(path, str) else "no path"
        if problem:
            raise BadInputError(f"{where}: {MANIFEST} lists {path!r}, {problem}; refused")
        sha, size = item.get("sha256"), item.get("bytes")
        if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)) \
                or not _is_count(size):
            raise BadInputError(f"{where}: {MANIFEST} gives {path!r} no valid sha256 and size")
        if path in seen:
            raise BadInputError(f"{where}: {MANIFEST} lists {path!r} twice")
        seen.add(path)
    if INDEX not in seen:
        raise BadInputError(f"{where}: {MANIFEST} does not list {INDEX}; not a bd4nn database archive")
    return manifest


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _read_manifest(tar: tarfile.TarFile, member: tarfile.TarInfo | None, where: str) -> dict:
    """The manifest, which must be the archive's first member, a regular file of sane size."""
    if member is None or member.name != MANIFEST:
        first = member.name if member is not None else "nothing"
        raise BadInputError(f"{where}: the first member is {first!r}, not {MANIFEST}; not a bd4nn "
                            "database archive (make one with `bd4nn pack`)")
    if not member.isreg() or member.size > MAX_MANIFEST_BYTES:
        raise BadInputError(f"{where}: {MANIFEST} is not a regular file of at most {MAX_MANIFEST_BYTES} bytes")
    fh = tar.extractfile(member)
    assert fh is not None  # a regular member
    return _parse_manifest(fh.read(), where)


def _is_folder_of(rel: str, paths: Iterable[str]) -> bool:
    """Whether ``rel`` is a folder above one of ``paths``."""
    return any(p.startswith(rel.rstrip("/") + "/") for p in paths)


def _extract(tar: tarfile.TarFile, member: tarfile.TarInfo, work: Path, where: str) -> None:
    """Extract one checked member under ``work``, through the ``data`` filter where it exists."""
    kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    try:
        tar.extract(member, work, **kwargs)
    except _FILTER_ERRORS as exc:  # our checks come first; this is the second line
        raise BadInputError(f"{where}: member {member.name!r} refused by tarfile ({exc})") from None
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise BadInputError(f"{where}: cannot extract member {member.name!r} ({exc}); the archive is "
                            "truncated or corrupt: download it again") from None


def _check_member(member: tarfile.TarInfo, expected: Mapping[str, dict], seen: set[str], where: str) -> str | None:
    """The database path of a file member to extract (None for a folder member to skip), or
    BadInputError: a bad name or type, a member the manifest lacks, a repeat, a size mismatch."""
    if member.isdir() and member.name.rstrip("/") == TOP:
        return None  # the top folder itself (an archive re-made with `tar` lists its folders)
    try:
        rel = _member_path(member.name)
    except BadInputError as exc:
        raise BadInputError(f"{where}: {exc}") from None
    kind = _member_kind(member)
    if kind:
        raise BadInputError(f"{where}: member {member.name!r} is {kind}; only regular files are allowed")
    if member.isdir():
        if _is_folder_of(rel, expected):
            return None
        raise BadInputError(f"{where}: folder {member.name!r} holds no file that {MANIFEST} lists; refused")
    if rel not in expected:
        raise BadInputError(f"{where}: member {member.name!r} is not listed in {MANIFEST}; refused")
    if rel in seen:
        raise BadInputError(f"{where}: member {member.name!r} appears twice; refused")
    if member.size != expected[rel]["bytes"]:
        raise BadInputError(f"{where}: member {member.name!r} is {member.size} bytes, but {MANIFEST} says "
                            f"{expected[rel]['bytes']}; refused")
    return rel


def _extract_checked(archive: Path, work: Path, progress: bool) -> dict:
    """Extract the archive's database under ``work/TOP`` checking every member against the
    manifest (names, types, sizes, hashes, none missing, none extra); the manifest."""
    from bd4nn.progress import bar

    where = str(archive)
    try:
        tar = tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BadInputError(f"{where}: not a readable tar archive ({exc})") from None
    with tar:
        try:
            manifest = _read_manifest(tar, tar.next(), where)
            expected = {f["path"]: f for f in manifest["files"]}
            seen: set[str] = set()
            with bar(total=sum(f["bytes"] for f in expected.values()), desc="unpack", unit="B",
                     unit_scale=True, disable=not progress) as shown:
                while (member := tar.next()) is not None:  # the members after the manifest
                    rel = _check_member(member, expected, seen, where)
                    if rel is None:
                        continue
                    _extract(tar, member, work, where)
                    got = sha256_file(work / TOP / rel)
                    if got != expected[rel]["sha256"]:
                        raise BadInputError(f"{where}: {TOP}/{rel}: sha256 mismatch ({MANIFEST} says "
                                            f"{expected[rel]['sha256']}, the file has {got}): the archive was "
                                            "modified or corrupted; refused")
                    seen.add(rel)
                    shown.update(member.size)
        except (tarfile.TarError, EOFError) as exc:
            raise BadInputError(f"{where}: the archive is truncated or corrupt ({exc}); download it again") from None
    missing = sorted(set(expected) - seen)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise BadInputError(f"{where}: {len(missing)} file(s) that {MANIFEST} lists are missing from the archive: "
                            f"{', '.join(missing[:3])}{more}; refused")
    return manifest


def _check_database(db_dir: Path, manifest: Mapping[str, Any], where: str, progress: bool) -> None:
    """The extracted database must match the manifest's entry count and fingerprint and pass
    ``Database.verify``."""
    try:
        lines = Database(db_dir, must_exist=True).entries(kept=None)
    except DatabaseError as exc:
        raise BadInputError(f"{where}: the archive's database cannot be read ({exc}); refused") from None
    if len(lines) != manifest["entries"]:
        raise BadInputError(f"{where}: the archive's index has {len(lines)} entries, but {MANIFEST} says "
                            f"{manifest['entries']}; refused")
    fingerprint = database_fingerprint(lines)
    if fingerprint != manifest["fingerprint"]:
        raise BadInputError(f"{where}: the archive's database has fingerprint {fingerprint}, but {MANIFEST} "
                            f"says {manifest['fingerprint']}; refused")
    problems = Database(db_dir).verify(progress=progress)
    if problems:
        first = problems[0].replace(str(db_dir), TOP)  # name the member, not the temporary folder
        raise BadInputError(f"{where}: the archive's database fails `bd4nn verify` ({len(problems)} "
                            f"problem(s), the first: {first}); refused")


def _check_archive_sha256(archive: Path, expected: str) -> None:
    got = sha256_file(archive)
    if got != expected:
        raise BadInputError(f"{archive}: sha256 is {got}, not the expected {expected}: a different or "
                            "corrupted archive; refused")


def unpack(archive: str | os.PathLike, dest: str | os.PathLike, *, sha256: str | None = None,
           progress: bool = False) -> Path:
    """Unpack a ``pack`` archive into the new database folder ``dest``; returns ``dest``.

    ``dest`` must not exist or be an empty folder (``BadInputError`` otherwise). With ``sha256``
    the archive file must have that sha256. Every member is checked against ``MANIFEST.json``
    (module docstring) while it is extracted into a temporary folder beside ``dest``; the
    extracted database must then match the manifest's fingerprint and entry count and pass
    ``Database.verify``. Only then is it renamed to ``dest``. Any fault raises ``BadInputError``
    naming the member and the problem, and leaves neither ``dest`` nor the temporary folder.
    """
    src = Path(archive).expanduser()
    if not src.is_file():
        raise BadInputError(f"{src}: no such archive file")
    out = _free_dest(dest)
    expected = _sha256_arg(sha256)
    if expected is not None:
        _check_archive_sha256(src, expected)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.{os.getpid()}.", suffix=".unpack"))
    try:
        manifest = _extract_checked(src, work, progress)
        _check_database(work / TOP, manifest, str(src), progress)
        _free_dest(out)  # again: it may have been filled meanwhile
        try:
            os.replace(work / TOP, out)  # an empty folder is replaced, a non-empty one refused
        except OSError as exc:
            raise BadInputError(f"{out}: cannot move the unpacked database there ({exc.strerror}); give a "
                                "new folder") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------- pull

class HubSource(NamedTuple):
    """A Hub dataset repo archive: ``hf://OWNER/NAME[/FILE][@REVISION]``."""

    repo_id: str
    filename: str
    revision: str | None


def _hub_source(uri: str) -> HubSource:
    """Parse ``hf://OWNER/NAME[/FILE][@REVISION]`` (a revision may hold slashes: ``refs/pr/1``)."""
    body, at, revision = uri[len("hf://"):].partition("@")
    parts = body.split("/")
    if len(parts) < 2 or not all(parts) or (at and not revision):
        raise BadInputError(f"{uri}: expected hf://OWNER/NAME[/FILE][@REVISION], "
                            f"e.g. hf://my-lab/bd4nn-small or hf://my-lab/bd4nn-small/{HUB_FILE}@main")
    filename = "/".join(parts[2:]) or HUB_FILE
    problem = _path_problem(filename)
    if problem:
        raise BadInputError(f"{uri}: the file {filename!r} is {problem}")
    return HubSource(f"{parts[0]}/{parts[1]}", filename, revision or None)


def _hub_errors(hub: Any) -> tuple[type[BaseException], ...]:
    """The exceptions a failed ``hf_hub_download`` raises (network, HTTP, missing repo/file)."""
    try:
        import huggingface_hub.errors as errors  # huggingface_hub >= 0.23
    except ImportError:
        errors = getattr(hub, "utils", None)
    names = ("HfHubHTTPError", "EntryNotFoundError", "LocalEntryNotFoundError")
    return (OSError, ValueError, *(getattr(errors, n) for n in names if isinstance(getattr(errors, n, None), type)))


def _hub_download(uri: str) -> Path:
    """Download a Hub archive through ``huggingface_hub`` (its cache); the local file."""
    src = _hub_source(uri)
    try:
        import huggingface_hub
    except ImportError:
        raise BadInputError(f'{uri}: pulling from the Hugging Face Hub needs huggingface_hub: '
                            f'pip install "bd4nn[hub]"') from None
    try:
        path = huggingface_hub.hf_hub_download(repo_id=src.repo_id, filename=src.filename,
                                               repo_type="dataset", revision=src.revision)
    except _hub_errors(huggingface_hub) as exc:
        at = f" at revision {src.revision}" if src.revision else ""
        raise BadInputError(f"{uri}: cannot download {src.filename} from the dataset repo {src.repo_id}{at} "
                            f"({type(exc).__name__}: {exc}); check the names and the network (a private "
                            "repo needs `huggingface-cli login`)") from None
    return Path(path)


def _content_length(response: Any) -> int | None:
    try:
        n = int(response.headers.get("Content-Length", ""))
    except (TypeError, ValueError):
        return None
    return n if n >= 0 else None


def _download(url: str, folder: Path, *, max_bytes: int, timeout: float, progress: bool) -> Path:
    """Stream ``url`` into a temporary file in ``folder`` (at most ``max_bytes``); its path."""
    from bd4nn.progress import bar

    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "bd4nn"}),
                                          timeout=timeout)
    except urllib.error.HTTPError as exc:
        raise BadInputError(f"{url}: HTTP {exc.code} {exc.reason}; check the address") from None
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:
        raise BadInputError(f"{url}: cannot download ({getattr(exc, 'reason', exc)}); check the address and "
                            "the network") from None
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".bd4nn-pull.{os.getpid()}.", suffix=".download")
    try:
        with response, os.fdopen(fd, "wb") as out:
            length = _content_length(response)
            if length is not None and length > max_bytes:
                raise BadInputError(f"{url}: the archive is {length} bytes, more than the cap of {max_bytes}; "
                                    "raise the cap to download it")
            got = 0
            with bar(total=length, desc="download", unit="B", unit_scale=True, disable=not progress) as shown:
                while chunk := response.read(_CHUNK):
                    got += len(chunk)
                    if got > max_bytes:
                        raise BadInputError(f"{url}: the download passed the cap of {max_bytes} bytes; "
                                            "refused (raise the cap if the archive is that large)")
                    out.write(chunk)
                    shown.update(len(chunk))
            if length is not None and got != length:
                raise BadInputError(f"{url}: the download stopped at {got} of {length} bytes; try again")
    except (OSError, http.client.HTTPException) as exc:
        Path(tmp).unlink(missing_ok=True)
        raise BadInputError(f"{url}: the download failed ({exc}); try again") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def pull(source: str | os.PathLike, dest: str | os.PathLike, *, sha256: str | None = None,
         max_bytes: int = MAX_DOWNLOAD_BYTES, timeout: float = DOWNLOAD_TIMEOUT,
         progress: bool = False) -> Path:
    """Fetch a packed database and unpack it into the new folder ``dest``; returns ``dest``.

    ``source`` is a local archive path, an ``http://`` or ``https://`` address (streamed with
    urllib into a temporary file beside ``dest``, at most ``max_bytes``, giving up after
    ``timeout`` seconds without data, and deleted after), or ``hf://OWNER/NAME[/FILE][@REVISION]``,
    a Hugging Face Hub *dataset* repo (``huggingface_hub.hf_hub_download``, into its cache;
    ``FILE`` defaults to ``HUB_FILE``; needs ``pip install "bd4nn[hub]"``). ``sha256``: the
    archive's expected sha256 (what ``pack`` printed), checked before unpacking.

    Then ``unpack`` checks everything (module docstring). ``BadInputError`` for a bad source,
    a failed download (HTTP status, network, cap), a sha256 mismatch or a refused archive; the
    destination is left as it was.
    """
    expected = _sha256_arg(sha256)
    out = _free_dest(dest)  # before any download
    text = os.fspath(source)
    if text.startswith("hf://"):
        return unpack(_hub_download(text), out, sha256=expected, progress=progress)
    if text.startswith(("http://", "https://")):
        if max_bytes <= 0:
            raise BadInputError(f"max_bytes must be > 0, got {max_bytes}")
        out.parent.mkdir(parents=True, exist_ok=True)
        archive = _download(text, out.parent, max_bytes=max_bytes, timeout=timeout, progress=progress)
        try:
            return unpack(archive, out, sha256=expected, progress=progress)
        finally:
            archive.unlink(missing_ok=True)
    if "://" in text:
        raise BadInputError(f"{text}: unknown source; give {_SOURCES}")
    if not Path(text).expanduser().is_file():
        raise BadInputError(f"{text}: no such archive file; give {_SOURCES}")
    return unpack(text, out, sha256=expected, progress=progress)
