#!/usr/bin/env python3
"""The sd-webui-controlnet extension's reference units (reference_only, reference_adain,
reference_adain+attn) around diffusers' StableDiffusionPipeline.

The extension's lines (scripts/hook.py) are written out here on diffusers' modules:
- `hacked_basic_transformer_inner_forward`: every BasicTransformerBlock's self-attention
  (`attn1`, given `norm1(x)`): in "write" mode the normed input is banked where the unit's
  weight is above the block's `attn_weight`; in "read" mode, with a bank, the attention runs
  over cat([x_norm1] + bank) and the negative prompt's rows are mixed with the plain attention
  by the mean banked style fidelity; reading empties the bank.
- `hacked_group_norm_forward` on ldm's middle block, input blocks 4, 5, 7, 8, 10, 11 and
  output blocks 0..7 (their outputs: var_mean over H, W; AdaIN to the banked mean / variance,
  eps 1e-6; the negative prompt's rows mixed back as above). An ldm input block is a diffusers
  down block's resnet with its attention (or its downsampler), an output block an up block's
  resnet with its attention and, last in the block, the upsampler: the hook sits on the last
  module of each.
- the weights: transformer blocks sorted by -width (stable, ldm's module order: input,
  middle, output), attn_weight = i / n; gn_weight: middle 0, input 1 - w / 6, output w / 8,
  all times 2.
- forward_webui's "Handle attention and AdaIn control", before every UNet evaluation: banks
  cleared; for each unit inside its guidance window, `ref_xt = predict_q_sample(latents,
  round(t))` (ldm's sqrt_alphas_cumprod from the float64 betas) and one UNet run with the
  evaluation's prompts in write mode (attention for reference_only / +attn, GroupNorm for
  reference_adain / +attn, weight = the unit's weight); style fidelity = clamp(threshold_a),
  1 for "ControlNet is more important" (cfg_injection), 0 for "My prompt is more important"
  (soft_injection); then the evaluation itself in read mode.

The latents are the VAE distribution's mean times the scaling factor (the extension samples
them from torch's global generator). predict_q_sample's noise is torch.randn_like there: torch's
global generator, a stream apart from the sampler's (A1111 draws the sampler's noise from each
image's own generator, ImageRNG), so a reference unit moves no draw of the sampler. Here each
image has a generator of its own for it, seeded with the image's seed + 2^31 at the start of
the run, drawing `randn([rows of the image, c, h, w], generator=ref_gens[i])` at each
evaluation for rows i, i + n, ..., images in order; sdserve draws the same
(REFERENCE_SEED_OFFSET). The pipeline's generators draw only the sampler's noise: a unit at
weight 0 (its pass banks nothing) gives the image without the unit, checked here on euler_a.

The UNet: tiny-ref, a random SD 1.5-shaped UNet (4 levels, 2 layers a block, cross-attention in
the first three: the ldm block indices the extension fixes exist) with tiny-a's text encoder,
tokenizer, VAE and scheduler, written to crates/pipeline/tests/fixtures/tiny-ref; tiny-ref-inpaint
the same with a 9-channel UNet, run as A1111 runs an inpainting model in txt2img (diffusers'
StableDiffusionInpaintPipeline with a white mask at strength 1: a mask of ones and zeros for
the masked image), its reference passes fed the noised latents, a zero mask and the latents (the
extension's Inpaint Hijack). The hires fix as sdserve runs it on its default step rule: the
first pass decoded and truncated to 8 bits (A1111), resized (Nearest), then diffusers' img2img
at the larger size with the generators seeded again; each pass with the units its hr_option
names, the second at style fidelity 0 (the extension's is_in_high_res_fix), the unit's image
resized to the pass's size (PIL Lanczos).

Writes crates/pipeline/tests/fixtures/reference.{safetensors,json}: image.<case> [batch, H, W,
3] u8 = round(output_type 'np' * 255); plain.<case> the same run without the unit (asserted
here to differ by several levels on average).
Reads images/cn-init-64.png and images/control-b-64.png (the reference images).

Pinned: torch 2.11.0, diffusers 0.42.1 (tools/requirements.txt).
Usage: python3 tools/make_reference_fixtures.py
"""

import json
import math
import os
import shutil
import sys

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from api_schedulers import make_scheduler  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "crates", "pipeline", "tests", "fixtures")
BASE = os.path.join(FIXTURES, "tiny-a")
MODEL = os.path.join(FIXTURES, "tiny-ref")
INPAINT_MODEL = os.path.join(FIXTURES, "tiny-ref-inpaint")

