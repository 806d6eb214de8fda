"""One case per entry: re-measure CA, ASR and ASR.Cor and compare with the label (RobustBench-style)."""

from __future__ import annotations

from bd4nn.inject import measure

TOLERANCE = 0.02


def test_database(bench, record, entry_id):
    ctx = bench.context(entry_id)
    lab = ctx.label
    m = measure(ctx.model, ctx.neuron_map, lab.s_fault, ctx.test_x, ctx.test_y, ctx.trigger, lab.target,
                device=ctx.device)
    record("database", localizer=None, repair=None, **ctx.fields(), ca_now=m.ca, asr_now=m.asr,
           asr_cor_now=m.asr_cor)
    assert abs(m.ca - lab.ca) <= TOLERANCE, f"CA {m.ca:.4f} vs label {lab.ca:.4f}"
    assert abs(m.asr - lab.asr) <= TOLERANCE, f"ASR {m.asr:.4f} vs label {lab.asr:.4f}"
    assert abs(m.asr_cor - lab.asr_cor) <= TOLERANCE, f"ASR.Cor {m.asr_cor:.4f} vs label {lab.asr_cor:.4f}"
    assert m.asr_cor > 0.5, "a kept entry must pass rule 3"
