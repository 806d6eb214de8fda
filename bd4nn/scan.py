"""``bd4nn scan``: run localizers on a model you downloaded, with no defect label (issue 15).

::

    bd4nn scan MODEL.safetensors --arch resnet18 --dataset cifar10 [--num-classes 10] [--width W]
               [--localizers clp,fp,slicer] [--threshold 3 | --top K] [--set LOC.KEY=VALUE ...]
               [--clean-images N] [--seed 0] [--device auto] [--data PATH] [--json OUT.json]

What it prints: the neurons each localizer flags, per neuron layer; the neurons that at least two
localizers flag (and who flagged them); NC's suspect target class and anomaly index when NC runs.
``--json`` writes all of it as one object (keys below). ``scan(...)`` is the same in Python.

**Loading, safely.** Only safetensors files are read, never a pickle (``torch.load`` of a
downloaded file can run arbitrary code). A ``torch.save`` file (zip archive or pickle stream), or
anything else, is refused with a message that says how to convert it where it is trusted. Two
name layouts are understood:

* bd4nn's own (``bd4nn.models``; what ``Database.save_benign`` writes: the full ``state_dict``,
  including the normalization buffers ``normalize.mean`` / ``normalize.std``);
* for ResNets, torchvision's names for a ResNet adapted to CIFAR (3x3 stride-1 ``conv1``, no
  max-pool): ``layerI.J.downsample.{0,1}`` become ``layerI.J.shortcut.{0,1}`` and ``fc`` becomes
  ``linear``; every other name (``conv1``, ``bn1``, ``layerI.J.conv1`` ...) is already the same.
  A common ``module.`` prefix (``nn.DataParallel``) is dropped in either layout.

The names and shapes must then be exactly those of ``get_model(arch, num_classes, width)``; the
only keys that may be absent are ``normalize.mean`` / ``normalize.std`` (the model then gets the
dataset's mean and std, and the output says so; torchvision models carry none) and BatchNorm's
``num_batches_tracked`` counters (unused in eval mode). Anything else (a missing, unexpected or
misshapen tensor, NaN or inf in the weights) is a ``BadInputError`` that names the first few
offending keys in the file's own naming and what was expected. ``--width`` defaults to the width
that makes the first neuron layer's out-channels fit (its channels / its width-1 channels, e.g.
``conv1``'s 64 → 1.0); when that does not fit the rest, the last layer's ratio is tried, and
otherwise ``--width`` is required. ``--num-classes`` defaults to the rows of the file's head and
must equal the dataset's number of classes. ``--arch`` and ``--dataset`` default to what a
bd4nn-written file's metadata records. A database *delta* (an entry's ``<id>.safetensors``) is
not a model: use ``bd4nn localize`` for database entries.

**Clean data.** The defender's data of the benchmark: the seeded 5 % clean split of the
dataset's training set (``bd4nn.data.defender_data``, split seed 0), optionally a seeded subset
of ``--clean-images`` of it.

**Localizers.** Default: ``clp, fp, slicer`` (seconds to a minute on a CPU). ``nc``, ``anp``,
``deepmufl`` and third-party plugins on request (``--localizers clp,nc``); their settings with
``--set nc.epochs=10`` (the localizer's name, a dot, the setting). Refused: localizers that need
the ground truth (``needs_ground_truth``: PFL), since a scan has no label, and ``random``: its
scores read nothing of the model, so its flags would say nothing about it (it is the
benchmark's chance row, ``bd4nn localize``), and under the default rule it flags nothing anyway.

**Flagging rule** (``flag``). Without ground truth there is no budget ``k``, so a neuron is
flagged when its score is an outlier of its own layer: ``score > mean + u * std`` of the
layer's scores (``std`` unbiased), i.e. its per-layer z-score exceeds ``u`` (``--threshold``,
default 3). Why: (1) the localizers' scores have unrelated units (a spectral norm, a negated
activation, a contribution), and a z-score within one layer makes one threshold mean the same
for all of them; (2) ``u = 3`` is CLP's published default (CLP ``test.py -u 3``, BackdoorBench
``u: 3``), so for CLP the flags are exactly CLP's own pruning rule (``CLP.suspicious``); (3) it
flags nothing in a layer without outliers, where a top-k rule would always flag k neurons of a
clean model. Limits: a layer of ``n`` neurons cannot hold a z-score above ``(n-1)/sqrt(n)``, so
at ``u = 3`` layers of fewer than 11 neurons never flag (the output marks them); a layer whose
scores are all equal flags nothing. Flags are evidence, not a verdict: a benign model has
outliers too. ``--top K`` instead flags the K highest-scoring neurons of every covered layer,
ties broken by the benchmark's seeded order (``bd4nn.metrics.top_k_selection``).

**NC's verdict.** When ``nc`` runs, its ``report()``: the suspect target class (the MAD-flagged
class with the smallest reversed-trigger norm, else the smallest-norm class), the anomaly
index, whether the MAD test fired (``infected``: index above ``mad_threshold``, default 2) and
the flagged classes.

**JSON** (``--json``; one object, ``format`` ``bd4nn.scan/1``): ``model`` (file, sha256, bytes,
arch, width and where it came from, num_classes, layout, renamed keys, normalization with its
source, neuron layers and sizes), ``data`` (dataset, source, classes, clean images, fraction,
split seed), ``device``, ``seed``, ``rule`` (``{"kind": "zscore", "threshold": u}`` or
``{"kind": "top", "k": K}``), ``localizers`` (per name: scope, settings, time_s, details = its
``report()``, ``flagged`` ``{layer: [channels]}``, ``n_flagged``, ``layers`` with a score
summary per layer: n, mean, std, min, max, max_z, can_flag, tied, and the flagged neurons with
score and z), ``agreement`` (``[{layer, channel, localizers}]``, neurons flagged by >= 2),
``nc`` (its verdict, or null), ``versions``. Non-finite numbers are written as null (NaN) or
the strings "inf" / "-inf" (an anomaly index is infinite when the MAD is 0), so the file is
strict JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bd4nn.argtypes import number, setting
from bd4nn.argtypes import device as device_arg
from bd4nn.errors import BadInputError

__all__ = ["DEFAULT_LOCALIZERS", "DEFAULT_THRESHOLD", "FORMAT", "StateInfo", "read_safetensors", "map_state",
           "build_model", "load_model", "make_localizers", "flag", "min_flaggable", "agreement", "scan", "format_report",
           "add_arguments", "run"]

FORMAT = "bd4nn.scan/1"
DEFAULT_LOCALIZERS = ("clp", "fp", "slicer")  # the ones that answer in seconds to a minute on a CPU
DEFAULT_THRESHOLD = 3.0  # CLP's u (test.py -u 3; BackdoorBench config/defense/clp/config.yaml)
CLEAN_FRACTION = 0.05  # METHODS.md §1: the defender's seeded 5 % clean split
SPLIT_SEED = 0  # the benchmark's split (bd4nn.harness.load_context's clean_seed)
REFUSED = {"random": "its scores are seeded noise that read nothing of the model, so its flags would say "
                     "nothing about it (it is the benchmark's chance row: bd4nn localize)"}
_OPTIONAL = ("normalize.mean", "normalize.std")
_MAX_HEADER = 100 * 2**20  # a safetensors header larger than this is not a model's
_SHOW = 5  # offending keys named in an error message
_CONVERT = ("convert it where you trust the file: python -c \"import torch; from safetensors.torch import "
            "save_file; save_file(torch.load('MODEL.pt', weights_only=True), 'MODEL.safetensors')\" (a "
            "checkpoint that nests its state_dict, e.g. under 'state_dict', needs that key picked first)")


# ------------------------------------------------------------------------------ reading


def read_safetensors(path: str | Path) -> tuple[dict, dict, dict]:
    """``(tensors, metadata, file info)`` of a safetensors file; nothing else is ever read.

    The file must be a regular file whose first 8 bytes give the length of a JSON header (the
    safetensors format); a ``torch.save`` zip, a pickle stream or anything else is refused before
    any tensor is read. ``metadata`` is the header's ``__metadata__`` (bd4nn's own packed key
    unpacked); ``file info`` is ``{file, sha256, bytes}``."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such model file")
    if not p.is_file():
        raise BadInputError(f"{p}: not a regular file; give a .safetensors model file")
    size = p.stat().st_size
    with open(p, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        header_bytes = fh.read(n) if 0 < n <= min(_MAX_HEADER, size - 8) else b""
    try:
        header = json.loads(header_bytes) if header_bytes[:1] == b"{" else None
    except (ValueError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict):
        if head[:4] == b"PK\x03\x04":
            kind = "it is a zip archive, as torch.save writes: a pickle inside"
        elif head[:1] == b"\x80":
            kind = "it is a pickle stream (torch.save's legacy format)"
        else:
            kind = "it has no safetensors header"
        raise BadInputError(f"{p}: only safetensors files are read (bd4nn never unpickles a model file: "
                            f"unpickling runs code), and this is not one ({kind}); {_CONVERT}")
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(p), device="cpu")
    except Exception as exc:  # safetensors raises its own error types
        raise BadInputError(f"{p}: not a valid safetensors file ({exc})") from None
    meta = dict(header.get("__metadata__") or {})
    if "bd4nn" in meta:  # bd4nn.db packs its metadata as one canonical-JSON value
        try:
            packed = json.loads(meta["bd4nn"])
            meta = packed if isinstance(packed, dict) else meta
        except json.JSONDecodeError:
            pass
    digest = hashlib.sha256()
    with open(p, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return tensors, meta, {"file": str(p), "sha256": digest.hexdigest(), "bytes": size}


# ------------------------------------------------------------------------------ mapping


@dataclass
class StateInfo:
    """What ``map_state`` found out about a state dict (recorded in the scan's ``model``)."""

    arch: str
    width: float
    width_source: str  # "--width" or "inferred from ..."
    num_classes: int
    num_classes_source: str
    layout: str  # "bd4nn" or "torchvision"
    renamed: int = 0  # keys renamed from torchvision's names
    prefix: str = ""  # a dropped common prefix ("module.")
    has_normalization: bool = True

    def to_dict(self) -> dict:
        return {"arch": self.arch, "width": self.width, "width_source": self.width_source,
                "num_classes": self.num_classes, "num_classes_source": self.num_classes_source,
                "layout": self.layout, "renamed": self.renamed, "prefix_dropped": self.prefix or None}


def _tv_to_bd4nn(key: str) -> str:
    key = key.replace(".downsample.", ".shortcut.")
    return "linear." + key[3:] if key.startswith("fc.") else key


def _bd4nn_to_tv(key: str) -> str:
    key = key.replace(".shortcut.", ".downsample.")
    return "fc." + key[7:] if key.startswith("linear.") else key


def _shape(t) -> tuple[int, ...]:
    return tuple(int(s) for s in t.shape)


def _first_few(items: Sequence[str], count: bool = True) -> str:
    more = f", ... ({len(items)} in all)" if count else ", ..."
    return ", ".join(items[:_SHOW]) + (more if len(items) > _SHOW else "")


def map_state(tensors: Mapping, arch: str, *, num_classes: int | None = None,
              width: float | None = None) -> tuple[dict, StateInfo]:
    """``tensors`` renamed onto bd4nn's ``arch`` and checked key by key and shape by shape.

    Returns ``(state, info)``; ``state`` may lack the keys of ``_OPTIONAL`` and BatchNorm's
    ``num_batches_tracked``. Raises ``BadInputError`` naming the missing, unexpected and
    misshapen keys (first few of each) in the file's own naming, and the expected ones."""
    import torch

    from bd4nn.models import ResNet, get_model, list_models
    from bd4nn.neurons import NeuronMap

    if arch not in list_models():
        raise BadInputError(f"unknown architecture {arch!r}; bd4nn's are {', '.join(list_models())}")
    state = dict(tensors)
    prefix = ""
    if state and all(k.startswith("module.") for k in state):
        prefix = "module."
        state = {k[len(prefix):]: v for k, v in state.items()}
    with torch.device("meta"):  # names only (and width-1 sizes for the width): no memory, no init cost
        ref = get_model(arch, 10, 1.0)
    ref_map = NeuronMap(ref)
    tv_like = "fc.weight" in state or any(".downsample." in k for k in state)
    layout = "bd4nn"
    renamed = 0
    if isinstance(ref, ResNet) and tv_like:
        layout = "torchvision"
        mapped = {_tv_to_bd4nn(k): v for k, v in state.items()}
        renamed = sum(_tv_to_bd4nn(k) != k for k in state)
        state = mapped
    shown = _bd4nn_to_tv if layout == "torchvision" else (lambda k: k)
    layout_note = ("torchvision names mapped onto bd4nn's: downsample -> shortcut, fc -> linear"
                   if layout == "torchvision" else "bd4nn names")

    head_key = f"{ref_map.head_name}.weight"
    if num_classes is not None:
        nc_source = "--num-classes"
    elif head_key in state and state[head_key].ndim == 2:
        num_classes, nc_source = int(state[head_key].shape[0]), f"the rows of {shown(head_key)}"
    else:
        num_classes, nc_source = 10, "default (the head was not found)"
    if num_classes < 2:
        raise BadInputError(f"the model has {num_classes} output(s); a classifier needs >= 2")

    def expected_for(w: float) -> dict[str, tuple[int, ...]]:
        with torch.device("meta"):  # shapes only: no memory, no initialization cost
            m = get_model(arch, num_classes, w)
        return {k: _shape(v) for k, v in m.state_dict().items()}

    def problems(exp: Mapping[str, tuple[int, ...]]) -> tuple[list[str], list[str], list[str]]:
        missing = [k for k in exp if k not in state and k not in _OPTIONAL and not k.endswith(".num_batches_tracked")]
        unexpected = [k for k in state if k not in exp]
        unexpected.sort(key=lambda k: k.endswith(".num_batches_tracked"))  # the telling names first
        bad = [k for k in exp if k in state and _shape(state[k]) != exp[k]]
        return missing, unexpected, bad

    candidates: list[tuple[float, str]] = []
    if width is not None:
        candidates.append((float(width), "--width"))
    else:
        for layer in (ref_map.layers[0], ref_map.layers[-1]):
            key = f"{layer}.weight"
            if key in state and state[key].ndim == 4:
                w = int(state[key].shape[0]) / ref_map.sizes[layer]
                if w > 0 and all(w != c for c, _ in candidates):
                    candidates.append((w, f"inferred from {shown(key)}'s {int(state[key].shape[0])} "
                                          f"out-channels ({ref_map.sizes[layer]} at width 1)"))
        if not candidates:
            candidates.append((1.0, "default (no first conv to infer it from)"))
    for w, source in candidates:  # the first width whose shapes fit, else report the first one's misfits
        exp = expected_for(w)
        missing, unexpected, bad = problems(exp)
        if not (missing or unexpected or bad):
            break
    else:
        w, source = candidates[0]
        exp = expected_for(w)
        missing, unexpected, bad = problems(exp)
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {_first_few([shown(k) for k in missing])}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {_first_few([shown(k) for k in unexpected])}")
        if bad:
            parts.append(f"misshapen {len(bad)}: " + _first_few(
                [f"{shown(k)} {list(_shape(state[k]))} (expected {list(exp[k])})" for k in bad]))
        hints = []
        first = f"{ref_map.layers[0]}.weight"
        if first in bad and len(_shape(state[first])) == 4 and _shape(state[first])[-1] == 7:
            hints.append("a 7x7 stem is torchvision's ImageNet ResNet; bd4nn's CIFAR ResNet has a 3x3 stride-1 "
                         "conv1 and no max-pool")
        if width is None and [k for k in bad if not k.startswith(f"{ref_map.head_name}.")]:
            hints.append(f"width {w:g} was {source}; give --width if that is wrong")
        if tv_like and layout == "bd4nn":
            hints.append("torchvision names are understood for ResNets only")
        if not any(k in state for k in exp):
            hints.append(f"no name of the file is one of bd4nn's {arch}: is --arch right?")
        expected_names = [shown(k) for k in exp if k not in _OPTIONAL and not k.endswith(".num_batches_tracked")]
        raise BadInputError(
            f"the state dict does not fit bd4nn's {arch} (width {w:g}, {num_classes} classes; {layout_note}): "
            + "; ".join(parts) + f". Expected {len(expected_names)} tensors (besides the optional normalize.mean/std "
            f"and BatchNorm num_batches_tracked): {_first_few(expected_names, count=False)}"
            + (f" ({'; '.join(hints)})" if hints else ""))
    nonfinite = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if nonfinite:
        raise BadInputError(f"the weights hold NaN or inf in {_first_few([shown(k) for k in nonfinite])}")
    info = StateInfo(arch=arch, width=w, width_source=source, num_classes=num_classes,
                     num_classes_source=nc_source, layout=layout, renamed=renamed, prefix=prefix,
                     has_normalization=all(k in state for k in _OPTIONAL))
    return state, info


def build_model(state: Mapping, info: StateInfo, *, mean: Sequence[float] | None = None,
                std: Sequence[float] | None = None):
    """bd4nn's model with ``state`` loaded (eval mode, CPU). ``mean``/``std`` are used only where
    the state has no normalization buffers (then they are required)."""
    from bd4nn.models import get_model

    if not info.has_normalization and (mean is None or std is None):
        raise BadInputError("the model file has no normalization buffers (normalize.mean/std): give the "
                            "dataset's mean and std")
    kw = {} if info.has_normalization else {"mean": tuple(mean), "std": tuple(std)}
    model = get_model(info.arch, info.num_classes, info.width, seed=0, **kw)
    missing, unexpected = model.load_state_dict(dict(state), strict=False)
    allowed = set(_OPTIONAL) if not info.has_normalization else set()
    bad = [k for k in missing if k not in allowed and not k.endswith(".num_batches_tracked")]
    if bad or unexpected:  # map_state checked this already
        raise BadInputError(f"the state dict does not fit {info.arch}: missing {bad}, unexpected {unexpected}")
    return model.eval()


def load_model(path: str | Path, arch: str | None = None, *, num_classes: int | None = None,
               width: float | None = None, mean: Sequence[float] | None = None,
               std: Sequence[float] | None = None):
    """``(model, info, file_info, metadata)`` from a safetensors file (``read_safetensors``,
    ``map_state``, ``build_model``); ``arch`` defaults to a bd4nn file's metadata."""
    tensors, meta, finfo = read_safetensors(path)
    arch = _arch_from(meta, arch, finfo["file"])
    state, info = map_state(tensors, arch, num_classes=num_classes, width=width)
    return build_model(state, info, mean=mean, std=std), info, finfo, meta


def _arch_from(meta: Mapping, arch: str | None, file: str) -> str:
    if meta.get("format") == "bd4nn.delta/1":
        raise BadInputError(f"{file}: a bd4nn database delta (entry {meta.get('id')}'s weights relative to its "
                            "benign parent), not a whole model; localize database entries with "
                            "`bd4nn localize --db DB --entry ID --localizer NAME`")
    recorded = meta.get("arch") if isinstance(meta.get("arch"), str) else None
    if arch is None:
        if recorded is None:
            raise BadInputError(f"{file}: give --arch (the file does not record its architecture)")
        return recorded
    if recorded is not None and recorded != arch:
        raise BadInputError(f"{file}: --arch {arch} but the file records {recorded}")
    return arch


# ------------------------------------------------------------------------------ flagging


def min_flaggable(threshold: float) -> int:
    """The smallest layer size whose largest possible z-score, ``(n-1)/sqrt(n)``, exceeds
    ``threshold`` (11 for 3): smaller layers can never flag under the z-score rule."""
    n = 2
    while (n - 1) / math.sqrt(n) <= threshold:
        n += 1
    return n


def flag(scores: Mapping, *, threshold: float = DEFAULT_THRESHOLD, top: int | None = None,
         seed: int = 0) -> dict[str, list[int]]:
    """The flagged neurons ``{layer: sorted channels}`` (layers without flags left out).

    Default rule: channel ``c`` of a layer is flagged when ``score_c > mean + threshold * std``
    of that layer's scores (unbiased std; CLP's rule, module docstring). ``top=K``: the K
    highest of every layer instead (all of a layer with <= K neurons), ties broken by the
    benchmark's seeded order."""
    import torch

    if top is not None:
        from bd4nn.metrics import top_k_selection

        if top < 1:
            raise BadInputError(f"--top must be >= 1, got {top}")
        budget = {layer: list(range(min(int(top), torch.as_tensor(s).numel()))) for layer, s in scores.items()}
        return {layer: chans for layer, chans in top_k_selection(scores, budget, seed=seed).items() if chans}
    from localizers.base import outliers

    return outliers(scores, threshold)


def _layer_summary(scores: Mapping, flagged: Mapping[str, list[int]], *, threshold: float,
                   top: int | None) -> dict[str, dict]:
    import torch

    from localizers.base import standardize_per_layer

    from bd4nn.metrics import tied_layers

    smallest = min_flaggable(threshold)
    tied = set(tied_layers(scores, {layer: list(range(min(top, torch.as_tensor(s).numel())))
                                    for layer, s in scores.items()})) if top else set()
    out = {}
    for layer, s in scores.items():
        v = torch.as_tensor(s).detach().double().reshape(-1)
        z = standardize_per_layer(v)
        n = int(v.numel())
        out[layer] = {
            "n": n, "mean": float(v.mean()), "std": float(v.std()) if n > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max()), "max_z": float(z.max()),
            "can_flag": True if top else n >= smallest, "tied": layer in tied,
            "flagged": [{"channel": c, "score": float(v[c]), "z": float(z[c])} for c in flagged.get(layer, [])],
        }
    return out


