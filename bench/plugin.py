"""The pytest plugin of the benchmark harness (``pytest bench/``), loaded by the root
``conftest.py`` through ``pytest_plugins``.

* options ``--db`` (or ``BD4NN_DB``; default: the ``--profile`` database, ``tiny`` unless told,
  built on first use into ``$BD4NN_CACHE/db-<profile>`` or ``~/.cache/bd4nn/db-<profile>``),
  ``--profile``, ``--localizers``, ``--entries``, ``--repairs``, ``--results``, ``--baseline``;
* the database is built (or resumed) once, by the controller, before any worker starts;
* one results file per run: the controller writes a header, the database's directory lines,
  then one line per case from each report's ``user_properties`` (so it works under xdist);
* with ``--baseline``, every case is compared as its report arrives and the regressions are
  listed once at the end of the session, which then fails (``bench.session.Recorder``);
* under xdist each worker pins itself to ``cuda:(worker index mod device count)``, or the CPU;
* pytest-benchmark's statistics table is off unless ``--benchmark-enable`` is given;
* with ``--ray ADDRESS`` the cases run as Ray tasks on a cluster instead of in this process
  (``bench/ray_cases.py``), and are reported and recorded here as if they had run here.

Each case test is marked with its kind (``@bench_case("localization")``) and runs its case
through ``bd4nn.cases`` (the ``run_case`` fixture), the code a Ray task runs for it too.
"""

from __future__ import annotations

from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------------- options
def pytest_addoption(parser: pytest.Parser) -> None:
    from bd4nn.argtypes import device as device_arg  # refuses a device this machine lacks, at once
    from bd4nn.results import TOLERANCES  # the one home of the defaults

    g = parser.getgroup("bd4nn", "bd4nn benchmark harness (pytest bench/)")
    g.addoption("--db", default=None, help="database folder (default: $BD4NN_DB, else the --profile "
                "database built on first use in the cache folder)")
    g.addoption("--profile", default=None, help="profile of the database and of the harness settings "
                "(tiny, paper or a .toml path; default: the one the database was built with, else tiny)")
    g.addoption("--localizers", default=None, help="comma-separated localizers (default: all registered)")
    g.addoption("--entries", default=None, help="comma-separated entry ids or shell patterns "
                "(e.g. 'cifar10-vgg13-*-narrow-*')")
    g.addoption("--repairs", default="prune,finetune", help="comma-separated repairs for test_repair.py")
    g.addoption("--results", default=None, help="results file (default: results/<run>.jsonl)")
    g.addoption("--baseline", default=None, help="results/baseline file to compare WJI and time with")
    g.addoption("--wji-tolerance", type=float, default=TOLERANCES["wji_tol"], help="allowed WJI drop vs the baseline")
    g.addoption("--time-factor", type=float, default=TOLERANCES["time_factor"],
                help="allowed time: factor x baseline + slack")
    g.addoption("--time-slack", type=float, default=TOLERANCES["time_slack"], help="seconds added to the allowed time")
    g.addoption("--repair-tolerance", type=float, default=TOLERANCES["repair_tol"],
                help="allowed ASRD drop and CAD rise of a repair case vs the baseline")
    g.addoption("--bench-seed", type=int, default=0, help="seed given to every localizer and repair")
    g.addoption("--device", type=device_arg, default=None, help="device for serial runs (default: cuda if available)")
    g.addoption("--threads", type=int, default=None, help="torch threads per process (default: "
                "$BD4NN_THREADS, else the cores divided by the number of xdist workers; with --ray: 1 per task)")
    g.addoption("--ray", default=None, metavar="ADDRESS", help="run the cases as Ray tasks on the cluster at "
                "ADDRESS (auto, HOST:PORT, or local: a new cluster here), one GPU each where it has GPUs; needs "
                'pip install -e ".[ray]"')


CASE_KIND = "bd4nn_case"  # the attribute that names a test function's case kind (bd4nn.cases.CASES)


def bench_case(kind: str):
    """Mark a test function as running the cases of kind ``kind`` (a key of ``bd4nn.cases.CASES``)
    with its parameters: ``run_case`` runs it here, ``--ray`` on the cluster."""
    from bd4nn.cases import CASES  # noqa: PLC0415

    if kind not in CASES:
        raise KeyError(f"unknown case kind {kind!r}; known: {', '.join(CASES)}")

    def deco(fn):
        setattr(fn, CASE_KIND, kind)
        return fn

    return deco


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def _wants_bench(config: pytest.Config) -> bool:
    for arg in config.args:
        path = Path(str(arg).split("::")[0])
        path = path if path.is_absolute() else Path(config.invocation_params.dir) / path
        try:
            path.resolve().relative_to(BENCH_DIR)
            return True
        except ValueError:
            continue
    return False


@pytest.hookimpl(tryfirst=True)  # before pytest-benchmark reads its options
def pytest_configure(config: pytest.Config) -> None:
    config._bd4nn = None  # type: ignore[attr-defined]
    if not _wants_bench(config):
        return
    if hasattr(config.option, "benchmark_disable") and not getattr(config.option, "benchmark_enable", False):
        # one round per case: pytest-benchmark's per-case statistics table only with --benchmark-enable
        # (the results file and the end-of-run tables hold every case's time anyway)
        config.option.benchmark_disable = True
    from bench.session import BenchSession  # noqa: PLC0415 (only for benchmark runs)

    from bd4nn.cli import _user_errors  # noqa: PLC0415

    try:
        session = BenchSession.from_config(config, build=not _is_worker(config))
    except (ValueError, *_user_errors()) as exc:  # a bad --db, --profile or --baseline
        raise pytest.UsageError(f"bd4nn: {exc}") from None
    config._bd4nn = session  # type: ignore[attr-defined]
    if not _is_worker(config):
        config.pluginmanager.register(session.recorder(), "bd4nn-results")


def bench_session(config: pytest.Config):
    s = getattr(config, "_bd4nn", None)
    if s is None:
        pytest.skip("benchmark cases run with `pytest bench/` (the harness was not configured)")
    return s


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session: pytest.Session):
    """With ``--ray``: run the collected cases on the Ray cluster (``bench/ray_cases.py``)."""
    s = getattr(session.config, "_bd4nn", None)
    if s is None or s.ray is None or session.config.option.collectonly:
        return None
    if session.testsfailed and not session.config.option.continue_on_collection_errors:
        raise session.Interrupted(f"{session.testsfailed} error(s) during collection")
    from bench.ray_cases import run_on_ray  # noqa: PLC0415

    run_on_ray(session, s.ray)
    return True
