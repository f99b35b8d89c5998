#!/usr/bin/env python3
"""Per-stage CPU timings of diffusers 0.42.1 / torch 2.11.0 on a model folder, as the Rust bench
`crates/pipeline/benches/stages.rs` measures ours: text encode (prompt + empty negative), one UNet
step with guidance (batch 2), VAE decode, and whole generations: text-to-image at --full-sizes,
img2img (strength 0.75) and inpainting (strength 1.0, right half repainted; the same synthetic
picture and mask as the Rust bench) at --image-sizes; medians over repeats with min/max, the median
CPU time of the process (all threads) and peak RSS (VmHWM, reset through /proc/self/clear_refs
before each stage).

    python3 tools/bench_diffusers.py --model /work/models/sd15-random --threads 2 \
        --sizes 256,512 --repeats 3 --full-sizes 256 --image-sizes 512 --json diffusers.json

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


def median(v):
    v = sorted(v)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def measure(name, repeats, fn):
    reset_peak_rss()
    times, cpu = [], []
    for _ in range(repeats):
        c = time.process_time()  # the whole process, all threads (as the Rust bench reads it)
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - c)
    stat = {
        "stage": name,
        "median_s": round(median(times), 4),
        "min_s": round(min(times), 4),
        "max_s": round(max(times), 4),
        "cpu_median_s": round(median(cpu), 4),
        "repeats": repeats,
        "peak_rss_mb": round(status_kb("VmHWM:") / 1024),
    }
    print(
        f"{name:<28} median {stat['median_s']:8.3f} s  min {stat['min_s']:8.3f}  "
        f"max {stat['max_s']:8.3f}  cpu {stat['cpu_median_s']:8.3f} s  "
        f"peak RSS {stat['peak_rss_mb']:7.0f} MB",
        file=sys.stderr,
    )
    return stat


def synthetic_picture(size, f):
    """The Rust bench's synthetic pictures: pixel (x, y, channel) = f(x, y, c), integer maths."""
    import numpy as np
    from PIL import Image

    y, x, c = np.meshgrid(np.arange(size), np.arange(size), np.arange(3), indexing="ij")
    return Image.fromarray(f(x, y, c).astype(np.uint8), "RGB")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sizes", default="256,512")
    ap.add_argument("--full-sizes", default="256")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--image-sizes", default="")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    full_sizes = [int(s) for s in args.full_sizes.split(",") if s]
    image_sizes = [int(s) for s in args.image_sizes.split(",") if s]

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

        if image_sizes:
            from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline

            img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
            inpaint = StableDiffusionInpaintPipeline(**pipe.components)
            for p in (img2img, inpaint):
                p.set_progress_bar_config(disable=True)
        for size in image_sizes:
            image = synthetic_picture(size, lambda x, y, c: (x * 255 // size + y * 97 // size + c * 60) % 256)
            mask = synthetic_picture(size, lambda x, y, c: (x >= size // 2) * 255)
            runs = [("img2img", img2img, dict(image=image), 0.75),
                    ("inpaint", inpaint, dict(image=image, mask_image=mask, height=size, width=size), 1.0)]
            for name, p, inputs, strength in runs:

                def generate():
                    g = torch.Generator("cpu").manual_seed(0)
                    p(prompt, negative_prompt="", num_inference_steps=args.steps, strength=strength,
                      guidance_scale=7.5, generator=g, output_type="np", **inputs)

                stats.append(measure(f"{name}_{args.steps}steps_s{strength:g}_{size}",
                                     max(1, min(args.repeats, 2)), generate))

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
