"""``bd4nn scan`` (bd4nn.scan): safe loading, the torchvision name mapping, the flagging rule,
the report and its JSON. Tiny models and synthetic data (tests/synthetic.py), CPU, seconds.

The independent checks: the torchvision mapping is checked by the logits of a real torchvision
ResNet-18 (CIFAR stem) against the mapped bd4nn model; the flags of the planted model and of the
hand-made scores are worked out by hand; a pickle that would touch a marker file when unpickled
must leave no marker.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from bd4nn.argtypes import Parser
from bd4nn.data import get_spec
from bd4nn.db import BenignRecord, Database
from bd4nn.errors import BadInputError, UnknownNameError
from bd4nn.models import get_model
from bd4nn.neurons import NeuronMap
from bd4nn.runtime import pinned_threads
from bd4nn import scan as scan_mod
from bd4nn.scan import agreement, flag, load_model, make_localizers, min_flaggable, scan
from tests.synthetic import three_colours

CIFAR = get_spec("cifar10")
PLANTED = 7  # the channel of the VGG's last layer made an outlier for both CLP and FP


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with pinned_threads(1):  # tiny tensors: one thread is faster on a shared 2-core machine
        yield


@pytest.fixture(scope="module")
def data():
    return three_colours(n_train=400, n_test=8)  # 5 % clean split: 20 images


def planted_vgg() -> nn.Module:
    """A width-1/8 VGG-13 whose last neuron layer (64 channels) has one planted channel: its BN
    gain is 100x the others' (CLP's UCLC = spectral norm x |gamma/sigma|: 100x, z = 63/8 = 7.9)
    and its BN shift is -1000 (dead after the ReLU: mean head feature 0, the others ~1, so FP's
    negated mean makes it the one outlier, z ~ 7.9)."""
    model = get_model("vgg13", 10, 0.125, seed=0).eval()
    bn = NeuronMap(model).bn(NeuronMap(model).penultimate)
    with torch.no_grad():
        bn.weight.fill_(0.01)
        bn.bias.fill_(1.0)
        bn.weight[PLANTED] = 1.0
        bn.bias[PLANTED] = -1000.0
    return model


@pytest.fixture(scope="module")
def bd4nn_file(tmp_path_factory) -> tuple[Path, nn.Module]:
    """The planted model stored as bd4nn stores a benign parent (Database.save_benign)."""
    model = planted_vgg()
    db = Database(tmp_path_factory.mktemp("db"))
    db.save_benign(model, BenignRecord("cifar10", "vgg13", 0.125, 10, list(CIFAR.mean), list(CIFAR.std), 0, 0.1))
    return db.benign_path("cifar10", "vgg13"), model


def cli(argv: list[str], data, capsys) -> tuple[int, str]:
    p = Parser(prog="bd4nn scan")
    scan_mod.add_arguments(p)
    rc = scan_mod.run(p.parse_args(argv), data=data)
    return rc, capsys.readouterr().out


def tv_names(state: dict) -> dict:
    """bd4nn ResNet names -> torchvision's, written out independently of bd4nn.scan."""
    out = {}
    for k, v in state.items():
        if k.startswith("normalize."):
            continue
        k = k.replace("shortcut", "downsample")
        if k.startswith("linear."):
            k = "fc." + k.split(".", 1)[1]
        out[k] = v
    return out


# ---------------------------------------------------------------------------- 1. a bd4nn file


