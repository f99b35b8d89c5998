#!/usr/bin/env python3
"""LyCORIS references (LoHa, LoKr, IA3, GLoRA, full diffs, LoCon's CP form, DoRA, OFT/BOFT, norm layers) for the
tiny model, with A1111's
own module code: crates/pipeline/tests/integration/lycoris.rs and crates/server/tests/integration/lycoris_http.rs.

A1111's Lora extension runs here, imported from a checkout of
AUTOMATIC1111/stable-diffusion-webui (not copied): extensions-builtin/Lora/network.py
(`NetworkModule.finalize_updown`, `calc_scale`: the file's `scale`, else `alpha / dim`, else 1;
`multiplier`), network_lora.py (with `lora_mid`), network_hada.py, network_lokr.py,
network_full.py, network_norm.py, network_oft.py and lyco_helpers.py, with small stubs for the webui's `modules` they import.
Each layer's delta is `calc_updown(weight)`, what `networks.network_apply_weights` adds to the
weight; the module types are tried in networks.py's order.

Writes, under OUT (default crates/pipeline/tests/fixtures/adapters), in lycoris/ (a LORA_DIR)
files in the layouts LyCORIS saves (kohya key names, lora_unet_* and lora_te_*), for tiny-a:
  loha.safetensors    LoHa: every attention linear and proj_in/proj_out of down_blocks.0 and
                      up_blocks.1 (rank 4, alpha 2), down_blocks.0's resnet conv1 (3x3, the kernel
                      flattened into hada_w*_b as LyCORIS writes it; rank 2, alpha 1),
                      up_blocks.1's resnet conv2 in Tucker form (hada_t1/hada_t2), and text
                      encoder layer 0's q_proj, v_proj, fc1
  lokr.safetensors    LoKr: w1 whole and w2 low-rank (attention), w1 low-rank and w2 whole (ff in),
                      both low-rank with different ranks (ff out: alpha over w2's rank), both
                      whole (proj_in/proj_out: alpha present and not used), a 3x3 conv with a 4-D
                      w2, one with w2 low-rank and the kernel flattened, one with Tucker lokr_t2,
                      and text encoder q_proj and fc1 (37 outputs: w1 of one row)
  full.safetensors    full diffs (`diff`): attention, a 3x3 and a 1x1 conv, time_emb_proj, a text
                      encoder layer; one layer with an alpha (not used), one with a `scale`;
                      bias diffs (`diff_b`, A1111's ex_bias: times the multiplier, not the
                      scale, added to the layer's bias) on to_out.0, both convs, time_emb_proj
                      and the text encoder's out_proj
  mixed.safetensors   one file of several types: LoCon in CP form (lora_mid), LoHa, LoKr, full,
                      and a plain LoRA text encoder layer
  dora.safetensors    DoRA (`dora_scale`, A1111's `apply_weight_decompose`) with LoRA, LoCon's
                      CP form, LoHa, LoKr and a full diff: per input channel (`[1, in]`,
                      `[1, in, 1, 1]`: 1x1 and 3x3 convolutions) and per output channel
                      (`[out, 1]`, LyCORIS's wd_on_out, which A1111 broadcasts as it is), on
                      layers the LoHa file also changes, and text encoder layers; each scale
                      the base weight's norms times 1 + 0.3 * noise
  ia3.safetensors     IA3 (`weight`, `on_input`: A1111's `W * w` by output row or input column)
                      on attention and feed-forward linears (one with a `scale` and an unused
                      alpha, one with DoRA) and text encoder layers
  glora.safetensors   GLoRA (`a1`, `a2`, `b1`, `b2`: A1111's `b2 @ b1 + (W @ a2) @ a1`; its
                      alpha is required and not used) on attention and feed-forward linears
                      (one with a `scale`, one with DoRA) and a text encoder layer
  oft.safetensors     OFT as LyCORIS saves it (`oft_blocks` [blocks, n, n], `alpha` the
                      constraint, optional `rescale` [out, 1, ...]): A1111's Cayley rotation of each
                      block of output rows, `R^T W`, minus W; the constraint clamping the norm
                      (one layer), not reached (one), absent (one); a rescale; a 3x3 conv; DoRA
                      on one layer; a text encoder layer
  boft.safetensors    BOFT (`oft_blocks` [m, blocks, b, b]): A1111's butterfly of m rotations, with
                      a constraint and a rescale, on linears, a conv and a text encoder layer
  oft_diag.safetensors
                      the old LyCORIS OFT (`oft_diag`: R itself, no Cayley, alpha not used)
  norm.safetensors    norm-layer diffs (`w_norm`, `b_norm`: added to a GroupNorm's or LayerNorm's
                      weight and bias, the weight's times calc_scale and the multiplier, the
                      bias's times the multiplier): resnets' and attentions' GroupNorms,
                      transformer blocks' LayerNorms, text encoder layer norms; one with a
                      `scale`, one with an unused alpha; a full diff with diff_b on a norm
  kohya_oft.safetensors
                      kohya-ss sd-scripts' OFT (networks/oft.py: `oft_unet_<path>.oft_blocks`,
                      `.alpha`, one block count and alpha for every CrossAttention linear and two
                      resnet convolutions), which A1111's load_network matches in SDXL models only:
                      its deltas are A1111's OFT module's, and, with SD_SCRIPTS_DIR set to a
                      checkout of sd-scripts, checked against kohya's own OFTInfModule.merge_to
                      (its classes run as they are)
  ignored_norms.safetensors
                      a full diff on the UNet's conv_norm_out and a norm diff on the text
                      encoder's final_layer_norm, which A1111 does not match in an SD 1.5 model
                      (left out of the images and deltas), beside norm diffs it does match
  bias.safetensors, norm_half.safetensors
                      types A1111 loads and this server refuses by name (a LoHa with a diff_b
                      that A1111 ignores; a norm module with w_norm and no b_norm, which no
                      A1111 module type takes)
and beside that folder:
  lycoris.safetensors / lycoris.json
                      delta.<file>.<part>.<module>: A1111's delta for a layer of each form, at
                      multiplier 1 (delta.<...>.<module>.bias: its ex_bias, for a diff_b or a
                      b_norm; DoRA's, IA3's, GLoRA's and OFT's from tiny-a's weights);
                      delta.<case>.<part>.<module>: a case's whole change of each DoRA, IA3,
                      GLoRA or OFT layer's weight (cases of several files);
                      image.base and image.<case>: diffusers images (64x64, euler)
                      with A1111's deltas for the case's files and multipliers added to the
                      weights (the layers A1111 matches, and kohya's OFT);
                      a1111_unmatched in lycoris.json: the modules of each file networks.py's
                      load_network (key conversion and matching, run as it is) leaves out in
                      tiny-a, named as A1111 names an SD 1.5 model's modules
Pinned: torch 2.11.0, diffusers 0.42.1 (tools/requirements.txt).

Usage:
  [SD_SCRIPTS_DIR=PATH/TO/sd-scripts] python tools/make_lycoris_fixtures.py --a1111 PATH/TO/stable-diffusion-webui [--out DIR]
"""

