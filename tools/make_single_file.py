#!/usr/bin/env python3
"""Make single-file (original LDM / CompVis key names) checkpoints from a diffusers
folder, plus the pickle (.ckpt) fixtures the Rust loaders are tested against.
Pinned: torch 2.11.0, diffusers 0.42.1 (tools/requirements.txt).

diffusers ships only the LDM -> diffusers direction (loaders/single_file_utils.py,
the conversion scripts are not in the wheel), so the inverse map is written here
and checked by running diffusers' own `convert_ldm_unet_checkpoint`,
`convert_ldm_vae_checkpoint` and `convert_ldm_clip_checkpoint` on the result: they
must give back the original state dicts exactly, tensor for tensor.

Writes, under OUT (default crates/pipeline/tests/fixtures/single-file):
  tiny-a.safetensors     the whole tiny-a model in LDM keys, fp32 (as Civitai files)
  tiny-a-fp16.ckpt       the same state dict in fp16, `torch.save({"state_dict": ...,
                         "global_step": 7, "epoch": 1})`, zip format (fp16 halves the size)
  features.ckpt          zip-format torch.save of a dict exercising the pickle reader:
                         f32/f16/bf16/i64/u8/bool tensors, a view with a storage offset,
                         a transposed (non-contiguous) tensor, two tensors sharing one
                         storage, OrderedDict, nested list/tuple, int/float/str/bool/None
  features-legacy.ckpt   the same dict with _use_new_zipfile_serialization=False
  features.safetensors   the expected tensors of features*.ckpt (contiguous)
  features.json          the expected non-tensor values
  malicious-*.ckpt       pickles that would run a command if unpickled by Python
                         (os.system / builtins.exec / builtins.eval via REDUCE); each
                         command creates /tmp/sdserve_ckpt_pwned_<name>. They are
                         written with pickle.dumps, which runs nothing.

Usage:
  python tools/make_single_file.py [--model DIR] [--out DIR] [--no-check]
  python tools/make_single_file.py --model DIR --single-file OUT.safetensors [--dtype fp16]
"""

import argparse
import collections
import io
import json
import os
import pickle
import sys
import zipfile

import torch
from safetensors.torch import load_file, save_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "crates", "pipeline", "tests", "fixtures")

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."

RESNET_UNET = [  # diffusers -> LDM, inside a UNet ResBlock
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
]
UNET_SIMPLE = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
            # legacy diffusers spelling (pre-0.14 checkpoints)
            "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}


def _resnet_unet(rest):
    head, _, tail = rest.partition(".")
    for d, l in RESNET_UNET:
        if head == d:
            return f"{l}.{tail}"
    raise KeyError(rest)


def unet_to_ldm(sd, config):
    """diffusers UNet2DConditionModel state dict -> LDM `model.diffusion_model.*` keys."""
    L = config["layers_per_block"]
    up_has_attn = [t.startswith("CrossAttn") for t in config["up_block_types"]]
    out = {}
    for k, v in sd.items():
        p = k.split(".")
        mod, param = ".".join(p[:-1]), p[-1]
        if mod in UNET_SIMPLE:
            nk = f"{UNET_SIMPLE[mod]}.{param}"
        elif p[0] == "down_blocks":
            b, kind = int(p[1]), p[2]
            rest = ".".join(p[4:])
            if kind == "resnets":
                nk = f"input_blocks.{1 + b * (L + 1) + int(p[3])}.0.{_resnet_unet(rest)}"
            elif kind == "attentions":
                nk = f"input_blocks.{1 + b * (L + 1) + int(p[3])}.1.{rest}"
            elif kind == "downsamplers":  # down_blocks.b.downsamplers.0.conv.X
                nk = f"input_blocks.{1 + b * (L + 1) + L}.0.op.{'.'.join(p[5:])}"
            else:
                raise KeyError(k)
        elif p[0] == "mid_block":
            kind, i, rest = p[1], int(p[2]), ".".join(p[3:])
            if kind == "resnets":
                nk = f"middle_block.{2 * i}.{_resnet_unet(rest)}"
            else:
                nk = f"middle_block.1.{rest}"
        elif p[0] == "up_blocks":
            b, kind = int(p[1]), p[2]
            rest = ".".join(p[4:])
            if kind == "resnets":
                nk = f"output_blocks.{b * (L + 1) + int(p[3])}.0.{_resnet_unet(rest)}"
            elif kind == "attentions":
                nk = f"output_blocks.{b * (L + 1) + int(p[3])}.1.{rest}"
            elif kind == "upsamplers":
                slot = 2 if up_has_attn[b] else 1
                nk = f"output_blocks.{b * (L + 1) + L}.{slot}.conv.{'.'.join(p[5:])}"
            else:
                raise KeyError(k)
        else:
            raise KeyError(f"unexpected UNet key {k}")
        out[UNET_PREFIX + nk] = v
    return out