def agreement(flags: Mapping[str, Mapping[str, Sequence[int]]], min_count: int = 2) -> list[dict]:
    """Neurons flagged by at least ``min_count`` localizers: ``[{layer, channel, localizers}]``,
    most localizers first, then by layer (in the order the layers first appear) and channel."""
    who: dict[tuple[str, int], list[str]] = {}
    order: dict[str, int] = {}
    for name, sel in flags.items():
        for layer, chans in sel.items():
            order.setdefault(layer, len(order))
            for c in chans:
                who.setdefault((layer, int(c)), []).append(name)
    rows = [{"layer": layer, "channel": c, "localizers": names}
            for (layer, c), names in who.items() if len(names) >= min_count]
    rows.sort(key=lambda r: (-len(r["localizers"]), order[r["layer"]], r["channel"]))
    return rows


# ------------------------------------------------------------------------------ the scan


def _split_settings(pairs: Sequence[tuple[str, Any]], names: Sequence[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {n: {} for n in names}
    for key, value in pairs:
        loc, dot, name = key.rpartition(".")
        if not dot or not loc or not name:
            raise BadInputError(f"--set takes LOCALIZER.KEY=VALUE here (e.g. --set nc.epochs=10), not {key}={value}")
        if loc not in out:
            raise BadInputError(f"--set {key}=...: {loc} is not among the localizers of this scan "
                                f"({', '.join(names)}); add it with --localizers")
        out[loc][name] = value
    return out


def make_localizers(names: Sequence[str], settings: Sequence[tuple[str, Any]] = ()) -> dict:
    """Localizer instances by name, refusing the ones a scan cannot run (module docstring)."""
    from localizers import get_localizer, localizer_class

    names = list(dict.fromkeys(n.strip() for n in names if n.strip()))
    if not names:
        raise BadInputError("no localizer given; e.g. --localizers clp,fp,slicer")
    for n in names:
        cls = localizer_class(n)  # an unknown name raises, listing the known ones
        if cls.needs_ground_truth:
            raise BadInputError(f"{n} reads the ground truth (the defect's label), which a scan of your own "
                                "model does not have; it is the benchmark's reference row (bd4nn localize)")
        if n in REFUSED:
            raise BadInputError(f"{n} is not offered by scan: {REFUSED[n]}")
    per = _split_settings(settings, names)
    return {n: get_localizer(n, **per[n]) for n in names}


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float):
        if math.isnan(obj):
            return None
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return obj
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):  # tensors, numpy values
        return _jsonable(obj.tolist())
    return obj


