//! `sdserve bench`: whole generations on the configured device, dtype and memory plan, timed per
//! step, with the device memory the driver reports; one JSON object on stdout. It loads the model
//! exactly as `serve` does (same planner, same warm-up), so its figures are the service's. Run it
//! next to `tools/bench_diffusers_gpu.py` on the same folder (docs/GPU.md); `--png-dir` keeps the
//! images for `tools/compare_images.py`.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Args;
use std::sync::Arc;

use sdserve_pipeline::interpolate::{Interpolation, InterpolationMode};
use sdserve_pipeline::pipeline::{GenerationParams, Hires, StepProgress, Upscaler};
use sdserve_pipeline::schedulers::SchedulerKind;
use sdserve_pipeline::upscale::ModelUpscaler;
use serde::Serialize;

use crate::cli::ModelArgs;

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long, default_value = "a photograph of an astronaut riding a horse")]
    pub prompt: String,
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    /// Square image sides to run, e.g. `512,768`.
    #[arg(long, value_delimiter = ',', default_value = "512")]
    pub sizes: Vec<usize>,
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Generations per size and scheduler (seeds taken in turn from `--seeds`).
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    #[arg(long, value_delimiter = ',', default_value = "0")]
    pub seeds: Vec<u64>,
    /// Scheduler names (default: the model's own).
    #[arg(long, value_delimiter = ',')]
    pub schedulers: Vec<String>,
    #[arg(long, default_value_t = 7.5)]
    pub guidance_scale: f64,
    /// Writes `<size>_<scheduler>_<seed>.png` for the first generation of each seed.
    #[arg(long)]
    pub png_dir: Option<PathBuf>,
    /// Adds A1111's hires fix: a second pass at the size times this factor (floored to a
    /// multiple of 8), upscaled by `--hires-upscaler`.
    #[arg(long)]
    pub hires_scale: Option<f64>,
    /// `Lanczos`, `Nearest`, `None` (a plain resize), `Latent`, or an upscaler model's file
    /// (ESRGAN, Real-ESRGAN Compact...), read onto the pipeline's device at its first use and
    /// kept for the later repeats, as the server's cache keeps it.
    #[arg(long, default_value = "Lanczos", requires = "hires_scale")]
    pub hires_upscaler: String,
    /// The second pass's denoising strength (A1111's default).
    #[arg(long, default_value_t = 0.7, requires = "hires_scale")]
    pub hires_strength: f64,
}

/// `--hires-upscaler` as the pipeline takes it.
fn hires_upscaler(name: &str) -> Result<Upscaler, String> {
    Ok(match name {
        "Lanczos" => Upscaler::Lanczos,
        "Nearest" => Upscaler::Nearest,
        "None" => Upscaler::Resize,
        // A1111's `Latent`: bilinear, no antialias.
        "Latent" => Upscaler::Latent(Interpolation {
            mode: InterpolationMode::Bilinear,
            antialias: false,
        }),
        file => {
            let path = PathBuf::from(file);
            if !path.is_file() {
                return Err(format!(
                    "--hires-upscaler {file}: not Lanczos, Nearest, None, Latent or a file"
                ));
            }
            let stem = path
                .file_stem()
                .map_or_else(|| file.to_string(), |s| s.to_string_lossy().into_owned());
            Upscaler::Model(Arc::new(ModelUpscaler::new(stem, path)))
        }
    })
}

/// The second pass of a `--hires-scale` run: its steps apart from the first pass's.
#[derive(Debug, Serialize)]
struct HiresRun {
    width: usize,
    height: usize,
    /// Median seconds per second-pass step.
    step_median_s: f64,
    /// The second pass's first step less its median step: the first pass's decode, the
    /// upscale (a model's network, tile by tile) and the VAE encode of the upscaled image.
    transition_s: f64,
}

