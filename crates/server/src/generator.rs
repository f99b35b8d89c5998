//! What the engine's worker runs: the real pipeline, or a fake one for timing tests.

use std::ops::ControlFlow;
use std::time::Duration;

use sdserve_pipeline::pipeline::{GenerationParams, RgbImage, StepHook, StepProgress};
use sdserve_pipeline::schedulers::{SchedulerKind, SigmaSchedule};
use sdserve_pipeline::PipelineError;

/// One Stable Diffusion model, owned by one thread at a time.
pub trait Generator: Send {
    /// The request's `batch_size` images, in order.
    fn generate(
        &mut self,
        params: &GenerationParams,
        on_step: StepHook,
    ) -> Result<Vec<RgbImage>, PipelineError>;

    /// The device it runs on (for the out-of-memory breaker's free-memory check).
    fn device(&self) -> candle_core::Device {
        candle_core::Device::Cpu
    }

    /// A short description of the memory plan in use, for /health; `None` when there is none.
    fn memory_plan(&self) -> Option<String> {
        None
    }

    /// Device memory of the last generation (driver and pool high-water marks); `None` on the CPU.
    fn last_memory_usage(&self) -> Option<sdserve_pipeline::memory::MemoryUsage> {
        None
    }

    /// Reads LORA_DIR and EMBEDDINGS_DIR again when they changed (or `force`): the new listing,
    /// or `None` when nothing changed. Called between jobs, never during one.
    fn refresh_adapters(&mut self, _force: bool) -> Option<crate::adapters::Adapters> {
        None
    }

    /// Decodes (and encodes init images) with VAE_DIR's VAE `name` from the next job on
    /// (`None`: the model's own). Called between jobs. `Err`: why that VAE cannot be used with
    /// this model (the model's own is back in place).
    fn set_vae(&mut self, _name: Option<&str>) -> Result<(), String> {
        Ok(())
    }

    /// Feeds a finished job's result to the out-of-memory guard; the real pipeline may switch
    /// itself to a leaner memory plan.
    fn record_oom(
        &mut self,
        guard: &crate::gpu::OomGuard,
        result: &Result<Vec<RgbImage>, PipelineError>,
    ) -> crate::gpu::OomOutcome {
        guard.record_without_pipeline(result)
    }
}

impl Generator for sdserve_pipeline::pipeline::StableDiffusion {
    fn generate(
        &mut self,
        params: &GenerationParams,
        on_step: StepHook,
    ) -> Result<Vec<RgbImage>, PipelineError> {
        sdserve_pipeline::pipeline::StableDiffusion::generate(self, params, on_step)
    }

    fn last_memory_usage(&self) -> Option<sdserve_pipeline::memory::MemoryUsage> {
        sdserve_pipeline::pipeline::StableDiffusion::last_memory_usage(self)
    }
}

/// What the server needs to know about a loaded model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    /// Model name plus revision or content digest.
    pub model_version: String,
    /// The scheduler of the model's own `scheduler_config.json`.
    pub default_scheduler: SchedulerKind,
    /// The sigma schedule of that file (its `use_*_sigmas` keys, where its class reads them).
    pub default_schedule: SigmaSchedule,
    /// The LoRA files and embeddings requests may use.
    pub adapters: crate::adapters::Adapters,
    /// A guidance-distilled (LCM) model (its UNet config sets `time_cond_proj_dim`): prompts
    /// with AND parts are refused before queueing, as the run would refuse them.
    pub guidance_distilled: bool,
    /// The device memory budget requests are checked against before they are queued (`None`
    /// on the CPU, and where the worker is another process: it checks again itself).
    pub memory: Option<std::sync::Arc<crate::gpu::MemoryBudget>>,
    /// The model's scheduler config: how many UNet evaluations a request runs, known before
    /// it runs (a job's progress `total`). `None` where it is not known here (the fake
    /// generator; an API replica, whose workers count for it once the job starts).
    pub schedules: Option<std::sync::Arc<sdserve_pipeline::pipeline::ModelSchedules>>,
    /// What a request must fit, from the model's configs (clip skip, sizes, external VAEs),
    /// checked before it is queued; `None` where not known here (the fake generator, a
    /// single-file model not loaded yet, a worker older than the field): the run checks.
    pub limits: Option<sdserve_pipeline::pipeline::ModelLimits>,
}

/// A loaded model: the generator and its description.
pub struct Loaded {
    pub generator: Box<dyn Generator>,
    pub info: ModelInfo,
    /// The TAESD preview decoder, when `PREVIEW=taesd` and it loaded (see `model::with_taesd`).
    pub taesd: Option<sdserve_pipeline::taesd::Taesd>,
    /// Time the model once the worker is idle and log what fits the deadlines (`speed`): set
    /// by `serve` for a model on the CPU.
    pub speed_probe: bool,
}

/// Loads the model; runs on the worker thread. The error is a message for /health and the log.
pub type Loader = Box<dyn FnOnce() -> Result<Loaded, String> + Send>;

