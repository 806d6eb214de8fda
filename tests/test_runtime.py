"""Thread choice (workers x threads <= cores, user override) and channels_last evaluation."""

import pytest
import torch

from bd4nn import runtime
from bd4nn.cli import main
from bd4nn.models import get_model
from bd4nn.train import predict


def test_threads_share_the_cores_among_workers(monkeypatch):
    monkeypatch.delenv(runtime.THREADS_ENV, raising=False)
    monkeypatch.setattr(runtime, "cpu_cores", lambda: 8)
    assert runtime.default_threads() == 8
    assert runtime.default_threads(workers=2) == 4
    assert runtime.default_threads(workers=3) == 2  # 3 x 2 <= 8
    assert runtime.default_threads(workers=16) == 1  # never 0


def test_threads_env_overrides_and_bad_values_are_clear(monkeypatch):
    monkeypatch.setenv(runtime.THREADS_ENV, "3")
    assert runtime.default_threads(workers=4) == 3
    monkeypatch.setenv(runtime.THREADS_ENV, "many")
    with pytest.raises(ValueError, match="BD4NN_THREADS"):
        runtime.default_threads()
    monkeypatch.setenv(runtime.THREADS_ENV, "0")
    with pytest.raises(ValueError, match=">= 1"):
        runtime.default_threads()


def test_set_threads_applies_and_cli_flag_sets_it(monkeypatch, capsys):
    before = torch.get_num_threads()
    try:
        assert runtime.set_threads(1) == 1 and torch.get_num_threads() == 1
        monkeypatch.delenv(runtime.THREADS_ENV, raising=False)
        torch.set_num_threads(2)  # so that only the flag can bring it back to 1
        assert main(["models", "vgg13", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_place_sets_the_memory_format_and_predict_keeps_it():
    model = get_model("resnet18", 10, width=0.125, seed=0).eval()
    x = torch.rand(64, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)  # NCHW reference
    conv = model.conv1.weight
    assert not conv.is_contiguous(memory_format=torch.channels_last)
    assert predict(model, x, device="cpu") is not None
    assert conv.is_contiguous() and not conv.is_contiguous(memory_format=torch.channels_last)  # untouched
    runtime.place(model, "cpu")
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    got = predict(model, x, device="cpu")
    top2 = ref.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-4  # near-ties could flip on rounding
    assert torch.equal(got[clear], ref.argmax(1)[clear]) and clear.sum() > 50
    assert runtime.use_channels_last(torch.device("cpu"))
    assert not runtime.use_channels_last(torch.device("cpu"), False)
