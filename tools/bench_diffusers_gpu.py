#!/usr/bin/env python3
"""diffusers 0.42.1 on a CUDA GPU, measured the way `sdserve bench` measures ours: whole
generations timed per step (device synchronised at every step), device memory, and the images
kept as PNG for `tools/compare_images.py`.

    python3 tools/bench_diffusers_gpu.py --model /path/sd15 --dtype fp16 --sizes 512,768 \
        --steps 20 --repeats 3 --seeds 1,2 --schedulers pndm,dpmpp_2m --png-dir out/diffusers-fp16

Attention is diffusers' default on torch 2 (scaled_dot_product_attention: flash / memory-efficient
kernels). `--dtype fp32` with NVIDIA_TF32_OVERRIDE=0 in the environment gives the strict f32
reference. Latents come from a CPU torch.Generator, as sdserve's (torch's CPU randn).

Prints one JSON object on stdout (schema of `sdserve bench`); progress on stderr.
"""

import argparse
import json
import os
import statistics
import sys
import time

from api_schedulers import FIRST_NAMES, SCHEDULERS, make_scheduler


def mib(b):
    return round(b / (1 << 20), 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", choices=["fp16", "fp32"], default="fp16")
    ap.add_argument("--sizes", default="512")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--schedulers", default="")
    ap.add_argument("--guidance-scale", type=float, default=7.5)
    ap.add_argument("--prompt", default="a photograph of an astronaut riding a horse")
    ap.add_argument("--png-dir")
    ap.add_argument("--attention-slicing", action="store_true", help="pipe.enable_attention_slicing()")
    ap.add_argument("--vae-tiling", action="store_true", help="pipe.enable_vae_tiling()")
    ap.add_argument("--model-offload", action="store_true", help="pipe.enable_model_cpu_offload()")
    ap.add_argument("--profile", action="store_true",
                    help="also time one UNet step with guidance per size under torch.profiler: "
                         "device ms per kind of kernel (conv, gemm, attention, norm, other)")
    args = ap.parse_args()

    import numpy as np
    import torch
    import diffusers
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    start = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(
        args.model, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False
    )
    if args.model_offload:
        pipe.enable_model_cpu_offload()
    else:
        pipe = pipe.to("cuda")
    if args.attention_slicing:
        pipe.enable_attention_slicing()
    if args.vae_tiling:
        pipe.enable_vae_tiling()
    pipe.set_progress_bar_config(disable=True)
    default_scheduler_config = pipe.scheduler.config
    # Warm-up (cuDNN autotuning, kernel loading), as sdserve warms up at load.
    pipe("warm-up", num_inference_steps=2, height=64, width=64, output_type="np")
    torch.cuda.synchronize()
    load_s = time.perf_counter() - start
    print(f"loaded in {load_s:.1f}s: torch {torch.__version__}, diffusers {diffusers.__version__}, "
          f"{torch.cuda.get_device_name()}", file=sys.stderr)

    sizes = [int(s) for s in args.sizes.split(",") if s]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    names = [s for s in args.schedulers.split(",") if s] or [None]
    if args.png_dir:
        os.makedirs(args.png_dir, exist_ok=True)
    total = torch.cuda.mem_get_info()[1]
    cases = []
    for size in sizes:
        for name in names:
            if name is None:
                sched = pipe.scheduler.__class__.from_config(default_scheduler_config)
                label = {SCHEDULERS[k][0]: k for k in FIRST_NAMES if "karras" not in k}.get(
                    sched.__class__.__name__, sched.__class__.__name__)
            else:
                sched = make_scheduler(name, default_scheduler_config)
                label = name
            pipe.scheduler = sched
            runs = []
            for r in range(args.repeats):
                seed = seeds[r % len(seeds)]
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                start_used = total - torch.cuda.mem_get_info()[0]
                peak_used = [start_used]
                step_times = []
                t0 = time.perf_counter()
                last = [t0]

                def on_step(pipe_, i, t, kw):
                    torch.cuda.synchronize()
                    now = time.perf_counter()
                    step_times.append(now - last[0])
                    last[0] = now
                    peak_used[0] = max(peak_used[0], total - torch.cuda.mem_get_info()[0])
                    return kw

                g = torch.Generator("cpu").manual_seed(seed)
                with torch.inference_mode():
                    out = pipe(
                        args.prompt,
                        negative_prompt="",
                        num_inference_steps=args.steps,
                        height=size,
                        width=size,
                        guidance_scale=args.guidance_scale,
                        generator=g,
                        output_type="np",
                        callback_on_step_end=on_step,
                    )
                torch.cuda.synchronize()
                wall = time.perf_counter() - t0
                peak_used[0] = max(peak_used[0], total - torch.cuda.mem_get_info()[0])
                run = {
                    "seed": seed,
                    "wall_s": round(wall, 4),
                    "step_median_s": round(statistics.median(step_times[1:] or step_times), 5),
                    "peak_used_mb": mib(peak_used[0]),
                    # The caching allocator's high-water mark of live tensors (our pool peak's twin).
                    "pool_peak_mb": mib(torch.cuda.max_memory_allocated()),
                    "reserved_peak_mb": mib(torch.cuda.max_memory_reserved()),
                    "start_used_mb": mib(start_used),
                }
                print(f"{size}x{size} {label} seed {seed}: {wall:.3f}s, {run['step_median_s']:.4f}s/step, "
                      f"peak {run['peak_used_mb']} MiB, allocated peak {run['pool_peak_mb']} MiB",
                      file=sys.stderr)
                if args.png_dir:
                    path = os.path.join(args.png_dir, f"{size}_{label}_{seed}.png")
                    if not os.path.exists(path):
                        img = (out.images[0] * 255).round().astype(np.uint8)
                        Image.fromarray(img).save(path)
                runs.append(run)
            cases.append({
                "size": size,
                "scheduler": label,
                "runs": runs,
                "wall_median_s": statistics.median(r["wall_s"] for r in runs),
                "step_median_s": statistics.median(r["step_median_s"] for r in runs),
                "peak_used_max_mb": max(r["peak_used_mb"] for r in runs),
                "pool_peak_max_mb": max(r["pool_peak_mb"] for r in runs),
            })
    profile = None
    if args.profile:
        profile = {}
        for size in sizes:
            try:
                profile[str(size)] = profile_unet(pipe, size, dtype)
            except Exception as e:  # the measurements above still count
                profile[str(size)] = {"error": repr(e)}
    print(json.dumps({
        "profile": profile,
        "device": torch.cuda.get_device_name(),
        "dtype": args.dtype,
        "attention": "sliced" if args.attention_slicing else "sdpa",
        "vae_tiling": args.vae_tiling,
        "model_offload": args.model_offload,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "load_s": round(load_s, 2),
        "steps": args.steps,
        "cases": cases,
    }, indent=1))


KINDS = (  # first match wins; names of cuDNN/cuBLAS/torch kernels
    ("attention", ("flash", "fmha", "attention", "softmax")),
    ("conv", ("conv", "fprop", "implicit", "nchwtonhwc", "nhwctonchw", "winograd", "dgrad", "cudnn")),
    ("gemm", ("gemm", "cutlass", "cublas", "matmul", "splitk")),
    ("norm", ("norm",)),
)


def kind_of(name):
    n = name.lower()
    for kind, keys in KINDS:
        if any(k in n for k in keys):
            return kind
    return "other"


def profile_unet(pipe, size, dtype):
    """One UNet step with guidance (batch 2) under torch.profiler: device ms per kind of kernel
    and the ten costliest kernels, median of three profiled calls after two warm-ups."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    unet = pipe.unet
    lat = torch.randn(2, unet.config.in_channels, size // 8, size // 8, device="cuda", dtype=dtype)
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim, device="cuda", dtype=dtype)
    t = torch.tensor(500, device="cuda")
    with torch.inference_mode():
        for _ in range(2):
            unet(lat, t, encoder_hidden_states=ctx)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                unet(lat, t, encoder_hidden_states=ctx)
            torch.cuda.synchronize()
    kinds, kernels = {}, {}
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if not us or e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        k = kind_of(e.key)
        ms = us / 1e3 / 3
        kinds[k] = kinds.get(k, 0.0) + ms
        kernels[e.key[:90]] = (round(ms, 3), e.count // 3, k)
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:12]
    out = {"ms_per_step": {k: round(v, 3) for k, v in sorted(kinds.items())},
           "total_ms": round(sum(kinds.values()), 3),
           "top_kernels": [[n, ms, calls, k] for n, (ms, calls, k) in top]}
    print(f"profile {size}: {out['ms_per_step']} total {out['total_ms']} ms", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
