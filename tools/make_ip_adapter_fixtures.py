#!/usr/bin/env python3
"""IP-Adapter fixtures: a tiny image encoder and adapter for tiny-a, and diffusers' references.

Writes, under crates/pipeline/tests/fixtures/ip-adapter, a folder laid out as h94/IP-Adapter's
`models/`:
  models/image_encoder/             a random CLIPVisionModelWithProjection (config.json,
                                    model.safetensors) and the CLIPImageProcessor diffusers'
                                    `load_ip_adapter` builds for it (preprocessor_config.json:
                                    shortest side and crop at the encoder's image size)
  models/ip-adapter_sd15.safetensors  a random adapter in h94's key format (`image_proj.proj.*`,
                                    `image_proj.norm.*`, `ip_adapter.N.to_k_ip.weight` /
                                    `to_v_ip.weight`, N = 2k + 1 for the UNet's k-th
                                    cross-attention in diffusers' `attn_processors` order)
                                    sized for tiny-a's UNet
  models/ip-adapter_sd15.bin        the same as h94's `.bin`: a torch.save of
                                    {"image_proj": {...}, "ip_adapter": {...}}
and beside the other fixtures:
  images/ip-prompt-96x72.png, images/ip-prompt-b-50x70.png  the image prompts
  ip-adapter.safetensors            pixel_values.<image> (the processor's output),
                                    embeds.<image> (`image_embeds`), tokens.<image> and
                                    tokens.zeros (the projection of the embeds and of zeros, the
                                    negative side), model.* (one UNet call with the image tokens),
                                    image.<case> ([batch, H, W, 3] u8), plain.<case> (the same
                                    request without the adapter)
  ip-adapter.json                   the cases and what each tensor is

The adapter's weights are drawn large enough that the image tokens move many pixels by many
levels (checked below: else a test that drops them could still pass). Weights stored as f32.

Images: `StableDiffusionPipeline` / `StableDiffusionImg2ImgPipeline` on tiny-a with
`load_ip_adapter(folder, subfolder="models", weight_name=...)`, `set_ip_adapter_scale` and
`ip_adapter_image`, output_type "np", u8 = round(x * 255).

Pinned: torch 2.11.0, diffusers 0.42.1, transformers 5.24 (tools/requirements.txt). Note that
transformers 5's CLIPImageProcessor resizes with torchvision (uint8 bicubic, antialiased), not
PIL: the pixel values here are what it computes.
Usage: python3 tools/make_ip_adapter_fixtures.py
"""

import json
import os
import shutil

import numpy as np
import torch
from PIL import Image

from api_schedulers import make_scheduler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "crates", "pipeline", "tests", "fixtures")
BASE = os.path.join(FIXTURES, "tiny-a")
OUT = os.path.join(FIXTURES, "ip-adapter")
MODELS = os.path.join(OUT, "models")

ENCODER = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
               image_size=32, patch_size=8, projection_dim=24, hidden_act="gelu",
               layer_norm_eps=1e-5)


