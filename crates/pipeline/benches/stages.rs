//! Per-stage timings of the pipeline on a model folder, printed as a table and as JSON.
//!
//! `MODEL_DIR=/path/to/sd15 cargo bench -p sdserve-pipeline --bench stages -- [--sizes 256,512]
//! [--repeats 3] [--steps 20] [--full-sizes 256] [--image-sizes 512] [--json out.json]
//! [--lora-dir DIR --lora NAME --lora-sizes 512 --lora-steps 20] [--offload model|sequential]
//! [--switches N [--dtype f16]]`
//!
//! Stages: text encode (prompt + empty negative), one UNet step with guidance (batch 2), VAE decode
//! (and a TAESD preview of the same latents when `TAESD_DIR` names an `AutoencoderTiny` folder),
//! and whole generations: text-to-image at `--full-sizes`, img2img (strength 0.75) and
//! inpainting (strength 1.0, right half repainted) at `--image-sizes` (empty list: none).
//! With `--lora`: merging the LoRA `NAME` of `DIR` (weight 1) into the weights and writing the
//! originals back, each on its own, and at `--lora-sizes` text-to-image generations with the LoRA
//! (from base weights, so the merge is paid) and without it (right after, so the restore is paid),
//! interleaved, of `--lora-steps` (default `--steps`). With `--offload` (the model loaded, then
//! switched to that offload mode before any stage) and `--lora`, also what the LoRA adds to the
//! builds of an offloaded text encoder and UNet: a prompt encode plus one UNet pass on an 8x8
//! latent (so nearly all is the builds) with a new LoRA set, again with the same set, and without
//! LoRA. `--switches N` times only N offload switches to sequential offload and back (the model
//! loaded in `--dtype`, f32 by default), then stops. Each figure is the median of `--repeats`
//! runs with min and max, and the median CPU time of the process (all threads); peak RSS is read
//! from `/proc/self/status` (VmHWM), reset before each stage through `/proc/self/clear_refs`.

use std::time::Instant;

/// The f32 weights live in their mapped files, as in the server (`weights::mapped`).
#[global_allocator]
static ALLOCATOR: sdserve_pipeline::weights::mapped::MappedAlloc =
    sdserve_pipeline::weights::mapped::MappedAlloc;

use candle_core::{DType, Device, Tensor};
use sdserve_pipeline::lora::LoraLibrary;
use sdserve_pipeline::memory::Offload;
use sdserve_pipeline::pipeline::{GenerationParams, InitImage, RgbImage, StableDiffusion};
use sdserve_pipeline::rng::TorchRng;

#[path = "stages/lora.rs"]
mod lora;
use lora::lora_stats;
#[path = "stages/stats.rs"]
mod stats;
use stats::{measure, median, reset_peak_rss, stage_json, stat_of, status_kb, time_once, Stat};

struct Args {
    sizes: Vec<usize>,
    full_sizes: Vec<usize>,
    /// Sizes of the whole img2img (strength 0.75) and inpainting (strength 1.0) generations.
    image_sizes: Vec<usize>,
    repeats: usize,
    steps: usize,
    json: Option<String>,
    /// Also time single convolutions, ours against candle's (`--kernels`).
    kernels: bool,
    /// Skip the model stages (`--kernels-only`).
    kernels_only: bool,
    /// Folder of LoRA files and the one to time (`--lora-dir`, `--lora`).
    lora_dir: Option<String>,
    lora: Option<String>,
    /// Sizes of the text-to-image generations with and without the LoRA.
    lora_sizes: Vec<usize>,
    lora_steps: Option<usize>,
    /// Offload mode switched to after loading (`--offload model|sequential`).
    offload: Option<Offload>,
    /// Time this many switches to sequential offload and back, then stop (`--switches N`).
    switches: usize,
    /// The dtype the model is loaded in (`--dtype f16|f32`; only with `--switches`).
    dtype: DType,
}

fn parse_list(s: &str) -> Vec<usize> {
    s.split(',')
        .filter(|x| !x.is_empty())
        .map(|x| x.parse().expect("a number"))
        .collect()
}

