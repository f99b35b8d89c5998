#!/usr/bin/env python3
"""ControlNet control modes: the sd-webui-controlnet extension's weighting on diffusers' pipeline.

The extension has no torch function to call from outside A1111: its control modes live in
`UnetHook.hook.forward` (sd-webui-controlnet `scripts/hook.py`, the "handle ControlNet /
T2I_Adapter" loop) and `scripts/controlnet.py` (`ControlParams(soft_injection=control_mode !=
BALANCED, cfg_injection=control_mode == CONTROL, global_average_pooling=...)`). This script runs
diffusers' `StableDiffusionControlNetPipeline` on tiny-a-vae8 with the committed tiny ControlNets
(cn-a, cn-b of tools/make_controlnet_fixtures.py) and replaces each ControlNet's `forward` by
the extension's formulas, written from its source (quoted in `extension_forward`): the
ControlNet run at scale 1 on the whole batch, then

    control_scales = [weight] * 13
    if cfg_injection or global_average_pooling: control = [c * cond_mark for c in control]
    if soft_injection: control_scales = [weight * (0.825 ** float(12 - i)) for i in range(13)]
    control = [c * scale for c, scale in zip(control, control_scales)]
    if global_average_pooling: control = [torch.mean(c, dim=(2, 3), keepdim=True) ...]

with `control` the residuals in the extension's order (the skip connections from the top, the
mid block's last, as cldm's `outs`), `weight` diffusers' `conditioning_scale *
controlnet_keep[i]` (the extension's weight inside its guidance window, skipped outside: the
same zeros), and `cond_mark` 1 on the rows of the prompt: diffusers' guided batch is
`[uncond x n, cond x n]`, so 0 on the first half, 1 on the second; without guidance every row.
Several ControlNets (`MultiControlNetModel`) each get their own mode, their residuals summed.

The `pool` case needs no formula: cn-a's folder with `global_pool_conditions: true`, run by
diffusers' own pipeline (which forces `guess_mode`: the ControlNet on the prompt's rows only,
zeros on the others, the residuals averaged over the plane) with `guess_mode` left off, as the
extension marks a pooling ControlNet's rows in every mode.

Writes, under crates/pipeline/tests/fixtures:
  controlnet-modes.safetensors   latents.<case>: the pipeline's final latents (output_type
                                 "latent", before the VAE), [batch, 4, 8, 8] f32
  controlnet-modes.json          the cases (requests, each unit's control_mode)

Pinned: torch 2.11.0, diffusers 0.42.1 (tools/requirements.txt). Runs after
tools/make_controlnet_fixtures.py (reads its ControlNets and control images).
Usage: python3 tools/make_controlnet_mode_fixtures.py
"""

import copy
import json
import os
import shutil
import tempfile

import torch
from PIL import Image

from api_schedulers import make_scheduler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "crates", "pipeline", "tests", "fixtures")
BASE = os.path.join(FIXTURES, "tiny-a-vae8")
NETS = os.path.join(FIXTURES, "controlnet")
IMAGES = os.path.join(FIXTURES, "images")

# The extension's ControlMode values and what ControlParams makes of them.
MODES = {
    "balanced": dict(soft_injection=False, cfg_injection=False),   # "Balanced"
    "prompt": dict(soft_injection=True, cfg_injection=False),      # "My prompt is more important"
    "controlnet": dict(soft_injection=True, cfg_injection=True),   # "ControlNet is more important"
}


