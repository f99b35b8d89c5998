"""A1111 1.10's img2img step rule, from its own code, for the reference scripts: which schedule a
pass that starts from an image builds, from which step it starts, and how many steps A1111
reports; and a diffusers img2img pipeline that runs that slice.

From a checkout of AUTOMATIC1111/stable-diffusion-webui (taken with `ast`, not copied), run as
written on mocks of its model objects:
  modules/sd_samplers_common.py      setup_img2img_steps (the full or stretched schedule, t_enc)
  modules/sd_samplers_kdiffusion.py  KDiffusionSampler.sample_img2img: `sigmas[steps - t_enc -
                                     1:]`, `xi = x + noise * sigma_sched[0]`, the progress total
                                     `t_enc + 1`
  modules/sd_samplers_timesteps.py   CompVisSampler.sample_img2img and get_timesteps (DDIM, PLMS,
                                     UniPC): its timesteps, the noise at `timesteps[t_enc]`
`get_sigmas` is diffusers': the scheduler's own sigmas for the schedule A1111 asks for (one per
step: a second-order scheduler's repeated sigmas once), so the slice is of the schedule the
server runs. A1111's noise and the sampler's later draws are not A1111's (its VAE sample comes
from an unseeded global generator): the pipeline's generators draw as diffusers does.

The slice runs as diffusers' own img2img (`A1111StepsImg2Img`): `get_timesteps` returns the
scheduler's timesteps from the slice's first step (`set_begin_index` there), so `add_noise`
puts the image at that step's noise level. A step's first timestep is `step * order`; PNDM
repeats its second timestep (`[t0, t1, t1, t2, ...]`), so its step `b > 0` begins at `b + 1`.
A1111's own DDIM, PLMS and UniPC are not diffusers' (its DDIM and PLMS run `t_enc - 1` updates
from the next timestep down; txt2img already differs the same way): these run diffusers'
scheduler from the noise level A1111 starts at, for A1111's count of steps.
"""

import inspect
import os
import sys
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from a1111_source import functions  # noqa: E402

# A1111's samplers in `sd_samplers_timesteps.py`, by our API name; the rest are k-diffusion's.
TIMESTEPS_SAMPLERS = ("ddim", "pndm", "unipc", "unipc_karras")


def level_sigmas(sched):
    """The sigma of each step of a scheduler after `set_timesteps`, then 0 (k-diffusion's
    `get_sigmas`): its sigmas with a second-order scheduler's repeats once; DDIM and PNDM's
    from `alphas_cumprod` at their timesteps."""
    name = type(sched).__name__
    if name in ("DDIMScheduler", "PNDMScheduler"):
        ts = torch.unique_consecutive(sched.timesteps).long()
        ac = sched.alphas_cumprod[ts]
        return torch.cat([((1 - ac) / ac).sqrt(), torch.zeros(1)]).float()
    return torch.unique_consecutive(sched.sigmas.float())


def first_index_of_step(sched, step):
    """Where a run that starts at step `step`'s noise level begins in `sched.timesteps`."""
    if type(sched).__name__ == "PNDMScheduler" and sched.config.skip_prk_steps and step > 0:
        return step + 1
    return step * sched.order


