#!/usr/bin/env python3
"""Per-stage CPU timings of diffusers 0.42.1 / torch 2.11.0 on a model folder, as the Rust bench
`crates/pipeline/benches/stages.rs` measures ours: text encode (prompt + empty negative), one UNet
step with guidance (batch 2), VAE decode, and whole generations; medians over repeats with min/max
and peak RSS (VmHWM, reset through /proc/self/clear_refs before each stage).

    python3 tools/bench_diffusers.py --model /work/models/sd15-random --threads 2 \
        --sizes 256,512 --repeats 3 --full-sizes 256 --json diffusers.json

Prints a table on stderr and one JSON object on stdout (same schema as the Rust bench).
"""

import argparse
import json
import os
import sys
import time


def status_kb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    return 0


def reset_peak_rss():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def measure(name, repeats, fn):
    reset_peak_rss()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    stat = {
        "stage": name,
        "median_s": round(times[len(times) // 2], 4),
        "min_s": round(times[0], 4),
        "max_s": round(times[-1], 4),
        "repeats": repeats,
        "peak_rss_mb": round(status_kb("VmHWM:") / 1024),
    }
    print(
        f"{name:<28} median {stat['median_s']:8.3f} s  min {stat['min_s']:8.3f}  "
        f"max {stat['max_s']:8.3f}  peak RSS {stat['peak_rss_mb']:7.0f} MB",
        file=sys.stderr,
    )
    return stat


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sizes", default="256,512")
    ap.add_argument("--full-sizes", default="256")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    full_sizes = [int(s) for s in args.full_sizes.split(",") if s]

    import torch
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(args.model, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - start
    weights_rss_mb = status_kb("VmRSS:") / 1024
    # Read before the first stage resets the high-water mark: the load's own peak.
    load_peak_rss_mb = status_kb("VmHWM:") / 1024
    print(
        f"loaded {args.model} in {load_s:.2f} s (RSS {weights_rss_mb:.0f} MB, "
        f"threads {args.threads}, torch {torch.__version__})",
        file=sys.stderr,
    )

    prompt = "a photograph of an astronaut riding a horse"
    stats = []
    with torch.inference_mode():
        emb = {}

        def encode():
            cond, uncond = pipe.encode_prompt(prompt, "cpu", 1, True, "")
            emb["e"] = torch.cat([uncond, cond])

        stats.append(measure("text_encode", args.repeats, encode))
        embeddings = emb["e"]

        unet, vae = pipe.unet, pipe.vae
        for size in sizes:
            cells = size // pipe.vae_scale_factor
            g = torch.Generator("cpu").manual_seed(0)
            latents = torch.randn(
                (1, unet.config.in_channels, cells, cells), generator=g, dtype=torch.float32
            )
            t = torch.tensor(500.0)

            def step():
                x = torch.cat([latents, latents])
                noise = unet(x, t, encoder_hidden_states=embeddings).sample
                uncond, cond = noise.chunk(2)
                return uncond + 7.5 * (cond - uncond)

            stats.append(measure(f"unet_step_cfg_{size}", args.repeats, step))

            def decode():
                return vae.decode(latents / vae.config.scaling_factor).sample

            stats.append(measure(f"vae_decode_{size}", args.repeats, decode))

        for size in full_sizes:

            def generate():
                g = torch.Generator("cpu").manual_seed(0)
                pipe(
                    prompt,
                    negative_prompt="",
                    num_inference_steps=args.steps,
                    height=size,
                    width=size,
                    guidance_scale=7.5,
                    generator=g,
                    output_type="np",
                )

            stats.append(
                measure(
                    f"generate_{args.steps}steps_{size}",
                    max(1, min(args.repeats, 2)),
                    generate,
                )
            )

    out = {
        "implementation": "diffusers",
        "model": args.model,
        "threads": str(args.threads),
        "load_s": round(load_s, 3),
        "load_peak_rss_mb": round(load_peak_rss_mb),
        "weights_rss_mb": round(weights_rss_mb),
        # VmHWM is reset before each stage: the run's peak is the largest of the load's peak
        # and the stage peaks.
        "peak_rss_mb": max([round(status_kb("VmHWM:") / 1024), round(load_peak_rss_mb)]
                           + [s["peak_rss_mb"] for s in stats]),
        "stages": stats,
    }
    text = json.dumps(out)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