def test_scan_bd4nn_file_clp_fp(bd4nn_file, data, tmp_path, capsys):
    path, model = bd4nn_file
    out_json = tmp_path / "out" / "scan.json"
    # --arch and --dataset come from the file's metadata (save_benign records them)
    rc, out = cli([str(path), "--localizers", "clp,fp", "--device", "cpu", "--json", str(out_json)], data, capsys)
    assert rc == 0
    last = NeuronMap(model).penultimate
    doc = json.loads(out_json.read_text())  # strict JSON (allow_nan=False wrote it)
    assert set(doc) == {"format", "model", "data", "device", "seed", "rule", "localizers", "agreement", "nc",
                        "versions"}
    assert doc["format"] == "bd4nn.scan/1" and doc["nc"] is None
    m = doc["model"]
    assert (m["arch"], m["width"], m["num_classes"], m["layout"]) == ("vgg13", 0.125, 10, "bd4nn")
    assert "inferred" in m["width_source"] and m["normalization"]["source"] == "file"
    assert m["layers"] == NeuronMap(model).sizes
    assert doc["data"]["clean_images"] == 20 and doc["data"]["dataset"] == "cifar10"
    assert doc["rule"] == {"kind": "zscore", "threshold": 3.0, "min_layer_size": 11}
    clp, fp = doc["localizers"]["clp"], doc["localizers"]["fp"]
    assert set(clp) >= {"scope", "settings", "time_s", "details", "flagged", "n_flagged", "layers"}
    assert PLANTED in clp["flagged"][last]
    assert fp["flagged"] == {last: [PLANTED]}  # FP covers the last layer only
    assert list(fp["layers"]) == [last] and len(clp["layers"]) == 10
    summ = clp["layers"][last]
    assert set(summ) == {"n", "mean", "std", "min", "max", "max_z", "can_flag", "tied", "flagged"}
    planted = next(f for f in summ["flagged"] if f["channel"] == PLANTED)
    assert planted["z"] > 3 and planted["score"] == pytest.approx(summ["max"])
    assert clp["layers"]["features.0"]["can_flag"] is False  # 8 channels: z can never exceed 3
    # for CLP the rule is CLP's own pruning rule
    from localizers.clp import CLP
    loc = CLP()
    assert clp["flagged"] == loc.suspicious(loc(model, NeuronMap(model), None))
    assert {"layer": last, "channel": PLANTED, "localizers": ["clp", "fp"]} in doc["agreement"]
    assert all(len(a["localizers"]) >= 2 for a in doc["agreement"])
    # the printed report: per layer, per localizer, the agreement
    assert "normalization: the file's own" in out and "20 images of cifar10" in out
    row = next(line for line in out.splitlines() if line.startswith(last + " "))
    assert row.split()[:2] == [last, "64"] and row.split().count(str(PLANTED)) == 2
    first = next(line for line in out.splitlines() if line.startswith("features.0 "))
    assert first.split() == ["features.0", "8", "small", "-"]  # too small for z > 3; outside FP's scope
    assert "agreement:" in out and "clp, fp" in out
    assert f"json: {out_json}" in out


def test_scan_nc_verdict_and_top(bd4nn_file, data, capsys):
    path, model = bd4nn_file
    doc = scan(path, localizers=["nc", "fp"], settings=[("nc.epochs", 1), ("nc.augment", False)],
               top=2, device="cpu", data=data)
    nc = doc["nc"]
    details = doc["localizers"]["nc"]["details"]
    assert nc["target"] == details["target"] and nc["anomaly_index"] == details["anomaly_index"]
    assert nc["mad_threshold"] == 2.0 and isinstance(nc["infected"], bool)
    assert doc["localizers"]["nc"]["settings"]["epochs"] == 1
    assert doc["rule"] == {"kind": "top", "k": 2}
    last = NeuronMap(model).penultimate
    assert PLANTED in doc["localizers"]["fp"]["flagged"][last] and len(doc["localizers"]["fp"]["flagged"][last]) == 2
    text = scan_mod.format_report(doc)
    assert f"NC: suspect target class {nc['target']}, anomaly index" in text
    json.dumps(doc, allow_nan=False)


# --------------------------------------------------------------- 2. torchvision's names, mapped


def test_scan_torchvision_resnet18_same_logits(data, tmp_path):
    import torchvision

    torch.manual_seed(0)
    tv = torchvision.models.resnet18(num_classes=10)
    tv.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)  # CIFAR stem
    tv.maxpool = nn.Identity()
    with torch.no_grad():  # non-trivial BN statistics, so a swapped BN would change the logits
        for mod in tv.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
    tv.eval()
    state = tv.state_dict()
    path = tmp_path / "tv.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))

    model, info, finfo, _ = load_model(path, "resnet18", mean=CIFAR.mean, std=CIFAR.std)
    # every bd4nn key comes from the torchvision key tv_names() writes for it
    assert tv_names(model.state_dict()).keys() == state.keys()
    assert (info.layout, info.width, info.num_classes, info.has_normalization) == ("torchvision", 1.0, 10, False)
    assert info.renamed == sum(("downsample" in k) or k.startswith("fc.") for k in state)
    x = torch.rand(4, 3, 32, 32)
    mean, std = torch.tensor(CIFAR.mean).view(1, 3, 1, 1), torch.tensor(CIFAR.std).view(1, 3, 1, 1)
    with torch.no_grad():
        want = tv((x - mean) / std)
        got = model(x)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (got - want).abs().max()

    doc = scan(path, arch="resnet18", dataset="cifar10", localizers=["clp"], device="cpu", data=data)
    assert doc["model"]["layout"] == "torchvision"
    assert doc["model"]["normalization"] == {"mean": pytest.approx(list(CIFAR.mean)),
                                             "std": pytest.approx(list(CIFAR.std)), "source": "dataset cifar10"}
    assert len(doc["localizers"]["clp"]["layers"]) == 20
    assert "normalization: none in the file; using cifar10's mean" in scan_mod.format_report(doc)