fn parse_args() -> Args {
    let mut args = Args {
        sizes: vec![256, 512],
        full_sizes: vec![256],
        image_sizes: vec![512],
        repeats: 3,
        steps: 20,
        json: None,
        kernels: false,
        kernels_only: false,
        lora_dir: None,
        lora: None,
        lora_sizes: vec![512],
        lora_steps: None,
        offload: None,
        switches: 0,
        dtype: DType::F32,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--sizes" => args.sizes = parse_list(&it.next().expect("--sizes LIST")),
            "--full-sizes" => args.full_sizes = parse_list(&it.next().expect("--full-sizes LIST")),
            "--image-sizes" => {
                args.image_sizes = parse_list(&it.next().expect("--image-sizes LIST"))
            }
            "--repeats" => {
                args.repeats = it.next().expect("--repeats N").parse().expect("a number")
            }
            "--steps" => args.steps = it.next().expect("--steps N").parse().expect("a number"),
            "--json" => args.json = Some(it.next().expect("--json PATH")),
            "--lora-dir" => args.lora_dir = Some(it.next().expect("--lora-dir DIR")),
            "--lora" => args.lora = Some(it.next().expect("--lora NAME")),
            "--lora-sizes" => args.lora_sizes = parse_list(&it.next().expect("--lora-sizes LIST")),
            "--lora-steps" => {
                args.lora_steps = Some(
                    it.next()
                        .expect("--lora-steps N")
                        .parse()
                        .expect("a number"),
                )
            }
            "--offload" => {
                args.offload = Some(match it.next().expect("--offload MODE").as_str() {
                    "model" => Offload::Model,
                    "sequential" => Offload::Sequential,
                    "none" => Offload::None,
                    other => panic!("--offload {other}: expected model, sequential or none"),
                })
            }
            "--switches" => {
                args.switches = it.next().expect("--switches N").parse().expect("a number")
            }
            "--dtype" => {
                args.dtype = match it.next().expect("--dtype f16|f32").as_str() {
                    "f16" => DType::F16,
                    "f32" => DType::F32,
                    other => panic!("--dtype {other}: expected f16 or f32"),
                }
            }
            "--kernels" => args.kernels = true,
            "--kernels-only" => {
                args.kernels = true;
                args.kernels_only = true;
            }
            _ => {} // cargo passes `--bench`
        }
    }
    args
}

/// A plain square sgemm (candle matmul = the gemm crate) as the machine's attainable rate, then
/// SD 1.5 convolution shapes (batch 2 for the UNet with guidance, 1 for the VAE at 512) and the
/// annotators' through our im2col, Winograd F(2x2) and F(4x4), wide-kernel paths and the routed
/// `conv2d_f32`, interleaved.
fn kernel_stats(repeats: usize) -> Vec<Stat> {
    use sdserve_pipeline::kernels::conv::{conv2d_f32, conv2d_im2col_f32, wide, ConvShape};
    use sdserve_pipeline::kernels::{winograd, winograd4};
    let dev = Device::Cpu;
    // (batch, cin, size, cout, kernel)
    let shapes: [(usize, usize, usize, usize, usize); 22] = [
        // 256x256 generations: latents 32x32.
        (2, 320, 32, 320, 3),
        (2, 640, 16, 640, 3),
        (2, 1280, 4, 1280, 3),
        // 512x512.
        (2, 320, 64, 320, 3),
        (2, 960, 64, 320, 3),
        (2, 640, 64, 640, 3),
        (2, 640, 32, 640, 3),
        (2, 1920, 32, 640, 3),
        (2, 1280, 32, 1280, 3),
        (2, 1280, 16, 1280, 3),
        (2, 2560, 16, 1280, 3),
        (2, 1280, 8, 1280, 3),
        (2, 2560, 8, 1280, 3),
        // VAE decode at 512.
        (1, 512, 128, 512, 3),
        (1, 256, 256, 256, 3),
        (2, 320, 64, 320, 1),
        // OpenPose's CPM stages (hand at its 736 and 368 squares, body at 512: 23x23) and the
        // VGG convs of the hand at 736 (tools/bench_conv_shapes.py times them on torch).
        (1, 150, 92, 128, 7),
        (1, 128, 92, 128, 7),
        (1, 128, 46, 128, 7),
        (1, 185, 23, 128, 7),
        (1, 512, 92, 512, 3),
        (1, 64, 368, 128, 3),
    ];
    let mut stats = Vec::new();
    for n in [1024usize, 2048] {
        let a = Tensor::randn(0f32, 1.0, (n, n), &dev).expect("a");
        let bm = Tensor::randn(0f32, 1.0, (n, n), &dev).expect("b");
        let st = measure(&format!("sgemm_{n}"), repeats, || {
            a.matmul(&bm).expect("matmul");
        });
        eprintln!(
            "    {:.1} GFLOP/s",
            2.0 * (n * n * n) as f64 / 1e9 / st.median_s
        );
        stats.push(st);
    }
    type ConvFn = fn(&[f32], &[f32], Option<&[f32]>, &ConvShape, &mut [f32]);
    type Applies = fn(&ConvShape) -> bool;
    let paths: [(&str, ConvFn, Applies); 5] = [
        ("im2col", conv2d_im2col_f32, |_| true),
        ("wino2", winograd::conv3x3_f32, winograd::applies),
        ("wino4", winograd4::conv3x3_f32, winograd4::applies),
        ("wide", wide::conv_f32, wide::applies),
        ("routed", conv2d_f32, |_| true),
    ];
    for (b, cin, hw, cout, k) in shapes {
        let s = ConvShape {
            batch: b,
            cin,
            h: hw,
            w: hw,
            cout,
            kh: k,
            kw: k,
            stride: 1,
            padding: k / 2,
        };
        let x = Tensor::randn(0f32, 1.0, (b, cin, hw, hw), &dev)
            .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
            .expect("x");
        let w = Tensor::randn(0f32, 0.05, (cout, cin, k, k), &dev)
            .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
            .expect("w");
        let bias = vec![0.01f32; cout];
        let mut out = vec![0f32; b * cout * hw * hw];
        let gflop = 2.0 * (b * cout * cin * k * k * hw * hw) as f64 / 1e9;
        let name = format!("conv{k}x{k}_b{b}_{cin}_{hw}x{hw}_{cout}");
        // `KERNEL_FILTER=1280_16x16` times only the shapes whose name contains it.
        if std::env::var("KERNEL_FILTER").is_ok_and(|f| !name.contains(&f)) {
            continue;
        }
        // Interleaved so that all paths see the same machine load.
        let mut times = vec![Vec::new(); paths.len()];
        for _ in 0..repeats {
            for (i, (_, f, applies)) in paths.iter().enumerate() {
                if applies(&s) {
                    let t = Instant::now();
                    f(&x, &w, Some(&bias), &s, &mut out);
                    times[i].push(t.elapsed().as_secs_f64());
                }
            }
        }
        for ((label, _, _), mut times) in paths.iter().zip(times) {
            if times.is_empty() {
                continue;
            }
            let st = Stat {
                name: format!("{name}_{label}"),
                median_s: median(&mut times),
                min_s: times[0],
                max_s: times[times.len() - 1],
                cpu_median_s: f64::NAN,
                repeats,
                peak_rss_mb: 0.0,
            };
            eprintln!(
                "{:<40} median {:>7.3} s  min {:>7.3}  {:>6.1} GFLOP/s (direct-conv FLOPs)",
                st.name,
                st.median_s,
                st.min_s,
                gflop / st.median_s
            );
            stats.push(st);
        }
    }
    stats
}

