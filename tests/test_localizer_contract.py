"""The contract every registered localizer keeps, built-ins and plugins alike.

Parametrized over ``list_localizers()`` (the way timm tests every model of ``list_models()``), so a
new localizer or an installed plugin is checked without touching this file: it scores every
layer of its scope with one finite number per neuron, leaves the model as it found it
(parameters, buffers, train/eval mode, ``requires_grad``), and gives the same scores for the same
seed, whether or not a ``device`` is passed. ``BUDGETS`` holds the smallest settings that still
run a method's whole code path; a localizer absent from it runs at its published defaults.
"""

from __future__ import annotations

import pytest
import torch

from bd4nn.neurons import NeuronMap
from localizers import list_localizers, localizer_class
from test_loc_fp_clp_slicer import _one_thread, assert_unchanged, clean_data, randomize_bn, snapshot, tiny  # noqa: F401 (an autouse fixture)

ARCHS = ["vgg13", "resnet18", "preactresnet18"]  # preactresnet18: neurons without a BN (issue 16)
BUDGETS: dict[str, dict] = {
    "nc": {"epochs": 1, "early_stop_patience": 1},
    "anp": {"nb_iter": 3},
    "deepmufl": {"max_tests": 4, "progress": False},
}
VARIANTS: dict[str, list[dict]] = {  # other code paths worth the same checks
    "clp": [{"standardize": True}],
    "slicer": [{"centered": True}],
}
CASES = [(name, {**BUDGETS.get(name, {}), **variant})
         for name in list_localizers() for variant in [{}, *VARIANTS.get(name, [])]]


def test_every_built_in_is_covered():
    names = {name for name, _ in CASES}
    assert {"fp", "nc", "anp", "clp", "deepmufl", "slicer", "pfl", "random"} <= names
    assert set(BUDGETS) <= names and set(VARIANTS) <= names  # no budget for a localizer that is gone


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name,settings", CASES, ids=[f"{n}{'-' + '-'.join(map(str, s.values())) if s else ''}"
                                                     for n, s in CASES])
def test_contract_scope_sizes_determinism_and_model_untouched(arch, name, settings):
    cls = localizer_class(name)
    model = tiny(arch, seed=1)
    randomize_bn(model, seed=8)
    model.train()
    for p in list(model.parameters())[:2]:
        p.requires_grad_(False)  # a caller's frozen parameters stay frozen
    nm = NeuronMap(model)
    clean = clean_data(4, seed=9, uint8=True)
    if cls.needs_ground_truth:
        settings = {**settings, "fault": {nm.layers[0]: [0, 1], nm.penultimate: [2]}}
    snap = snapshot(model)
    s1 = cls(**settings)(model, nm, clean, seed=0)
    s2 = cls(**settings)(model, nm, clean, device="cpu", seed=0)
    assert_unchanged(model, snap)  # parameters, buffers, every module's mode, requires_grad, no .grad
    layers = nm.layers if cls.scope == "all" else [nm.penultimate]
    assert list(s1) == layers
    for layer in layers:
        assert s1[layer].shape == (nm.sizes[layer],) and s1[layer].dtype == torch.float32
        assert torch.isfinite(s1[layer]).all()
        assert torch.equal(s1[layer], s2[layer]), f"{name}: the same seed gave other scores in {layer}"
