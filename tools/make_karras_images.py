#!/usr/bin/env python3
"""Whole images for the scheduler names added with the Karras schedule and DPM++ 2M SDE
(euler_karras, euler_a_karras, dpmpp_2m_sde, dpmpp_2m_sde_karras, lms_karras, unipc_karras) and
DPM++ 2M SDE Heun (dpmpp_2m_sde_heun, dpmpp_2m_sde_heun_karras), from
diffusers 0.42.1's StableDiffusionPipeline / StableDiffusionImg2ImgPipeline on the tiny models.

Writes crates/pipeline/tests/fixtures/karras-images.safetensors and karras-images.json:
  image.<label>   u8 [batch, H, W, 3]: output_type="np", round(x * 255)
and `cases`: <label> -> the request (BASE of make_img2img_fixtures.py for the model, plus the
case's keys), its model, mode and init image. Each scheduler is
`make_scheduler(name, the model's own scheduler config)` (tools/api_schedulers.py); image i of a
batch has `Generator("cpu").manual_seed(seed + i)`, and the stochastic schedulers keep drawing from
it after the latents. tiny-a: epsilon prediction, CFG 7.5; tiny-b: v_prediction, CFG off.

Run from the repository root (after tools/make_tiny_models.py and make_img2img_fixtures.py):
python3 tools/make_karras_images.py
"""
import json
import os

import diffusers
import torch
from PIL import Image
from safetensors.torch import save_file

from api_schedulers import make_scheduler
from make_img2img_fixtures import BASE, load_pipe, to_u8

OUT = os.path.join("crates", "pipeline", "tests", "fixtures")
NAMES = ["euler_karras", "euler_a_karras", "dpmpp_2m_sde", "dpmpp_2m_sde_karras", "lms_karras", "unipc_karras"]

# label -> (model, the case's keys over BASE[model])
CASES = {}
for _model in ("tiny-a", "tiny-b"):
    for _name in NAMES:
        CASES[f"{_model}.txt2img.{_name}"] = (_model, dict(scheduler=_name))
# Two images, two generators: each image's noise from its own, at every step.
CASES["tiny-a.txt2img.dpmpp_2m_sde_karras.batch"] = ("tiny-a", dict(scheduler="dpmpp_2m_sde_karras", batch_size=2))
CASES["tiny-a.txt2img.euler_a_karras.batch"] = ("tiny-a", dict(scheduler="euler_a_karras", batch_size=2))
# img2img: the encoder's sample, the start noise, then the steps' noise, from one generator.
CASES["tiny-a.img2img.dpmpp_2m_sde.0.6"] = ("tiny-a", dict(scheduler="dpmpp_2m_sde", strength=0.6))
CASES["tiny-b.img2img.lms_karras.0.75"] = ("tiny-b", dict(scheduler="lms_karras", strength=0.75))
# DPM++ 2M SDE Heun (solver_type "heun"): both models, a batch, an img2img.
CASES["tiny-a.txt2img.dpmpp_2m_sde_heun"] = ("tiny-a", dict(scheduler="dpmpp_2m_sde_heun"))
CASES["tiny-b.txt2img.dpmpp_2m_sde_heun_karras"] = ("tiny-b", dict(scheduler="dpmpp_2m_sde_heun_karras"))
CASES["tiny-a.txt2img.dpmpp_2m_sde_heun_karras.batch"] = ("tiny-a", dict(scheduler="dpmpp_2m_sde_heun_karras", batch_size=2))
CASES["tiny-a.img2img.dpmpp_2m_sde_heun.0.6"] = ("tiny-a", dict(scheduler="dpmpp_2m_sde_heun", strength=0.6))


@torch.no_grad()
def main():
    assert torch.__version__.split("+")[0] == "2.11.0", torch.__version__
    assert diffusers.__version__ == "0.42.1", diffusers.__version__
    torch.set_num_threads(1)
    pipes = {}
    tensors, cases = {}, {}
    for label, (model, over) in CASES.items():
        if model not in pipes:
            txt = load_pipe(diffusers.StableDiffusionPipeline, os.path.join(OUT, model))
            img = diffusers.StableDiffusionImg2ImgPipeline(**txt.components)
            img.set_progress_bar_config(disable=True)
            pipes[model] = (txt, img, dict(txt.scheduler.config))
        txt, img, own = pipes[model]
        r = {**BASE[model], "strength": None, "batch_size": 1, **over}
        pipe = txt if r["strength"] is None else img
        pipe.scheduler = make_scheduler(r["scheduler"], own)
        n = r["batch_size"]
        gens = [torch.Generator("cpu").manual_seed(r["seed"] + i) for i in range(n)]
        kwargs = dict(prompt=r["prompt"], negative_prompt=r["negative_prompt"],
                      num_inference_steps=r["steps"], guidance_scale=r["guidance_scale"],
                      generator=gens if n > 1 else gens[0], output_type="np",
                      num_images_per_prompt=n)
        init_name = None
        if r["strength"] is None:
            kwargs.update(width=r["width"], height=r["height"])
        else:
            init_name = f"init-{r['width']}x{r['height']}.png"
            init = Image.open(os.path.join(OUT, "images", init_name)).convert("RGB")
            kwargs.update(image=init, strength=r["strength"])
        out = to_u8(pipe(**kwargs).images)
        assert out.shape == (n, r["height"], r["width"], 3), out.shape
        assert float(out.float().std()) > 2.0 and len(torch.unique(out)) > 20, f"{label} is flat"
        tensors[f"image.{label}"] = out.contiguous()
        cases[label] = dict(r, model=model, mode="txt2img" if init_name is None else "img2img",
                            init_image=init_name, mask_image=None,
                            timesteps=[float(t) for t in pipe.scheduler.timesteps])
        print(f"{label}: mean {out.float().mean():.1f} std {out.float().std():.1f}")
    save_file(tensors, os.path.join(OUT, "karras-images.safetensors"))
    index = {
        "generated_by": "tools/make_karras_images.py",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "cases": cases,
    }
    with open(os.path.join(OUT, "karras-images.json"), "w") as f:
        json.dump(index, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