fn main() {
    let args = parse_args();
    if args.kernels_only {
        let stats = kernel_stats(args.repeats);
        drop(stats);
        return;
    }
    let dir = std::env::var("MODEL_DIR").expect("set MODEL_DIR to a diffusers folder");
    let device = Device::Cpu;
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "default".into());

    let start = Instant::now();
    let dtype = if args.switches > 0 {
        args.dtype
    } else {
        DType::F32
    };
    let mut model =
        StableDiffusion::load(std::path::Path::new(&dir), &device, dtype).expect("model loads");
    let load_s = start.elapsed().as_secs_f64();
    let weights_rss_mb = status_kb("VmRSS:").unwrap_or(0) as f64 / 1024.0;
    // Read before the first stage resets the high-water mark: the load's own peak.
    let load_peak_rss_mb = status_kb("VmHWM:").unwrap_or(0) as f64 / 1024.0;
    eprintln!(
        "loaded {dir} in {load_s:.2} s (RSS {weights_rss_mb:.0} MB, peak {load_peak_rss_mb:.0} MB, threads {threads})"
    );
    if let Some(offload) = args.offload {
        model.set_offload(offload).expect("offload");
    }
    if args.switches > 0 {
        offload_switches(&mut model, args.switches);
        return;
    }

    let prompt = "a photograph of an astronaut riding a horse";
    let mut stats = Vec::new();
    let mut embeddings = None;
    stats.push(measure("text_encode", args.repeats, || {
        embeddings = Some(model.encode_prompt(prompt, "", true).expect("encode"));
    }));
    let embeddings = embeddings.expect("ran");

    let taesd = std::env::var("TAESD_DIR").ok().map(|d| {
        sdserve_pipeline::taesd::Taesd::load(std::path::Path::new(&d), &device, DType::F32)
            .expect("TAESD loads")
    });
    for &size in &args.sizes {
        let cells = size / model.vae_scale_factor();
        let channels = model.unet_in_channels();
        let latents = TorchRng::new(0)
            .randn_tensor((1, channels, cells, cells), &device, DType::F32)
            .expect("noise");
        stats.push(measure(
            &format!("unet_step_cfg_{size}"),
            args.repeats,
            || {
                model
                    .predict_noise(&latents, 500.0, &embeddings, 7.5)
                    .expect("unet");
            },
        ));
        let z: Tensor = latents.clone();
        stats.push(measure(&format!("vae_decode_{size}"), args.repeats, || {
            model.decode_latents(&z).expect("decode");
        }));
        // A PREVIEW=taesd preview of the same latents (TAESD_DIR: an AutoencoderTiny folder).
        if let Some(t) = &taesd {
            stats.push(measure(
                &format!("taesd_preview_{size}"),
                args.repeats,
                || {
                    t.decode_preview(&z).expect("taesd");
                },
            ));
        }
    }
    for &size in &args.full_sizes {
        let params = GenerationParams {
            prompt: prompt.into(),
            negative_prompt: String::new(),
            steps: args.steps,
            width: size,
            height: size,
            seed: 0,
            guidance_scale: 7.5,
            scheduler: None,
            ..Default::default()
        };
        stats.push(measure(
            &format!("generate_{}steps_{size}", args.steps),
            args.repeats.clamp(1, 2),
            || {
                model
                    .generate(&params, &mut |_| std::ops::ControlFlow::Continue(()))
                    .expect("generate");
            },
        ));
    }

    // Images in: a synthetic picture, and a mask repainting its right half.
    for &size in &args.image_sizes {
        let picture = |f: &dyn Fn(usize, usize, usize) -> u8| RgbImage {
            width: size as u32,
            height: size as u32,
            pixels: (0..size * size * 3)
                .map(|i| f((i / 3) % size, i / 3 / size, i % 3))
                .collect(),
        };
        let image = picture(&|x, y, c| ((x * 255 / size + y * 97 / size + c * 60) % 256) as u8);
        let mask = picture(&|x, _, _| if x >= size / 2 { 255 } else { 0 });
        let base = GenerationParams {
            prompt: prompt.into(),
            steps: args.steps,
            width: size,
            height: size,
            ..Default::default()
        };
        for (name, mask, strength) in [("img2img", None, 0.75), ("inpaint", Some(mask), 1.0)] {
            let params = GenerationParams {
                init_image: Some(InitImage {
                    image: image.clone(),
                    mask,
                    strength,
                }),
                ..base.clone()
            };
            stats.push(measure(
                &format!("{name}_{}steps_s{strength}_{size}", args.steps),
                args.repeats.clamp(1, 2),
                || {
                    model
                        .generate(&params, &mut |_| std::ops::ControlFlow::Continue(()))
                        .expect("generate");
                },
            ));
        }
    }

    if let Some(name) = &args.lora {
        let lora_dir = args.lora_dir.as_deref().expect("--lora needs --lora-dir");
        let library = LoraLibrary::scan(std::path::Path::new(lora_dir)).expect("LoRA folder");
        model.set_lora_library(library).expect("LoRA library");
        stats.extend(lora_stats(&model, name, &args, prompt));
    }

    if args.kernels {
        stats.extend(kernel_stats(args.repeats));
    }
    // VmHWM is reset before each stage, so the run's peak is the largest of the load's peak and
    // the stage peaks.
    let peak_rss_mb = stats
        .iter()
        .map(|s| s.peak_rss_mb)
        .fold(status_kb("VmHWM:").unwrap_or(0) as f64 / 1024.0, f64::max)
        .max(load_peak_rss_mb);
    let stage_json: Vec<String> = stats.iter().map(stage_json).collect();
    let json = format!(
        "{{\"implementation\":\"sdserve\",\"model\":\"{dir}\",\"threads\":\"{threads}\",\"load_s\":{load_s:.3},\"load_peak_rss_mb\":{load_peak_rss_mb:.0},\"weights_rss_mb\":{weights_rss_mb:.0},\"peak_rss_mb\":{peak_rss_mb:.0},\"stages\":[{}]}}",
        stage_json.join(",")
    );
    println!("{json}");
    if let Some(path) = args.json {
        std::fs::write(path, &json).expect("write json");
    }
}

/// What a request's switch of the offload mode costs: `n` times to sequential offload and back
/// to the mode the model is in, each timed alone (and the UNet's reads of its files counted).
fn offload_switches(model: &mut StableDiffusion, n: usize) {
    let home = model.memory_plan().offload;
    let unet_reads = |m: &StableDiffusion| {
        m.component_builds()
            .iter()
            .find(|(name, _)| *name == "unet")
            .map_or(0, |b| b.1)
    };
    let reads = unet_reads(model);
    let (mut there, mut back) = (Vec::new(), Vec::new());
    reset_peak_rss();
    for _ in 0..n {
        there.push(time_once(&mut || {
            model
                .set_offload(Offload::Sequential)
                .expect("to sequential")
        }));
        back.push(time_once(&mut || model.set_offload(home).expect("back")));
    }
    let peak = status_kb("VmHWM:").unwrap_or(0) as f64 / 1024.0;
    stat_of("switch_to_sequential", there, peak);
    stat_of(&format!("switch_back_to_{home:?}"), back, peak);
    eprintln!(
        "    UNet files read {} times in {n} round trips; RSS now {:.0} MB",
        unet_reads(model) - reads,
        status_kb("VmRSS:").unwrap_or(0) as f64 / 1024.0
    );
}
