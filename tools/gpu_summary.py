#!/usr/bin/env python3
"""Collects the JSON files a `tools/gpu_session.sh` run wrote (sdserve bench, bench_diffusers_gpu.py,
compare_images.py, stage timings) into one object, and with --table prints the comparison that
docs/GPU.md reports: ours against diffusers, side by side from the same run.

    python3 tools/gpu_summary.py JSON_DIR [--table]
"""

import json
import os
import sys


def load(d):
    out = {}
    for n in sorted(os.listdir(d)):
        p = os.path.join(d, n)
        if n.endswith(".json"):
            try:
                with open(p) as f:
                    out[n[:-5]] = json.load(f)
            except (OSError, ValueError) as e:
                out[n[:-5]] = {"error": f"unreadable: {e}"}
        elif n == "stages.tsv":
            with open(p) as f:
                out["stages"] = [dict(zip(("stage", "rc", "seconds"), l.rstrip("\n").split("\t")))
                                 for l in f if l.strip()]
        elif n == "tests.txt":
            with open(p) as f:
                out["tests"] = [l.rstrip() for l in f if "test " in l or "test result" in l]
    return out


def case(r, name, size, field):
    for c in (r.get(name) or {}).get("cases", []):
        if c.get("size") == size:
            return c.get(field)
    return None


def profile_table(r):
    """Device ms per kind of op in one UNet step (ours: CUDA events per call; diffusers:
    torch.profiler kernel times), and ours for the decode after the last step."""
    lines = []
    for ours, theirs in (("profile_f16", "diffusers_f16"), ("profile_lt_f16", "diffusers_f16"),
                         ("profile_lt_nchw_f16", "diffusers_f16"), ("profile_f32", "diffusers_f32")):
        for c in (r.get(ours) or {}).get("cases", []):
            size = c.get("size")
            run = (c.get("runs") or [{}])[0]
            step = run.get("step_device_ms") or {}
            dec = run.get("decode_device_ms") or {}
            prof = ((r.get(theirs) or {}).get("profile") or {}).get(str(size)) or {}
            dk = prof.get("ms_per_step") or {}
            lines.append(f"| {ours} {size}: ms per step | ours (calls) | diffusers | ours decode (calls) |")
            lines.append("|---|---|---|---|")
            if "step" in step:  # the step's device time outside our profiled calls
                step = dict(step)
                step["other"] = (step["step"][0] - sum(v[0] for k, v in step.items() if k != "step"), 0)
            for k in sorted(set(step) | set(dk) | set(dec)):
                o, d, e = step.get(k), dk.get(k), dec.get(k)
                fo = "-" if o is None else f"{o[0]:.3f} ({o[1]})"
                fe = "-" if e is None else f"{e[0]:.3f} ({e[1]})"
                lines.append(f"| {k} | {fo} | {'-' if d is None else d} | {fe} |")
            if prof.get("total_ms") is not None:
                lines.append(f"| diffusers kernels total | | {prof['total_ms']} | |")
            lines.append("")
            for n, ms, calls, k in prof.get("top_kernels", [])[:8]:
                lines.append(f"diffusers {size} top kernel: {ms} ms x{calls} [{k}] {n}")
            lines.append("")
    return lines


def sm61_table(r):
    """The GTX 1060 build's device code (sm61-on-cu13, as on sm_61) against the default binary
    and diffusers at the first size: step, whole image, memory, device ms per kind of op."""
    names = [k for k in ("sm61_f16", "sm61_f16_blas_default", "sm61_f32") if r.get(k)]
    if not names:
        return []
    size = next((c["size"] for k in names for c in (r[k] or {}).get("cases", [])), 512)
    lines = [f"| sm_61 device code, {size} | step s | image s | vs ours (sm90) | vs diffusers | peak MiB |",
             "|---|---|---|---|---|---|"]
    for k in names:
        base, ref = ("ours_f32", "diffusers_f32") if k.endswith("f32") else ("ours_f16", "diffusers_f16")
        s, w = case(r, k, size, "step_median_s"), case(r, k, size, "wall_median_s")
        b, d = case(r, base, size, "step_median_s"), case(r, ref, size, "step_median_s")
        peak = case(r, k, size, "peak_used_max_mb")
        lines.append(f"| {k} | {'-' if s is None else f'{s:.4f}'} | {'-' if w is None else f'{w:.3f}'} | "
                     f"{f'{s / b:.2f}x' if s and b else '-'} | {f'{s / d:.2f}x' if s and d else '-'} | "
                     f"{'-' if peak is None else f'{peak:.0f}'} |")
    if "sm61_cudnn" in r:
        lines.append(f"convolution shapes cuDNN could not plan with FMA math (left to candle): "
                     f"{r['sm61_cudnn'].get('convolutions_left_to_candle')}")
    for c in (r.get("sm61_profile_f16") or {}).get("cases", []):
        step = ((c.get("runs") or [{}])[0]).get("step_device_ms") or {}
        if step:
            kinds = ", ".join(f"{k} {v[0]:.2f} ({v[1]})" for k, v in sorted(step.items()))
            lines.append(f"sm61 f16 {c.get('size')} device ms per step (calls): {kinds}")
    lines.append("")
    return lines


