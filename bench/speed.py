"""Training speed of bd4nn's loop against a bare PyTorch loop, in the same run (a benchmark, not a test).

    python bench/speed.py                                  # VGG-13 and ResNet-18 at widths 1/8 and 1/4
    python bench/speed.py --archs vgg13 --widths 0.125 --threads 1 --batch 256 --steps 40

For each architecture and width it times, on the same model, batch size and optimizer (SGD with
Nesterov momentum and weight decay):

* **bare**: the loop anyone would write: index a batch of the uint8 training tensor, convert it to
  float, forward, cross-entropy, backward, step — no augmentation, no schedule, no bookkeeping;
* **benign**: ``bd4nn.train.train`` as the benign build runs it (random crop and flip on the
  device, one-cycle schedule, running loss and accuracy);
* **restricted**: ``bd4nn.train.train`` as an injection runs it: only a 5 % window of every
  neuron layer plus the head is trained, BadNets is stamped on 10 % of each batch after
  augmentation, and every frozen entry is written back after each step.

Every loop uses the memory format bd4nn chooses for the device (``bd4nn.runtime``), so the ratio
measures the loop's own cost. The images are random (speed does not depend on content). Each
figure is the best of ``--repeats`` timed runs after one warm-up run; runs of the three loops are
interleaved so that a change in machine load hits all of them alike. The target is a ratio of at
least 0.90 for both bd4nn loops.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bd4nn.attacks import get_attack  # noqa: E402
from bd4nn.attacks.base import poison_hook, poison_indices  # noqa: E402
from bd4nn.inject import candidate_selection  # noqa: E402
from bd4nn.models import get_model  # noqa: E402
from bd4nn.neurons import NeuronMap  # noqa: E402
from bd4nn.runtime import set_threads, use_channels_last  # noqa: E402
from bd4nn.train import TrainConfig, resolve_device, train  # noqa: E402
from bd4nn.argtypes import device as device_arg


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def bare_loop(model, x, y, cfg: TrainConfig, dev: torch.device) -> float:
    """Seconds of one epoch of the plain loop over (x, y)."""
    cl = use_channels_last(dev, cfg.channels_last)
    model.to(dev).train()
    if cl:
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
                          weight_decay=cfg.weight_decay)
    bs = cfg.batch_size
    perm = torch.randperm(len(y), device=dev)
    _sync(dev)
    t0 = time.perf_counter()
    for b in range(len(y) // bs):
        idx = perm[b * bs:(b + 1) * bs]
        xb = x[idx].float().div_(255.0)
        if cl:
            xb = xb.contiguous(memory_format=torch.channels_last)
        loss = F.cross_entropy(model(xb), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync(dev)
    return time.perf_counter() - t0


def measure(arch: str, width: float, *, batch: int, steps: int, repeats: int, dev: torch.device) -> dict:
    n = batch * steps
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g).to(dev)
    y = torch.randint(0, 10, (n,), generator=g).to(dev)
    cfg = TrainConfig(epochs=1, batch_size=batch, lr=0.05, weight_decay=5e-4, label_smoothing=0.0)
    template = get_model(arch, 10, width, seed=0)
    nm = NeuronMap(template)
    ranking = {layer: list(range(size)) for layer, size in nm.sizes.items()}
    selection = candidate_selection(ranking, "small", 0)
    attack = get_attack("badnets", target=0, seed=0)
    trigger = attack.make_trigger()
    hook = poison_hook(poison_indices(y.cpu(), 0.1, 0, 0), n, trigger, 0, dev)

    def run(kind: str) -> float:
        model = get_model(arch, 10, width, seed=0)
        if kind == "bare":
            return bare_loop(model, x, y, cfg, dev)
        if kind == "benign":
            return train(model, x, y, cfg, device=dev, progress=False).seconds
        return train(model, x, y, cfg, device=dev, restrict=selection, neuron_map=NeuronMap(model),
                     train_head=True, batch_hook=hook, progress=False).seconds

    kinds = ("bare", "benign", "restricted")
    for k in kinds:  # warm-up: oneDNN / cuDNN primitive creation, allocator
        run(k)
    best = {k: float("inf") for k in kinds}
    for _ in range(repeats):
        for k in kinds:
            best[k] = min(best[k], run(k))
    ips = {k: n / best[k] for k in kinds}
    return {"arch": arch, "width": width, "batch": batch, "images": n, "threads": torch.get_num_threads(),
            "bare": ips["bare"], "benign": ips["benign"], "restricted": ips["restricted"],
            "benign_ratio": ips["benign"] / ips["bare"], "restricted_ratio": ips["restricted"] / ips["bare"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", default=["vgg13", "resnet18"])
    p.add_argument("--widths", nargs="+", type=float, default=[0.125, 0.25])
    p.add_argument("--batch", type=int, default=256, help="batch size (default 256, the CPU profiles' size)")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per timed run (default 30)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per loop; the best counts (default 3)")
    p.add_argument("--threads", type=int, help="torch threads (default: $BD4NN_THREADS, else all cores)")
    p.add_argument("--device", type=device_arg, default="auto", help="cpu, cuda, ... (default: cuda if present)")
    p.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = p.parse_args(argv)

    from tabulate import tabulate

    dev = resolve_device(args.device)
    threads = set_threads(args.threads)
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{platform.machine()} CPU, {threads} threads"
    print(f"bd4nn training speed vs a bare PyTorch loop on {where}; batch {args.batch}, "
          f"{args.steps} steps a run, best of {args.repeats}; torch {torch.__version__}", flush=True)
    rows = []
    for arch in args.archs:
        for width in args.widths:
            r = measure(arch, width, batch=args.batch, steps=args.steps, repeats=args.repeats, dev=dev)
            rows.append(r)
            print(f"  {arch} width {width:g}: bare {r['bare']:.0f}, benign {r['benign']:.0f} "
                  f"({r['benign_ratio']:.2f}), restricted {r['restricted']:.0f} ({r['restricted_ratio']:.2f}) img/s",
                  file=sys.stderr, flush=True)
    table = [[r["arch"], f"{r['width']:g}", r["batch"], f"{r['bare']:.0f}", f"{r['benign']:.0f}",
              f"{r['benign_ratio']:.2f}", f"{r['restricted']:.0f}", f"{r['restricted_ratio']:.2f}"] for r in rows]
    print(tabulate(table, headers=["arch", "width", "batch", "bare img/s", "benign img/s", "benign / bare",
                                   "restricted img/s", "restricted / bare"], tablefmt="github"))
    worst = min(min(r["benign_ratio"], r["restricted_ratio"]) for r in rows)
    print(f"\nlowest ratio {worst:.2f} (target >= 0.90)")
    if args.json:
        args.json.write_text(json.dumps({"device": where, "torch": torch.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