# ------------------------------------------------------------------------ 3. clear key errors


def small_tv_state() -> dict:
    return tv_names(get_model("resnet18", 10, 0.125, seed=0).state_dict())


def test_wrong_keys_named_in_the_error(data, tmp_path):
    state = small_tv_state()
    del state["layer1.0.bn1.running_var"]
    state["extra.weight"] = torch.zeros(3)
    state["fc.weight"] = torch.zeros(7, 64)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(BadInputError) as exc:
        scan(path, arch="resnet18", dataset="cifar10", num_classes=10, localizers=["clp"], device="cpu", data=data)
    msg = str(exc.value)
    assert "does not fit bd4nn's resnet18 (width 0.125, 10 classes; torchvision names" in msg
    assert "missing 1: layer1.0.bn1.running_var" in msg
    assert "unexpected 1: extra.weight" in msg
    assert "misshapen 1: fc.weight [7, 64] (expected [10, 64])" in msg  # the file's own names
    assert "Expected 102 tensors (besides the optional normalize.mean/std and BatchNorm num_batches_tracked): " \
           "conv1.weight, bn1.weight, bn1.bias, bn1.running_mean, bn1.running_var, ..." in msg
    assert "give --width" not in msg  # only the head misfits: the width is not in question

    # an ImageNet stem: named, with the reason
    state = small_tv_state()
    state["conv1.weight"] = torch.zeros(8, 3, 7, 7)
    save_file(state, str(path))
    with pytest.raises(BadInputError, match=r"conv1.weight \[8, 3, 7, 7\] \(expected \[8, 3, 3, 3\]\).*7x7 stem"):
        load_model(path, "resnet18", mean=CIFAR.mean, std=CIFAR.std)

    # a width that no first/last layer ratio explains asks for --width
    state = get_model("vgg13", 10, 0.125).state_dict()
    state["features.7.weight"] = torch.zeros(5, 8, 3, 3)
    save_file(state, str(path))
    with pytest.raises(BadInputError, match=r"features.7.weight \[5, 8, 3, 3\].*give --width"):
        load_model(path, "vgg13")

    # a DataParallel prefix is dropped; NaN weights are refused
    state = {"module." + k: v for k, v in get_model("vgg13", 10, 0.125).state_dict().items()}
    save_file(state, str(path))
    assert load_model(path, "vgg13")[1].prefix == "module."
    state["module.classifier.bias"] = torch.full((10,), float("nan"))
    save_file(state, str(path))
    with pytest.raises(BadInputError, match="NaN or inf in classifier.bias"):
        load_model(path, "vgg13")


def test_database_delta_and_missing_arch_refused(tmp_path):
    path = tmp_path / "delta.safetensors"
    save_file({"x": torch.zeros(1)}, str(path),
              metadata={"bd4nn": json.dumps({"format": "bd4nn.delta/1", "id": "cifar10-vgg13-badnets-narrow-00"})})
    with pytest.raises(BadInputError, match="database delta.*bd4nn localize"):
        load_model(path)
    save_file(get_model("vgg13", 10, 0.125).state_dict(), str(path))
    with pytest.raises(BadInputError, match="give --arch"):
        load_model(path)
    with pytest.raises(BadInputError, match="unknown architecture"):
        load_model(path, "vgg99")


# -------------------------------------------------------------------------- 4. never a pickle


