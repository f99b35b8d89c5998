#!/usr/bin/env python3
"""A small random CodeFormer and its reference outputs for crates/pipeline/src/face_restore.

The network is spandrel's own `CodeFormer` (spandrel-extra-arches 0.2.0's, registered into
spandrel 0.4.2 by `spandrel_extra_arches.install()`; A1111 1.8 pins spandrel 0.1.6, whose
CodeFormer module is the same code apart from the loader's imports and a `model_path`
argument). Its loader reads the transformer's sizes from the state dict (dim_embd and
latent_size from `position_emb`, codebook_size from `idx_pred_layer.1`, n_layers from the
`ft_layers.N` names, connect_list from the `fuse_convs_dict.<size>` names) but hard-codes the
VQGAN around it: nf 64, ch_mult [1, 2, 2, 4, 4, 8], 2 res blocks a level, attention at 16 px,
a 256-wide code, which alone is 69M parameters. So that the fixture stays a few MB, the VQGAN is
narrowed here: `VQAutoEncoder.__init__` is wrapped to take NF and CH_MULT instead (the
narrowest GroupNorm(32) allows), and `fuse_convs_dict` rebuilt at the narrowed widths (spandrel
hard-codes `channels` = nf * ch_mult per size). Every forward (CodeFormer.forward, the blocks,
the transformer, the codebook lookup, AdaIN) is spandrel's, unchanged; our loader reads every
width from the weights. spandrel's own ModelLoader cannot load a narrowed file (its VQGAN is
fixed) but detects it as CodeFormer; `--full-size` writes one it loads.

Weights: torch's default initialisation, seeded, then every norm, bias, the position embedding
and the codebook given random values too (defaults of 1, 0 or nearly 0 would hide a swapped or
skipped one), rounded to f16 and saved as codeformer-v0.1.0.pth is (`{"params_ema": ...}`).

Writes crates/pipeline/tests/fixtures/codeformer/:
  codeformer.pth          the weights
  input.png               a 512x512 synthetic face-like picture (RGB)
  codeformer.safetensors  for the picture as A1111 feeds it (BGR crop / 255 as float64, to
                          float32 RGB, normalize(0.5, 0.5)): logits (the code logits,
                          1x256xK; the same for every weight), out.w<W> (the network's
                          image), face.w<W> (A1111's bytes of it: clamp to [-1, 1],
                          (x + 1) / 2, * 255, astype uint8; RGB HxWx3), each at every
                          STRIDE-th row and column, for W = 0, 0_5, 1
  codeformer.json         the hyper-parameters, cases, versions, measured figures
Called as A1111 1.9+ calls it (`net(face, weight=w, adain=True)[0]`); A1111 1.8 passes `w=w`,
which spandrel's forward swallows in **kwargs: every weight runs as 0.5 there (fixed by
AUTOMATIC1111/stable-diffusion-webui#15414). The script checks that and records it.

Usage (a python with torch 2.11, spandrel 0.4.2, spandrel-extra-arches 0.2.0, safetensors,
pillow; tools/requirements.txt):
  python3 tools/make_face_restore_fixtures.py                   # the fixtures
  python3 tools/make_face_restore_fixtures.py --full-size /tmp/codeformer-random.pth
      # codeformer-v0.1.0's sizes (spandrel's defaults), random f32 weights, loaded back through
      # spandrel's ModelLoader; for benchmarks only, never committed
  python3 tools/make_face_restore_fixtures.py --bench /tmp/codeformer-random.pth --threads 2 \\
      --repeats 3 [--reference /tmp/codeformer-random.ref.safetensors] [--json out.json]
      # spandrel's forward on input.png at weight 0.5, medians (the schema of
      # tools/bench_diffusers.py); --reference also saves its output for our bench to compare
"""

import argparse
import importlib
import json
import os
import sys

import numpy as np
import torch

OUT = os.path.join("crates", "pipeline", "tests", "fixtures", "codeformer")
SEED = 20220614
STRIDE = 5
NF, CH_MULT = 32, [1, 1, 1, 1, 1, 2]
DIM_EMBD, N_LAYERS, CODEBOOK = 16, 2, 64
# The real file's four and 16 (the constants of the other sizes run too); 512 left out: its
# fuse block at full resolution would triple the test's time.
CONNECT = ["16", "32", "64", "128", "256"]
WEIGHTS = [(0.0, "0"), (0.5, "0_5"), (1.0, "1")]


