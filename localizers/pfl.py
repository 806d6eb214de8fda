"""PFL: perfect fault localization, the harness's reference row (METHODS.md §3).

It returns the ground truth, which the harness passes in as the ``fault`` setting (a localizer
never reads the database itself). Fault neurons score 1 and all others 0, so the top-k budget
picks exactly ``S_fault`` and WJI is 1 by construction; a run where it is not exposes a harness bug.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from localizers.base import Localizer, LocalizerError, register_localizer


@register_localizer
class PFL(Localizer):
    name = "pfl"
    scope = "all"
    summary = "the ground truth (reference row)"
    needs_ground_truth = True

    @dataclass
    class Settings:
        fault: dict | None = None  # {layer: [channels]}, given by the harness

    def scores(self, model, neuron_map, clean, *, device=None, seed=0):
        fault = self.settings.fault
        if fault is None:
            raise LocalizerError("pfl needs the ground truth: get_localizer('pfl', fault=label.fault)")
        sel = neuron_map.validate(fault)
        out = {}
        for layer, n in neuron_map.sizes.items():
            s = torch.zeros(n)
            s[sel.get(layer, [])] = 1.0
            out[layer] = s
        return out
