"""One registry class for every kind of named plug-in: models, attacks, localizers, repairs.

A ``Registry`` maps names to objects (classes or builder functions) and behaves the same for
every kind:

* **lookup**: ``get(name)``; an unknown name raises ``bd4nn.errors.UnknownNameError`` naming
  the closest known names ("did you mean ...") and all known ones;
* **registration**: ``register`` (also a decorator) refuses an object without a name, a class
  that does not derive from the registry's base class, and a name that another object holds
  (registering the same object twice is harmless);
* **built-ins** are listed as ``{"name": "module:attribute"}`` and imported on first use, so that
  importing a registry does not import every implementation;
* **plugins**: where a registry has an entry point group, installed packages add to it (a plugin
  that fails to import is logged and skipped; it never hides a built-in);
* ``names()`` lists the built-ins in their given order, then everything else sorted.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

from bd4nn.errors import RegistryError, UnknownNameError

__all__ = ["Registry"]

log = logging.getLogger(__name__)
T = TypeVar("T")


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


class Registry(Generic[T]):
    """Named objects of one ``kind`` (the word used in messages, e.g. "localizer").

    ``base``: registered classes must derive from it (None: anything, e.g. functions).
    ``builtins``: name -> "module:attribute", imported lazily. ``entry_points``: the group
    installed plugins register under. ``name_of`` reads an object's name when ``register`` is
    given none (default: its ``name`` attribute where it has one, else ``__name__``). ``check`` may raise
    ``RegistryError`` for kind-specific rules (a localizer's scope, ...).
    """

    def __init__(self, kind: str, *, base: type | None = None, builtins: Mapping[str, str] | None = None,
                 entry_points: str | None = None, name_of: Callable[[Any], str] | None = None,
                 check: Callable[[Any], None] | None = None) -> None:
        self.kind = kind
        self.base = base
        self.builtins = dict(builtins or {})
        self.entry_points = entry_points
        self._name_of = name_of or (lambda obj: getattr(obj, "name") if hasattr(obj, "name") else obj.__name__)
        self._check = check
        self._items: dict[str, T] = {}
        self._plugins_loaded = False

    # ---------------------------------------------------------------- registration
    def register(self, obj: T | None = None, *, name: str | None = None):
        """Register ``obj`` under ``name`` (default: its own name); usable as ``@register`` or
        ``@register(name="x")``. Returns ``obj``."""
        if obj is None:
            return lambda o: self.register(o, name=name)
        key = name or self._name_of(obj)
        if not key or not isinstance(key, str):
            raise RegistryError(f"{self.kind} {_qualname(obj)} has no name")
        if self.base is not None and not (isinstance(obj, type) and issubclass(obj, self.base)):
            raise RegistryError(f"{self.kind} {key!r}: {_qualname(obj)} is not a subclass of "
                                f"{self.base.__module__}.{self.base.__qualname__}")
        if self._check is not None:
            self._check(obj)
        other = self._items.get(key)
        if other is not None and other is not obj:
            raise RegistryError(f"{self.kind} name {key!r} is taken by {_qualname(other)}; "
                                f"{_qualname(obj)} needs another name")
        self._items[key] = obj
        return obj

    def unregister(self, name: str) -> None:
        """Remove ``name`` (tests, and plugins that replace themselves)."""
        self._items.pop(name, None)

    # ---------------------------------------------------------------------- lookup
    def _load_builtin(self, name: str) -> None:
        module, _, attr = self.builtins[name].partition(":")
        obj = getattr(importlib.import_module(module), attr)
        if self._items.get(name) is not obj:  # the module's decorator usually registered it already
            self.register(obj, name=name)

    def _load_all(self) -> None:
        for name in self.builtins:
            if name not in self._items:
                self._load_builtin(name)
        if self.entry_points and not self._plugins_loaded:
            self._plugins_loaded = True
            self._load_plugins()

    def _load_plugins(self) -> None:
        try:
            eps = importlib.metadata.entry_points(group=self.entry_points)
        except Exception as exc:  # pragma: no cover - broken metadata in the environment
            log.warning("could not read entry points %s: %s", self.entry_points, exc)
            return
        for ep in eps:
            try:
                obj = ep.load()
                if self._name_of(obj) not in self._items:
                    self.register(obj)
            except Exception as exc:  # noqa: BLE001 (a broken plugin must not break the built-ins)
                log.warning("%s plugin %s (%s) failed to load: %s", self.kind, ep.name, ep.value, exc)

    def reload_plugins(self) -> None:
        """Read the entry point group again on the next lookup (after installing a plugin)."""
        self._plugins_loaded = False

    def names(self) -> list[str]:
        """Every registered name: built-ins in their given order, then the rest sorted."""
        self._load_all()
        order = {n: i for i, n in enumerate(self.builtins)}
        return sorted(self._items, key=lambda n: (order.get(n, len(order)), n))

    def get(self, name: str) -> T:
        """The object registered as ``name``; an unknown name suggests the closest known ones."""
        if name in self._items:
            return self._items[name]
        if name in self.builtins:
            self._load_builtin(name)
            return self._items[name]
        known = self.names()
        if name in self._items:  # a plugin
            return self._items[name]
        close = difflib.get_close_matches(str(name), known, n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise UnknownNameError(f"unknown {self.kind} {name!r}{hint} (known: {', '.join(known)})")

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.names()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())
