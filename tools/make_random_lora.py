#!/usr/bin/env python3
"""A LoRA with random values for a diffusers model folder, for benchmarks (never tests): kohya/A1111
key names (lora_unet_* / lora_te_*, .lora_down.weight, .lora_up.weight, .alpha), fp16 as trained
files ship, on the layers kohya's sd-scripts LoRA adapts by default: in the UNet's transformer
blocks every attention linear (to_q, to_k, to_v, to_out.0), the feed-forward linears (ff.net.0.proj,
ff.net.2) and proj_in/proj_out; in the text encoder q/k/v/out_proj and mlp fc1/fc2. Shapes come from
the folder's config files (modules built on the meta device: no weights are read).

    python3 tools/make_random_lora.py /work/models/sd15-random /tmp/loras/bench32.safetensors \\
        --rank 32 --alpha 16

Merging costs the same whatever the values; the values are small so images stay finite.
"""

import argparse
import os

import torch
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

UNET_LEAVES = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
TE_LEAVES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def targets(model, leaves, inside):
    for name, m in model.named_modules():
        if inside in name and name.endswith(leaves) and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            yield name, m


def pair(m, rank, g):
    if isinstance(m, torch.nn.Conv2d):  # proj_in/proj_out of SD 1.5 are 1x1 convolutions
        fan_in, fan_out, tail = m.in_channels, m.out_channels, tuple(m.kernel_size)
    else:
        fan_in, fan_out, tail = m.in_features, m.out_features, ()
    down = torch.randn((rank, fan_in) + tail, generator=g) / fan_in**0.5
    up = torch.randn((fan_out, rank) + tuple(1 for _ in tail), generator=g) * 0.01
    return down.half(), up.half()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(os.path.join(args.model, "unet")))
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(os.path.join(args.model, "text_encoder")))
    g = torch.Generator().manual_seed(args.seed)
    sd = {}
    layers = {"unet": 0, "text_encoder": 0}
    for part, prefix, model, leaves, inside in (
        ("unet", "lora_unet_", unet, UNET_LEAVES, ".attentions."),
        ("text_encoder", "lora_te_", te, TE_LEAVES, "encoder.layers."),
    ):
        for name, m in targets(model, leaves, inside):
            key = prefix + name.replace(".", "_")
            down, up = pair(m, args.rank, g)
            sd[f"{key}.lora_down.weight"] = down.contiguous()
            sd[f"{key}.lora_up.weight"] = up.contiguous()
            sd[f"{key}.alpha"] = torch.tensor(args.alpha, dtype=torch.float16)
            layers[part] += 1
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_file(sd, args.out, metadata={"ss_network_dim": str(args.rank), "ss_network_alpha": str(args.alpha),
                                       "generated_by": "tools/make_random_lora.py"})
    print(f"{args.out}: rank {args.rank}, {layers['unet']} UNet + {layers['text_encoder']} text-encoder layers, "
          f"{os.path.getsize(args.out) / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
