#!/usr/bin/env python3
"""Reference noise for A1111's seed resize (`seed_resize_from_w`, `seed_resize_from_h`): A1111's
own `ImageRNG.first` (modules/rng.py), taken from a checkout of AUTOMATIC1111/stable-diffusion-webui
with `ast` (the module's source is executed, not copied here) with `randn_source` "CPU" (the
source this server draws from) and `eta_noise_seed_delta` 0, run with torch: the noise of each
seed drawn at the "from" size (`from // 8` latent cells), bent towards the variation seed's when
there is one, and pasted centred into the target-size noise of the same seed (cropped where it
is larger). Pinned: torch 2.11.0 (tools/requirements.txt).

Writes, under OUT (default crates/pipeline/tests/fixtures):
  seed_resize.safetensors   noise.<case>: [B, C, H, W] f32 (`ImageRNG.first()`), and
                            next.<case>: the draw after it (`ImageRNG.next()`), which shows
                            where each image's generator stands afterwards
  seed_resize.json          the cases and the source's digest

Usage:
  python tools/make_seed_resize_fixtures.py --a1111 PATH/TO/stable-diffusion-webui [--out DIR]
"""

import hashlib
import json
import os
import sys
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from a1111_source import a1111_args  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "crates", "pipeline", "tests", "fixtures")

# (seeds, subseeds, subseed strength, from w, from h, [C, H, W]): smaller and larger "from"
# sizes than the target, in either direction, odd differences (Python's floor division of a
# negative offset), a variation seed, a batch, and "off" (a side at 0 or -1).
CASES = [
    ([42], None, 0.0, 128, 128, [4, 32, 32]),
    ([42], None, 0.0, 384, 256, [4, 32, 32]),
    ([7], None, 0.0, 200, 328, [4, 40, 24]),
    ([7], None, 0.0, 104, 64, [4, 12, 8]),
    ([3000000000, 3000000000], [11, 12], 0.3, 320, 192, [4, 32, 32]),
    ([5, 6], None, 0.0, 136, 72, [4, 8, 16]),
    ([9], None, 0.0, 512, -1, [4, 16, 16]),
    ([9], None, 0.0, 0, 512, [4, 16, 16]),
]


def a1111_rng(checkout):
    """modules/rng.py with its imports (devices, rng_philox, shared) stubbed for the CPU source."""
    path = os.path.join(checkout, "modules", "rng.py")
    with open(path, encoding="utf-8") as f:
        source = f.read()
    cpu = torch.device("cpu")
    opts = types.SimpleNamespace(randn_source="CPU", eta_noise_seed_delta=0)
    stubs = {
        "devices": types.SimpleNamespace(cpu=cpu, device=cpu),
        "rng_philox": types.SimpleNamespace(),
        "shared": types.SimpleNamespace(opts=opts, device=cpu),
    }
    modules = types.ModuleType("modules")
    for name, stub in stubs.items():
        setattr(modules, name, stub)
    sys.modules["modules"] = modules
    sys.modules["modules.shared"] = stubs["shared"]
    namespace = {"__name__": "a1111_rng"}
    exec(compile(source, path, "exec"), namespace)
    return namespace["ImageRNG"], hashlib.sha256(source.encode()).hexdigest()


def main():
    args = a1111_args(__file__, __doc__, DEFAULT_OUT)
    if args is None:
        return
    from safetensors.torch import save_file

    ImageRNG, digest = a1111_rng(args.a1111)
    tensors, cases = {}, {}
    for seeds, subseeds, strength, from_w, from_h, shape in CASES:
        label = f"{'-'.join(map(str, seeds))}.{from_w}x{from_h}.{'x'.join(map(str, shape))}"
        rng = ImageRNG(shape, seeds, subseeds=subseeds, subseed_strength=strength,
                       seed_resize_from_h=from_h, seed_resize_from_w=from_w)
        tensors[f"noise.{label}"] = rng.next().contiguous()
        tensors[f"next.{label}"] = rng.next().contiguous()
        cases[label] = dict(seeds=seeds, subseeds=subseeds, subseed_strength=strength,
                            seed_resize_from_w=from_w, seed_resize_from_h=from_h, shape=shape)
    meta = {
        "generated_by": "tools/make_seed_resize_fixtures.py",
        "versions": {"torch": torch.__version__},
        "rng": f"modules/rng.py ImageRNG, source sha256 {digest}",
        "cases": cases,
    }
    save_file(tensors, os.path.join(args.out, "seed_resize.safetensors"),
              metadata={"generated_by": "tools/make_seed_resize_fixtures.py"})
    with open(os.path.join(args.out, "seed_resize.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
