"""Execution settings of a process: how many CPU threads torch uses, and the memory format.

**Threads.** torch's default (one intra-op thread per physical core) is right for one process on
an idle machine and wrong for several: two xdist workers with two threads each on a 2-core CPU
fight over the cores, and measured on this project's 2-core machine under load one tiny
candidate took 975 s at the default against 131 s with one thread. bd4nn therefore chooses the
count deliberately, once per process: ``threads = cores // workers`` (at least 1), unless the user
says otherwise with ``--threads`` on the CLI or ``BD4NN_THREADS`` in the environment. The count in
force is recorded in every database entry and every results header (``threads()``).

**The build's threads are fixed.** A convolution's sums are split across threads, so the same
training run at 1 and at 2 threads differs in the last bits after one step, and those bits grow
into other weights, scores and WJIs (measured: the tiny parents' hashes differ between 1 and 2
threads, which moved CLP's WJI on one entry from 0.1331 to 0.1408). ``bd4nn.build`` therefore
runs at ``BUILD_THREADS`` (1) whatever the process's count (``pinned_threads``), and uses more
cores with more processes (``build --workers``), which leaves every candidate's arithmetic
unchanged. What still varies between machines is the kernel oneDNN picks for the CPU's
instruction set (AVX2, AVX-512, AMX) and the torch version.

**Memory format.** channels_last (NHWC) is faster for the CIFAR convnets on both CUDA and the
CPU (oneDNN), so it is the default everywhere (``use_channels_last``). A model's memory format
decides how its convolutions round, and so the last bits of every activation, score and tie
between equal scores: a model loaded for measuring or benchmarking is placed with ``place``
(device *and* format) once, so every localizer, repair and re-measurement sees the same
arithmetic, whatever ran before it in the process.

**Precision.** On CUDA the training loop, evaluation, the localizers and the repairs run under
bf16 autocast (``autocast``). The CPU runs fp32 unless ``BD4NN_BF16=1``: then it takes the very
same path, ``torch.autocast("cpu", dtype=torch.bfloat16)`` plus channels_last, so dtype and
layout bugs of the GPU path show up on a CPU-only machine (slowly: a CPU without bf16 units
emulates it). ``BD4NN_BF16=0`` turns autocast off on CUDA too.

**Inference batch.** On the CPU a forward pass without gradients runs fastest at a batch small
enough for its activations to stay in cache: measured on the 2-core machine (width-1/8 `small`
parents, fp32, channels_last), batch 128 against 1024 gave 2.4x the img/s for VGG-13 and 2.8x for
ResNet-18 with two threads, 2.2x and 2.4x with one. Accelerators want the large batch
(``eval_batch_size``).

**Float conversion.** Images travel as uint8 and become float [0,1] at the last moment
(``to_float``), on the device.

**Reading a model without changing it.** ``frozen`` runs a model in eval mode with its
parameters out of autograd and restores every module's mode and every parameter's
``requires_grad`` on exit; ``working_copy`` gives a model on the wanted device without moving
the caller's (a deep copy only when the devices differ).
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch import nn

__all__ = ["THREADS_ENV", "BF16_ENV", "BUILD_THREADS", "cpu_cores", "default_threads", "set_threads", "threads",
           "pinned_threads",
           "use_channels_last", "place", "eval_batch_size", "cuda_path", "amp_enabled", "autocast", "to_float", "PeakMemory",
           "frozen", "model_device", "working_copy"]

THREADS_ENV = "BD4NN_THREADS"
BF16_ENV = "BD4NN_BF16"
BUILD_THREADS = 1  # torch threads inside every build process (module docstring)
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


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


@contextmanager
def pinned_threads(n: int) -> Iterator[int]:
    """Run the block at ``n`` torch threads, then restore the count in force before."""
    before = torch.get_num_threads()
    set_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)


def threads() -> int:
    """The intra-op thread count in force (recorded in entries and results)."""
    return torch.get_num_threads()


def use_channels_last(device: torch.device, requested: bool | None = None) -> bool:
    """Whether to run convnets in channels_last on ``device``: ``requested``, else yes on CUDA and
    on the CPU (faster on both, module docstring)."""
    if requested is not None:
        return bool(requested)
    return device.type in ("cuda", "cpu")


CPU_EVAL_BATCH = 128  # module docstring, "Inference batch"
ACCELERATOR_EVAL_BATCH = 1024


def eval_batch_size(device: torch.device | str) -> int:
    """The batch of a gradient-free forward pass on ``device``: small on the CPU, large elsewhere."""
    return CPU_EVAL_BATCH if torch.device(device).type == "cpu" else ACCELERATOR_EVAL_BATCH


def place(model: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """Move ``model`` to ``device`` in bd4nn's memory format for it (in place; returns it)."""
    dev = torch.device(device)
    model.to(dev)
    if use_channels_last(dev):
        model.to(memory_format=torch.channels_last)
    return model


