#!/usr/bin/env python3
"""A1111 prompt conditioning references for crates/pipeline/tests/integration/prompt_syntax.rs.

The conditioning AUTOMATIC1111 builds from a prompt (A1111's prompt_parser.py, sd_hijack_clip.py),
written here from that description on transformers' CLIPTextModel: emphasis, escapes and BREAK
parsed into weighted pieces; each piece tokenized alone; chunks of 75 tokens with the comma
backtrack (20); BOS + 75 + EOS per chunk; each chunk encoded alone (clip skip: hidden_states[-N]
then the final layer norm); emphasis with the mean restored per chunk; chunks concatenated.
Before writing anything it proves itself equal to diffusers' `encode_prompt` on plain prompts
of at most 75 tokens.

A random CLIP's final layer norm has bias 0, so its outputs average about 0 and the mean restore
divides noise by noise; real CLIP has a bias. The fixture text encoder is tiny-a's with a seeded
non-zero final layer norm bias (and weight).

Writes, under crates/pipeline/tests/fixtures/prompts/:
  text_encoder/{config.json,model.safetensors}: tiny-a's text encoder, final layer norm perturbed
  prompts.json: per case the prompt, negative prompt, clip skip, syntax, the parsed pieces and the
                chunks (ids, weights) of both prompts; per image case its request
  prompts.safetensors: <case>.cond [1, 77k, D], <case>.uncond [1, 77k', D];
                       image.<case> [H, W, 3] u8 from a denoising loop on tiny-a's UNet, VAE and
                       scheduler (one UNet batch when both prompts have as many chunks, else two passes)

Pinned: torch 2.11.0, diffusers 0.42.1, transformers 5.24.0 (tools/requirements.txt).
Usage: python3 tools/make_prompt_fixtures.py   (after tools/make_tiny_models.py)
"""

import json
import os
import re

import torch
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "crates", "pipeline", "tests", "fixtures")
OUT = os.path.join(FIXTURES, "prompts")
BASE_MODEL = os.path.join(FIXTURES, "tiny-a")

COMMA_BACKTRACK = 20
ROUND = 1.1

# One alternative per syntax element, tried in this order at each position (as A1111 parses).
ATTENTION_RE = re.compile(
    r"\\[()\[\]\\]"            # escaped bracket or backslash: the character itself
    r"|\\"                     # a lone backslash: dropped
    r"|\(|\["                  # openers
    r"|:\s*([+-]?[.\d]+)\s*\)"  # ':N)' closes a '(' group with weight N
    r"|\)|\]"                  # closers with the default multipliers
    r"|[^\\()\[\]:]+"          # text
    r"|:"
)
BREAK_RE = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_attention(text):
    """[(text, weight)] for an A1111 prompt; ('BREAK', -1) marks a BREAK outside groups."""
    res, round_open, square_open = [], [], []

    def scale(start, m):
        for piece in res[start:]:
            piece[1] *= m

    def add_text(t):
        for i, part in enumerate(BREAK_RE.split(t)):
            if i:
                res.append(["BREAK", -1.0])
            res.append([part, 1.0])

    for m in ATTENTION_RE.finditer(text):
        tok, number = m.group(0), m.group(1)
        if tok.startswith("\\"):
            res.append([tok[1:], 1.0])
        elif tok == "(":
            round_open.append(len(res))
        elif tok == "[":
            square_open.append(len(res))
        elif number is not None and round_open:
            scale(round_open.pop(), float(number))
        elif tok == ")" and round_open:
            scale(round_open.pop(), ROUND)
        elif tok == "]" and square_open:
            scale(square_open.pop(), 1 / ROUND)
        else:
            add_text(tok)
    for start in round_open:
        scale(start, ROUND)
    for start in square_open:
        scale(start, 1 / ROUND)
    if not res:
        res = [["", 1.0]]
    merged = [res[0]]
    for piece in res[1:]:
        if piece[1] == merged[-1][1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [(t, w) for t, w in merged]


def make_chunks(tokenizer, pieces):
    """[(ids [77], weights [77])]: 75-token chunks with the comma backtrack and BREAK."""
    n = tokenizer.model_max_length - 2
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    done = []
    state = {"ids": [], "w": [], "comma": -1}

    def close():
        ids = [bos] + state["ids"] + [eos]
        w = [1.0] + state["w"] + [1.0]
        # EOS padding (CLIP's pad token is EOS); a different pad token follows the first EOS,
        # as diffusers pads.
        ids += [pad] * (n + 2 - len(ids))
        w += [1.0] * (n + 2 - len(w))
        done.append((ids, w))
        state.update(ids=[], w=[], comma=-1)

    for text, weight in pieces:
        if text == "BREAK" and weight == -1.0:
            close()
            continue
        for tok in tokenizer(text, add_special_tokens=False, truncation=False).input_ids:
            if tok == comma:
                state["comma"] = len(state["ids"])
            elif len(state["ids"]) == n and state["comma"] != -1 and n - state["comma"] <= COMMA_BACKTRACK:
                cut = state["comma"] + 1
                moved_ids, moved_w = state["ids"][cut:], state["w"][cut:]
                state["ids"], state["w"] = state["ids"][:cut], state["w"][:cut]
                close()
                state["ids"], state["w"] = moved_ids, moved_w
            if len(state["ids"]) == n:
                close()
            state["ids"].append(tok)
            state["w"].append(float(weight))
    if state["ids"] or not done:
        close()
    return done


def encode_chunks(text_encoder, chunks, clip_skip, emphasis=True):
    """[1, 77k, D]: each chunk encoded alone, clip skip, emphasis with the mean restored."""
    final_ln = getattr(text_encoder, "text_model", text_encoder).final_layer_norm
    outs = []
    for ids, weights in chunks:
        out = text_encoder(torch.tensor([ids]), output_hidden_states=True)
        if clip_skip > 1:
            z = final_ln(out.hidden_states[-clip_skip])
        else:
            z = out.last_hidden_state
        if emphasis:
            w = torch.tensor(weights, dtype=torch.float32).reshape(1, -1, 1)
            mean_before = z.mean()
            z = z * w
            z = z * (mean_before / z.mean())
        outs.append(z)
    return torch.cat(outs, dim=1)


def plain_chunks(tokenizer, text):
    ids = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True).input_ids
    return [(ids, [1.0] * len(ids))]


