"""One case per entry: re-measure CA, ASR and ASR.Cor and compare with the label (RobustBench-style),
with the check and tolerance of ``bd4nn verify --remeasure`` (``bd4nn.verify``)."""

from __future__ import annotations

from bd4nn.inject import ASR_COR_THRESHOLD
from bd4nn.verify import differences, remeasure_context


def test_database(bench, record, entry_id):
    ctx = bench.context(entry_id)
    m = remeasure_context(ctx)
    record("database", localizer=None, repair=None, **ctx.fields(), ca_now=m.ca, asr_now=m.asr,
           asr_cor_now=m.asr_cor)
    problems = differences(ctx.label, m)
    assert not problems, "; ".join(problems)
    assert m.asr_cor > ASR_COR_THRESHOLD, "a kept entry must pass rule 3"
