"""Reading results files: JSON Lines written by ``bd4nn bench`` (schema 1).

One JSON object per line, told apart by ``kind``: a ``header`` (environment, for provenance),
``directory`` lines (database statistics) and ``case`` lines (one benchmark case each).
Unknown keys and unknown kinds are ignored; any metric may be missing or null (NaN and
infinities count as null). A missing, empty or corrupt file raises ``ResultsError`` (a
``ValueError``) whose one-line message names the file and the line.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

__all__ = ["SCHEMA", "ResultsError", "Header", "Directory", "Case", "Results", "load"]

SCHEMA = 1


class ResultsError(ValueError):
    """A results file that cannot be read; the message names the file (and line)."""


def _number(v: Any) -> float | None:
    try:
        x = float(v)
    except OverflowError:  # an integer beyond float range
        return None
    return x if math.isfinite(x) else None


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) else None if not math.isfinite(v) else int(v)


def _text(v: Any) -> str | None:
    return None if v is None else str(v)


# (type check, converter, what the message calls it) per field kind
_KINDS = {
    "str": (lambda v: isinstance(v, str), _text, "a string"),
    "num": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), _number, "a number"),
    "int": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), _int, "an integer"),
    "text": (lambda v: True, lambda v: v if isinstance(v, str) else json.dumps(v), "anything"),  # provenance
    "any": (lambda v: True, lambda v: v, "anything"),
}


@functools.cache
def _spec(cls) -> tuple[tuple[str, Callable, Callable, str], ...]:
    """(name, type check, converter, noun) of each field of ``cls`` read from a results line."""
    return tuple((f.name, *_KINDS[f.metadata["kind"]]) for f in fields(cls) if "kind" in f.metadata)


def _parse(cls, obj: dict, where: str, **extra):
    """Build dataclass ``cls`` from the known keys of ``obj`` (each field's metadata names its kind)."""
    values = {}
    for name, ok, convert, noun in _spec(cls):
        v = obj.get(name)
        if v is None:
            continue
        if not ok(v):
            raise ResultsError(f"{where}: {name!r} should be {noun} or null, not {v!r}")
        values[name] = convert(v)
    return cls(**values, **extra)


def _f(kind: str, default: Any = None):
    return field(default=default, metadata={"kind": kind})


@dataclass(frozen=True)
class Header:
    """The environment of one run; ``source`` is the file it came from."""

    source: str = ""
    schema: int | None = _f("int")
    run: str | None = _f("text")
    created: str | None = _f("text")
    git: str | None = _f("text")
    torch: str | None = _f("text")
    cuda: str | None = _f("text")
    device: str | None = _f("text")
    python: str | None = _f("text")
    profile: str | None = _f("text")
    db: str | None = _f("text")
    options: Any = _f("any")
    workers: Any = _f("any")

    def caption(self) -> str:
        """One line of provenance: file, run, device, git, profile."""
        git = self.git[:12] if self.git and len(self.git) == 40 else self.git
        parts = [f"run {self.run or '—'}", f"device {self.device or '—'}", f"git {git or '—'}",
                 f"profile {self.profile or '—'}"]
        return f"{Path(self.source).name}: " + ", ".join(parts)


@dataclass(frozen=True)
class Directory:
    """Database statistics of one dataset/arch/attack/level directory."""

    dataset: str | None = _f("str")
    arch: str | None = _f("str")
    attack: str | None = _f("str")
    level: str | None = _f("str")
    kept: int | None = _f("int")
    rejected: int | None = _f("int")
    benign_ca: float | None = _f("num")
    mean_ca: float | None = _f("num")
    mean_asr: float | None = _f("num")
    mean_asr_cor: float | None = _f("num")


@dataclass(frozen=True)
class Case:
    """One benchmark case (localization, repair, database sanity, or a benign control: ``benign``,
    ``benign_trigger``) and its metrics."""

    case: str | None = _f("str")
    nodeid: str | None = _f("str")
    outcome: str | None = _f("str")
    entry: str | None = _f("str")
    dataset: str | None = _f("str")
    arch: str | None = _f("str")
    attack: str | None = _f("str")
    level: str | None = _f("str")
    candidate: int | None = _f("int")
    localizer: str | None = _f("str")
    repair: str | None = _f("str")
    wji: float | None = _f("num")
    time_s: float | None = _f("num")
    hits: float | None = _f("num")
    n_fault: float | None = _f("num")
    n_localized: float | None = _f("num")
    auroc: float | None = _f("num")
    ap: float | None = _f("num")
    ca: float | None = _f("num")
    asr: float | None = _f("num")
    asr_cor: float | None = _f("num")
    benign_ca: float | None = _f("num")
    ca_after: float | None = _f("num")
    asr_after: float | None = _f("num")
    cad: float | None = _f("num")
    asrd: float | None = _f("num")
    score_max_z: float | None = _f("num")  # the summary of a localizer's scores (detection AUROC)
    benign_asr: float | None = _f("num")  # the entry's trigger on its benign parent
    source: str = ""
    line: int = 0

    @property
    def counted(self) -> bool:
        """Skipped cases never count in a table."""
        return self.outcome != "skipped"

    @property
    def entry_key(self) -> str | tuple:
        """The entry this case ran on (its id, else dataset/arch/attack/level/candidate)."""
        if self.entry is not None:
            return self.entry
        return (self.dataset, self.arch, self.attack, self.level, self.candidate)


@dataclass
class Results:
    """Everything read from one or more results files, cases concatenated in file order."""

    headers: list[Header] = field(default_factory=list)
    directories: list[Directory] = field(default_factory=list)
    cases: list[Case] = field(default_factory=list)

    def provenance(self) -> list[str]:
        """One caption line per header (run, device, git, profile)."""
        return [h.caption() for h in self.headers]

    def values(self, key: str) -> set[str]:
        """The distinct non-null values of ``key`` (e.g. "dataset") over cases and directories."""
        found = {getattr(c, key, None) for c in self.cases}
        found |= {getattr(d, key, None) for d in self.directories}
        return {v for v in found if v is not None}

    def filter(self, **wanted: Iterable[str] | None) -> Results:
        """Only the cases and directories whose ``dataset=``/``attack=``/... is one of those given."""
        known = {f.name for f in fields(Case)} & {f.name for f in fields(Directory)}
        unknown = sorted(set(wanted) - known)
        if unknown:
            raise TypeError(f"Results.filter() cannot filter on {', '.join(unknown)} (only {', '.join(sorted(known))})")
        wanted = {k: set(v) for k, v in wanted.items() if v}

        def keep(record) -> bool:
            return all(getattr(record, k, None) in v for k, v in wanted.items())

        return replace(self, headers=list(self.headers),
                       directories=[d for d in self.directories if keep(d)],
                       cases=[c for c in self.cases if keep(c)])


def _read_lines(path: Path) -> list[bytes]:
    if not path.exists():
        raise ResultsError(f"{path}: results file not found")
    if path.is_dir():
        raise ResultsError(f"{path}: is a directory, not a results file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ResultsError(f"{path}: cannot read results file ({exc.strerror or exc})") from None
    return data.splitlines()


def _load_one(path: Path, results: Results) -> None:
    seen = 0
    lines = _read_lines(path)
    for lineno, raw in enumerate(lines, start=1):
        where = f"{path}:{lineno}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ResultsError(f"{where}: not UTF-8 text; is this a results file (.jsonl)?") from None
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            cut = " (it is the last line: was the run interrupted?)" if lineno == len(lines) else ""
            raise ResultsError(f"{where}: corrupt line, not JSON ({exc.msg} at column {exc.colno}){cut}") from None
        if not isinstance(obj, dict):
            raise ResultsError(f"{where}: corrupt line, expected a JSON object, got {type(obj).__name__}")
        kind = obj.get("kind")
        if not isinstance(kind, str):
            raise ResultsError(f"{where}: line has no 'kind' (header, directory or case)")
        seen += 1
        if kind == "header":
            header = _parse(Header, obj, where, source=str(path))
            if header.schema is not None and header.schema != SCHEMA:
                raise ResultsError(f"{where}: results schema {header.schema} is not supported "
                                   f"(reports reads schema {SCHEMA})")
            results.headers.append(header)
        elif kind == "directory":
            results.directories.append(_parse(Directory, obj, where))
        elif kind == "case":
            results.cases.append(_parse(Case, obj, where, source=str(path), line=lineno))
        # other kinds: written by a newer harness, ignored
    if not seen:
        raise ResultsError(f"{path}: empty results file (no JSON lines)")


def load(paths: str | Path | Iterable[str | Path]) -> Results:
    """Read results files (JSON Lines) into one ``Results``; raises ``ResultsError``.

    Directory lines repeated across files (same dataset/arch/attack/level) are kept once, the
    last one read winning; cases are concatenated.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    if not paths:
        raise ResultsError("no results file given")
    results = Results()
    for path in paths:
        _load_one(path, results)
    latest = {(d.dataset, d.arch, d.attack, d.level): d for d in results.directories}
    results.directories = list(latest.values())
    return results