INPUT_BLOCKS = [4, 5, 7, 8, 10, 11]
# What the seed of an image's reference-noise generator adds to the image's seed.
REFERENCE_SEED_OFFSET = 2**31
OUTPUT_BLOCKS = [0, 1, 2, 3, 4, 5, 6, 7]


@torch.no_grad()
def make_model(path, in_channels, seed):
    from diffusers import UNet2DConditionModel

    os.makedirs(path, exist_ok=True)
    for part in ("text_encoder", "tokenizer", "vae", "scheduler"):
        shutil.rmtree(os.path.join(path, part), ignore_errors=True)
        shutil.copytree(os.path.join(BASE, part), os.path.join(path, part))
    shutil.copy(os.path.join(BASE, "model_index.json"), path)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=in_channels, out_channels=4, layers_per_block=2,
        block_out_channels=(16, 16, 32, 32), norm_num_groups=8, cross_attention_dim=32,
        attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    # Sharper self-attentions with a larger share of the residual stream, and larger block
    # statistics, so that what the hooks change (the attended tokens, the blocks' statistics)
    # moves pixels clearly in a model this small.
    for name, m in unet.named_modules():
        if name.endswith("attn1"):
            m.to_q.weight.mul_(4.0)
            m.to_k.weight.mul_(4.0)
            m.to_out[0].weight.mul_(4.0)
    # As make_tiny_models.py: conv_out rescaled so unit-variance latents give a unit-variance
    # prediction (the default init's is tiny and the images flat).
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(2, in_channels, 16, 16, generator=g)
    ctx = torch.randn(2, 77, 32, generator=g)
    s = float(unet(x, torch.tensor([900.0, 100.0]), encoder_hidden_states=ctx).sample.std())
    assert math.isfinite(s) and s > 0
    unet.conv_out.weight.mul_(1.0 / s)
    unet.conv_out.bias.mul_(1.0 / s)
    unet.save_pretrained(os.path.join(path, "unet"), safe_serialization=True)


