"""Root pytest configuration shared by ``tests/`` (unit tests) and ``bench/`` (benchmark cases).

Datasets are read offline: ``BD4NN_DATA`` names a folder holding ``<name>.tar.xz`` archives
(``.ci/run`` points it at ``../shared/data``); when it is unset, ``../shared/data`` beside the
checkout is used if present. Tests that need a dataset skip with a clear reason otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent


def shared_data_dir() -> Path | None:
    """The folder holding the dataset archives, or None."""
    env = os.environ.get("BD4NN_DATA")
    if env:
        return Path(env)
    candidate = ROOT.parent / "shared" / "data"
    return candidate if candidate.is_dir() else None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = shared_data_dir()
    if d is None or not d.is_dir():
        pytest.skip("no dataset folder: set BD4NN_DATA to a folder holding cifar10.tar.xz")
    return d
