#!/usr/bin/env python3
"""Process memory of VAE swaps (VAE_DIR) with an SD 1.5-sized VAE, on the CPU.

Makes, in a temporary folder: tiny-a-vae8 with its VAE replaced by a random SD 1.5-shaped one
(128/256/512/512 channels, 2 layers per block: 320 MB in f32) and VAE_DIR holding another
random one as an LDM `.safetensors` (f32) and `.ckpt` (fp16). Starts `sdserve serve` on it
(RESPONSE_CACHE_MB=0), sends 256x256 1-step requests that alternate between the model's own
VAE and the external ones, and prints the process's resident memory after each (VmRSS, with
its anonymous and file-backed parts) and its peak during each (VmHWM, reset before each
request through /proc/<pid>/clear_refs). Two VAEs held at once would show as a peak of about
both plus the decode.

Usage: python3 tools/vae_swap_memory.py [--bin target/debug/sdserve]
       (diffusers and torch as pinned in tools/requirements.txt)
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_single_file import VAE_PREFIX, vae_to_ldm  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "crates", "pipeline", "tests", "fixtures", "tiny-a-vae8")
SD15_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=512,
                scaling_factor=0.18215)


def make(work):
    import torch
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    model = os.path.join(work, "model")
    shutil.copytree(MODEL, model)
    shutil.rmtree(os.path.join(model, "vae"))
    torch.manual_seed(1)
    AutoencoderKL(**SD15_VAE).save_pretrained(os.path.join(model, "vae"), safe_serialization=True)
    with open(os.path.join(model, "vae", "config.json")) as f:
        config = json.load(f)
    torch.manual_seed(2)
    other = AutoencoderKL(**SD15_VAE)
    ldm = {k[len(VAE_PREFIX):]: v.contiguous()
           for k, v in vae_to_ldm(dict(other.state_dict()), config).items()}
    vaes = os.path.join(work, "vaes")
    os.makedirs(vaes)
    save_file(ldm, os.path.join(vaes, "big.safetensors"))
    torch.save({"state_dict": {k: v.half() for k, v in ldm.items()}},
               os.path.join(vaes, "big-fp16.ckpt"))
    return model, vaes


def status(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) // 1024
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "debug", "sdserve"))
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="sdserve-vae-memory-")
    proc = None
    try:
        model, vaes = make(work)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = dict(PATH=os.environ.get("PATH", ""), MODEL_ID=model, VAE_DIR=vaes,
                   MODEL_CACHE_DIR=os.path.join(work, "cache"), PORT=str(port),
                   RESPONSE_CACHE_MB="0", GENERATION_TIMEOUT_SECONDS="600")
        proc = subprocess.Popen([args.bin, "serve"], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            try:
                if urllib.request.urlopen(url + "/health").status == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError("the server did not get ready")
            time.sleep(0.2)

        def reset_peak():
            with open(f"/proc/{proc.pid}/clear_refs", "w") as f:
                f.write("5")

        print(f"{'after':24} {'RSS':>6} {'anon':>6} {'file':>6} {'peak':>6}  (MB)")
        s = status(proc.pid)
        print(f"{'load':24} {s['VmRSS']:6} {s['RssAnon']:6} {s['RssFile']:6} {s['VmHWM']:6}")
        for vae in [None, "big.safetensors", None, "big-fp16.ckpt", "big.safetensors", None]:
            reset_peak()
            body = dict(prompt="a", seed=1, steps=1, width=256, height=256)
            if vae:
                body["vae"] = vae
            req = urllib.request.Request(url + "/generate", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
            meta = json.load(urllib.request.urlopen(req))["metadata"]
            assert meta["vae"] == vae, meta
            s = status(proc.pid)
            label = vae or "the model's own"
            print(f"{label:24} {s['VmRSS']:6} {s['RssAnon']:6} {s['RssFile']:6} {s['VmHWM']:6}")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