def arch_module():
    import spandrel_extra_arches  # noqa: F401

    return importlib.import_module(
        "spandrel_extra_arches.architectures.CodeFormer.__arch.codeformer"
    )


def narrowed():
    """spandrel's CodeFormer with its VQGAN at NF, CH_MULT (see the module's doc)."""
    arch = arch_module()
    original = arch.VQAutoEncoder.__init__

    def init(self, img_size, nf, ch_mult, *rest):
        original(self, img_size, NF, CH_MULT, *rest)

    arch.VQAutoEncoder.__init__ = init
    try:
        net = arch.CodeFormer(
            dim_embd=DIM_EMBD,
            n_layers=N_LAYERS,
            codebook_size=CODEBOOK,
            latent_size=256,
            connect_list=CONNECT,
        )
    finally:
        arch.VQAutoEncoder.__init__ = original
    net.channels = {str(512 >> i): NF * m for i, m in enumerate(CH_MULT)}
    net.fuse_convs_dict = torch.nn.ModuleDict(
        {s: arch.Fuse_sft_block(net.channels[s], net.channels[s]) for s in CONNECT}
    )
    return net


def randomise(net, generator):
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name == "position_emb" or name == "quantize.embedding.weight":
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
            elif p.dim() == 1 and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=generator))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))


