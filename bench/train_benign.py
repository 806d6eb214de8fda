"""Benchmark (not a test): train benign models and print CA and seconds.

    python bench/train_benign.py                                  # CIFAR-10, vgg13 + resnet18, recipes
    python bench/train_benign.py --archs vgg13 --epochs 24 --device cuda
    python bench/train_benign.py --width 0.25 --train-subset 10000 --epochs 5   # CPU smoke run

The dataset comes from ``--data`` (archive or folder), else ``$BD4NN_DATA``, else torchvision.
Seconds are the training loop's wall time (device synchronized), excluding data loading and
evaluation. ``--save DIR`` writes each model as ``DIR/<dataset>-<arch>.safetensors``.
Targets on one H100 (issue 2): VGG-13 >= 90 % CA in <= 30 s, ResNet-18 >= 93 % in <= 90 s.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

from bd4nn.data import load_dataset
from bd4nn.models import get_model
from bd4nn.train import benign_recipe, evaluate_ca, resolve_device, train
from bd4nn.argtypes import device as device_arg


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--data", help="archive or folder (default: $BD4NN_DATA, else torchvision)")
    p.add_argument("--archs", nargs="+", default=["vgg13", "resnet18"])
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--epochs", type=int, help="override the recipe's epochs")
    p.add_argument("--lr", type=float, help="override the recipe's peak learning rate")
    p.add_argument("--batch-size", type=int, help="override the recipe's batch size")
    p.add_argument("--train-subset", type=int, help="train on the first N shuffled training images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", type=device_arg, default="auto")
    p.add_argument("--warmup-run", action="store_true", help="run one short untimed epoch first (CUDA init)")
    p.add_argument("--save", type=Path, help="write each trained model here as safetensors")
    p.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = p.parse_args(argv)

    device = resolve_device(args.device)
    t0 = time.perf_counter()
    data = load_dataset(args.dataset, args.data)
    load_s = time.perf_counter() - t0
    x, y = data.train_x, data.train_y
    if args.train_subset:
        idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(args.seed))[: args.train_subset]
        x, y = x[idx], y[idx]
    print(f"{data.name}: {len(y)} train / {len(data.test_y)} test images from {data.source} "
          f"(loaded in {load_s:.1f} s); device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f" ({platform.processor() or 'cpu'}, {torch.get_num_threads()} threads)"))

    overrides = {k: v for k, v in (("epochs", args.epochs), ("lr", args.lr), ("batch_size", args.batch_size)) if v}
    rows = []
    for arch in args.archs:
        cfg = benign_recipe(arch, seed=args.seed, **overrides)
        if args.warmup_run:
            warm = get_model(arch, data.num_classes, args.width, mean=data.spec.mean, std=data.spec.std, seed=args.seed)
            train(warm, x[: cfg.batch_size * 4], y[: cfg.batch_size * 4], benign_recipe(arch, epochs=1),
                  device=device, progress=False)
        model = get_model(arch, data.num_classes, args.width, mean=data.spec.mean, std=data.spec.std, seed=args.seed)
        res = train(model, x, y, cfg, device=device, desc=arch)
        ca = evaluate_ca(model, data.test_x, data.test_y, device=device)
        rows.append({"arch": arch, "width": args.width, "epochs": cfg.epochs, "batch": cfg.batch_size,
                     "lr": cfg.lr, "train_images": len(y), "CA": ca, "seconds": res.seconds,
                     "s_per_epoch": res.seconds / cfg.epochs, "train_acc": res.train_accuracy})
        print(f"{arch}: CA {100 * ca:.2f} % in {res.seconds:.1f} s", flush=True)
        if args.save:
            from safetensors.torch import save_file

            args.save.mkdir(parents=True, exist_ok=True)
            state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
            save_file(state, str(args.save / f"{data.name}-{arch}.safetensors"),
                      metadata={"config": json.dumps(cfg.to_dict()), "CA": f"{ca:.6f}"})

    table = [[r["arch"], r["width"], r["epochs"], r["batch"], r["lr"], r["train_images"],
              f"{100 * r['CA']:.2f}", f"{r['seconds']:.1f}", f"{r['s_per_epoch']:.2f}"] for r in rows]
    print(tabulate(table, headers=["arch", "width", "epochs", "batch", "lr", "train imgs", "CA %", "seconds", "s/epoch"]))
    if args.json:
        args.json.write_text(json.dumps({"device": str(device), "torch": torch.__version__, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
