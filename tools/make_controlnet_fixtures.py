#!/usr/bin/env python3
"""ControlNet fixtures: tiny ControlNets for tiny-a-vae8 and diffusers' references.

Two ControlNets are made with `ControlNetModel.from_unet(tiny-a-vae8's UNet)` (so every config
key comes from the UNet's config, as for a real SD 1.5 ControlNet), their zero convolutions
(`controlnet_down_blocks`, `controlnet_mid_block`, `controlnet_cond_embedding.conv_out`)
re-initialised with random values: a fresh ControlNet's residuals are all zero, and a test on
them would pass with the residuals dropped. Weights are rounded to fp16 and stored as fp16
(half the bytes); both sides compute in f32 from the same values.

  cn-a   conditioning embedding (16, 32, 96, 256) (diffusers' default, SD 1.5's), seed 6100
  cn-b   conditioning embedding (8, 8, 16, 16), seed 6200
  cn-i   for tiny-inpaint's 9-channel UNet, taking the 4 latent channels (as SD 1.5's
         ControlNets with an inpainting checkpoint); conditioning embedding (8, 16), seed 6400

tiny-a-vae8's VAE has factor 8, as SD 1.5's: the conditioning embedding's three stride-2
convolutions bring a 64x64 control image to the 8x8 latents.

Writes, under crates/pipeline/tests/fixtures:
  controlnet/cn-a/                     diffusers folder (config.json, fp16 safetensors)
  controlnet/cn-a-ldm.safetensors      cn-a with the original ControlNet's (LDM) key names under
                                       `control_model.`, as `control_v11p_sd15_canny.safetensors`
  controlnet/cn-b.pth                  cn-b as a torch.save pickle of LDM names, no prefix
  controlnet-inpaint/cn-i/             cn-i, diffusers folder
  controlnet-inpaint/cn-i-ldm.safetensors  cn-i with LDM names, no prefix (not read back by
                                       diffusers: its converter takes six hint blocks only)
  images/control-*.png                 control images
  controlnet.safetensors               model.<name>.*: inputs, ControlNet residuals and the UNet
                                       output with them; image.<case>: [batch, H, W, 3] u8
  controlnet.json                      the cases (requests) and what each tensor is

Each LDM file is loaded back by diffusers' `ControlNetModel.from_single_file` (config: the
diffusers folder) and checked equal to the model it was written from, so the key names are
diffusers' reading of the original format. Images: `StableDiffusionControlNetPipeline` (one
ControlNet, or a list: `MultiControlNetModel`), its Img2Img and Inpaint pipelines (4- and
9-channel UNets), output_type "np", u8 = round(x * 255).

Pinned: torch 2.11.0, diffusers 0.42.1 (tools/requirements.txt). Runs after
tools/make_tiny_a_vae8.py and tools/make_tiny_models.py (reads tiny-a-vae8/, tiny-inpaint/).
Usage: python3 tools/make_controlnet_fixtures.py
"""

import json
import os
import shutil

import numpy as np
import torch
from PIL import Image, ImageFilter

from api_schedulers import make_scheduler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "crates", "pipeline", "tests", "fixtures")
BASE = os.path.join(FIXTURES, "tiny-a-vae8")
OUT = os.path.join(FIXTURES, "controlnet")
INPAINT = os.path.join(FIXTURES, "tiny-inpaint")
OUT_INPAINT = os.path.join(FIXTURES, "controlnet-inpaint")

NETS = {
    "cn-a": dict(seed=6100, channels=(16, 32, 96, 256)),
    "cn-b": dict(seed=6200, channels=(8, 8, 16, 16)),
}
# cn-i: for tiny-inpaint's 9-channel UNet (VAE factor 2: one stride-2 step in the hint encoder).
LATENT_NET = dict(seed=6400, channels=(8, 16))