def face_picture():
    """512x512 RGB uint8: a gradient, a skin ellipse with eyes and a mouth, a ripple, seeded noise."""
    rng = np.random.default_rng(SEED)
    y, x = np.mgrid[0:512, 0:512].astype(np.float64)
    img = np.stack([40 + x * 0.2, 60 + y * 0.25, 120 + (x + y) * 0.1], -1)

    def ellipse(cy, cx, ry, rx):
        return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 < 1

    img[ellipse(260, 256, 190, 150)] = [224, 180, 150]
    for cx in (196, 316):
        img[ellipse(220, cx, 18, 34)] = [250, 250, 245]
        img[ellipse(220, cx, 12, 12)] = [60, 40, 30]
    img[ellipse(350, 256, 22, 70)] = [170, 70, 80]
    img += 8 * np.sin(x / 7)[..., None] * np.cos(y / 11)[..., None] + rng.normal(0, 1.5, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def a1111_input(rgb):
    """face_restoration_utils: the BGR crop / 255 (float64), to float32 RGB, normalize."""
    bgr = rgb[:, :, ::-1]
    img = (bgr / 255.0).astype("float32")[:, :, ::-1]
    t = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float()
    t = (t - 0.5) / 0.5  # torchvision normalize(0.5, 0.5) in place: sub, then div
    return t.unsqueeze(0)


def a1111_bytes(out):
    """rgb_tensor_to_bgr_image(min_max=(-1, 1)), then * 255 and astype uint8, back to RGB."""
    t = out.squeeze(0).float().clamp(-1, 1)
    t = (t - -1) / (1 - -1)
    img = t.numpy().transpose(1, 2, 0)
    return (img * 255.0).astype("uint8")


def fixtures():
    import spandrel
    import spandrel_extra_arches
    from PIL import Image
    from safetensors.torch import save_file

    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(SEED)
    net = narrowed().eval()
    randomise(net, torch.Generator().manual_seed(SEED + 1))
    state = {k: v.half() for k, v in net.state_dict().items()}
    net.load_state_dict({k: v.float() for k, v in state.items()})
    path = os.path.join(OUT, "codeformer.pth")
    torch.save({"params_ema": state}, path)

    # spandrel's detection takes the file for a CodeFormer (its loader's fixed VQGAN cannot
    # load the narrowed widths).
    spandrel_extra_arches.install(ignore_duplicates=True)
    loaded = torch.load(path, map_location="cpu")
    canonical = spandrel.canonicalize_state_dict(loaded)
    detected = [a.architecture.id for a in spandrel.MAIN_REGISTRY.architectures()
                if a.architecture.detect(canonical)]
    assert detected == ["CodeFormer"], detected

    rgb = face_picture()
    Image.fromarray(rgb).save(os.path.join(OUT, "input.png"))
    x = a1111_input(rgb)
    tensors = {}
    cases = []
    with torch.no_grad():
        for w, tag in WEIGHTS:
            out, logits = net(x, weight=w, adain=True)
            tensors["logits"] = logits.contiguous()
            tensors[f"out.w{tag}"] = out[:, :, ::STRIDE, ::STRIDE].contiguous()
            tensors[f"face.w{tag}"] = torch.from_numpy(
                np.ascontiguousarray(a1111_bytes(out)[::STRIDE, ::STRIDE]))
            # A1111 1.8's call: `w` lands in **kwargs, the weight stays 0.5.
            old = net(x, w=w, adain=True)[0]
            cases.append({"weight": w, "tag": tag,
                          "a1111_1_8_equals_weight_0_5": bool(
                              torch.equal(old, net(x, weight=0.5)[0]))})
        top2 = torch.topk(tensors["logits"][0], 2, dim=1).values
        margin = float((top2[:, 0] - top2[:, 1]).min())
        w0, w1 = net(x, weight=0.0)[0], net(x, weight=1.0)[0]
        spread = float((w0 - w1).abs().max())
        mean_spread = float((w0 - w1).abs().mean())
    save_file(tensors, os.path.join(OUT, "codeformer.safetensors"))
    meta = {
        "source": "spandrel_extra_arches.architectures.CodeFormer (spandrel-extra-arches "
                  "0.2.0) on spandrel 0.4.2; VQGAN narrowed (see the tool's doc)",
        "versions": {"torch": torch.__version__, "spandrel": spandrel.__version__,
                     "spandrel_extra_arches": getattr(spandrel_extra_arches, "__version__",
                                                      "0.2.0")},
        "seed": SEED,
        "stride": STRIDE,
        "hyper": {"nf": NF, "ch_mult": CH_MULT, "dim_embd": DIM_EMBD, "n_head": 8,
                  "n_layers": N_LAYERS, "codebook_size": CODEBOOK, "latent_size": 256,
                  "connect_list": CONNECT, "emb_dim": 256},
        "cases": cases,
        "min_top2_logit_margin": margin,
        "max_abs_w0_minus_w1": spread,
        "mean_abs_w0_minus_w1": mean_spread,
    }
    with open(os.path.join(OUT, "codeformer.json"), "w") as f:
        json.dump(meta, f, indent=1)
    size = os.path.getsize(path)
    print(f"wrote {OUT}: weights {size / 1e6:.1f} MB, top-2 logit margin {margin:.4g}, "
          f"|w0 - w1| max {spread:.4g} mean {mean_spread:.4g}", file=sys.stderr)


def full_size(path):
    """codeformer-v0.1.0's sizes (spandrel's defaults), random f32, read back by spandrel."""
    import spandrel
    import spandrel_extra_arches

    arch = arch_module()
    torch.manual_seed(SEED)
    net = arch.CodeFormer()
    randomise(net, torch.Generator().manual_seed(SEED + 1))
    torch.save({"params_ema": net.state_dict()}, path)
    spandrel_extra_arches.install(ignore_duplicates=True)
    d = spandrel.ModelLoader("cpu").load_from_file(path)
    assert d.architecture.id == "CodeFormer", d.architecture.id
    print(f"wrote {path} ({os.path.getsize(path) / 1e6:.0f} MB); spandrel loads it as "
          f"{d.architecture.id}", file=sys.stderr)


def bench(path, threads, repeats, reference, json_out):
    import spandrel
    import spandrel_extra_arches
    from PIL import Image

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_diffusers import measure, status_kb

    torch.set_num_threads(threads)
    spandrel_extra_arches.install(ignore_duplicates=True)
    net = spandrel.ModelLoader("cpu").load_from_file(path).model.eval()
    x = a1111_input(np.asarray(Image.open(os.path.join(OUT, "input.png")).convert("RGB")))
    with torch.inference_mode():
        stats = [measure("codeformer_512", repeats, lambda: net(x, weight=0.5, adain=True))]
        if reference:
            out, logits = net(x, weight=0.5, adain=True)
            from safetensors.torch import save_file

            save_file({"out": out.contiguous(), "logits": logits.contiguous()}, reference)
    result = {"implementation": "spandrel", "model": path, "threads": str(threads),
              "peak_rss_mb": round(status_kb("VmHWM:") / 1024), "stages": stats}
    text = json.dumps(result)
    print(text)
    if json_out:
        with open(json_out, "w") as f:
            f.write(text)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--full-size", metavar="PATH")
    ap.add_argument("--bench", metavar="PATH")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--reference", metavar="PATH")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.full_size:
        full_size(args.full_size)
    elif args.bench:
        bench(args.bench, args.threads, args.repeats, args.reference, args.json)
    else:
        fixtures()


if __name__ == "__main__":
    main()