class _Touch:
    """Unpickling this creates a marker file: proof that nothing was unpickled if it is absent."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickles_refused(tmp_path, monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_load)
    state = get_model("vgg13", 10, 0.125).state_dict()
    zipped, legacy, evil = tmp_path / "m.pt", tmp_path / "legacy.pth", tmp_path / "evil.safetensors"
    torch.save(state, zipped)
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    marker = tmp_path / "unpickled"
    evil.write_bytes(pickle.dumps(_Touch(marker)))
    for path, kind in ((zipped, "zip archive"), (legacy, "pickle stream"), (evil, "pickle stream")):
        with pytest.raises(BadInputError) as exc:
            load_model(path, "vgg13")
        msg = str(exc.value)
        assert "only safetensors files are read" in msg and "never unpickles" in msg and kind in msg, msg
        assert "weights_only=True" in msg  # how to convert it where it is trusted
    assert not marker.exists()
    (tmp_path / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(BadInputError, match="no safetensors header"):
        load_model(tmp_path / "garbage.safetensors", "vgg13")
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "absent.safetensors", "vgg13")


# ---------------------------------------------------------------------- 5. the flagging rule


def test_flag_rule_on_hand_made_scores():
    eleven_and_one = [0.0] * 12
    eleven_and_one[4] = 10.0  # 12 values, one outlier: z = (n-1)/sqrt(n) = 11/sqrt(12) = 3.18 > 3
    nine_and_one = [0.0] * 10
    nine_and_one[2] = 10.0  # 10 values: z = 9/sqrt(10) = 2.85 <= 3, nothing can be flagged
    two_out = [0.0] * 20
    two_out[3] = two_out[17] = 10.0  # mean 1, unbiased sd = sqrt((18*1 + 2*81)/19) = 3.078: z = 9/3.078 = 2.92
    low = [0.0] * 12
    low[0] = -10.0  # a low outlier: only high scores are suspicious
    scores = {"a": torch.tensor(eleven_and_one), "b": torch.tensor(nine_and_one), "c": torch.full((20,), 5.0),
              "d": torch.tensor(two_out), "e": torch.tensor(low), "f": torch.tensor([1.0])}
    assert flag(scores) == {"a": [4]}
    assert flag(scores, threshold=2.9) == {"a": [4], "d": [3, 17]}
    assert flag(scores, threshold=2.5) == {"a": [4], "b": [2], "d": [3, 17]}
    assert min_flaggable(3.0) == 11 and min_flaggable(2.0) == 6  # 5/sqrt(6) = 2.04; 4/sqrt(5) = 1.79

    top = {"x": torch.tensor([3.0, 1.0, 2.0, 5.0]), "y": torch.tensor([4.0])}
    assert flag(top, top=2) == {"x": [0, 3], "y": [0]}
    tied = {"t": torch.tensor([1.0, 1.0, 1.0, 0.0])}
    picks = flag(tied, top=2, seed=0)["t"]
    assert len(picks) == 2 and set(picks) <= {0, 1, 2} and flag(tied, top=2, seed=0)["t"] == picks

    flags = {"clp": {"L": [1, 2]}, "fp": {"L": [2]}, "slicer": {"L": [2], "M": [0]}, "nc": {"M": [0]}}
    assert agreement(flags) == [{"layer": "L", "channel": 2, "localizers": ["clp", "fp", "slicer"]},
                                {"layer": "M", "channel": 0, "localizers": ["slicer", "nc"]}]


# ---------------------------------------------------------------------------- 6. refusals


def test_localizers_refused_and_settings_routed(capsys):
    with pytest.raises(BadInputError, match="pfl reads the ground truth"):
        make_localizers(["clp", "pfl"])
    with pytest.raises(BadInputError, match="random is not offered by scan"):
        make_localizers(["random"])
    with pytest.raises(UnknownNameError):
        make_localizers(["nope"])
    with pytest.raises(BadInputError, match="nc is not among the localizers"):
        make_localizers(["clp"], [("nc.epochs", 3)])
    with pytest.raises(BadInputError, match="LOCALIZER.KEY=VALUE"):
        make_localizers(["clp"], [("u", 3)])
    locs = make_localizers(["clp", "nc"], [("clp.u", 2.5), ("nc.epochs", 3)])
    assert locs["clp"].settings.u == 2.5 and locs["nc"].settings.epochs == 3
    with pytest.raises(BadInputError, match="did you mean --dataset cifar10"):
        cli(["m.safetensors", "--arch", "vgg13", "--data", "cifar10", "--device", "cpu"], None, capsys)
