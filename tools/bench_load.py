#!/usr/bin/env python3
"""Start-up side by side: `sdserve generate` and diffusers (torch CPU) as whole processes on the
same model folder, each loading the model and making one image, with the page cache warm and
cold. Per run: load time (to the model being ready, as each process reports it) in wall and CPU
seconds, load + the first image (diffusers reads its mapped weights during the first
request, so this is the fair pair), the whole process's wall and CPU seconds, and its peak resident set (the kernel's
high-water mark, ru_maxrss = VmHWM, load included). Medians over --repeats (peak RSS: the
largest); the load average at the start and end is recorded, since wall times on a shared
machine depend on it and CPU seconds much less.

    python3 tools/bench_load.py --model /work/models/sd15-random \\
        --sdserve target/release/sdserve --python /work/venv/ref/bin/python \\
        --sizes 256,512 --repeats 3 --json load.json

Cold runs evict the model's files from the page cache first (posix_fadvise DONTNEED on every
file, which needs no privileges; `echo 3 > /proc/sys/vm/drop_caches` is often not permitted in a
container) and report the disk's sequential read rate measured the same way.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

PROMPT = "a photograph of an astronaut riding a horse"

DIFFUSERS_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
from diffusers import StableDiffusionPipeline
model, size, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
t1, c1 = time.perf_counter(), time.process_time()
pipe = StableDiffusionPipeline.from_pretrained(model, torch_dtype=torch.float32,
                                               safety_checker=None, requires_safety_checker=False)
pipe.set_progress_bar_config(disable=True)
t2, c2 = time.perf_counter(), time.process_time()
with torch.inference_mode():
    pipe(%r, negative_prompt="", num_inference_steps=1, height=size, width=size,
         guidance_scale=7.5, generator=torch.Generator("cpu").manual_seed(0), output_type="np")
t3, c3 = time.perf_counter(), time.process_time()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "load_cpu_s": c2 - c1,
                  "generate_s": t3 - t2, "generate_cpu_s": c3 - c2}))
""" % PROMPT


def model_files(model):
    for root, _, files in os.walk(model):
        for f in files:
            yield os.path.join(root, f)


def evict(model):
    for p in model_files(model):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(model):
    for p in model_files(model):
        with open(p, "rb") as f:
            while f.read(16 << 20):
                pass


def disk_rate(model):
    """MB/s reading the model's files sequentially from a cold cache."""
    evict(model)
    total = 0
    t = time.perf_counter()
    for p in model_files(model):
        with open(p, "rb") as f:
            while True:
                b = f.read(16 << 20)
                if not b:
                    break
                total += len(b)
    dt = time.perf_counter() - t
    return total / 1e6 / dt, total / 1e6


def cpu_seconds(pid):
    """user + system CPU seconds of a live process, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_measured(cmd, env, marks=()):
    """Runs cmd to completion; returns (stdout, stderr, wall s, peak RSS MB, {mark: CPU s when
    a stderr line containing it first appeared}, total CPU s). Peak RSS and CPU come from the
    kernel's accounting of the child (ru_maxrss = VmHWM), so they do not depend on the
    machine's load."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err_lines, mark_cpu = [], {}
    for line in p.stderr:
        err_lines.append(line)
        for mark in marks:
            if mark not in mark_cpu and mark in line:
                mark_cpu[mark] = cpu_seconds(p.pid)
    out = p.stdout.read()
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t
    err = "".join(err_lines)
    if p.returncode != 0:
        sys.exit(f"{cmd[0]} failed ({p.returncode}):\n{err[-3000:]}")
    return out, err, wall, ru.ru_maxrss / 1024, mark_cpu, ru.ru_utime + ru.ru_stime


def ours(args, size, out_png, env):
    cmd = [args.sdserve, "generate", "--model", args.model, "--prompt", PROMPT,
           "--negative-prompt", "", "--steps", "1", "--width", str(size), "--height", str(size),
           "--seed", "0", "--guidance-scale", "7.5", "--output", out_png]
    out, err, wall, peak, marks, cpu = run_measured(cmd, env, marks=("loaded ", "image(s) in "))
    m = re.search(r"loaded .* in ([0-9.]+)s", err)
    g = re.search(r"image\(s\) in ([0-9.]+)s", err)
    if not m or not g:
        sys.exit(f"no load or image time in sdserve's output:\n{err[-2000:]}")
    load_s, load_cpu = float(m.group(1)), marks["loaded "]
    # Load + first image: from the start of loading to the image, CPU from the process start
    # (what runs before the load is argument parsing and the model's digest lookup).
    return {"load_s": load_s, "load_cpu_s": load_cpu, "wall_s": wall, "cpu_s": cpu,
            "load_image_s": load_s + float(g.group(1)), "load_image_cpu_s": marks["image(s) in "],
            "peak_rss_mb": peak}


