#!/usr/bin/env python3
"""Reference images for img2img, inpainting and batches (diffusers' img2img and inpaint pipelines), recorded
with diffusers' StableDiffusionImg2ImgPipeline / StableDiffusionInpaintPipeline /
StableDiffusionPipeline on the tiny fixture models.  Pinned: torch 2.11.0, diffusers 0.42.1
(tools/requirements.txt).  Runs after tools/make_tiny_models.py (reads tiny-a/ and tiny-b/).

Writes, under OUT (default crates/pipeline/tests/fixtures):
  tiny-inpaint/          a diffusers folder whose UNet takes 9 input channels (latents, mask,
                         masked-image latents), like stable-diffusion-inpainting; text encoder
                         and tokenizer copied from tiny-a, its own small VAE
  images/*.png           synthetic init images and masks (binary and grey)
  img2img.safetensors    image.<case>: [batch, H, W, 3] u8, what diffusers returns
  img2img.json           every case's request (model, mode, files, strength, seeds, ...)
  vae-tiled.safetensors  the VAE tiled (diffusers' enable_tiling): tiled-encode latent
  vae-tiled.json         distributions and img2img / inpaint images, larger than a tile

Usage:
  python tools/make_img2img_fixtures.py [--out DIR] [--tiled-only]
"""

import argparse
import json
import math
import os
import shutil

import numpy as np
import torch
from PIL import Image

from api_schedulers import FIRST_NAMES, make_scheduler

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "crates", "pipeline", "tests", "fixtures")

INPAINT_MODEL = dict(
    seed=4000,
    unet=dict(
        sample_size=16,
        in_channels=9,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=32,  # tiny-a's text encoder width
        attention_head_dim=[2, 4],
    ),
    vae=dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=0.18215,
    ),
)

# Requests per model: tiny-a square with CFG, tiny-b non-square with CFG off and v_prediction.
BASE = {
    "tiny-a": dict(prompt="a photo of an astronaut riding a horse on mars",
                   negative_prompt="blurry, low quality", steps=12, width=32, height=32,
                   seed=42, guidance_scale=7.5),
    "tiny-b": dict(prompt="a watercolor painting of a lighthouse at sunset", negative_prompt="",
                   steps=10, width=32, height=48, seed=3000000000, guidance_scale=1.0),
    "tiny-inpaint": dict(prompt="a red bench in a park", negative_prompt="",
                         steps=10, width=32, height=32, seed=7, guidance_scale=6.0),
}
STRENGTHS = [0.3, 0.75, 1.0]


# --------------------------------------------------------------------------
# Synthetic images
# --------------------------------------------------------------------------


