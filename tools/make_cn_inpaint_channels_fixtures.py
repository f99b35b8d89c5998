#!/usr/bin/env python3
"""ControlNet inpaint units on an inpainting (9-channel) UNet: the sd-webui-controlnet
extension's "inpaint hijack" (scripts/hook.py, "Replace x_t to support inpaint models").

For every ControlNet unit whose hint has 4 channels (the inpaint modules: RGB and the mask in
alpha) and a UNet input of 9 channels, the hook replaces the UNet's mask and masked-image
channels on every evaluation (both guidance halves, every step: the loop does not look at the
unit's guidance window) with the unit's own:
  mask_pixel = (hint[:, 3:4] > 0.5); image_pixel = hint[:, 0:3]
  masked_latent = call_vae_using_process(p, image_pixel, mask=mask_pixel)
                  (VAE encoding of (image * 2 - 1) * (1 - mask))
  mask_latent = max_pool2d(mask_pixel, (8, 8))   (SD's VAE factor: tiny-inpaint's 2 here)
  x = cat([x[:, :4], mask_latent, masked_latent])
The ControlNet itself sees x[:, :4] and the hint `c * (1 - m) - m` (the inpaint protocol).
Here the hook's lines are written out around diffusers (that block sits inside the hook's
forward, which `functions` cannot lift): StableDiffusionControlNetPipeline on tiny-inpaint
with cn-i (tools/make_controlnet_fixtures.py), its UNet's forward wrapped to add the unit's
channels (its config's in_channels set to the VAE's 4 so the pipeline draws 4-channel noise).
`masked_latent` is the VAE distribution's mean (the extension samples it from torch's global
generator, which no seed fixes).

Text-to-image: A1111's inpainting-model conditioning (a mask of ones, a grey image) is what
the unit's channels replace, so the result does not depend on it.

Writes crates/pipeline/tests/fixtures/controlnet_inpaint_channels.{safetensors,json}
(image.<case>: [batch, H, W, 3] u8 = round(output_type 'np' * 255)); plain.<case>: the same
run without the hijack (the UNet fed a mask of ones and a grey image's latents, as on an
inpainting model without the unit's channels), for the tests to see the hijack matters.
Reads cn-init-64.png and cn-mask-64.png (images/, from make_controlnet_fixtures.py).

Pinned: torch 2.11.0, diffusers 0.42.1 (tools/requirements.txt).
Usage: python3 tools/make_cn_inpaint_channels_fixtures.py
"""

import json
import os
import sys

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from api_schedulers import make_scheduler  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "crates", "pipeline", "tests", "fixtures")
MODEL = os.path.join(FIXTURES, "tiny-inpaint")
NET = os.path.join(FIXTURES, "controlnet-inpaint", "cn-i")


def inpaint_hint(raw, mask01):
    """The ControlNet inpaint protocol: [1, 3, H, W], masked pixels -1."""
    x = raw.copy()
    x[:, mask01 > 0.5] = -1.0
    return torch.from_numpy(x[None].copy())


