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


def _conv_output_dtypes(model):
    seen = []
    model.features[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    return seen


def test_bf16_env_switches_the_cpu_onto_the_cuda_path(monkeypatch):
    monkeypatch.delenv(runtime.BF16_ENV, raising=False)
    cpu = torch.device("cpu")
    assert not runtime.amp_enabled(cpu) and not runtime.cuda_path(cpu)
    assert runtime.amp_enabled("cuda") and runtime.cuda_path("cuda")
    assert runtime.amp_enabled(cpu, True) and not runtime.amp_enabled("cuda", False)
    monkeypatch.setenv(runtime.BF16_ENV, "1")
    assert runtime.amp_enabled(cpu) and runtime.cuda_path(cpu)
    with runtime.autocast(cpu):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    monkeypatch.setenv(runtime.BF16_ENV, "0")
    assert not runtime.amp_enabled("cuda") and not runtime.amp_enabled(cpu)
    with runtime.autocast(cpu):
        assert not torch.is_autocast_enabled("cpu")
    monkeypatch.setenv(runtime.BF16_ENV, "maybe")
    with pytest.raises(ValueError, match="BD4NN_BF16"):
        runtime.amp_enabled(cpu)


def test_training_and_evaluation_run_in_bf16_under_the_proxy(monkeypatch):
    from bd4nn.train import TrainConfig, train

    x = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8)
    y = torch.randint(0, 10, (32,))
    for env, dtype in (("0", torch.float32), ("1", torch.bfloat16)):
        monkeypatch.setenv(runtime.BF16_ENV, env)
        model = get_model("vgg13", 10, width=0.0625, seed=0)
        seen = _conv_output_dtypes(model)
        res = train(model, x, y, config=TrainConfig(epochs=1, batch_size=16), device="cpu", progress=False)
        assert seen and set(seen) == {dtype} and res.steps == 2
        assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
        seen.clear()
        predict(model, x, device="cpu")
        assert set(seen) == {dtype}


def test_to_float_scales_uint8_and_copies_only_when_asked():
    u = torch.tensor([0, 51, 255], dtype=torch.uint8)
    assert torch.allclose(runtime.to_float(u), torch.tensor([0.0, 0.2, 1.0]))
    f = torch.rand(3)
    assert runtime.to_float(f) is f
    c = runtime.to_float(f, copy=True)
    assert c is not f and torch.equal(c, f)
    assert runtime.to_float(f.double()).dtype == torch.float32


def test_peak_memory_sees_a_stage_allocation_and_resets_between_stages():
    import subprocess
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("VmHWM is Linux-only")
    # a fresh process: in a long one, freed heap pages stay resident and a new allocation may
    # reuse them without raising the resident set (PeakMemory's docstring)
    code = """
import torch
from bd4nn import runtime
with runtime.PeakMemory("cpu") as big:
    x = torch.ones(64 * 2**20 // 4)
    x += 1
    del x
with runtime.PeakMemory("cpu") as small:
    y = torch.ones(16)
print(big.delta_mib, small.delta_mib)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    big, small = map(float, out.stdout.split())
    assert 60 <= big  # 64 MiB touched
    assert small < 32  # the first stage's peak was forgotten


def test_predict_batches_small_on_the_cpu_and_large_elsewhere():
    assert runtime.eval_batch_size("cpu") == runtime.CPU_EVAL_BATCH < runtime.ACCELERATOR_EVAL_BATCH
    assert runtime.eval_batch_size(torch.device("cuda", 0)) == runtime.ACCELERATOR_EVAL_BATCH
    seen: list[int] = []

    class Count(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(3, 10))

        def forward(self, x):
            seen.append(x.shape[0])
            return x.mean((2, 3)) @ self.w

    n = 2 * runtime.CPU_EVAL_BATCH + 5
    out = predict(Count(), torch.rand(n, 3, 4, 4), device="cpu")
    assert seen == [runtime.CPU_EVAL_BATCH, runtime.CPU_EVAL_BATCH, 5] and out.shape == (n,)
    seen.clear()
    predict(Count(), torch.rand(n, 3, 4, 4), device="cpu", batch_size=n)  # the caller's batch wins
    assert seen == [n]
