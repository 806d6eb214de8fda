"""The one registry class behind models, attacks, localizers and repairs (``bd4nn.registry``)."""

from __future__ import annotations

import importlib.metadata
import logging
import sys
import types

import pytest

from bd4nn.attacks import ATTACKS
from bd4nn.errors import RegistryError, UnknownNameError, UserError
from bd4nn.models import MODELS
from bd4nn.registry import Registry
from bd4nn.repair import REPAIRS
from localizers.base import LOCALIZERS


class Base:
    name = ""


class Alpha(Base):
    name = "alpha"


@pytest.fixture
def lazy_module(monkeypatch):
    """A module ``bd4nn_test_lazy`` holding ``Beta``, not imported until asked for."""
    mod = types.ModuleType("bd4nn_test_lazy")
    imported = []

    class Beta(Base):
        name = "beta"

    mod.Beta = Beta

    real_import = importlib.import_module

    def fake_import(name, *a, **kw):
        if name == "bd4nn_test_lazy":
            imported.append(name)
            return mod
        return real_import(name, *a, **kw)

    monkeypatch.setattr("bd4nn.registry.importlib.import_module", fake_import)
    return Beta, imported


def test_built_ins_load_on_first_use_in_their_order(lazy_module):
    beta, imported = lazy_module
    reg = Registry("widget", base=Base, builtins={"beta": "bd4nn_test_lazy:Beta"})
    reg.register(Alpha)
    assert imported == []  # registering another one imports nothing
    assert reg.get("beta") is beta and imported == ["bd4nn_test_lazy"]
    assert reg.names() == ["beta", "alpha"]  # built-ins first, in the given order, then the rest sorted
    assert "alpha" in reg and len(reg) == 2 and list(reg) == ["beta", "alpha"]


def test_registration_rules():
    reg = Registry("widget", base=Base)
    assert reg.register(Alpha) is Alpha and reg.register(Alpha) is Alpha  # the same object twice is fine

    class Other(Base):
        name = "alpha"

    with pytest.raises(RegistryError, match="'alpha' is taken by .*Alpha"):
        reg.register(Other)
    with pytest.raises(RegistryError, match="not a subclass"):
        reg.register(type("Stranger", (), {"name": "stranger"}))
    with pytest.raises(RegistryError, match="no name"):
        reg.register(type("Nameless", (Base,), {}))
    assert isinstance(RegistryError("x"), UserError)
    funcs = Registry("helper")
    deco = funcs.register(name="twice")

    def double(x):
        return 2 * x

    assert deco(double) is double and funcs.get("twice")(3) == 6


def test_unknown_names_suggest_the_closest():
    reg = Registry("widget", base=Base)
    reg.register(Alpha)
    with pytest.raises(UnknownNameError, match=r"unknown widget 'alpah'; did you mean 'alpha'\? \(known: alpha\)"):
        reg.get("alpah")
    with pytest.raises(KeyError, match=r"unknown widget 'zzz' \(known: alpha\)"):
        reg.get("zzz")


def test_a_broken_plugin_is_logged_and_skipped(monkeypatch, caplog):
    good = importlib.metadata.EntryPoint(name="a", value="tests_nowhere:Alpha", group="bd4nn.test")
    bad = importlib.metadata.EntryPoint(name="b", value="no_such_module_bd4nn:Thing", group="bd4nn.test")
    monkeypatch.setitem(sys.modules, "tests_nowhere", types.SimpleNamespace(Alpha=Alpha))
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda **kw: [bad, good] if kw.get("group") == "bd4nn.test" else [])
    reg = Registry("widget", base=Base, entry_points="bd4nn.test")
    with caplog.at_level(logging.WARNING, logger="bd4nn.registry"):
        assert reg.names() == ["alpha"]
    assert "no_such_module_bd4nn" in caplog.text


def test_the_four_registries_are_registry_instances():
    for reg, some in ((MODELS, "vgg13"), (ATTACKS, "badnets"), (LOCALIZERS, "clp"), (REPAIRS, "prune")):
        assert isinstance(reg, Registry) and some in reg.names()
    assert REPAIRS.names() == ["prune", "finetune"] and ATTACKS.names()[:2] == ["badnets", "blended"]