import hashlib
import json
import os
import sys
import types

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from a1111_source import a1111_args  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "crates", "pipeline", "tests", "fixtures")
DEFAULT_OUT = os.path.join(FIXTURES, "adapters")
BASE_MODEL = os.path.join(FIXTURES, "tiny-a")

REQUEST = dict(prompt="a photo of an astronaut riding a horse on mars", negative_prompt="blurry, low quality",
               steps=6, width=64, height=64, seed=21, guidance_scale=7.5, scheduler="euler")
# case -> [(file, multiplier)]
CASES = {
    "loha": [("loha", 0.8)],
    "lokr": [("lokr", 1.0)],
    "full": [("full", 0.7)],
    "mixed": [("mixed", 1.0)],
    "loha_lokr": [("loha", 0.6), ("lokr", -0.5)],
    "dora": [("dora", 0.8)],
    # DoRA decomposes the weight the earlier files left (A1111 merges them in order).
    "loha_dora": [("loha", 0.6), ("dora", -0.7)],
    "dora_loha": [("dora", 1.0), ("loha", 0.6)],
    "ia3": [("ia3", 1.0)],
    # IA3 scales the weight the earlier files left.
    "loha_ia3": [("loha", 0.6), ("ia3", -0.8)],
    "glora": [("glora", 1.0)],
    "loha_glora": [("loha", 0.6), ("glora", 0.8)],
    "oft": [("oft", 0.8)],
    "boft": [("boft", 1.0)],
    "oft_diag": [("oft_diag", 0.9)],
    "norm": [("norm", 0.8)],
    # OFT rotates the weight the earlier files left; norm diffs add up with the others.
    "loha_oft": [("loha", 0.6), ("oft", -0.7)],
    "lokr_norm_boft": [("lokr", 0.5), ("norm", 1.0), ("boft", 0.6)],
    # kohya's OFT, which A1111 leaves out of an SD 1.5 model: applied as kohya's oft.py merges it.
    "kohya_oft": [("kohya_oft", 0.8)],
    # Only the layers A1111 matches.
    "ignored_norms": [("ignored_norms", 1.0)],
}
# The files whose deltas depend on the weight (a case of several files keeps their whole change).
FROM_WEIGHT = {"dora", "ia3", "glora", "oft", "boft", "oft_diag", "kohya_oft"}
# Files applied whole though A1111's load_network matches none of their keys in an SD 1.5 model.
APPLIED_UNMATCHED = {"kohya_oft"}
A1111_SOURCES = ["network.py", "network_lora.py", "network_hada.py", "network_ia3.py", "network_lokr.py",
                 "network_full.py", "network_norm.py", "network_glora.py", "network_oft.py", "lyco_helpers.py"]


def a1111(root):
    """A1111's module types (networks.py's order, as far as the files here use them)."""
    lora_dir = os.path.join(root, "extensions-builtin", "Lora")
    # The webui modules these files import, as far as calc_updown uses them.
    mods = {}
    for name in ["modules", "modules.sd_models", "modules.cache", "modules.errors", "modules.hashes",
                 "modules.shared", "modules.devices", "modules.models", "modules.models.sd3",
                 "modules.models.sd3.mmdit"]:
        mods[name] = types.ModuleType(name)
        sys.modules[name] = mods[name]
    for parent, child in [("modules", "sd_models"), ("modules", "cache"), ("modules", "errors"),
                          ("modules", "hashes"), ("modules", "shared"), ("modules", "devices"),
                          ("modules", "models"), ("modules.models", "sd3"), ("modules.models.sd3", "mmdit")]:
        setattr(mods[parent], child, mods[f"{parent}.{child}"])
    mods["modules.devices"].cpu = torch.device("cpu")
    mods["modules.devices"].device = torch.device("cpu")
    mods["modules.devices"].dtype = torch.float32
    mods["modules.models.sd3.mmdit"].QkvLinear = type("QkvLinear", (torch.nn.Linear,), {})
    sys.path.insert(0, lora_dir)
    import network, network_full, network_glora, network_hada, network_ia3, network_lokr, network_lora  # noqa: E401
    import network_norm, network_oft  # noqa: E401
    digests = {}
    for f in A1111_SOURCES:
        with open(os.path.join(lora_dir, f), "rb") as fh:
            digests[f] = hashlib.sha256(fh.read()).hexdigest()
    module_types = [network_lora.ModuleTypeLora(), network_hada.ModuleTypeHada(), network_ia3.ModuleTypeIa3(),
                    network_lokr.ModuleTypeLokr(), network_full.ModuleTypeFull(), network_norm.ModuleTypeNorm(),
                    network_glora.ModuleTypeGLora(), network_oft.ModuleTypeOFT()]
    return network, module_types, digests


