#!/usr/bin/env python3
"""Build the two tiny Stable-Diffusion-shaped reference models (random weights,
fixed seeds) and the stage / whole-image references the Rust tests compare
against.  Pinned: torch 2.11.0, diffusers 0.42.1 (tools/requirements.txt).

Writes, under OUT (default crates/pipeline/tests/fixtures):
  tiny-a/, tiny-b/            diffusers folders (model_index.json, unet/, vae/,
                              text_encoder/, tokenizer/, scheduler/), fp32 safetensors
  tiny-a.safetensors/.json    stage references + images for tiny-a (same for b)

The two models differ on purpose in every config knob the Rust code must read
(block counts, head layout, linear vs conv projection, norm eps, text encoder
width / activation / key prefix, VAE depth / scaling factor / legacy attention
key names, scheduler class and prediction type).

Tokenizer: a small but real CLIP construction: the first K=488 merges of the
real CLIP BPE file (bpe_simple_vocab_16e6.txt.gz, shipped inside the
open_clip_torch wheel), giving 256 + 256 + 488 + 2 = 1002 ids.  The BPE file
is fetched with `pip download open_clip_torch==3.3.0 --no-deps` unless
--clip-bpe points at it.

Usage:
  python tools/make_tiny_models.py [--out DIR] [--models-only | --refs-only] [--clip-bpe FILE]
"""

import argparse
import json
import math
import os
import shutil

import numpy as np
import torch

from api_schedulers import SD15_SCHEDULER_CONFIG
from tiny_clip_tokenizer import EOS, read_clip_bpe, tiny_clip_vocab, write_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "crates", "pipeline", "tests", "fixtures")

# --------------------------------------------------------------------------
# Model definitions
# --------------------------------------------------------------------------

MODELS = {
    "tiny-a": dict(
        seed=1000,
        unet=dict(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            mid_block_type="UNetMidBlock2DCrossAttn",
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=2,
            norm_num_groups=8,
            norm_eps=1e-5,
            cross_attention_dim=32,
            # diffusers' legacy naming: this is really the number of heads
            # per block (-> 2 heads of 16 at 32 ch, 4 heads of 16 at 64 ch).
            attention_head_dim=[2, 4],
            use_linear_projection=False,
        ),
        vae=dict(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(16, 32),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=64,
            scaling_factor=0.18215,
        ),
        clip=dict(
            vocab_size=1002,
            hidden_size=32,
            intermediate_size=37,
            projection_dim=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
            # Same odd ids as the published SD 1.5 text_encoder/config.json.
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
        ),
        text_model_prefix=True,
        legacy_vae_attention=False,
        pad_token=EOS,
        # Verbatim content of SD 1.5's scheduler/scheduler_config.json: keys
        # absent here (timestep_spacing, prediction_type) must stay absent.
        scheduler_config=dict(SD15_SCHEDULER_CONFIG),
    ),
    "tiny-b": dict(
        seed=2000,
        unet=dict(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            mid_block_type="UNetMidBlock2DCrossAttn",
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(16, 32, 48),
            layers_per_block=1,
            norm_num_groups=16,
            norm_eps=1e-6,
            cross_attention_dim=48,
            attention_head_dim=8,  # an int: 8 heads in every block (head dims 4, 6)
            transformer_layers_per_block=1,
            use_linear_projection=True,
        ),
        vae=dict(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(16, 16, 32),
            layers_per_block=2,
            latent_channels=4,
            norm_num_groups=16,
            sample_size=64,
            scaling_factor=0.13025,
        ),
        clip=dict(
            vocab_size=1002,
            hidden_size=48,
            intermediate_size=96,
            projection_dim=48,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="gelu",
            layer_norm_eps=1e-5,
            pad_token_id=0,
            bos_token_id=1000,
            eos_token_id=1001,
        ),
        text_model_prefix=False,
        legacy_vae_attention=True,
        pad_token="!",  # like SD 2's tokenizer
        # Verbatim content of SD 2's (768-v) scheduler_config.json.
        scheduler_config={
            "_class_name": "DDIMScheduler",
            "_diffusers_version": "0.8.0",
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "clip_sample": False,
            "num_train_timesteps": 1000,
            "prediction_type": "v_prediction",
            "set_alpha_to_one": False,
            "skip_prk_steps": True,
            "steps_offset": 1,
            "trained_betas": None,
        },
    ),
}

# --------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------