@torch.no_grad()
def main():
    import diffusers
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
    from safetensors.torch import save_file

    img_dir = os.path.join(FIXTURES, "images")
    image = Image.open(os.path.join(img_dir, "cn-init-64.png")).convert("RGB")
    mask = Image.open(os.path.join(img_dir, "cn-mask-64.png")).convert("RGB")
    net = ControlNetModel.from_pretrained(NET, torch_dtype=torch.float32)
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        MODEL, controlnet=net, dtype=torch.float32, safety_checker=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    own = dict(pipe.scheduler.config)
    unet = pipe.unet
    latent_channels = pipe.vae.config.latent_channels
    assert unet.config.in_channels == 2 * latent_channels + 1
    unet.register_to_config(in_channels=latent_channels)
    unet_forward = unet.forward
    f = pipe.vae_scale_factor
    sf = pipe.vae.config.scaling_factor

    # The extension's feed: RGB in [0, 1], the mask thresholded (> 127) in alpha.
    raw = np.asarray(image).astype(np.float32).transpose(2, 0, 1) / 255.0
    mask01 = (np.asarray(mask)[:, :, 0] > 127).astype(np.float32)
    hint_cond = torch.from_numpy(np.concatenate([raw, mask01[None]], 0)[None].copy())
    # hook.py's lines.
    mask_pixel = (hint_cond[:, 3:4] > 0.5).to(hint_cond.dtype)
    image_pixel = hint_cond[:, 0:3]
    masked_latent = pipe.vae.encode((image_pixel * 2.0 - 1.0) * (1.0 - mask_pixel)) \
        .latent_dist.mean * sf
    mask_latent = torch.nn.functional.max_pool2d(mask_pixel, (f, f))
    hijack = torch.cat([mask_latent, masked_latent], 1)
    # Without it, an inpainting model in text-to-image: ones and a grey image's latents.
    grey = pipe.vae.encode(torch.zeros_like(image_pixel)).latent_dist.mean * sf
    plain = torch.cat([torch.ones_like(mask_latent), grey], 1)

    def fed(channels):
        def forward(sample, timestep, *a, **kw):
            extra = channels.expand(sample.shape[0], -1, -1, -1)
            return unet_forward(torch.cat([sample, extra], 1), timestep, *a, **kw)
        return forward

    base = dict(prompt="a house by a lake, evening", negative_prompt="blurry", steps=8,
                width=64, height=64, seed=77, guidance_scale=7.5)
    tensors, cases = {}, {}

    def run(label, scale, start, end, scheduler, batch_size=1, **over):
        r = dict(base, **over)
        out = {}
        for kind, channels in (("image", hijack), ("plain", plain)):
            pipe.scheduler = make_scheduler(scheduler, own)
            unet.forward = fed(channels)
            gens = [torch.Generator("cpu").manual_seed(r["seed"] + i) for i in range(batch_size)]
            images = pipe(prompt=r["prompt"], negative_prompt=r["negative_prompt"],
                          num_inference_steps=r["steps"], image=inpaint_hint(raw, mask01),
                          guidance_scale=r["guidance_scale"], width=r["width"],
                          height=r["height"], generator=gens if batch_size > 1 else gens[0],
                          num_images_per_prompt=batch_size, output_type="np",
                          controlnet_conditioning_scale=scale, control_guidance_start=start,
                          control_guidance_end=end).images
            unet.forward = unet_forward
            out[kind] = torch.from_numpy((images * 255).round().astype("uint8"))
            tensors[f"{kind}.{label}"] = out[kind]
        cases[label] = dict(r, model="tiny-inpaint", scheduler=scheduler, batch_size=batch_size,
                            controlnets=[dict(model="cn-i", image="cn-init-64.png",
                                              mask="cn-mask-64.png", module="inpaint",
                                              scale=scale, guidance_start=start,
                                              guidance_end=end)])
        d = (out["image"].float() - out["plain"].float()).abs().mean()
        print(f"{label}: mean {out['image'].float().mean():.1f}, vs no hijack {d:.1f}")
        assert d > 3, (label, d)

    run("inpaint", 1.0, 0.0, 1.0, "euler")
    # The hijack goes on after the ControlNet's window closes; a batch of two.
    run("inpaint-window-batch", 0.8, 0.0, 0.4, "dpmpp_2m", batch_size=2, guidance_scale=5.0)
    meta = {
        "generated_by": "tools/make_cn_inpaint_channels_fixtures.py",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
        "images": "image.<case>: [batch, H, W, 3] u8 with the unit's channels; plain.<case>: "
                  "the same without them",
        "cases": cases,
    }
    save_file({k: v.contiguous() for k, v in tensors.items()},
              os.path.join(FIXTURES, "controlnet_inpaint_channels.safetensors"),
              metadata={"generated_by": "tools/make_cn_inpaint_channels_fixtures.py"})
    with open(os.path.join(FIXTURES, "controlnet_inpaint_channels.json"), "w",
              encoding="utf-8") as fh:
        json.dump(meta, fh, indent=1)
        fh.write("\n")


if __name__ == "__main__":
    main()
