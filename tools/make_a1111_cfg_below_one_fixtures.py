#!/usr/bin/env python3
"""A1111 1.10's classifier-free guidance at a scale below 1 (our `guidance_rule: a1111`) on the
tiny model: its CFG denoiser runs the negative prompt at every scale and combines
`uncond + (cond - uncond) * scale`, so at 0.5 the image is halfway between the negative
prompt's prediction and the prompt's, and at 0 it is the negative prompt's (diffusers runs the
prompt alone at or below 1). Euler a (k-diffusion) and A1111's DDIM (a timestep sampler),
txt2img and img2img (A1111's rule at strength 0.6), at 0.5 and 0, one a batch of two.

Runs tools/make_a1111_skip_early_fixtures.py's machinery on these cases: A1111's CFGDenoiser,
Sampler.launch_sampling, k-diffusion's sample_euler_ancestral and A1111's DDIM through
CompVisSampler, taken with `ast` by tools/a1111_source.py (see that script's docstring for the
sources it needs and which digests match 1.10's).

Writes, under OUT (default crates/pipeline/tests/fixtures):
  a1111-cfg-below-one.json, a1111-cfg-below-one.safetensors (as a1111-skip-early.*)

Usage:
  pip install --no-deps k-diffusion==0.1.1.post1
  python tools/make_a1111_cfg_below_one_fixtures.py --a1111 PATH/TO/stable-diffusion-webui
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_a1111_skip_early_fixtures as skip  # noqa: E402

CASES = {
    "euler_a.scale0.5": dict(sampler="Euler a", steps=10, seed=501, guidance_scale=0.5),
    "euler_a.scale0": dict(sampler="Euler a", steps=10, seed=502, guidance_scale=0.0),
    "euler_a.scale0.5.img2img": dict(sampler="Euler a", steps=10, seed=503, strength=0.6,
                                     guidance_scale=0.5),
    "ddim.scale0.5.batch": dict(sampler="DDIM", steps=10, seed=504, batch_size=2,
                                guidance_scale=0.5),
    "ddim.scale0": dict(sampler="DDIM", steps=10, seed=505, guidance_scale=0.0),
    "ddim.scale0.img2img": dict(sampler="DDIM", steps=10, seed=506, strength=0.6,
                                guidance_scale=0.0),
}

if __name__ == "__main__":
    skip.main(stem="a1111-cfg-below-one", which=CASES, script=__file__, doc=__doc__)
