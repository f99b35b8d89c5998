#!/usr/bin/env python3
"""When A1111 1.10 writes "NGMS" and "Skip Early CFG" in the infotext: its CFG denoiser sets
`extra_generation_params["Skip Early CFG"]` in the branch where a call skipped the negative
prompt early, and `["NGMS"]` in the `elif` where a call skipped it by `s_min_uncond`, so a run
whose sigmas never fall below `s_min_uncond`, or whose every call below it skipped early, has
no "NGMS". Cases on the tiny model: NGMS never reached (Euler a), the early skip covering every
call (DDIM, 1.0 with NGMS at 450), the early skip on the first call only (Euler a), and NGMS
reached only after the early skip (Heun, img2img).

Runs tools/make_a1111_skip_early_fixtures.py's machinery on these cases (A1111's CFGDenoiser,
Sampler.launch_sampling, k-diffusion's samplers and A1111's DDIM through CompVisSampler, taken
with `ast` by tools/a1111_source.py; see that script's docstring for the sources).

Writes, under OUT (default crates/pipeline/tests/fixtures):
  a1111-guidance-infotext.json, a1111-guidance-infotext.safetensors (as a1111-skip-early.*)

Usage:
  pip install --no-deps k-diffusion==0.1.1.post1
  python tools/make_a1111_guidance_infotext_fixtures.py --a1111 PATH/TO/stable-diffusion-webui
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_a1111_skip_early_fixtures as skip  # noqa: E402

# The tiny model's smallest sigma (0.0292, SD's) is above 0.02; DDIM's timesteps are 1..901.
CASES = {
    "euler_a.ngms_unreached": dict(sampler="Euler a", steps=10, seed=601,
                                   request=dict(s_min_uncond=0.02)),
    "ddim.early_covers_ngms": dict(sampler="DDIM", steps=10, seed=602,
                                   request=dict(s_min_uncond=450.0),
                                   options=dict(skip_early_cond=1.0)),
    "euler_a.early_first_only": dict(sampler="Euler a", steps=10, seed=603,
                                     options=dict(skip_early_cond=0.05)),
    "heun.ngms_after_early.img2img": dict(sampler="Heun", steps=6, seed=604, strength=0.6,
                                          request=dict(s_min_uncond=1.0),
                                          options=dict(skip_early_cond=0.3)),
}

if __name__ == "__main__":
    skip.main(stem="a1111-guidance-infotext", which=CASES, script=__file__, doc=__doc__)
