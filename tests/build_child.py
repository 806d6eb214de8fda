"""Run by the tests as a separate process (so that it can be killed): build the repro profile (tests/synthetic.py) on
the three-colour synthetic data into the database folder ``argv[1]``, one torch thread, and
print the build's stats as one JSON line."""

import json
import sys

import torch

torch.set_num_threads(1)

from bd4nn.build import build  # noqa: E402
from synthetic import repro_profile, three_colours  # noqa: E402

if __name__ == "__main__":
    stats = build(sys.argv[1], repro_profile(), device="cpu", data={"cifar10": three_colours()}, progress=False)
    print(json.dumps(stats.to_dict()), flush=True)
