"""The database on disk: layout, index, safetensors deltas, hashes, load and verify.

Layout (DESIGN.md "The database on disk")::

    <db>/index.jsonl                                         one JSON line per entry
    <db>/index.lock                                          flock'ed around every append
    <db>/<dataset>/<arch>/benign.safetensors                 the benign parent (full state_dict)
    <db>/<dataset>/<arch>/benign.json                        its BenignRecord + the weights' sha256
    <db>/<dataset>/<arch>/<attack>/<level>/<id>.safetensors  delta vs the parent + trigger tensors
    <db>/<dataset>/<arch>/<attack>/<level>/<id>.json         the defect label (DefectLabel)

An entry id is ``<dataset>-<arch>-<attack>-<level>-<candidate:02d>``
(``cifar10-vgg13-badnets-narrow-03``).

**Benign parent.** ``benign.safetensors`` holds the whole state_dict. ``benign.json`` holds the
``BenignRecord`` fields plus ``weights`` = ``{file, sha256, bytes}`` of the safetensors file and
``content_sha256``, the sha256 of the JSON's own canonical form (sorted keys, compact, without
that key), so an edited ``benign.json`` is caught even before any entry refers to it. The
benign files are written safetensors first, json last; ``has_benign`` looks for both.

**Entry weights (delta).** For every state_dict tensor the infected model is compared with the
parent *bitwise* (integer views of the raw bytes, so NaN payloads and ``-0.0`` vs ``0.0`` count
as differences and nothing is lost). Identical tensors store nothing; a changed tensor stores the
cheapest of

* ``delta.<name>.full``                                the whole tensor;
* ``delta.<name>.rows`` + ``delta.<name>.rowidx``      the changed rows along dim 0 (+ int64 index);
* ``delta.<name>.values`` + ``delta.<name>.flatidx``   the changed elements (+ int64 flat index).

The trigger tensors (``trigger.mask``, ``trigger.pattern``) sit in the same file. Its
safetensors metadata holds ``format`` (``bd4nn.delta/1``), the entry ``id`` and the parent's
sha256; loading checks all three. The parent must be stored in the database before an entry is
saved; ``save_entry`` reads it from disk (hash-checked), checks that the caller's
``parent_state`` is that parent bit for bit, encodes the delta against it and re-applies the
delta in memory before writing anything, so a written entry always rebuilds the exact model.

**Rejected candidates** (ASR.Cor ≤ 0.5) get a label JSON and an index line with
``"kept": false`` but *no* safetensors file (``files.weights`` is null, ``bytes`` is 0); their
trigger is not stored (the label's trigger spec describes it). ``load_entry`` refuses them with
a clear message; ``load_label`` reads any entry's label.

**Index line.** ``format``, ``id``, ``dataset``, ``arch``, ``width``, ``attack``, ``level``,
``candidate``, ``kept``, ``target``, ``seed``, ``ca``, ``asr``, ``asr_cor``, ``ca_cor``,
``ca_cor_r``, ``asr_cor_r``, ``benign_ca``, ``n_fault`` (= |S_fault|), ``bytes`` (the entry's
safetensors file; 0 when rejected), ``full_bytes`` (a full checkpoint of the same model = the
parent's safetensors file) and ``files``: ``{label, weights, parent, parent_record}`` each
``{path (relative to the db root, POSIX), sha256, bytes}`` (``weights`` null when rejected).
No timestamps, so the same build gives the same index lines.

**Integrity.** Every load reads each file once into memory, hashes those bytes and parses the
same bytes (no check-then-reopen race); ``load_entry`` checks the label, the delta and both
parent files against the index line; a mismatch, a missing file, an unknown id, a label naming
a layer the model lacks, a delta key naming an unknown tensor or the wrong shape all raise
``DatabaseError`` naming the file and what to do. Only safetensors and JSON are ever read: no
pickle (an infected model is untrusted by definition).

**Atomicity and concurrency.** Every file is written to a temporary name in its own directory,
flushed, fsynced and ``os.replace``d into place; the index line is appended (and fsynced) only
after the entry's files are in place, so a kill at any moment leaves no index line pointing at a
partial file (at worst an orphan file that a resumed build overwrites). ``save_entry`` holds an
``fcntl.flock`` on ``index.lock`` from the duplicate check to the append, so parallel shards on
one database never interleave lines. Reading the index ignores a truncated (unparseable) last
line with a warning — a kill during an append — and the next append cuts it off first.
A temporary file carries its writer's pid and host (``.<name>.<pid>@<host>.<random>.tmp``);
``sweep_orphans`` (run by every build) deletes those of this host whose writer is no longer
alive, and never another live build's, also one on another node of a cluster sharing the
folder (``--ray``), whose pid means nothing here: those are deleted only once a day old. Two builds into one database each claim a candidate (``claim``: a non-blocking
``flock`` on ``.locks/<id>.lock``) before building it, so neither builds what the other is
building, and both finish.

**Reproducibility.** No hashed file holds a wall-clock figure: the labels, ``benign.json`` and
the index depend only on the profile, the code and the thread count, so the same profile built
twice — or killed at random points and resumed — gives byte-identical files. Timings go to
``timings.jsonl`` (one JSON line per benign training or candidate, appended, never hashed;
``Database.timings`` reads it).
"""

from __future__ import annotations

import copy
import difflib
import fcntl
import hashlib
import json
import math
import os
import re
import socket
import stat
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bd4nn.errors import UserError

__all__ = [
    "DatabaseError",
    "DatabaseWarning",
    "BenignRecord",
    "DefectLabel",
    "Database",
    "entry_id",
    "benign_timing_key",
    "encode_delta",
    "apply_delta",
    "sha256_bytes",
    "sha256_file",
    "weights_fingerprint",
    "database_fingerprint",
]

INDEX = "index.jsonl"
LOCK = "index.lock"
TIMINGS = "timings.jsonl"  # wall-clock figures: outside every hash (issue 12, class 5)
CLAIMS = ".locks"  # one flock'ed file per candidate being built (issue 12, class 6)
LEGACY_LABEL_FIELDS = ("seconds",)  # written by bd4nn before timings.jsonl; read and ignored
BENIGN_WEIGHTS = "benign.safetensors"
BENIGN_RECORD = "benign.json"
FORMAT = 1
DELTA_FORMAT = "bd4nn.delta/1"
REBUILD = "rebuild with `bd4nn build` or restore it"

_NAME = re.compile(r"^[A-Za-z0-9_+][A-Za-z0-9_.+-]*$")  # one path component, no '..', no '/'
_DELTA_KINDS = ("full", "rows", "rowidx", "values", "flatidx")
_INDEX_FILTERS = ("id", "dataset", "arch", "width", "attack", "level", "candidate", "target", "seed")



@contextmanager
def file_lock(path: Path, *, wait: bool = True) -> Iterator[bool]:
    """An exclusive ``flock`` on ``path`` (created if missing), released on exit or when the
    process dies: yields True while held, or False at once if ``wait`` is off and another process
    holds it (``wait=True`` blocks until it is free). Candidate claims and the build's parent
    locks both use it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)

class DatabaseError(UserError):
    """A database file is missing, corrupt, modified or inconsistent (the message names it)."""


class DatabaseWarning(UserWarning):
    """Something recoverable in the database (a truncated last index line)."""


# ------------------------------------------------------------------------------ records


def entry_id(dataset: str, arch: str, attack: str, level: str, candidate: int) -> str:
    """``cifar10-vgg13-badnets-narrow-03``."""
    return f"{dataset}-{arch}-{attack}-{level}-{int(candidate):02d}"


def benign_timing_key(dataset: str, arch: str) -> str:
    """The ``timings.jsonl`` key of a benign parent's training time."""
    return f"benign:{dataset}/{arch}"


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_finite(v: Any) -> bool:
    return _is_number(v) and math.isfinite(v)


