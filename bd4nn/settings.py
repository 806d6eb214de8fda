"""Typed settings: values from the command line (``--set``), a profile or Python, coerced to the
type of their dataclass field and validated, in one place for localizer settings, the training
and injection recipes and the repairs' settings (issue 12: ``epochs=abc``, ``epochs=-1``,
``epochs=1.5``, ``u=NaN`` or ``lr = "fast"`` are errors that name the setting, never a crash
later or a silent wrong run)."""

from __future__ import annotations

import dataclasses
from typing import Any

from bd4nn.errors import UserError

__all__ = ["SettingError", "coerce_setting", "coerce_fields", "describe_settings"]


class SettingError(UserError, ValueError):
    """A setting's value has the wrong type or is out of range (the message names it)."""


# Whole-number settings that count something: at least 1 (every other number: finite, >= 0).
_COUNTS = ("epochs", "batch_size", "score_batch_size", "nb_iter", "steps", "max_tests", "max_rows",
           "memory_mb", "patience", "early_stop_patience")


def _field_types(settings_cls: type) -> dict[str, Any]:
    import typing

    try:
        return typing.get_type_hints(settings_cls)
    except Exception:  # an annotation that does not resolve: fall back to the raw strings
        return {f.name: f.type for f in dataclasses.fields(settings_cls)}


def coerce_setting(key: str, value: Any, annotation: Any) -> Any:
    """``value`` (from ``--set`` JSON, a profile or Python) as the type of the Settings field,
    validated: numbers finite and >= 0, counts (``_COUNTS``) whole and >= 1, booleans and
    strings as such, ``None`` only where the field allows it. Raises ``SettingError`` naming
    the setting, the value and what it must be."""
    import math
    import types
    import typing

    def bad(what: str) -> SettingError:
        return SettingError(f"setting {key}={value!r} {what}")

    args = typing.get_args(annotation)
    is_union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    kinds = [a for a in args if a is not type(None)] if is_union else [annotation]
    if value is None:
        if type(None) in args:
            return None
        raise bad("must not be None")
    kind = kinds[0] if len(kinds) == 1 else None
    if isinstance(kind, str):  # unresolved annotation: leave the value alone
        return value
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise bad("must be true or false")
    if kind is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and value.lstrip("-").isdigit())):
            raise bad("must be a whole number")
        v = int(value)
        low = 1 if key in _COUNTS or key.endswith("batch_size") else 0
        if v < low:
            raise bad(f"must be >= {low}")
        return v
    if kind is float:
        try:
            v = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            raise bad("must be a number") from None
        if not math.isfinite(v):
            raise bad("must be a finite number")
        if v < 0:
            raise bad("must be >= 0")
        return v
    if kind is str:
        if not isinstance(value, str):
            raise bad("must be a string")
        return value
    if typing.get_origin(kind) is tuple:
        items = typing.get_args(kind)
        if not isinstance(value, (list, tuple)) or (items and items[-1] is not Ellipsis and len(value) != len(items)):
            raise bad(f"must be a list of {len(items)} values")
        return tuple(coerce_setting(key, v, t) for v, t in zip(value, items))
    return value




def coerce_fields(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` for the dataclass ``cls``: unknown keys refused, every value coerced."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise SettingError(f"no setting {', '.join(map(repr, unknown))}; the settings are {', '.join(sorted(fields))}")
    hints = _field_types(cls)
    return {k: coerce_setting(k, v, hints.get(k, fields[k].type)) for k, v in values.items()}


def describe_settings(settings_cls: type) -> list[tuple[str, str, str]]:
    """``(name, default, note)`` per field of a Settings dataclass, in order: the default as
    Python writes it, and the note the field's line carries in the source (``# ANP anp_eps``:
    where a published default comes from, or why bd4nn differs). For listings such as
    ``bd4nn localizers``; a field whose line has no comment gets an empty note."""
    import inspect
    import re
    import textwrap

    notes: dict[str, str] = {}
    try:
        source = textwrap.dedent(inspect.getsource(settings_cls))
    except (OSError, TypeError):  # built in a REPL or by make_dataclass: no source to read
        source = ""
    for line in source.splitlines():
        m = re.match(r"\s*(\w+)\s*:[^#]*#\s*(.*)$", line)
        if m:
            notes.setdefault(m.group(1), m.group(2).strip())
    rows = []
    for f in dataclasses.fields(settings_cls):
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = repr(f.default_factory())  # type: ignore[misc]
        else:
            default = "(required)"
        rows.append((f.name, default, notes.get(f.name, "")))
    return rows
