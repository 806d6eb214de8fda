"""One case per localizer × repair × entry: repair what the localizer found; CAD and ASRD
(``bd4nn.cases.repair_case``)."""

from __future__ import annotations

from bench.plugin import bench_case


@bench_case("repair")
def test_repair(run_case, localizer_name, repair_name, entry_id):
    out = run_case(localizer_name=localizer_name, repair_name=repair_name, entry_id=entry_id)
    assert not out.problems, "; ".join(out.problems)
