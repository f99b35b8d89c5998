"""Parameter counts of the real SD 1.5 components, for the memory planner's tests.

Builds diffusers' UNet2DConditionModel / AutoencoderKL and transformers' CLIPTextModel from the
SD 1.5 configs in ../shared/tools/make_random_sd15.py on the `meta` device (no weights, no
memory) and writes, grouped as `sdserve_pipeline::memory` groups safetensors keys:
  unet: {"down_blocks.0": n, ..., "mid_block": n, "up_blocks.3": n, "other": n}
  text_encoder: n, vae_decoder: n (post_quant_conv.* and decoder.* only), plus the configs.
Run: python3 tools/make_sd15_footprint.py  (torch 2.11.0, diffusers 0.42.1, transformers 5.24)
"""
import importlib.util
import json
import os
import sys

import torch
import diffusers
import transformers
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

HERE = os.path.dirname(os.path.abspath(__file__))
SD15 = os.environ.get("SD15_TOOL", os.path.join(HERE, "../../shared/tools/make_random_sd15.py"))
OUT = os.path.join(HERE, "../crates/pipeline/tests/fixtures/sd15-footprint.json")


def unet_group(key):
    parts = key.split(".")
    if parts[0] in ("down_blocks", "up_blocks"):
        return f"{parts[0]}.{parts[1]}"
    if parts[0] == "mid_block":
        return "mid_block"
    return "other"


def main():
    spec = importlib.util.spec_from_file_location("sd15", SD15)
    sd15 = importlib.util.module_from_spec(spec)
    sys.argv = [SD15]
    spec.loader.exec_module(sd15)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**sd15.UNET_CONFIG)
        vae = AutoencoderKL(**sd15.VAE_CONFIG)
        text = CLIPTextModel(CLIPTextConfig(**sd15.CLIP_CONFIG))
    groups = {}
    for k, v in unet.state_dict().items():
        groups[unet_group(k)] = groups.get(unet_group(k), 0) + v.numel()
    vae_decoder = sum(
        v.numel() for k, v in vae.state_dict().items()
        if k.startswith("decoder.") or k.startswith("post_quant_conv.")
    )
    text_encoder = sum(v.numel() for v in text.state_dict().values())
    out = {
        "generated_by": "tools/make_sd15_footprint.py",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__},
        "unet": dict(sorted(groups.items())),
        "text_encoder": text_encoder,
        "vae_decoder": vae_decoder,
        "unet_config": dict(unet.config),
        "vae_config": dict(vae.config),
    }
    with open(OUT, "w") as f:
        json.dump(out, f, indent=1, default=list)
        f.write("\n")
    print(OUT, sum(groups.values()), text_encoder, vae_decoder)


if __name__ == "__main__":
    main()
