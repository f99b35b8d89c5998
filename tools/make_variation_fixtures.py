#!/usr/bin/env python3
"""Reference noise for A1111's variation seeds (`subseed`, `subseed_strength`): A1111's own
`slerp` (modules/rng.py), taken from a checkout of AUTOMATIC1111/stable-diffusion-webui with
`ast` (the function's source is executed, not copied here), run with torch on the CPU noise of
our seeds: `noise = torch.randn(shape, generator=Generator().manual_seed(seed))`, the same for
the variation seed, then `slerp(strength, noise, subnoise)` per image of shape [C, H, W], as
A1111's `ImageRNG.first` calls it (with `randn_source` "CPU", the source this server draws
from). Pinned: torch 2.11.0 (tools/requirements.txt).

Writes, under OUT (default crates/pipeline/tests/fixtures):
  variation.safetensors   noise.<case>: [C, H, W] f32
  variation.json          the cases (seed, variation seed, strength, shape) and the source

Usage:
  python tools/make_variation_fixtures.py --a1111 PATH/TO/stable-diffusion-webui [--out DIR]
"""

import ast
import hashlib
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from a1111_source import a1111_args  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "crates", "pipeline", "tests", "fixtures")

# (seed, variation seed, strength, [C, H, W]): SD 1.5's 512x512 and a non-square latent; the
# ends (0, 1), values between, and a variation seed equal to the seed (A1111's linear branch:
# the mean dot product passes 0.9995).
CASES = [
    (42, 7, 0.0, [4, 64, 64]),
    (42, 7, 0.1, [4, 64, 64]),
    (42, 7, 0.5, [4, 64, 64]),
    (42, 7, 1.0, [4, 64, 64]),
    (3000000000, 4294967295, 0.93, [4, 40, 24]),
    (123, 124, 0.35, [4, 12, 8]),
    (5, 5, 0.4, [4, 16, 16]),
]


def a1111_slerp(checkout):
    path = os.path.join(checkout, "modules", "rng.py")
    with open(path, encoding="utf-8") as f:
        source = f.read()
    tree = ast.parse(source)
    fns = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "slerp"]
    assert len(fns) == 1, "modules/rng.py defines slerp once"
    module = ast.Module(body=fns, type_ignores=[])
    namespace = {"torch": torch}
    exec(compile(module, path, "exec"), namespace)
    return namespace["slerp"], hashlib.sha256(ast.get_source_segment(source, fns[0]).encode()).hexdigest()


def main():
    args = a1111_args(__file__, __doc__, DEFAULT_OUT)
    if args is None:
        return
    from safetensors.torch import save_file

    slerp, digest = a1111_slerp(args.a1111)
    tensors, cases = {}, {}
    for seed, subseed, strength, shape in CASES:
        noise = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))
        subnoise = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(subseed))
        # ImageRNG.first: slerp only for a non-zero strength.
        out = slerp(strength, noise, subnoise) if strength != 0 else noise
        label = f"{seed}.{subseed}.{strength}.{'x'.join(map(str, shape))}"
        tensors[f"noise.{label}"] = out.contiguous()
        cases[label] = dict(seed=seed, variation_seed=subseed, strength=strength, shape=shape)
    meta = {
        "generated_by": "tools/make_variation_fixtures.py",
        "versions": {"torch": torch.__version__},
        "slerp": f"modules/rng.py slerp, source sha256 {digest}",
        "cases": cases,
    }
    save_file(tensors, os.path.join(args.out, "variation.safetensors"),
              metadata={"generated_by": "tools/make_variation_fixtures.py"})
    with open(os.path.join(args.out, "variation.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