def extension_forward(net, pipe, mode):
    """`net.forward` with the extension's weighting of its residuals (scripts/hook.py)."""
    original = net.forward
    flags = MODES[mode]
    global_average_pooling = bool(net.config.global_pool_conditions)
    assert not global_average_pooling, "the pool case runs diffusers' own pipeline"

    def forward(sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale=1.0,
                guess_mode=False, return_dict=True, **kwargs):
        assert not guess_mode
        down, mid = original(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                             controlnet_cond=controlnet_cond, conditioning_scale=1.0,
                             guess_mode=False, return_dict=False, **kwargs)
        control = list(down) + [mid]
        weight = float(conditioning_scale)
        rows = sample.shape[0]
        # cond_mark: diffusers' guided batch is [uncond x n, cond x n].
        cond_mark = torch.ones(rows, 1, 1, 1, dtype=sample.dtype)
        if pipe.do_classifier_free_guidance:
            cond_mark[: rows // 2] = 0
        # hook.py: `control_scales = [param.weight] * 13` (not SDXL)
        control_scales = [weight] * 13
        if flags["cfg_injection"] or global_average_pooling:
            control = [c * cond_mark for c in control]
        if flags["soft_injection"]:
            control_scales = [weight * (0.825 ** float(12 - i)) for i in range(13)]
        control = [c * scale for c, scale in zip(control, control_scales)]
        assert len(control) == len(down) + 1
        return control[:-1], control[-1]

    net.forward = forward


def load_nets(tmp):
    from diffusers import ControlNetModel, UNet2DConditionModel

    nets = {"cn-a": ControlNetModel.from_pretrained(os.path.join(NETS, "cn-a"),
                                                    torch_dtype=torch.float32)}
    # cn-b is committed as the original names only; its config as make_controlnet_fixtures.py
    # made it (from_unet with a (8, 8, 16, 16) hint encoder), written aside for from_single_file.
    unet = UNet2DConditionModel.from_pretrained(os.path.join(BASE, "unet"))
    ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16)).save_config(
        os.path.join(tmp, "cn-b"))
    nets["cn-b"] = ControlNetModel.from_single_file(
        os.path.join(NETS, "cn-b.pth"), config=os.path.join(tmp, "cn-b"), torch_dtype=torch.float32)
    # cn-a with global pooling: its folder, the config's `global_pool_conditions` set (the
    # Rust test makes the same copy).
    pool = os.path.join(tmp, "cn-a-pool")
    shutil.copytree(os.path.join(NETS, "cn-a"), pool)
    with open(os.path.join(pool, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    config["global_pool_conditions"] = True
    with open(os.path.join(pool, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)
    nets["cn-a-pool"] = ControlNetModel.from_pretrained(pool, torch_dtype=torch.float32)
    return {k: v.eval() for k, v in nets.items()}


@torch.no_grad()
def main():
    import diffusers
    from diffusers import StableDiffusionControlNetPipeline
    from safetensors.torch import save_file

    tmp = tempfile.mkdtemp()
    nets = load_nets(tmp)
    images = {n: Image.open(os.path.join(IMAGES, n)).convert("RGB")
              for n in ("control-64.png", "control-b-64.png", "control-80x48.png")}
    base = dict(prompt="a house by a lake, evening", negative_prompt="blurry", steps=8,
                width=64, height=64, seed=77, guidance_scale=7.5)
    tensors, cases = {}, {}

    def unit(model, image, mode, scale=1.0, start=0.0, end=1.0):
        return dict(model=model, image=image, control_mode=mode, scale=scale,
                    guidance_start=start, guidance_end=end)

    def run(label, units, scheduler=None, batch_size=1, **over):
        r = dict(base, **over)
        chosen = []
        for u in units:
            # A fresh copy per unit: its forward is replaced for this run alone.
            chosen.append(copy.deepcopy(nets[u["model"]]))
        pipe = StableDiffusionControlNetPipeline.from_pretrained(
            BASE, controlnet=chosen if len(chosen) > 1 else chosen[0], dtype=torch.float32,
            safety_checker=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        for net, u in zip(chosen, units):
            if u["model"] != "cn-a-pool":
                extension_forward(net, pipe, u["control_mode"])
        if scheduler is not None:
            pipe.scheduler = make_scheduler(scheduler, dict(pipe.scheduler.config))
        multi = len(units) > 1
        pick = (lambda k: [u[k] for u in units]) if multi else (lambda k: units[0][k])
        control = [images[u["image"]] for u in units]
        gens = [torch.Generator("cpu").manual_seed(r["seed"] + i) for i in range(batch_size)]
        latents = pipe(prompt=r["prompt"], negative_prompt=r["negative_prompt"],
                       num_inference_steps=r["steps"], image=control if multi else control[0],
                       guidance_scale=r["guidance_scale"], width=r["width"], height=r["height"],
                       generator=gens if batch_size > 1 else gens[0],
                       num_images_per_prompt=batch_size, output_type="latent",
                       controlnet_conditioning_scale=pick("scale"),
                       control_guidance_start=pick("guidance_start"),
                       control_guidance_end=pick("guidance_end")).images
        tensors[f"latents.{label}"] = latents.float().contiguous()
        cases[label] = dict(r, model="tiny-a-vae8", scheduler=scheduler, batch_size=batch_size,
                            controlnets=units)
        print(f"{label}: latents mean {latents.mean():.4f} std {latents.std():.4f}")

    run("balanced", [unit("cn-a", "control-64.png", "balanced")])
    run("prompt", [unit("cn-a", "control-64.png", "prompt")])
    run("controlnet", [unit("cn-a", "control-64.png", "controlnet", 1.3)], scheduler="euler")
    run("controlnet-batch", [unit("cn-a", "control-80x48.png", "controlnet", 1.2)],
        scheduler="dpmpp_2m", batch_size=2, guidance_scale=5.0)
    run("multi", [unit("cn-a", "control-64.png", "balanced", 0.8),
                  unit("cn-b", "control-b-64.png", "controlnet", 1.0, 0.0, 0.6)],
        scheduler="euler_a")
    run("controlnet-no-cfg", [unit("cn-b", "control-b-64.png", "controlnet", 0.9)],
        scheduler="euler", guidance_scale=1.0)
    run("pool", [unit("cn-a-pool", "control-64.png", "balanced", 1.5)], scheduler="euler")
    shutil.rmtree(tmp)

    # Each mode must move the latents well past float noise, or a test could not tell them.
    for a, b in [("balanced", "prompt"), ("prompt", "controlnet")]:
        d = (tensors[f"latents.{a}"] - tensors[f"latents.{b}"]).abs().max()
        print(f"{a} vs {b}: max abs diff {d:.4f}")
    d = (tensors["latents.balanced"] - tensors["latents.prompt"]).abs().max()
    assert d > 0.01, d

    meta = {
        "generated_by": "tools/make_controlnet_mode_fixtures.py",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
        "latents": "latents.<case>: StableDiffusionControlNetPipeline(output_type='latent'), each "
                   "ControlNet's residuals weighted as the sd-webui-controlnet extension's "
                   "control_mode (scripts/hook.py); cn-a-pool: cn-a with global_pool_conditions",
        "cases": cases,
    }
    save_file(tensors, os.path.join(FIXTURES, "controlnet-modes.safetensors"),
              metadata={"generated_by": "tools/make_controlnet_mode_fixtures.py"})
    with open(os.path.join(FIXTURES, "controlnet-modes.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