def conditioning(pipe, prompt, syntax, clip_skip):
    if syntax == "plain":
        chunks = plain_chunks(pipe.tokenizer, prompt)
        pieces = [(prompt, 1.0)]
    else:
        pieces = parse_attention(prompt)
        chunks = make_chunks(pipe.tokenizer, pieces)
    return pieces, chunks, encode_chunks(pipe.text_encoder, chunks, clip_skip)


LONG = (
    "a castle on a hill, tall towers, flags, a river, a stone bridge, green fields, sheep, "
    "an old mill, clouds, birds, warm evening light, long shadows, a big winding road, a cart, "
    "two horses, a blacksmith, smoke from chimneys, a market square"
)

CASES = {
    # name: (prompt, negative prompt, clip skip, syntax)
    "weights": ("a (red:1.3) house, (blue sky:0.7), sun", "blurry, low quality", 1, "a1111"),
    "nesting": ("((a cat)) on [a mat], [[dog]], (((owl)))", "", 1, "a1111"),
    "escapes": ("a \\(cat\\) \\[dog\\] \\\\ (b:1.2) c) ] : d", "x", 1, "a1111"),
    "break": ("a red house BREAK a blue sky, (clouds:1.2)", "ugly", 1, "a1111"),
    "long_commas": (LONG, "ugly, blurry", 1, "a1111"),
    "long_negative": ("a cat", LONG, 1, "a1111"),
    "clip_skip_2": ("a (red:1.3) house, blue sky", "blurry, low quality", 2, "a1111"),
    "plain_clip_skip_2": ("a red house (blue:1.5)", "blurry", 2, "plain"),
    "plain_equal": ("a photo of an astronaut riding a horse on mars", "blurry, low quality", 1, "a1111"),
}

# Whole images: (case, steps, scheduler, guidance, seed); 64x64.
IMAGES = [
    ("break", 8, "euler", 7.5, 5),
    ("long_negative", 8, "euler", 7.5, 6),
    ("clip_skip_2", 8, "dpmpp_2m", 6.0, 7),
    ("weights", 8, "euler_a", 7.5, 8),
]
SIZE = 64


def perturbed_text_encoder(pipe):
    g = torch.Generator().manual_seed(4242)
    ln = pipe.text_encoder.text_model.final_layer_norm if hasattr(pipe.text_encoder, "text_model") \
        else pipe.text_encoder.final_layer_norm
    with torch.no_grad():
        ln.bias.copy_(torch.randn(ln.bias.shape, generator=g) * 0.5 + 0.3)
        ln.weight.copy_(1.0 + torch.randn(ln.weight.shape, generator=g) * 0.2)


def self_check(pipe):
    """The A1111 path on plain prompts of <= 75 tokens is diffusers' encode_prompt."""
    for prompt, negative in [("a photo of an astronaut riding a horse on mars", "blurry, low quality"),
                             ("a cat", ""), ("", "")]:
        cond, uncond = pipe.encode_prompt(prompt, "cpu", 1, True, negative)
        _, _, mine = conditioning(pipe, prompt, "a1111", 1)
        _, _, mine_neg = conditioning(pipe, negative, "a1111", 1)
        d = max(float((cond - mine).abs().max()), float((uncond - mine_neg).abs().max()))
        print(f"self-check vs diffusers encode_prompt {prompt!r}: max abs diff {d:.2e}")
        assert d < 1e-6, (prompt, d)