/// One generation.
#[derive(Debug, Serialize)]
struct Run {
    seed: u64,
    wall_s: f64,
    /// CPU time of the whole process over the generation (user + system, all threads; Linux).
    cpu_s: Option<f64>,
    /// Median seconds per denoising step (the device synchronised at every step).
    step_median_s: f64,
    /// Median seconds the host took to issue a step's work (the rest of the step is waiting
    /// for the device): equal to `step_median_s` when the host is the bottleneck.
    step_issue_median_s: f64,
    /// Driver: highest device memory in use (whole device) sampled during the run, MiB.
    peak_used_mb: Option<f64>,
    /// Our allocations' exact high-water mark (the stream-ordered pool), MiB.
    pool_peak_mb: Option<f64>,
    start_used_mb: Option<f64>,
    end_used_mb: Option<f64>,
    /// `SDSERVE_CUDA_PROFILE=1`: device milliseconds per kind of op in a denoising step
    /// (median over the steps after the first) and calls per step; "step" is the whole step.
    #[serde(skip_serializing_if = "Option::is_none")]
    step_device_ms: Option<BTreeMap<String, (f64, usize)>>,
    /// The same after the last step: VAE decode and postprocessing.
    #[serde(skip_serializing_if = "Option::is_none")]
    decode_device_ms: Option<BTreeMap<String, (f64, usize)>>,
    /// `--hires-scale`: the second pass (`step_median_s` is then the first pass's).
    #[serde(skip_serializing_if = "Option::is_none")]
    hires: Option<HiresRun>,
}

type Profile = BTreeMap<String, (f64, usize)>;

/// Per kind of op, the median over `steps` of its milliseconds (and its calls in the last step).
fn median_profile(steps: &[Profile], step_s: &[f64]) -> Profile {
    let mut kinds: BTreeMap<String, (Vec<f64>, usize)> = BTreeMap::new();
    for p in steps {
        for (k, &(ms, n)) in p {
            let e = kinds.entry(k.clone()).or_default();
            e.0.push(ms);
            e.1 = n;
        }
    }
    let mut out: Profile = kinds
        .into_iter()
        .map(|(k, (v, n))| (k, (median(v), n)))
        .collect();
    out.insert(
        "step".into(),
        (median(step_s.iter().map(|s| s * 1e3).collect()), 1),
    );
    out
}

