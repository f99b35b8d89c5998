#!/usr/bin/env python3
"""ControlNet inpaint fixtures: the sd-webui-controlnet extension's `inpaint` and
`inpaint_only` modules on tiny-a-vae8 with cn-h, the tiny ControlNet cn-a
(tools/make_controlnet_fixtures.py) with its hint encoder drawn again so that the control
image matters (written to controlnet-hint/cn-h/, fp16).

`inpaint` (inpaint_global_harmonious): diffusers' `StableDiffusionControlNetPipeline` fed the
control image as diffusers' docs for control_v11p_sd15_inpaint build it (`image[mask > 0.5] =
-1`, a tensor): the extension's "ControlNet inpaint protocol" (`hint = c * (1 - m) - m`).

`inpaint_only`: the same run with the UNet's forward wrapped by the extension's "Post-processing
for restore" (scripts/hook.py, after the UNet, on every evaluation): its
`predict_start_from_noise` and `predict_noise_from_start` taken from the extension's source
with tools/a1111_source.py's `functions` and run as they are, on an `ldm` holding the buffers
ldm's `register_schedule` makes (float64 numpy, stored float32); the loop around them is the
hook's, line for line (the mask max-pooled 10/8/1, x0 blended with `used_hint_cond_latent`,
back to eps, mixed by the weight clipped to [0, 1]). `used_hint_cond_latent` is the VAE
encoding of `control * 2 - 1`, the distribution's mean (A1111 draws a sample from torch's
global generator, which no seed fixes). The images are decoded from the latents and
post-processed as controlnet.py's `inpaint_only_post_processing` (the mask dilated and
box-blurred by cv2 with `control_net_inpaint_blur_sigma` 7, `m * x + (1 - m) * raw`),
then taken to 8 bits as A1111 does (`(255 * x).astype(uint8)`).

`inpaint_only+lama`: `inpaint_only`'s run (its name contains `inpaint_only`, so the hook
restores and controlnet.py post-processes; its img2img fallback compares the name exactly and
so never applies) with the first pass's starting noise replaced as the extension's
`HackedImageRNG.next()` replaces `p.rng.next()` (controlnet.py's `noise_modifier`, the
control's VAE latents): `predict_q_sample(ldm, x0, 999, noise)` (hook.py, taken with
`functions`), passed to diffusers as `latents` (which multiplies them by init_noise_sigma),
each generator having drawn its noise first so the sampler's later draws follow it. The
control image stands for LaMa's output here (the preprocessor has its own fixtures:
make_lama_fixtures.py).

Writes crates/pipeline/tests/fixtures/controlnet_inpaint.{safetensors,json}
(image.<case>: [batch, H, W, 3] u8; the `inpaint` cases round(x * 255) of output_type "np";
latents1.<case>: the `inpaint_only+lama` cases' latents after the first step, f32).
Reads cn-init-64.png and cn-mask-64.png (images/, from make_controlnet_fixtures.py).

Pinned: torch 2.11.0, diffusers 0.42.1, opencv-python 4.10.0 (tools/requirements.txt).
Usage: python3 tools/make_cn_inpaint_fixtures.py --extension DIR (a checkout of
sd-webui-controlnet; default $SD_WEBUI_CONTROLNET_DIR)
"""

import argparse
import json
import os
import sys

import cv2
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from a1111_source import functions  # noqa: E402
from api_schedulers import make_scheduler  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "crates", "pipeline", "tests", "fixtures")
BASE = os.path.join(FIXTURES, "tiny-a-vae8")
NET = os.path.join(FIXTURES, "controlnet", "cn-a")
# cn-h: cn-a with its hint encoder drawn again so the control image matters (cn-a's, a fresh
# ControlNet's but for conv_out, gives nearly the same residuals for any image).
OUT_NET = os.path.join(FIXTURES, "controlnet-hint", "cn-h")
HINT_SEED = 6500
SIGMA = 7  # control_net_inpaint_blur_sigma's default


def extract_into_tensor(a, t, x_shape):
    """ldm.modules.diffusionmodules.util.extract_into_tensor."""
    b, *_ = t.shape
    out = a.gather(-1, t)
    return out.reshape(b, *((1,) * (len(x_shape) - 1)))


class Ldm:
    """The buffers ldm's `DDPM.register_schedule` makes for SD's scaled_linear betas."""

    def __init__(self, config):
        betas = np.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5,
                            config["num_train_timesteps"], dtype=np.float64) ** 2
        ac = np.cumprod(1.0 - betas, axis=0)
        f32 = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
        self.sqrt_alphas_cumprod = f32(np.sqrt(ac))
        self.sqrt_one_minus_alphas_cumprod = f32(np.sqrt(1.0 - ac))
        self.sqrt_recip_alphas_cumprod = f32(np.sqrt(1.0 / ac))
        self.sqrt_recipm1_alphas_cumprod = f32(np.sqrt(1.0 / ac - 1))


