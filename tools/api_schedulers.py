"""The API's scheduler names and the diffusers scheduler each one means: class name and the extra
`from_config` arguments over the model's own scheduler config, and SD 1.5's own scheduler config.
Shared by the reference scripts (make_tiny_models.py, make_scheduler_fixtures.py,
make_multistep_fixtures.py) and the GPU comparison (bench_diffusers_gpu.py)."""

# stable-diffusion-v1-5/stable-diffusion-v1-5 scheduler/scheduler_config.json, verbatim keys: keys
# absent here (timestep_spacing, prediction_type) must stay absent. Copy it before changing it.
SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

# API name -> (class name, from_config overrides). The name decides the sigma schedule: every class
# with `use_karras_sigmas` gets it set, False for the plain name (so `euler` stays uniform on a model
# whose own file asks for Karras sigmas), True for `<name>_karras`.
SCHEDULERS = {
    "pndm": ("PNDMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {"use_karras_sigmas": False}),
    "euler_karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "euler_a_karras": ("EulerAncestralKarras", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": False}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpmpp_2m_sde": (
        "DPMSolverMultistepScheduler",
        {"use_karras_sigmas": False, "algorithm_type": "sde-dpmsolver++"},
    ),
    "dpmpp_2m_sde_karras": (
        "DPMSolverMultistepScheduler",
        {"use_karras_sigmas": True, "algorithm_type": "sde-dpmsolver++"},
    ),
    "dpmpp_2m_sde_heun": (
        "DPMSolverMultistepScheduler",
        {"use_karras_sigmas": False, "algorithm_type": "sde-dpmsolver++", "solver_type": "heun"},
    ),
    "dpmpp_2m_sde_heun_karras": (
        "DPMSolverMultistepScheduler",
        {"use_karras_sigmas": True, "algorithm_type": "sde-dpmsolver++", "solver_type": "heun"},
    ),
    "lms": ("LMSDiscreteScheduler", {"use_karras_sigmas": False}),
    "lms_karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {"use_karras_sigmas": False}),
    "unipc_karras": ("UniPCMultistepScheduler", {"use_karras_sigmas": True}),
    "heun": ("HeunDiscreteScheduler", {"use_karras_sigmas": False}),
    "heun_karras": ("HeunDiscreteScheduler", {"use_karras_sigmas": True}),
    "dpm2": ("KDPM2DiscreteScheduler", {"use_karras_sigmas": False}),
    "dpm2_karras": ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True}),
    "dpm2_a": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": False}),
    "dpm2_a_karras": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}),
    "lcm": ("LCMScheduler", {}),
}

# DPM++ SDE (A1111's `DPM++ SDE`): DPMSolverSDEScheduler draws its noise from a Brownian tree that
# diffusers seeds from the config's `noise_sampler_seed` (random when unset); we seed one tree per
# image with that image's seed (as A1111 does), so a reference must pass the images' seeds
# (`make_brownian_scheduler`, tools/make_sde_fixtures.py). Kept out of SCHEDULERS, whose users build
# schedulers without seeds.
BROWNIAN = {
    "dpmpp_sde": ("DPMSolverSDEScheduler", {"use_karras_sigmas": False}),
    "dpmpp_sde_karras": ("DPMSolverSDEScheduler", {"use_karras_sigmas": True}),
}

# The names of the first API, which the tiny models' and img2img references cover
# (make_tiny_models.py, make_img2img_fixtures.py); the later ones have references of their own.
FIRST_NAMES = ["pndm", "ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "lms", "unipc"]

# The names whose `step` draws noise from the pipeline's generator(s).
STOCHASTIC = {
    "euler_a", "euler_a_karras", "dpmpp_2m_sde", "dpmpp_2m_sde_karras", "dpmpp_2m_sde_heun",
    "dpmpp_2m_sde_heun_karras", "dpm2_a", "dpm2_a_karras", "lcm",
}


def scheduler_class(class_name):
    """The class a SCHEDULERS entry names: a diffusers class, or one defined here."""
    import diffusers

    if class_name == "EulerAncestralKarras":
        return _euler_ancestral_karras()
    return getattr(diffusers, class_name)


def make_brownian_scheduler(name, config, seeds):
    """A BROWNIAN name with one tree per image: `seeds` is the images' seeds (an int for one)."""
    import diffusers

    class_name, overrides = BROWNIAN[name]
    return getattr(diffusers, class_name).from_config(config, **overrides, noise_sampler_seed=seeds)


def make_scheduler(name, config):
    """`Class.from_config(config, **overrides)` for an API name."""
    class_name, overrides = SCHEDULERS[name]
    return scheduler_class(class_name).from_config(config, **overrides)


def _euler_ancestral_karras():
    """A1111's `Euler a` + `Karras` (k-diffusion's sample_euler_ancestral on get_sigmas_karras).
    diffusers 0.42.1's EulerAncestralDiscreteScheduler has no `use_karras_sigmas`, so this runs its
    own `step` on the Karras schedule (timesteps and sigmas) that EulerDiscreteScheduler computes
    from the same config with use_karras_sigmas=True."""
    from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

    class EulerAncestralKarras(EulerAncestralDiscreteScheduler):
        def set_timesteps(self, num_inference_steps, device=None):
            super().set_timesteps(num_inference_steps, device=device)
            karras = EulerDiscreteScheduler.from_config(self.config, use_karras_sigmas=True)
            karras.set_timesteps(num_inference_steps, device=device)
            self.timesteps = karras.timesteps
            self.sigmas = karras.sigmas.to(self.sigmas.dtype)

    return EulerAncestralKarras
