"""``pytest bench/ --ray ADDRESS``: the collected cases run as Ray tasks, reported here.

pytest collects and selects the cases as always (``-k``, ``--entries``, ``--localizers``,
``--repairs``), so the case set and node ids are those of a run without ``--ray``. Instead of
running them, this loop sends them to the cluster (``bd4nn.cluster.RayBench``), one task per
group of cases that share an entry (or benign parent) and a localizer, so a repair reuses its
localization as in one pytest process. Each finished case is reported to pytest as a report of
its own node (setup, call, teardown), its record in ``user_properties``: the recorder
(``bench.session.Recorder``) writes the same results line and compares it with the baseline as
for a case run here, and the terminal shows it. A test function without a case kind
(``@bench_case``) runs here, as usual.
"""

from __future__ import annotations

import time

import pytest

from bench.plugin import CASE_KIND
from bench.session import RESULTS_KEY


def case_of(item: pytest.Item) -> tuple[str, dict] | None:
    """(kind, parameters) of a collected case, or None for a test without a case kind."""
    kind = getattr(getattr(item, "function", None), CASE_KIND, None)
    callspec = getattr(item, "callspec", None)
    return None if kind is None or callspec is None else (kind, dict(callspec.params))


def group_key(params: dict) -> tuple:
    """Cases of one task: the same entry (or benign parent) and localizer."""
    return params.get("entry_id") or params.get("parent_id"), params.get("localizer_name")


def report(item: pytest.Item, result) -> None:
    """Tell pytest (terminal, recorder, exit status) that ``item`` ran with ``result``
    (``bd4nn.cluster.CaseResult``)."""
    ihook, now = item.ihook, time.time()
    if result.error is not None:
        outcome, longrepr = "failed", result.error
    elif result.problems:
        outcome, longrepr = "failed", "AssertionError: " + "; ".join(result.problems)
    else:
        outcome, longrepr = "passed", None
    props = [(RESULTS_KEY, result.record)] if result.record is not None else []
    keywords = {k: 1 for k in item.keywords}
    ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    for when in ("setup", "call", "teardown"):
        call = when == "call"
        rep = pytest.TestReport(item.nodeid, item.location, keywords, outcome if call else "passed",
                                longrepr if call else None, when, duration=result.seconds if call else 0.0,
                                start=now, stop=now, user_properties=props if call else [])
        ihook.pytest_runtest_logreport(report=rep)
    ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)


def run_on_ray(session: pytest.Session, ray_bench) -> None:
    """Run ``session.items`` on the cluster (those without a case kind here), reporting each."""
    groups: dict[tuple, list[tuple[pytest.Item, tuple[str, dict]]]] = {}
    for item in session.items:
        case = case_of(item)
        if case is None:
            item.config.hook.pytest_runtest_protocol(item=item, nextitem=None)
            continue
        groups.setdefault(group_key(case[1]), []).append((item, case))
    batches = list(groups.values())
    finished = ray_bench.run([[case for _, case in batch] for batch in batches])
    try:
        for i, results in finished:
            for (item, _), result in zip(batches[i], results):
                report(item, result)
            if session.shouldfail or session.shouldstop:  # -x / --maxfail
                break
    finally:
        finished.close()  # cancels the tasks not finished yet