def inpaint_hint(image, mask):
    """diffusers' docs' make_inpaint_condition: [1, 3, H, W], masked pixels -1."""
    x = np.asarray(image.convert("RGB")).astype(np.float32) / 255.0
    m = np.asarray(mask.convert("L")).astype(np.float32) / 255.0
    x[m > 0.5] = -1.0
    return torch.from_numpy(x.transpose(2, 0, 1)[None].copy())


def post_process(x, raw, mask01):
    """controlnet.py's inpaint_only_post_processing of one decoded image (x: [3, H, W] float
    in [0, 1]), then processing.py's 8-bit conversion."""
    m = mask01.astype(np.float32)
    m = cv2.dilate(m, np.ones((SIGMA, SIGMA), dtype=np.uint8))
    m = cv2.blur(m, (SIGMA, SIGMA))[None, None]
    r = torch.from_numpy(raw.astype(np.float32))
    m = torch.from_numpy(np.ascontiguousarray(m))[0]
    y = (m * x.clip(0, 1) + (1 - m) * r).clip(0, 1)
    return (255.0 * np.moveaxis(y.numpy(), 0, 2)).astype(np.uint8)


@torch.no_grad()
def sensitive_hint_encoder(net):
    """Every hint encoder convolution drawn again: weights N(0, (g / sqrt(fan_in))^2) with g
    1.5 (conv_out 1.0), biases N(0, 0.05^2), rounded to fp16."""
    torch.manual_seed(HINT_SEED)
    e = net.controlnet_cond_embedding
    for conv in [e.conv_in, *e.blocks, e.conv_out]:
        g = 1.0 if conv is e.conv_out else 1.5
        torch.nn.init.normal_(conv.weight, std=g / conv.weight[0].numel() ** 0.5)
        torch.nn.init.normal_(conv.bias, std=0.05)
    for p in net.parameters():
        p.copy_(p.half().float())
    return net


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--extension", default=os.environ.get("SD_WEBUI_CONTROLNET_DIR"),
                    help="a checkout of sd-webui-controlnet (default: $SD_WEBUI_CONTROLNET_DIR)")
    args = ap.parse_args()
    if not args.extension:
        print("make_cn_inpaint_fixtures.py: skipped (needs --extension or SD_WEBUI_CONTROLNET_DIR)")
        return
    import diffusers
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
    from safetensors.torch import save_file

    assert cv2.__version__ == "4.10.0", cv2.__version__
    ns = {"torch": torch, "extract_into_tensor": extract_into_tensor}
    hook, digests = functions(os.path.join(args.extension, "scripts", "hook.py"),
                              ["predict_start_from_noise", "predict_noise_from_start",
                               "predict_q_sample"], ns)
    img_dir = os.path.join(FIXTURES, "images")
    image = Image.open(os.path.join(img_dir, "cn-init-64.png")).convert("RGB")
    mask = Image.open(os.path.join(img_dir, "cn-mask-64.png")).convert("RGB")
    net = sensitive_hint_encoder(ControlNetModel.from_pretrained(NET, torch_dtype=torch.float32))
    net.half().save_pretrained(OUT_NET, safe_serialization=True)
    net.float()
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        BASE, controlnet=net, dtype=torch.float32, safety_checker=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    own = dict(pipe.scheduler.config)
    ldm = Ldm(own)
    unet_forward = pipe.unet.forward

    # The extension's feed: the RGB in [0, 1] and the mask thresholded (> 127) in alpha.
    raw = np.asarray(image).astype(np.float32).transpose(2, 0, 1) / 255.0
    mask01 = (np.asarray(mask)[:, :, 0] > 127).astype(np.float32)
    hint_cond = torch.from_numpy(np.concatenate([raw, mask01[None]], 0)[None].copy())
    sf = pipe.vae.config.scaling_factor
    latent = pipe.vae.encode(hint_cond[:, :3] * 2.0 - 1.0).latent_dist.mean * sf

    def restoring(weight):
        """The UNet's forward followed by the hook's restore loop for one inpaint_only unit."""
        def forward(sample, timestep, *a, **kw):
            out = unet_forward(sample, timestep, *a, **kw)
            h = out[0]
            x = sample
            timesteps = timestep.reshape(1).expand(x.shape[0])
            # hook.py, "Post-processing for restore".
            xt = x[:, :4, :, :]
            m = hint_cond[:, 3:4, :, :]
            m = torch.nn.functional.max_pool2d(m, (10, 10), stride=(8, 8), padding=1)
            x0_origin = torch.cat([latent] * x.shape[0], 0)
            t = torch.round(timesteps.float()).long()
            x0_prd = hook["predict_start_from_noise"](ldm, xt, t, h)
            x0 = x0_prd * m + x0_origin * (1 - m)
            eps_prd = hook["predict_noise_from_start"](ldm, xt, t, x0)
            w = max(0.0, min(1.0, float(weight)))
            h = eps_prd * w + h * (1 - w)
            return (h,)
        return forward

    base = dict(prompt="a house by a lake, evening", negative_prompt="blurry", steps=8,
                width=64, height=64, seed=77, guidance_scale=7.5)
    tensors, cases = {}, {}

    def run(label, module, scale, start, end, scheduler, batch_size=1, **over):
        r = dict(base, **over)
        pipe.scheduler = make_scheduler(scheduler, own)
        only = "inpaint_only" in module
        pipe.unet.forward = restoring(scale) if only else unet_forward
        gens = [torch.Generator("cpu").manual_seed(r["seed"] + i) for i in range(batch_size)]
        latents = None
        if "+lama" in module:
            # HackedImageRNG.next(): the image's noise carries the control's latents.
            shape = (1, 4, r["height"] // 8, r["width"] // 8)
            noise = torch.cat([torch.randn(shape, generator=g) for g in gens], 0)
            ts = torch.tensor([999] * noise.shape[0]).long()
            latents = hook["predict_q_sample"](ldm, latent, ts, noise)
        first_step = []

        def after_step(_pipe, i, _t, kw):
            if i == 0:
                first_step.append(kw["latents"].clone())
            return kw

        out = pipe(latents=latents, callback_on_step_end=after_step, prompt=r["prompt"], negative_prompt=r["negative_prompt"],
                   num_inference_steps=r["steps"], image=inpaint_hint(image, mask),
                   guidance_scale=r["guidance_scale"], width=r["width"], height=r["height"],
                   generator=gens if batch_size > 1 else gens[0],
                   num_images_per_prompt=batch_size,
                   output_type="latent" if only else "np",
                   controlnet_conditioning_scale=scale, control_guidance_start=start,
                   control_guidance_end=end).images
        pipe.unet.forward = unet_forward
        if only:
            decoded = pipe.vae.decode(out / sf).sample.float()
            x = torch.clamp((decoded + 1.0) / 2.0, min=0.0, max=1.0)
            img = torch.from_numpy(np.stack([post_process(xi, raw, mask01) for xi in x]))
        else:
            img = torch.from_numpy((out * 255).round().astype("uint8"))
        tensors[f"image.{label}"] = img
        if latents is not None:
            # The noise modifier hardly shows in the tiny models' images (a level here and
            # there): the latents after the first step carry it plainly.
            tensors[f"latents1.{label}"] = first_step[0]
        cases[label] = dict(r, model="tiny-a-vae8", scheduler=scheduler, batch_size=batch_size, controlnets=[dict(
            model="cn-h", image="cn-init-64.png", mask="cn-mask-64.png", module=module,
            scale=scale, guidance_start=start, guidance_end=end)])
        st = img.float()
        print(f"{label}: mean {st.mean():.1f} std {st.std():.1f}")

    # The masked control image must matter: the same run fed the image whole differs.
    pipe.scheduler = make_scheduler("euler", own)
    whole = torch.from_numpy(raw[None].copy())
    plain = pipe(prompt=base["prompt"], negative_prompt=base["negative_prompt"],
                 num_inference_steps=base["steps"], image=whole, width=64, height=64,
                 guidance_scale=base["guidance_scale"], output_type="np",
                 generator=torch.Generator("cpu").manual_seed(base["seed"])).images
    run("inpaint", "inpaint", 1.0, 0.0, 1.0, "euler")
    diff = np.abs(plain * 255 - tensors["image.inpaint"].numpy().astype(np.float64)).mean()
    print(f"inpaint vs the image unmasked: mean abs diff {diff:.1f}")
    assert diff > 3, diff
    run("inpaint-batch-window", "inpaint", 0.8, 0.1, 0.8, "dpmpp_2m", batch_size=2,
        guidance_scale=5.0)
    run("inpaint-only", "inpaint_only", 1.0, 0.0, 1.0, "euler")
    # A weight under 1 mixes the restored prediction; the restore runs outside the window too.
    run("inpaint-only-weak", "inpaint_only", 0.6, 0.0, 0.5, "ddim")
    run("lama", "inpaint_only+lama", 1.0, 0.0, 1.0, "euler")
    # A batch on a sampler that draws noise as it goes: x0 broadcast over the batch, each
    # generator's later draws after its starting noise.
    run("lama-batch", "inpaint_only+lama", 0.8, 0.0, 1.0, "euler_a", batch_size=2)
    meta = {
        "generated_by": "tools/make_cn_inpaint_fixtures.py",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "opencv": cv2.__version__},
        "extension_sha256": digests,
        "images": "image.<case>: [batch, H, W, 3] u8",
        "cases": cases,
    }
    save_file({k: v.contiguous() for k, v in tensors.items()},
              os.path.join(FIXTURES, "controlnet_inpaint.safetensors"),
              metadata={"generated_by": "tools/make_cn_inpaint_fixtures.py"})
    with open(os.path.join(FIXTURES, "controlnet_inpaint.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