@torch.no_grad()
def build_modules(spec):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    seed = spec["seed"]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**spec["unet"])
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**spec["vae"])
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**spec["clip"]))

    # The default init makes the UNet's prediction tiny and the images flat;
    # rescale conv_out so unit-variance latents give a unit-variance output.
    g = torch.Generator().manual_seed(seed + 3)
    c = spec["unet"]["in_channels"]
    x = torch.randn(2, c, 16, 16, generator=g)
    ctx = torch.randn(2, 77, spec["unet"]["cross_attention_dim"], generator=g)
    s = float(unet(x, torch.tensor([900.0, 100.0]), encoder_hidden_states=ctx).sample.std())
    if not math.isfinite(s) or s == 0.0:
        raise RuntimeError(f"UNet output std is {s}")
    unet.conv_out.weight.mul_(1.0 / s)
    unet.conv_out.bias.mul_(1.0 / s)
    return unet, vae, text_encoder


def add_text_model_prefix(out_dir):
    """Published SD 1.5 layout: "text_model.*" keys plus an int64
    "text_model.embeddings.position_ids" [1, 77] (transformers 5 saves neither)."""
    from safetensors.torch import load_file, save_file

    p = os.path.join(out_dir, "text_encoder", "model.safetensors")
    sd = load_file(p)
    sd = {(k if k.startswith("text_model.") else "text_model." + k): v.contiguous() for k, v in sd.items()}
    sd["text_model.embeddings.position_ids"] = torch.arange(77, dtype=torch.int64)[None]
    save_file(sd, p, metadata={"format": "pt"})


def legacy_vae_attention_names(out_dir):
    """Pre-0.14 diffusers VAE mid-block attention key names."""
    from safetensors.torch import load_file, save_file

    p = os.path.join(out_dir, "vae", "diffusion_pytorch_model.safetensors")
    ren = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    out = {}
    for k, v in load_file(p).items():
        if "mid_block.attentions." in k:
            for a, b in ren.items():
                k = k.replace(a, b)
        out[k] = v.contiguous()
    save_file(out, p, metadata={"format": "pt"})


