"""Benchmark (not a test): per-model time and WJI of every localizer on one entry.

    python bench/time_localizers.py --db db --device cuda                     # first kept VGG-13 entry
    python bench/time_localizers.py --db db --entry cifar10-vgg13-sra-narrow-00 --repeat 3
    python bench/time_localizers.py --db db --localizers clp,fp --profile tiny   # the tiny budgets

Prints one row per localizer: median seconds over ``--repeat`` runs (device synchronized,
loading excluded, one warm-up run first), WJI, hits, AUROC, and the issue's target time for a
CIFAR-10 VGG-13 on one H100. Settings are the published defaults unless ``--profile`` names a
profile whose ``[bench]`` table overrides them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tabulate import tabulate  # noqa: E402

from bd4nn.build import load_profile  # noqa: E402
from bd4nn.db import Database  # noqa: E402
from bd4nn.harness import load_context, localize, make_localizer  # noqa: E402
from bd4nn.train import resolve_device  # noqa: E402
from bd4nn.argtypes import device as device_arg

TARGETS = {"clp": 0.05, "fp": 0.5, "slicer": 5.0, "anp": 15.0, "nc": 30.0, "deepmufl": 300.0}


def main(argv: list[str] | None = None) -> int:
    from localizers import list_localizers

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--db", required=True, type=Path)
    p.add_argument("--entry", help="entry id (default: the first kept VGG-13 entry)")
    p.add_argument("--localizers", default=",".join(list_localizers()))
    p.add_argument("--profile", help="take localizer settings and clean_images from this profile's [bench]")
    p.add_argument("--clean-images", type=int, help="use only this many of the 5%% clean images")
    p.add_argument("--repeat", type=int, default=1, help="timed runs per localizer (after one warm-up)")
    p.add_argument("--device", type=device_arg, default="auto")
    p.add_argument("--data", help="dataset archive folder (default: $BD4NN_DATA)")
    args = p.parse_args(argv)

    db = Database(args.db)
    entry = args.entry or next((ln["id"] for ln in db.entries(kept=True, arch="vgg13")), None)
    if entry is None:
        p.error(f"{args.db}: no kept VGG-13 entry; pass --entry")
    bench = load_profile(args.profile).bench if args.profile else {}
    clean_images = args.clean_images or bench.get("clean_images")
    ctx = load_context(db, entry, device=resolve_device(args.device), data_root=args.data, clean_images=clean_images)
    print(f"{entry}: {ctx.label.n_fault} fault neurons of {ctx.neuron_map.total}; {len(ctx.clean_y)} clean images; "
          f"{ctx.device}", flush=True)
    rows = []
    for name in args.localizers.split(","):
        loc = make_localizer(name, ctx.label, **bench.get("localizers", {}).get(name, {}))
        localize(ctx, loc)  # warm-up (CUDA kernels, allocator)
        runs = [localize(ctx, loc) for _ in range(max(1, args.repeat))]
        t = statistics.median(r.time_s for r in runs)
        r = runs[-1]
        target = TARGETS.get(name)
        rows.append([name, f"{t:.3f}", "" if target is None else f"{target:g}",
                     "" if target is None else ("yes" if t <= target else "NO"), f"{r.wji:.3f}",
                     f"{r.hits}/{r.n_fault}", "n/a" if r.auroc != r.auroc else f"{r.auroc:.3f}"])
        print(f"  {name}: {t:.3f} s, WJI {r.wji:.3f}", flush=True)
    print()
    print(tabulate(rows, headers=["localizer", "seconds", "target s", "met", "WJI", "hits", "AUROC"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