def a1111_load_network(root, network, module_types):
    """networks.py's `load_network` (its key conversion and module matching), run as it is against
    an SD 1.5 model's module names (tiny-a's, as A1111 names them: the LDM checkpoint's, through
    tools/make_single_file.py). Returns (digests, unmatched(path)): the module names of a file's
    keys that it leaves out (A1111 logs them at debug level and loads the rest)."""
    import logging
    import re
    from a1111_source import functions
    from make_single_file import load_folder, to_ldm
    path = os.path.join(root, "extensions-builtin", "Lora", "networks.py")
    ns = {"os": os, "re": re, "logging": logging, "network": network, "module_types": module_types}
    with open(path, encoding="utf-8") as f:
        tree = __import__("ast").parse(f.read())
    wanted = {"re_digits", "re_x_proj", "re_compiled", "suffix_conversion"}
    for node in tree.body:
        if isinstance(node, __import__("ast").Assign) and {getattr(t, "id", None) for t in node.targets} & wanted:
            exec(compile(__import__("ast").Module(body=[node], type_ignores=[]), path, "exec"), ns)
    fns, digests = functions(path, ["convert_diffusers_name_to_compvis", "load_network"], ns)
    # assign_network_names_to_compvis_modules: every module (containers too) of model.* and of
    # cond_stage_model (its `transformer`), dots as underscores. A linear stands for each: the
    # module types only read its shape when created.
    names = set()
    for key in to_ldm(load_folder(BASE_MODEL)):
        for prefix in ("model.", "cond_stage_model."):
            if key.startswith(prefix):
                parts = key[len(prefix):].split(".")[:-1]
                names.update("_".join(parts[:i]) for i in range(1, len(parts) + 1))
    stand_in = torch.nn.Linear(64, 64)
    model = types.SimpleNamespace(network_layer_mapping={n: stand_in for n in names})
    ns["shared"] = types.SimpleNamespace(sd_model=model)

    def unmatched(file):
        from safetensors.torch import load_file
        sd = load_file(file)
        ns["sd_models"] = types.SimpleNamespace(read_state_dict=lambda _: sd)
        net = fns["load_network"]("ref", types.SimpleNamespace(filename=file))
        matched = {m.network_key.partition(".")[0] for m in net.modules.values()}
        return sorted({k.partition(".")[0] for k in sd} - matched)

    return digests, unmatched


def kohya_oft_check(w, sd_module, multiplier):
    """With SD_SCRIPTS_DIR (a checkout of kohya-ss/sd-scripts): what kohya's own networks/oft.py
    adds to the weight (OFTInfModule.merge_to: the Cayley blocks, `multiplier * (R - I) + I`,
    `R^T W` block by block), its classes taken with `ast` and run as they are; else None."""
    root = os.environ.get("SD_SCRIPTS_DIR")
    if not root:
        return None
    import ast
    import einops
    path = os.path.join(root, "networks", "oft.py")
    with open(path, encoding="utf-8") as f:
        source = f.read()
    nodes = [n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name in ("OFTModule", "OFTInfModule")]
    ns = {"torch": torch, "einops": einops, "F": torch.nn.functional, "OFTNetwork": None}
    exec(compile(ast.Module(body=nodes, type_ignores=[]), path, "exec"), ns)
    if isinstance(sd_module, torch.nn.Linear):
        org = torch.nn.Linear(sd_module.in_features, sd_module.out_features, bias=sd_module.bias is not None)
    else:
        org = torch.nn.Conv2d(sd_module.in_channels, sd_module.out_channels, sd_module.kernel_size,
                              bias=sd_module.bias is not None)
    org.load_state_dict(sd_module.state_dict())
    m = ns["OFTInfModule"]("oft", org, multiplier, w["oft_blocks"].shape[0], w["alpha"])
    m.oft_blocks.data.copy_(w["oft_blocks"])
    m.merge_to()
    return org.weight.detach() - sd_module.weight.detach()


def calc_updown(a, key, w, sd_module, part, multiplier):
    """What A1111 adds to `sd_module.weight` for the module of `key` with weights `w`."""
    network, module_types, _ = a
    net = network.Network("ref", None)
    net.te_multiplier = net.unet_multiplier = multiplier
    sd_key = ("transformer_" if part == "te" else "diffusion_model_") + key
    weights = network.NetworkWeights(network_key=key, sd_key=sd_key, w=dict(w), sd_module=sd_module)
    for t in module_types:
        m = t.create_module(net, weights)
        if m is not None:
            break
    assert m is not None, key
    updown, ex_bias = m.calc_updown(sd_module.weight)
    return updown.reshape(sd_module.weight.shape), ex_bias


def factorization(n):
    """Two factors of n, the smaller first (LyCORIS splits dims so; any split is a valid file)."""
    m = int(n ** 0.5)
    while n % m:
        m -= 1
    return m, n // m


def kohya_key(part, path, prefix=None):
    if prefix:
        return prefix + path.replace(".", "_")
    if part == "te":
        return "lora_te_" + path.replace(".", "_")
    return "lora_unet_" + path.replace(".", "_")


def dims(m):
    if isinstance(m, torch.nn.Conv2d):
        return m.out_channels, m.in_channels, m.kernel_size
    return m.out_features, m.in_features, (1, 1)


def loha(m, g, rank, tucker=False):
    out, inp, k = dims(m)
    flat = inp * k[0] * k[1]
    if tucker:
        return {"hada_t1": torch.randn(rank, rank, *k, generator=g), "hada_w1_a": torch.randn(rank, out, generator=g),
                "hada_w1_b": torch.randn(rank, inp, generator=g),
                "hada_t2": torch.randn(rank, rank, *k, generator=g), "hada_w2_a": torch.randn(rank, out, generator=g),
                "hada_w2_b": torch.randn(rank, inp, generator=g)}
    return {"hada_w1_a": torch.randn(out, rank, generator=g), "hada_w1_b": torch.randn(rank, flat, generator=g),
            "hada_w2_a": torch.randn(out, rank, generator=g), "hada_w2_b": torch.randn(rank, flat, generator=g)}