def scan(model_file: str | Path, *, arch: str | None = None, dataset: str | None = None,
         num_classes: int | None = None, width: float | None = None,
         localizers: Sequence[str] = DEFAULT_LOCALIZERS, settings: Sequence[tuple[str, Any]] = (),
         threshold: float = DEFAULT_THRESHOLD, top: int | None = None, clean_images: int | None = None,
         device: str = "auto", seed: int = 0, data=None, data_root: str | None = None) -> dict:
    """Run ``localizers`` on the model in ``model_file`` and return the scan's JSON object
    (module docstring). ``data``: a preloaded ``ImageData`` (else ``load_dataset(dataset,
    data_root)``). Everything the user gave is checked before any data is loaded."""
    import torch

    import bd4nn
    from bd4nn.data import defender_data, load_dataset
    from bd4nn.harness import timed_scores
    from bd4nn.neurons import NeuronMap
    from bd4nn.runtime import place
    from bd4nn.train import resolve_device
    from localizers import CleanData

    if top is None and not (isinstance(threshold, (int, float)) and math.isfinite(threshold)):
        raise BadInputError(f"the threshold must be a finite number, not {threshold!r}")
    locs = make_localizers(localizers, settings)
    dev = resolve_device(device)
    tensors, meta, finfo = read_safetensors(model_file)
    arch = _arch_from(meta, arch, finfo["file"])
    state, info = map_state(tensors, arch, num_classes=num_classes, width=width)
    if dataset is None:
        dataset = data.name if data is not None else meta.get("dataset") if isinstance(meta.get("dataset"), str) else None
        if dataset is None:
            raise BadInputError(f"{finfo['file']}: give --dataset (the file does not record it)")
    if data is None:
        data = load_dataset(dataset, data_root, progress=False)
    if data.num_classes != info.num_classes:
        raise BadInputError(f"the model has {info.num_classes} outputs ({info.num_classes_source}) but {dataset} has "
                            f"{data.num_classes} classes")
    model = build_model(state, info, mean=data.spec.mean, std=data.spec.std)
    norm_source = "file" if info.has_normalization else f"dataset {dataset}"
    mean = [float(v) for v in model.normalize.mean.reshape(-1)] if hasattr(model, "normalize") else None
    std = [float(v) for v in model.normalize.std.reshape(-1)] if hasattr(model, "normalize") else None
    model = place(model, dev).eval()
    nm = NeuronMap(model)
    cx, cy = defender_data(data, CLEAN_FRACTION, SPLIT_SEED, images=clean_images)
    if len(cy) == 0:
        raise BadInputError(f"{dataset}'s clean split is empty ({len(data.train_y)} training images)")
    clean = CleanData(cx, cy, data.num_classes)

    results: dict[str, dict] = {}
    flags: dict[str, dict[str, list[int]]] = {}
    nc_verdict = None
    for name, loc in locs.items():
        scores, seconds = timed_scores(loc, model, nm, clean, dev, seed=seed)
        flagged = flag(scores, threshold=threshold, top=top, seed=seed)
        flags[name] = flagged
        details = loc.report()
        results[name] = {
            "scope": loc.scope, "summary": type(loc).summary, "settings": loc.config(), "time_s": seconds,
            "details": details, "flagged": flagged, "n_flagged": sum(len(c) for c in flagged.values()),
            "layers": _layer_summary(scores, flagged, threshold=threshold, top=top),
        }
        if name == "nc" and details:
            nc_verdict = {**details, "mad_threshold": float(loc.settings.mad_threshold),
                          "target_name": data.classes[details["target"]]
                          if 0 <= int(details.get("target", -1)) < len(data.classes) else None}
    rule = {"kind": "top", "k": int(top)} if top else {"kind": "zscore", "threshold": float(threshold),
                                                        "min_layer_size": min_flaggable(threshold)}
    doc = {
        "format": FORMAT,
        "model": {**finfo, **info.to_dict(), "metadata": dict(meta),
                  "normalization": {"mean": mean, "std": std, "source": norm_source},
                  "neurons": nm.total, "layers": nm.sizes},
        "data": {"dataset": dataset, "source": data.source, "classes": list(data.classes),
                 "clean_images": int(len(cy)), "fraction": CLEAN_FRACTION, "split_seed": SPLIT_SEED,
                 "clean_images_cap": clean_images},
        "device": str(dev), "seed": int(seed), "rule": rule,
        "localizers": results,
        "agreement": agreement(flags),
        "nc": nc_verdict,
        "versions": {"bd4nn": bd4nn.__version__, "torch": torch.__version__},
    }
    return _jsonable(doc)


