#!/usr/bin/env python3
"""UNet config-variant references for crates/pipeline/tests/integration/unet.rs.

The tiny-a / tiny-b models cover the SD 1.5 / SD 2 UNet shapes; these tiny UNets cover the
config keys they leave at defaults (odd latent sizes that need `upsample_size`, scale-shift
resnets, upcast and only-cross attention, per-block transformer depth, no mid block, ...).

Writes, under crates/pipeline/tests/fixtures/unet-variants/:
  <name>/config.json, <name>/diffusion_pytorch_model.safetensors   (UNet2DConditionModel.save_pretrained)
  <name>.safetensors: sample, timesteps, encoder_hidden_states, output
                      (output = unet(sample, timesteps, encoder_hidden_states).sample)

Every parameter (norms included) is perturbed from its init so that swapped or ignored
weights show.  Pinned: torch 2.11.0, diffusers 0.42.1 (tools/requirements.txt).

Usage: python3 tools/make_unet_fixtures.py
"""

import os

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "crates", "pipeline", "tests", "fixtures", "unet-variants")

VARIANTS = {
    # Three levels and a 9x7 latent: 9 and 7 are not multiples of 4, so diffusers passes each
    # skip connection's size to the upsamplers.  Plus most non-default resnet / time / attention knobs.
    "odd": dict(
        config=dict(
            sample_size=8,
            in_channels=4,
            out_channels=3,
            center_input_sample=True,
            flip_sin_to_cos=False,
            freq_shift=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            mid_block_type="UNetMidBlock2DCrossAttn",
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            only_cross_attention=(False, True, False),
            block_out_channels=(16, 24, 32),
            layers_per_block=(1, 2, 1),
            downsample_padding=0,
            mid_block_scale_factor=1.5,
            act_fn="silu",
            norm_num_groups=8,
            norm_eps=1e-5,
            cross_attention_dim=20,
            transformer_layers_per_block=(1, 2, 1),
            attention_head_dim=(2, 3, 4),
            use_linear_projection=True,
            upcast_attention=True,
            resnet_time_scale_shift="scale_shift",
            resnet_skip_time_act=True,
            resnet_out_scale_factor=2.0,
            time_embedding_dim=40,
            time_embedding_act_fn="mish",
            timestep_post_act="gelu",
            conv_in_kernel=1,
            conv_out_kernel=5,
        ),
        sample=(2, 4, 9, 7),
        context=(2, 5, 20),
    ),
    # No mid block, "UNetRes"-prefixed names, a single level pair of cross-attention blocks.
    "nomid": dict(
        config=dict(
            sample_size=8,
            in_channels=2,
            out_channels=2,
            down_block_types=("UNetResCrossAttnDownBlock2D", "DownBlock2D"),
            mid_block_type=None,
            up_block_types=("UpBlock2D", "UNetResCrossAttnUpBlock2D"),
            block_out_channels=(8, 16),
            layers_per_block=1,
            act_fn="swish",
            norm_num_groups=4,
            norm_eps=1e-6,
            cross_attention_dim=12,
            attention_head_dim=2,
        ),
        sample=(1, 2, 6, 10),
        context=(1, 3, 12),
    ),
}


@torch.no_grad()
def build(name, spec, seed):
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**spec["config"]).eval()
    g = torch.Generator().manual_seed(seed + 1)
    for p in unet.parameters():
        p.add_(0.1 * torch.randn(p.shape, generator=g))
    sample = torch.randn(*spec["sample"], generator=g)
    ctx = torch.randn(*spec["context"], generator=g)
    b = spec["sample"][0]
    timesteps = torch.tensor([981.0, 500.25][:b])
    # Unit-std output, as a trained epsilon predictor.
    s = float(unet(sample, timesteps, encoder_hidden_states=ctx).sample.std())
    unet.conv_out.weight.mul_(1.0 / s)
    unet.conv_out.bias.mul_(1.0 / s)
    out = unet(sample, timesteps, encoder_hidden_states=ctx).sample

    unet.save_pretrained(os.path.join(OUT, name), safe_serialization=True)
    save_file(
        {
            "sample": sample.contiguous(),
            "timesteps": timesteps.contiguous(),
            "encoder_hidden_states": ctx.contiguous(),
            "output": out.contiguous(),
        },
        os.path.join(OUT, f"{name}.safetensors"),
    )
    print(f"{name}: output {tuple(out.shape)} std {float(out.std()):.3f}")


def main():
    assert torch.__version__.split("+")[0] == "2.11.0", torch.__version__
    import diffusers

    assert diffusers.__version__ == "0.42.1", diffusers.__version__
    os.makedirs(OUT, exist_ok=True)
    for i, (name, spec) in enumerate(VARIANTS.items()):
        build(name, spec, 1000 + 10 * i)


if __name__ == "__main__":
    main()
