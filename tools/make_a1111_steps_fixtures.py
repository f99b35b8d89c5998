#!/usr/bin/env python3
"""img2img on A1111 1.10's step rule (`StepRule::A1111`, `A1111FixSteps`) on the tiny model
tiny-a: A1111's own `setup_img2img_steps` and `sample_img2img` slicing (tools/a1111_steps.py)
give the schedule, the step to start from and A1111's step count; diffusers' img2img runs that
slice (its scheduler's timesteps from the step's first, `add_noise` at its noise level).
The `.noise` cases add A1111's `img2img_extra_noise` and img2img's `initial_noise_multiplier`
(processing.py: the noise times it before `sample_img2img`): their start is the latents
A1111's own `sample_img2img` makes from the image latents and that noise (on a VP scheduler,
DPMSolverMultistep's, times alpha_t = 1 / sqrt(1 + sigma^2)), put in place of diffusers'
`add_noise`; the same case without them is far apart.

Writes, under OUT (default crates/pipeline/tests/fixtures):
  a1111-steps.json          cases: the request (init image from images/, strength, rule), what
                            A1111's code gave (schedule_steps, start, t_enc, its progress
                            count), our UNet evaluations (timesteps from `begin`), diffusers'
                            own rule's (`diffusers_evaluations`), versions, A1111's digests
  a1111-steps.safetensors   image.<case>: [batch, H, W, 3] u8 = round(output_type='np' * 255)

Usage:
  python tools/make_a1111_steps_fixtures.py --a1111 PATH/TO/stable-diffusion-webui [--out DIR]
"""

import json
import os
import sys

import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from a1111_source import a1111_args  # noqa: E402
from a1111_steps import A1111Steps, a1111_img2img_class, first_index_of_step  # noqa: E402
from api_schedulers import make_scheduler  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "crates", "pipeline", "tests", "fixtures")

BASE = dict(model="tiny-a", prompt="a photo of an astronaut riding a horse on mars",
            negative_prompt="blurry, low quality", width=32, height=32, guidance_scale=7.5,
            init_image="init-32x32.png", batch_size=1)
# label: (scheduler, steps, strength, rule, seed[, batch_size[, (extra_noise,
# noise_multiplier)]]). Strengths where A1111's
# float64 product truncates (0.7 * 10 = 6.999...), 1.0 (capped at 0.999), second-order
# samplers' pairs, PNDM's repeated timestep, multistep warm-up from a later step.
CASES = {
    "euler.10.0.75": ("euler", 10, 0.75, "a1111", 11),
    "euler.10.1.0": ("euler", 10, 1.0, "a1111", 12),
    "euler_a.8.0.5.batch": ("euler_a", 8, 0.5, "a1111", 13, 2),
    "dpmpp_2m_karras.10.0.6": ("dpmpp_2m_karras", 10, 0.6, "a1111", 14),
    "heun.6.0.5": ("heun", 6, 0.5, "a1111", 15),
    "ddim.10.0.7": ("ddim", 10, 0.7, "a1111", 16),
    "pndm.10.0.75": ("pndm", 10, 0.75, "a1111", 17),
    "pndm.6.0.99": ("pndm", 6, 0.99, "a1111", 18),
    "unipc.8.0.5": ("unipc", 8, 0.5, "a1111", 19),
    "lms.10.0.75.fix": ("lms", 10, 0.75, "a1111_fix_steps", 20),
    "dpmpp_2m.6.0.3.fix": ("dpmpp_2m", 6, 0.3, "a1111_fix_steps", 21),
    "euler.10.0.6.noise": ("euler", 10, 0.6, "a1111", 22, 1, (0.3, 1.0)),
    "euler_a.8.0.5.batch.noise": ("euler_a", 8, 0.5, "a1111", 23, 2, (0.15, 1.2)),
    "ddim.10.0.7.noise": ("ddim", 10, 0.7, "a1111", 24, 1, (0.3, 1.0)),
    "dpmpp_2m_karras.10.0.6.noise": ("dpmpp_2m_karras", 10, 0.6, "a1111", 25, 1, (0.3, 1.1)),
    "lms.10.0.75.fix.noise": ("lms", 10, 0.75, "a1111_fix_steps", 26, 1, (0.0, 1.3)),
}
# diffusers' schedulers whose latents are VP samples (alpha_t * x + sigma_t * noise).
VP = ("DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler")


def to_u8(images_np):
    return torch.from_numpy((images_np * 255).round().astype("uint8"))


