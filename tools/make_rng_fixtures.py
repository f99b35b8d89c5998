#!/usr/bin/env python3
"""Reference normals for crates/pipeline/src/rng.rs (torch 2.11.0, CPU generator).

Writes crates/pipeline/tests/fixtures/randn.safetensors and randn.json:
  randn.<seed>.<n>      = torch.randn(n, generator=torch.Generator("cpu").manual_seed(seed))
  randn_seq.<seed>.<k>  = successive torch.randn(n_i) calls on ONE generator, concatenated;
                          randn.json lists the call sizes for each k under "sequences".
Run from the repository root: python3 tools/make_rng_fixtures.py
"""
import json
import os

import torch
from safetensors.torch import save_file

SEEDS = [0, 1, 42, 2**32 - 1, 2**32 + 5, 123456789]
SIZES = [1, 3, 15, 16, 17, 31, 100, 4 * 8 * 8, 4 * 64 * 64]
# Successive calls on one generator: the state (and torch's cached second normal of the
# per-element path used below 16 values) must carry over between calls.
SEQUENCES = [
    [256, 256, 5],
    [3, 17, 1, 2],
    [1, 31, 16, 1, 100],
    [5, 4 * 8 * 8, 7],
]

OUT = os.path.join("crates", "pipeline", "tests", "fixtures")


def main():
    assert torch.__version__.startswith("2.11."), torch.__version__
    tensors = {}
    for seed in SEEDS:
        for n in SIZES:
            g = torch.Generator("cpu").manual_seed(seed)
            tensors[f"randn.{seed}.{n}"] = torch.randn(n, generator=g)
        for k, calls in enumerate(SEQUENCES):
            g = torch.Generator("cpu").manual_seed(seed)
            tensors[f"randn_seq.{seed}.{k}"] = torch.cat([torch.randn(n, generator=g) for n in calls])
    os.makedirs(OUT, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, "randn.safetensors"))
    meta = {
        "torch": torch.__version__,
        "seeds": SEEDS,
        "sizes": SIZES,
        "sequences": SEQUENCES,
        "keys": {
            "single": "randn.<seed>.<n>",
            "sequence": "randn_seq.<seed>.<index into sequences>",
        },
    }
    with open(os.path.join(OUT, "randn.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
