#!/usr/bin/env python3
"""LoRA and textual-inversion references for crates/pipeline/tests/integration/adapters.rs.

Made from tiny-a (tools/make_tiny_models.py):
  loras/ink_kohya.safetensors   kohya/A1111 names (lora_unet_*; .lora_down/.lora_up/.alpha):
                                every attention and feed-forward linear, proj_in/proj_out, and
                                (LoCon) every resnet conv1/conv2/conv_shortcut/time_emb_proj and
                                sampler conv of the UNet; rank 4, alpha 2 (scale 0.5). No text
                                encoder layers: diffusers 0.42.1 with transformers 5.24 does not
                                load kohya text-encoder keys (its load report lists them MISSING),
                                so it cannot be the reference for them; see te_kohya below.
  loras/soft_peft.safetensors   diffusers/PEFT names (unet.*.lora_A/lora_B, text_encoder.*), written
                                by StableDiffusionPipeline.save_lora_weights; rank 2, attention only
  loras/te_kohya.safetensors    soft_peft's text-encoder layers renamed to kohya's lora_te_* keys with
                                alpha = rank: the same text conditioning as soft_peft by construction
  embeddings/tinystyle.pt       A1111 textual inversion ({"string_to_param": {"*": [2, D]}})
  embeddings/tinyneg.safetensors  {"emb_params": [1, D]}
  adapters.safetensors / adapters.json: whole images (64x64, euler) from diffusers 0.42
    load_lora_weights + set_adapters (one LoRA, the other, both with weights) and
    load_textual_inversion, plus the text embeddings of the embedding prompts.

Pinned: torch 2.11.0, diffusers 0.42.1, transformers 5.24.0, peft (tools/requirements.txt).
Usage: python3 tools/make_adapter_fixtures.py   (after tools/make_tiny_models.py)
"""

import json
import os

import torch
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "crates", "pipeline", "tests", "fixtures")
OUT = os.path.join(FIXTURES, "adapters")
BASE_MODEL = os.path.join(FIXTURES, "tiny-a")

REQUEST = dict(prompt="a photo of an astronaut riding a horse on mars", negative_prompt="blurry, low quality",
               steps=6, width=64, height=64, seed=21, guidance_scale=7.5, scheduler="euler")
# name -> [(lora, weight)]
LORA_IMAGES = {
    "kohya": [("ink_kohya", 0.8)],
    "peft": [("soft_peft", 1.0)],
    "both": [("ink_kohya", 0.6), ("soft_peft", -0.7)],
}
EMBEDDING_IMAGES = {
    "tinystyle": dict(prompt="a photo of tinystyle riding a horse", negative_prompt="tinyneg"),
}


def linear_and_conv_modules(module, kinds):
    for name, m in module.named_modules():
        if isinstance(m, kinds):
            yield name, m


def unet_targets(unet, with_convs):
    """diffusers module paths a kohya LoRA (+ LoCon) adapts."""
    out = []
    for name, m in unet.named_modules():
        leaf = name.split(".")[-1]
        if ".attentions." in name and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            if leaf in ("to_q", "to_k", "to_v", "0", "proj", "2", "proj_in", "proj_out"):
                out.append((name, m))
        elif with_convs and ".resnets." in name and leaf in ("conv1", "conv2", "conv_shortcut", "time_emb_proj"):
            out.append((name, m))
        elif with_convs and ("downsamplers" in name or "upsamplers" in name) and leaf == "conv":
            out.append((name, m))
    return out


def te_targets(text_encoder):
    return [(n, m) for n, m in text_encoder.named_modules()
            if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")]


def lora_pair(m, rank, g, scale):
    if isinstance(m, torch.nn.Conv2d):
        k = m.kernel_size
        down = torch.randn(rank, m.in_channels, *k, generator=g) * scale
        up = torch.randn(m.out_channels, rank, 1, 1, generator=g) * scale
    else:
        down = torch.randn(rank, m.in_features, generator=g) * scale
        up = torch.randn(m.out_features, rank, generator=g) * scale
    return down, up


def make_kohya(pipe, path):
    g = torch.Generator().manual_seed(77)
    rank, alpha = 4, 2.0
    sd = {}
    for prefix, targets in (("lora_unet_", unet_targets(pipe.unet, True)),):
        for name, m in targets:
            if prefix == "lora_te_" and not name.startswith("text_model."):
                name = "text_model." + name
            key = prefix + name.replace(".", "_")
            down, up = lora_pair(m, rank, g, 0.35)
            sd[f"{key}.lora_down.weight"] = down.contiguous()
            sd[f"{key}.lora_up.weight"] = up.contiguous()
            sd[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(sd, path, metadata={"ss_network_module": "lycoris.kohya", "generated_by": "tools/make_adapter_fixtures.py"})
    return len([k for k in sd if k.endswith("lora_down.weight")])


def make_peft(pipe, dirpath, name):
    from diffusers import StableDiffusionPipeline
    g = torch.Generator().manual_seed(78)
    rank = 2
    unet_layers, te_layers = {}, {}
    for n, m in pipe.unet.named_modules():
        if n.split(".")[-1] in ("to_q", "to_k", "to_v") or n.endswith("to_out.0"):
            down, up = lora_pair(m, rank, g, 0.5)
            unet_layers[f"{n}.lora_A.weight"] = down
            unet_layers[f"{n}.lora_B.weight"] = up
    for n, m in te_targets(pipe.text_encoder):
        if n.split(".")[-1] in ("q_proj", "v_proj"):
            down, up = lora_pair(m, rank, g, 0.5)
            te_layers[f"{n}.lora_A.weight"] = down
            te_layers[f"{n}.lora_B.weight"] = up
    StableDiffusionPipeline.save_lora_weights(dirpath, unet_lora_layers=unet_layers,
                                              text_encoder_lora_layers=te_layers,
                                              weight_name=f"{name}.safetensors", safe_serialization=True)
    # The same text-encoder layers under kohya's names.
    kohya = {}
    for k, v in te_layers.items():
        module, kind = k.rsplit(".lora_", 1)
        if not module.startswith("text_model."):
            module = "text_model." + module
        key = "lora_te_" + module.replace(".", "_")
        if kind == "A.weight":
            kohya[f"{key}.lora_down.weight"] = v.contiguous()
            kohya[f"{key}.alpha"] = torch.tensor(float(v.shape[0]))
        else:
            kohya[f"{key}.lora_up.weight"] = v.contiguous()
    save_file(kohya, os.path.join(dirpath, "te_kohya.safetensors"))
    return len(unet_layers) // 2 + len(te_layers) // 2


def make_embeddings(pipe, dirpath):
    g = torch.Generator().manual_seed(79)
    d = pipe.text_encoder.config.hidden_size
    style = torch.randn(2, d, generator=g) * 0.5
    neg = torch.randn(1, d, generator=g) * 0.5
    # A1111's layout: a dict with string_to_param {"*": vectors} and bookkeeping fields.
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.nn.Parameter(style)}, "name": "tinystyle",
                "step": 100, "sd_checkpoint": None, "sd_checkpoint_name": None},
               os.path.join(dirpath, "tinystyle.pt"))
    save_file({"emb_params": neg.contiguous()}, os.path.join(dirpath, "tinyneg.safetensors"))


