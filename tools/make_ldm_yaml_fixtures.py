#!/usr/bin/env python3
"""LDM `.yaml` configs beside single-file checkpoints (A1111's `find_checkpoint_config`), for
the single-file loader (crates/pipeline/src/single_file/ldm_yaml.rs; tests/integration/single_file.rs).

Writes, under OUT (default crates/pipeline/tests/fixtures/ldm-yaml):
  a1111/<name>.yaml   A1111 v1.10.1's own configs/<name>.yaml, unchanged but for a first
                      comment line naming the origin: v1-inference, v1-inpainting-inference
                      (SD 1.x: real SD 1.5 sizes, which the tiny checkpoints contradict),
                      sd_xl_inpaint, instruct-pix2pix, alt-diffusion-inference (not SD 1.x)
  tiny-a-v.yaml       v1-inference.yaml with tiny-a's sizes put in (model_channels,
                      channel_mult, num_res_blocks, attention_resolutions, context_dim, the
                      VAE's ch, ch_mult, num_res_blocks) and `parameterization: v`; its
                      `num_heads` is dropped (tiny-a has 2 and 4 heads by level, which LDM's
                      one `num_heads` cannot say, nor its 8 norm groups: the test gives the
                      conversion tiny-a's folder configs for what the weights cannot say)
  ldm-yaml.safetensors  result.<case>: diffusers' image ([1, H, W, 3] u8) of tiny-a's folder
                      with its scheduler config's prediction_type set to v_prediction
  ldm-yaml.json       the cases and versions

Usage:
  python tools/make_ldm_yaml_fixtures.py --a1111 PATH/TO/stable-diffusion-webui [--out DIR]
"""

import copy
import json
import os
import sys

import torch
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from a1111_source import a1111_args  # noqa: E402
from api_schedulers import make_scheduler  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "crates", "pipeline", "tests", "fixtures")
DEFAULT_OUT = os.path.join(FIXTURES, "ldm-yaml")
COPIED = ["v1-inference", "v1-inpainting-inference", "sd_xl_inpaint", "instruct-pix2pix",
          "alt-diffusion-inference"]
CASES = {
    "v.ddim": dict(model="tiny-a", scheduler="ddim", steps=6, width=32, height=32, seed=7,
                    guidance_scale=7.5, prompt="a photo of an astronaut riding a horse on mars",
                    negative_prompt="blurry"),
    "v.pndm": dict(model="tiny-a", scheduler="pndm", steps=5, width=32, height=48, seed=11,
                   guidance_scale=4.0, prompt="a red house on a hill", negative_prompt=""),
    "v.euler": dict(model="tiny-a", scheduler="euler", steps=6, width=32, height=32, seed=7,
                    guidance_scale=7.5, prompt="a photo of an astronaut riding a horse on mars",
                    negative_prompt="blurry"),
}


def tiny_yaml(base, model_dir):
    with open(os.path.join(model_dir, "unet", "config.json")) as f:
        unet = json.load(f)
    with open(os.path.join(model_dir, "vae", "config.json")) as f:
        vae = json.load(f)
    cfg = copy.deepcopy(base)
    params = cfg["model"]["params"]
    params["parameterization"] = "v"
    u = params["unet_config"]["params"]
    ch = unet["block_out_channels"]
    u["in_channels"], u["out_channels"] = unet["in_channels"], unet["out_channels"]
    u["model_channels"] = ch[0]
    u["channel_mult"] = [c // ch[0] for c in ch]
    u["num_res_blocks"] = unet["layers_per_block"]
    u["attention_resolutions"] = [2 ** i for i, t in enumerate(unet["down_block_types"])
                                  if t.startswith("CrossAttn")]
    u["context_dim"] = unet["cross_attention_dim"]
    u["transformer_depth"] = unet["transformer_layers_per_block"]
    del u["num_heads"]
    fs = params["first_stage_config"]["params"]
    vch = vae["block_out_channels"]
    fs["embed_dim"] = vae["latent_channels"]
    dd = fs["ddconfig"]
    dd["z_channels"] = vae["latent_channels"]
    dd["ch"] = vch[0]
    dd["ch_mult"] = [c // vch[0] for c in vch]
    dd["num_res_blocks"] = vae["layers_per_block"]
    params["scale_factor"] = vae["scaling_factor"]
    return cfg


@torch.no_grad()
def main():
    args = a1111_args(__file__, __doc__, DEFAULT_OUT)
    if args is None:
        return
    import diffusers
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    os.makedirs(os.path.join(args.out, "a1111"), exist_ok=True)
    for name in COPIED:
        with open(os.path.join(args.a1111, "configs", f"{name}.yaml")) as f:
            text = f.read()
        with open(os.path.join(args.out, "a1111", f"{name}.yaml"), "w") as f:
            f.write(f"# AUTOMATIC1111 v1.10.1 configs/{name}.yaml, unchanged below this line\n")
            f.write(text)
    with open(os.path.join(args.a1111, "configs", "v1-inference.yaml")) as f:
        base = yaml.safe_load(f)
    model_dir = os.path.join(FIXTURES, "tiny-a")
    with open(os.path.join(args.out, "tiny-a-v.yaml"), "w") as f:
        f.write("# AUTOMATIC1111 v1.10.1 configs/v1-inference.yaml with tiny-a's sizes and\n"
                "# parameterization v (tools/make_ldm_yaml_fixtures.py)\n")
        yaml.safe_dump(tiny_yaml(base, model_dir), f, sort_keys=False)

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, dtype=torch.float32,
                                                   safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    # As the scheduler_config.json of a v-prediction folder: the file's keys and prediction_type.
    # The keys `_use_default_values` lists are PNDM's defaults, not the file's; passing them on
    # would give another class PNDM's `timestep_spacing: leading` (Euler's own is linspace).
    defaults = set(pipe.scheduler.config["_use_default_values"])
    own = {k: v for k, v in pipe.scheduler.config.items()
           if k != "_use_default_values" and k not in defaults}
    own["prediction_type"] = "v_prediction"
    tensors = {}
    for label, c in CASES.items():
        pipe.scheduler = make_scheduler(c["scheduler"], own)
        assert pipe.scheduler.config.prediction_type == "v_prediction"
        image = pipe(c["prompt"], negative_prompt=c["negative_prompt"] or None,
                     num_inference_steps=c["steps"], guidance_scale=c["guidance_scale"],
                     width=c["width"], height=c["height"],
                     generator=torch.Generator("cpu").manual_seed(c["seed"]),
                     output_type="np").images
        tensors[f"result.{label}"] = torch.from_numpy((image * 255).round().astype("uint8")).contiguous()
        print(label, image.shape, float(image.mean()))
    save_file(tensors, os.path.join(args.out, "ldm-yaml.safetensors"))
    with open(os.path.join(args.out, "ldm-yaml.json"), "w") as f:
        json.dump({"cases": CASES, "copied": COPIED,
                   "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__}},
                  f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