def synthetic_image(width, height, seed):
    """Smooth gradients, a disc and stripes: structure the VAE encoder has to carry."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    u, v = x / max(width - 1, 1), y / max(height - 1, 1)
    r = 255 * (0.2 + 0.6 * u)
    g = 255 * (0.3 + 0.5 * v)
    b = 255 * (0.5 + 0.4 * np.sin(6.0 * u + 3.0 * v))
    cx, cy, rad = width * 0.6, height * 0.4, min(width, height) * 0.25
    disc = (x - cx) ** 2 + (y - cy) ** 2 < rad ** 2
    r[disc], g[disc], b[disc] = 230, 40, 60
    stripes = (np.floor(x / 3) % 2 == 0) & (v > 0.75)
    g[stripes] = 250
    img = np.stack([r, g, b], -1) + rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(np.round(img), 0, 255).astype(np.uint8), "RGB")


def binary_mask(width, height):
    """White (repaint) rectangle in the middle, black (keep) around: mode L."""
    m = np.zeros((height, width), np.uint8)
    m[height // 4: 3 * height // 4, width // 3: 5 * width // 6] = 255
    return Image.fromarray(m, "L")


def grey_mask(width, height):
    """An RGB mask of grey bands straddling the 0.5 threshold (127 keeps, 128 repaints)."""
    levels = [0, 60, 127, 128, 200, 255]
    m = np.zeros((height, width), np.uint8)
    for i in range(width):
        m[:, i] = levels[i * len(levels) // width]
    m[: height // 5, :] = 255 - m[: height // 5, :]
    return Image.fromarray(np.stack([m] * 3, -1), "RGB")


# --------------------------------------------------------------------------
# The 9-channel model
# --------------------------------------------------------------------------


@torch.no_grad()
def make_inpaint_model(out_root):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    out = os.path.join(out_root, "tiny-inpaint")
    if os.path.isdir(out):
        shutil.rmtree(out)
    src = os.path.join(out_root, "tiny-a")
    for sub in ("tokenizer", "text_encoder", "scheduler"):
        shutil.copytree(os.path.join(src, sub), os.path.join(out, sub))
    spec = INPAINT_MODEL
    torch.manual_seed(spec["seed"])
    unet = UNet2DConditionModel(**spec["unet"])
    torch.manual_seed(spec["seed"] + 1)
    vae = AutoencoderKL(**spec["vae"])
    # As make_tiny_models.py: scale conv_out so the prediction has unit variance.
    g = torch.Generator().manual_seed(spec["seed"] + 3)
    x = torch.randn(2, 9, 16, 16, generator=g)
    ctx = torch.randn(2, 77, spec["unet"]["cross_attention_dim"], generator=g)
    s = float(unet(x, torch.tensor([900.0, 100.0]), encoder_hidden_states=ctx).sample.std())
    assert math.isfinite(s) and s > 0, s
    unet.conv_out.weight.mul_(1.0 / s)
    unet.conv_out.bias.mul_(1.0 / s)
    unet.save_pretrained(os.path.join(out, "unet"), safe_serialization=True)
    vae.save_pretrained(os.path.join(out, "vae"), safe_serialization=True)
    with open(os.path.join(src, "model_index.json")) as f:
        index = json.load(f)
    index["_class_name"] = "StableDiffusionInpaintPipeline"
    with open(os.path.join(out, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)
        f.write("\n")


# --------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------


def load_pipe(cls, folder):
    pipe = cls.from_pretrained(folder, dtype=torch.float32, safety_checker=None,
                               requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def set_scheduler(pipe, own_config, name):
    import diffusers

    if name is None:
        pipe.scheduler = getattr(diffusers, own_config["_class_name"]).from_config(own_config)
    else:
        pipe.scheduler = make_scheduler(name, own_config)


def to_u8(images_np):
    # diffusers numpy_to_pil: (images * 255).round().astype("uint8")
    return torch.from_numpy((images_np * 255).round().astype("uint8"))


@torch.no_grad()
def make_refs(out_root):
    import diffusers
    import transformers
    from diffusers import (StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline,
                           StableDiffusionPipeline)
    from safetensors.torch import save_file

    img_dir = os.path.join(out_root, "images")
    if os.path.isdir(img_dir):
        shutil.rmtree(img_dir)
    os.makedirs(img_dir)
    files = {}

    def save(name, image):
        image.save(os.path.join(img_dir, name), optimize=True)
        files[name] = image
        return name

    inits, masks, greys = {}, {}, {}
    for model, base in BASE.items():
        w, h = base["width"], base["height"]
        key = f"{w}x{h}"
        if key not in inits:
            inits[key] = save(f"init-{key}.png", synthetic_image(w, h, seed=w * 1000 + h))
            masks[key] = save(f"mask-{key}.png", binary_mask(w, h))
            greys[key] = save(f"mask-grey-{key}.png", grey_mask(w, h))
    # An init image of another size and aspect: resized (Lanczos) to the request's size.
    resize_src = save("init-50x35.png", synthetic_image(50, 35, seed=5035))

    cases = {}
    tensors = {}

    def run(label, model, mode, *, scheduler=None, strength=None, init=None, mask=None,
            batch_size=1, **overrides):
        r = dict(BASE[model], **overrides)
        pipe, own = pipes[model][mode]
        set_scheduler(pipe, own, scheduler)
        gens = [torch.Generator("cpu").manual_seed(r["seed"] + i) for i in range(batch_size)]
        kwargs = dict(prompt=r["prompt"], negative_prompt=r["negative_prompt"],
                      num_inference_steps=r["steps"], guidance_scale=r["guidance_scale"],
                      generator=gens if batch_size > 1 else gens[0], output_type="np",
                      num_images_per_prompt=batch_size)
        if mode == "txt2img":
            kwargs.update(width=r["width"], height=r["height"])
        elif mode == "img2img":
            # Img2ImgPipeline takes the size from the image: resize first, as the pipeline's
            # own image processor does (PIL Lanczos) when height/width are given.
            kwargs.update(image=files[init].resize((r["width"], r["height"]), Image.LANCZOS)
                          if files[init].size != (r["width"], r["height"]) else files[init],
                          strength=strength)
        else:
            kwargs.update(image=files[init], mask_image=files[mask], strength=strength,
                          width=r["width"], height=r["height"])
        out = pipe(**kwargs).images
        img = to_u8(out)
        assert img.shape == (batch_size, r["height"], r["width"], 3), img.shape
        tensors[f"image.{label}"] = img
        cases[label] = dict(r, model=model, mode=mode, scheduler=scheduler, strength=strength,
                            init_image=init, mask_image=mask, batch_size=batch_size,
                            timesteps=[float(t) for t in pipe.scheduler.timesteps])
        st = img.float()
        print(f"{label}: mean {st.mean():.1f} std {st.std():.1f} distinct {len(torch.unique(img))}")

    pipes = {}
    for model in BASE:
        folder = os.path.join(out_root, model)
        txt = load_pipe(StableDiffusionPipeline, folder)
        own = dict(txt.scheduler.config)
        comps = txt.components
        pipes[model] = {
            "txt2img": (txt, own),
            "img2img": (StableDiffusionImg2ImgPipeline(**comps), own),
            "inpaint": (StableDiffusionInpaintPipeline(**comps), own),
        }
        for _, (p, _) in pipes[model].items():
            p.set_progress_bar_config(disable=True)

    # img2img: every scheduler, three strengths, both 4-channel models.
    for model in ("tiny-a", "tiny-b"):
        key = f"{BASE[model]['width']}x{BASE[model]['height']}"
        for sched in FIRST_NAMES:
            for s in STRENGTHS:
                run(f"{model}.img2img.{sched}.{s}", model, "img2img", scheduler=sched,
                    strength=s, init=inits[key])
        # The model's own scheduler (scheduler: null in the request).
        run(f"{model}.img2img.default.0.75", model, "img2img", strength=0.75, init=inits[key])

    # Inpainting with the regular (4-channel) model: the known region is put back each step.
    # tiny-a: every scheduler, strength 1.0 (pure noise start) and 0.75 in turn; tiny-b: three.
    for i, sched in enumerate(FIRST_NAMES):
        s = (1.0, 0.75)[i % 2]
        run(f"tiny-a.inpaint.{sched}.{s}", "tiny-a", "inpaint", scheduler=sched,
            strength=s, init=inits["32x32"], mask=masks["32x32"])
    for sched, s in (("euler_a", 0.75), ("unipc", 1.0), ("ddim", 0.75)):
        run(f"tiny-b.inpaint.{sched}.{s}", "tiny-b", "inpaint", scheduler=sched,
            strength=s, init=inits["32x48"], mask=masks["32x48"])
    for model in ("tiny-a", "tiny-b"):
        key = f"{BASE[model]['width']}x{BASE[model]['height']}"
        run(f"{model}.inpaint-grey.euler_a.0.75", model, "inpaint", scheduler="euler_a",
            strength=0.75, init=inits[key], mask=greys[key])

    # Inpainting with the 9-channel model: [latents, mask, masked-image latents] in; every
    # scheduler, strength 1.0 and 0.6 in turn.
    key = "32x32"
    for i, sched in enumerate(FIRST_NAMES):
        s = (1.0, 0.6)[i % 2]
        run(f"tiny-inpaint.inpaint.{sched}.{s}", "tiny-inpaint", "inpaint", scheduler=sched,
            strength=s, init=inits[key], mask=masks[key])
    run("tiny-inpaint.inpaint-grey.default.1.0", "tiny-inpaint", "inpaint", strength=1.0,
        init=inits[key], mask=greys[key])

    # Batches: one generator per image, seeded seed + i.
    run("tiny-a.batch.txt2img.euler_a", "tiny-a", "txt2img", scheduler="euler_a", batch_size=3)
    run("tiny-a.batch.img2img.euler_a.0.75", "tiny-a", "img2img", scheduler="euler_a",
        strength=0.75, init=inits["32x32"], batch_size=3)
    run("tiny-b.batch.img2img.dpmpp_2m.0.6", "tiny-b", "img2img", scheduler="dpmpp_2m",
        strength=0.6, init=inits["32x48"], batch_size=3, seed=11)

    # An init image of another size: 50x35 resized to 32x32.
    run("tiny-a.img2img-resize.euler.0.75", "tiny-a", "img2img", scheduler="euler",
        strength=0.75, init=resize_src)

    tensors = {k: v.contiguous() for k, v in tensors.items()}
    meta = {
        "generated_by": "tools/make_img2img_fixtures.py",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__},
        "images": "image.<case>: [batch, H, W, 3] u8 = round(output_type='np' * 255)",
        "resize": "init images of another size: PIL Image.resize((width, height), LANCZOS)",
        "cases": cases,
    }
    save_file(tensors, os.path.join(out_root, "img2img.safetensors"),
              metadata={"generated_by": "tools/make_img2img_fixtures.py"})
    with open(os.path.join(out_root, "img2img.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    for k, v in tensors.items():
        assert float(v.float().std()) > 2.0 and len(torch.unique(v)) > 20, f"{k} is (nearly) flat"


# Tiled VAE (diffusers' `enable_tiling`: `_tiled_encode` and `tiled_decode`, tiles of the VAE
# config's sample_size, overlap 0.25). Images larger than a tile: 128x96 on tiny-a and tiny-b
# (sample_size 64 px: 6 encoder tiles), 64x48 on tiny-inpaint (sample_size 32 px).
TILED = {
    "tiny-a": dict(prompt="a castle on a hill, morning fog", negative_prompt="blurry",
                   steps=4, width=128, height=96, seed=21, guidance_scale=7.5),
    "tiny-b": dict(prompt="a fishing boat in a harbour", negative_prompt="",
                   steps=4, width=128, height=96, seed=22, guidance_scale=1.0),
    "tiny-inpaint": dict(prompt="a red bench in a park", negative_prompt="",
                         steps=4, width=64, height=48, seed=23, guidance_scale=6.0),
}


@torch.no_grad()
def make_tiled_refs(out_root):
    """vae-tiled.safetensors / vae-tiled.json: the latent distribution of diffusers' tiled
    encode (and the untiled one, to show the tiles change it) of a synthetic image on each tiny
    VAE, and whole img2img / inpaint generations with `pipe.vae.enable_tiling()`."""
    import diffusers
    import transformers
    from diffusers import (AutoencoderKL, StableDiffusionImg2ImgPipeline,
                           StableDiffusionInpaintPipeline)
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from safetensors.torch import save_file

    img_dir = os.path.join(out_root, "images")
    tensors, cases = {}, {}
    for model, r in TILED.items():
        w, h = r["width"], r["height"]
        init_name = f"tiled-init-{w}x{h}.png"
        init = synthetic_image(w, h, seed=w * 7 + h)
        init.save(os.path.join(img_dir, init_name), optimize=True)
        folder = os.path.join(out_root, model)
        vae = AutoencoderKL.from_pretrained(os.path.join(folder, "vae"), torch_dtype=torch.float32)
        # As sdserve's image_tensor: x / 127.5 - 1, [1, 3, H, W].
        x = torch.from_numpy(np.asarray(init, dtype=np.float32)).permute(2, 0, 1)[None]
        x = x / 127.5 - 1.0
        whole = DiagonalGaussianDistribution(vae._encode(x))
        vae.enable_tiling()
        assert w > vae.tile_sample_min_size, "the image must be larger than a tile"
        tiled = DiagonalGaussianDistribution(vae._encode(x))
        tensors[f"mean.{model}"] = tiled.mean
        tensors[f"std.{model}"] = tiled.std
        tensors[f"whole_mean.{model}"] = whole.mean
        gap = float((tiled.mean - whole.mean).abs().max())
        print(f"{model}: tiled encode {tuple(tiled.mean.shape)}, max |tiled - whole| {gap:.4f}")
        assert gap > 1e-3, "tiling made no difference: the test would prove nothing"

        pipe = load_pipe(diffusers.StableDiffusionPipeline, folder)
        own = dict(pipe.scheduler.config)
        comps = pipe.components
        inpaint = model == "tiny-inpaint"
        cls = StableDiffusionInpaintPipeline if inpaint else StableDiffusionImg2ImgPipeline
        p = cls(**comps)
        p.set_progress_bar_config(disable=True)
        p.vae.enable_tiling()
        set_scheduler(p, own, "euler")
        kwargs = dict(prompt=r["prompt"], negative_prompt=r["negative_prompt"],
                      num_inference_steps=r["steps"], guidance_scale=r["guidance_scale"],
                      generator=torch.Generator("cpu").manual_seed(r["seed"]), output_type="np",
                      image=init)
        mask_name = None
        if inpaint:
            mask_name = f"tiled-mask-{w}x{h}.png"
            binary_mask(w, h).save(os.path.join(img_dir, mask_name), optimize=True)
            kwargs.update(mask_image=binary_mask(w, h), width=w, height=h, strength=1.0)
        else:
            kwargs.update(strength=0.75)
        img = to_u8(p(**kwargs).images)
        assert img.shape == (1, h, w, 3), img.shape
        label = f"{model}.{'inpaint' if inpaint else 'img2img'}.euler"
        tensors[f"image.{label}"] = img
        cases[label] = dict(r, model=model, mode="inpaint" if inpaint else "img2img",
                            scheduler="euler", strength=kwargs["strength"], init_image=init_name,
                            mask_image=mask_name, batch_size=1,
                            tile_sample_size=vae.tile_sample_min_size,
                            tile_latent_size=vae.tile_latent_min_size,
                            tile_overlap_factor=vae.tile_overlap_factor)
        st = img.float()
        print(f"{label}: mean {st.mean():.1f} std {st.std():.1f}")
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, os.path.join(out_root, "vae-tiled.safetensors"),
              metadata={"generated_by": "tools/make_img2img_fixtures.py"})
    meta = {
        "generated_by": "tools/make_img2img_fixtures.py (make_tiled_refs)",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__},
        "encode": "mean.<model>, std.<model>: DiagonalGaussianDistribution(vae._encode(x)) with "
                  "use_tiling, x = tiled-init PNG / 127.5 - 1; whole_mean.<model>: untiled",
        "images": "image.<case>: [1, H, W, 3] u8, pipe.vae.enable_tiling()",
        "cases": cases,
    }
    with open(os.path.join(out_root, "vae-tiled.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--tiled-only", action="store_true",
                    help="only the tiled-VAE references (vae-tiled.*), from the existing models")
    args = ap.parse_args()
    # One thread: tiny models gain nothing from more, and a busy machine loses to spinning.
    torch.set_num_threads(1)
    if not args.tiled_only:
        make_inpaint_model(args.out)
        make_refs(args.out)
    make_tiled_refs(args.out)


if __name__ == "__main__":
    main()
