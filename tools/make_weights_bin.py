#!/usr/bin/env python3
"""Diffusers folders whose weights are PyTorch pickle `.bin` files (no safetensors), made from
existing tiny fixtures, for crates/pipeline/tests/integration/pickle_weights.rs and the server's tests.

Many SD 1.5 fine-tunes (older diffusers saves, `save_pretrained(safe_serialization=False)`)
hold only `.bin` weights; diffusers and transformers load them when no safetensors exist.

  tiny-inpaint-bin/   tiny-inpaint (the smallest whole pipeline) re-saved:
    unet/diffusion_pytorch_model.bin   UNet2DConditionModel.save_pretrained(safe_serialization=False)
    vae/diffusion_pytorch_model.bin    AutoencoderKL.save_pretrained(safe_serialization=False)
    text_encoder/pytorch_model-0000{1,2}-of-00002.bin + pytorch_model.bin.index.json
        the safetensors file's tensors (position_ids included) in two shards, named and indexed
        as transformers writes them (huggingface_hub.split_torch_state_dict_into_shards, then
        torch.save per shard: transformers 5 no longer writes .bin itself)
    model_index.json, scheduler/, tokenizer/ copied byte for byte
  taesd/taesd-a-bin/  taesd-a (AutoencoderTiny) as `.bin`: the plain file as diffusers wrote it
    before it sharded (up to 0.2x: torch.save of the module's whole `state_dict()`, an OrderedDict
    carrying `_metadata`, as in older hub repos such as madebyollin/taesd), and the `.fp16.bin`
    variant by today's save_pretrained(variant="fp16", safe_serialization=False) of the fp16 model

The script checks that every tensor of each `.bin` equals the safetensors tensor it came from
(bit for bit), and that diffusers and transformers themselves load these folders (default
arguments: `.bin` only because no safetensors exist; the sharded text encoder by transformers),
so the names are the ones they read.

Pinned: torch 2.11.0, diffusers 0.42.1 (tools/requirements.txt).
Usage: python3 tools/make_weights_bin.py   (from the repo root, after make_img2img_fixtures.py and
make_taesd_fixtures.py, whose folders it re-saves: its name sorts after theirs, so
tools/make_fixtures.sh runs it after them)
"""

import json
import os
import shutil

import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "crates", "pipeline", "tests", "fixtures")
SRC = os.path.join(FIXTURES, "tiny-inpaint")
OUT = os.path.join(FIXTURES, "tiny-inpaint-bin")
TAESD_SRC = os.path.join(FIXTURES, "taesd", "taesd-a")
TAESD_OUT = os.path.join(FIXTURES, "taesd", "taesd-a-bin")


def same_tensors(a, b, what):
    assert sorted(a) == sorted(b), f"{what}: keys differ"
    for k in a:
        x, y = a[k], b[k]
        assert x.dtype == y.dtype and x.shape == y.shape, f"{what}: {k}"
        assert torch.equal(x.view(-1).view(torch.uint8) if x.is_floating_point() else x,
                           y.view(-1).view(torch.uint8) if y.is_floating_point() else y), f"{what}: {k}"