def prompt_image(width, height, seed):
    """A colourful picture: gradients, a disc and a few bars (any content does)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    img = np.stack([255 * x / (width - 1), 255 * y / (height - 1),
                    127 + 120 * np.sin(x / 5 + y / 7)], -1)
    cx, cy = rng.uniform(0.3, 0.7, 2) * [width, height]
    img[(x - cx) ** 2 + (y - cy) ** 2 < (min(width, height) / 4) ** 2] = rng.integers(0, 256, 3)
    for _ in range(3):
        x0 = rng.integers(0, width - 8)
        img[:, x0:x0 + 4] = rng.integers(0, 256, 3)
    return Image.fromarray(np.clip(np.round(img), 0, 255).astype(np.uint8), "RGB")


def cross_attention_names(unet):
    """The UNet's cross-attentions in `attn_processors` order (h94's odd ids)."""
    return [n for n in unet.attn_processors if not n.endswith("attn1.processor")]


def hidden_size(unet, name):
    ch = unet.config.block_out_channels
    if name.startswith("mid_block"):
        return ch[-1]
    block = int(name.split(".")[1])
    return ch[block] if name.startswith("down_blocks") else list(reversed(ch))[block]


@torch.no_grad()
def make_adapter(unet, embed_dim, seed):
    g = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    tokens = 4
    image_proj = {
        "proj.weight": torch.randn(tokens * cross, embed_dim, generator=g) / embed_dim ** 0.5,
        "proj.bias": torch.randn(tokens * cross, generator=g) * 0.1,
        "norm.weight": 1 + 0.2 * torch.randn(cross, generator=g),
        "norm.bias": 0.2 * torch.randn(cross, generator=g),
    }
    ip = {}
    for k, name in enumerate(cross_attention_names(unet)):
        h = hidden_size(unet, name)
        ip[f"{2 * k + 1}.to_k_ip.weight"] = torch.randn(h, cross, generator=g) * 2 / cross ** 0.5
        ip[f"{2 * k + 1}.to_v_ip.weight"] = torch.randn(h, cross, generator=g) * 2 / cross ** 0.5
    return {"image_proj": image_proj, "ip_adapter": ip}


def to_u8(images_np):
    return torch.from_numpy((images_np * 255).round().astype("uint8"))


@torch.no_grad()
def main():
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    # Only this script's files: tools/make_ip_adapter_plus_fixtures.py adds the Plus adapters
    # beside them (run it after this one).
    enc_dir = os.path.join(MODELS, "image_encoder")
    if os.path.isdir(enc_dir):
        shutil.rmtree(enc_dir)
    os.makedirs(enc_dir)

    torch.manual_seed(7100)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**ENCODER)).eval()
    # transformers' init leaves LayerNorm biases at 0 and the class token small: spread them.
    for n, p in encoder.named_parameters():
        if "layer_norm" in n or "layrnorm" in n or "layernorm" in n:
            p.add_(0.1 * torch.randn_like(p))
        if "class_embedding" in n:
            p.normal_(0, 0.5)
    encoder.save_pretrained(enc_dir, safe_serialization=True)
    size = encoder.config.image_size
    # What load_ip_adapter builds when the pipeline has no feature extractor.
    CLIPImageProcessor(size=size, crop_size=size).save_pretrained(enc_dir)

    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained(os.path.join(BASE, "unet"))
    adapter = make_adapter(unet, encoder.config.projection_dim, 7200)
    flat = {f"{part}.{k}": v.contiguous() for part, d in adapter.items() for k, v in d.items()}
    save_file(flat, os.path.join(MODELS, "ip-adapter_sd15.safetensors"))
    torch.save(adapter, os.path.join(MODELS, "ip-adapter_sd15.bin"))

    img_dir = os.path.join(FIXTURES, "images")
    os.makedirs(img_dir, exist_ok=True)
    images = {}
    for name, (w, h, seed) in {"ip-prompt-96x72.png": (96, 72, 1),
                               "ip-prompt-b-50x70.png": (50, 70, 2)}.items():
        prompt_image(w, h, seed).save(os.path.join(img_dir, name), optimize=True)
        images[name] = Image.open(os.path.join(img_dir, name)).convert("RGB")
    images["cn-init-64.png"] = Image.open(os.path.join(img_dir, "cn-init-64.png")).convert("RGB")

    tensors, cases = {}, {}

    def pipe_of(cls):
        pipe = cls.from_pretrained(BASE, dtype=torch.float32, safety_checker=None,
                                   requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        pipe.load_ip_adapter(OUT, subfolder="models", weight_name="ip-adapter_sd15.safetensors")
        return pipe

    pipe = pipe_of(StableDiffusionPipeline)
    assert isinstance(pipe.feature_extractor, CLIPImageProcessor)
    # Embeds as the pipeline computes them, and their projection (cond; zeros for uncond).
    proj = pipe.unet.encoder_hid_proj.image_projection_layers[0]
    for name in ("ip-prompt-96x72.png", "ip-prompt-b-50x70.png"):
        pv = pipe.feature_extractor(images[name], return_tensors="pt").pixel_values
        embeds, neg = pipe.encode_image(images[name], "cpu", 1)
        assert torch.equal(neg, torch.zeros_like(embeds))
        tensors[f"pixel_values.{name}"] = pv
        tensors[f"embeds.{name}"] = embeds
        tensors[f"tokens.{name}"] = proj(embeds)
    tensors["tokens.zeros"] = proj(torch.zeros(1, encoder.config.projection_dim))

    # One UNet call with the image tokens (scale 0.7), and without them.
    g = torch.Generator().manual_seed(7300)
    sample = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([700.0, 50.0])
    ctx = torch.randn(2, 77, 32, generator=g)
    embeds = torch.cat([torch.zeros(1, 1, 24), tensors["embeds.ip-prompt-96x72.png"][None]], 0)
    pipe.set_ip_adapter_scale(0.7)
    tensors.update({"model.sample": sample, "model.timesteps": t, "model.context": ctx,
                    "model.image_embeds": embeds[:, 0]})
    tensors["model.unet.ip"] = pipe.unet(sample, t, encoder_hidden_states=ctx,
                                         added_cond_kwargs={"image_embeds": [embeds]}).sample
    d = (tensors["model.unet.ip"] - pipe.unet(
        sample, t, encoder_hidden_states=ctx,
        added_cond_kwargs={"image_embeds": [torch.zeros_like(embeds)]}).sample).abs().max()
    assert d > 0.05, f"the image tokens barely change the UNet: {d}"

    base = dict(prompt="a house by a lake, evening", negative_prompt="blurry", steps=8,
                width=64, height=64, seed=77, guidance_scale=7.5)
    plain_pipes = {}

    def run(label, image, scale, scheduler=None, batch_size=1, init=None, strength=None, **over):
        r = dict(base, **over)
        cls = StableDiffusionImg2ImgPipeline if init else StableDiffusionPipeline
        p = pipe_of(cls)
        if scheduler is not None:
            p.scheduler = make_scheduler(scheduler, dict(p.scheduler.config))
        p.set_ip_adapter_scale(scale)
        extra = dict(image=images[init], strength=strength) if init else dict(
            width=r["width"], height=r["height"])

        def call(pipe, **ip):
            gens = [torch.Generator("cpu").manual_seed(r["seed"] + i) for i in range(batch_size)]
            return to_u8(pipe(prompt=r["prompt"], negative_prompt=r["negative_prompt"],
                              num_inference_steps=r["steps"], guidance_scale=r["guidance_scale"],
                              generator=gens if batch_size > 1 else gens[0],
                              num_images_per_prompt=batch_size, output_type="np", **extra,
                              **ip).images)

        img = call(p, ip_adapter_image=images[image])
        tensors[f"image.{label}"] = img
        if cls not in plain_pipes:
            q = cls.from_pretrained(BASE, dtype=torch.float32, safety_checker=None,
                                    requires_safety_checker=False)
            q.set_progress_bar_config(disable=True)
            plain_pipes[cls] = q
        q = plain_pipes[cls]
        q.scheduler = make_scheduler(scheduler, dict(q.scheduler.config)) if scheduler else \
            type(p.scheduler).from_config(p.scheduler.config)
        plain = call(q)
        tensors[f"plain.{label}"] = plain
        diff = (img.float() - plain.float()).abs()
        print(f"{label}: mean {img.float().mean():.1f}; vs no adapter: mean abs diff "
              f"{diff.mean():.1f}, fraction > 8: {(diff > 8).float().mean():.3f}")
        if scale >= 0.5:
            assert diff.mean() > 8, f"{label}: the adapter barely changes the image"
        cases[label] = dict(r, model="tiny-a", scheduler=scheduler, batch_size=batch_size,
                            init_image=init, strength=strength,
                            ip_adapters=[dict(model="ip-adapter_sd15", image=image, scale=scale)])

    run("scale-1", "ip-prompt-96x72.png", 1.0)
    run("scale-half-batch", "ip-prompt-b-50x70.png", 0.5, scheduler="euler", batch_size=2,
        guidance_scale=5.0)
    run("no-cfg", "ip-prompt-96x72.png", 1.0, scheduler="euler_a", guidance_scale=1.0)
    run("img2img", "ip-prompt-96x72.png", 0.8, scheduler="dpmpp_2m", init="cn-init-64.png",
        strength=0.6, steps=10)

    save_file({k: v.contiguous() for k, v in tensors.items()},
              os.path.join(FIXTURES, "ip-adapter.safetensors"))
    meta = {
        "generated_by": "tools/make_ip_adapter_fixtures.py",
        "encoder": ENCODER,
        "tensors": {
            "pixel_values.<image>": "CLIPImageProcessor's output [1, 3, 32, 32]",
            "embeds.<image>": "image_encoder(pixel_values).image_embeds [1, 24]",
            "tokens.<image>": "the adapter's ImageProjection of the embeds [1, 4, 32]",
            "tokens.zeros": "the projection of zero embeds (the negative side) [1, 4, 32]",
            "model.unet.ip": "unet(sample, timesteps, context) with image_embeds rows "
                             "[zeros, embeds.ip-prompt-96x72.png] at scale 0.7",
            "image.<case>": "the pipeline's images with the adapter, [batch, H, W, 3] u8",
            "plain.<case>": "the same request without the adapter",
        },
        "cases": cases,
    }
    with open(os.path.join(FIXTURES, "ip-adapter.json"), "w") as f:
        json.dump(meta, f, indent=1)


if __name__ == "__main__":
    main()
