#!/usr/bin/env python3
"""Rebuild the real CLIP ViT-L/14 tokenizer files and the tokenizer reference cases.

Writes, under crates/pipeline/tests/fixtures/ (or OUT_DIR):
  clip-tokenizer/vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json
      the same files as openai/clip-vit-large-patch14's (and SD 1.5's tokenizer/ folder),
      rebuilt from OpenAI's BPE merge list `bpe_simple_vocab_16e6.txt.gz`, which the
      `open_clip_torch` wheel on PyPI ships (the model hubs are not reachable here).
  tokenizer_cases.json
      [{"prompt": str, "ids": [77 ints]}] from transformers' CLIPTokenizer loaded from that
      folder and called as diffusers' StableDiffusionPipeline.encode_prompt does. Entries that
      also carry "tokenizer_config" (and "special_tokens_map", null = no such file) were made
      with those two files replaced: special-token spellings (plain string or AddedToken,
      normalized or not, another pad token) change which special tokens match where. Entries
      with "tokenizer_json_added_tokens" were made with a tokenizer.json beside them (same
      vocabulary and merges, those added tokens), which transformers then prefers.

CLIP's vocabulary construction (clip/simple_tokenizer.py):
  merges = lines[1 : 49152 - 256 - 2 + 1]                        (48894 merges)
  vocab  = bytes_to_unicode() symbols (256), the same + "</w>" (256),
           "".join(merge) for each merge, "<|startoftext|>", "<|endoftext|>"   -> 49408 ids

Pinned: open_clip_torch 3.3.0, transformers 5.24.0 (tokenizers 0.23.x).

Note on transformers 5.24: `CLIPTokenizer` is the tokenizers-backed (Rust) tokenizer
(`TokenizersBackend`; there is no separate slow/fast pair any more). Without a
tokenizer.json it builds BPE(end_of_word_suffix="</w>") with normalizer
NFC + Replace(\\s+ -> " ") + Lowercase, pre-tokenizer Split(CLIP regex, removed, invert)
+ ByteLevel(add_prefix_space=False) and RobertaProcessing (BOS ... EOS). No ftfy /
html-unescape cleaning as OpenAI's own python tokenizer does.

Usage:
  python tools/make_tokenizer_fixtures.py [--wheel open_clip_torch-3.3.0-py3-none-any.whl] [--out DIR]
"""

import argparse
import glob
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

from tiny_clip_tokenizer import BOS, EOS, bytes_to_unicode

OPEN_CLIP_VERSION = "3.3.0"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO_ROOT, "crates", "pipeline", "tests", "fixtures")


def read_bpe_lines(wheel):
    with zipfile.ZipFile(wheel) as z:
        data = z.read("open_clip/bpe_simple_vocab_16e6.txt.gz")
    return gzip.decompress(data).decode("utf-8").split("\n")


def fetch_wheel(tmp):
    subprocess.run(
        [sys.executable, "-m", "pip", "download", f"open_clip_torch=={OPEN_CLIP_VERSION}", "--no-deps", "-d", tmp],
        check=True,
    )
    (wheel,) = glob.glob(os.path.join(tmp, "open_clip_torch-*.whl"))
    return wheel


def build_vocab(lines):
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    assert len(merges) == 48894 and all(len(m) == 2 for m in merges)
    syms = list(bytes_to_unicode().values())
    vocab_list = syms + [s + "</w>" for s in syms] + ["".join(m) for m in merges] + [BOS, EOS]
    assert len(vocab_list) == 49408 and len(set(vocab_list)) == 49408
    return {t: i for i, t in enumerate(vocab_list)}, merges


def added_token(content):
    # The AddedToken form the published SD 1.5 tokenizer_config.json uses.
    return {
        "__type": "AddedToken",
        "content": content,
        "lstrip": False,
        "normalized": True,
        "rstrip": False,
        "single_word": False,
    }


