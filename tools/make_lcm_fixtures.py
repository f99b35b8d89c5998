#!/usr/bin/env python3
"""A tiny guidance-distilled (LCM) model and diffusers' images from it (diffusers 0.42.1, torch
2.11.0). Runs after tools/make_tiny_models.py and tools/make_img2img_fixtures.py (reads tiny-b/
and images/init-32x48.png).

Full LCM models (e.g. SimianLuo/LCM_Dreamshaper_v7) have a UNet whose config sets
`time_cond_proj_dim`: StableDiffusionPipeline then turns classifier-free guidance off and passes
`timestep_cond = get_guidance_scale_embedding(guidance_scale - 1, time_cond_proj_dim)`, which the
UNet's time embedding adds through `time_embedding.cond_proj` (a Linear without bias).

Writes, under crates/pipeline/tests/fixtures:
  tiny-lcm/            tiny-b's text encoder, tokenizer and VAE; a UNet with tiny-b's config plus
                       time_cond_proj_dim (random weights, conv_out rescaled as make_tiny_models
                       does); LCMScheduler with SD 1.5's scheduler values
  lcm.safetensors      image.<case>: [batch, H, W, 3] u8, what StableDiffusionPipeline /
                       StableDiffusionImg2ImgPipeline return (one generator per image, seed + i)
  lcm.json             every case's request (as samplers.json) and the UNet evaluations

Run from the repository root: python3 tools/make_lcm_fixtures.py
"""
import json
import math
import os
import shutil

import diffusers
import torch
from PIL import Image
from safetensors.torch import save_file

from api_schedulers import SD15_SCHEDULER_CONFIG as SD15
from make_img2img_fixtures import load_pipe, to_u8

OUT = os.path.join("crates", "pipeline", "tests", "fixtures")
SOURCE = "tiny-b"
MODEL = "tiny-lcm"
TIME_COND_PROJ_DIM = 32
SEED = 5000
COND_PROJ_SCALE = 4.0

BASE = dict(prompt="a watercolor painting of a lighthouse at sunset", negative_prompt="ugly",
            steps=4, width=32, height=48, seed=77, guidance_scale=8.0, scheduler=None,
            strength=None, batch_size=1)
CASES = {
    # guidance 8 as LCM models are run: no unconditional pass, w = 7 embedded.
    "tiny-lcm.txt2img.8": dict(),
    # guidance 1: w = 0 still goes through cond_proj (cos(0) = 1).
    "tiny-lcm.txt2img.1.batch": dict(guidance_scale=1.0, batch_size=2, seed=9),
    "tiny-lcm.img2img.0.6": dict(strength=0.6, steps=6, guidance_scale=4.5),
}
INIT_IMAGE = "init-32x48.png"


@torch.no_grad()
def make_model():
    src, out = os.path.join(OUT, SOURCE), os.path.join(OUT, MODEL)
    if os.path.isdir(out):
        shutil.rmtree(out)
    for part in ("text_encoder", "tokenizer", "vae"):
        shutil.copytree(os.path.join(src, part), os.path.join(out, part))
    with open(os.path.join(src, "unet", "config.json")) as f:
        config = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    config["time_cond_proj_dim"] = TIME_COND_PROJ_DIM
    torch.manual_seed(SEED)
    unet = diffusers.UNet2DConditionModel(**config)
    # nn.Linear's default init makes cond_proj's share of the time embedding small; scaled, the
    # guidance embedding visibly changes every image (w = 0 included), so ignoring it fails.
    unet.time_embedding.cond_proj.weight.mul_(COND_PROJ_SCALE)
    # As make_tiny_models: unit-variance latents give a unit-variance prediction.
    g = torch.Generator().manual_seed(SEED + 1)
    x = torch.randn(2, config["in_channels"], 16, 16, generator=g)
    ctx = torch.randn(2, 77, config["cross_attention_dim"], generator=g)
    cond = torch.randn(2, TIME_COND_PROJ_DIM, generator=g)
    s = float(unet(x, torch.tensor([900.0, 100.0]), encoder_hidden_states=ctx,
                   timestep_cond=cond).sample.std())
    if not math.isfinite(s) or s == 0.0:
        raise RuntimeError(f"UNet output std is {s}")
    unet.conv_out.weight.mul_(1.0 / s)
    unet.conv_out.bias.mul_(1.0 / s)
    assert unet.time_embedding.cond_proj.bias is None
    unet.save_pretrained(os.path.join(out, "unet"), safe_serialization=True)
    scheduler = diffusers.LCMScheduler.from_config(SD15)
    scheduler.save_config(os.path.join(out, "scheduler"))
    with open(os.path.join(src, "model_index.json")) as f:
        index = json.load(f)
    index["scheduler"] = ["diffusers", "LCMScheduler"]
    with open(os.path.join(out, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)
        f.write("\n")


@torch.no_grad()
def images(tensors):
    txt = load_pipe(diffusers.StableDiffusionPipeline, os.path.join(OUT, MODEL))
    assert type(txt.scheduler).__name__ == "LCMScheduler"
    img = diffusers.StableDiffusionImg2ImgPipeline(**txt.components)
    img.set_progress_bar_config(disable=True)
    init = Image.open(os.path.join(OUT, "images", INIT_IMAGE)).convert("RGB")
    cases = {}
    for label, over in CASES.items():
        r = {**BASE, **over}
        pipe = txt if r["strength"] is None else img
        n = r["batch_size"]
        gens = [torch.Generator("cpu").manual_seed(r["seed"] + i) for i in range(n)]
        kwargs = dict(prompt=r["prompt"], negative_prompt=r["negative_prompt"],
                      num_inference_steps=r["steps"], guidance_scale=r["guidance_scale"],
                      generator=gens if n > 1 else gens[0], output_type="np",
                      num_images_per_prompt=n)
        evaluations = []
        kwargs["callback_on_step_end"] = lambda p, i, t, kw: evaluations.append(float(t)) or kw
        if r["strength"] is None:
            kwargs.update(width=r["width"], height=r["height"])
        else:
            assert init.size == (r["width"], r["height"])
            kwargs.update(image=init, strength=r["strength"])
        out = to_u8(pipe(**kwargs).images)
        assert not pipe.do_classifier_free_guidance
        assert out.shape == (n, r["height"], r["width"], 3), out.shape
        assert float(out.float().std()) > 2.0 and len(torch.unique(out)) > 20, f"{label} is flat"
        tensors[f"image.{label}"] = out
        cases[label] = dict(r, model=MODEL, init_image=None if r["strength"] is None else INIT_IMAGE,
                            unet_timesteps=evaluations)
        print(f"{label}: {len(evaluations)} UNet evaluations, mean {out.float().mean():.1f}")
    return cases


def main():
    assert torch.__version__.split("+")[0] == "2.11.0", torch.__version__
    assert diffusers.__version__ == "0.42.1", diffusers.__version__
    torch.set_num_threads(1)
    make_model()
    tensors = {}
    cases = images(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, "lcm.safetensors"))
    index = {
        "generated_by": "tools/make_lcm_fixtures.py",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "time_cond_proj_dim": TIME_COND_PROJ_DIM,
        "cases": cases,
    }
    with open(os.path.join(OUT, "lcm.json"), "w") as f:
        json.dump(index, f, indent=1)
        f.write("\n")
    print(f"wrote {MODEL}/ and {len(tensors)} images")


if __name__ == "__main__":
    main()