class Hooks:
    """The extension's hook state (UnetHook's attention / gn auto machines) on a diffusers
    UNet."""

    def __init__(self, unet):
        self.attention_write = False
        self.attention_weight = 1.0
        self.gn_write = False
        self.gn_weight = 1.0
        self.fidelity = 0.0
        self.uc = []
        blocks = [m for part in (unet.down_blocks, unet.mid_block, unet.up_blocks)
                  for m in part.modules()
                  if type(m).__name__ == "BasicTransformerBlock"]
        blocks = sorted(blocks, key=lambda b: -b.norm1.normalized_shape[0])
        for i, b in enumerate(blocks):
            self.hook_attention(b, float(i) / float(len(blocks)))
        self.attn_modules = blocks

        inputs = []
        n = len(unet.down_blocks)
        for level, block in enumerate(unet.down_blocks):
            for j, resnet in enumerate(block.resnets):
                attentions = getattr(block, "attentions", None)
                inputs.append(attentions[j] if attentions is not None else resnet)
            if block.downsamplers is not None:
                inputs.append(block.downsamplers[0])
        outputs = []
        for block in unet.up_blocks:
            last = len(block.resnets) - 1
            for j, resnet in enumerate(block.resnets):
                attentions = getattr(block, "attentions", None)
                if j == last and block.upsamplers is not None:
                    outputs.append(block.upsamplers[0])
                elif attentions is not None:
                    outputs.append(attentions[j])
                else:
                    outputs.append(resnet)
        assert n == 4
        gn = [(unet.mid_block, 0.0)]
        for w, i in enumerate(INPUT_BLOCKS):
            gn.append((inputs[i - 1], 1.0 - float(w) / float(len(INPUT_BLOCKS))))  # [0]: conv_in
        for w, i in enumerate(OUTPUT_BLOCKS):
            gn.append((outputs[i], float(w) / float(len(OUTPUT_BLOCKS))))
        self.gn_modules = []
        for module, weight in gn:
            self.hook_gn(module, weight * 2)
            self.gn_modules.append(module)

    def clear(self):
        for m in self.attn_modules:
            m.bank, m.style_cfgs = [], []
        for m in self.gn_modules:
            m.mean_bank, m.var_bank, m.style_cfgs = [], [], []

    def hook_attention(self, block, weight):
        hooks = self
        block.attn_weight = weight
        block.bank, block.style_cfgs = [], []
        attn1 = block.attn1
        original = attn1.forward

        def forward(hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
            assert encoder_hidden_states is None
            x_norm1 = hidden_states
            self_attn1 = None
            self_attention_context = x_norm1
            if hooks.attention_write:
                if hooks.attention_weight > block.attn_weight:
                    block.bank.append(self_attention_context.detach().clone())
                    block.style_cfgs.append(hooks.fidelity)
            else:
                if len(block.bank) > 0:
                    style_cfg = sum(block.style_cfgs) / float(len(block.style_cfgs))
                    self_attn1_uc = original(x_norm1, encoder_hidden_states=torch.cat(
                        [self_attention_context] + block.bank, dim=1))
                    self_attn1_c = self_attn1_uc.clone()
                    if len(hooks.uc) > 0 and style_cfg > 1e-5:
                        self_attn1_c[hooks.uc] = original(
                            x_norm1[hooks.uc],
                            encoder_hidden_states=self_attention_context[hooks.uc])
                    self_attn1 = style_cfg * self_attn1_c + (1.0 - style_cfg) * self_attn1_uc
                block.bank, block.style_cfgs = [], []
            if self_attn1 is None:
                self_attn1 = original(x_norm1)
            return self_attn1

        attn1.forward = forward

    def hook_gn(self, module, weight):
        hooks = self
        module.gn_weight = weight
        module.mean_bank, module.var_bank, module.style_cfgs = [], [], []

        def hook(mod, args, out):
            x = out[0] if isinstance(out, tuple) else out
            eps = 1e-6
            y = None
            if hooks.gn_write:
                if hooks.gn_weight > mod.gn_weight:
                    var, mean = torch.var_mean(x, dim=(2, 3), keepdim=True, correction=0)
                    mod.mean_bank.append(mean)
                    mod.var_bank.append(var)
                    mod.style_cfgs.append(hooks.fidelity)
            else:
                if len(mod.mean_bank) > 0 and len(mod.var_bank) > 0:
                    style_cfg = sum(mod.style_cfgs) / float(len(mod.style_cfgs))
                    var, mean = torch.var_mean(x, dim=(2, 3), keepdim=True, correction=0)
                    std = torch.maximum(var, torch.zeros_like(var) + eps) ** 0.5
                    mean_acc = sum(mod.mean_bank) / float(len(mod.mean_bank))
                    var_acc = sum(mod.var_bank) / float(len(mod.var_bank))
                    std_acc = torch.maximum(var_acc, torch.zeros_like(var_acc) + eps) ** 0.5
                    y_uc = (((x - mean) / std) * std_acc) + mean_acc
                    y_c = y_uc.clone()
                    if len(hooks.uc) > 0 and style_cfg > 1e-5:
                        y_c[hooks.uc] = x.to(y_c.dtype)[hooks.uc]
                    y = style_cfg * y_c + (1.0 - style_cfg) * y_uc
                mod.mean_bank, mod.var_bank, mod.style_cfgs = [], [], []
            if y is None:
                return out
            return (y,) + tuple(out[1:]) if isinstance(out, tuple) else y

        module.register_forward_hook(hook)


def ldm_schedule(config):
    """ldm's register_schedule: sqrt(ac) and sqrt(1 - ac) from float64 betas, as float32."""
    assert config["beta_schedule"] == "scaled_linear"
    n = config["num_train_timesteps"]
    betas = (torch.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, n,
                            dtype=torch.float64) ** 2).numpy()
    ac = np.cumprod(1.0 - betas, axis=0)
    return (torch.from_numpy(np.sqrt(ac)).float(), torch.from_numpy(np.sqrt(1.0 - ac)).float())


def in_window(i, steps, start, end):
    return not (i / steps < start or (i + 1) / steps > end)


