#!/usr/bin/env python3
"""IP-Adapter units as the sd-webui-controlnet extension runs them (A1111 requests), on tiny-a.

The extension's lines (scripts/ipadapter/plugable_ipadapter.py, ipadapter_model.py,
annotator/clipvision/__init__.py), written out around diffusers' StableDiffusionPipeline:
  preprocessor `clip` (ClipVisionDetector.__call__): cv2.resize(image, (S, S), INTER_AREA)
      (no aspect kept; S the encoder's image size, 224 for ViT-H), an RGBA input's mask
      255 - alpha, CLIPImageProcessor (its resize and crop at S: the identity on an S x S
      image), then pixel_values *= mask / 255
  _get_image_embeds: plain, cond = proj(image_embeds), uncond = proj(zeros_like(image_embeds));
      Plus, cond = Resampler(hidden_states[-2]), uncond = Resampler(clip_vision_h_uc) (a
      precomputed [1, 257, 1280] tensor shipped with the extension; here a tiny stand-in file,
      models/clip_vision_h_uc.data, a torch.save of {"uc": f16 tensor} as the extension's)
  ImageEmbed.average_of: several images of one unit average their cond and uncond tokens
  patch_forward: the unit adds weight * attention(q, to_k_ip(emb), to_v_ip(emb)) unless
      current_sampling_percent (step / steps) < guidance_start or > guidance_end
Around diffusers: the UNet's encoder_hid_proj hands the precomputed tokens through, and a
step-end callback sets each adapter's scale for the next step from its window.

Writes crates/pipeline/tests/fixtures/ip-adapter-a1111.{safetensors,json}:
  pixels.<image>[.masked]: the preprocessor's pixel values; tokens.<case>.<k>: unit k's
  [uncond, cond] tokens; image.<case>: [batch, H, W, 3] u8 = round(output_type 'np' * 255)
and models/clip_vision_h_uc.data (random hidden states of the tiny encoder's shape).
Run after make_ip_adapter_fixtures.py and make_ip_adapter_plus_fixtures.py.

Pinned: torch 2.11.0, diffusers 0.42.1, transformers 5.24, opencv-python (tools/requirements.txt).
Usage: python3 tools/make_ip_adapter_a1111_fixtures.py
"""

import json
import os

import cv2
import numpy as np
import torch
from PIL import Image

from api_schedulers import make_scheduler
from make_ip_adapter_fixtures import BASE, FIXTURES, MODELS, OUT, to_u8
from make_ip_adapter_plus_fixtures import ADAPTERS

UC_FILE = "clip_vision_h_uc.data"


def clip_preprocess(processor, image_rgba, size):
    """The extension's ClipVisionDetector.__call__ up to the model: pixel values [1, 3, S, S]."""
    image = cv2.resize(image_rgba, (size, size), interpolation=cv2.INTER_AREA)
    mask = None
    if image.shape[2] == 4:
        mask = 255 - image[:, :, 3:4]
        image = image[:, :, :3]
    pv = processor(images=image, return_tensors="pt").pixel_values
    if mask is not None:
        pv = pv * torch.from_numpy(mask).float().div(255.0).permute(2, 0, 1)[None]
    return pv