@torch.no_grad()
def main():
    args = a1111_args(__file__, __doc__, DEFAULT_OUT)
    if args is None:
        return

    import diffusers
    from diffusers import StableDiffusionImg2ImgPipeline
    from safetensors.torch import save_file

    a1111 = A1111Steps(args.a1111)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    pipe = a1111_img2img_class().from_pretrained(
        os.path.join(args.out, BASE["model"]), dtype=torch.float32, safety_checker=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    plain = StableDiffusionImg2ImgPipeline(**pipe.components)
    plain.set_progress_bar_config(disable=True)
    own = dict(pipe.scheduler.config)
    init = Image.open(os.path.join(args.out, "images", BASE["init_image"])).convert("RGB")

    tensors, cases = {}, {}
    for label, case in CASES.items():
        name, steps, strength, rule, seed = case[:5]
        batch = case[5] if len(case) > 5 else 1
        extra, multiplier = case[6] if len(case) > 6 else (0.0, 1.0)

        def build(name=name):
            return make_scheduler(name, own)
        got = a1111.slice(name, build, steps, strength, fix_steps=rule == "a1111_fix_steps")
        pipe.scheduler = build()
        pipe.scheduler.set_timesteps(got["schedule_steps"])
        pipe.begin = first_index_of_step(pipe.scheduler, got["start"])
        evaluations = len(pipe.scheduler.timesteps) - pipe.begin
        # The slice starts where A1111's does: the same sigma (k-diffusion), the same timestep
        # (DDIM, PLMS; A1111's UniPC is its own).
        t0 = float(pipe.scheduler.timesteps[pipe.begin])
        if name in ("ddim", "pndm"):
            assert t0 == got["first"], (label, t0, got["first"])
        elif name not in ("unipc",):
            sigma = float(pipe.scheduler.sigmas[pipe.begin])
            assert abs(sigma - got["first"]) < 1e-6, (label, sigma, got["first"])
        def run():
            gens = [torch.Generator("cpu").manual_seed(seed + i) for i in range(batch)]
            return to_u8(pipe(prompt=BASE["prompt"], negative_prompt=BASE["negative_prompt"],
                              image=init, strength=strength,
                              num_inference_steps=got["schedule_steps"],
                              guidance_scale=BASE["guidance_scale"],
                              generator=gens if batch > 1 else gens[0],
                              num_images_per_prompt=batch, output_type="np").images)
        noise_fields = {}
        if len(case) > 6:
            without = run()
            seen = {}

            def a1111_start(latents, noise, timestep, name=name, build=build, rule=rule,
                            steps=steps, strength=strength, extra=extra, m=multiplier):
                start = a1111.slice(name, build, steps, strength,
                                    fix_steps=rule == "a1111_fix_steps", x=latents,
                                    noise=noise * m, extra_noise=extra)
                seen["infotext"] = start["infotext"]
                xi = start["xi"]
                if type(pipe.scheduler).__name__ in VP:
                    xi = xi / (1 + start["first"] ** 2) ** 0.5
                return xi
            pipe.scheduler.add_noise = a1111_start
            image = run()
            apart_without = float((image.float() - without.float()).abs().mean())
            assert apart_without > 1.0, f"{label}: the noise options change little ({apart_without})"
            noise_fields = dict(extra_noise=extra, noise_multiplier=multiplier,
                                a1111_infotext=seen["infotext"],
                                without_noise_options_mean_abs_diff=round(apart_without, 3))
        else:
            image = run()
        # diffusers' own rule gives another image (what the Rust test must not match).
        plain.scheduler = build()
        gens = [torch.Generator("cpu").manual_seed(seed + i) for i in range(batch)]
        other = to_u8(plain(prompt=BASE["prompt"], negative_prompt=BASE["negative_prompt"],
                            image=init, strength=strength, num_inference_steps=steps,
                            guidance_scale=BASE["guidance_scale"],
                            generator=gens if batch > 1 else gens[0],
                            num_images_per_prompt=batch, output_type="np").images)
        apart = float((image.float() - other.float()).abs().mean())
        diffusers_evaluations = len(plain.get_timesteps(steps, strength, "cpu")[0])
        # Where the rules run other steps, the images are far apart (img2img at strength 1
        # runs every step either way).
        if diffusers_evaluations != evaluations:
            assert apart > 1.0, f"{label}: diffusers' rule gives nearly the same image ({apart})"
        tensors[f"image.{label}"] = image.contiguous()
        cases[label] = dict(BASE, scheduler=name, steps=steps, strength=strength, step_rule=rule,
                            seed=seed, batch_size=batch, schedule_steps=got["schedule_steps"],
                            start=got["start"], t_enc=got["t_enc"], a1111_count=got["count"],
                            begin=pipe.begin, evaluations=evaluations,
                            diffusers_evaluations=diffusers_evaluations,
                            diffusers_mean_abs_diff=round(apart, 3), **noise_fields)
        print(f"{label}: schedule {got['schedule_steps']}, start {got['start']}, "
              f"A1111 count {got['count']}, evaluations {evaluations}, "
              f"diffusers' rule {apart:.1f} apart")

    meta = {
        "generated_by": "tools/make_a1111_steps_fixtures.py",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
        "a1111_sources": {k: f"sha256 {v}" for k, v in a1111.digests.items()},
        "images": "image.<case>: [batch, H, W, 3] u8 = round(output_type='np' * 255)",
        "cases": cases,
    }
    with open(os.path.join(args.out, "a1111-steps.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    save_file(tensors, os.path.join(args.out, "a1111-steps.safetensors"))
    print(f"wrote a1111-steps.* ({len(cases)} cases)")


if __name__ == "__main__":
    main()
