"""The localizer interface: registry, plugins, settings, score checks, PFL and random."""

from __future__ import annotations

import importlib.metadata
import math
from dataclasses import dataclass

import pytest
import torch

import localizers.base as base
from bd4nn.errors import RegistryError, UnknownNameError
from bd4nn.metrics import top_k_selection, wji
from bd4nn.models import get_model
from bd4nn.neurons import NeuronMap
from localizers import CleanData, Localizer, LocalizerError, get_localizer, list_localizers, register_localizer

PAPER = ["fp", "nc", "anp", "clp", "deepmufl", "slicer", "pfl", "random"]


@pytest.fixture(scope="module")
def net():
    model = get_model("vgg13", 4, width=1 / 16, seed=0).eval()
    return model, NeuronMap(model)


@pytest.fixture
def clean():
    g = torch.Generator().manual_seed(0)
    return CleanData(torch.randint(0, 256, (8, 3, 32, 32), generator=g, dtype=torch.uint8),
                     torch.randint(0, 4, (8,), generator=g), 4)


def test_registry_lists_the_paper_methods_in_order():
    names = list_localizers()
    assert names[: len(PAPER)] == PAPER
    for n in names:
        loc = get_localizer(n) if n != "pfl" else get_localizer(n, fault={})
        assert loc.name == n and loc.scope in base.SCOPES
    assert get_localizer("fp").scope == "penultimate" and get_localizer("nc").scope == "penultimate"
    assert all(get_localizer(n).scope == "all" for n in ("anp", "clp", "deepmufl", "slicer", "random"))


def test_unknown_names_and_settings_are_clear_errors():
    with pytest.raises(UnknownNameError, match="unknown localizer 'nope'.*clp"):
        get_localizer("nope")
    with pytest.raises(UnknownNameError, match="did you mean 'slicer'"):
        get_localizer("slicr")
    with pytest.raises(LocalizerError, match="no setting 'bogus'"):
        get_localizer("clp", bogus=1)


def test_settings_override_and_config_round_trip():
    loc = get_localizer("clp", u=2.5)
    assert loc.settings.u == 2.5 and loc.config()["u"] == 2.5
    assert get_localizer("clp").settings.u == 3.0  # the published default is untouched


@dataclass
class _ConstSettings:
    value: float = 1.0


class Const(Localizer):
    """A plugin localizer, found through the entry point group in the test below."""

    name = "const-plugin"
    scope = "penultimate"
    Settings = _ConstSettings

    def scores(self, model, neuron_map, clean, *, device=None, seed=0):
        return {neuron_map.penultimate: torch.full((neuron_map.sizes[neuron_map.penultimate],), self.settings.value)}


def test_entry_point_plugins_are_registered(monkeypatch, net, clean):
    ep = importlib.metadata.EntryPoint(name="const", value=f"{__name__}:Const", group=base.ENTRY_POINT_GROUP)

    def fake(**kw):
        return [ep] if kw.get("group") == base.ENTRY_POINT_GROUP else []

    monkeypatch.setattr(importlib.metadata, "entry_points", fake)
    monkeypatch.setattr(base.LOCALIZERS, "_items", dict(base.LOCALIZERS._items))
    monkeypatch.setattr(base.LOCALIZERS, "_plugins_loaded", False)
    assert "const-plugin" in list_localizers()
    model, nm = net
    out = get_localizer("const-plugin", value=2.0)(model, nm, clean)
    assert list(out) == [nm.penultimate] and torch.all(out[nm.penultimate] == 2.0)


def test_decorator_rejects_bad_classes():
    class NoName(Localizer):
        pass

    with pytest.raises(RegistryError, match="no name"):
        register_localizer(NoName)

    class BadScope(Localizer):
        name = "bad-scope"
        scope = "some"

    with pytest.raises(RegistryError, match="scope"):
        register_localizer(BadScope)

    class NotALocalizer:
        name = "imposter"

    with pytest.raises(RegistryError, match="not a subclass"):
        register_localizer(NotALocalizer)

    class Clash(Localizer):
        name = "clp"

    with pytest.raises(RegistryError, match="'clp' is taken by localizers.clp.CLP"):
        register_localizer(Clash)


def test_malformed_scores_are_caught(net, clean):
    model, nm = net

    class Short(Localizer):
        name = "short"

        def scores(self, model, neuron_map, clean, *, device=None, seed=0):
            return {l: torch.zeros(n - (l == neuron_map.layers[0])) for l, n in neuron_map.sizes.items()}

    with pytest.raises(LocalizerError, match="neurons but"):
        Short()(model, nm, clean)

    class NaN(Localizer):
        name = "nan"

        def scores(self, model, neuron_map, clean, *, device=None, seed=0):
            return {l: torch.full((n,), float("nan")) for l, n in neuron_map.sizes.items()}

    with pytest.raises(LocalizerError, match="non-finite"):
        NaN()(model, nm, clean)


def test_pfl_gives_wji_one(net, clean):
    model, nm = net
    layers = nm.layers
    fault = {layers[0]: [1, 3], layers[4]: [0], layers[-1]: [2, 5, 7]}
    rc = {layers[0]: [0.1, 0.2], layers[4]: [0.3], layers[-1]: [0.1, 0.2, 0.1]}
    scores = get_localizer("pfl", fault=fault)(model, nm, clean)
    sel = top_k_selection(scores, fault)
    assert sel == fault
    assert wji(fault, sel, rc) == pytest.approx(1.0)
    with pytest.raises(LocalizerError, match="ground truth"):
        get_localizer("pfl")(model, nm, clean)


def test_random_is_seeded_and_wji_matches_its_expectation(net, clean):
    model, nm = net
    layer = nm.layers[2]
    n, k = nm.sizes[layer], 4
    fault = {layer: [0, 1, 2, 3]}
    rnd = get_localizer("random")
    a = rnd(model, nm, clean, seed=5)
    b = rnd(model, nm, clean, seed=5)
    assert all(torch.equal(a[l], b[l]) for l in a)
    assert not torch.equal(a[layer], rnd(model, nm, clean, seed=6)[layer])
    # with the top-k budget, hits h ~ Hypergeometric(n, k, k) and WJI = h / (2k - h): exact mean
    expected = sum(math.comb(k, h) * math.comb(n - k, k - h) / math.comb(n, k) * h / (2 * k - h)
                   for h in range(k + 1))
    runs = 400
    got = sum(wji(fault, top_k_selection(rnd(model, nm, clean, seed=s), fault)) for s in range(runs)) / runs
    assert got == pytest.approx(expected, abs=0.03)