def optin_table(r):
    """The opt-in levers (off by default) against the default binary's run in the same session:
    cuBLASLt linear layers (SDSERVE_CUDA_LINEAR=lt), the CUDA graph, both."""
    lines = ["| opt-in lever (same binary, same run) | 512 step s | vs default | 768 step s | vs default |"
             " 768 image s | vs default |",
             "|---|---|---|---|---|---|---|"]
    found = False
    for k, base, label in (("lt_f16", "ours_f16", "f16, cuBLASLt linear layers (SDSERVE_CUDA_LINEAR=lt)"),
                           ("graph_f16", "ours_f16", "f16, CUDA graph (SDSERVE_CUDA_GRAPH=1)"),
                           ("graph_lt_f16", "ours_f16", "f16, CUDA graph + cuBLASLt"),
                           ("lt_nchw_f16", "ours_f16", "f16, cuBLASLt + NCHW projections (lt_nchw)"),
                           ("lt_f32", "ours_f32", "f32 (no TF32), cuBLASLt linear layers")):
        if not r.get(k):
            continue
        found = True
        cells = []
        for size, field in ((512, "step_median_s"), (768, "step_median_s"), (768, "wall_median_s")):
            s, b = case(r, k, size, field), case(r, base, size, field)
            cells += ["-" if s is None else f"{s:.4f}", f"{s / b:.3f}x" if s and b else "-"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if not found:
        return []
    c = r.get("lt_checks")
    if c:
        lines.append(f"cuBLASLt: linear shapes it could not plan (left to cuBLAS + bias pass): "
                     f"{c.get('linear_shapes_left_to_cublas')}; CUDA graph capture failures with it: "
                     f"{c.get('graph_lt_capture_failures')} (0 and 0 expected)")
    lines.append("")
    return lines


def hires_table(r):
    """The hires fix with a 4x RRDBNet against Lanczos (same binary, same run): the second pass's
    transition (first pass decode, upscale, encode), its step, the whole image, peak memory."""
    rows = []
    for k, label in (("hires_lanczos_f16", "Lanczos"), ("hires_rrdbnet_f16", "4x RRDBNet (random, full size)")):
        for c in (r.get(k) or {}).get("cases", []):
            runs = [x["hires"] for x in c.get("runs", []) if x.get("hires")]
            if not runs:
                continue
            mid = sorted(runs, key=lambda h: h["transition_s"])[len(runs) // 2]
            rows.append(f"| {label} | {c['size']} -> {mid['width']} | {mid['transition_s']:.3f} | "
                        f"{mid['step_median_s']:.4f} | {c['wall_median_s']:.3f} | {c.get('peak_used_max_mb')} |")
    if not rows:
        return []
    return ["| hires fix upscaler (f16, default plan) | size | transition s | second-pass step s | image s |"
            " peak MiB |", "|---|---|---|---|---|---|"] + rows + [""]


def table(r):
    rows = []

    def row(label, ours, theirs, unit="s"):
        if ours is None and theirs is None:
            return
        ratio = f"{ours / theirs:.2f}x" if ours and theirs else "-"
        fmt = (lambda v: "-" if v is None else f"{v:.4f}") if unit == "s" else \
            (lambda v: "-" if v is None else f"{v:.0f}")
        rows.append(f"| {label} | {fmt(ours)} | {fmt(theirs)} | {ratio} |")

    for size in (512, 768):
        row(f"UNet step with guidance, {size}, f16 (default 5 GB plan vs diffusers fp16 SDPA)",
            case(r, "ours_f16", size, "step_median_s"), case(r, "diffusers_f16", size, "step_median_s"))
    for size in (512, 768):
        row(f"20-step {size}x{size} image, f16", case(r, "ours_f16", size, "wall_median_s"),
            case(r, "diffusers_f16", size, "wall_median_s"))
    for size in (512, 768):
        row(f"UNet step with guidance, {size}, f16, as a CUDA graph (SDSERVE_CUDA_GRAPH=1)",
            case(r, "graph_f16", size, "step_median_s"), case(r, "diffusers_f16", size, "step_median_s"))
    row("f32 UNet step at 512 (no plan; diffusers fp32; no TF32)",
        case(r, "ours_f32", 512, "step_median_s"), case(r, "diffusers_f32", 512, "step_median_s"))
    for size in (512, 768):
        row(f"UNet step with guidance, {size}, f16, cuBLASLt linear layers (SDSERVE_CUDA_LINEAR=lt)",
            case(r, "lt_f16", size, "step_median_s"), case(r, "diffusers_f16", size, "step_median_s"))
    for size in (512, 768):
        row(f"UNet step with guidance, {size}, f16, cuBLASLt + NCHW projections (SDSERVE_CUDA_LINEAR=lt_nchw)",
            case(r, "lt_nchw_f16", size, "step_median_s"), case(r, "diffusers_f16", size, "step_median_s"))
    row("f32 UNet step at 512, cuBLASLt linear layers (SDSERVE_CUDA_LINEAR=lt; no TF32)",
        case(r, "lt_f32", 512, "step_median_s"), case(r, "diffusers_f32", 512, "step_median_s"))
    row("f32 UNet step at 512, attention through candle's ops (SDSERVE_CUDA_ATTENTION_F32=candle)",
        case(r, "f32_candle_attention", 512, "step_median_s"), case(r, "diffusers_f32", 512, "step_median_s"))
    for size in (512, 768):
        row(f"peak device memory MiB, {size}, f16 (driver, context included)",
            case(r, "ours_f16", size, "peak_used_max_mb"), case(r, "diffusers_f16", size, "peak_used_max_mb"),
            unit="MiB")
        row(f"pool peak MiB, {size}, f16 (our allocations / torch max_memory_allocated)",
            case(r, "ours_f16", size, "pool_peak_max_mb"), case(r, "diffusers_f16", size, "pool_peak_max_mb"),
            unit="MiB")
    lines = ["| figure | ours | diffusers | ratio |", "|---|---|---|---|"] + rows
    lines.append("")
    lines.append("| images vs diffusers fp32 (512) | mean abs /255 (worst image) | max | > 8 |")
    lines.append("|---|---|---|---|")
    for k in ("ours_f16", "ours_f32", "pre_ampere", "sm61_f16", "sm61_f16_blas_default", "sm61_f32",
              "diffusers_f16", "graph_f16", "graph_vs_plain", "lt_f16", "lt_f32", "graph_lt_f16",
              "lt_vs_plain", "lt_f32_vs_plain", "graph_lt_vs_lt", "lt_nchw_f16", "lt_nchw_vs_lt"):
        c = r.get(f"compare_{k}")
        if c and "worst" in c:
            w = c["worst"]
            lines.append(f"| {k} | {w['mean_abs']} | {w['max_abs']} | {w['frac_over_8']} |")
    lines.append("")
    lines.append("| f16 step, default plan, one change undone | 512 s | vs all on | 768 s | vs all on |")
    lines.append("|---|---|---|---|---|")
    for k in sorted(r):
        if k.startswith("variant_"):
            cells = []
            for size in (512, 768):
                s, base = case(r, k, size, "step_median_s"), case(r, "ours_f16", size, "step_median_s")
                cells += ["-" if s is None else f"{s:.4f}", f"{s / base:.2f}x" if s and base else "-"]
            lines.append(f"| {k[8:]} | " + " | ".join(cells) + " |")
    lines.append("")
    lines += optin_table(r)
    lines += hires_table(r)
    lines += sm61_table(r)
    lines += profile_table(r)
    # The ablations run at the first size of the session.
    size = next((c["size"] for k in sorted(r) if k.startswith("ablate_")
                 for c in (r[k] or {}).get("cases", [])), 512)
    lines.append(f"| {size} f16 step, default plan | s | vs all on |")
    lines.append("|---|---|---|")
    base = case(r, "ours_f16", size, "step_median_s")
    for k in sorted(r):
        if k.startswith("ablate_") or k.startswith("pre_ampere"):
            s = case(r, k, size, "step_median_s")
            rel = f"{s / base:.2f}x" if s and base else "-"
            lines.append(f"| {k} | {s if s is None else round(s, 4)} | {rel} |")
    lines.append("")
    for s in r.get("stages", []):
        lines.append(f"stage {s['stage']}: rc {s['rc']}, {s['seconds']} s")
    for t in r.get("tests", []):
        if "test result" in t or "FAILED" in t or "panicked" in t:
            lines.append(t)
    return "\n".join(lines)


def main():
    r = load(sys.argv[1])
    if "--table" in sys.argv:
        print(table(r))
    else:
        print(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
