"""Attacks behind a registry: ``get_attack(name, target=0, seed=0, **settings)``.

One module per attack registers its class with ``@register_attack``; ``ATTACKS``
(``bd4nn.registry``) imports a built-in module when its attack is first asked for.
"""

from __future__ import annotations

from bd4nn.attacks.base import (
    Attack,
    InjectionInfo,
    InjectionRecipe,
    PoisoningAttack,
    StampTrigger,
    poison_indices,
)
from bd4nn.registry import Registry

__all__ = [
    "Attack", "InjectionInfo", "InjectionRecipe", "PoisoningAttack", "StampTrigger",
    "poison_indices", "register_attack", "get_attack", "list_attacks", "attack_class", "ATTACKS",
]

ATTACKS: Registry[type[Attack]] = Registry("attack", base=Attack, builtins={
    "badnets": "bd4nn.attacks.badnets:BadNets", "blended": "bd4nn.attacks.blended:Blended",
    "trojannn": "bd4nn.attacks.trojannn:TrojanNN", "sra": "bd4nn.attacks.sra:SRA",
    "sig": "bd4nn.attacks.sig:SIG", "wanet": "bd4nn.attacks.wanet:WaNet"})


def register_attack(cls: type[Attack]) -> type[Attack]:
    return ATTACKS.register(cls)


def list_attacks() -> list[str]:
    return sorted(ATTACKS.names())


def attack_class(name: str) -> type[Attack]:
    return ATTACKS.get(name)


def get_attack(name: str, **kwargs) -> Attack:
    """Build attack ``name`` with ``target``, ``seed`` and settings overrides."""
    return attack_class(name)(**kwargs)
