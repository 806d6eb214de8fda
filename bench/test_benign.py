"""Benign controls (issue 15): what the localizers say about a model without a backdoor, and
what each entry's trigger does to its benign parent.

* ``test_benign_localization[clp-benign-cifar10-vgg13]``: one case per localizer (those that need
  no ground truth) x benign parent. Nothing to score against: the case records the time and the
  summary of the scores (``score_max_z``, ``score_p99_z``, ``score_max``), the statistic the
  reports' detection AUROC compares with the same summary on the infected entries.
* ``test_benign_trigger[cifar10-vgg13-badnets-narrow-00]``: the entry's trigger on its benign
  parent, the natural-backdoor baseline next to the entry's ASR (Table II's "benign" column).
"""

from __future__ import annotations

import math

from bd4nn.harness import benign_localization, model_unchanged, snapshot, trigger_asr_on_parent


def test_benign_localization(bench, record, localizer_name, parent_id):
    ctx = bench.benign_context(parent_id)
    before = snapshot(ctx.model)
    out = benign_localization(ctx, bench.localizer(localizer_name, None), seed=bench.seed)
    metrics = record("benign", localizer=localizer_name, repair=None, entry=ctx.id, dataset=ctx.dataset,
                     arch=ctx.arch, **out)
    assert model_unchanged(before, ctx.model), f"{localizer_name} modified the model it was given"
    for key in ("time_s", "score_max_z", "score_max"):
        assert metrics[key] is not None and math.isfinite(metrics[key]), (key, metrics[key])


def test_benign_trigger(bench, record, entry_id):
    ctx = bench.context(entry_id)
    parent = bench.benign_context(f"{ctx.label.dataset}-{ctx.label.arch}").model
    asr = trigger_asr_on_parent(ctx, parent)
    record("benign_trigger", localizer=None, repair=None, **ctx.fields(), benign_asr=asr)
    assert 0.0 <= asr <= 1.0