def diffusers(args, size, env):
    cmd = [args.python, "-c", DIFFUSERS_CHILD, args.model, str(size), str(args.threads)]
    out, err, wall, peak, _, cpu = run_measured(cmd, env)
    j = json.loads(out.strip().splitlines()[-1])
    # diffusers reads the mapped weights during its first request: load + first image is the
    # figure to set beside sdserve's (import of torch/diffusers not included).
    return {"load_s": j["load_s"], "load_cpu_s": j["load_cpu_s"], "import_s": j["import_s"],
            "wall_s": wall, "cpu_s": cpu, "load_image_s": j["load_s"] + j["generate_s"],
            "load_image_cpu_s": j["load_cpu_s"] + j["generate_cpu_s"], "peak_rss_mb": peak}


def median_of(runs, key):
    return round(statistics.median(r[key] for r in runs), 3)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--sdserve", required=True, help="the sdserve binary (a release build)")
    ap.add_argument("--python", default=sys.executable, help="a python with torch + diffusers")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sizes", default="256,512")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cold", default="256", help="sizes also run with a cold page cache")
    ap.add_argument("--only", choices=["ours", "diffusers"], help="run one side only")
    ap.add_argument("--json")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    cold_sizes = [int(s) for s in args.cold.split(",") if s]
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads),
               MKL_NUM_THREADS=str(args.threads), LOG_LEVEL="warn")
    out_png = f"/tmp/bench-load-{os.getpid()}.png"
    sides = [s for s in ("ours", "diffusers") if args.only in (None, s)]

    rate, total_mb = disk_rate(args.model)
    print(f"model files {total_mb:.0f} MB; cold sequential read {rate:.0f} MB/s "
          f"({total_mb / rate:.1f} s)", file=sys.stderr)
    results = {"model": args.model, "threads": args.threads, "files_mb": round(total_mb),
               "disk_read_mb_s": round(rate), "load_average_start": os.getloadavg(), "cases": []}
    warm(args.model)
    # One untimed run each: digests memoised, binaries and libraries in the page cache.
    for side in sides:
        ours(args, 256, out_png, env) if side == "ours" else diffusers(args, 256, env)

    for cache in ("warm", "cold"):
        for size in sizes if cache == "warm" else cold_sizes:
            for side in sides:
                runs = []
                for _ in range(args.repeats):
                    if cache == "cold":
                        evict(args.model)
                    runs.append(ours(args, size, out_png, env) if side == "ours"
                                else diffusers(args, size, env))
                case = {"side": side, "cache": cache, "size": size, "runs": runs,
                        "load_s": median_of(runs, "load_s"),
                        "load_cpu_s": median_of(runs, "load_cpu_s"),
                        "wall_s": median_of(runs, "wall_s"), "cpu_s": median_of(runs, "cpu_s"),
                        "load_image_s": median_of(runs, "load_image_s"),
                        "load_image_cpu_s": median_of(runs, "load_image_cpu_s"),
                        "peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs))}
                results["cases"].append(case)
                print(f"{side:<10}{cache:<6}{size:>5}  load {case['load_s']:6.2f} s "
                      f"({case['load_cpu_s']:5.2f} CPU s)  load+image {case['load_image_s']:6.2f} s "
                      f"({case['load_image_cpu_s']:6.2f} CPU s)  process {case['wall_s']:6.2f} s "
                      f"({case['cpu_s']:6.2f} CPU s)  peak RSS {case['peak_rss_mb']:6.0f} MB  "
                      f"(load avg {os.getloadavg()[0]:.1f})", file=sys.stderr)
    results["load_average_end"] = os.getloadavg()
    if os.path.exists(out_png):
        os.remove(out_png)
    text = json.dumps(results, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
