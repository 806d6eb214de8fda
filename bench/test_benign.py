"""Benign controls (issue 15): what the localizers say about a model without a backdoor, and
what each entry's trigger does to its benign parent.

* ``test_benign_localization[clp-benign-cifar10-vgg13]``: one case per localizer (those that need
  no ground truth) x benign parent. Nothing to score against: the case records the time and the
  summary of the scores (``score_max_z``, ``score_p99_z``, ``score_max``), the statistic the
  reports' detection AUROC compares with the same summary on the infected entries.
* ``test_benign_trigger[cifar10-vgg13-badnets-narrow-00]``: the entry's trigger on its benign
  parent, the natural-backdoor baseline next to the entry's ASR (Table II's "benign" column).

Both run through ``bd4nn.cases`` (``benign_case``, ``benign_trigger_case``).
"""

from __future__ import annotations

from bench.plugin import bench_case


@bench_case("benign")
def test_benign_localization(run_case, localizer_name, parent_id):
    out = run_case(localizer_name=localizer_name, parent_id=parent_id)
    assert not out.problems, "; ".join(out.problems)


@bench_case("benign_trigger")
def test_benign_trigger(run_case, entry_id):
    out = run_case(entry_id=entry_id)
    assert not out.problems, "; ".join(out.problems)