def _bf16_env() -> bool | None:
    env = os.environ.get(BF16_ENV, "").strip().lower()
    if env in _TRUE:
        return True
    if env in _FALSE:
        return False
    if env:
        raise ValueError(f"{BF16_ENV} must be 1 or 0, not {env!r}")
    return None


def cuda_path(device: torch.device | str) -> bool:
    """Whether work on ``device`` takes bd4nn's CUDA code path (bf16 autocast, and channels_last
    where a localizer enables it only there): on CUDA, and on the CPU with ``BD4NN_BF16=1``."""
    dev = torch.device(device)
    return dev.type == "cuda" or (dev.type == "cpu" and _bf16_env() is True)


def amp_enabled(device: torch.device | str, requested: bool | None = None) -> bool:
    """Whether work on ``device`` runs under bf16 autocast: ``requested``, else ``$BD4NN_BF16``
    (1/0), else yes on CUDA and no elsewhere (module docstring)."""
    if requested is not None:
        return bool(requested)
    env = _bf16_env()
    if env is False:
        return False
    return cuda_path(device)


def autocast(device: torch.device | str, enabled: bool | None = None) -> AbstractContextManager:
    """bf16 autocast on ``device`` when ``amp_enabled(device, enabled)``, else a no-op context."""
    dev = torch.device(device)
    if amp_enabled(dev, enabled) and dev.type in ("cuda", "cpu"):
        return torch.autocast(dev.type, dtype=torch.bfloat16)
    return nullcontext()


def to_float(x: torch.Tensor, *, copy: bool = False) -> torch.Tensor:
    """uint8 images (0..255) as float32 in [0,1]; float images as float32 (the same tensor when
    it already is float32, unless ``copy``)."""
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    return x.float().clone() if copy and x.dtype == torch.float32 else x.float()


class PeakMemory:
    """Peak memory of a stage: ``with PeakMemory(device) as m: ...`` then ``m.peak_mib``.

    On CUDA: ``torch.cuda.max_memory_allocated`` since the stage began (tensors only; the caching
    allocator reserves a little more). On the CPU (Linux): the process's peak resident set
    (``VmHWM``), reset at the start of the stage through ``/proc/self/clear_refs``; it includes
    everything the process holds (Python, torch, the datasets), so ``start_mib`` gives the
    resident set when the stage began and ``delta_mib`` what the stage added on top. The peak is
    an upper bound of the stage's footprint; the delta can be an underestimate in a long process,
    whose freed heap pages stay resident and are reused without raising the resident set.
    Elsewhere the figures are None.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.start_mib: float | None = None
        self.peak_mib: float | None = None

    @staticmethod
    def _status(key: str) -> float | None:
        try:
            with open("/proc/self/status") as f:
                m = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M)
        except OSError:
            return None
        return int(m.group(1)) / 1024 if m else None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_mib = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset VmHWM to the current resident set
            except OSError:
                pass
            self.start_mib = self._status("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self.peak_mib = self._status("VmHWM")

    @property
    def delta_mib(self) -> float | None:
        if self.peak_mib is None or self.start_mib is None:
            return None
        return max(0.0, self.peak_mib - self.start_mib)


# ---------------------------------------------------------------------------- models


@contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and ``requires_grad=False`` on every parameter inside the block; on exit each
    module gets back its own ``training`` flag (a model in mixed modes stays mixed) and each
    parameter its ``requires_grad``."""
    modes = [(m, m.training) for m in model.modules()]
    req = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for m, _ in modes:
            m.training = False
        for p, _ in req:
            p.requires_grad_(False)
        yield model
    finally:
        for p, r in req:
            p.requires_grad_(r)
        for m, t in modes:
            m.training = t


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (else buffer; a model with neither: the CPU)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def working_copy(model: nn.Module, device: torch.device | str | None) -> tuple[nn.Module, torch.device]:
    """``(model, device)`` to run on: the caller's model itself when it already lives on
    ``device`` (default: its own device), else a deep copy moved there, so that the caller's
    model never changes device. A bare ``cuda`` means the current CUDA device."""
    own = model_device(model)
    dev = torch.device(device) if device is not None else own
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if own == dev:
        return model, dev
    return copy.deepcopy(model).to(dev), dev