def lokr(m, g, w1_rank=None, w2_rank=None, tucker=False, conv_w2_4d=False):
    out, inp, k = dims(m)
    a, c = factorization(out)
    b, d = factorization(inp)
    kk = k[0] * k[1]
    w = {}
    if w1_rank:
        w["lokr_w1_a"] = torch.randn(a, w1_rank, generator=g)
        w["lokr_w1_b"] = torch.randn(w1_rank, b, generator=g)
    else:
        w["lokr_w1"] = torch.randn(a, b, generator=g)
    if tucker:
        w["lokr_t2"] = torch.randn(w2_rank, w2_rank, *k, generator=g)
        w["lokr_w2_a"] = torch.randn(w2_rank, c, generator=g)
        w["lokr_w2_b"] = torch.randn(w2_rank, d, generator=g)
    elif w2_rank:
        w["lokr_w2_a"] = torch.randn(c, w2_rank, generator=g)
        w["lokr_w2_b"] = torch.randn(w2_rank, d * kk, generator=g)
    elif conv_w2_4d:
        w["lokr_w2"] = torch.randn(c, d, *k, generator=g)
    else:
        w["lokr_w2"] = torch.randn(c, d * kk, generator=g)
    return w


def ia3(m, g, on_input=False):
    out, inp, _ = dims(m)
    return {"weight": torch.randn(inp if on_input else out, generator=g), "on_input": torch.tensor(on_input)}


def glora(m, g, rank):
    """LyCORIS's GLoRA: a1 [r, in], a2 [in, r], b1 [r, in], b2 [out, r]."""
    out, inp, _ = dims(m)
    return {"a1.weight": torch.randn(rank, inp, generator=g), "a2.weight": torch.randn(inp, rank, generator=g),
            "b1.weight": torch.randn(rank, inp, generator=g), "b2.weight": torch.randn(out, rank, generator=g)}


def rescale_of(m, g):
    """LyCORIS's `rescale` (`rescaled=True`): one factor per output row, `[out, 1, ...]`."""
    shape = [m.weight.shape[0]] + [1] * (m.weight.dim() - 1)
    return 1 + 0.2 * torch.randn(shape, generator=g)


