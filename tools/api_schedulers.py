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

SCHEDULERS = {
    "pndm": ("PNDMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