@torch.no_grad()
def main():
    import diffusers
    from diffusers import (StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline,
                           StableDiffusionPipeline)
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    make_model(MODEL, 4, 4321)
    make_model(INPAINT_MODEL, 9, 4331)
    pipe = StableDiffusionPipeline.from_pretrained(
        MODEL, dtype=torch.float32, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    inpaint = StableDiffusionInpaintPipeline.from_pretrained(
        INPAINT_MODEL, dtype=torch.float32, safety_checker=None, requires_safety_checker=False)
    inpaint.set_progress_bar_config(disable=True)
    own = dict(pipe.scheduler.config)
    sqrt_ac, sqrt_1m_ac = ldm_schedule(own)
    hooks = {id(p): Hooks(p.unet) for p in (pipe, inpaint)}
    sf = pipe.vae.config.scaling_factor

    known = {}

    def latents_of(name, size):
        """The image's latents at a pass's size (PIL Lanczos, as sdserve resizes it)."""
        if (name, size) not in known:
            ref = Image.open(os.path.join(FIXTURES, "images", name)).convert("RGB")
            if ref.size != size:
                ref = ref.resize(size, Image.Resampling.LANCZOS)
            x = torch.from_numpy(np.asarray(ref).astype(np.float32).transpose(2, 0, 1) / 255.0)
            known[(name, size)] = pipe.vae.encode(x[None] * 2.0 - 1.0).latent_dist.mean * sf
        return known[(name, size)]

    ref_name = "cn-init-64.png"
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)

    def hooked(p, units, seeds, steps, cfg, hijack=True, hires=False):
        """The UNet's forward with the extension's reference passes (`hires`: the hires fix's
        second pass, where the style fidelity is 0 unless in "ControlNet is more important")."""
        hooks_of, original_forward = hooks[id(p)], p.unet.forward
        calls = [0]
        ref_gens = [torch.Generator("cpu").manual_seed(s + REFERENCE_SEED_OFFSET) for s in seeds]

        def forward(sample, timestep, encoder_hidden_states, *a, **kw):
            hooks_of.clear()
            rows = sample.shape[0]
            hooks_of.uc = list(range(rows // 2)) if cfg else []
            step = calls[0]
            calls[0] += 1
            for u in units:
                if not in_window(step, steps, u["guidance_start"], u["guidance_end"]):
                    continue
                t = torch.round(torch.as_tensor(timestep).float()).long()
                size = (sample.shape[3] * factor, sample.shape[2] * factor)
                x0 = latents_of(u.get("image", ref_name), size).expand(rows, -1, -1, -1)
                n = len(ref_gens)
                c, h, w = x0.shape[1:]
                noise = torch.zeros(rows, c, h, w)
                for i, g in enumerate(ref_gens):
                    drawn = torch.randn(rows // n, c, h, w, generator=g)
                    for k in range(rows // n):
                        noise[i + k * n] = drawn[k]
                ref_xt = sqrt_ac[t] * x0 + sqrt_1m_ac[t] * noise
                if sample.shape[1] == 2 * c + 1:
                    # The extension's Inpaint Hijack (hijack=False: the evaluation's own
                    # mask and masked-image channels, to show that the hijack matters).
                    extra = [torch.zeros(rows, 1, h, w), x0] if hijack else [sample[:, c:]]
                    ref_xt = torch.cat([ref_xt] + extra, dim=1)
                fidelity = max(0.0, min(1.0, u["style_fidelity"]))
                if u["control_mode"] == "controlnet":
                    fidelity = 1.0
                elif u["control_mode"] == "prompt" or hires:
                    fidelity = 0.0
                hooks_of.fidelity = fidelity
                if u["module"] in ("reference_only", "reference_adain+attn"):
                    hooks_of.attention_write = True
                    hooks_of.attention_weight = u["weight"]
                if u["module"] in ("reference_adain", "reference_adain+attn"):
                    hooks_of.gn_write = True
                    hooks_of.gn_weight = u["weight"]
                original_forward(ref_xt, timestep, encoder_hidden_states, *a, **kw)
                hooks_of.attention_write = False
                hooks_of.gn_write = False
            return original_forward(sample, timestep, encoder_hidden_states, *a, **kw)

        return forward

    base = dict(prompt="a house by a lake, evening", negative_prompt="blurry", steps=8,
                width=64, height=64, seed=77, guidance_scale=7.5)
    tensors, cases = {}, {}

    white = Image.new("L", (base["width"], base["height"]), 255)

    def generate(units, scheduler, batch_size, r, model="tiny-ref", hijack=True):
        p = inpaint if model == "tiny-ref-inpaint" else pipe
        p.scheduler = make_scheduler(scheduler, own)
        seeds = [r["seed"] + i for i in range(batch_size)]
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        original_forward = p.unet.forward
        p.unet.forward = hooked(p, units, seeds, r["steps"], r["guidance_scale"] > 1.0, hijack)
        # An inpainting model runs text-to-image as A1111 runs it: a mask of ones, the masked
        # image zeros (tools/make_unmasked_inpainting_fixtures.py), strength 1.
        extra = dict(image=Image.open(os.path.join(FIXTURES, "images", ref_name)),
                     mask_image=white, strength=1.0) if p is inpaint else {}
        images = p(prompt=r["prompt"], negative_prompt=r["negative_prompt"],
                   num_inference_steps=r["steps"], guidance_scale=r["guidance_scale"],
                   width=r["width"], height=r["height"],
                   generator=gens if batch_size > 1 else gens[0],
                   num_images_per_prompt=batch_size, output_type="np", **extra).images
        p.unet.forward = original_forward
        return torch.from_numpy((images * 255).round().astype("uint8"))

    i2i = StableDiffusionImg2ImgPipeline(**pipe.components)
    i2i.set_progress_bar_config(disable=True)

    def generate_hires(units, scheduler, r, hires, hires_fidelity_zero=True):
        """sdserve's hires fix (its default step rule): the first pass, decoded and truncated
        to 8 bits as A1111 does, resized (Nearest), then img2img of it at the larger size with
        the generator seeded again; each pass with the units its hr_option names, the reference
        noise's generators seeded again too."""
        steers = {False: [u for u in units if u.get("hr_option", "both") != "high_res_only"],
                  True: [u for u in units if u.get("hr_option", "both") != "low_res_only"]}
        seeds = [r["seed"]]
        cfg = r["guidance_scale"] > 1.0
        original_forward = pipe.unet.forward
        pipe.scheduler = make_scheduler(scheduler, own)
        pipe.unet.forward = hooked(pipe, steers[False], seeds, r["steps"], cfg)
        first = pipe(prompt=r["prompt"], negative_prompt=r["negative_prompt"],
                     num_inference_steps=r["steps"], guidance_scale=r["guidance_scale"],
                     width=r["width"], height=r["height"],
                     generator=torch.Generator("cpu").manual_seed(r["seed"]),
                     output_type="latent").images
        pipe.unet.forward = original_forward
        x = pipe.vae.decode(first / sf).sample[0]
        u8 = (255.0 * ((x + 1.0) / 2.0).clamp(0.0, 1.0)).to(torch.uint8)
        low = Image.fromarray(u8.permute(1, 2, 0).numpy())
        assert hires["upscaler"] == "nearest"
        up = low.resize((hires["width"], hires["height"]), Image.Resampling.NEAREST)
        i2i.scheduler = make_scheduler(scheduler, own)
        pipe.unet.forward = hooked(pipe, steers[True], seeds, hires["steps"], cfg,
                                   hires=hires_fidelity_zero)
        images = i2i(prompt=r["prompt"], negative_prompt=r["negative_prompt"], image=up,
                     strength=hires["strength"], num_inference_steps=hires["steps"],
                     guidance_scale=r["guidance_scale"],
                     generator=torch.Generator("cpu").manual_seed(r["seed"]),
                     output_type="np").images
        pipe.unet.forward = original_forward
        return torch.from_numpy((images * 255).round().astype("uint8"))

    def run_hires(label, units, scheduler, hires):
        out = {}
        for kind, us in (("image", units), ("plain", [])):
            out[kind] = generate_hires(us, scheduler, base, hires)
            tensors[f"{kind}.{label}"] = out[kind]
        cases[label] = dict(base, model="tiny-ref", scheduler=scheduler, batch_size=1,
                            hires=hires,
                            references=[dict(u, image=u.get("image", ref_name)) for u in units])
        d = (out["image"].float() - out["plain"].float()).abs().mean()
        print(f"{label}: mean {out['image'].float().mean():.1f}, vs no reference {d:.1f}")
        assert d > 3, (label, d)
        return out["image"]

    def run(label, units, scheduler, batch_size=1, model="tiny-ref", **over):
        r = dict(base, **over)
        out = {}
        for kind, us in (("image", units), ("plain", [])):
            out[kind] = generate(us, scheduler, batch_size, r, model)
            tensors[f"{kind}.{label}"] = out[kind]
        cases[label] = dict(r, model=model, scheduler=scheduler, batch_size=batch_size,
                            references=[dict(u, image=u.get("image", ref_name)) for u in units])
        d = (out["image"].float() - out["plain"].float()).abs().mean()
        print(f"{label}: mean {out['image'].float().mean():.1f}, vs no reference {d:.1f}")
        assert d > 3, (label, d)
        return out["image"]

    def unit(module, weight=1.0, fidelity=0.5, start=0.0, end=1.0, mode="balanced"):
        return dict(module=module, weight=weight, style_fidelity=fidelity, guidance_start=start,
                    guidance_end=end, control_mode=mode)

    def run_second(u):
        return generate([u], "euler", 1, base)

    only = run("only", [unit("reference_only")], "euler")
    if os.environ.get("REF_QUICK"):
        run("adain", [unit("reference_adain")], "dpmpp_2m")
        return
    adain = run("adain", [unit("reference_adain")], "dpmpp_2m")
    both = run("adain_attn", [unit("reference_adain+attn")], "euler")
    light = run("adain_attn_weight_half", [unit("reference_adain+attn", weight=0.5)], "euler")
    # The first steps carry the reference on this model (a window from step 2 of 8 on changes
    # the image by 1.8 levels, one closing at half of it by 0.2 against the whole window): a
    # window without the first step, and one of the first step only, each many levels from
    # the whole window's image and from the image without the unit.
    whole = run("adain_attn_dpmpp", [unit("reference_adain+attn")], "dpmpp_2m")
    late = run("adain_attn_window_late", [unit("reference_adain+attn", start=0.125)],
               "dpmpp_2m")
    early = run("adain_attn_window_early", [unit("reference_adain+attn", end=0.125)],
                "dpmpp_2m")
    prompt = run("only_prompt_mode", [unit("reference_only", mode="prompt")], "euler")
    control = run("only_controlnet_mode",
                  [unit("reference_only", mode="controlnet")], "euler")
    batch = [unit("reference_adain+attn", weight=0.8, fidelity=0.3)]
    run("adain_attn_batch", batch, "euler_a", batch_size=2, guidance_scale=5.0)
    # Two units, each with its image: both banks are read (the attention over both units'
    # tokens, AdaIN to the mean of both statistics).
    second = unit("reference_adain", weight=0.8, fidelity=0.3)
    second["image"] = "control-b-64.png"
    two = run("two_units", [unit("reference_only"), second], "euler")
    # A unit at weight 0 runs its pass (drawing its noise) and banks nothing: the sampler's
    # draws (euler_a's ancestral noise) are those of the request without it, bit for bit.
    r = dict(base, guidance_scale=5.0)
    zero = generate([dict(batch[0], weight=0.0)], "euler_a", 2, r)
    assert torch.equal(zero, generate([], "euler_a", 2, r)), "weight 0 moved the image"
    # An inpainting UNet: the reference pass sees the noised latents, a zero mask and the
    # latents; with the evaluation's own mask and masked image instead the image moves.
    hijacked = run("only_inpainting", [unit("reference_only")], "euler",
                   model="tiny-ref-inpaint")
    naive = generate([unit("reference_only")], "euler", 1, base, "tiny-ref-inpaint", False)
    # The hires fix: a unit in both passes (the second at style fidelity 0, with the image
    # resized to its size), and one in the second pass alone.
    hires = dict(width=128, height=128, upscaler="nearest", steps=6, strength=0.5)
    both_passes = [unit("reference_adain+attn")]
    in_both = run_hires("hires_adain_attn", both_passes, "euler", hires)
    at_fidelity = generate_hires(both_passes, "euler", base, hires, hires_fidelity_zero=False)
    high_only = run_hires("hires_only_high_res",
                          [dict(unit("reference_only"), hr_option="high_res_only")], "euler",
                          hires)
    # The mechanisms the tests lean on change the image: the uc rows' mixing and the weight.
    for a, b, what in ((only, prompt, "fidelity 0.5 vs 0"), (only, control, "0.5 vs 1"),
                       (both, light, "weight 1 vs 0.5"), (only, both, "attn vs adain+attn"),
                       (whole, late, "window without step 0"),
                       (whole, early, "window of step 0"), (two, only, "two units vs the first"),
                       (two, run_second(second), "two units vs the second"),
                       (hijacked, naive, "inpaint hijack vs the evaluation's channels"),
                       (in_both, at_fidelity, "hires pass at fidelity 0 vs 0.5"),
                       (in_both, high_only, "hires: both passes vs the second")):
        d = (a.float() - b.float()).abs().mean()
        print(f"{what}: {d:.1f}")
        assert d > 2, (what, d)
    del adain
    meta = {
        "generated_by": "tools/make_reference_fixtures.py",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
        "images": "image.<case>: [batch, H, W, 3] u8 with the reference units; plain.<case>: "
                  "the same without them",
        "cases": cases,
    }
    save_file({k: v.contiguous() for k, v in tensors.items()},
              os.path.join(FIXTURES, "reference.safetensors"),
              metadata={"generated_by": "tools/make_reference_fixtures.py"})
    with open(os.path.join(FIXTURES, "reference.json"), "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=1)
        fh.write("\n")


if __name__ == "__main__":
    main()