# Bounds of what a stored record may ask the loader to build: a forged benign.json must not make
# it allocate terabytes (issue 12, class 4). Profiles accept widths up to 64 as well.
MAX_WIDTH = 64.0
MAX_CLASSES = 100_000
RC_SUM_TOLERANCE = 1e-6


@dataclass
class BenignRecord:
    """What ``benign.json`` says about a benign parent (besides the weights' hash)."""

    dataset: str
    arch: str
    width: float
    num_classes: int
    mean: list[float]
    std: list[float]
    seed: int
    ca: float | None
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"] = [float(v) for v in self.mean]
        d["std"] = [float(v) for v in self.std]
        d["width"] = float(self.width)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "benign record") -> "BenignRecord":
        """Build from a ``benign.json`` dict (extra bookkeeping keys are ignored)."""
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in data]
        if missing:
            raise DatabaseError(f"{source}: missing fields {missing}; {REBUILD}")
        kw = {n: data[n] for n in names}
        problems = []
        if not isinstance(kw["dataset"], str) or not isinstance(kw["arch"], str):
            problems.append("dataset/arch must be strings")
        if not _is_finite(kw["width"]) or not 0 < kw["width"] <= MAX_WIDTH:
            problems.append(f"width must be a number in (0, {MAX_WIDTH:g}], got {kw['width']!r}")
        if (not isinstance(kw["num_classes"], int) or isinstance(kw["num_classes"], bool)
                or not 2 <= kw["num_classes"] <= MAX_CLASSES):
            problems.append(f"num_classes must be an integer in [2, {MAX_CLASSES}], got {kw['num_classes']!r}")
        for key in ("mean", "std"):
            if (not isinstance(kw[key], list) or len(kw[key]) != 3
                    or not all(_is_finite(v) and (key == "mean" or v > 0) for v in kw[key])):
                problems.append(f"{key} must be a list of 3 finite numbers{' > 0' if key == 'std' else ''}, "
                                f"got {kw[key]!r}")
        if not isinstance(kw["seed"], int) or isinstance(kw["seed"], bool):
            problems.append(f"seed must be an integer, got {kw['seed']!r}")
        if kw["ca"] is not None and not (_is_finite(kw["ca"]) and 0 <= kw["ca"] <= 1):
            problems.append(f"ca must be a number in [0, 1] or null, got {kw['ca']!r}")
        if not isinstance(kw["config"], dict):
            problems.append("config must be an object")
        if problems:
            raise DatabaseError(f"{source}: {'; '.join(problems)}; {REBUILD}")
        return cls(**kw)


@dataclass
class DefectLabel:
    """The ground truth of one infected model (METHODS.md §1 "defect label").

    ``s_fault`` is a selection ``{layer: sorted channels}``; ``rc[layer][k]`` is the relative
    contribution of channel ``s_fault[layer][k]`` (RC sums to 1 over all fault neurons).
    """

    id: str
    dataset: str
    arch: str
    width: float
    attack: str
    level: str
    candidate: int
    kept: bool
    s_fault: dict[str, list[int]]
    rc: dict[str, list[float]]
    trigger: dict[str, Any]
    target: int
    seed: int
    recipe: dict[str, Any]
    ca: float | None
    asr: float | None
    asr_cor: float | None
    ca_cor: float | None
    ca_cor_r: float | None
    asr_cor_r: float | None
    benign_ca: float | None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_fault(self) -> int:
        return sum(len(c) for c in self.s_fault.values())

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["format"] = FORMAT
        return d

    def to_json(self) -> str:
        """Sorted keys, indent 1, floats as Python writes them (round-trip exact)."""
        return json.dumps(self.to_dict(), sort_keys=True, indent=1) + "\n"

    @classmethod
    def from_json(cls, data: str | bytes | Mapping[str, Any], *, source: str = "defect label") -> "DefectLabel":
        """Parse and validate a label (JSON text or an already-parsed dict).

        Raises ``DatabaseError`` naming ``source`` for invalid JSON, a missing or unknown field,
        a field of the wrong type, unsorted/duplicate channels, or RC not aligned with S_fault.
        """
        if isinstance(data, (str, bytes)):
            try:
                data = json.loads(data)
            except (ValueError, UnicodeDecodeError) as exc:
                raise DatabaseError(f"{source}: not valid JSON ({exc}); {REBUILD}") from None
        if not isinstance(data, Mapping):
            raise DatabaseError(f"{source}: a defect label must be a JSON object; {REBUILD}")
        data = dict(data)
        for key in LEGACY_LABEL_FIELDS:
            data.pop(key, None)
        fmt = data.pop("format", FORMAT)
        if fmt != FORMAT:
            raise DatabaseError(
                f"{source}: label format {fmt!r}, this bd4nn reads format {FORMAT}; "
                "use the bd4nn version that wrote the database or rebuild it"
            )
        names = [f.name for f in fields(cls)]
        required = [n for n in names if n != "extra"]
        missing = [n for n in required if n not in data]
        unknown = sorted(set(data) - set(names))
        if missing or unknown:
            parts = ([f"missing fields {missing}"] if missing else []) + (
                [f"unknown fields {unknown}"] if unknown else [])
            raise DatabaseError(f"{source}: {', '.join(parts)}; {REBUILD}")
        problems: list[str] = []
        for key in ("id", "dataset", "arch", "attack", "level"):
            if not isinstance(data[key], str) or not data[key]:
                problems.append(f"{key} must be a non-empty string")
        for key in ("candidate", "target", "seed"):
            if not isinstance(data[key], int) or isinstance(data[key], bool):
                problems.append(f"{key} must be an integer, got {data[key]!r}")
        if not isinstance(data["kept"], bool):
            problems.append(f"kept must be true or false, got {data['kept']!r}")
        if not _is_number(data["width"]) or data["width"] <= 0:
            problems.append(f"width must be a positive number, got {data['width']!r}")
        for key, low in (("ca", 0), ("asr", 0), ("benign_ca", 0),
                         ("asr_cor", -1), ("ca_cor", -1), ("ca_cor_r", -1), ("asr_cor_r", -1)):
            if data[key] is not None and not (_is_finite(data[key]) and low <= data[key] <= 1):
                problems.append(f"{key} must be a number in [{low}, 1] or null, got {data[key]!r}")
        if isinstance(data["target"], int) and data["target"] < 0:
            problems.append(f"target must be >= 0, got {data['target']!r}")
        if isinstance(data["candidate"], int) and data["candidate"] < 0:
            problems.append(f"candidate must be >= 0, got {data['candidate']!r}")
        for key in ("trigger", "recipe", "extra"):
            if key in data and not isinstance(data[key], dict):
                problems.append(f"{key} must be an object")
        s_fault, rc = data["s_fault"], data["rc"]
        if not isinstance(s_fault, dict) or not isinstance(rc, dict):
            problems.append("s_fault and rc must be objects {layer: list}")
        else:
            for layer, chans in s_fault.items():
                if not isinstance(chans, list) or not all(
                        isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in chans):
                    problems.append(f"s_fault[{layer!r}] must be a list of channel indices")
                elif any(a >= b for a, b in zip(chans, chans[1:])):
                    problems.append(f"s_fault[{layer!r}] must be sorted ascending without duplicates")
            if set(rc) != set(s_fault):
                problems.append(f"rc layers {sorted(rc)} differ from s_fault layers {sorted(s_fault)}")
            else:
                total, ok = 0.0, True
                for layer, weights in rc.items():
                    if not isinstance(weights, list) or not all(_is_finite(w) and w >= 0 for w in weights):
                        problems.append(f"rc[{layer!r}] must be a list of finite numbers >= 0")
                        ok = False
                    elif isinstance(s_fault[layer], list) and len(weights) != len(s_fault[layer]):
                        problems.append(f"rc[{layer!r}] has {len(weights)} weights for "
                                        f"{len(s_fault[layer])} fault neurons")
                    else:
                        total += math.fsum(weights)
                if ok and rc and not math.isclose(total, 1.0, rel_tol=0, abs_tol=RC_SUM_TOLERANCE):
                    problems.append(f"rc must sum to 1, sums to {total!r}")
        if problems:
            raise DatabaseError(f"{source}: {'; '.join(problems)}; {REBUILD}")
        return cls(**{n: data[n] for n in names if n in data})