# ------------------------------------------------------------------------------ the report


def _num(v: Any, fmt: str = ".3g") -> str:
    return str(v) if isinstance(v, str) or v is None else format(v, fmt)


def format_report(doc: Mapping) -> str:
    """The scan as text: the model, the data, one table of flags per layer and localizer, the
    agreement and NC's verdict."""
    from tabulate import tabulate

    m, d, rule, locs = doc["model"], doc["data"], doc["rule"], doc["localizers"]
    lines = []
    where = (f"{m['layout']} names, {m['renamed']} renamed from torchvision's" if m["layout"] == "torchvision"
             else "bd4nn names")
    lines.append(f"{m['file']}: {m['arch']}, width {m['width']:g} ({m['width_source']}), {m['num_classes']} classes; "
                 f"{where}{'; prefix ' + repr(m['prefix_dropped']) + ' dropped' if m['prefix_dropped'] else ''}; "
                 f"{m['neurons']} neurons in {len(m['layers'])} layers; sha256 {m['sha256'][:16]}")
    nrm = m["normalization"]
    if nrm["source"] == "file":
        lines.append("normalization: the file's own (normalize.mean/std)")
    else:
        lines.append(f"normalization: none in the file; using {d['dataset']}'s mean "
                     f"({', '.join(f'{v:.4f}' for v in nrm['mean'])}) and std ({', '.join(f'{v:.4f}' for v in nrm['std'])})")
    lines.append(f"clean data: {d['clean_images']} images of {d['dataset']} (the seeded {100 * d['fraction']:g} % clean "
                 f"split{', capped' if d['clean_images_cap'] else ''}; {d['source']}); device {doc['device']}")
    if rule["kind"] == "top":
        lines.append(f"flagging rule: the {rule['k']} highest scores of every layer a localizer covers (--top)")
    else:
        lines.append(f"flagging rule: score > mean + {rule['threshold']:g} std of its layer (z > {rule['threshold']:g}; "
                     f"CLP's u); layers of < {rule['min_layer_size']} neurons cannot flag ('small')")
    lines.append("")
    names = list(locs)
    rows = []
    for layer, size in m["layers"].items():
        row = [layer, size]
        for n in names:
            s = locs[n]["layers"].get(layer)
            if s is None:
                row.append("-")
            elif s["flagged"]:
                row.append(" ".join(str(f["channel"]) for f in s["flagged"]) + ("  (tie)" if s["tied"] else ""))
            else:
                row.append("" if s["can_flag"] else "small")
        rows.append(row)
    lines.append(tabulate(rows, headers=["layer", "neurons", *names], disable_numparse=True))
    lines.append("('-': outside the localizer's scope" + ("; '(tie)': equal scores at the cut, decided by the seeded "
                 "tie-break" if rule["kind"] == "top" else "") + ")")
    lines.append("")
    for n in names:
        r = locs[n]
        covered = len(r["layers"])
        lines.append(f"{n}: {r['n_flagged']} flagged in {len(r['flagged'])} of {covered} layer{'s' if covered != 1 else ''} "
                     f"({r['scope']}) in {r['time_s']:.2f} s")
    lines.append("")
    agree = doc["agreement"]
    if len(names) < 2:
        lines.append("agreement: one localizer only")
    elif not agree:
        lines.append("agreement: no neuron is flagged by two or more localizers")
    else:
        lines.append(f"agreement: {len(agree)} neuron{'s' if len(agree) != 1 else ''} flagged by two or more localizers")
        lines.append(tabulate([[a["layer"], a["channel"], ", ".join(a["localizers"])] for a in agree],
                              headers=["layer", "channel", "flagged by"], disable_numparse=True))
    nc = doc.get("nc")
    if nc:
        name = f" ({nc['target_name']})" if nc.get("target_name") not in (None, str(nc["target"])) else ""
        fired = (f"above {nc['mad_threshold']:g}: the MAD test flags it, the model looks infected"
                 if nc["infected"] else f"the MAD test did not fire (threshold {nc['mad_threshold']:g}); the "
                 "smallest-norm class is reported")
        lines.append("")
        lines.append(f"NC: suspect target class {nc['target']}{name}, anomaly index {_num(nc['anomaly_index'])}; {fired}"
                     + (f"; flagged classes {', '.join(map(str, nc['flagged']))}" if nc["flagged"] else ""))
    return "\n".join(lines)