/// `Switcher::load`.
pub type LoadByName = Box<dyn FnMut(Option<&str>) -> Result<Loaded, String> + Send>;

/// Loads a model on the worker after the first: the one a job names when the worker holds
/// another (MODELS_DIR), or the held one again after A1111's `unload-checkpoint`.
pub struct Switcher {
    /// Loads a MODELS_DIR model by name, or (`None`) the default model again. Called only
    /// once the previous pipeline was dropped (one pipeline at a time). The error is for the
    /// log only (it may hold paths).
    pub load: LoadByName,
    /// Whether `load` takes names (MODELS_DIR is set); without, only the default model.
    pub by_name: bool,
}

/// What the worker holds when it holds no model: after `unload-checkpoint`, or after a failed
/// switch whose way back failed too. Every job first has its model loaded (`engine::switch`),
/// so this never runs one.
pub struct Unloaded;

impl Generator for Unloaded {
    fn generate(
        &mut self,
        _params: &GenerationParams,
        _on_step: StepHook,
    ) -> Result<Vec<RgbImage>, PipelineError> {
        Err(PipelineError::InvalidRequest("no model is loaded".into()))
    }
}

/// Settings of the fake generator, parsed from `key=value,...`
/// (`step_ms`, `load_ms`, `fail_load`, `scheduler`, `speed_probe` = 0 or 1, `hang_at_step`,
/// `hang_ms`).
///
/// The fake honours the step hook exactly like the real pipeline, and its image is a pure
/// function of the parameters, so timing, cancellation, caching and reproducibility can be
/// tested in milliseconds. Prompts starting with `fake:oom`, `fake:error` or `fake:panic` make it
/// fail in that way (test hooks for the error paths).
#[derive(Debug, Clone, PartialEq)]
pub struct FakeSpec {
    pub step_ms: u64,
    pub load_ms: u64,
    pub fail_load: Option<String>,
    pub scheduler: SchedulerKind,
    /// Run the CPU speed probe on the fake (off by default: timing tests want an idle worker).
    pub speed_probe: bool,
    /// Every run hangs before this step's hook (0: never) for `hang_ms`, deaf to cancellation,
    /// as a device call that does not return would.
    pub hang_at_step: usize,
    pub hang_ms: u64,
}

impl std::str::FromStr for FakeSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut spec = FakeSpec {
            step_ms: 10,
            load_ms: 0,
            fail_load: None,
            scheduler: SchedulerKind::Pndm,
            speed_probe: false,
            hang_at_step: 0,
            hang_ms: 3_600_000,
        };
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("expected key=value, got {part:?}"))?;
            let ms = || v.parse::<u64>().map_err(|e| format!("{k}: {e}"));
            match k {
                "step_ms" => spec.step_ms = ms()?,
                "load_ms" => spec.load_ms = ms()?,
                "hang_at_step" => spec.hang_at_step = ms()? as usize,
                "hang_ms" => spec.hang_ms = ms()?,
                "fail_load" => spec.fail_load = Some(v.to_string()),
                "speed_probe" => {
                    spec.speed_probe = match v {
                        "1" => true,
                        "0" => false,
                        _ => return Err(format!("speed_probe: expected 0 or 1, got {v:?}")),
                    }
                }
                "scheduler" => {
                    spec.scheduler = SchedulerKind::from_name(v)
                        .ok_or_else(|| format!("scheduler: unknown {v:?}"))?
                }
                _ => return Err(format!("unknown fake generator key {k:?}")),
            }
        }
        Ok(spec)
    }
}

pub struct FakeGenerator {
    step: Duration,
    hang_at_step: usize,
    hang: Duration,
}

impl FakeSpec {
    pub fn loader(self) -> Loader {
        Box::new(move || {
            std::thread::sleep(Duration::from_millis(self.load_ms));
            if let Some(why) = self.fail_load {
                return Err(why);
            }
            Ok(Loaded {
                generator: Box::new(FakeGenerator {
                    step: Duration::from_millis(self.step_ms),
                    hang_at_step: self.hang_at_step,
                    hang: Duration::from_millis(self.hang_ms),
                }),
                info: ModelInfo {
                    model_version: "fake@0".into(),
                    default_scheduler: self.scheduler,
                    default_schedule: self.scheduler.schedule(),
                    adapters: Default::default(),
                    guidance_distilled: false,
                    memory: None,
                    schedules: None,
                    limits: None,
                },
                taesd: None,
                speed_probe: self.speed_probe,
            })
        })
    }
}

impl FakeSpec {
    /// Loads the fake again (the default model only: the fake has no MODELS_DIR).
    pub fn switcher(self) -> Switcher {
        Switcher {
            load: Box::new(move |name| match name {
                None => self.clone().loader()(),
                Some(name) => Err(format!("the fake generator has no model {name:?}")),
            }),
            by_name: false,
        }
    }
}

/// FNV-1a, for the fake's pixels (stable across Rust versions, unlike `DefaultHasher`).
fn fnv1a(bytes: &[u8], mut h: u64) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

