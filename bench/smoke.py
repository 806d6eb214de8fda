"""Benchmark (not a test): the `paper` profile at full width, every stage cut to a few batches.

    python bench/smoke.py                                  # VGG-13 and ResNet-18, CPU
    python bench/smoke.py --archs vgg13 --out /tmp/smoke   # also writes smoke.md and smoke.jsonl there
    BD4NN_BF16=1 python bench/smoke.py                     # the CUDA code path (bf16) on the CPU

Nothing here has run at width 1.0 before, so this walks the whole path once per architecture
with the `paper` profile's settings (CIFAR-10, full width, the published localizer settings)
and only the amount of work cut:

* benign training: the paper recipe for a few batches (``--batches`` steps of 512 images);
* one candidate per attack (the first narrow window), the injection cut to ``2·--batches``
  steps of 256 images; TrojanNN's trigger search to 5 steps, SRA's chain to 256 images with no
  restart; rule 3 measured on 512 test images. A candidate is carried on whether or not rule 3
  keeps it (a few batches implant no backdoor): the smoke run checks that things run;
* every registered localizer on the BadNets candidate with the defenders' 2,500 clean images
  and its published settings, iterations cut: NC 1 epoch over 256 of the images (one Adam step
  on 10 × 256 stamped images: the per-step memory of the full 2,500, whose other 2,244 uint8
  images add 7 MB), ANP 2 iterations, deepmufl 2 tests with CUDA's chunk size
  (``memory_mb=2048``, so its peak is the one a GPU would hold);
* both repairs on CLP's selection (fine-tuning: 1 epoch over the 2,500 images).

Each stage prints its wall time and peak memory (``bd4nn.runtime.PeakMemory``: on CUDA the
peak of allocated tensors; on the CPU the process's peak resident set during the stage and
what the stage added on top of the resident set it started with). The "≤ 16 GiB" column checks
the peak, an upper bound (on the CPU it includes Python, torch and the dataset, ~0.7–2 GiB). The
CUDA estimate of a CPU stage is its Δ: the tensors the stage created, in fp32 (the localizers run
fp32 on CUDA too; the CUDA context adds ~0.5 GiB). In one long process the Δ can undercount
(freed heap pages stay resident and get reused), so read it together with the peak.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402

from bd4nn.build import PlanItem, build_candidate, load_profile, prepare_parent  # noqa: E402
from bd4nn.data import clean_split, load_dataset  # noqa: E402
from bd4nn.db import Database, entry_id  # noqa: E402
from bd4nn.harness import EntryContext, localize, make_localizer, repair_case  # noqa: E402
from bd4nn.neurons import NeuronMap  # noqa: E402
from bd4nn.repair import FinetuneSettings, list_repairs  # noqa: E402
from bd4nn.runtime import PeakMemory, amp_enabled, place, threads  # noqa: E402
from bench.options import add_machine_options, parse  # noqa: E402
from bd4nn.train import resolve_device  # noqa: E402
from bd4nn.argtypes import device as device_arg

LIMIT_MIB = 16 * 1024
ATTACKS = ["badnets", "blended", "trojannn", "sra"]
# iterations cut; every other setting is the published default
LOCALIZER_CUTS = {"nc": {"epochs": 1}, "anp": {"nb_iter": 2}, "deepmufl": {"max_tests": 2, "memory_mb": 2048}}
NC_IMAGES = 256


def smoke_profile(arch: str, batches: int, width: float = 1.0):
    p = load_profile("paper")
    return dataclasses.replace(
        p, name="smoke", width=width, datasets=["cifar10"], archs=[arch], attacks=ATTACKS, levels=["narrow"],
        candidates={"narrow": [0]}, train_subset=512 * batches, test_subset=512, rc_images=64,
        benign={"epochs": 1}, recipe={**p.recipe, "epochs": 1},
        attack={"trojannn": {"neuron_epoch": 5}, "sra": {"max_images": 256, "restarts": 0}},
    ).validate()


class Stages:
    """Runs named stages, times them, measures their peak memory, keeps going after a failure."""

    def __init__(self, device: torch.device, out: Path | None) -> None:
        self.device, self.out, self.rows, self.failed = device, out, [], 0

    def run(self, arch: str, name: str, fn, *args, **kwargs):
        print(f"[{arch}] {name} ...", flush=True)
        t0 = time.perf_counter()
        result, error = None, None
        with PeakMemory(self.device) as mem:
            try:
                result = fn(*args, **kwargs)
            except Exception as exc:  # a smoke run reports every crash, then goes on
                error = f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
                self.failed += 1
        row = {"arch": arch, "stage": name, "seconds": round(time.perf_counter() - t0, 1),
               "peak_mib": _r(mem.peak_mib), "delta_mib": _r(mem.delta_mib), "error": error}
        self.rows.append(row)
        print(f"[{arch}] {name}: {row['seconds']} s, peak {row['peak_mib']} MiB (+{row['delta_mib']})"
              + (f"  FAILED {error}" if error else ""), flush=True)
        if self.out:
            with open(self.out / "smoke.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
        return result

    def table(self) -> str:
        cuda = self.device.type == "cuda"
        head = ["arch", "stage", "s", "peak GPU MiB" if cuda else "peak RSS MiB",
                "Δ MiB (CUDA estimate)" if not cuda else "Δ MiB", "≤ 16 GiB", "status"]
        body = [[r["arch"], r["stage"], r["seconds"], r["peak_mib"], r["delta_mib"],
                 "—" if r["peak_mib"] is None else ("yes" if r["peak_mib"] <= LIMIT_MIB else "NO"),
                 "ok" if r["error"] is None else "FAILED"] for r in self.rows]
        return tabulate(body, head, tablefmt="github")


def _r(v):
    return None if v is None else round(v)


def smoke_arch(stages: Stages, arch: str, data, dev: torch.device, db: Database, batches: int,
               width: float = 1.0) -> None:
    profile = smoke_profile(arch, batches, width)
    parent = stages.run(arch, "benign training + rule 1", prepare_parent, db, profile, "cifar10", arch, data,
                        device=dev, progress=False)
    if parent is None:
        return
    built = {}
    for name in ATTACKS:
        item = PlanItem(entry_id("cifar10", arch, name, "narrow", 0), "cifar10", arch, name, "narrow", 0)
        got = stages.run(arch, f"inject {name} + rule 3", build_candidate, db, profile, parent, item)
        if got is not None:
            built[name] = got
            label = got[1]
            print(f"    CA {label.ca:.3f} ASR {label.asr:.3f} ASR.Cor {label.asr_cor:.3f} kept={label.kept}")
    if "badnets" not in built:
        return
    out, label = built["badnets"]
    idx = clean_split(len(data.train_y), 0.05, 0)
    model = place(out.model, dev).eval()
    ctx = EntryContext(label.id, label, model, NeuronMap(model), out.trigger, data.train_x[idx], data.train_y[idx],
                       *parent.test_xy, data.num_classes, dev)
    print(f"    localizers on {label.id}: {len(ctx.clean_y)} clean images, {ctx.neuron_map.total} neurons", flush=True)
    from localizers import list_localizers

    found = {}
    for name in list_localizers():
        settings = LOCALIZER_CUTS.get(name, {})
        run_ctx = ctx
        if name == "nc":
            run_ctx = dataclasses.replace(ctx, clean_x=ctx.clean_x[:NC_IMAGES], clean_y=ctx.clean_y[:NC_IMAGES])
        res = stages.run(arch, f"localize {name}", lambda: localize(run_ctx, make_localizer(name, label, **settings)))
        if res is not None:
            found[name] = res
    selection = (found.get("clp") or found.get("pfl"))
    if selection is None:
        return
    for method in list_repairs():
        stages.run(arch, f"repair {method}", repair_case, ctx, selection.selection, method,
                   finetune_settings=FinetuneSettings(epochs=1), use_label=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", nargs="+", default=["vgg13", "resnet18"])
    p.add_argument("--batches", type=int, default=2, help="benign steps (512 images); the injection takes 2x (256)")
    p.add_argument("--width", type=float, default=1.0, help="channel width (default 1.0; less only to test this script)")
    p.add_argument("--device", type=device_arg, default="auto", help="cpu, cuda (default: cuda if present)")
    p.add_argument("--out", type=Path, help="folder for smoke.jsonl (written after every stage) and smoke.md")
    add_machine_options(p)
    args = parse(p, argv)
    dev = resolve_device(args.device)
    out = args.out
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "smoke.jsonl").unlink(missing_ok=True)
    import tempfile

    scratch = tempfile.TemporaryDirectory(prefix="bd4nn-smoke-")
    db = Database(Path(scratch.name) / "db")
    print(f"device {dev}, {threads()} threads, bf16 autocast: {amp_enabled(dev)}", flush=True)
    stages = Stages(dev, out)
    t_start = time.perf_counter()
    data = stages.run("-", "load CIFAR-10", load_dataset, "cifar10", args.data, progress=False)
    if data is not None:
        for arch in args.archs:
            smoke_arch(stages, arch, data, dev, db, args.batches, args.width)
    table = stages.table()
    print(table)
    if out:
        import platform

        from bd4nn.results import git_hash

        cmd = "python bench/smoke.py " + " ".join(sys.argv[1:] if argv is None else argv)
        where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({platform.machine()}), {threads()} threads"
        (out / "smoke.md").write_text(
            "# Full-width smoke run: time and peak memory per stage\n\n"
            f"Generated by `{cmd}` (git `{git_hash(ROOT)}`, torch {torch.__version__}, {where}, bf16 autocast "
            f"{amp_enabled(dev)}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
            f"{time.perf_counter() - t_start:.0f} s in all). What each stage cuts: `bench/smoke.py`'s docstring.\n\n"
            f"{table}\n")
    scratch.cleanup()
    return 1 if stages.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
