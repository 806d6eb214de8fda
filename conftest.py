"""Root pytest configuration shared by ``tests/`` (unit tests) and ``bench/`` (benchmark cases).

Datasets are read offline: ``BD4NN_DATA`` names a folder holding ``<name>.tar.xz`` archives
(``.ci/run`` points it at ``../shared/data``); when it is unset, ``../shared/data`` beside the
checkout is used if present. Tests that need a dataset skip with a clear reason otherwise.

The benchmark harness's options and session live in ``bench/plugin.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
pytest_plugins = ["bench.plugin"]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The folder holding the dataset archives (the rule of ``bd4nn.data.data_folder``)."""
    from bd4nn.data import data_folder

    d = data_folder(fallbacks=[ROOT.parent / "shared" / "data"])
    if d is None or not d.is_dir():
        pytest.skip("no dataset folder: set BD4NN_DATA to a folder holding cifar10.tar.xz")
    return d
