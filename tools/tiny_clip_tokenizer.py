"""The tiny models' CLIP tokenizer (tools/make_tiny_models.py): CLIP's vocabulary construction
with the merge list cut to the first N_MERGES merges of the real CLIP BPE file, and the files of
a tokenizer folder as the published SD 1.5 / SD 2 repos hold them."""

import glob
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

OPEN_CLIP_WHEEL = "open_clip_torch==3.3.0"

N_MERGES = 488  # -> vocab 1002: 512 byte symbols + 488 merges + BOS + EOS
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode():
    """CLIP / GPT-2 byte -> printable unicode symbol table, in CLIP's order."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def read_clip_bpe(path):
    if path is None:
        tmp = tempfile.mkdtemp(prefix="open_clip_")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", OPEN_CLIP_WHEEL, "--no-deps", "-q", "-d", tmp],
            check=True,
        )
        whl = glob.glob(os.path.join(tmp, "*.whl"))[0]
        with zipfile.ZipFile(whl) as z:
            raw = z.read("open_clip/bpe_simple_vocab_16e6.txt.gz")
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        with open(path, "rb") as f:
            raw = f.read()
    return gzip.decompress(raw).decode("utf-8").split("\n")


def tiny_clip_vocab(bpe_lines):
    """CLIP's vocabulary construction (openai/CLIP simple_tokenizer.py), with
    the merge list cut to the first N_MERGES entries."""
    merges = [tuple(m.split()) for m in bpe_lines[1 : 1 + N_MERGES]]  # line 0 is a header
    assert len(merges) == N_MERGES and all(len(m) == 2 for m in merges)
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += [BOS, EOS]
    assert len(vocab) == 1002 and len(set(vocab)) == len(vocab)
    return {t: i for i, t in enumerate(vocab)}, merges


def added_token(content):
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def write_tokenizer(tok_dir, vocab, merges, pad_token):
    """Files as in the published SD 1.5 (pad <|endoftext|>) / SD 2 (pad "!")
    tokenizer folders: no tokenizer.json."""
    if os.path.isdir(tok_dir):
        shutil.rmtree(tok_dir)
    os.makedirs(tok_dir)
    with open(os.path.join(tok_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(tok_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.write("".join(f"{a} {b}\n" for a, b in merges))
    cfg = {
        "add_prefix_space": False,
        "bos_token": {"__type": "AddedToken", **added_token(BOS)},
        "do_lower_case": True,
        "eos_token": {"__type": "AddedToken", **added_token(EOS)},
        "errors": "replace",
        "model_max_length": 77,
        "pad_token": pad_token if pad_token == EOS else {"__type": "AddedToken", **added_token(pad_token)},
        "special_tokens_map_file": "./special_tokens_map.json",
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": {"__type": "AddedToken", **added_token(EOS)},
    }
    with open(os.path.join(tok_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
        f.write("\n")
    stm = {
        "bos_token": added_token(BOS),
        "eos_token": added_token(EOS),
        "pad_token": pad_token if pad_token == EOS else added_token(pad_token),
        "unk_token": added_token(EOS),
    }
    with open(os.path.join(tok_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(stm, f, indent=2, ensure_ascii=False)
        f.write("\n")
