"""Synthetic data shared by the unit tests (no dataset files needed)."""

import torch


def colour_data(n: int, seed: int = 0):
    """Two separable classes: reddish (0) vs bluish (1) noisy uint8 images."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randint(0, 120, (n, 3, 32, 32), generator=g)
    x[y == 0, 0] += 120
    x[y == 1, 2] += 120
    return x.to(torch.uint8), y