def oft(m, g, blocks, spread, rescale=False):
    """LyCORIS's OFT (diag-oft): `oft_blocks` [blocks, n, n], n = out / blocks."""
    out = m.weight.shape[0]
    w = {"oft_blocks": torch.randn(blocks, out // blocks, out // blocks, generator=g) * spread}
    if rescale:
        w["rescale"] = rescale_of(m, g)
    return w


def boft(m, g, steps, size, spread, rescale=False):
    """LyCORIS's BOFT: `oft_blocks` [m, out / b, b, b], m butterfly steps of blocks of size b."""
    out = m.weight.shape[0]
    w = {"oft_blocks": torch.randn(steps, out // size, size, size, generator=g) * spread}
    if rescale:
        w["rescale"] = rescale_of(m, g)
    return w


def oft_diag(m, g, blocks, spread):
    """The old LyCORIS OFT: `oft_diag` [blocks, n, n] is R itself (A1111's is_R)."""
    n = m.weight.shape[0] // blocks
    return {"oft_diag": torch.eye(n).expand(blocks, n, n) + torch.randn(blocks, n, n, generator=g) * spread}


def norm(m, g):
    """LyCORIS's norm module: `w_norm` and `b_norm`, of the norm's weight and bias shapes."""
    return {"w_norm": torch.randn(m.weight.shape, generator=g) * 0.4,
            "b_norm": torch.randn(m.bias.shape, generator=g) * 0.4}


def full(m, g, bias=False):
    w = {"diff": torch.randn(m.weight.shape, generator=g)}
    if bias:
        # From a generator of its own: the other layers' tensors stay as they were.
        gb = torch.Generator().manual_seed(500 + m.weight.numel())
        # A third of the bias's spread (at least of the weight's: some biases start at zero; a
        # norm's weight starts as ones, and then its size).
        spread = max(m.bias.std().item(), m.weight.std().item()) or m.weight.abs().mean().item()
        w["diff_b"] = torch.randn(m.bias.shape, generator=gb) * 0.33 * spread
    return w


def locon_cp(m, g, rank):
    out, inp, k = dims(m)
    return {"lora_down.weight": torch.randn(rank, inp, 1, 1, generator=g),
            "lora_mid.weight": torch.randn(rank, rank, *k, generator=g),
            "lora_up.weight": torch.randn(out, rank, 1, 1, generator=g)}


def lora(m, g, rank):
    out, inp, _ = dims(m)
    return {"lora_down.weight": torch.randn(rank, inp, generator=g), "lora_up.weight": torch.randn(out, rank, generator=g)}


# The tensor each type's delta is linear in: scaled so that the delta is a set fraction of the weight.
LEADING = ["hada_w1_a", "lokr_w1", "lokr_w1_a", "diff", "lora_up.weight", "weight"]


def attention_paths(unet, blocks):
    out = []
    for n, mod in unet.named_modules():
        if not any(n.startswith(b) for b in blocks) or ".attentions." not in n:
            continue
        leaf = n.split(".")[-1]
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) and (leaf in ("to_q", "to_k", "to_v", "proj_in", "proj_out") or n.endswith("to_out.0")):
            out.append(n)
    return out


def layer_plan(unet):
    """file -> [(part, module path, form, builder kwargs, alpha, extra keys)]"""
    te0 = "text_model.encoder.layers.0"
    plan = {"loha": [], "lokr": [], "full": [], "mixed": [], "dora": [], "ia3": [], "glora": [], "oft": [],
            "boft": [], "oft_diag": [], "norm": [], "kohya_oft": [], "ignored_norms": []}
    for p in attention_paths(unet, ["down_blocks.0", "up_blocks.1"]):
        plan["loha"].append(("unet", p, "loha", dict(rank=4), 2.0, {}))
    plan["loha"] += [
        ("unet", "down_blocks.0.resnets.0.conv1", "loha", dict(rank=2), 1.0, {}),
        ("unet", "down_blocks.0.resnets.1.conv1", "loha", dict(rank=2), 1.0, {}),
        ("unet", "up_blocks.1.resnets.0.conv2", "loha", dict(rank=2, tucker=True), 2.0, {}),
        ("unet", "up_blocks.1.resnets.1.conv2", "loha", dict(rank=3, tucker=True), 1.0, {}),
        ("te", f"{te0}.self_attn.q_proj", "loha", dict(rank=2), 1.5, {}),
        ("te", f"{te0}.self_attn.v_proj", "loha", dict(rank=2), 1.5, {}),
        ("te", f"{te0}.mlp.fc1", "loha", dict(rank=2), 1.5, {}),
    ]
    for p in attention_paths(unet, ["down_blocks.0", "mid_block"]):
        leaf = p.split(".")[-1]
        if leaf in ("proj_in", "proj_out"):
            plan["lokr"].append(("unet", p, "lokr", dict(), 5.0, {}))  # both whole: alpha not used
        else:
            plan["lokr"].append(("unet", p, "lokr", dict(w2_rank=2), 1.0, {}))
    plan["lokr"] += [
        ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj", "lokr", dict(w1_rank=2), 4.0, {}),
        ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2", "lokr", dict(w1_rank=1, w2_rank=2), 3.0, {}),
        ("unet", "down_blocks.0.resnets.0.conv1", "lokr", dict(conv_w2_4d=True), 1.0, {}),
        ("unet", "down_blocks.0.resnets.0.conv2", "lokr", dict(w2_rank=2), 1.0, {}),
        ("unet", "down_blocks.0.resnets.1.conv2", "lokr", dict(w2_rank=2, tucker=True), 1.0, {}),
        ("te", f"{te0}.self_attn.q_proj", "lokr", dict(w2_rank=2), 1.0, {}),
        ("te", f"{te0}.mlp.fc1", "lokr", dict(), None, {}),
    ]
    attn = "down_blocks.0.attentions.1.transformer_blocks.0.attn1"
    plan["full"] += [
        ("unet", f"{attn}.to_k", "full", {}, 4.0, {}),  # an alpha a full diff does not use
        ("unet", f"{attn}.to_v", "full", {}, None, {"scale": 0.5}),
        ("unet", f"{attn}.to_out.0", "full", dict(bias=True), None, {}),
        ("unet", "down_blocks.0.resnets.0.conv2", "full", dict(bias=True), None, {}),
        ("unet", "down_blocks.1.resnets.0.conv_shortcut", "full", dict(bias=True), None, {}),
        ("unet", "down_blocks.1.resnets.0.time_emb_proj", "full", dict(bias=True), None, {}),
        ("te", f"{te0}.self_attn.out_proj", "full", dict(bias=True), None, {}),
    ]
    mid = "mid_block.attentions.0.transformer_blocks.0"
    plan["mixed"] += [
        ("unet", "down_blocks.0.resnets.1.conv2", "locon_cp", dict(rank=3), 2.0, {}),
        ("unet", "up_blocks.0.resnets.1.conv2", "locon_cp", dict(rank=2), None, {}),
        ("unet", f"{mid}.attn1.to_q", "loha", dict(rank=2), 1.0, {}),
        ("unet", f"{mid}.ff.net.2", "lokr", dict(w2_rank=4), 2.0, {}),
        ("unet", "up_blocks.1.attentions.0.proj_out", "full", {}, None, {}),
        ("te", "text_model.encoder.layers.1.self_attn.k_proj", "lora", dict(rank=2), 1.0, {}),
    ]
    d0 = "down_blocks.0.attentions.0"
    # extra "dora": the dora_scale's orientation, per input ("in") or output ("out") channel.
    plan["dora"] += [
        ("unet", f"{d0}.transformer_blocks.0.attn1.to_q", "lora", dict(rank=4), 2.0, {"dora": "in"}),
        ("unet", f"{d0}.transformer_blocks.0.attn1.to_k", "loha", dict(rank=2), 1.0, {"dora": "in"}),
        ("unet", f"{d0}.transformer_blocks.0.attn2.to_v", "lokr", dict(w2_rank=2), 1.0, {"dora": "out"}),
        ("unet", f"{d0}.proj_in", "lora", dict(rank=2), None, {"dora": "in"}),
        ("unet", f"{d0}.transformer_blocks.0.ff.net.2", "full", {}, None, {"dora": "in", "scale": 0.5}),
        ("unet", "down_blocks.0.resnets.0.conv1", "loha", dict(rank=2), 1.0, {"dora": "in"}),
        ("unet", "up_blocks.0.resnets.1.conv2", "locon_cp", dict(rank=2), 1.0, {"dora": "out"}),
        ("te", "text_model.encoder.layers.0.self_attn.q_proj", "lora", dict(rank=2), 1.0, {"dora": "in"}),
        ("te", "text_model.encoder.layers.1.mlp.fc1", "loha", dict(rank=2), 1.0, {"dora": "out"}),
    ]
    t0 = f"{d0}.transformer_blocks.0"
    plan["ia3"] += [
        ("unet", f"{t0}.attn1.to_k", "ia3", {}, None, {}),
        ("unet", f"{t0}.attn2.to_v", "ia3", dict(on_input=True), None, {}),
        ("unet", f"{t0}.ff.net.2", "ia3", {}, 3.0, {"scale": 0.5}),  # an alpha IA3 does not use
        ("unet", f"{t0}.attn1.to_out.0", "ia3", dict(on_input=True), None, {"dora": "in"}),
        ("te", "text_model.encoder.layers.0.self_attn.k_proj", "ia3", {}, None, {}),
        ("te", "text_model.encoder.layers.1.mlp.fc2", "ia3", dict(on_input=True), None, {}),
    ]
    # A1111 takes GLoRA with an alpha, and does not use it.
    plan["glora"] += [
        ("unet", f"{t0}.attn1.to_q", "glora", dict(rank=2), 4.0, {}),
        ("unet", f"{t0}.attn2.to_k", "glora", dict(rank=3), 1.0, {}),
        ("unet", f"{t0}.ff.net.0.proj", "glora", dict(rank=2), 1.0, {"scale": 0.5}),
        ("unet", f"{t0}.attn1.to_v", "glora", dict(rank=2), 1.0, {"dora": "in"}),
        ("te", "text_model.encoder.layers.0.self_attn.v_proj", "glora", dict(rank=2), 1.0, {}),
    ]
    # OFT's alpha is its constraint: the norm of the skew blocks clamped to alpha * out.
    plan["oft"] += [
        ("unet", f"{t0}.attn1.to_q", "oft", dict(blocks=4, spread=0.05), 0.02, {}),  # clamped
        ("unet", f"{t0}.attn1.to_k", "oft", dict(blocks=8, spread=0.05), 1.0, {}),  # not reached
        ("unet", f"{t0}.attn2.to_v", "oft", dict(blocks=2, spread=0.03), None, {}),  # no constraint
        ("unet", f"{t0}.ff.net.0.proj", "oft", dict(blocks=8, spread=0.05, rescale=True), 0.0, {}),
        ("unet", f"{t0}.ff.net.2", "oft", dict(blocks=4, spread=0.05), None, {"dora": "in"}),
        ("unet", f"{d0}.proj_in", "oft", dict(blocks=4, spread=0.05), None, {"scale": 0.5}),  # scale not used
        ("unet", "down_blocks.0.resnets.0.conv1", "oft", dict(blocks=8, spread=0.05), None, {}),
        ("te", "text_model.encoder.layers.0.self_attn.q_proj", "oft", dict(blocks=4, spread=0.05), None, {}),
    ]
    plan["boft"] += [
        ("unet", f"{t0}.attn1.to_q", "boft", dict(steps=2, size=4, spread=0.1), None, {}),
        ("unet", f"{t0}.attn1.to_v", "boft", dict(steps=3, size=4, spread=0.1), 0.01, {}),
        ("unet", f"{t0}.attn2.to_out.0", "boft", dict(steps=2, size=8, spread=0.05, rescale=True), None, {}),
        ("unet", "down_blocks.0.resnets.1.conv2", "boft", dict(steps=2, size=4, spread=0.1), None, {}),
        ("te", "text_model.encoder.layers.1.self_attn.out_proj", "boft", dict(steps=2, size=4, spread=0.1),
         None, {}),
    ]
    plan["oft_diag"] += [
        ("unet", f"{t0}.attn1.to_k", "oft_diag", dict(blocks=4, spread=0.1), 1.0, {}),  # alpha not used
        ("unet", "up_blocks.1.resnets.0.conv2", "oft_diag", dict(blocks=8, spread=0.1), None, {}),
        ("te", "text_model.encoder.layers.1.self_attn.v_proj", "oft_diag", dict(blocks=2, spread=0.1), None, {}),
    ]
    plan["norm"] += [
        ("unet", "down_blocks.0.resnets.0.norm1", "norm", {}, None, {}),
        ("unet", "down_blocks.1.resnets.1.norm2", "norm", {}, 2.0, {}),  # an alpha a norm does not use
        ("unet", f"{d0}.norm", "norm", {}, None, {"scale": 0.5}),
        ("unet", f"{t0}.norm1", "norm", {}, None, {}),
        ("unet", "mid_block.attentions.0.transformer_blocks.0.norm3", "norm", {}, None, {}),
        ("unet", "up_blocks.0.resnets.2.norm1", "norm", {}, None, {}),
        ("unet", "up_blocks.1.attentions.2.transformer_blocks.0.norm2", "full", dict(bias=True), None, {}),
        ("te", "text_model.encoder.layers.0.layer_norm1", "norm", {}, None, {}),
        ("te", "text_model.encoder.layers.1.layer_norm2", "norm", {}, None, {}),
    ]
    # kohya-ss sd-scripts' OFT (networks/oft.py): every CrossAttention linear with one number of
    # blocks and one alpha (the constraint), and with enable_conv the resnets' convolutions; its
    # keys oft_unet_<path>, which A1111 matches in an SDXL model only.
    for p in attention_paths(unet, ["down_blocks.0", "up_blocks.1"]):
        if p.split(".")[-1] not in ("proj_in", "proj_out"):
            plan["kohya_oft"].append(("unet", p, "oft", dict(blocks=4, spread=0.05), 0.03, {"prefix": "oft_unet_"}))
    plan["kohya_oft"] += [
        ("unet", "down_blocks.0.resnets.0.conv1", "oft", dict(blocks=4, spread=0.05), 0.03, {"prefix": "oft_unet_"}),
        ("unet", "down_blocks.0.resnets.1.conv2", "oft", dict(blocks=4, spread=0.05), 0.03, {"prefix": "oft_unet_"}),
    ]
    # Norm diffs on the UNet's conv_norm_out and the text encoder's final_layer_norm, whose kohya
    # names A1111 does not match in an SD 1.5 model (left out, as A1111 does), beside layers it does.
    plan["ignored_norms"] += [
        ("unet", "conv_norm_out", "full", dict(bias=True), None, {}),
        ("te", "text_model.final_layer_norm", "norm", {}, None, {}),
        ("unet", "down_blocks.0.resnets.0.norm1", "norm", {}, None, {}),
        ("te", "text_model.encoder.layers.0.layer_norm1", "norm", {}, None, {}),
    ]
    return plan


BUILDERS = {"loha": loha, "lokr": lokr, "full": full, "locon_cp": locon_cp, "lora": lora, "ia3": ia3,
            "glora": glora, "oft": oft, "boft": boft, "oft_diag": oft_diag, "norm": norm}
# Forms whose spread is set by their builder (a rotation's size, a norm's diff), not scaled.
UNSCALED = {"oft", "boft", "oft_diag", "norm"}
# One layer of each form whose delta is kept in the reference (the images cover all of them).
KEPT = {
    "loha": ["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", "down_blocks.0.attentions.0.proj_in",
             "down_blocks.0.resnets.0.conv1", "up_blocks.1.resnets.0.conv2", "text_model.encoder.layers.0.mlp.fc1"],
    "lokr": ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "down_blocks.0.attentions.0.proj_out",
             "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",
             "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2", "down_blocks.0.resnets.0.conv1",
             "down_blocks.0.resnets.0.conv2", "down_blocks.0.resnets.1.conv2", "text_model.encoder.layers.0.mlp.fc1"],
    "full": ["down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_k",
             "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_v", "down_blocks.0.resnets.0.conv2",
             "down_blocks.1.resnets.0.conv_shortcut", "text_model.encoder.layers.0.self_attn.out_proj"],
    "mixed": ["down_blocks.0.resnets.1.conv2", "mid_block.attentions.0.transformer_blocks.0.attn1.to_q",
              "mid_block.attentions.0.transformer_blocks.0.ff.net.2", "up_blocks.1.attentions.0.proj_out",
              "text_model.encoder.layers.1.self_attn.k_proj"],
    "dora": None,  # every layer (each is a form of its own)
    "ia3": None,
    "glora": None,
    "oft": None,
    "boft": None,
    "oft_diag": None,
    "norm": None,
    "kohya_oft": None,
    "ignored_norms": None,
}


def dora_scale(m, orientation, g):
    """A DoRA magnitude near the base weight's norms, per input channel as LyCORIS's default
    (`[1, in]`, `[1, in, 1, 1]`) or per output channel (`wd_on_out`: `[out, 1]`, ...)."""
    w = m.weight.detach()
    keep = 1 if orientation == "in" else 0
    dims = [d for d in range(w.dim()) if d != keep]
    norm = w.pow(2).sum(dim=dims, keepdim=True).sqrt()
    return norm * (1 + 0.3 * torch.randn(norm.shape, generator=g))


def named_modules(pipe):
    """Modules by path; the text encoder's under `text_model.` (as kohya names them) whether or
    not this transformers version nests them so."""
    te = {n if n.startswith("text_model.") else f"text_model.{n}": m for n, m in pipe.text_encoder.named_modules()}
    return {"unet": dict(pipe.unet.named_modules()), "te": te}


def build_files(a, pipe, out):
    """Writes the LyCORIS files; returns {file: [(part, path, key, w)]}."""
    modules = named_modules(pipe)
    layers = {}
    for i, (name, plan) in enumerate(layer_plan(pipe.unet).items()):
        g = torch.Generator().manual_seed(300 + i)
        sd, kept = {}, []
        for part, path, form, kwargs, alpha, extra in plan:
            m = modules[part][path]
            w = BUILDERS[form](m, g, **kwargs)
            if alpha is not None:
                w["alpha"] = torch.tensor(alpha)
            extra = dict(extra)
            dora = extra.pop("dora", None)
            prefix = extra.pop("prefix", None)
            for k, v in extra.items():
                w[k] = torch.tensor(v)
            key = kohya_key(part, path, prefix)
            # The delta a fifth of the weight's spread (a third for the full diffs' few layers).
            # IA3's as large as the weight (it scales a few layers' rows or columns by 1 + w), GLoRA's half.
            # (A norm's weight starts as ones: its spread is its size.)
            spread = m.weight.std().item() or m.weight.abs().mean().item()
            target = {"full": 0.33, "ia3": 1.0, "glora": 0.5}.get(form, 0.2) * spread
            if form in UNSCALED:
                if dora:
                    w["dora_scale"] = dora_scale(m, dora, g)
                for k, v in w.items():
                    sd[f"{key}.{k}"] = v.contiguous()
                kept.append((part, path, key, w))
                continue
            got = calc_updown(a, key, w, m, part, 1.0)[0].std().item()
            # GLoRA's updown is linear in a1 and b2 together (b2 @ b1 + (W @ a2) @ a1).
            leads = ["a1.weight", "b2.weight"] if form == "glora" else [next(k for k in LEADING if k in w)]
            for lead in leads:
                w[lead] = w[lead] * (target / got)
            if dora:
                w["dora_scale"] = dora_scale(m, dora, g)
            for k, v in w.items():
                sd[f"{key}.{k}"] = v.contiguous()
            kept.append((part, path, key, w))
        save_file(sd, os.path.join(out, f"{name}.safetensors"),
                  metadata={"ss_network_module": "networks.oft" if name == "kohya_oft" else "lycoris.kohya",
                            "generated_by": "tools/make_lycoris_fixtures.py"})
        layers[name] = kept
        print(f"{name}: {len(plan)} layers, {len(sd)} tensors")
    return layers


def refused_files(pipe, out):
    g = torch.Generator().manual_seed(399)
    attn = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    norm1 = kohya_key("unet", "down_blocks.0.attentions.0.transformer_blocks.0.norm1")
    files = {
        # A1111's norm module takes w_norm and b_norm together; no module type takes w_norm alone.
        "norm_half": {f"{norm1}.w_norm": torch.randn(32, generator=g) * 0.1},
        # A1111 reads diff_b only with a full diff (network_full.py); a LoHa ignores it.
        "bias": {**{f"{kohya_key('unet', attn + '.to_out.0')}.{k}": v * 0.1
                    for k, v in loha(dict(pipe.unet.named_modules())[f"{attn}.to_out.0"], g, 2).items()},
                 f"{kohya_key('unet', attn + '.to_out.0')}.diff_b": torch.randn(32, generator=g) * 0.01},
    }
    for name, sd in files.items():
        save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(out, f"{name}.safetensors"),
                  metadata={"generated_by": "tools/make_lycoris_fixtures.py"})


def generate(pipe):
    import diffusers
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from api_schedulers import SCHEDULERS
    cls_name, extra = SCHEDULERS[REQUEST["scheduler"]]
    pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **extra)
    img = pipe(REQUEST["prompt"], negative_prompt=REQUEST["negative_prompt"], num_inference_steps=REQUEST["steps"],
               width=REQUEST["width"], height=REQUEST["height"], guidance_scale=REQUEST["guidance_scale"],
               generator=torch.Generator("cpu").manual_seed(REQUEST["seed"]), output_type="np").images
    return torch.from_numpy((img[0] * 255).round().astype("uint8"))