impl Generator for FakeGenerator {
    fn generate(
        &mut self,
        p: &GenerationParams,
        on_step: StepHook,
    ) -> Result<Vec<RgbImage>, PipelineError> {
        if p.prompt.starts_with("fake:oom") {
            return Err(PipelineError::Candle(candle_core::Error::Msg(
                "CUDA_ERROR_OUT_OF_MEMORY: out of memory".into(),
            )));
        }
        if p.prompt.starts_with("fake:error") {
            return Err(PipelineError::config(
                "/secret/internal/path",
                "fake failure",
            ));
        }
        if p.prompt.starts_with("fake:panic") {
            panic!("fake generator panic");
        }
        // The hires pass's steps follow the first pass's, as the pipeline counts them.
        let total = p.steps + p.hires_steps();
        for step in 1..=total {
            std::thread::sleep(self.step);
            if step == self.hang_at_step {
                tracing::warn!(
                    step,
                    hang_ms = self.hang.as_millis() as u64,
                    "fake generator: hanging"
                );
                std::thread::sleep(self.hang);
                tracing::warn!(step, "fake generator: the hang is over");
            }
            // Latents for previews: flat, brightening as the run goes on.
            let latents = candle_core::Tensor::full(
                step as f32 / total as f32,
                (1, 4, p.height / 8, p.width / 8),
                &candle_core::Device::Cpu,
            )?;
            if on_step(StepProgress {
                step,
                total,
                latents: Some(&latents),
                between_steps: false,
            }) == ControlFlow::Break(())
            {
                return Err(PipelineError::Cancelled);
            }
        }
        // Image i depends on the request with seed + i only, as the real pipeline's do.
        let images = (0..p.batch_size.max(1))
            .map(|i| {
                let one = GenerationParams {
                    seed: p.image_seed(i),
                    variation: p.image_variation(i).map(|(seed, strength)| {
                        sdserve_pipeline::pipeline::Variation { seed, strength }
                    }),
                    batch_size: 1,
                    ..p.clone()
                };
                let key = format!("{one:?}");
                let base = fnv1a(key.as_bytes(), 0xcbf2_9ce4_8422_2325);
                let (w, h) = p.output_size();
                let (w, h) = (w as u32, h as u32);
                let mut pixels = Vec::with_capacity((w * h * 3) as usize);
                for y in 0..h {
                    for x in 0..w {
                        let v = fnv1a(&[(x / 16) as u8, (y / 16) as u8], base);
                        pixels.extend_from_slice(&[v as u8, (v >> 8) as u8, (v >> 16) as u8]);
                    }
                }
                RgbImage {
                    width: w,
                    height: h,
                    pixels,
                }
            })
            .collect();
        Ok(images)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(seed: u64) -> GenerationParams {
        GenerationParams {
            prompt: "a".into(),
            negative_prompt: String::new(),
            steps: 3,
            width: 256,
            height: 256,
            seed,
            guidance_scale: 7.5,
            scheduler: Some(SchedulerKind::Euler),
            ..Default::default()
        }
    }

    #[test]
    fn spec_parses_and_rejects() {
        let s: FakeSpec = "step_ms=50,load_ms=5,scheduler=ddim,speed_probe=1"
            .parse()
            .unwrap();
        assert_eq!(
            (s.step_ms, s.load_ms, s.scheduler, s.speed_probe),
            (50, 5, SchedulerKind::Ddim, true)
        );
        let h: FakeSpec = "hang_at_step=2,hang_ms=30".parse().unwrap();
        assert_eq!((h.hang_at_step, h.hang_ms), (2, 30));
        assert!("speed_probe=yes".parse::<FakeSpec>().is_err());
        assert!("bogus=1".parse::<FakeSpec>().is_err());
        assert!("step_ms=x".parse::<FakeSpec>().is_err());
    }

    #[test]
    fn fake_is_deterministic_and_cancellable() {
        let mut g = FakeGenerator {
            step: Duration::ZERO,
            hang_at_step: 0,
            hang: Duration::ZERO,
        };
        let mut n = 0;
        let a = g
            .generate(&params(1), &mut |_| ControlFlow::Continue(()))
            .unwrap();
        let b = g
            .generate(&params(1), &mut |_| ControlFlow::Continue(()))
            .unwrap();
        let c = g
            .generate(&params(2), &mut |_| ControlFlow::Continue(()))
            .unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].pixels.len(), 256 * 256 * 3);
        // A batch: image i is the request with seed + i alone.
        let mut p = params(1);
        p.batch_size = 2;
        let batch = g.generate(&p, &mut |_| ControlFlow::Continue(())).unwrap();
        assert_eq!(
            (batch[0].clone(), batch[1].clone()),
            (a[0].clone(), c[0].clone())
        );
        let r = g.generate(&params(1), &mut |_| {
            n += 1;
            ControlFlow::Break(())
        });
        assert!(matches!(r, Err(PipelineError::Cancelled)));
        assert_eq!(n, 1);
    }
}
