#!/usr/bin/env python3
"""IP-Adapter Plus fixtures: tiny Plus adapters for tiny-a and diffusers' references.

Run after tools/make_ip_adapter_fixtures.py (it uses that script's image encoder, plain adapter
and prompt images). Writes, under crates/pipeline/tests/fixtures/ip-adapter/models:
  ip-adapter-plus_sd15.safetensors    a random Plus adapter in h94's key format: the Resampler
                                      (`image_proj.latents` [1, queries, hidden],
                                      `image_proj.proj_in.*`, `image_proj.layers.<i>.0.norm1/norm2`
                                      (LayerNorms), `.0.to_q`, `.0.to_kv`, `.0.to_out` (no bias),
                                      `.1.0` (LayerNorm), `.1.1`, `.1.3` (the feed-forward, no
                                      bias), `image_proj.proj_out.*`, `image_proj.norm_out.*`) and
                                      `ip_adapter.N.to_k_ip` / `to_v_ip` as the plain adapter's
  ip-adapter-plus-face_sd15.bin       another one as h94's `.bin` (a torch.save of
                                      {"image_proj": ..., "ip_adapter": ...})
and beside the other fixtures:
  ip-adapter-plus.safetensors         hidden.<image> (the encoder's penultimate hidden states,
                                      `encode_image(..., output_hidden_states=True)`),
                                      hidden.zeros (those of zero pixel values: the negative
                                      side), tokens.<adapter>.<image> / tokens.<adapter>.zeros
                                      (the Resampler's output), image.<case> ([batch, H, W, 3] u8)
  ip-adapter-plus.json                the cases, the Resampler's constants, what each tensor is

The Resampler's constants are what diffusers' `_convert_ip_adapter_image_proj_to_diffusers`
reads: queries and hidden width from `latents`, heads = to_q rows // 64 (its dim_head is 64),
depth 4, the feed-forward's ratio 4. Here: 2 heads (to_q 128 rows) on a hidden width of 48.

Images: `StableDiffusionPipeline` with `load_ip_adapter(folder, subfolder="models",
weight_name=...)` (a list for several adapters), `set_ip_adapter_scale`, `ip_adapter_image`,
output_type "np", u8 = round(x * 255). Weights stored as f32.

Pinned: torch 2.11.0, diffusers 0.42.1, transformers 5.24 (tools/requirements.txt).
Usage: python3 tools/make_ip_adapter_plus_fixtures.py
"""

import json
import os

import torch
from PIL import Image

from api_schedulers import make_scheduler
from make_ip_adapter_fixtures import BASE, FIXTURES, MODELS, OUT, cross_attention_names, \
    hidden_size, to_u8

PLUS = dict(hidden_dims=48, heads=2, dim_head=64, depth=4, num_queries=16, ffn_ratio=4)


@torch.no_grad()
def make_plus_adapter(unet, encoder_hidden, seed):
    g = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    hid, inner = PLUS["hidden_dims"], PLUS["heads"] * PLUS["dim_head"]
    ff = hid * PLUS["ffn_ratio"]

    def lin(rows, cols, gain=1.0):
        return torch.randn(rows, cols, generator=g) * gain / cols ** 0.5

    def norm(n):
        return 1 + 0.2 * torch.randn(n, generator=g), 0.2 * torch.randn(n, generator=g)

    proj = {"latents": torch.randn(1, PLUS["num_queries"], hid, generator=g),
            "proj_in.weight": lin(hid, encoder_hidden),
            "proj_in.bias": 0.1 * torch.randn(hid, generator=g)}
    for i in range(PLUS["depth"]):
        p = f"layers.{i}"
        for n in (f"{p}.0.norm1", f"{p}.0.norm2", f"{p}.1.0"):
            proj[f"{n}.weight"], proj[f"{n}.bias"] = norm(hid)
        # Sharp attention (large q and k) so the heads' split matters.
        proj[f"{p}.0.to_q.weight"] = lin(inner, hid, 3.0)
        proj[f"{p}.0.to_kv.weight"] = lin(2 * inner, hid, 3.0)
        proj[f"{p}.0.to_out.weight"] = lin(hid, inner)
        proj[f"{p}.1.1.weight"] = lin(ff, hid)
        proj[f"{p}.1.3.weight"] = lin(hid, ff)
    proj["proj_out.weight"] = lin(cross, hid)
    proj["proj_out.bias"] = 0.1 * torch.randn(cross, generator=g)
    proj["norm_out.weight"], proj["norm_out.bias"] = norm(cross)
    ip = {}
    for k, name in enumerate(cross_attention_names(unet)):
        h = hidden_size(unet, name)
        ip[f"{2 * k + 1}.to_k_ip.weight"] = lin(h, cross, 2.0)
        ip[f"{2 * k + 1}.to_v_ip.weight"] = lin(h, cross, 2.0)
    return {"image_proj": proj, "ip_adapter": ip}


ADAPTERS = {"ip-adapter-plus_sd15": "ip-adapter-plus_sd15.safetensors",
            "ip-adapter-plus-face_sd15": "ip-adapter-plus-face_sd15.bin",
            "ip-adapter_sd15": "ip-adapter_sd15.safetensors"}