#[derive(Debug, Serialize)]
struct Case {
    size: usize,
    scheduler: String,
    runs: Vec<Run>,
    wall_median_s: f64,
    step_median_s: f64,
    step_issue_median_s: f64,
    peak_used_max_mb: Option<f64>,
    pool_peak_max_mb: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Report {
    device: String,
    dtype: String,
    memory_plan: serde_json::Value,
    memory_plan_summary: String,
    vram_limit_mb: u64,
    load_s: f64,
    steps: usize,
    guidance_scale: f64,
    cases: Vec<Case>,
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// User + system CPU seconds of this process so far, from /proc/self/stat (Linux; 100 Hz ticks).
fn process_cpu_s() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

pub fn run(a: BenchArgs) -> ExitCode {
    match run_inner(&a) {
        Ok(report) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&report).unwrap_or_default()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_inner(a: &BenchArgs) -> Result<Report, String> {
    if a.repeats == 0 || a.seeds.is_empty() || a.sizes.is_empty() || a.steps == 0 {
        return Err("--repeats, --steps, --seeds and --sizes must not be empty or zero".into());
    }
    let dir = PathBuf::from(&a.model.model);
    if !dir.is_dir() {
        return Err(format!("--model {}: not a diffusers folder", dir.display()));
    }
    let setup = crate::gpu::resolve(&a.model, &dir)?;
    for w in &setup.warnings {
        eprintln!("warning: {w}");
    }
    eprintln!("{}", setup.describe());
    let t0 = Instant::now();
    // Includes the GPU warm-up generation, as at server start.
    let sd = crate::gpu::load(&setup, &dir)?;
    let load_s = t0.elapsed().as_secs_f64();
    eprintln!("loaded in {load_s:.1}s");
    let schedulers: Vec<SchedulerKind> = if a.schedulers.is_empty() {
        vec![sd.default_scheduler()]
    } else {
        a.schedulers
            .iter()
            .map(|s| SchedulerKind::from_name(s).ok_or_else(|| format!("unknown scheduler {s}")))
            .collect::<Result<_, _>>()?
    };
    if let Some(d) = &a.png_dir {
        std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    let device = sd.device().clone();
    // One upscaler for every run: a model's network is read once, as the server's cache does.
    let upscaler = match a.hires_scale {
        Some(s) if !(s > 1.0 && s <= 4.0) => {
            return Err(format!("--hires-scale {s}: must be above 1 and at most 4"))
        }
        Some(_) => Some(hires_upscaler(&a.hires_upscaler)?),
        None => None,
    };
    let mut cases = Vec::new();
    for &size in &a.sizes {
        for &scheduler in &schedulers {
            let mut runs = Vec::new();
            for r in 0..a.repeats {
                let seed = a.seeds[r % a.seeds.len()];
                let params = GenerationParams {
                    prompt: a.prompt.clone(),
                    negative_prompt: a.negative_prompt.clone(),
                    steps: a.steps,
                    width: size,
                    height: size,
                    seed,
                    guidance_scale: a.guidance_scale,
                    scheduler: Some(scheduler),
                    hires: upscaler.as_ref().zip(a.hires_scale).map(|(u, scale)| {
                        let side = (size as f64 * scale) as usize / 8 * 8;
                        Hires {
                            width: side,
                            height: side,
                            upscale_width: side,
                            upscale_height: side,
                            upscaler: u.clone(),
                            steps: a.steps,
                            strength: a.hires_strength,
                            scheduler: None,
                            schedule: None,
                            prompt: None,
                            negative_prompt: None,
                        }
                    }),
                    ..Default::default()
                };
                let hires_steps = params.hires_steps();
                let cpu_start = process_cpu_s();
                let started = Instant::now();
                let mut last = started;
                let (mut step_s, mut issue_s) = (Vec::new(), Vec::new());
                let profiling = sdserve_pipeline::kernels::cuda::profiling();
                let mut profiles: Vec<Profile> = Vec::new();
                let images = sd
                    .generate(&params, &mut |p: StepProgress<'_>| {
                        // The upscaler model's checks between its tiles are no steps.
                        if p.between_steps {
                            return ControlFlow::Continue(());
                        }
                        // The host has issued the step; the wait below is the device catching up
                        // (near zero when the host is the bottleneck).
                        let issued = Instant::now();
                        // Without it the timer would see the host enqueueing, not the device working.
                        let _ = device.synchronize();
                        let now = Instant::now();
                        if profiling {
                            let p = sdserve_pipeline::kernels::cuda::take_profile(&device);
                            profiles.push(p.unwrap_or_default());
                        }
                        step_s.push(now.duration_since(last).as_secs_f64());
                        issue_s.push(issued.duration_since(last).as_secs_f64());
                        last = now;
                        ControlFlow::Continue(())
                    })
                    .map_err(|e| format!("{size}x{size} {}: {e}", scheduler.name()))?;
                let wall_s = started.elapsed().as_secs_f64();
                let decode_device_ms = if profiling {
                    Some(
                        sdserve_pipeline::kernels::cuda::take_profile(&device)
                            .map_err(|e| e.to_string())?,
                    )
                } else {
                    None
                };
                // The second pass's steps are the last `hires_steps`; its first one also ran
                // the first pass's decode, the upscale and the encode.
                let first = step_s.len().saturating_sub(hires_steps);
                let hires = (hires_steps > 0 && first > 0).then(|| {
                    let pass = &step_s[first..];
                    let step = median(pass.get(1..).unwrap_or(pass).to_vec());
                    let side = params.hires.as_ref().map_or(0, |h| h.width);
                    HiresRun {
                        width: side,
                        height: side,
                        step_median_s: step,
                        transition_s: pass[0] - if step.is_nan() { 0.0 } else { step },
                    }
                });
                step_s.truncate(first.max(1));
                issue_s.truncate(first.max(1));
                let step_device_ms = profiling.then(|| {
                    let n = profiles.len().min(step_s.len());
                    let from = usize::from(n > 1);
                    median_profile(&profiles[from..n], &step_s[from..n])
                });
                let cpu_s = match (cpu_start, process_cpu_s()) {
                    (Some(a), Some(b)) => Some(b - a),
                    _ => None,
                };
                // As for the step times: the first step also pays for the prompt encoding.
                let issue_steady = if issue_s.len() > 1 {
                    issue_s[1..].to_vec()
                } else {
                    issue_s
                };
                // The first step also pays for the prompt encoding and latents.
                let steady = if step_s.len() > 1 {
                    step_s[1..].to_vec()
                } else {
                    step_s
                };
                let usage = sd.last_memory_usage();
                let run = Run {
                    seed,
                    wall_s,
                    cpu_s,
                    step_median_s: median(steady),
                    step_issue_median_s: median(issue_steady),
                    peak_used_mb: usage.map(|u| mib(u.peak_used_bytes)),
                    pool_peak_mb: usage.and_then(|u| u.pool_peak_bytes).map(mib),
                    start_used_mb: usage.map(|u| mib(u.start_used_bytes)),
                    end_used_mb: usage.map(|u| mib(u.end_used_bytes)),
                    step_device_ms,
                    decode_device_ms,
                    hires,
                };
                eprintln!(
                    "{size}x{size} {} seed {seed}: {wall_s:.3}s (cpu {:?}s), {:.4}s/step ({:.4}s issuing), peak {:?} MiB, pool peak {:?} MiB",
                    scheduler.name(),
                    run.cpu_s,
                    run.step_median_s,
                    run.step_issue_median_s,
                    run.peak_used_mb.map(|v| v.round()),
                    run.pool_peak_mb.map(|v| v.round()),
                );
                if let Some(d) = &a.png_dir {
                    let path = d.join(format!("{size}_{}_{seed}.png", scheduler.name()));
                    if !path.exists() {
                        let png = crate::png::encode(&images[0], "")?;
                        std::fs::write(&path, png)
                            .map_err(|e| format!("{}: {e}", path.display()))?;
                    }
                }
                runs.push(run);
            }
            let max_of = |f: fn(&Run) -> Option<f64>| {
                runs.iter()
                    .filter_map(f)
                    .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))))
            };
            cases.push(Case {
                size,
                scheduler: scheduler.name().to_string(),
                wall_median_s: median(runs.iter().map(|r| r.wall_s).collect()),
                step_median_s: median(runs.iter().map(|r| r.step_median_s).collect()),
                step_issue_median_s: median(runs.iter().map(|r| r.step_issue_median_s).collect()),
                peak_used_max_mb: max_of(|r| r.peak_used_mb),
                pool_peak_max_mb: max_of(|r| r.pool_peak_mb),
                runs,
            });
        }
    }
    Ok(Report {
        device: setup.device_label.clone(),
        dtype: sdserve_pipeline::device::dtype_label(setup.dtype).to_string(),
        memory_plan: serde_json::to_value(&setup.plan).map_err(|e| e.to_string())?,
        memory_plan_summary: setup.plan.summary(),
        vram_limit_mb: a.model.vram_limit_mb,
        load_s,
        steps: a.steps,
        guidance_scale: a.guidance_scale,
        cases,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(vec![]).is_nan());
    }

    #[test]
    fn hires_upscaler_names_and_files() {
        assert_eq!(hires_upscaler("Lanczos"), Ok(Upscaler::Lanczos));
        assert_eq!(hires_upscaler("None"), Ok(Upscaler::Resize));
        assert!(matches!(hires_upscaler("Latent"), Ok(Upscaler::Latent(_))));
        let err = hires_upscaler("/nonexistent/4x.pth").unwrap_err();
        assert!(err.contains("not Lanczos"), "{err}");
        let file = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../pipeline/tests/fixtures/esrgan/x4-old.pth"
        );
        match hires_upscaler(file) {
            Ok(Upscaler::Model(m)) => assert_eq!(m.name, "x4-old"),
            other => panic!("{other:?}"),
        }
    }
}