# ------------------------------------------------------------------------------ the command


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``bd4nn scan``'s arguments (the CLI adds --threads)."""
    p.add_argument("model", type=Path, metavar="MODEL.safetensors",
                   help="the model's state_dict in safetensors (bd4nn or torchvision ResNet names; never a pickle)")
    p.add_argument("--arch", help="vgg13, vgg16, resnet18, resnet34 (default: what a bd4nn-written file records)")
    p.add_argument("--dataset", help="cifar10, cifar100, gtsrb or imagefolder: the clean data and, when the file has "
                                     "no normalization buffers, its mean/std (default: what a bd4nn file records)")
    p.add_argument("--num-classes", type=number(int, 2), help="the model's classes (default: the head's rows; must "
                                                             "equal the dataset's)")
    p.add_argument("--width", type=number(float, 0, above=True, high=64),
                   help="channel width multiplier (default: inferred from the first conv's out-channels)")
    p.add_argument("--localizers", default=",".join(DEFAULT_LOCALIZERS), metavar="A,B,...",
                   help=f"comma-separated (default {','.join(DEFAULT_LOCALIZERS)}; also nc, anp, deepmufl, plugins; "
                        "not pfl or random)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--threshold", type=number(float, 0, above=True), default=DEFAULT_THRESHOLD, metavar="U",
                   help=f"flag a neuron whose score exceeds its layer's mean by U standard deviations "
                        f"(default {DEFAULT_THRESHOLD:g}, CLP's u)")
    g.add_argument("--top", type=number(int, 1), metavar="K", help="flag the K highest of every layer instead")
    p.add_argument("--set", dest="settings", action="append", type=setting, default=[], metavar="LOC.KEY=VALUE",
                   help="override a localizer setting (repeatable), e.g. --set nc.epochs=10")
    p.add_argument("--clean-images", type=number(int, 1), help="use only this many of the 5%% clean images")
    p.add_argument("--seed", type=number(int, 0), default=0, help="the localizers' seed (default 0)")
    p.add_argument("--device", type=device_arg, default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if present)")
    p.add_argument("--data", metavar="PATH", help="dataset archive folder (default: $BD4NN_DATA)")
    p.add_argument("--json", type=Path, metavar="OUT.json", help="also write everything as one JSON object")


def run(args: argparse.Namespace, *, data=None) -> int:
    """``bd4nn scan``: print the report (and write ``--json``). ``data``: a preloaded dataset."""
    from bd4nn.data import list_datasets

    if args.dataset is None and args.data and args.data in list_datasets() and not Path(args.data).exists():
        raise BadInputError(f"--data names the dataset's files here; did you mean --dataset {args.data}?")
    doc = scan(args.model, arch=args.arch, dataset=args.dataset, num_classes=args.num_classes, width=args.width,
               localizers=[n for n in args.localizers.split(",")], settings=args.settings,
               threshold=args.threshold, top=args.top, clean_images=args.clean_images, device=args.device,
               seed=args.seed, data=data, data_root=args.data)
    print(format_report(doc))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
        print(f"\njson: {args.json}")
    return 0