# ------------------------------------------------------------------------------ files


FINGERPRINT_CHARS = 16


def weights_fingerprint(line: Mapping[str, Any]) -> str | None:
    """What decides an entry's arithmetic, as one short hash: the sha256 of its weights file (the
    delta and the trigger) and of its parent's weights, from its index line. Labels are left out:
    they name the device and thread count a build ran on, which do not change a model that came
    out bit-identical. None for a rejected entry (no weights)."""
    files = line.get("files") or {}
    weights, parent = files.get("weights"), files.get("parent")
    if not weights or not parent:
        return None
    return sha256_bytes(f"{weights['sha256']} {parent['sha256']}".encode())[:FINGERPRINT_CHARS]


def database_fingerprint(lines: Iterable[Mapping[str, Any]]) -> str:
    """One hash over a database's weight hashes (index lines, in id order): every entry's weights
    file, or none for a rejected one, and its parent's. Two databases with the same fingerprint
    hold bit-identical models under the same ids."""
    def part(ln: Mapping[str, Any]) -> str:
        files = ln.get("files") or {}
        return " ".join([str(ln.get("id"))] + [(files.get(k) or {}).get("sha256", "-") for k in ("weights", "parent")])

    return sha256_bytes("\n".join(sorted(part(ln) for ln in lines)).encode())[:FINGERPRINT_CHARS]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _under_root(path: Path, root: Path) -> None:
    """Refuse a path that, once symlinks are resolved, leaves the database root (issue 12: names
    are never paths, and a linked folder inside the database must not carry writes out of it)."""
    base, real = Path(root).resolve(), Path(path).resolve()
    if real != base and base not in real.parents:
        raise DatabaseError(f"{path}: resolves to {real}, outside the database {base}; refused")


def _atomic_write(path: Path, data: bytes, root: Path) -> None:
    """Write ``data`` to a temp file beside ``path``, fsync it, then ``os.replace`` it; ``path``
    must stay under ``root`` once symlinks are resolved."""
    _under_root(path, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    _under_root(path, root)  # again: a folder created through a link
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}@{HOST}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# A temp file's writer: pid, and host (absent in names written before builds ran on clusters).
_TMP_WRITER = re.compile(r"\.(\d+)(?:@([A-Za-z0-9_-]+))?\.[A-Za-z0-9_]+\.tmp$")
HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"  # this node, as temp names carry it
FOREIGN_ORPHAN_AGE_S = 86_400  # another node's temp file older than this is an orphan (no write lasts a day)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


# Size caps of the files whose size no index line records (a JSON record, the index itself).
MAX_RECORD_BYTES = 16 * 2**20
MAX_INDEX_BYTES = 1 * 2**30


def _read(path: Path, what: str, *, root: Path | None = None, max_bytes: int | None = None) -> bytes:
    """The bytes of a database file, read safely (issue 12, class 3): it must be a *regular*
    file (a FIFO or a device is refused before it is opened, so nothing blocks or reads
    forever), under ``root`` once symlinks are resolved (no escape through a link), and at most
    ``max_bytes`` long (the size the index records, or a cap)."""
    try:
        real = path.resolve(strict=True)
    except FileNotFoundError:
        raise DatabaseError(f"{path}: {what} is missing; {REBUILD}") from None
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise DatabaseError(f"{path}: cannot resolve {what} ({exc}); {REBUILD}") from None
    if root is not None:
        base = Path(root).resolve()
        if real != base and base not in real.parents:
            raise DatabaseError(f"{path}: {what} points outside the database ({real}); refused; {REBUILD}")
    try:
        st = os.stat(real)
        if not stat.S_ISREG(st.st_mode):
            raise DatabaseError(f"{path}: {what} is not a regular file (a FIFO, device or folder); "
                                f"refused; {REBUILD}")
        if max_bytes is not None and st.st_size > max_bytes:
            raise DatabaseError(f"{path}: {what} is {st.st_size} bytes, more than the {max_bytes} "
                                f"expected; {REBUILD}")
        with open(real, "rb") as fh:
            data = fh.read(max_bytes + 1 if max_bytes is not None else -1)
    except OSError as exc:
        raise DatabaseError(f"{path}: cannot read {what} ({exc.strerror}); {REBUILD}") from None
    if max_bytes is not None and len(data) > max_bytes:
        raise DatabaseError(f"{path}: {what} grew past the {max_bytes} bytes expected; {REBUILD}")
    return data


def _size(info: dict) -> int | None:
    """The byte count an index line records for a file (None if it records none)."""
    n = info.get("bytes")
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else None


def _check_hash(path: Path, data: bytes, expected: str | None) -> str:
    got = sha256_bytes(data)
    if expected is not None and got != expected:
        raise DatabaseError(
            f"{path}: sha256 mismatch (expected {expected}, got {got}): the file was modified or "
            f"is corrupt; {REBUILD}"
        )
    return got


_META_KEY = "bd4nn"


def _st_save(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    from safetensors.torch import save

    # safetensors writes a metadata map in an order that varies between processes (a Rust
    # HashMap), so the same content could hash differently; one key holding canonical JSON
    # keeps the file bytes — and so the sha256 in the index — reproducible.
    packed = {_META_KEY: _canonical(metadata).decode()} if metadata else None
    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=packed)