def denoise(pipe, cond, uncond, steps, scheduler_name, guidance, seed):
    """diffusers' denoising loop; prompts of different lengths run as two UNet passes."""
    import diffusers
    from api_schedulers import SCHEDULERS

    cls_name, extra = SCHEDULERS[scheduler_name]
    sched = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **extra)
    sched.set_timesteps(steps)
    g = torch.Generator("cpu").manual_seed(seed)
    f = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    latents = torch.randn(1, pipe.unet.config.in_channels, SIZE // f, SIZE // f, generator=g)
    latents = latents * sched.init_noise_sigma
    for t in sched.timesteps:
        x = sched.scale_model_input(latents, t)
        if cond.shape == uncond.shape:
            eps_u, eps_c = pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
        else:
            eps_u = pipe.unet(x, t, encoder_hidden_states=uncond).sample
            eps_c = pipe.unet(x, t, encoder_hidden_states=cond).sample
        eps = eps_u + guidance * (eps_c - eps_u)
        latents = sched.step(eps, t, latents, generator=g).prev_sample
    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    image = (image / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0)
    return (image.numpy() * 255).round().astype("uint8")


def loop_self_check(pipe):
    """The loop above is diffusers' pipeline for a plain prompt."""
    prompt, negative = "a photo of an astronaut riding a horse on mars", "blurry, low quality"
    cond, uncond = pipe.encode_prompt(prompt, "cpu", 1, True, negative)
    import diffusers
    from api_schedulers import SCHEDULERS
    cls_name, extra = SCHEDULERS["euler"]
    saved = pipe.scheduler
    pipe.scheduler = getattr(diffusers, cls_name).from_config(saved.config, **extra)
    want = pipe(prompt, negative_prompt=negative, num_inference_steps=4, width=SIZE, height=SIZE,
                guidance_scale=7.5, generator=torch.Generator("cpu").manual_seed(3), output_type="np").images[0]
    pipe.scheduler = saved
    got = denoise(pipe, cond, uncond, 4, "euler", 7.5, 3)
    d = abs((want * 255).round().astype("int32") - got.astype("int32")).max()
    print(f"loop self-check vs StableDiffusionPipeline: max pixel diff {d}")
    assert d <= 1, d


def main():
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from diffusers import StableDiffusionPipeline

    torch.set_grad_enabled(False)
    pipe = StableDiffusionPipeline.from_pretrained(
        BASE_MODEL, dtype=torch.float32, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    perturbed_text_encoder(pipe)
    self_check(pipe)
    loop_self_check(pipe)

    os.makedirs(OUT, exist_ok=True)
    pipe.text_encoder.save_pretrained(os.path.join(OUT, "text_encoder"), safe_serialization=True)

    tensors, meta = {}, {"generated_by": "tools/make_prompt_fixtures.py", "base_model": "tiny-a",
                         "text_encoder": "tiny-a's, final layer norm perturbed (seed 4242)",
                         "cases": {}, "images": {}}
    for name, (prompt, negative, clip_skip, syntax) in CASES.items():
        pieces, chunks, cond = conditioning(pipe, prompt, syntax, clip_skip)
        neg_pieces, neg_chunks, uncond = conditioning(pipe, negative, syntax, clip_skip)
        tensors[f"{name}.cond"] = cond
        tensors[f"{name}.uncond"] = uncond
        meta["cases"][name] = dict(
            prompt=prompt, negative_prompt=negative, clip_skip=clip_skip, prompt_syntax=syntax,
            pieces=[[t, w] for t, w in pieces], negative_pieces=[[t, w] for t, w in neg_pieces],
            chunks=[dict(ids=i, weights=w) for i, w in chunks],
            negative_chunks=[dict(ids=i, weights=w) for i, w in neg_chunks])
        print(f"{name}: {len(chunks)} + {len(neg_chunks)} chunks, cond std {float(cond.std()):.3f}")
    # The fixtures must exercise what they claim.
    cases = meta["cases"]
    assert len(cases["long_commas"]["chunks"]) >= 2 and len(cases["break"]["chunks"]) == 2
    assert len(cases["long_negative"]["negative_chunks"]) > len(cases["long_negative"]["chunks"])
    edge = cases["long_commas"]["chunks"][0]["ids"]
    assert edge[-2] == pipe.tokenizer.eos_token_id or edge[75] != pipe.tokenizer.eos_token_id
    # The comma backtrack moved words: chunk 0 ends in a comma before its padding.
    comma = pipe.tokenizer.convert_tokens_to_ids(",</w>")
    body = [i for i in edge[1:] if i != pipe.tokenizer.eos_token_id]
    assert body[-1] == comma and len(body) < 75, body

    for name, steps, sched, guidance, seed in IMAGES:
        img = denoise(pipe, tensors[f"{name}.cond"], tensors[f"{name}.uncond"], steps, sched, guidance, seed)
        tensors[f"image.{name}"] = torch.from_numpy(img)
        meta["images"][name] = dict(steps=steps, scheduler=sched, guidance_scale=guidance, seed=seed,
                                    width=SIZE, height=SIZE)
        print(f"image.{name}: mean {img.mean():.1f} std {img.std():.1f}")
        assert img.std() > 2.0

    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, os.path.join(OUT, "prompts.safetensors"),
              metadata={"generated_by": "tools/make_prompt_fixtures.py"})
    with open(os.path.join(OUT, "prompts.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main()