RESNET = [("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("norm2.", "out_layers.0."),
          ("conv2.", "out_layers.3."), ("time_emb_proj.", "emb_layers.1."),
          ("conv_shortcut.", "skip_connection.")]


def resnet_ldm(rest):
    for d, l in RESNET:
        if rest.startswith(d):
            return l + rest[len(d):]
    raise KeyError(rest)


def ldm_key(k, layers, hint_blocks):
    """diffusers ControlNetModel key -> the original ControlNet's (cldm.py) key."""
    simple = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
              "conv_in.": "input_blocks.0.0.", "controlnet_mid_block.": "middle_block_out.0.",
              "controlnet_cond_embedding.conv_in.": "input_hint_block.0.",
              "controlnet_cond_embedding.conv_out.": f"input_hint_block.{2 * (hint_blocks + 1)}."}
    for d, l in simple.items():
        if k.startswith(d):
            return l + k[len(d):]
    p = k.split(".")
    if p[0] == "controlnet_cond_embedding" and p[1] == "blocks":
        return f"input_hint_block.{2 * (int(p[2]) + 1)}." + ".".join(p[3:])
    if p[0] == "controlnet_down_blocks":
        return f"zero_convs.{p[1]}.0." + ".".join(p[2:])
    if p[0] == "down_blocks":
        b = int(p[1])
        rest = ".".join(p[4:])
        if p[2] == "downsamplers":
            return f"input_blocks.{1 + b * (layers + 1) + layers}.0.op." + ".".join(p[5:])
        i = 1 + b * (layers + 1) + int(p[3])
        if p[2] == "resnets":
            return f"input_blocks.{i}.0." + resnet_ldm(rest)
        return f"input_blocks.{i}.1." + rest
    if p[0] == "mid_block":
        rest = ".".join(p[3:])
        if p[1] == "attentions":
            return "middle_block.1." + rest
        return f"middle_block.{2 * int(p[2])}." + resnet_ldm(rest)
    raise KeyError(k)


def control_image(width, height, seed):
    """Edge-map-like: white strokes and a ring on black, with a faint colour gradient."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    img = np.zeros((height, width, 3))
    img[..., 0] = 40 * x / max(width - 1, 1)
    img[..., 2] = 40 * y / max(height - 1, 1)
    r = np.hypot(x - width * 0.55, y - height * 0.45)
    ring = np.abs(r - min(width, height) * 0.3) < 1.5
    img[ring] = 255
    for _ in range(4):
        x0, y0, x1, y1 = rng.uniform(0, 1, 4) * [width, height, width, height]
        for t in np.linspace(0, 1, 4 * (width + height)):
            xi, yi = int(x0 + t * (x1 - x0)), int(y0 + t * (y1 - y0))
            img[yi, xi] = 255
    return Image.fromarray(np.clip(np.round(img), 0, 255).astype(np.uint8), "RGB")


@torch.no_grad()
def make_net(unet, name, spec):
    from diffusers import ControlNetModel

    torch.manual_seed(spec["seed"])
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=spec["channels"])
    return randomise(net)


@torch.no_grad()
def make_latent_net(unet, spec):
    """A ControlNet for a 9-channel inpainting UNet: its config the UNet's but taking the 4
    latent channels (as SD 1.5's ControlNets used with sd-v1-5-inpainting: diffusers feeds them
    the latents alone), its weights the UNet's where the shapes agree (not conv_in)."""
    from diffusers import ControlNetModel

    torch.manual_seed(spec["seed"])
    config = dict(ControlNetModel.from_unet(
        unet, load_weights_from_unet=False,
        conditioning_embedding_out_channels=spec["channels"]).config)
    config["in_channels"] = 4
    net = ControlNetModel.from_config(config)
    own, theirs = net.state_dict(), unet.state_dict()
    net.load_state_dict({k: theirs[k] if k in theirs and theirs[k].shape == v.shape else v
                         for k, v in own.items()})
    return randomise(net)


@torch.no_grad()
def randomise(net):
    zero = list(net.controlnet_down_blocks) + [net.controlnet_mid_block,
                                                net.controlnet_cond_embedding.conv_out]
    for m in zero:
        torch.nn.init.normal_(m.weight, std=0.5 / m.weight[0].numel() ** 0.5)
        torch.nn.init.normal_(m.bias, std=0.05)
    # Every other weight: a perturbation of the UNet's copy, so the ControlNet is not the UNet.
    for n, p in net.named_parameters():
        if not any(n.startswith(z) for z in ("controlnet_down_blocks", "controlnet_mid_block",
                                             "controlnet_cond_embedding")):
            p.add_(torch.randn_like(p) * 0.1 * (p.std() if p.numel() > 1 else 0.1))
    for p in net.parameters():
        p.copy_(p.half().float())
    return net.eval()


