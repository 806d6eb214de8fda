"""What machine a run is on, and how fast it is right now: the context that makes a time
comparable with another run's.

A localizer's time on a baseline says little about a regression unless both runs used the same
kind of machine under the same load: on this project's 2-core CPU, 17 cases of an unchanged
commit failed on time alone while another job shared the cores. ``machine_info`` records the
device, CPU model, cores, torch threads and load average in every results header, and
``calibrate`` times one fixed piece of work, a forward and backward pass of a width-1/8 VGG-13
on 64 images, at the thread count the cases use. The harness scales a baseline's times by the
ratio of the two runs' calibrations (``bd4nn.results.Baseline``), which absorbs a slower CPU or
a loaded one, and does not compare times across device kinds (a CPU run with a GPU run).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from bd4nn.runtime import cpu_cores

__all__ = ["cpu_model", "machine_info", "describe", "calibrate", "device_kind"]


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_kind(device: str | torch.device) -> str:
    """``cpu`` or the GPU's name: the machine class that times are compared within."""
    dev = torch.device(device)
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover (not Unix)
        return None


def machine_info(device: str | torch.device = "cpu") -> dict[str, Any]:
    """Device kind, CPU model, cores, torch threads, 1-minute load average."""
    return {"device_kind": device_kind(device), "cpu": cpu_model(), "cores": cpu_cores(),
            "threads": torch.get_num_threads(), "load": _load()}


def describe(device: str | torch.device = "cpu") -> str:
    """One line for a report: ``<GPU name>`` or ``<CPU model>, N cores, T torch threads, no GPU``."""
    info = machine_info(device)
    if info["device_kind"] != "cpu":
        return info["device_kind"]
    return f"{info['cpu']}, {info['cores']} cores, {info['threads']} torch threads, no GPU"


def calibrate(device: str | torch.device = "cpu", *, steps: int = 5, repeats: int = 5) -> float:
    """Seconds for ``steps`` forward+backward passes of a width-1/8 VGG-13 on 64 images, the
    median of ``repeats`` timings after one warm-up (about a second on a 2-core CPU)."""
    from bd4nn.models import get_model  # noqa: PLC0415 (models import this module's neighbours)
    from bd4nn.runtime import place  # noqa: PLC0415

    dev = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = place(get_model("vgg13", 10, 0.125), dev).train()
    x = torch.rand(64, 3, 32, 32, generator=gen).to(dev)
    y = torch.randint(0, 10, (64,), generator=gen).to(dev)

    def work() -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            model.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - t0

    work()
    return statistics.median(work() for _ in range(repeats))
