"""One case per entry: re-measure CA, ASR and ASR.Cor and compare with the label (RobustBench-style),
with the check and tolerance of ``bd4nn verify --remeasure`` (``bd4nn.cases.database_case``)."""

from __future__ import annotations

from bench.plugin import bench_case


@bench_case("database")
def test_database(run_case, entry_id):
    out = run_case(entry_id=entry_id)
    assert not out.problems, "; ".join(out.problems)