@torch.no_grad()
def main():
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.models.embeddings import IPAdapterPlusImageProjection
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig

    enc_cfg = CLIPVisionConfig.from_pretrained(os.path.join(MODELS, "image_encoder"))
    unet = UNet2DConditionModel.from_pretrained(os.path.join(BASE, "unet"))
    for name, seed in (("ip-adapter-plus_sd15", 7400), ("ip-adapter-plus-face_sd15", 7500)):
        adapter = make_plus_adapter(unet, enc_cfg.hidden_size, seed)
        path = os.path.join(MODELS, ADAPTERS[name])
        if path.endswith(".bin"):
            torch.save(adapter, path)
        else:
            flat = {f"{part}.{k}": v.contiguous() for part, d in adapter.items()
                    for k, v in d.items()}
            save_file(flat, path)

    img_dir = os.path.join(FIXTURES, "images")
    images = {n: Image.open(os.path.join(img_dir, n)).convert("RGB")
              for n in ("ip-prompt-96x72.png", "ip-prompt-b-50x70.png")}
    tensors, cases = {}, {}

    def pipe_of(names):
        pipe = StableDiffusionPipeline.from_pretrained(BASE, dtype=torch.float32,
                                                       safety_checker=None,
                                                       requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        pipe.load_ip_adapter(OUT, subfolder=["models"] * len(names),
                             weight_name=[ADAPTERS[n] for n in names])
        return pipe

    # The encoder's penultimate hidden states of each image and of zero pixel values, and each
    # Plus adapter's Resampler of them.
    pipe = pipe_of(["ip-adapter-plus_sd15", "ip-adapter-plus-face_sd15"])
    layers = pipe.unet.encoder_hid_proj.image_projection_layers
    assert all(isinstance(p, IPAdapterPlusImageProjection) for p in layers)
    for name, img in images.items():
        hidden, neg = pipe.encode_image(img, "cpu", 1, output_hidden_states=True)
        tensors[f"hidden.{name}"] = hidden
        tensors["hidden.zeros"] = neg
        for label, proj in zip(("ip-adapter-plus_sd15", "ip-adapter-plus-face_sd15"), layers):
            tensors[f"tokens.{label}.{name}"] = proj(hidden)
            tensors[f"tokens.{label}.zeros"] = proj(neg)
    assert tensors["hidden.zeros"].abs().max() > 0.1, "the zero image's states are not zeros"

    base = dict(prompt="a house by a lake, evening", negative_prompt="blurry", steps=8,
                width=64, height=64, seed=77, guidance_scale=7.5)
    plain = StableDiffusionPipeline.from_pretrained(BASE, dtype=torch.float32,
                                                    safety_checker=None,
                                                    requires_safety_checker=False)
    plain.set_progress_bar_config(disable=True)

    def run(label, units, scheduler=None, batch_size=1, **over):
        r = dict(base, **over)
        p = pipe_of([u[0] for u in units])
        if scheduler is not None:
            p.scheduler = make_scheduler(scheduler, dict(p.scheduler.config))
        p.set_ip_adapter_scale([u[2] for u in units])

        def call(pipe, **ip):
            gens = [torch.Generator("cpu").manual_seed(r["seed"] + i) for i in range(batch_size)]
            return to_u8(pipe(prompt=r["prompt"], negative_prompt=r["negative_prompt"],
                              num_inference_steps=r["steps"], guidance_scale=r["guidance_scale"],
                              generator=gens if batch_size > 1 else gens[0],
                              num_images_per_prompt=batch_size, output_type="np",
                              width=r["width"], height=r["height"], **ip).images)

        img = call(p, ip_adapter_image=[images[u[1]] for u in units])
        tensors[f"image.{label}"] = img
        plain.scheduler = make_scheduler(scheduler, dict(plain.scheduler.config)) \
            if scheduler else type(p.scheduler).from_config(p.scheduler.config)
        diff = (img.float() - call(plain).float()).abs()
        print(f"{label}: mean {img.float().mean():.1f}; vs no adapter: mean abs diff "
              f"{diff.mean():.1f}, fraction > 8: {(diff > 8).float().mean():.3f}")
        if max(u[2] for u in units) >= 0.5:
            assert diff.mean() > 8, f"{label}: the adapter barely changes the image"
        cases[label] = dict(r, model="tiny-a", scheduler=scheduler, batch_size=batch_size,
                            init_image=None, strength=None,
                            ip_adapters=[dict(model=m, image=i, scale=s) for m, i, s in units])

    run("plus-scale-1", [("ip-adapter-plus_sd15", "ip-prompt-96x72.png", 1.0)])
    run("plus-scale-0.6", [("ip-adapter-plus_sd15", "ip-prompt-96x72.png", 0.6)],
        scheduler="euler", guidance_scale=5.0)
    run("plus-face-batch", [("ip-adapter-plus-face_sd15", "ip-prompt-b-50x70.png", 0.8)],
        scheduler="euler_a", batch_size=2)
    run("plain-and-plus", [("ip-adapter_sd15", "ip-prompt-b-50x70.png", 0.5),
                           ("ip-adapter-plus_sd15", "ip-prompt-96x72.png", 0.7)],
        scheduler="dpmpp_2m")

    save_file({k: v.contiguous() for k, v in tensors.items()},
              os.path.join(FIXTURES, "ip-adapter-plus.safetensors"))
    meta = {
        "generated_by": "tools/make_ip_adapter_plus_fixtures.py",
        "resampler": PLUS,
        "tensors": {
            "hidden.<image>": "image_encoder(pixel_values).hidden_states[-2] [1, 17, 32]",
            "hidden.zeros": "the same of zero pixel values (the negative side)",
            "tokens.<adapter>.<image|zeros>": "the adapter's Resampler of them [1, 16, 32]",
            "image.<case>": "the pipeline's images with the adapters, [batch, H, W, 3] u8",
        },
        "cases": cases,
    }
    with open(os.path.join(FIXTURES, "ip-adapter-plus.json"), "w") as f:
        json.dump(meta, f, indent=1)


if __name__ == "__main__":
    main()
