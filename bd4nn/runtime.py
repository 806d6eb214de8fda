"""Execution settings of a process: how many CPU threads torch uses, and the memory format.

**Threads.** torch's default (one intra-op thread per physical core) is right for one process on
an idle machine and wrong for several: two xdist workers with two threads each on a 2-core CPU
fight over the cores, and measured on this project's 2-core machine under load one tiny
candidate took 975 s at the default against 131 s with one thread. bd4nn therefore chooses the
count deliberately, once per process: ``threads = cores // workers`` (at least 1), unless the user
says otherwise with ``--threads`` on the CLI or ``BD4NN_THREADS`` in the environment. The count in
force is recorded in every database entry and every results header (``threads()``).

**Memory format.** channels_last (NHWC) is faster for the CIFAR convnets on both CUDA and the
CPU (oneDNN), so it is the default everywhere (``use_channels_last``). A model's memory format
decides how its convolutions round, and so the last bits of every activation, score and tie
between equal scores: a model loaded for measuring or benchmarking is placed with ``place``
(device *and* format) once, so every localizer, repair and re-measurement sees the same
arithmetic, whatever ran before it in the process.
"""

from __future__ import annotations

import os

import torch

__all__ = ["THREADS_ENV", "cpu_cores", "default_threads", "set_threads", "threads", "use_channels_last", "place"]

THREADS_ENV = "BD4NN_THREADS"


def cpu_cores() -> int:
    """Cores this process may run on (its CPU affinity, else ``os.cpu_count()``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover (not Linux)
        return max(1, os.cpu_count() or 1)


def default_threads(workers: int = 1) -> int:
    """``$BD4NN_THREADS`` if set, else the cores shared evenly by ``workers`` processes."""
    env = os.environ.get(THREADS_ENV, "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"{THREADS_ENV} must be a whole number of threads, not {env!r}") from None
        if n < 1:
            raise ValueError(f"{THREADS_ENV} must be >= 1, got {n}")
        return n
    return max(1, cpu_cores() // max(1, int(workers)))


def set_threads(n: int | None = None, *, workers: int = 1) -> int:
    """Set torch's intra-op thread count to ``n`` (else ``default_threads(workers)``); returns it."""
    count = int(n) if n is not None else default_threads(workers)
    if count < 1:
        raise ValueError(f"threads must be >= 1, got {count}")
    torch.set_num_threads(count)
    return count


def threads() -> int:
    """The intra-op thread count in force (recorded in entries and results)."""
    return torch.get_num_threads()


def use_channels_last(device: torch.device, requested: bool | None = None) -> bool:
    """Whether to run convnets in channels_last on ``device``: ``requested``, else yes on CUDA and
    on the CPU (faster on both, module docstring)."""
    if requested is not None:
        return bool(requested)
    return device.type in ("cuda", "cpu")


def place(model: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """Move ``model`` to ``device`` in bd4nn's memory format for it (in place; returns it)."""
    dev = torch.device(device)
    model.to(dev)
    if use_channels_last(dev):
        model.to(memory_format=torch.channels_last)
    return model
