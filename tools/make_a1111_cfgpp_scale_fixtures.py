#!/usr/bin/env python3
"""A1111's `DDIM CFG++` (our `ddim_cfgpp`) at a guidance scale of 1 and below, where A1111 still
runs the negative prompt (its CFG denoiser runs it at every scale) and steps along its
prediction, guiding at scale / 12.5: txt2img at 1 and 0.5, img2img at 1 (A1111's rule at
strength 0.6), a batch of two at 0, and "Skip Early CFG" at 1.

Runs make_a1111_cfgpp_fixtures.py's machinery (A1111's ddim_cfgpp, CompVisSampler, CFGDenoiser,
Sampler.initialize and launch_sampling, taken with `ast`) on these cases.

Sources: no A1111 v1.10 checkout could be reached when this was first run. It ran on a folder
assembled from 1.10's sd_samplers_cfg_denoiser.py, sd_samplers_timesteps.py and torch_utils.py,
an older release's sd_samplers_common.py, a fork's copy of sd_samplers_timesteps_impl.py's
ddim_cfgpp (its setup moved into `_prepare_sampling_parameters`, hence `samplers` below), and
1.10's StableDiffusionProcessing.fill_fields_from_opts (tools/make_a1111_skip_early_fixtures.py
says which digests match 1.10's). On those sources make_a1111_cfgpp_fixtures.py's own cases come
out as the committed a1111-cfgpp images, which a 1.10 checkout made: 5 of 7 identical, the two
img2img ones within 1 (mean 0.0003). On a 1.10 checkout, pass `--samplers ddim_cfgpp`.

Writes, under OUT (default crates/pipeline/tests/fixtures):
  a1111-cfgpp-scale.json, a1111-cfgpp-scale.safetensors (as a1111-cfgpp.*)

Usage:
  python tools/make_a1111_cfgpp_scale_fixtures.py --a1111 PATH/TO/stable-diffusion-webui
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_a1111_cfgpp_fixtures as cfgpp  # noqa: E402

CASES = {
    "cfgpp.10.scale1": dict(steps=10, seed=311, guidance_scale=1.0),
    "cfgpp.10.scale0.5": dict(steps=10, seed=312, guidance_scale=0.5),
    "cfgpp.10.img2img.scale1": dict(steps=10, seed=313, strength=0.6, guidance_scale=1.0),
    "cfgpp.8.scale0.batch": dict(steps=8, seed=314, batch_size=2, guidance_scale=0.0),
    "cfgpp.10.scale1.skip": dict(steps=10, seed=315, guidance_scale=1.0,
                                 options=dict(skip_early_cond=0.3)),
}

if __name__ == "__main__":
    # The fork's ddim_cfgpp calls its `_prepare_sampling_parameters` (see above); a 1.10
    # checkout's takes `--samplers ddim_cfgpp`.
    samplers = ("_prepare_sampling_parameters", "ddim_cfgpp")
    if "--samplers" in sys.argv:
        i = sys.argv.index("--samplers")
        samplers = tuple(sys.argv[i + 1].split(","))
        del sys.argv[i:i + 2]
    cfgpp.main(stem="a1111-cfgpp-scale", which=CASES, samplers=samplers, script=__file__,
               doc=__doc__, a1111="assembled: see tools/make_a1111_cfgpp_scale_fixtures.py")