def vae_to_ldm(sd, config):
    n = len(config["block_out_channels"])
    out = {}
    for k, v in sd.items():
        p = k.split(".")
        side = p[0]  # encoder / decoder / quant_conv / post_quant_conv
        if side in ("quant_conv", "post_quant_conv"):
            nk = k
        elif p[1] in ("conv_in", "conv_out"):
            nk = k
        elif p[1] == "conv_norm_out":
            nk = f"{side}.norm_out.{p[2]}"
        elif p[1] in ("down_blocks", "up_blocks"):
            i, kind = int(p[2]), p[3]
            ldm_i = i if side == "encoder" else n - 1 - i
            word = "down" if side == "encoder" else "up"
            if kind == "resnets":
                rest = ".".join(p[5:]).replace("conv_shortcut", "nin_shortcut")
                nk = f"{side}.{word}.{ldm_i}.block.{p[4]}.{rest}"
            else:  # downsamplers.0.conv.X / upsamplers.0.conv.X
                samp = "downsample" if side == "encoder" else "upsample"
                nk = f"{side}.{word}.{ldm_i}.{samp}.{'.'.join(p[5:])}"
        elif p[1] == "mid_block":
            if p[2] == "resnets":
                rest = ".".join(p[4:]).replace("conv_shortcut", "nin_shortcut")
                nk = f"{side}.mid.block_{int(p[3]) + 1}.{rest}"
            else:  # attentions.0.<name>.<param>
                name = ".".join(p[4:-1])
                nk = f"{side}.mid.attn_1.{VAE_ATTN[name]}.{p[-1]}"
                if v.ndim == 2:  # LDM keeps these as 1x1 convolutions
                    v = v[:, :, None, None]
        else:
            raise KeyError(f"unexpected VAE key {k}")
        out[VAE_PREFIX + nk] = v
    return out