def ldm_state(net):
    layers = net.config.layers_per_block
    hint_blocks = len(net.controlnet_cond_embedding.blocks)
    return {ldm_key(k, layers, hint_blocks): v.half().contiguous() for k, v in net.state_dict().items()}


@torch.no_grad()
def check_single_file(path, folder, net):
    from diffusers import ControlNetModel

    back = ControlNetModel.from_single_file(path, config=folder, torch_dtype=torch.float32)
    want, got = net.state_dict(), back.state_dict()
    assert want.keys() == got.keys(), set(want) ^ set(got)
    for k in want:
        assert torch.equal(want[k], got[k]), k


def to_u8(images_np):
    return torch.from_numpy((images_np * 255).round().astype("uint8"))


@torch.no_grad()
def main():
    import diffusers
    from diffusers import (ControlNetModel, StableDiffusionControlNetImg2ImgPipeline,
                           StableDiffusionControlNetInpaintPipeline,
                           StableDiffusionControlNetPipeline, UNet2DConditionModel)
    from safetensors.torch import save_file

    for out in (OUT, OUT_INPAINT):
        if os.path.isdir(out):
            shutil.rmtree(out)
    os.makedirs(OUT)
    unet = UNet2DConditionModel.from_pretrained(os.path.join(BASE, "unet"))
    nets = {}
    for name, spec in NETS.items():
        nets[name] = make_net(unet, name, spec)
    folder_a = os.path.join(OUT, "cn-a")
    nets["cn-a"].half().save_pretrained(folder_a, safe_serialization=True)
    nets["cn-a"].float()
    save_file({"control_model." + k: v for k, v in ldm_state(nets["cn-a"]).items()},
              os.path.join(OUT, "cn-a-ldm.safetensors"))
    check_single_file(os.path.join(OUT, "cn-a-ldm.safetensors"), folder_a, nets["cn-a"])
    # cn-b: only the pickle form is committed; its config for diffusers' check is written aside.
    tmp_b = os.path.join(OUT, "_cn-b-config")
    nets["cn-b"].save_config(tmp_b)
    torch.save(ldm_state(nets["cn-b"]), os.path.join(OUT, "cn-b.pth"))
    check_single_file(os.path.join(OUT, "cn-b.pth"), tmp_b, nets["cn-b"])
    shutil.rmtree(tmp_b)
    for n in nets.values():
        n.float()

    tensors, cases = {}, {}

    # Model level: both ControlNets on one input, and the UNet with cn-a's residuals.
    g = torch.Generator().manual_seed(6300)
    sample = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([700.0, 50.0])
    ctx = torch.randn(2, 77, 32, generator=g)
    cond = torch.rand(2, 3, 64, 64, generator=g)
    tensors.update({"model.sample": sample, "model.timesteps": t, "model.context": ctx,
                    "model.cond": cond})
    scales = {"cn-a": 0.7, "cn-b": 1.3}
    for name, net in nets.items():
        down, mid = net(sample, t, encoder_hidden_states=ctx, controlnet_cond=cond,
                        conditioning_scale=scales[name], return_dict=False)
        for i, d in enumerate(down):
            tensors[f"model.{name}.down.{i}"] = d
        tensors[f"model.{name}.mid"] = mid
        if name == "cn-a":
            tensors["model.unet.with_cn-a"] = unet(
                sample, t, encoder_hidden_states=ctx, down_block_additional_residuals=down,
                mid_block_additional_residual=mid).sample
            tensors["model.unet.plain"] = unet(sample, t, encoder_hidden_states=ctx).sample
    d = (tensors["model.unet.with_cn-a"] - tensors["model.unet.plain"]).abs().max()
    assert d > 0.05, f"the residuals barely change the UNet: {d}"

    # Whole images.
    img_dir = os.path.join(FIXTURES, "images")
    os.makedirs(img_dir, exist_ok=True)
    images = {}
    for name, (w, h, seed) in {"control-64.png": (64, 64, 1), "control-80x48.png": (80, 48, 2),
                               "control-b-64.png": (64, 64, 3)}.items():
        control_image(w, h, seed).save(os.path.join(img_dir, name), optimize=True)
        images[name] = Image.open(os.path.join(img_dir, name)).convert("RGB")
    # An init image for img2img: smooth gradients and a disc.
    y, x = np.mgrid[0:64, 0:64].astype(np.float64)
    init = np.stack([255 * (0.2 + 0.6 * x / 63), 255 * (0.3 + 0.5 * y / 63),
                     255 * (0.5 + 0.4 * np.sin(6 * x / 63 + 3 * y / 63))], -1)
    init[(x - 38) ** 2 + (y - 26) ** 2 < 15 ** 2] = (230, 40, 60)
    Image.fromarray(np.round(init).astype(np.uint8), "RGB").save(
        os.path.join(img_dir, "cn-init-64.png"), optimize=True)
    images["cn-init-64.png"] = Image.open(os.path.join(img_dir, "cn-init-64.png")).convert("RGB")

    def pipe_for(names, cls=StableDiffusionControlNetPipeline, base=BASE):
        cn = [nets[n] for n in names]
        pipe = cls.from_pretrained(
            base, controlnet=cn if len(cn) > 1 else cn[0], dtype=torch.float32,
            safety_checker=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    base = dict(prompt="a house by a lake, evening", negative_prompt="blurry", steps=8,
                width=64, height=64, seed=77, guidance_scale=7.5)

    def run(label, units, scheduler=None, batch_size=1, init=None, strength=None, mask=None,
            model="tiny-a-vae8", **over):
        r = dict(base, **over)
        cls = StableDiffusionControlNetImg2ImgPipeline if init else StableDiffusionControlNetPipeline
        if mask:
            cls = StableDiffusionControlNetInpaintPipeline
        pipe = pipe_for([u["model"] for u in units], cls, os.path.join(FIXTURES, model))
        # img2img: `image` is the init image, the control images `control_image`.
        extra = dict(image=images[init], strength=strength,
                     control_image=pick_images(units)) if init else dict(image=pick_images(units))
        if mask:
            extra["mask_image"] = images[mask]
        own = dict(pipe.scheduler.config)
        if scheduler is not None:
            pipe.scheduler = make_scheduler(scheduler, own)
        multi = len(units) > 1
        pick = (lambda k: [u[k] for u in units]) if multi else (lambda k: units[0][k])
        gens = [torch.Generator("cpu").manual_seed(r["seed"] + i) for i in range(batch_size)]
        out = pipe(prompt=r["prompt"], negative_prompt=r["negative_prompt"],
                   num_inference_steps=r["steps"], **extra,
                   guidance_scale=r["guidance_scale"], width=r["width"], height=r["height"],
                   generator=gens if batch_size > 1 else gens[0],
                   num_images_per_prompt=batch_size, output_type="np",
                   controlnet_conditioning_scale=pick("scale"),
                   control_guidance_start=pick("guidance_start"),
                   control_guidance_end=pick("guidance_end")).images
        img = to_u8(out)
        tensors[f"image.{label}"] = img
        cases[label] = dict(r, model=model, scheduler=scheduler, batch_size=batch_size,
                            init_image=init, strength=strength, mask_image=mask,
                            controlnets=[{k: v for k, v in u.items() if k != "image_pil"}
                                         for u in units])
        st = img.float()
        print(f"{label}: mean {st.mean():.1f} std {st.std():.1f}")

    def pick_images(units):
        return [u["image_pil"] for u in units] if len(units) > 1 else units[0]["image_pil"]

    def unit(model, image, scale=1.0, start=0.0, end=1.0):
        return dict(model=model, image=image, image_pil=images[image], scale=scale,
                    guidance_start=start, guidance_end=end)

    run("single", [unit("cn-a", "control-64.png")])
    run("window-resize", [unit("cn-a", "control-80x48.png", 0.75, 0.2, 0.7)], scheduler="euler_a")
    run("multi", [unit("cn-a", "control-64.png", 1.0), unit("cn-b", "control-b-64.png", 0.6, 0.0, 0.5)],
        scheduler="euler")
    run("batch", [unit("cn-a", "control-64.png", 1.2)], scheduler="dpmpp_2m", batch_size=2,
        guidance_scale=5.0)
    run("no-cfg", [unit("cn-b", "control-b-64.png", 0.9)], scheduler="euler", guidance_scale=1.0)
    # img2img (StableDiffusionControlNetImg2ImgPipeline): the window over the steps that run.
    run("img2img", [unit("cn-a", "control-64.png", 0.9, 0.0, 0.8)], scheduler="euler_a",
        init="cn-init-64.png", strength=0.6, steps=10)
    # Inpainting (StableDiffusionControlNetInpaintPipeline). A mask: a disc and a bar, white
    # (repaint) on black, with an anti-aliased edge the mask processor binarises.
    mask = np.zeros((64, 64))
    mask[(x - 30) ** 2 + (y - 34) ** 2 < 14 ** 2] = 255
    mask[6:16, 8:56] = 255
    Image.fromarray(mask.astype(np.uint8), "L").filter(ImageFilter.GaussianBlur(1)).convert(
        "RGB").save(os.path.join(img_dir, "cn-mask-64.png"), optimize=True)
    images["cn-mask-64.png"] = Image.open(os.path.join(img_dir, "cn-mask-64.png")).convert("RGB")
    # A 4-channel UNet: the known region put back at each step's noise level. No batches: with
    # a list of generators diffusers samples the init image's latents with the first alone,
    # where sdserve keeps image i the single run of seed + i (tests/integration/img2img_images.rs).
    run("inpaint", [unit("cn-a", "control-64.png", 0.9, 0.1, 0.9)], scheduler="euler_a",
        init="cn-init-64.png", strength=0.75, mask="cn-mask-64.png")
    run("inpaint-full-multi", [unit("cn-a", "control-64.png", 1.0),
                               unit("cn-b", "control-b-64.png", 0.7, 0.0, 0.6)],
        init="cn-init-64.png", strength=1.0, mask="cn-mask-64.png", scheduler="euler")
    # A 9-channel inpainting UNet (tiny-inpaint, VAE factor 2): cn-i takes the 4 latent channels.
    inpaint_unet = UNet2DConditionModel.from_pretrained(os.path.join(INPAINT, "unet"))
    nets["cn-i"] = make_latent_net(inpaint_unet, LATENT_NET)
    # A folder, and the LDM names (diffusers' single-file converter reads only six hint
    # encoder blocks, SD's; the key mapping is the one checked on cn-a and cn-b above).
    nets["cn-i"].half().save_pretrained(os.path.join(OUT_INPAINT, "cn-i"), safe_serialization=True)
    nets["cn-i"].float()
    save_file(ldm_state(nets["cn-i"]), os.path.join(OUT_INPAINT, "cn-i-ldm.safetensors"))
    run("inpaint-9ch", [unit("cn-i", "control-64.png", 1.0)], init="cn-init-64.png",
        strength=1.0, mask="cn-mask-64.png", model="tiny-inpaint", scheduler="euler")
    run("inpaint-9ch-strength", [unit("cn-i", "control-b-64.png", 0.8, 0.0, 0.7)],
        init="cn-init-64.png", strength=0.7, mask="cn-mask-64.png", model="tiny-inpaint",
        scheduler="dpmpp_2m")
    # The same request without the ControlNet: the tests check the ControlNet changes the image.
    pipe = pipe_for(["cn-a"])
    plain = diffusers.StableDiffusionPipeline(**{k: v for k, v in pipe.components.items()
                                                if k != "controlnet"})
    plain.set_progress_bar_config(disable=True)
    out = plain(prompt=base["prompt"], negative_prompt=base["negative_prompt"],
                num_inference_steps=base["steps"], guidance_scale=base["guidance_scale"],
                width=64, height=64, generator=torch.Generator().manual_seed(base["seed"]),
                output_type="np").images
    tensors["plain.single"] = to_u8(out)
    diff = (tensors["plain.single"].float() - tensors["image.single"].float()).abs().mean()
    print(f"single vs no ControlNet: mean abs diff {diff:.1f}")
    assert diff > 5, diff

    meta = {
        "generated_by": "tools/make_controlnet_fixtures.py",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
        "nets": {n: dict(s, channels=list(s["channels"]))
                 for n, s in dict(NETS, **{"cn-i": LATENT_NET}).items()},
        "model": "model.*: cn-a (scale 0.7) and cn-b (scale 1.3) on sample/timesteps/context/cond; "
                 "model.unet.with_cn-a: tiny-a-vae8's UNet with cn-a's residuals",
        "images": "image.<case>: [batch, H, W, 3] u8 = round(output_type='np' * 255); "
                  "plain.single: case single without a ControlNet",
        "cases": cases,
    }
    save_file({k: v.contiguous() for k, v in tensors.items()},
              os.path.join(FIXTURES, "controlnet.safetensors"),
              metadata={"generated_by": "tools/make_controlnet_fixtures.py"})
    with open(os.path.join(FIXTURES, "controlnet.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