def to_u8(images_np):
    return torch.from_numpy((images_np[0] * 255).round().astype("uint8"))


def generate(pipe, prompt, negative):
    import diffusers
    from api_schedulers import SCHEDULERS
    cls_name, extra = SCHEDULERS[REQUEST["scheduler"]]
    pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **extra)
    out = pipe(prompt, negative_prompt=negative, num_inference_steps=REQUEST["steps"],
               width=REQUEST["width"], height=REQUEST["height"], guidance_scale=REQUEST["guidance_scale"],
               generator=torch.Generator("cpu").manual_seed(REQUEST["seed"]), output_type="np").images
    return to_u8(out)


def main():
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from diffusers import StableDiffusionPipeline

    torch.set_grad_enabled(False)
    for sub in ("loras", "embeddings"):
        os.makedirs(os.path.join(OUT, sub), exist_ok=True)
    load = lambda: StableDiffusionPipeline.from_pretrained(
        BASE_MODEL, dtype=torch.float32, safety_checker=None, requires_safety_checker=False)
    pipe = load()
    pipe.set_progress_bar_config(disable=True)
    n_kohya = make_kohya(pipe, os.path.join(OUT, "loras", "ink_kohya.safetensors"))
    n_peft = make_peft(pipe, os.path.join(OUT, "loras"), "soft_peft")
    make_embeddings(pipe, os.path.join(OUT, "embeddings"))
    print(f"kohya: {n_kohya} layers, peft: {n_peft} layers")

    tensors, meta = {}, {"generated_by": "tools/make_adapter_fixtures.py", "base_model": "tiny-a",
                         "request": REQUEST, "loras": LORA_IMAGES, "embeddings": EMBEDDING_IMAGES}
    base = generate(pipe, REQUEST["prompt"], REQUEST["negative_prompt"])
    tensors["image.base"] = base
    pipe.load_lora_weights(os.path.join(OUT, "loras", "ink_kohya.safetensors"), adapter_name="ink_kohya")
    pipe.load_lora_weights(os.path.join(OUT, "loras", "soft_peft.safetensors"), adapter_name="soft_peft")
    for name, loras in LORA_IMAGES.items():
        pipe.set_adapters([n for n, _ in loras], adapter_weights=[w for _, w in loras])
        img = generate(pipe, REQUEST["prompt"], REQUEST["negative_prompt"])
        tensors[f"image.lora.{name}"] = img
        diff = (img.float() - base.float()).abs().mean()
        print(f"image.lora.{name}: mean abs diff from the base image {diff:.1f}")
        assert diff > 3.0, f"{name}: the LoRA barely changes the image"
    pipe.unload_lora_weights()
    assert torch.equal(generate(pipe, REQUEST["prompt"], REQUEST["negative_prompt"]), base)

    pipe = load()
    pipe.set_progress_bar_config(disable=True)
    pipe.load_textual_inversion(os.path.join(OUT, "embeddings", "tinystyle.pt"), token="tinystyle")
    pipe.load_textual_inversion(os.path.join(OUT, "embeddings", "tinyneg.safetensors"), token="tinyneg")
    for name, r in EMBEDDING_IMAGES.items():
        cond, uncond = pipe.encode_prompt(r["prompt"], "cpu", 1, True, r["negative_prompt"])
        tensors[f"embedding.{name}.cond"] = cond
        tensors[f"embedding.{name}.uncond"] = uncond
        tensors[f"image.embedding.{name}"] = generate(pipe, r["prompt"], r["negative_prompt"])

    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, os.path.join(OUT, "adapters.safetensors"), metadata={"generated_by": "tools/make_adapter_fixtures.py"})
    with open(os.path.join(OUT, "adapters.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