def _st_load(data: bytes, path: Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata from safetensors bytes (never a pickle)."""
    from safetensors.torch import load

    try:
        tensors = load(data)
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + n])
    except Exception as exc:  # safetensors raises its own error types
        raise DatabaseError(f"{path}: not a valid safetensors {what} ({exc}); {REBUILD}") from None
    meta = dict(header.get("__metadata__") or {})
    if _META_KEY in meta:
        try:
            meta = json.loads(meta[_META_KEY])
        except json.JSONDecodeError:
            raise DatabaseError(f"{path}: unreadable metadata in the {what}; {REBUILD}") from None
    return tensors, meta


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _parse_json(data: bytes, path: Path, what: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DatabaseError(f"{path}: {what} is not valid JSON ({exc}); {REBUILD}") from None


def _component(value: str, what: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value) or ".." in value:
        raise ValueError(f"{what} {value!r} cannot be a directory name (letters, digits, _ . + - only)")
    return value


# ------------------------------------------------------------------------------ deltas


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of ``t`` as (numel, itemsize) uint8 (bitwise comparison, NaN-safe)."""
    t = t.detach().contiguous().reshape(-1)
    return t.view(torch.uint8).reshape(t.numel(), t.element_size())


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (``torch.equal`` treats NaN ≠ NaN and -0.0 = 0.0)."""
    return a.dtype == b.dtype and a.shape == b.shape and bool((_bits(a) == _bits(b)).all())


def encode_delta(
    state: Mapping[str, torch.Tensor], parent: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The ``delta.*`` tensors turning ``parent`` into ``state`` (cheapest encoding per tensor).

    Both must have the same keys, shapes and dtypes (the same architecture); raises
    ``ValueError`` otherwise.
    """
    if set(state) != set(parent):
        extra, missing = sorted(set(state) - set(parent)), sorted(set(parent) - set(state))
        raise ValueError(f"model and parent differ in tensors: only in model {extra}, only in parent {missing}")
    out: dict[str, torch.Tensor] = {}
    for name, new in state.items():
        old = parent[name]
        new = new.detach().cpu()
        old = old.detach().cpu()
        if new.shape != old.shape or new.dtype != old.dtype:
            raise ValueError(
                f"tensor {name}: model has {new.dtype} {tuple(new.shape)}, parent has "
                f"{old.dtype} {tuple(old.shape)}; a delta needs the same architecture"
            )
        if new.numel() == 0:
            continue
        diff = (_bits(new) != _bits(old)).any(dim=1)
        changed = int(diff.sum())
        if changed == 0:
            continue
        es, n = new.element_size(), new.numel()
        options = [("full", n * es)]
        if new.ndim >= 1:
            rowdiff = diff.view(new.shape[0], -1).any(dim=1)
            k = int(rowdiff.sum())
            options.append(("rows", k * (n // new.shape[0]) * es + 8 * k))
        options.append(("values", changed * (es + 8)))
        kind = min(options, key=lambda o: o[1])[0]  # ties: the earlier (simpler) encoding
        if kind == "full":
            out[f"delta.{name}.full"] = new.clone().contiguous()
        elif kind == "rows":
            idx = torch.nonzero(rowdiff).flatten().to(torch.int64)
            out[f"delta.{name}.rowidx"] = idx
            out[f"delta.{name}.rows"] = new[idx].clone().contiguous()
        else:
            idx = torch.nonzero(diff).flatten().to(torch.int64)
            out[f"delta.{name}.flatidx"] = idx
            out[f"delta.{name}.values"] = new.contiguous().reshape(-1)[idx].clone()
    return out


def apply_delta(
    parent: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor], *, source: str = "delta"
) -> dict[str, torch.Tensor]:
    """A new state dict: ``parent`` with the ``delta.*`` tensors applied (``parent`` untouched).

    Raises ``DatabaseError`` (naming ``source``) for a key naming an unknown tensor or kind, an
    unpaired rows/values tensor, a wrong shape or dtype, or an out-of-range index.
    """
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in sorted(delta.items()):
        if not key.startswith("delta.") or key.count(".") < 2:
            raise DatabaseError(f"{source}: unexpected tensor {key!r}; {REBUILD}")
        name, kind = key[len("delta."):].rsplit(".", 1)
        if kind not in _DELTA_KINDS:
            raise DatabaseError(f"{source}: unknown delta kind in {key!r}; {REBUILD}")
        if name not in parent:
            close = difflib.get_close_matches(name, list(parent), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise DatabaseError(
                f"{source}: delta names tensor {name!r} that the model does not have{hint}; the entry "
                f"does not fit this architecture; {REBUILD}"
            )
        groups.setdefault(name, {})[kind] = t
    out = dict(parent)

    def bad(name: str, msg: str) -> DatabaseError:
        return DatabaseError(f"{source}: delta of {name!r}: {msg}; {REBUILD}")

    for name, parts in sorted(groups.items()):  # sorted: the same error for the same file, every time
        base = parent[name]
        kinds = set(parts)
        if kinds not in ({"full"}, {"rows", "rowidx"}, {"values", "flatidx"}):
            raise bad(name, f"inconsistent parts {sorted(kinds)}")
        if "full" in parts:
            t = parts["full"]
            if t.shape != base.shape or t.dtype != base.dtype:
                raise bad(name, f"{t.dtype} {tuple(t.shape)} stored, model has {base.dtype} {tuple(base.shape)}")
            out[name] = t.clone()
            continue
        data_key, idx_key = ("rows", "rowidx") if "rows" in parts else ("values", "flatidx")
        idx, vals = parts[idx_key], parts[data_key]
        if idx.dtype != torch.int64 or idx.ndim != 1:
            raise bad(name, f"{idx_key} must be a 1-D int64 tensor")
        if vals.dtype != base.dtype:
            raise bad(name, f"{vals.dtype} stored, model has {base.dtype}")
        if data_key == "rows":
            if base.ndim == 0:
                raise bad(name, "rows of a 0-d tensor")
            limit, want = base.shape[0], (len(idx), *base.shape[1:])
        else:
            limit, want = base.numel(), (len(idx),)
        if tuple(vals.shape) != tuple(want):
            raise bad(name, f"{data_key} has shape {tuple(vals.shape)}, expected {tuple(want)} "
                            f"for a model tensor of shape {tuple(base.shape)}")
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= limit):
            raise bad(name, f"{idx_key} out of range [0, {limit})")
        t = base.detach().clone().contiguous()
        if data_key == "rows":
            t[idx] = vals
        else:
            t.view(-1)[idx] = vals
        out[name] = t
    return out


# ------------------------------------------------------------------------------ the database


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


class Database:
    """A bd4nn database rooted at ``root`` (created lazily, on the first write)."""

    def __init__(self, root: str | os.PathLike, *, must_exist: bool = False) -> None:
        """``must_exist``: the folder must hold a database already (its ``index.jsonl``), as every
        reader needs; a writer (``bd4nn build``) creates it. A path to a file is never a database."""
        self.root = Path(root).expanduser()
        self._index_cache: tuple[tuple[int, int, int], dict[str, dict]] | None = None
        self._parent_memo: dict | None = None  # set only while verify() runs
        if self.root.exists() and not self.root.is_dir():
            raise DatabaseError(f"{self.root}: is a file, not a database folder; give --db a folder")
        if must_exist and not (self.root / INDEX).is_file():
            what = "does not exist" if not self.root.exists() else "holds no bd4nn database (no index.jsonl)"
            raise DatabaseError(f"{self.root}: {what}; build one with `bd4nn build --db {self.root}`")

    def __repr__(self) -> str:
        return f"Database({str(self.root)!r})"

    # ---------------------------------------------------------------- paths
    def arch_dir(self, dataset: str, arch: str) -> Path:
        return self.root / _component(dataset, "dataset") / _component(arch, "arch")

    def benign_path(self, dataset: str, arch: str) -> Path:
        """``<db>/<dataset>/<arch>/benign.safetensors`` (its record is ``benign.json`` beside it)."""
        return self.arch_dir(dataset, arch) / BENIGN_WEIGHTS

    def benign_record_path(self, dataset: str, arch: str) -> Path:
        return self.arch_dir(dataset, arch) / BENIGN_RECORD

    def entry_dir(self, dataset: str, arch: str, attack: str, level: str) -> Path:
        return self.arch_dir(dataset, arch) / _component(attack, "attack") / _component(level, "level")

    def _rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def _abs(self, rel: str, where: str) -> Path:
        p = Path(rel)
        if p.is_absolute() or ".." in p.parts or not rel:
            raise DatabaseError(f"{self.root / INDEX}: {where}: bad path {rel!r}; {REBUILD}")
        return self.root / p

    # ---------------------------------------------------------------- benign parents
    def has_benign(self, dataset: str, arch: str) -> bool:
        return self.benign_record_path(dataset, arch).is_file() and self.benign_path(dataset, arch).is_file()

    def save_benign(self, model: nn.Module, record: BenignRecord, *, overwrite: bool = False) -> None:
        """Store a benign parent: the full state_dict and ``benign.json`` (written last)."""
        if self.has_benign(record.dataset, record.arch) and not overwrite:
            raise DatabaseError(
                f"{self.benign_record_path(record.dataset, record.arch)}: a benign parent is already "
                "stored; pass overwrite=True to replace it (entries built on the old one will then "
                "fail their hash checks)"
            )
        BenignRecord.from_dict(record.to_dict(), source=f"benign record {record.dataset}/{record.arch}")
        blob = _st_save(_state(model), {"format": "bd4nn.benign/1", "dataset": record.dataset,
                                        "arch": record.arch})
        wpath = self.benign_path(record.dataset, record.arch)
        doc = record.to_dict()
        doc["format"] = FORMAT
        doc["weights"] = {"file": BENIGN_WEIGHTS, "sha256": sha256_bytes(blob), "bytes": len(blob)}
        doc["content_sha256"] = sha256_bytes(_canonical(doc))
        _atomic_write(wpath, blob, self.root)
        _atomic_write(self.benign_record_path(record.dataset, record.arch),
                      (json.dumps(doc, sort_keys=True, indent=1) + "\n").encode(), self.root)

    def _read_benign_record(self, dataset: str, arch: str, *, verify: bool,
                            expected_sha: str | None = None) -> tuple[BenignRecord, dict, bytes]:
        rpath = self.benign_record_path(dataset, arch)
        if not rpath.is_file() and not self.arch_dir(dataset, arch).is_dir():
            raise DatabaseError(
                f"{rpath}: no benign parent for {dataset}/{arch} in {self.root}; "
                f"build it with `bd4nn build` (dataset {dataset}, arch {arch})"
            )
        raw = _read(rpath, "the benign record", root=self.root, max_bytes=MAX_RECORD_BYTES)
        if verify:
            _check_hash(rpath, raw, expected_sha)
        doc = _parse_json(raw, rpath, "the benign record")
        if not isinstance(doc, dict):
            raise DatabaseError(f"{rpath}: the benign record must be a JSON object; {REBUILD}")
        if verify:
            body = {k: v for k, v in doc.items() if k != "content_sha256"}
            got = sha256_bytes(_canonical(body))
            if doc.get("content_sha256") != got:
                raise DatabaseError(
                    f"{rpath}: sha256 mismatch (expected {doc.get('content_sha256')}, got {got}): the "
                    f"file was modified or is corrupt; {REBUILD}"
                )
        weights = doc.get("weights")
        if not isinstance(weights, dict) or not isinstance(weights.get("sha256"), str):
            raise DatabaseError(f"{rpath}: no weights hash in the benign record; {REBUILD}")
        record = BenignRecord.from_dict(doc, source=str(rpath))
        if (record.dataset, record.arch) != (dataset, arch):
            raise DatabaseError(
                f"{rpath}: the record says {record.dataset}/{record.arch}, the path says "
                f"{dataset}/{arch}; {REBUILD}"
            )
        return record, weights, raw

    def _read_benign_state(self, dataset: str, arch: str, weights: dict, *, verify: bool,
                           expected_sha: str | None = None) -> tuple[dict[str, torch.Tensor], bytes]:
        memo_key = (dataset, arch, weights.get("sha256"), expected_sha, verify)
        if self._parent_memo is not None and memo_key in self._parent_memo:
            return self._parent_memo[memo_key]  # verify: each parent is read and hashed once
        got = self._read_benign_state_uncached(dataset, arch, weights, verify=verify, expected_sha=expected_sha)
        if self._parent_memo is not None:
            self._parent_memo[memo_key] = got
        return got

    def _read_benign_state_uncached(self, dataset: str, arch: str, weights: dict, *, verify: bool,
                                    expected_sha: str | None) -> tuple[dict[str, torch.Tensor], bytes]:
        wpath = self.benign_path(dataset, arch)
        blob = _read(wpath, "the benign parent's weights", root=self.root,
                     max_bytes=weights.get("bytes") if isinstance(weights.get("bytes"), int) else None)
        if verify:
            _check_hash(wpath, blob, weights["sha256"])
            if expected_sha is not None:
                _check_hash(wpath, blob, expected_sha)
        state, _ = _st_load(blob, wpath, "benign checkpoint")
        return state, blob

    def _build(self, record: BenignRecord, state: Mapping[str, torch.Tensor], path: Path) -> nn.Module:
        from bd4nn.models import get_model

        _check_finite(state, path, "the model")
        try:
            # seed: build without touching the caller's global RNG (the weights are overwritten)
            model = get_model(record.arch, record.num_classes, record.width,
                              mean=tuple(record.mean), std=tuple(record.std), seed=record.seed)
        except (KeyError, ValueError) as exc:
            raise DatabaseError(f"{path}: cannot build {record.arch}: {exc}") from None
        try:
            model.load_state_dict(dict(state), strict=True)
        except RuntimeError as exc:
            msg = " ".join(str(exc).split())
            raise DatabaseError(
                f"{path}: the weights do not fit {record.arch} (width {record.width:g}, "
                f"{record.num_classes} classes): {msg[:500]}; {REBUILD}"
            ) from None
        return model.eval()

    def benign_record(self, dataset: str, arch: str, *, verify: bool = True) -> BenignRecord:
        """The benign parent's record (CA, seed, config) without reading its weights."""
        return self._read_benign_record(dataset, arch, verify=verify)[0]

    def load_benign(self, dataset: str, arch: str, *, verify: bool = True) -> tuple[nn.Module, BenignRecord]:
        """The benign parent (eval mode, CPU) and its record; hashes checked unless ``verify=False``."""
        record, weights, _ = self._read_benign_record(dataset, arch, verify=verify)
        state, _ = self._read_benign_state(dataset, arch, weights, verify=verify)
        return self._build(record, state, self.benign_path(dataset, arch)), record

    def _benign_file_infos(
        self, dataset: str, arch: str
    ) -> tuple[BenignRecord, dict, dict, dict[str, torch.Tensor]]:
        """(record, weights file info, record file info, state) of the stored parent, verified."""
        record, weights, raw = self._read_benign_record(dataset, arch, verify=True)
        state, blob = self._read_benign_state(dataset, arch, weights, verify=True)
        wpath, rpath = self.benign_path(dataset, arch), self.benign_record_path(dataset, arch)
        return (
            record,
            {"path": self._rel(wpath), "sha256": weights["sha256"], "bytes": len(blob)},
            {"path": self._rel(rpath), "sha256": sha256_bytes(raw), "bytes": len(raw)},
            state,
        )

    # ---------------------------------------------------------------- index
    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / LOCK, "a+b") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _index(self) -> dict[str, dict]:
        """id → index line (the last line wins), cached until the file changes."""
        path = self.root / INDEX
        try:
            st = path.stat()
        except FileNotFoundError:
            return {}
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        if self._index_cache is not None and self._index_cache[0] == key:
            return self._index_cache[1]
        raw = _read(path, "the index", root=self.root, max_bytes=MAX_INDEX_BYTES)
        lines = raw.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        out: dict[str, dict] = {}
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            obj = _entry_line(line)
            if obj is None:
                if i == len(lines) - 1:
                    warnings.warn(
                        f"{path}: ignoring the truncated last line {i + 1} (a build was killed while "
                        "appending it); that candidate will be rebuilt", DatabaseWarning, stacklevel=3)
                    continue
                raise DatabaseError(
                    f"{path}: line {i + 1} is not a valid entry line; restore the index from a "
                    "backup or rebuild with `bd4nn build`"
                )
            _check_line(obj, f"{path}: line {i + 1} ({obj['id']})")
            out[obj["id"]] = obj
        self._index_cache = (key, out)
        return out

    def _append_index(self, line: dict) -> None:
        """Append one line (the caller holds the lock), fsynced.

        A truncated (unparseable) last line, left by a kill during an earlier append, is cut off
        first; a valid last line that lacks its newline gets one.
        """
        path = self.root / INDEX
        if path.is_symlink() or (path.exists() and not path.is_file()):
            raise DatabaseError(f"{path}: the index must be a regular file in the database, not a link "
                                "or a special file; refused")
        data = (json.dumps(line, sort_keys=True, separators=(",", ":")) + "\n").encode()
        with open(path, "a+b") as fh:
            size = fh.seek(0, os.SEEK_END)
            if size:
                start = max(0, size - (1 << 20))
                fh.seek(start)
                tail = fh.read()
                cut = tail.rfind(b"\n", 0, len(tail) - 1)
                if cut >= 0 or start == 0:  # else: a last line over 1 MiB, not ours; leave it
                    last_start = start + cut + 1
                    last = tail[cut + 1:]
                    if _entry_line(last) is None:
                        warnings.warn(f"{path}: cutting off the truncated last line before appending",
                                      DatabaseWarning, stacklevel=3)
                        fh.truncate(last_start)
                    elif not last.endswith(b"\n"):
                        data = b"\n" + data
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        self._index_cache = None

    def has_entry(self, id: str) -> bool:
        """Whether ``id`` has an index line (kept or rejected): what a resumed build skips."""
        return id in self._index()

    def entries(self, kept: bool | None = True, **filters: Any) -> list[dict]:
        """Index lines (copies), sorted by id.

        ``kept=True`` (default) only kept entries, ``False`` only rejected ones, ``None`` all.
        ``filters``: ``dataset=``, ``arch=``, ``attack=``, ``level=``, ``candidate=``, ``target=``,
        ``seed=``, ``width=``, ``id=``; a value may be a list/tuple/set (any of).
        """
        bad = sorted(set(filters) - set(_INDEX_FILTERS))
        if bad:
            raise ValueError(f"unknown entry filters {bad}; known: {', '.join(_INDEX_FILTERS)}")
        wanted = {k: set(v) if isinstance(v, (list, tuple, set, frozenset)) else {v} for k, v in filters.items()}
        out = []
        for line in self._index().values():
            if kept is not None and bool(line.get("kept")) != kept:
                continue
            if all(line.get(k) in vals for k, vals in wanted.items()):
                out.append(copy.deepcopy(line))
        return sorted(out, key=lambda d: d["id"])

    def entry(self, id: str) -> dict:
        """The index line of ``id`` (a copy); ``DatabaseError`` if unknown."""
        return copy.deepcopy(self._line(id))

    def _line(self, id: str) -> dict:
        index = self._index()
        if id not in index:
            close = difflib.get_close_matches(id, list(index), n=3, cutoff=0.8)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            where = self.root / INDEX
            if not index:
                raise DatabaseError(f"{where}: unknown entry {id!r}: the database at {self.root} has "
                                    "no entries (build it with `bd4nn build`)")
            raise DatabaseError(f"{where}: unknown entry {id!r}{hint} (`bd4nn list {self.root} --entries` shows the ids)")
        return index[id]

    # ---------------------------------------------------------------- builds
    def record_timing(self, key: str, **figures: Any) -> None:
        """Append one line of wall-clock figures (``key``: an entry id, or ``benign:<dataset>/<arch>``)
        to ``timings.jsonl``. Timings never enter a hashed file, so rebuilding gives the same bytes."""
        path = self.root / TIMINGS
        line = (json.dumps({"key": key, **figures}, sort_keys=True, separators=(",", ":")) + "\n").encode()
        with self._locked():
            if path.is_symlink() or (path.exists() and not path.is_file()):
                raise DatabaseError(f"{path}: must be a regular file in the database, not a link or a "
                                    "special file; refused")
            with open(path, "ab") as fh:
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())

    def timings(self) -> dict[str, dict[str, Any]]:
        """key → its last line in ``timings.jsonl`` (empty if none; unreadable lines are skipped:
        these are informative figures, never inputs)."""
        path = self.root / TIMINGS
        if not path.is_file():
            return {}
        out: dict[str, dict[str, Any]] = {}
        for line in _read(path, "the timings", root=self.root, max_bytes=MAX_INDEX_BYTES).splitlines():
            try:
                obj = json.loads(line)
            except (ValueError, UnicodeDecodeError):
                continue
            if isinstance(obj, dict) and isinstance(obj.get("key"), str):
                out[obj["key"]] = obj
        return out

    def sweep_orphans(self) -> list[Path]:
        """Delete the temporary files (``.<name>.<pid>@<host>.<random>.tmp``) whose writer is no
        longer alive — left by a build killed mid-write — and return them. A live writer's are
        kept; so are another host's, whose liveness cannot be seen from here, until they are
        ``FOREIGN_ORPHAN_AGE_S`` old."""
        gone: list[Path] = []
        if not self.root.is_dir():
            return gone
        for folder, dirs, files in os.walk(self.root, followlinks=False):
            for name in files:
                if not (name.startswith(".") and name.endswith(".tmp")):
                    continue
                m = _TMP_WRITER.search(name)
                path = Path(folder) / name
                if m is not None and m.group(2) not in (None, HOST):  # another node's writer
                    try:
                        if time.time() - path.lstat().st_mtime < FOREIGN_ORPHAN_AGE_S:
                            continue
                    except FileNotFoundError:
                        continue
                elif m is not None and _alive(int(m.group(1))):
                    continue
                try:
                    if stat.S_ISREG(path.lstat().st_mode):
                        path.unlink()
                        gone.append(path)
                except FileNotFoundError:
                    pass
        return gone

    @contextmanager
    def claim(self, id: str, *, wait: bool = False) -> Iterator[bool]:
        """Claim candidate ``id`` for building: yields True if this process holds it (an ``flock``
        on ``.locks/<id>.lock``, released on exit or when the process dies), False if another
        build holds it now (only with ``wait=False``; ``wait=True`` blocks until it is free)."""
        folder = self.root / CLAIMS
        folder.mkdir(parents=True, exist_ok=True)
        _under_root(folder, self.root)
        with file_lock(folder / f"{_component(id, 'entry id')}.lock", wait=wait) as mine:
            yield mine

    # ---------------------------------------------------------------- entries
    def save_entry(
        self,
        label: DefectLabel,
        model: nn.Module | None,
        parent_state: Mapping[str, torch.Tensor] | None,
        trigger_tensors: Mapping[str, torch.Tensor],
    ) -> dict:
        """Store one candidate and append its index line (returned).

        Kept (``label.kept``): ``model`` is the infected model; its delta against the stored
        parent plus ``trigger_tensors`` go to ``<id>.safetensors``. ``parent_state``, if given,
        must be the stored parent bit for bit. Rejected: only the label is stored (``model`` and
        the trigger are not). Raises ``DatabaseError`` if the id is already in the index or
        the parent is not stored; ``ValueError`` for inconsistent arguments.
        """
        src = f"label {label.id}"
        try:
            text = label.to_json().encode()
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{src}: not JSON-serializable ({exc})") from None
        label = DefectLabel.from_json(text, source=src)  # never write what we cannot read back
        want = entry_id(label.dataset, label.arch, label.attack, label.level, label.candidate)
        if label.id != want:
            raise ValueError(f"{src}: id must be {want!r} for its dataset/arch/attack/level/candidate")
        if label.kept and model is None:
            raise ValueError(f"{src}: a kept entry needs its infected model")
        for k in trigger_tensors:
            if not k.startswith("trigger."):
                raise ValueError(f"{src}: trigger tensor names must start with 'trigger.', got {k!r}")
        edir = self.entry_dir(label.dataset, label.arch, label.attack, label.level)
        lpath, wpath = edir / f"{label.id}.json", edir / f"{label.id}.safetensors"

        with self._locked():
            if self.has_entry(label.id):
                raise DatabaseError(
                    f"{self.root / INDEX}: entry {label.id} is already in the index; delete its line "
                    "and files to rebuild it"
                )
            if not self.has_benign(label.dataset, label.arch):
                raise DatabaseError(
                    f"{self.benign_record_path(label.dataset, label.arch)}: store the benign parent "
                    f"(save_benign) before entries of {label.dataset}/{label.arch}"
                )
            record, parent_info, record_info, stored = self._benign_file_infos(label.dataset, label.arch)
            if float(record.width) != float(label.width):
                raise ValueError(f"{src}: width {label.width} but the parent has width {record.width}")
            weights_info = None
            nbytes = 0
            if label.kept:
                assert model is not None
                state = _state(model)
                _check_finite(state, wpath, "the infected model")  # never write what load refuses
                _check_finite(dict(trigger_tensors), wpath, "the trigger")
                if parent_state is not None:
                    given = {k: v.detach().cpu() for k, v in parent_state.items()}
                    if set(given) != set(stored) or not all(bit_equal(given[k], stored[k]) for k in stored):
                        raise ValueError(
                            f"{src}: parent_state is not the benign parent stored at "
                            f"{self.benign_path(label.dataset, label.arch)}"
                        )
                _validate_selection(model, label, lpath)
                delta = encode_delta(state, stored)
                rebuilt = apply_delta(stored, delta, source=src)
                if not all(bit_equal(rebuilt[k], state[k]) for k in state):  # pragma: no cover
                    raise RuntimeError(f"{src}: the delta does not rebuild the model (a bd4nn bug)")
                tensors = {**delta, **{k: v.detach().cpu().contiguous().clone()
                                       for k, v in trigger_tensors.items()}}
                blob = _st_save(tensors, {"format": DELTA_FORMAT, "id": label.id,
                                          "parent_sha256": parent_info["sha256"]})
                _atomic_write(wpath, blob, self.root)
                weights_info = {"path": self._rel(wpath), "sha256": sha256_bytes(blob), "bytes": len(blob)}
                nbytes = len(blob)
            else:
                _validate_selection(self._skeleton(record), label, lpath)
            _atomic_write(lpath, text, self.root)
            line = {
                "format": FORMAT,
                **{k: getattr(label, k) for k in (
                    "id", "dataset", "arch", "width", "attack", "level", "candidate", "kept", "target",
                    "seed", "ca", "asr", "asr_cor", "ca_cor", "ca_cor_r", "asr_cor_r", "benign_ca")},
                "n_fault": label.n_fault,
                "bytes": nbytes,
                "full_bytes": parent_info["bytes"],
                "files": {
                    "label": {"path": self._rel(lpath), "sha256": sha256_bytes(text), "bytes": len(text)},
                    "weights": weights_info,
                    "parent": parent_info,
                    "parent_record": record_info,
                },
            }
            self._append_index(line)
        return copy.deepcopy(line)

    @staticmethod
    def _skeleton(record: BenignRecord) -> nn.Module:
        """The parent's architecture without weights (meta device), for checking layer names."""
        from bd4nn.models import get_model

        with torch.device("meta"):
            return get_model(record.arch, record.num_classes, record.width,
                             mean=tuple(record.mean), std=tuple(record.std), seed=record.seed)

    def _file(self, line: dict, role: str) -> tuple[Path, dict]:
        files = line.get("files")
        info = files.get(role) if isinstance(files, dict) else None
        if not isinstance(info, dict) or not isinstance(info.get("sha256"), str) or "path" not in info:
            raise DatabaseError(f"{self.root / INDEX}: entry {line.get('id')}: no {role} file recorded; "
                                f"{REBUILD}")
        return self._abs(info["path"], f"entry {line.get('id')}"), info

    def load_label(self, id: str, *, verify: bool = True) -> DefectLabel:
        """The defect label of any entry (kept or rejected), hash-checked."""
        line = self._line(id)
        return self._load_label(line, verify=verify)

    def _load_label(self, line: dict, *, verify: bool) -> DefectLabel:
        lpath, info = self._file(line, "label")
        raw = _read(lpath, f"the label of {line['id']}", root=self.root, max_bytes=_size(info))
        if verify:
            _check_hash(lpath, raw, info["sha256"])
        label = DefectLabel.from_json(raw, source=str(lpath))
        mismatch = [k for k in ("id", "dataset", "arch", "attack", "level", "candidate", "kept")
                    if getattr(label, k) != line.get(k)]
        if mismatch:
            raise DatabaseError(f"{lpath}: the label disagrees with its index line on {mismatch}; {REBUILD}")
        try:
            want_id = entry_id(label.dataset, label.arch, label.attack, label.level, label.candidate)
            want_path = self.entry_dir(label.dataset, label.arch, label.attack, label.level) / f"{want_id}.json"
        except ValueError as exc:
            raise DatabaseError(f"{lpath}: {exc}; {REBUILD}") from None
        if label.id != want_id or lpath != want_path:
            raise DatabaseError(f"{lpath}: the label of {label.id} must be {self._rel(want_path)} "
                                f"(id {want_id}); {REBUILD}")
        return label

    def load_entry(self, id: str, *, verify: bool = True) -> tuple[nn.Module, DefectLabel, dict[str, torch.Tensor]]:
        """The exact infected model (eval mode, CPU), its label and its trigger tensors.

        Checks the sha256 of the label, the delta and both parent files against the index line
        (unless ``verify=False``); raises ``DatabaseError`` on any problem, never loads silently.
        """
        line = self._line(id)
        label = self._load_label(line, verify=verify)
        if not line.get("kept"):
            raise DatabaseError(
                f"{self.root / INDEX}: entry {id} was rejected (ASR.Cor = {label.asr_cor:.3f} <= 0.5): "
                "no weights are stored; load_label() reads its label, entries() lists kept entries"
            )
        wpath, winfo = self._file(line, "weights")
        _, pinfo = self._file(line, "parent")
        _, rinfo = self._file(line, "parent_record")
        record, weights, _ = self._read_benign_record(
            label.dataset, label.arch, verify=verify, expected_sha=rinfo["sha256"])
        parent, _ = self._read_benign_state(
            label.dataset, label.arch, weights, verify=verify, expected_sha=pinfo["sha256"])
        blob = _read(wpath, f"the weights of {id}", root=self.root, max_bytes=_size(winfo))
        if verify:
            _check_hash(wpath, blob, winfo["sha256"])
        tensors, meta = _st_load(blob, wpath, "delta")
        if meta.get("format") != DELTA_FORMAT or meta.get("id") != id:
            raise DatabaseError(
                f"{wpath}: not the delta of {id} (metadata format={meta.get('format')!r}, "
                f"id={meta.get('id')!r}); {REBUILD}"
            )
        if verify and meta.get("parent_sha256") != pinfo["sha256"]:
            raise DatabaseError(f"{wpath}: built on a different benign parent "
                                f"({meta.get('parent_sha256')}); {REBUILD}")
        trigger = {k: v for k, v in tensors.items() if k.startswith("trigger.")}
        _check_finite(trigger, wpath, "the trigger")
        delta = {k: v for k, v in tensors.items() if not k.startswith("trigger.")}
        lpath = self._file(line, "label")[0]
        _check_label_fits(label, record, lpath)
        state = apply_delta(parent, delta, source=str(wpath))
        model = self._build(record, state, wpath)
        _validate_selection(model, label, lpath)
        return model, label, trigger

    # ---------------------------------------------------------------- verify
    def verify(self, progress: bool = True) -> list[str]:
        """Check the whole database through the same validation as loading; the problems.

        Every index line (schema, no duplicate ids), every entry as ``load_entry`` reads it (the
        hashes of its label, delta and both parent files; the label's fields, ranges and path;
        S_fault and the target against the parent; the delta's shapes; finite weights and
        trigger), every rejected entry's label against its parent, and every stored benign
        parent as ``load_benign`` reads it. Each problem is one line naming the file; an empty
        list means the database is intact.
        """
        from bd4nn.progress import bar as progress_bar

        problems: list[str] = []
        try:
            index = self._index()
        except DatabaseError as exc:
            return [str(exc)]
        problems += self._duplicate_ids()
        benign_docs = sorted(self.root.glob(f"*/*/{BENIGN_RECORD}")) if self.root.is_dir() else []
        bar = progress_bar(total=len(index) + len(benign_docs), desc="verify", unit="entry",
                   disable=not progress, dynamic_ncols=True)
        self._parent_memo = {}
        try:
            for id_, line in sorted(index.items()):
                try:
                    if line.get("kept"):
                        self.load_entry(id_, verify=True)
                    else:
                        self._check_rejected(line)
                except (DatabaseError, ValueError) as exc:
                    problems.append(str(exc))
                bar.update(1)
            for doc in benign_docs:
                try:
                    self.load_benign(doc.parent.parent.name, doc.parent.name, verify=True)
                except (DatabaseError, ValueError) as exc:
                    problems.append(str(exc))
                bar.update(1)
        finally:
            bar.close()
            self._parent_memo = None
        return list(dict.fromkeys(problems))  # de-duplicated, in order

    def _check_rejected(self, line: dict) -> None:
        """A rejected entry as far as it is stored: its label (hash, fields, path) against the
        parent record it names (hash) and the parent's architecture (S_fault, target, width)."""
        label = self._load_label(line, verify=True)
        _, rinfo = self._file(line, "parent_record")
        record, _, _ = self._read_benign_record(label.dataset, label.arch, verify=True,
                                                expected_sha=rinfo["sha256"])
        lpath = self._file(line, "label")[0]
        _check_label_fits(label, record, lpath)
        _validate_selection(self._skeleton(record), label, lpath)

    def _duplicate_ids(self) -> list[str]:
        """One problem per id that has more than one index line (loading uses the last)."""
        path = self.root / INDEX
        if not path.exists():
            return []
        seen: dict[str, int] = {}
        for raw in _read(path, "the index", root=self.root, max_bytes=MAX_INDEX_BYTES).split(b"\n"):
            obj = _entry_line(raw) if raw.strip() else None
            if obj is not None:
                seen[obj["id"]] = seen.get(obj["id"], 0) + 1
        return [f"{path}: entry {id_} has {n} index lines (one expected); {REBUILD}"
                for id_, n in sorted(seen.items()) if n > 1]


def _entry_line(line: bytes) -> dict | None:
    """The parsed index line, or None if it is not a JSON object with a string id."""
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, dict) and isinstance(obj.get("id"), str) else None


