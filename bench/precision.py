"""Benchmark (not a test): do the localizers rank neurons the same in bf16 as in fp32?

    python bench/precision.py --db DB --profile small --entries 'cifar10-vgg13-*-narrow-00' --out docs/results/bf16-rank-agreement.md

On CUDA, NC runs under bf16 autocast by default, and ANP and deepmufl can (``amp=True``). This
script runs every localizer that has a bf16 path twice on the same entries, on the CPU proxy of
the CUDA path (``BD4NN_BF16``, ``bd4nn.runtime``): once in fp32 and once in bf16, same seed. Per
localizer it prints whether every bf16 score was finite, the Spearman rank correlation of the
two score vectors (all covered neurons of an entry, mean over entries), the overlap of the two
top-k selections (Jaccard over (layer, neuron) pairs) and the WJI of each. Localizers without a
``amp`` setting (FP, CLP, SLICER, PFL, Random) compute in fp32 on every device and are listed
as such. Settings: the published defaults, or the profile's ``[bench]`` overrides.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402
from tabulate import tabulate  # noqa: E402

from bd4nn.build import load_profile  # noqa: E402
from bd4nn.db import Database  # noqa: E402
from bd4nn.harness import load_context, localize, make_localizer  # noqa: E402
from bd4nn.runtime import BF16_ENV, threads  # noqa: E402
from bench.options import add_machine_options, parse  # noqa: E402


def _has_amp(name: str) -> bool:
    from localizers import localizer_class

    return "amp" in {f.name for f in dataclasses.fields(localizer_class(name).Settings)}


def _run(ctx, name: str, settings: dict, bf16: bool):
    os.environ[BF16_ENV] = "1" if bf16 else "0"
    from localizers import localizer_class

    quiet = {"progress": False} if "progress" in {f.name for f in dataclasses.fields(localizer_class(name).Settings)} else {}
    loc = make_localizer(name, ctx.label, **{**settings, **quiet, "amp": bf16})
    return localize(ctx, loc, seed=0)


def _flat(scores: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([scores[k].reshape(-1) for k in sorted(scores)])


def _pairs(sel: dict[str, list[int]]) -> set[tuple[str, int]]:
    return {(layer, int(i)) for layer, ids in sel.items() for i in ids}


def compare(ctx, name: str, settings: dict) -> dict:
    a = _run(ctx, name, settings, bf16=False)
    b = _run(ctx, name, settings, bf16=True)
    fa, fb = _flat(a.scores), _flat(b.scores)
    rho = float(spearmanr(fa.numpy(), fb.numpy()).statistic) if fa.std() > 0 and fb.std() > 0 else float("nan")
    pa, pb = _pairs(a.selection), _pairs(b.selection)
    overlap = len(pa & pb) / max(1, len(pa | pb))
    return {"finite": bool(torch.isfinite(fb).all()), "rho": rho, "overlap": overlap, "wji_fp32": a.wji,
            "wji_bf16": b.wji, "t_fp32": a.time_s, "t_bf16": b.time_s}


def main(argv: list[str] | None = None) -> int:
    from localizers import list_localizers

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--db", required=True, type=Path)
    p.add_argument("--entries", default="*", help="comma-separated shell patterns of kept entries (default: all)")
    p.add_argument("--profile", help="take localizer settings and clean_images from this profile's [bench]")
    p.add_argument("--localizers", help="comma-separated (default: every registered one with an amp setting)")
    p.add_argument("--out", type=Path, help="also write the table as markdown here")
    add_machine_options(p)
    args = parse(p, argv)

    db = Database(args.db)
    patterns = args.entries.split(",")
    entries = [ln["id"] for ln in db.entries(kept=True) if any(fnmatch.fnmatchcase(ln["id"], pt) for pt in patterns)]
    if not entries:
        p.error(f"{args.db}: no kept entry matches {args.entries}")
    bench = load_profile(args.profile).bench if args.profile else {}
    names = args.localizers.split(",") if args.localizers else [n for n in list_localizers() if _has_amp(n)]
    fp32_only = [n for n in list_localizers() if not _has_amp(n)]
    t0 = time.perf_counter()
    per: dict[str, list[dict]] = {n: [] for n in names}
    for entry in entries:
        ctx = load_context(db, entry, device="cpu", data_root=args.data, clean_images=bench.get("clean_images"))
        for name in names:
            r = compare(ctx, name, dict(bench.get("localizers", {}).get(name, {})))
            per[name].append(r)
            print(f"{entry} {name}: rho {r['rho']:.3f}, top-k overlap {r['overlap']:.3f}, "
                  f"WJI {r['wji_fp32']:.3f} -> {r['wji_bf16']:.3f}", flush=True)
    os.environ.pop(BF16_ENV, None)

    def mean(rows, key):
        vals = [r[key] for r in rows if r[key] == r[key]]
        return statistics.fmean(vals) if vals else float("nan")

    rows = [[n, len(rs), "yes" if all(r["finite"] for r in rs) else "NO", f"{mean(rs, 'rho'):.3f}",
             f"{min(r['rho'] for r in rs):.3f}", f"{mean(rs, 'overlap'):.3f}", f"{mean(rs, 'wji_fp32'):.3f}",
             f"{mean(rs, 'wji_bf16'):.3f}", f"{mean(rs, 't_fp32'):.1f}", f"{mean(rs, 't_bf16'):.1f}"]
            for n, rs in per.items()]
    head = ["localizer", "entries", "bf16 finite", "Spearman ρ (mean)", "ρ (min)", "top-k overlap",
            "WJI fp32", "WJI bf16", "s fp32", "s bf16"]
    table = tabulate(rows, head, tablefmt="github")
    note = f"fp32 on every device (no bf16 path): {', '.join(fp32_only)}"
    print(table)
    print(note)
    if args.out:
        git = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent.parent).stdout.strip()
        cmd = "python bench/precision.py " + " ".join(argv if argv is not None else sys.argv[1:])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            "# bf16 against fp32: rank agreement of the localizers' scores\n\n"
            f"Generated by:\n\n```bash\n{cmd}\n```\n\n"
            f"- git `{git}`; torch {torch.__version__}; {platform.processor() or platform.machine()}, "
            f"{threads()} torch threads, CPU (bf16 = the CPU proxy of the CUDA path, `BD4NN_BF16=1`)\n"
            f"- entries: {', '.join(entries)}\n"
            f"- settings: published defaults" + (f" with the `{args.profile}` profile's [bench] overrides" if args.profile else "")
            + f"\n- wall time {time.perf_counter() - t0:.0f} s\n\n"
            "Per entry, all covered neurons' scores of the fp32 run against the bf16 run (same seed): "
            "Spearman ρ, the Jaccard overlap of the two top-k selections, and each run's WJI.\n\n"
            f"{table}\n\n{note}.\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
