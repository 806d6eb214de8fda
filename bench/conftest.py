"""Parametrization and fixtures of the benchmark cases (options live in ``bench/plugin.py``).

Case ids read like the database: ``clp-cifar10-vgg13-badnets-narrow-00`` for a localization,
``clp-prune-cifar10-vgg13-badnets-narrow-00`` for a repair, ``cifar10-vgg13-badnets-narrow-00``
for a database re-measurement, ``clp-benign-cifar10-vgg13`` for a localizer on a benign parent,
so ``-k clp``, ``-k benign`` or ``-k "vgg13 and narrow"`` select as expected.
"""

from __future__ import annotations

import pytest

from bd4nn.cases import run_case as run
from bench.plugin import CASE_KIND, bench_session
from bench.session import RESULTS_KEY


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    s = getattr(metafunc.config, "_bd4nn", None)
    if s is None:
        return
    names = set(metafunc.fixturenames)
    if {"localizer_name", "parent_id"} <= names:  # controls: localizers on the benign parents
        cases = [(loc, par) for par in s.parents for loc in s.control_localizers]
        metafunc.parametrize("localizer_name,parent_id", cases, ids=[f"{loc}-benign-{par}" for loc, par in cases])
    elif {"localizer_name", "entry_id", "repair_name"} <= names:
        cases = [(loc, rep, e) for e in s.entry_ids for loc in s.localizers for rep in s.repairs]
        metafunc.parametrize("localizer_name,repair_name,entry_id", cases,
                             ids=[f"{loc}-{rep}-{e}" for loc, rep, e in cases])
    elif {"localizer_name", "entry_id"} <= names:
        cases = [(loc, e) for e in s.entry_ids for loc in s.localizers]
        metafunc.parametrize("localizer_name,entry_id", cases, ids=[f"{loc}-{e}" for loc, e in cases])
    elif "entry_id" in names:
        metafunc.parametrize("entry_id", s.entry_ids, ids=s.entry_ids)


@pytest.fixture(scope="session")
def bench(request):
    """The benchmark session: database, caches, device, baseline."""
    return bench_session(request.config)


@pytest.fixture
def run_case(request, bench):
    """``run_case(**params)``: run this test's case (its ``@bench_case`` kind, ``bd4nn.cases``)
    here and attach its record to the report, so it reaches the results file through
    ``user_properties``, also under xdist; returns the ``CaseOutcome`` (the test asserts it has
    no problems, after the record is attached)."""
    kind = getattr(request.function, CASE_KIND)

    def _run(**params):
        out = run(bench.work, kind, **params)
        request.node.user_properties.append((RESULTS_KEY, out.record))
        return out

    return _run
