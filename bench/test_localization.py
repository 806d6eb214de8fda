"""One case per localizer × entry: score, take the top-k per layer, compare with the truth
(``bd4nn.cases.localization_case``)."""

from __future__ import annotations

from bench.plugin import bench_case


@bench_case("localization")
def test_localization(run_case, benchmark, localizer_name, entry_id):
    # pytest-benchmark times the call when serial; under xdist it disables itself and just runs it
    out = run_case(localizer_name=localizer_name, entry_id=entry_id,
                   call=lambda fn, *a, **kw: benchmark.pedantic(fn, args=a, kwargs=kw, rounds=1, iterations=1))
    benchmark.extra_info.update(out.record)
    assert not out.problems, "; ".join(out.problems)
