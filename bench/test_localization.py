"""One case per localizer × entry: score, take the top-k per layer, compare with the truth."""

from __future__ import annotations

import math

import pytest

from bd4nn.harness import localize, model_unchanged, snapshot


def test_localization(bench, record, benchmark, localizer_name, entry_id):
    ctx = bench.context(entry_id)
    loc = bench.localizer(localizer_name, ctx.label)
    before = snapshot(ctx.model)
    # pytest-benchmark times the call when serial; under xdist it disables itself and just runs it
    result = benchmark.pedantic(localize, args=(ctx, loc), kwargs={"seed": bench.seed}, rounds=1, iterations=1)
    bench.remember(localizer_name, entry_id, result)
    metrics = record("localization", localizer=localizer_name, repair=None, **ctx.fields(), **result.metrics())
    benchmark.extra_info.update(metrics)

    assert model_unchanged(before, ctx.model), f"{localizer_name} modified the model it was given"
    assert 0.0 <= result.wji <= 1.0
    assert result.n_localized <= result.n_fault
    for key in ("wji", "time_s", "hits", "n_fault", "n_localized"):
        assert math.isfinite(metrics[key]), f"{key} is not finite: {metrics[key]}"
    if localizer_name == "pfl":
        assert result.wji == pytest.approx(1.0, abs=1e-9)
        assert result.hits == result.n_fault
