"""Attacks behind a registry: ``get_attack(name, target=0, seed=0, **settings)``.

One module per attack registers its class with ``@register_attack``. Importing this package
imports the built-in modules, so ``list_attacks()`` is complete.
"""

from __future__ import annotations

from importlib import import_module

from bd4nn.attacks.base import (
    Attack,
    InjectionInfo,
    InjectionRecipe,
    PoisoningAttack,
    StampTrigger,
    poison_indices,
)
from bd4nn.errors import UnknownNameError

__all__ = [
    "Attack", "InjectionInfo", "InjectionRecipe", "PoisoningAttack", "StampTrigger",
    "poison_indices", "register_attack", "get_attack", "list_attacks", "attack_class",
]

_REGISTRY: dict[str, type[Attack]] = {}
_BUILTIN = ("badnets", "blended", "trojannn", "sra")


def register_attack(cls: type[Attack]) -> type[Attack]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtins() -> None:
    for mod in _BUILTIN:
        import_module(f"bd4nn.attacks.{mod}")


def list_attacks() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def attack_class(name: str) -> type[Attack]:
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownNameError(f"unknown attack {name!r}; known attacks: {', '.join(sorted(_REGISTRY))}") from None


def get_attack(name: str, **kwargs) -> Attack:
    """Build attack ``name`` with ``target``, ``seed`` and settings overrides."""
    return attack_class(name)(**kwargs)