def pickled(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@torch.no_grad()
def tiny_inpaint_bin():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from huggingface_hub import split_torch_state_dict_into_shards
    from transformers import CLIPTextModel

    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    for name in ["model_index.json", "scheduler", "tokenizer"]:
        src, dst = os.path.join(SRC, name), os.path.join(OUT, name)
        (shutil.copytree if os.path.isdir(src) else shutil.copyfile)(src, dst)

    for comp, cls in [("unet", UNet2DConditionModel), ("vae", AutoencoderKL)]:
        model = cls.from_pretrained(os.path.join(SRC, comp))
        model.save_pretrained(os.path.join(OUT, comp), safe_serialization=False)
        assert sorted(os.listdir(os.path.join(OUT, comp))) == ["config.json", "diffusion_pytorch_model.bin"]
        want = load_file(os.path.join(SRC, comp, "diffusion_pytorch_model.safetensors"))
        same_tensors(pickled(os.path.join(OUT, comp, "diffusion_pytorch_model.bin")), want, comp)
        # diffusers' own loader takes the .bin (no safetensors there) with default arguments.
        again = cls.from_pretrained(os.path.join(OUT, comp))
        same_tensors(again.state_dict(), model.state_dict(), f"{comp} reloaded by diffusers")

    te_out = os.path.join(OUT, "text_encoder")
    os.makedirs(te_out)
    shutil.copyfile(os.path.join(SRC, "text_encoder", "config.json"), os.path.join(te_out, "config.json"))
    state = load_file(os.path.join(SRC, "text_encoder", "model.safetensors"))
    total = sum(t.numel() * t.element_size() for t in state.values())
    split = split_torch_state_dict_into_shards(
        state, filename_pattern="pytorch_model{suffix}.bin", max_shard_size=total // 2 + 1
    )
    assert split.is_sharded and len(split.filename_to_tensors) == 2, split.filename_to_tensors.keys()
    for filename, names in split.filename_to_tensors.items():
        torch.save({n: state[n].contiguous() for n in names}, os.path.join(te_out, filename))
    with open(os.path.join(te_out, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": split.metadata, "weight_map": split.tensor_to_filename}, f, indent=2, sort_keys=True)
        f.write("\n")
    shards = {}
    for filename in split.filename_to_tensors:
        shards.update(pickled(os.path.join(te_out, filename)))
    same_tensors(shards, state, "text_encoder")
    # transformers' own loader reads the sharded .bin (no safetensors there).
    te = CLIPTextModel.from_pretrained(te_out)
    ref = CLIPTextModel.from_pretrained(os.path.join(SRC, "text_encoder"))
    same_tensors(te.state_dict(), ref.state_dict(), "text_encoder reloaded by transformers")
    print(f"tiny-inpaint-bin: unet, vae (.bin), text_encoder ({len(split.filename_to_tensors)} .bin shards)")


@torch.no_grad()
def taesd_a_bin():
    from diffusers import AutoencoderTiny

    if os.path.isdir(TAESD_OUT):
        shutil.rmtree(TAESD_OUT)
    model = AutoencoderTiny.from_pretrained(TAESD_SRC)
    os.makedirs(TAESD_OUT)
    model.save_config(TAESD_OUT)
    state = model.state_dict()
    assert hasattr(state, "_metadata"), "state_dict() without _metadata"
    torch.save(state, os.path.join(TAESD_OUT, "diffusion_pytorch_model.bin"))
    half = AutoencoderTiny.from_pretrained(TAESD_SRC, variant="fp16", torch_dtype=torch.float16)
    half.save_pretrained(TAESD_OUT, safe_serialization=False, variant="fp16")
    assert sorted(os.listdir(TAESD_OUT)) == [
        "config.json", "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"
    ], os.listdir(TAESD_OUT)
    for variant in ["", ".fp16"]:
        want = load_file(os.path.join(TAESD_SRC, f"diffusion_pytorch_model{variant}.safetensors"))
        got = pickled(os.path.join(TAESD_OUT, f"diffusion_pytorch_model{variant}.bin"))
        same_tensors(got, want, f"taesd-a{variant}")
    again = AutoencoderTiny.from_pretrained(TAESD_OUT, variant="fp16", torch_dtype=torch.float16)
    same_tensors(again.state_dict(), half.state_dict(), "taesd-a fp16 reloaded by diffusers")
    again = AutoencoderTiny.from_pretrained(TAESD_OUT)
    same_tensors(again.state_dict(), model.state_dict(), "taesd-a reloaded by diffusers")
    print("taesd-a-bin: diffusion_pytorch_model.bin (an OrderedDict with _metadata) and .fp16.bin")


if __name__ == "__main__":
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    tiny_inpaint_bin()
    taesd_a_bin()