def main():
    args = a1111_args(__file__, __doc__, DEFAULT_OUT)
    if args is None:
        return
    from diffusers import StableDiffusionPipeline
    torch.set_grad_enabled(False)
    a = a1111(args.a1111)
    files_dir = os.path.join(args.out, "lycoris")
    os.makedirs(files_dir, exist_ok=True)
    pipe = StableDiffusionPipeline.from_pretrained(BASE_MODEL, dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    layers = build_files(a, pipe, files_dir)
    refused_files(pipe, files_dir)
    networks_digests, unmatched_of = a1111_load_network(args.a1111, a[0], a[1])
    unmatched = {name: unmatched_of(os.path.join(files_dir, f"{name}.safetensors")) for name in layers}
    for name, keys in unmatched.items():
        print(f"{name}: A1111 leaves out {len(keys)} modules")
    assert sorted(unmatched["kohya_oft"]) == sorted(key for _, _, key, _ in layers["kohya_oft"])
    assert unmatched["ignored_norms"] == ["lora_te_text_model_final_layer_norm", "lora_unet_conv_norm_out"]
    assert all(not keys for name, keys in unmatched.items() if name not in ("kohya_oft", "ignored_norms"))

    def applied(name, key):
        return name in APPLIED_UNMATCHED or key not in unmatched[name]

    modules = named_modules(pipe)
    tensors = {}
    for name, kept in layers.items():
        for part, path, key, w in kept:
            if (KEPT[name] is None or path in KEPT[name]) and applied(name, key):
                updown, ex_bias = calc_updown(a, key, w, modules[part][path], part, 1.0)
                kohya = kohya_oft_check(w, modules[part][path], 1.0) if name == "kohya_oft" else None
                if kohya is not None:
                    # kohya's formula is A1111's OFT module's (network_oft.py), alpha not 0.
                    assert torch.allclose(kohya, updown, rtol=1e-4, atol=1e-6 * updown.abs().max()), key
                prefix = f"delta.{name}.{'unet' if part == 'unet' else 'text_encoder'}.{path}"
                tensors[prefix] = updown
                if ex_bias is not None:
                    tensors[f"{prefix}.bias"] = ex_bias
    base = generate(pipe)
    tensors["image.base"] = base
    originals = {(p, path): (modules[p][path].weight.detach().clone(), modules[p][path].bias.detach().clone()
                             if modules[p][path].bias is not None else None)
                 for kept in layers.values() for p, path, _, _ in kept}

    def restore():
        for (p, path), (w0, b0) in originals.items():
            modules[p][path].weight.copy_(w0)
            if b0 is not None:
                modules[p][path].bias.copy_(b0)

    for case, files in CASES.items():
        # networks.network_apply_weights: from the original weight and bias, each network's
        # updown added to the weight and its ex_bias (a full diff's diff_b) to the bias.
        restore()
        for name, multiplier in files:
            for part, path, key, w in layers[name]:
                if not applied(name, key):
                    continue
                m = modules[part][path]
                updown, ex_bias = calc_updown(a, key, w, m, part, multiplier)
                m.weight += updown
                if ex_bias is not None:
                    m.bias += ex_bias
        for name in FROM_WEIGHT & set(dict(files)) if len(files) > 1 else []:
            # The set's whole change of each DoRA or IA3 layer's weight: they start from the
            # weight as the files before them left it.
            for part, path, _, _ in layers[name]:
                prefix = f"delta.{case}.{'unet' if part == 'unet' else 'text_encoder'}.{path}"
                tensors[prefix] = modules[part][path].weight - originals[(part, path)][0]
        img = generate(pipe)
        tensors[f"image.{case}"] = img
        diff = (img.float() - base.float()).abs().mean()
        print(f"image.{case}: mean abs diff from the base image {diff:.1f}")
        assert diff > 3.0, f"{case}: the files barely change the image"
    restore()
    assert torch.equal(generate(pipe), base)

    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(args.out, "lycoris.safetensors"),
              metadata={"generated_by": "tools/make_lycoris_fixtures.py"})
    meta = {"generated_by": "tools/make_lycoris_fixtures.py", "base_model": "tiny-a", "request": REQUEST,
            "cases": CASES, "a1111_sources_sha256": {**a[2], **{f"networks.py:{k}": v for k, v in networks_digests.items()}},
            "a1111_unmatched": unmatched, "kohya_oft_checked": bool(os.environ.get("SD_SCRIPTS_DIR")),
            "layers": {name: len(kept) for name, kept in layers.items()},
            "refused": {"norm_half": "norm", "bias": "bias"}}
    with open(os.path.join(args.out, "lycoris.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