def _check_line(obj: dict, where: str) -> None:
    """The schema of one index line (what ``save_entry`` writes); ``DatabaseError`` naming it."""
    problems = []
    for key in ("id", "dataset", "arch", "attack", "level"):
        if not isinstance(obj.get(key), str) or not obj.get(key):
            problems.append(f"{key} must be a non-empty string")
    for key in ("candidate", "target", "n_fault", "bytes", "full_bytes"):
        v = obj.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            problems.append(f"{key} must be an integer >= 0, got {v!r}")
    if not isinstance(obj.get("kept"), bool):
        problems.append(f"kept must be true or false, got {obj.get('kept')!r}")
    files = obj.get("files")
    if not isinstance(files, dict):
        problems.append("files must be an object")
    else:
        for role in ("label", "parent", "parent_record", "weights"):
            info = files.get(role)
            if info is None and role == "weights" and obj.get("kept") is False:
                continue
            if (not isinstance(info, dict) or not isinstance(info.get("path"), str)
                    or not isinstance(info.get("sha256"), str) or not _SHA256.match(info["sha256"])
                    or not isinstance(info.get("bytes"), int) or isinstance(info.get("bytes"), bool)
                    or info["bytes"] < 0):
                problems.append(f"files.{role} must be {{path, sha256 (64 hex digits), bytes >= 0}}")
    if problems:
        raise DatabaseError(f"{where}: {'; '.join(problems)}; {REBUILD}")