def make_model(name, out_root, vocab, merges):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    spec = MODELS[name]
    out = os.path.join(out_root, name)
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out)
    unet, vae, text_encoder = build_modules(spec)
    tok_dir = os.path.join(out, "tokenizer")
    write_tokenizer(tok_dir, vocab, merges, spec["pad_token"])
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(),  # placeholder; scheduler_config.json is written verbatim below
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    # save_pretrained rewrites these; put back exactly what the real repos hold.
    write_tokenizer(tok_dir, vocab, merges, spec["pad_token"])
    sched_cfg = dict(spec["scheduler_config"])
    with open(os.path.join(out, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(sched_cfg, f, indent=2)
        f.write("\n")
    mi_path = os.path.join(out, "model_index.json")
    with open(mi_path) as f:
        mi = json.load(f)
    mi["scheduler"] = ["diffusers", sched_cfg["_class_name"]]
    with open(mi_path, "w") as f:
        json.dump(mi, f, indent=2)
        f.write("\n")
    if spec["text_model_prefix"]:
        add_text_model_prefix(out)
    if spec["legacy_vae_attention"]:
        legacy_vae_attention_names(out)
    n = lambda m: sum(p.numel() for p in m.parameters())
    print(f"{name}: unet {n(unet)/1e3:.0f}k params, vae {n(vae)/1e3:.0f}k, text_encoder {n(text_encoder)/1e3:.0f}k")


# --------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------

from api_schedulers import FIRST_NAMES, SCHEDULERS  # noqa: E402  (API name -> diffusers class, kwargs)

# Requests.  tiny-a: square, a negative prompt, CFG on.  tiny-b: non-square,
# a prompt longer than 77 tokens (truncation), empty negative prompt, CFG off
# for some images, seeds above 2^31.
REQUESTS = {
    "tiny-a": dict(
        base=dict(
            prompt="a photo of an astronaut riding a horse on mars",
            negative_prompt="blurry, low quality",
            steps=12,
            width=64,
            height=64,
            seed=42,
            guidance_scale=7.5,
        ),
        per_image={},
    ),
    "tiny-b": dict(
        base=dict(
            prompt=(
                "A watercolor painting of a lighthouse on a rocky coast at sunset, seagulls "
                "flying over the waves, dramatic clouds, warm light, highly detailed, "
                "trending on artstation, 4k, by an unknown artist"
            ),
            negative_prompt="",
            steps=10,
            width=48,
            height=80,
            seed=3000000000,
            guidance_scale=5.0,
        ),
        per_image={
            "ddim": dict(guidance_scale=1.0),
            "euler_a": dict(guidance_scale=1.0, seed=7),
            "lms": dict(guidance_scale=1.0),
            "unipc": dict(guidance_scale=1.0, seed=123456),
        },
    ),
}

UNET_TIMESTEPS = [981.0, 500.25]


def to_u8(images_np):
    # diffusers numpy_to_pil: (images * 255).round().astype("uint8")
    return torch.from_numpy((images_np[0] * 255).round().astype("uint8"))


@torch.no_grad()
def make_refs(name, out_root):
    import diffusers
    import transformers
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    folder = os.path.join(out_root, name)
    pipe = StableDiffusionPipeline.from_pretrained(
        folder, dtype=torch.float32, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    req = REQUESTS[name]
    base = req["base"]
    own_scheduler_config = dict(pipe.scheduler.config)
    t = {}
    meta = {
        "model": name,
        "folder": name,
        "generated_by": "tools/make_tiny_models.py",
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
        },
    }

    # --- text
    tok = pipe.tokenizer
    ids = tok(base["prompt"], padding="max_length", max_length=tok.model_max_length,
              truncation=True, return_tensors="pt").input_ids
    neg_ids = tok(base["negative_prompt"], padding="max_length", max_length=tok.model_max_length,
                  truncation=True, return_tensors="pt").input_ids
    emb = pipe.text_encoder(ids)[0]
    neg_emb = pipe.text_encoder(neg_ids)[0]
    t["text.input_ids"] = ids.to(torch.int64)
    t["text.embeddings"] = emb
    # The negative prompt too: for tiny-b it is "" and so shows the "!" padding.
    t["text.negative_input_ids"] = neg_ids.to(torch.int64)
    t["text.negative_embeddings"] = neg_emb
    n_tokens = len(tok(base["prompt"]).input_ids)
    meta["text"] = {"prompt": base["prompt"], "untruncated_length": n_tokens,
                    "negative_prompt": base["negative_prompt"],
                    "input_ids": "tokenizer(prompt), padded/truncated to 77",
                    "embeddings": "text_encoder(input_ids)[0]: last hidden state after final layer norm",
                    "negative_input_ids": "tokenizer(negative_prompt), padded to 77",
                    "negative_embeddings": "text_encoder(negative_input_ids)[0]"}

    # --- unet: batch [uncond(negative prompt), cond(prompt)], two different timesteps
    vae_f = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    c = pipe.unet.config.in_channels
    h, w = base["height"] // vae_f, base["width"] // vae_f
    g = torch.Generator("cpu").manual_seed(11)
    sample = torch.randn(2, c, h, w, generator=g)
    ts = torch.tensor(UNET_TIMESTEPS, dtype=torch.float32)
    ehs = torch.cat([neg_emb, emb])
    t["unet.sample"] = sample
    t["unet.timesteps"] = ts
    t["unet.encoder_hidden_states"] = ehs
    t["unet.output"] = pipe.unet(sample, ts, encoder_hidden_states=ehs).sample
    meta["unet"] = {
        "sample": "torch.randn(2, in_channels, H/f, W/f, generator=Generator('cpu').manual_seed(11))",
        "timesteps": UNET_TIMESTEPS,
        "encoder_hidden_states": "cat([text_encoder(negative_prompt ids)[0], text.embeddings])",
        "output": "unet(sample, timesteps, encoder_hidden_states).sample",
    }

    # --- vae
    g = torch.Generator("cpu").manual_seed(12)
    sf = pipe.vae.config.scaling_factor
    lat = torch.randn(1, pipe.vae.config.latent_channels, h, w, generator=g) / sf
    t["vae.latents"] = lat
    t["vae.output"] = pipe.vae.decode(lat).sample
    meta["vae"] = {
        "scaling_factor": sf,
        "latents": "torch.randn(1, latent_channels, H/f, W/f, generator=Generator('cpu').manual_seed(12)) / scaling_factor",
        "output": "vae.decode(latents).sample",
    }

    # --- whole images
    images = {}
    names = list(FIRST_NAMES) + ["default"]
    for sname in names:
        r = dict(base, **req["per_image"].get(sname, {}))
        if sname == "default":
            cls_name, extra = own_scheduler_config["_class_name"], {}
            sched = getattr(diffusers, cls_name).from_config(own_scheduler_config)
        else:
            cls_name, extra = SCHEDULERS[sname]
            sched = getattr(diffusers, cls_name).from_config(own_scheduler_config, **extra)
        pipe.scheduler = sched
        final = {}

        def keep_latents(_pipe, step, _t, kw):
            final["latents"] = kw["latents"].clone()  # after the last step: what gets decoded
            return kw

        out = pipe(
            r["prompt"],
            negative_prompt=r["negative_prompt"],
            num_inference_steps=r["steps"],
            width=r["width"],
            height=r["height"],
            guidance_scale=r["guidance_scale"],
            generator=torch.Generator("cpu").manual_seed(r["seed"]),
            output_type="np",
            callback_on_step_end=keep_latents,
        ).images
        img = to_u8(out)
        assert img.shape == (r["height"], r["width"], 3)
        t[f"image.{sname}"] = img
        t[f"latents.{sname}"] = final["latents"]
        eff = {k: v for k, v in dict(sched.config).items() if not k.startswith("_")}
        images[sname] = dict(
            r,
            scheduler=None if sname == "default" else sname,
            scheduler_class=cls_name,
            from_config_overrides=extra,
            effective_scheduler_config=eff,
            timesteps=[float(x) for x in sched.timesteps],
        )
        st = img.float()
        print(f"{name} image.{sname}: mean {st.mean():.1f} std {st.std():.1f} "
              f"min {int(img.min())} max {int(img.max())} distinct {len(torch.unique(img))}")
    pipe.scheduler = getattr(diffusers, own_scheduler_config["_class_name"]).from_config(own_scheduler_config)
    meta["images"] = images
    meta["image_postprocess"] = "output_type='np' -> round(x*255) as u8, [H, W, 3]"
    meta["latents"] = ("latents.<name>: the denoised latents after the last scheduler step, "
                       "before division by scaling_factor and vae.decode")

    t = {k: v.contiguous() for k, v in t.items()}
    meta["tensors"] = {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in t.items()}
    save_file(t, os.path.join(out_root, f"{name}.safetensors"), metadata={"generated_by": "tools/make_tiny_models.py"})
    with open(os.path.join(out_root, f"{name}.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2, ensure_ascii=False)
        f.write("\n")
    sanity(name, t)


def sanity(name, t):
    """Fail loudly on references that would make weak tests."""
    for k, v in t.items():
        if v.is_floating_point():
            assert torch.isfinite(v).all(), k
    for k in ("text.embeddings", "unet.output", "vae.output"):
        s = float(t[k].std())
        print(f"{name} {k}: shape {list(t[k].shape)} std {s:.4f} min {float(t[k].min()):.3f} max {float(t[k].max()):.3f}")
        assert 0.05 < s < 50, (k, s)
    for k, v in t.items():
        if k.startswith("image."):
            assert float(v.float().std()) > 2.0 and len(torch.unique(v)) > 20, f"{k} is (nearly) flat"
    ids = t["text.input_ids"][0].tolist()
    assert ids[0] == 1000 and 1001 in ids, ids


def check_tokenizer(out_root, name):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(os.path.join(out_root, name, "tokenizer"))
    ids = tok("a photo of an astronaut riding a horse").input_ids
    print(f"{name} tokenizer: {len(tok)} ids, pad {tok.pad_token!r}={tok.pad_token_id}; "
          f"'a photo of an astronaut riding a horse' -> {ids} {tok.convert_ids_to_tokens(ids)}")
    assert len(tok) == 1002 and ids[0] == 1000 and ids[-1] == 1001


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--clip-bpe", help="path to bpe_simple_vocab_16e6.txt.gz (default: fetch the open_clip_torch wheel)")
    grp = ap.add_mutually_exclusive_group()
    grp.add_argument("--models-only", action="store_true")
    grp.add_argument("--refs-only", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    os.makedirs(args.out, exist_ok=True)
    if not args.refs_only:
        vocab, merges = tiny_clip_vocab(read_clip_bpe(args.clip_bpe))
        for name in MODELS:
            make_model(name, args.out, vocab, merges)
            check_tokenizer(args.out, name)
    if not args.models_only:
        for name in MODELS:
            make_refs(name, args.out)


if __name__ == "__main__":
    main()
