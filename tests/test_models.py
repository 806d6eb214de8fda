"""Model zoo: registry, shapes, the normalization module, and neuron totals from first principles."""

import pytest
import torch

from bd4nn.models import Normalize, get_model, list_models
from bd4nn.neurons import NeuronMap

VGG_CONFIGS = {
    "vgg13": [64, 64, 128, 128, 256, 256, 512, 512, 512, 512],
    "vgg16": [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512],
}
RESNET_BLOCKS = {"resnet18": [2, 2, 2, 2], "resnet34": [3, 4, 6, 3]}


def expected_total(name: str, width: float = 1.0) -> int:
    """Neuron count computed from the architecture's definition, independently of the code."""
    s = lambda c: max(1, int(round(c * width)))  # noqa: E731
    if name in VGG_CONFIGS:
        return sum(s(c) for c in VGG_CONFIGS[name])
    widths = [s(c) for c in (64, 128, 256, 512)]
    main = widths[0] + sum(2 * n * w for n, w in zip(RESNET_BLOCKS[name], widths))
    shortcuts = sum(widths[1:])  # one 1x1 shortcut conv at the start of stages 2-4
    return main + shortcuts


def test_registry_lists_the_four_architectures():
    assert {"vgg13", "vgg16", "resnet18", "resnet34"} <= set(list_models())
    assert list_models("vgg*") == ["vgg13", "vgg16"]
    with pytest.raises(KeyError, match=r"unknown model 'alexnet' \(known: .*vgg13"):
        get_model("alexnet")
    with pytest.raises(KeyError, match="did you mean 'resnet18'"):
        get_model("resnet-18")


@pytest.mark.parametrize(
    "name,total", [("vgg13", 2944), ("vgg16", 4224), ("resnet18", 4800), ("resnet34", 8512)]
)
def test_paper_neuron_totals(name, total):
    nm = NeuronMap(get_model(name, 10))
    assert nm.total == total == expected_total(name)


@pytest.mark.parametrize("name", ["vgg13", "vgg16", "resnet18", "resnet34"])
@pytest.mark.parametrize("width", [0.125, 0.3])
def test_width_scales_every_layer(name, width):
    model = get_model(name, 43, width=width)
    assert NeuronMap(model).total == expected_total(name, width)
    out = model.eval()(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 43)


def test_normalization_is_the_first_module_and_applies_the_given_stats():
    model = get_model("vgg13", 10, width=0.125, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    first_name, first = next(iter(model.named_children()))
    assert first_name == "normalize" and isinstance(first, Normalize)
    x = torch.ones(1, 3, 2, 2)
    y = first(x)
    # (1-0.5)/0.5 = 1, (1-0.25)/0.25 = 3, (1-0)/1 = 1
    assert torch.equal(y[0, :, 0, 0], torch.tensor([1.0, 3.0, 1.0]))


def test_seeded_construction_is_reproducible_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = get_model("resnet18", 10, width=0.125, seed=7)
    after = torch.rand(1)
    b = get_model("resnet18", 10, width=0.125, seed=7)
    c = get_model("resnet18", 10, width=0.125, seed=8)
    assert torch.equal(before, after)  # the seeded build did not consume the global RNG
    for (_, pa), (_, pb), (_, pc) in zip(
        a.state_dict().items(), b.state_dict().items(), c.state_dict().items()
    ):
        assert torch.equal(pa, pb)
    assert not torch.equal(a.conv1.weight, c.conv1.weight)
