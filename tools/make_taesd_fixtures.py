#!/usr/bin/env python3
"""TAESD (diffusers `AutoencoderTiny`) references for crates/pipeline/tests/integration/taesd.rs.

Two tiny random AutoencoderTiny models that differ in every config key the Rust code reads:

  taesd-a: 4 levels of 8 channels, relu, upsampling factor 2 (8x, the shape of madebyollin/taesd),
           scaling_factor 1.0; also saved as the fp16 variant
  taesd-b: 3 levels of 6 channels, silu, upsampling factor 3 (9x), blocks (2, 1, 1),
           scaling_factor 0.5, latent_magnitude 2, latent_shift 0.25

Writes, under crates/pipeline/tests/fixtures/taesd/:
  <name>/config.json, <name>/diffusion_pytorch_model.safetensors   (AutoencoderTiny.save_pretrained)
  taesd-a/diffusion_pytorch_model.fp16.safetensors                 (save_pretrained(variant="fp16"))
  references.safetensors:
    <name>.latents   f32 [2, 4, 5, 7]  seeded normals, as the step hook sees them (UNet space)
    <name>.decoded   f32 [2, 3, 5f, 7f] vae.decode(latents / scaling_factor).sample
    <name>.image     u8  [2, 5f, 7f, 3] round(postprocess(decoded, output_type="np") * 255)
    <name>.encoder_input  f32 [1, 3, 8f', 8f'] seeded image in [-1, 1]
    <name>.encoded   f32 [1, 4, ...]   vae.encode(encoder_input).latents
    pipe.latents / pipe.image: a 2-step StableDiffusionPipeline run on tiny-a with taesd-a as its
      `vae`: the final latents (output_type="latent") and the image (output_type="np", rounded)
      of the same seeded run.  The script asserts that the image equals what the per-model rule
      above gives for those latents, i.e. that the rule is what the pipeline does.

Every parameter is perturbed from its init so that swapped or ignored weights show; the last
decoder conv is rescaled so the images use the range (some values land outside [-1, 1] and
show the clamp).  Pinned: torch 2.11.0, diffusers 0.42.1 (tools/requirements.txt).

Usage: python3 tools/make_taesd_fixtures.py
"""

import json
import os

import numpy as np
import torch
from diffusers import AutoencoderTiny
from diffusers.image_processor import VaeImageProcessor
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "crates", "pipeline", "tests", "fixtures")
OUT = os.path.join(FIXTURES, "taesd")

MODELS = {
    "taesd-a": dict(
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
        act_fn="relu",
        upsampling_scaling_factor=2,
        latent_channels=4,
        scaling_factor=1.0,
    ),
    "taesd-b": dict(
        encoder_block_out_channels=(6, 6, 6),
        decoder_block_out_channels=(6, 6, 6),
        num_encoder_blocks=(1, 2, 1),
        num_decoder_blocks=(2, 1, 1),
        act_fn="silu",
        upsampling_scaling_factor=3,
        latent_channels=4,
        latent_magnitude=2,
        latent_shift=0.25,
        scaling_factor=0.5,
    ),
}

LATENTS = (2, 4, 5, 7)


def to_u8(images_np):
    return torch.from_numpy(np.round(images_np * 255.0).astype(np.uint8))


@torch.no_grad()
def build(name, config, seed, refs):
    torch.manual_seed(seed)
    vae = AutoencoderTiny(**config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    for p in vae.parameters():
        p.add_(0.1 * torch.randn(p.shape, generator=g))
    latents = torch.randn(*LATENTS, generator=g)
    sf = vae.config.scaling_factor
    # The decoder's output is x * 2 - 1: scale its last conv so the image spans about [-1.3, 1.3].
    last = vae.decoder.layers[-1]
    out = vae.decode(latents / sf).sample
    s = float(((out + 1) / 2).std())
    last.weight.mul_(0.45 / s)
    last.bias.copy_(last.bias * 0.45 / s + (0.5 - float(((out + 1) / 2).mean()) * 0.45 / s))
    decoded = vae.decode(latents / sf).sample
    image = to_u8(VaeImageProcessor().postprocess(decoded, output_type="np"))

    f = config["upsampling_scaling_factor"] ** (len(config["decoder_block_out_channels"]) - 1)
    down = 2 ** (len(config["encoder_block_out_channels"]) - 1)
    encoder_input = torch.rand(1, 3, 3 * down, 4 * down, generator=g) * 2 - 1
    encoded = vae.encode(encoder_input).latents

    folder = os.path.join(OUT, name)
    vae.save_pretrained(folder, safe_serialization=True)
    if name == "taesd-a":
        vae.half().save_pretrained(folder, safe_serialization=True, variant="fp16")
    refs[f"{name}.latents"] = latents.contiguous()
    refs[f"{name}.decoded"] = decoded.contiguous()
    refs[f"{name}.image"] = image.contiguous()
    refs[f"{name}.encoder_input"] = encoder_input.contiguous()
    refs[f"{name}.encoded"] = encoded.contiguous()
    clamped = float(((decoded < -1) | (decoded > 1)).float().mean())
    print(f"{name}: decoded {tuple(decoded.shape)} (x{f}), {clamped:.1%} outside [-1, 1]; "
          f"encoded {tuple(encoded.shape)}")


@torch.no_grad()
def pipeline_check(refs):
    """A real StableDiffusionPipeline with taesd-a as its VAE: the rule the tests use holds."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        os.path.join(FIXTURES, "tiny-a"), dtype=torch.float32, safety_checker=None,
        requires_safety_checker=False,
    )
    taesd = AutoencoderTiny.from_pretrained(os.path.join(OUT, "taesd-a"), dtype=torch.float32)
    pipe = StableDiffusionPipeline(**{**pipe.components, "vae": taesd},
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    args = dict(prompt="a red house", num_inference_steps=2, width=64, height=48,
                guidance_scale=7.5)
    latents = pipe(**args, generator=torch.Generator().manual_seed(5),
                   output_type="latent").images
    image = pipe(**args, generator=torch.Generator().manual_seed(5), output_type="np").images
    image = to_u8(image)
    rule = taesd.decode(latents / taesd.config.scaling_factor).sample
    rule = to_u8(VaeImageProcessor().postprocess(rule, output_type="np"))
    assert torch.equal(image, rule), "the pipeline does not decode as the rule says"
    assert tuple(image.shape) == (1, 48, 64, 3), image.shape
    refs["pipe.latents"] = latents.contiguous()
    refs["pipe.image"] = image.contiguous()
    print(f"pipeline: latents {tuple(latents.shape)} -> image {tuple(image.shape)}, rule holds")
    return args


def main():
    assert torch.__version__.split("+")[0] == "2.11.0", torch.__version__
    import diffusers

    assert diffusers.__version__ == "0.42.1", diffusers.__version__
    os.makedirs(OUT, exist_ok=True)
    refs = {}
    for i, (name, config) in enumerate(MODELS.items()):
        build(name, config, 2000 + 10 * i, refs)
    args = pipeline_check(refs)
    save_file(refs, os.path.join(OUT, "references.safetensors"))
    with open(os.path.join(OUT, "references.json"), "w") as f:
        json.dump({
            "tensors": {k: {"dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape)}
                        for k, v in sorted(refs.items())},
            "pipe": {**args, "seed": 5, "model": "tiny-a", "vae": "taesd/taesd-a"},
        }, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