def _check_finite(tensors: Mapping[str, torch.Tensor], path: Path, what: str) -> None:
    """Every floating tensor finite: no stored model or trigger holds NaN or inf."""
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise DatabaseError(f"{path}: {what} holds NaN or inf in {', '.join(sorted(bad)[:5])}; {REBUILD}")


def _check_label_fits(label: DefectLabel, record: BenignRecord, path: Path) -> None:
    """What a label must agree on with its benign parent (besides S_fault fitting the model)."""
    if float(label.width) != float(record.width):
        raise DatabaseError(f"{path}: width {label.width} but the parent has width {record.width}; {REBUILD}")
    if label.target >= record.num_classes:
        raise DatabaseError(f"{path}: target {label.target} but the parent has {record.num_classes} classes; "
                            f"{REBUILD}")


def _validate_selection(model: nn.Module, label: DefectLabel, path: Path) -> None:
    from bd4nn.neurons import NeuronMap, SelectionError

    try:
        got = NeuronMap(model).validate(label.s_fault)
    except SelectionError as exc:
        raise DatabaseError(
            f"{path}: S_fault does not fit {label.arch} (width {label.width:g}): {exc}; the label "
            f"belongs to another model; {REBUILD}"
        ) from None
    if got != label.s_fault:
        raise DatabaseError(f"{path}: S_fault lists a layer with no channels; {REBUILD}")
