"""One case per localizer × repair × entry: repair what the localizer found; CAD and ASRD."""

from __future__ import annotations

import math

from bd4nn.harness import repair_case


def test_repair(bench, record, localizer_name, repair_name, entry_id):
    ctx = bench.context(entry_id)
    found = bench.localization(localizer_name, entry_id)
    settings = bench.settings("finetune")
    from bd4nn.repair import FinetuneSettings

    res = repair_case(ctx, found.selection, repair_name, seed=bench.seed,
                      finetune_settings=FinetuneSettings(**settings) if settings else None)
    metrics = record("repair", localizer=localizer_name, repair=repair_name, **ctx.fields(),
                     wji=found.wji, hits=found.hits, n_fault=found.n_fault, n_localized=found.n_localized,
                     time_s=res.seconds, ca_before=res.ca_before, asr_before=res.asr_before,
                     ca_after=res.ca_after, asr_after=res.asr_after, cad=res.cad, asrd=res.asrd)
    for key in ("ca_before", "asr_before", "ca_after", "asr_after", "cad", "asrd"):
        assert math.isfinite(metrics[key]) and -1.0 <= metrics[key] <= 1.0, (key, metrics[key])
    if localizer_name == "pfl" and repair_name == "prune":
        # pruning S_fault (BN γ=β=0) is the masking of rule 3, so ASRD is the label's ASR.Cor
        assert res.asrd > 0.5
        assert abs(res.asrd - ctx.label.asr_cor) <= 0.02