class A1111Steps:
    """A1111's `setup_img2img_steps` and `sample_img2img` (both sampler families), loaded once."""

    def __init__(self, checkout):
        mod = os.path.join(checkout, "modules")
        self.opts = types.SimpleNamespace(img2img_fix_steps=False, img2img_extra_noise=0.0,
                                          always_discard_next_to_last_sigma=False)
        common, d1 = functions(os.path.join(mod, "sd_samplers_common.py"),
                               ["setup_img2img_steps"], {"opts": self.opts})
        self.shared = types.SimpleNamespace(sd_model=types.SimpleNamespace(alphas_cumprod=None))
        ns = {"sd_samplers_common": types.SimpleNamespace(
                  setup_img2img_steps=common["setup_img2img_steps"]),
              "opts": self.opts, "shared": self.shared, "inspect": inspect, "torch": torch,
              # script_callbacks' ExtraNoiseParams and extra_noise_callback with no extension
              # registered (the callback changes nothing).
              "ExtraNoiseParams": lambda noise, x, xi: types.SimpleNamespace(
                  noise=noise, x=x, xi=xi),
              "extra_noise_callback": lambda params: None,
              "devices": types.SimpleNamespace(device="cpu")}
        kd, d2 = functions(os.path.join(mod, "sd_samplers_kdiffusion.py"),
                           ["KDiffusionSampler.sample_img2img"], dict(ns))
        ts, d3 = functions(os.path.join(mod, "sd_samplers_timesteps.py"),
                           ["CompVisSampler.sample_img2img", "CompVisSampler.get_timesteps"],
                           dict(ns))
        self.kdiffusion = kd["KDiffusionSampler.sample_img2img"]
        self.timesteps = ts["CompVisSampler.sample_img2img"]
        self.get_timesteps = ts["CompVisSampler.get_timesteps"]
        self.digests = {**d1, **d2, **d3}

    def slice(self, name, make_scheduler, steps, strength, *, fix_steps=False, hires=False,
              x=None, noise=None, extra_noise=0.0):
        """A1111's img2img (or with `hires`, its hires pass) of `steps` at `strength` for our
        scheduler `name` (`make_scheduler()` builds it): dict(schedule_steps, start (the step
        run first), t_enc, count (A1111's progress total), xi (A1111's noised latents for `x`,
        `noise`, with the option `img2img_extra_noise` at `extra_noise`), first (its sigma, or
        timestep for DDIM/PLMS/UniPC), infotext (the parameters it added))."""
        self.opts.img2img_fix_steps = fix_steps
        self.opts.img2img_extra_noise = extra_noise
        seen = {}
        p = types.SimpleNamespace(steps=steps, denoising_strength=strength, cfg_scale=7.0,
                                  extra_generation_params={})
        me = types.SimpleNamespace(
            config=types.SimpleNamespace(options={}), model_wrap_cfg=types.SimpleNamespace(),
            s_min_uncond=0.0, initialize=lambda p: {}, add_infotext=lambda p: None,
            callback_state=None)

        def launch_sampling(count, run):
            seen["count"] = count
            return run()
        me.launch_sampling = launch_sampling
        x = torch.zeros(1, 4, 2, 2) if x is None else x
        noise = torch.zeros_like(x) if noise is None else noise
        if name in TIMESTEPS_SAMPLERS:
            sched = make_scheduler()
            self.shared.sd_model.alphas_cumprod = sched.alphas_cumprod

            def get_timesteps(p_, n):
                seen["schedule_steps"] = n
                return self.get_timesteps(me, p_, n)

            def func(model, xi, timesteps=None, extra_args=None, callback=None, disable=None,
                     is_img2img=False):
                seen["xi"] = xi
                return xi
            me.get_timesteps, me.func = get_timesteps, func
            self.timesteps(me, p, x, noise, None, None, steps=steps if hires else None)
            n = seen["schedule_steps"]
            t_enc = seen["count"] - 1
            seen["first"] = float(get_timesteps(p, n)[t_enc])
        else:
            def get_sigmas(p_, n):
                seen["schedule_steps"] = n
                sched = make_scheduler()
                sched.set_timesteps(n)
                return level_sigmas(sched)

            def func(model, xi, extra_args=None, disable=None, callback=None, sigmas=None):
                seen["xi"], seen["sigma_sched"] = xi, sigmas
                return xi
            me.get_sigmas, me.func = get_sigmas, func
            self.kdiffusion(me, p, x, noise, None, None, steps=steps if hires else None)
            n = seen["schedule_steps"]
            t_enc = seen["count"] - 1
            assert len(seen["sigma_sched"]) == t_enc + 2, (len(seen["sigma_sched"]), t_enc)
            seen["first"] = float(seen["sigma_sched"][0])
        return dict(schedule_steps=n, start=n - t_enc - 1, t_enc=t_enc, count=seen["count"],
                    xi=seen["xi"], first=seen["first"], infotext=p.extra_generation_params)


def a1111_img2img_class():
    """diffusers' img2img pipeline over a slice: `begin` set before each call."""
    from diffusers import StableDiffusionImg2ImgPipeline

    class A1111StepsImg2Img(StableDiffusionImg2ImgPipeline):
        begin = 0

        def get_timesteps(self, num_inference_steps, strength, device):
            timesteps = self.scheduler.timesteps[self.begin:]
            if hasattr(self.scheduler, "set_begin_index"):
                self.scheduler.set_begin_index(self.begin)
            return timesteps, len(timesteps)

    return A1111StepsImg2Img
