#!/usr/bin/env python3
"""Whole images for A1111's prompt editing, alternation and AND (composable diffusion) from
diffusers 0.42.1 on the tiny models, with the conditioning plans A1111's own prompt_parser.py made
(`plans` in prompt_schedules.json, tools/make_prompt_schedule_fixtures.py).

Prompt editing and alternation: StableDiffusionPipeline / StableDiffusionImg2ImgPipeline given the
first texts' embeddings, and a `callback_on_step_end` that swaps `prompt_embeds` (negative and
positive, repeated per image as the pipeline does) for the next UNet evaluation, chosen as A1111's
`reconstruct_cond_batch` does: evaluation k (0-based, one per loop iteration, so Heun's two per
step count twice) takes the first schedule entry whose end is at or past k.

AND: the same pipelines with the UNet's forward wrapped to do what A1111's CFGDenoiser and
`combine_denoised` do at evaluation k: one UNet batch of the negative prompt's and every part's
embeddings, combined as `uncond + sum_i w_i * g * (cond_i - uncond)` (A1111's order of
operations); the wrapper answers that for both halves of diffusers' CFG batch, so diffusers'
`u + g * (c - u)` leaves it as is (with guidance off it answers it once).

Each text is encoded with the pipeline's own `encode_prompt` (the plans' texts have no emphasis,
so A1111's reading of them is diffusers'). Requests: BASE of make_img2img_fixtures.py for the
model with the case's keys; image i of a batch from `Generator("cpu").manual_seed(seed + i)`.

Writes crates/pipeline/tests/fixtures/prompt-edit-images.safetensors and .json:
  image.<label>   u8 [batch, H, W, 3]
and `cases`: <label> -> the request.

Run from the repository root (after make_tiny_models.py, make_img2img_fixtures.py and
make_prompt_schedule_fixtures.py): python3 tools/make_prompt_schedule_images.py
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

# label -> (model, index into `plans`, the case's keys over BASE[model]). A plan's steps are
# A1111's count: the steps, times 2 for heun.
CASES = {
    "tiny-a.edit.euler": ("tiny-a", 0, dict(scheduler="euler", steps=10)),
    "tiny-a.edit.heun": ("tiny-a", 0, dict(scheduler="heun", steps=5)),
    "tiny-a.edit.img2img.0.6": ("tiny-a", 0, dict(scheduler="euler", steps=10, strength=0.6)),
    "tiny-a.alternate.euler_a.batch": ("tiny-a", 1, dict(scheduler="euler_a", steps=10, batch_size=2)),
    "tiny-a.and.euler": ("tiny-a", 2, dict(scheduler="euler", steps=10)),
    "tiny-a.and_edit.heun.batch": ("tiny-a", 3, dict(scheduler="heun", steps=5, batch_size=2)),
    "tiny-b.edit.euler": ("tiny-b", 4, dict(scheduler="euler", steps=10)),
    "tiny-b.and.euler": ("tiny-b", 5, dict(scheduler="euler", steps=10)),
}


def entry_at(schedule, k):
    """reconstruct_cond_batch: the first entry whose end is at or past k, else the first."""
    for end, text in schedule:
        if k <= end:
            return text
    return schedule[0][1]


@torch.no_grad()
def main():
    assert torch.__version__.split("+")[0] == "2.11.0", torch.__version__
    assert diffusers.__version__ == "0.42.1", diffusers.__version__
    torch.set_num_threads(1)
    with open(os.path.join(OUT, "prompt_schedules.json"), encoding="utf-8") as f:
        plans = json.load(f)["plans"]
    tensors, cases, pipes = {}, {}, {}
    for label, (model, plan_index, over) in CASES.items():
        if model not in pipes:
            txt = load_pipe(diffusers.StableDiffusionPipeline, os.path.join(OUT, model))
            img = diffusers.StableDiffusionImg2ImgPipeline(**txt.components)
            img.set_progress_bar_config(disable=True)
            pipes[model] = (txt, img, dict(txt.scheduler.config))
        txt, img, own = pipes[model]
        plan = plans[plan_index]
        r = {**BASE[model], "strength": None, "batch_size": 1, **over,
             "prompt": plan["prompt"], "negative_prompt": plan["negative_prompt"]}
        pipe = txt if r["strength"] is None else img
        pipe.scheduler = make_scheduler(r["scheduler"], own)
        assert plan["steps"] == r["steps"] * pipe.scheduler.order, (label, plan["steps"])
        n, g = r["batch_size"], r["guidance_scale"]
        cfg = g > 1.0
        embeds = {}

        def embed(text):
            if text not in embeds:
                embeds[text] = pipe.encode_prompt(text, "cpu", 1, False)[0]
            return embeds[text]

        parts, negative = plan["parts"], plan["negative_schedule"]
        composed = len(parts) != 1 or parts[0]["weight"] != 1.0
        gens = [torch.Generator("cpu").manual_seed(r["seed"] + i) for i in range(n)]
        kwargs = dict(num_inference_steps=r["steps"], guidance_scale=g,
                      generator=gens if n > 1 else gens[0], output_type="np",
                      num_images_per_prompt=n)
        if r["strength"] is None:
            kwargs.update(width=r["width"], height=r["height"])
        else:
            init = Image.open(os.path.join(OUT, "images", f"init-{r['width']}x{r['height']}.png"))
            kwargs.update(image=init.convert("RGB"), strength=r["strength"])
        unet_forward = pipe.unet.forward
        if not composed:
            schedule = parts[0]["schedule"]

            def swap(p, i, t, callback_kwargs):
                k = i + 1
                pos = embed(entry_at(schedule, k)).repeat(n, 1, 1)
                if not cfg:
                    return {"prompt_embeds": pos}
                neg = embed(entry_at(negative, k)).repeat(n, 1, 1)
                return {"prompt_embeds": torch.cat([neg, pos])}

            kwargs.update(prompt_embeds=embed(entry_at(schedule, 0)),
                          negative_prompt_embeds=embed(entry_at(negative, 0)) if cfg else None,
                          callback_on_step_end=swap,
                          callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
        else:
            calls = [0]

            def combined(sample, timestep, encoder_hidden_states=None, **kw):
                k = calls[0]
                calls[0] += 1
                x = sample[:n]
                rows = [embed(entry_at(negative, k))] + [embed(entry_at(p["schedule"], k)) for p in parts]
                assert len({e.shape for e in rows}) == 1, "the cases keep one length"
                e = torch.cat([row.repeat(n, 1, 1) for row in rows])
                out = unet_forward(torch.cat([x] * len(rows)), timestep, encoder_hidden_states=e, **kw)[0]
                uncond = out[:n]
                denoised = torch.clone(uncond)
                for i, p in enumerate(parts):
                    denoised += (out[(i + 1) * n:(i + 2) * n] - uncond) * (p["weight"] * g)
                return (torch.cat([denoised, denoised]) if cfg else denoised,)

            pipe.unet.forward = combined
            # The texts go through the wrapper; these only give diffusers its batch shape.
            kwargs.update(prompt_embeds=embed(entry_at(parts[0]["schedule"], 0)),
                          negative_prompt_embeds=embed(entry_at(negative, 0)) if cfg else None)
        try:
            out = to_u8(pipe(**kwargs).images)
        finally:
            pipe.unet.forward = unet_forward
        assert out.shape == (n, r["height"], r["width"], 3), out.shape
        assert float(out.float().std()) > 2.0 and len(torch.unique(out)) > 20, f"{label} is flat"
        tensors[f"image.{label}"] = out.contiguous()
        cases[label] = dict(r, model=model,
                            init_image=None if r["strength"] is None
                            else f"init-{r['width']}x{r['height']}.png",
                            texts=len(embeds))
        print(f"{label}: mean {out.float().mean():.1f} std {out.float().std():.1f}, {len(embeds)} texts")
    save_file(tensors, os.path.join(OUT, "prompt-edit-images.safetensors"))
    index = {
        "generated_by": "tools/make_prompt_schedule_images.py",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "cases": cases,
    }
    with open(os.path.join(OUT, "prompt-edit-images.json"), "w") as f:
        json.dump(index, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