def stripes_alpha(h, w):
    """A mask in alpha (255: the user's strokes), the extension's RGBA input."""
    y, x = np.mgrid[0:h, 0:w]
    return (((x + 2 * y) // 9) % 3 == 0).astype(np.uint8) * 255


@torch.no_grad()
def main():
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor

    enc_dir = os.path.join(MODELS, "image_encoder")
    img_dir = os.path.join(FIXTURES, "images")
    names = ("ip-prompt-96x72.png", "ip-prompt-b-50x70.png")
    images = {n: np.array(Image.open(os.path.join(img_dir, n)).convert("RGB")) for n in names}

    def pipe_of(models):
        pipe = StableDiffusionPipeline.from_pretrained(BASE, dtype=torch.float32,
                                                       safety_checker=None,
                                                       requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        pipe.load_ip_adapter(OUT, subfolder=["models"] * len(models),
                             weight_name=[ADAPTERS[m] for m in models])
        return pipe

    every = ["ip-adapter_sd15", "ip-adapter-plus_sd15", "ip-adapter-plus-face_sd15"]
    pipe = pipe_of(every)
    encoder = pipe.image_encoder
    size = encoder.config.image_size
    # The extension's processor: its own arguments, not the folder's preprocessor_config.json.
    processor = CLIPImageProcessor(crop_size=size, do_center_crop=True, do_convert_rgb=True,
                                   do_normalize=True, do_resize=True,
                                   image_mean=[0.48145466, 0.4578275, 0.40821073],
                                   image_std=[0.26862954, 0.26130258, 0.27577711],
                                   resample=3, size=size)
    projections = dict(zip(every, pipe.unet.encoder_hid_proj.image_projection_layers))

    g = torch.Generator().manual_seed(7600)
    positions = (size // encoder.config.patch_size) ** 2 + 1
    uc = (torch.randn(1, positions, encoder.config.hidden_size, generator=g)).half()
    torch.save({"uc": uc}, os.path.join(MODELS, UC_FILE))

    tensors, cases = {}, {}

    def pixels(name, masked):
        img = images[name]
        if masked:
            img = np.concatenate([img, stripes_alpha(*img.shape[:2])[:, :, None]], axis=2)
        pv = clip_preprocess(processor, img, size)
        tensors[f"pixels.{name}{'.masked' if masked else ''}"] = pv
        return pv

    def unit_tokens(model, inputs):
        """ImageEmbed.average_of(get_image_emb(o) for o in inputs): [uncond, cond] tokens."""
        proj = projections[model]
        conds, unconds = [], []
        for pv in inputs:
            out = encoder(pv, output_hidden_states=True)
            if "plus" in model:
                conds.append(proj(out.hidden_states[-2]))
                unconds.append(proj(uc.float()))
            else:
                conds.append(proj(out.image_embeds))
                unconds.append(proj(torch.zeros_like(out.image_embeds)))
        return torch.cat([sum(unconds) / len(unconds), sum(conds) / len(conds)], 0)

    base = dict(prompt="a house by a lake, evening", negative_prompt="blurry", steps=8,
                width=64, height=64, seed=77, guidance_scale=7.5)

    def run(label, units, scheduler="euler", batch_size=1, **over):
        """units: [(model, [(image, masked)], weight, start, end)]."""
        r = dict(base, **over)
        p = pipe_of([u[0] for u in units])
        p.scheduler = make_scheduler(scheduler, dict(p.scheduler.config))
        embeds = []
        for k, u in enumerate(units):
            tok = unit_tokens(u[0], [pixels(n, masked) for n, masked in u[1]])
            tensors[f"tokens.{label}.{k}"] = tok
            embeds.append(tok)

        def scales(step):
            pct = step / r["steps"]
            return [0.0 if pct < start or pct > end else w for _, _, w, start, end in units]

        def on_step_end(pipe_, i, t, kwargs):
            pipe_.set_ip_adapter_scale(scales(i + 1))
            return kwargs

        p.set_ip_adapter_scale(scales(0))
        original = p.unet.encoder_hid_proj.forward
        p.unet.encoder_hid_proj.forward = lambda image_embeds: image_embeds
        try:
            gens = [torch.Generator("cpu").manual_seed(r["seed"] + i) for i in range(batch_size)]
            img = to_u8(p(prompt=r["prompt"], negative_prompt=r["negative_prompt"],
                          num_inference_steps=r["steps"], guidance_scale=r["guidance_scale"],
                          generator=gens if batch_size > 1 else gens[0],
                          num_images_per_prompt=batch_size, output_type="np",
                          width=r["width"], height=r["height"], ip_adapter_image_embeds=embeds,
                          callback_on_step_end=on_step_end).images)
        finally:
            p.unet.encoder_hid_proj.forward = original
        tensors[f"image.{label}"] = img
        cases[label] = dict(r, model="tiny-a", scheduler=scheduler, batch_size=batch_size,
                            units=[dict(model=m, images=[dict(image=n, masked=k) for n, k in ims],
                                        weight=w, guidance_start=s, guidance_end=e)
                                   for m, ims, w, s, e in units])
        print(label, img.float().mean().item())

    run("plain-two-images-window",
        [("ip-adapter_sd15", [("ip-prompt-96x72.png", False), ("ip-prompt-b-50x70.png", False)],
          0.8, 0.2, 0.7)])
    run("plus-masked",
        [("ip-adapter-plus_sd15", [("ip-prompt-96x72.png", True)], 1.0, 0.0, 1.0)],
        scheduler="dpmpp_2m")
    run("plain-and-face-batch",
        [("ip-adapter_sd15", [("ip-prompt-b-50x70.png", False)], 0.5, 0.0, 1.0),
         ("ip-adapter-plus-face_sd15", [("ip-prompt-96x72.png", False)], 0.9, 0.0, 0.5)],
        scheduler="euler_a", batch_size=2)

    save_file({k: v.contiguous() for k, v in tensors.items()},
              os.path.join(FIXTURES, "ip-adapter-a1111.safetensors"))
    meta = {"generated_by": "tools/make_ip_adapter_a1111_fixtures.py", "uc_file": UC_FILE,
            "cases": cases}
    with open(os.path.join(FIXTURES, "ip-adapter-a1111.json"), "w") as f:
        json.dump(meta, f, indent=1)


if __name__ == "__main__":
    main()
