"""Synthetic data shared by the unit tests (no dataset files needed)."""

import torch

from bd4nn.build import Profile
from bd4nn.data import ImageData, get_spec


def colour_data(n: int, seed: int = 0):
    """Two separable classes: reddish (0) vs bluish (1) noisy uint8 images."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randint(0, 120, (n, 3, 32, 32), generator=g)
    x[y == 0, 0] += 120
    x[y == 1, 2] += 120
    return x.to(torch.uint8), y


def three_colours(n_train=128, n_test=64, seed=0) -> ImageData:
    """Three colour classes (a 10-class spec: the other classes are simply absent)."""
    g = torch.Generator().manual_seed(seed)

    def make(n):
        y = torch.randint(0, 3, (n,), generator=g)
        x = torch.randint(0, 100, (n, 3, 32, 32), generator=g)
        for c in range(3):
            x[y == c, c] += 150
        return x.to(torch.uint8), y

    (tx, ty), (vx, vy) = make(n_train), make(n_test)
    return ImageData("cifar10", tx, ty, vx, vy, [str(i) for i in range(10)], "synthetic", get_spec("cifar10"))


def micro_profile() -> Profile:
    return Profile(
        name="micro", datasets=["cifar10"], archs=["vgg13"], attacks=["badnets", "blended"],
        levels=["narrow", "large"], width=0.0625, candidates={"narrow": [0], "large": [0]},
        rc_images=16, benign={"epochs": 2, "batch_size": 32, "lr": 0.05},
        recipe={"epochs": 1, "batch_size": 32, "lr": 0.05},
    ).validate()


def repro_profile() -> Profile:
    """``micro_profile`` with a benign parent trained long enough that, on one torch thread, the
    BadNets large candidate is kept (the reproducibility tests then compare a stored delta too),
    and two windows per level: eight candidates, so that a build can be killed between them."""
    p = micro_profile()
    p.benign = {**p.benign, "epochs": 4}
    p.candidates = {"narrow": [0, 1], "large": [0, 1]}
    return p.validate()


def write_imagefolder(root, data: ImageData):
    """``data`` as an ImageFolder tree at ``root`` (``train/`` and ``test/``, class folders ``c0``,
    ``c1``, ..., lossless PNGs, so loading it gives back the same tensors), for the code that
    loads a dataset by name from a folder (``BD4NN_DATA``): other processes, Ray workers."""
    from pathlib import Path

    from PIL import Image

    root = Path(root)
    for split, xs, ys in (("train", data.train_x, data.train_y), ("test", data.test_x, data.test_y)):
        for i, (x, y) in enumerate(zip(xs, ys)):
            folder = root / split / f"c{int(y)}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x.permute(1, 2, 0).numpy()).save(folder / f"{i:04d}.png")
    return root