def write_tokenizer(tok_dir, vocab, merges):
    os.makedirs(tok_dir, exist_ok=True)
    with open(os.path.join(tok_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(tok_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.write("\n".join(f"{a} {b}" for a, b in merges) + "\n")
    # Same fields as SD 1.5's tokenizer/tokenizer_config.json and special_tokens_map.json.
    config = {
        "add_prefix_space": False,
        "bos_token": added_token(BOS),
        "do_lower_case": True,
        "eos_token": added_token(EOS),
        "errors": "replace",
        "model_max_length": 77,
        "name_or_path": "openai/clip-vit-large-patch14",
        "pad_token": EOS,
        "special_tokens_map_file": "./special_tokens_map.json",
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": added_token(EOS),
    }
    with open(os.path.join(tok_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    stm = {k: ({kk: vv for kk, vv in v.items() if kk != "__type"} if isinstance(v, dict) else v)
           for k, v in config.items() if k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    with open(os.path.join(tok_dir, "special_tokens_map.json"), "w") as f:
        json.dump(stm, f, indent=2)


LONG = (
    "a breathtaking ultra detailed matte painting of a colossal ancient city floating above the clouds, "
    "golden hour lighting, volumetric fog, intricate gothic architecture, waterfalls pouring off the edges, "
    "flocks of birds, airships with brass propellers, by greg rutkowski and alphonse mucha, trending on "
    "artstation, octane render, 8k, highly detailed, sharp focus, cinematic composition, dramatic sky"
)

PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "A PHOTO of a Cat, HDR, 4K!!! MiXeD CaSe",
    "hello...world?!?! ---- *** ((( ))) [[ ]] {}",
    "masterpiece, best quality, (detailed:1.2), [background], <lora:x:0.8>",
    "caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00dcBER",  # precomposed (NFC)
    "cafe\u0301 nai\u0308ve re\u0301sume\u0301 U\u0308BER",  # decomposed (NFD): NFC must compose
    "\u1112\u1161\u11ab\u1100\u116e\u11a8\u110b\u1165 (hangul jamo, NFD)",
    "\u6771\u4eac\u306e\u591c\u666f\u3001\u30cd\u30aa\u30f3\u3068\u96e8 \u4e2d\u6587\u63d0\u793a",  # CJK
    "a cat \U0001F431\U0001F436 with emoji \U0001F469\u200d\U0001F469\u200d\U0001F467 family \u2764\ufe0f",
    "tabs\tand\nnewlines\r\n  and    spaces\t\t",
    "it's don't they're we've I'm you'll he'd IT'S DON'T",
    "rock'n'roll o'clock 'quoted' ''' '",
    "\u2018smart quotes\u2019 \u201cdouble\u201d \u2014 em dash \u2026 ellipsis",
    "numbers 1234 and 3.14159 and 1,000,000 and 007",
    "\ufb01 ligature \u2460 circled \u216b roman \u00b2\u00b3 super \u0661\u0662\u0663 arabic-indic",
    "spaces:\u00a0nbsp\u1680ogham\u2003em\u2028ls\u2029ps\u202fnnbsp\u205fmm\u3000ideo\u0085nel",
    "not spaces:\u200bzwsp\u180emvs\ufeffbom\u200dzwj",
    "Hindi \u0928\u092e\u0938\u094d\u0924\u0947 Arabic \u0645\u0631\u062d\u0628\u0627 Thai \u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35",
    "\u00dcn\u00efc\u00f6d\u00e9 \u0391\u0392\u0393 \u03a3\u039f\u03a6\u0399\u0391 \u041f\u0440\u0438\u0432\u0435\u0442 \u041c\u0418\u0420",
    "a <|endoftext|> b",
    "<|startoftext|>hello<|endoftext|>",
    "<|ENDOFTEXT|> upper <|StartOfText|>",
    "",
    "     ",
    "  leading and trailing  ",
    "x" * 300,
    LONG,
    LONG + " " + LONG,
    "control\x00chars\x07and\x1bescape",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
]


def encode(tok, prompt):
    # As diffusers' StableDiffusionPipeline.encode_prompt tokenizes.
    ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids[0].tolist()
    assert len(ids) == tok.model_max_length
    return ids


def make_cases(tok_dir):
    import transformers
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tok_dir)
    assert tok.model_max_length == 77
    print(f"transformers {transformers.__version__}: {type(tok).__mro__[1].__name__}-backed CLIPTokenizer")
    cases = [{"prompt": p, "ids": encode(tok, p)} for p in PROMPTS]
    n_trunc = sum(1 for c in cases if c["ids"][-1] == tok.eos_token_id and c["ids"][-2] != tok.eos_token_id)
    print(f"{len(cases)} cases, {n_trunc} truncated")
    return cases


def at(content, normalized):
    return {**added_token(content), "normalized": normalized}


# (tokenizer_config.json, special_tokens_map.json or None) variants. Special tokens whose
# content several roles share resolve in a particular order in transformers 5.24.
CONFIG_VARIANTS = [
    ({"model_max_length": 77, "bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}, None),
    ({"model_max_length": 77, "bos_token": at(BOS, True), "eos_token": at(EOS, True),
      "unk_token": at(EOS, True), "pad_token": at(EOS, True)}, None),
    ({"model_max_length": 77, "bos_token": at(BOS, False), "eos_token": at(EOS, False),
      "unk_token": at(EOS, True), "pad_token": at(EOS, False)}, None),
    ({"model_max_length": 77, "bos_token": at(BOS, True), "eos_token": at(EOS, True),
      "unk_token": at(EOS, False), "pad_token": at(EOS, True)}, None),
    ({"model_max_length": 77, "bos_token": at(BOS, True), "eos_token": EOS,
      "unk_token": at(EOS, True), "pad_token": EOS}, None),
    # special_tokens_map.json overrides tokenizer_config.json.
    ({"model_max_length": 77, "bos_token": at(BOS, True), "eos_token": at(EOS, True),
      "unk_token": at(EOS, True), "pad_token": at(EOS, True)},
     {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}),
    # "!" as pad (SD 2 style), as a string and as an AddedToken; a shorter max length.
    ({"model_max_length": 77, "bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": "!"}, None),
    ({"model_max_length": 20, "pad_token": EOS},
     {"bos_token": at(BOS, True), "eos_token": at(EOS, True), "unk_token": at(EOS, True),
      "pad_token": at("!", True)}),
]
# tokenizer.json added tokens (BOS normalized, EOS normalized) with these configs.
JSON_VARIANTS = [
    ((True, True), CONFIG_VARIANTS[0]),
    ((True, False), CONFIG_VARIANTS[1]),
    ((False, True), CONFIG_VARIANTS[4]),
]
VARIANT_PROMPTS = [
    "<|EndOfText|> hi <|StartOfText|>!!! wow! <|endoftext|>",
    "A RED <|STARTOFTEXT|>CAR!!",
]


def tokenizer_with(tmp, config, stm):
    """CLIPTokenizer of folder `tmp` with tokenizer_config.json `config` and special_tokens_map.json
    `stm` (None: no such file)."""
    from transformers import CLIPTokenizer

    with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    stm_path = os.path.join(tmp, "special_tokens_map.json")
    if os.path.exists(stm_path):
        os.remove(stm_path)
    if stm is not None:
        with open(stm_path, "w") as f:
            json.dump(stm, f)
    return CLIPTokenizer.from_pretrained(tmp)


def make_variant_cases(tok_dir):
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        for f in ("vocab.json", "merges.txt"):
            shutil.copy(os.path.join(tok_dir, f), tmp)
        for config, stm in CONFIG_VARIANTS:
            tok = tokenizer_with(tmp, config, stm)
            for p in VARIANT_PROMPTS:
                cases.append({"prompt": p, "ids": encode(tok, p), "tokenizer_config": config,
                              "special_tokens_map": stm})
        for (nb, ne), (config, stm) in JSON_VARIANTS:
            added = write_tokenizer_json(tmp, nb, ne)
            tok = tokenizer_with(tmp, config, stm)
            for p in VARIANT_PROMPTS:
                cases.append({"prompt": p, "ids": encode(tok, p), "tokenizer_config": config,
                              "special_tokens_map": stm, "tokenizer_json_added_tokens": added})
    print(f"{len(cases)} config-variant cases")
    return cases


def write_tokenizer_json(tmp, bos_normalized, eos_normalized):
    """A tokenizer.json as openai/clip-vit-large-patch14 ships it, with the given added-token
    flags; returns its added_tokens list."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    with open(os.path.join(tmp, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    with open(os.path.join(tmp, "merges.txt"), encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f.read().split("\n")[1:] if line]
    tk = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                       end_of_word_suffix="</w>", fuse_unk=False, unk_token=EOS))
    tk.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.RobertaProcessing((EOS, vocab[EOS]), (BOS, vocab[BOS]),
                                                     trim_offsets=False, add_prefix_space=False)
    tk.add_special_tokens([AddedToken(BOS, special=True, normalized=bos_normalized),
                           AddedToken(EOS, special=True, normalized=eos_normalized)])
    tk.save(os.path.join(tmp, "tokenizer.json"))
    with open(os.path.join(tmp, "tokenizer.json"), encoding="utf-8") as f:
        return json.load(f)["added_tokens"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--wheel", help="a downloaded open_clip_torch wheel (default: pip download it)")
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel or fetch_wheel(tmp)
        vocab, merges = build_vocab(read_bpe_lines(wheel))
    tok_dir = os.path.join(args.out, "clip-tokenizer")
    write_tokenizer(tok_dir, vocab, merges)
    cases = make_cases(tok_dir) + make_variant_cases(tok_dir)
    with open(os.path.join(args.out, "tokenizer_cases.json"), "w", encoding="utf-8") as f:
        json.dump(cases, f, ensure_ascii=True, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