def clip_to_ldm(sd):
    # transformers >= 5 may save without the "text_model." prefix; LDM files always have it.
    return {CLIP_PREFIX + (k if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items()}


def load_folder(model_dir):
    def cfg(c):
        with open(os.path.join(model_dir, c, "config.json")) as f:
            return json.load(f)

    return dict(
        unet=(load_file(os.path.join(model_dir, "unet", "diffusion_pytorch_model.safetensors")), cfg("unet")),
        vae=(load_file(os.path.join(model_dir, "vae", "diffusion_pytorch_model.safetensors")), cfg("vae")),
        text_encoder=(load_file(os.path.join(model_dir, "text_encoder", "model.safetensors")), cfg("text_encoder")),
    )


def to_ldm(parts):
    ldm = {}
    ldm.update(unet_to_ldm(*parts["unet"]))
    ldm.update(vae_to_ldm(*parts["vae"]))
    ldm.update(clip_to_ldm(parts["text_encoder"][0]))
    return {k: v.contiguous() for k, v in ldm.items()}


def check_with_diffusers(ldm, parts):
    """diffusers' own LDM -> diffusers conversion must give back the original tensors."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    def same(name, got, want):
        if want and not any(k.startswith("text_model.") for k in want) and name == "text_encoder":
            want = {"text_model." + k: v for k, v in want.items()}
        if name == "vae":  # compare under the new attention names
            ren = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}
            w2 = {}
            for k, v in want.items():
                for a, b in ren.items():
                    k = k.replace(a, b)
                w2[k] = v
            want = w2
        if set(got) != set(want):
            raise SystemExit(f"{name}: key sets differ: missing {sorted(set(want) - set(got))[:5]}, "
                             f"extra {sorted(set(got) - set(want))[:5]}")
        for k in want:
            if got[k].shape != want[k].shape or not torch.equal(got[k], want[k]):
                raise SystemExit(f"{name}: tensor {k} differs")
        print(f"check: {name}: {len(want)} tensors identical after diffusers' LDM->diffusers conversion")

    same("unet", convert_ldm_unet_checkpoint(ldm, parts["unet"][1]), parts["unet"][0])
    same("vae", convert_ldm_vae_checkpoint(ldm, parts["vae"][1]), parts["vae"][0])
    same("text_encoder", convert_ldm_clip_checkpoint(ldm), parts["text_encoder"][0])


def features():
    """Tensors and plain values that exercise the pickle reader's corner cases."""
    g = torch.Generator().manual_seed(4)
    base = torch.randn(6, 5, generator=g)
    shared = torch.arange(12, dtype=torch.float32)
    tensors = collections.OrderedDict(
        f32=torch.randn(3, 4, generator=g),
        f16=torch.randn(2, 3, generator=g).half(),
        bf16=torch.randn(5, generator=g).bfloat16(),
        i64=torch.arange(-3, 4, dtype=torch.int64).reshape(1, 7),
        u8=torch.arange(0, 250, 50, dtype=torch.uint8),
        boolean=torch.tensor([True, False, True]),
        scalar=torch.tensor(2.5),
        offset_view=base[2:],  # storage offset 10
        transposed=base.t(),  # strides (1, 5)
        shared_a=shared[:6].view(2, 3),
        shared_b=shared[6:].view(3, 2),
    )
    obj = {
        "state_dict": tensors,
        "global_step": 123456,
        "lr": 0.25,
        "name": "features",
        "flags": [True, False, None],
        "pair": (1, -2),
        "big": 2**40,
    }
    expected = {k: v.contiguous().clone() for k, v in tensors.items()}
    plain = {"global_step": 123456, "lr": 0.25, "name": "features", "flags": [True, False, None],
             "pair": [1, -2], "big": 2**40}
    return obj, expected, plain


class _Evil:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return (self.fn, (self.arg,))


def malicious(out):
    """Pickles that run a command when Python unpickles them. pickle.dumps runs nothing."""
    import builtins

    import pickletools

    cases = {  # name: (callable, argument, pickle protocol: 2 writes GLOBAL, 4 STACK_GLOBAL)
        "os-system": (os.system, "touch /tmp/sdserve_ckpt_pwned_os-system", 2),
        "exec": (builtins.exec, "open('/tmp/sdserve_ckpt_pwned_exec', 'w').close()", 4),
        "eval": (builtins.eval, "open('/tmp/sdserve_ckpt_pwned_eval', 'w').close()", 2),
    }
    expected = {}
    for name, (fn, arg, proto) in cases.items():
        payload = pickle.dumps({"state_dict": {"x": _Evil(fn, arg)}}, protocol=proto)
        # The global as the pickle spells it (protocol 2 maps builtins to __builtin__).
        ops = list(pickletools.genops(payload))
        strings = [a for op, a, _ in ops if isinstance(a, str)]
        glob = next((a.replace(" ", ".") for op, a, _ in ops if op.name == "GLOBAL"), None)
        if glob is None:  # STACK_GLOBAL takes the two strings pushed before it
            glob = ".".join(strings[-3:-1]) if strings[-1] == arg else ".".join(strings[-2:])
        expected[f"malicious-{name}.ckpt"] = {"global": glob, "marker": f"/tmp/sdserve_ckpt_pwned_{name}"}
        path = os.path.join(out, f"malicious-{name}.ckpt")
        if name == "os-system":  # inside a torch-style zip, as data.pkl
            with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
                z.writestr("archive/data.pkl", payload)
                z.writestr("archive/version", "3\n")
        else:  # a bare pickle (what the legacy format starts with)
            with open(path, "wb") as f:
                f.write(payload)
        print(f"wrote {path} ({len(payload)} byte pickle; global {glob})")
    with open(os.path.join(out, "malicious.json"), "w") as f:
        json.dump(expected, f, indent=2)
        f.write("\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(FIXTURES, "tiny-a"))
    ap.add_argument("--out", default=os.path.join(FIXTURES, "single-file"))
    ap.add_argument("--single-file", help="only write this one LDM .safetensors and stop")
    ap.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32")
    ap.add_argument("--no-check", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    parts = load_folder(args.model)
    ldm = to_ldm(parts)
    if not args.no_check:
        check_with_diffusers(ldm, parts)
    if args.dtype == "fp16":
        ldm = {k: (v.half() if v.is_floating_point() else v) for k, v in ldm.items()}
    if args.single_file:
        save_file(ldm, args.single_file, metadata={"format": "pt"})
        print(f"wrote {args.single_file} ({len(ldm)} tensors)")
        return

    os.makedirs(args.out, exist_ok=True)
    name = os.path.basename(os.path.normpath(args.model))
    p = os.path.join(args.out, f"{name}.safetensors")
    save_file(ldm, p, metadata={"format": "pt"})
    print(f"wrote {p} ({len(ldm)} tensors)")

    half = {k: (v.half() if v.is_floating_point() else v) for k, v in ldm.items()}
    p = os.path.join(args.out, f"{name}-fp16.ckpt")
    torch.save({"state_dict": half, "global_step": 7, "epoch": 1}, p)
    print(f"wrote {p}")
    # torch.load(weights_only=True) is the reference safe reader: it must read our file back.
    back = torch.load(p, weights_only=True)["state_dict"]
    assert all(torch.equal(back[k], half[k]) for k in half)

    obj, expected, plain = features()
    torch.save(obj, os.path.join(args.out, "features.ckpt"))
    torch.save(obj, os.path.join(args.out, "features-legacy.ckpt"), _use_new_zipfile_serialization=False)
    save_file(expected, os.path.join(args.out, "features.safetensors"))
    with open(os.path.join(args.out, "features.json"), "w") as f:
        json.dump(plain, f, indent=2)
        f.write("\n")
    for fn in ("features.ckpt", "features-legacy.ckpt"):
        back = torch.load(os.path.join(args.out, fn), weights_only=True)
        assert all(torch.equal(back["state_dict"][k], expected[k]) for k in expected), fn
    print("wrote features.ckpt, features-legacy.ckpt, features.safetensors, features.json")

    malicious(args.out)


if __name__ == "__main__":
    sys.exit(main())
