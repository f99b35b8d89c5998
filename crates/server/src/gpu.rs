//! The server's side of the GPU path: resolving DEVICE/DTYPE, planning memory from
//! VRAM_LIMIT_MB, loading and warming up the pipeline, the out-of-memory circuit breaker, and
//! the `gpu` block of /health. The pieces live in `sdserve_pipeline::{device, memory}`; this
//! module strings them together for the engine. See docs/GPU.md.
//!
//! Wiring (engine/model owners):
//! - `model::load_real`: `let setup = gpu::resolve(args, &dir)?; let sd = gpu::load(&setup, &dir)?;`
//!   log `setup.describe()` and each `setup.warnings`; `/health` gets `setup.device_label`,
//!   `dtype_label(setup.dtype)` and `setup.plan` (serializable).
//! - the engine, before each job: `guard.admit(&device)` (refuse with 503 `out_of_memory`);
//!   after it: `guard.record(&result, &mut sd, &mut setup)` (through `Generator::record_oom`).
//! - `/health`: `gpu::health_gpu(&device)` for the `gpu` field (`None` on the CPU).

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use candle_core::{DType, Device};
use sdserve_pipeline::device::{
    dtype_label, gpu_info, select_device, select_dtype, DTypeRequest, DeviceRequest,
};
use sdserve_pipeline::memory::breaker::{Admission, BreakerConfig, OomAction, OomBreaker};
use sdserve_pipeline::memory::plan::{
    check_request, leaner, plan, plan_for_request, OverBudget, DEFAULT_MAX_SIDE,
};
use sdserve_pipeline::memory::{free_bytes, Footprint, LeverOverrides, MemoryPlan, PlanRequest};
use sdserve_pipeline::pipeline::{GenerationParams, StableDiffusion};
use sdserve_pipeline::PipelineError;

use crate::cli::{DtypeArg, ModelArgs};

/// Where and how the model runs, decided before loading it.
#[derive(Debug, Clone)]
pub struct GpuSetup {
    pub device: Device,
    /// `cpu`, `cuda:0`, ...
    pub device_label: String,
    pub dtype: DType,
    pub plan: MemoryPlan,
    /// What the planner was asked (kept to step down to leaner plans after OOMs).
    pub plan_request: Option<PlanRequest>,
    pub footprint: Option<Footprint>,
    /// For the log: fallbacks, odd combinations.
    pub warnings: Vec<String>,
}

impl GpuSetup {
    /// One line for the start-up log.
    pub fn describe(&self) -> String {
        format!(
            "device {} dtype {}; memory plan: {}",
            self.device_label,
            dtype_label(self.dtype),
            self.plan.summary()
        )
    }
}

fn dtype_request(arg: DtypeArg) -> DTypeRequest {
    match arg {
        DtypeArg::Auto => DTypeRequest::Auto,
        DtypeArg::F32 => DTypeRequest::F32,
        DtypeArg::F16 => DTypeRequest::F16,
        DtypeArg::Bf16 => DTypeRequest::Bf16,
    }
}

/// Resolves DEVICE and DTYPE and plans memory for the model in `dir` from VRAM_LIMIT_MB (capped
/// by what the device has). `auto` falls back to the CPU with a warning; an explicit `cuda`
/// that cannot be used is an error.
pub fn resolve(args: &ModelArgs, dir: &Path) -> Result<GpuSetup, String> {
    resolve_with(args, dir, args.lever_overrides())
}

/// [`resolve`] with levers fixed by the operator (they win over the planner).
pub fn resolve_with(
    args: &ModelArgs,
    dir: &Path,
    overrides: LeverOverrides,
) -> Result<GpuSetup, String> {
    let request: DeviceRequest = args
        .device
        .parse()
        .map_err(|e: PipelineError| e.to_string())?;
    let selected = select_device(request).map_err(|e| e.to_string())?;
    crate::config::refuse_half_on_cpu(args.dtype, &selected.device, selected.warning.as_deref())?;
    let mut warnings: Vec<String> = selected.warning.into_iter().collect();
    let (dtype, w) = select_dtype(dtype_request(args.dtype), &selected.device);
    warnings.extend(w);
    if selected.device.is_cpu() {
        let mut plan = MemoryPlan::cpu(dtype);
        if let Some(a) = overrides.attention {
            plan.attention = a;
        }
        return Ok(GpuSetup {
            device: selected.device,
            device_label: selected.label,
            dtype,
            plan,
            plan_request: None,
            footprint: None,
            warnings,
        });
    }
    if let Some(a) = sdserve_pipeline::kernels::cuda::arch::arch_as() {
        warnings.push(format!(
            "SDSERVE_CUDA_ARCH_AS={a}: kernels and library settings chosen as on compute capability {}.{} (testing only)",
            a / 10,
            a % 10
        ));
    }
    let mut budget = args.vram_limit_mb.saturating_mul(1 << 20);
    if let Some(info) = gpu_info(&selected.device) {
        if info.memory_total_bytes < budget {
            warnings.push(format!(
                "VRAM_LIMIT_MB={} is more than the device has ({} MiB); planning for the device",
                args.vram_limit_mb,
                info.memory_total_bytes >> 20
            ));
            budget = info.memory_total_bytes;
        }
    }
    let footprint = Footprint::from_model_dir(dir, dtype).map_err(|e| e.to_string())?;
    let request = PlanRequest {
        budget_bytes: budget,
        max_width: DEFAULT_MAX_SIDE,
        max_height: DEFAULT_MAX_SIDE,
        batch: 2,
        dtype,
        overrides,
    };
    let plan = plan(&footprint, &request);
    if !plan.fits {
        warnings.push(format!(
            "VRAM_LIMIT_MB={}: even the leanest memory plan is estimated over budget; expect out-of-memory errors on large images",
            args.vram_limit_mb
        ));
    }
    Ok(GpuSetup {
        device: selected.device,
        device_label: selected.label,
        dtype,
        plan,
        plan_request: Some(request),
        footprint: Some(footprint),
        warnings,
    })
}

/// The budget a request is checked against before it is queued: the model's footprint and the
/// start-up plan request (budget, dtype, the operator's lever overrides).
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryBudget {
    pub footprint: Footprint,
    pub request: PlanRequest,
}

impl MemoryBudget {
    /// `None` without a device budget (the CPU).
    pub fn of(setup: &GpuSetup) -> Option<Self> {
        Some(Self {
            footprint: setup.footprint.clone()?,
            request: setup.plan_request?,
        })
    }

    /// Whether `batch_size` images of `width` x `height` fit with the leanest levers allowed.
    pub fn check(
        &self,
        width: usize,
        height: usize,
        batch_size: usize,
        guidance: bool,
    ) -> Result<(), OverBudget> {
        check_request(
            &self.footprint,
            &self.request,
            width,
            height,
            batch_size,
            guidance,
        )
    }
}

/// Before a run: the levers this request needs (a large batch needs more than the start-up
/// plan, made for one image) applied to the pipeline, or the plan in use again once a smaller
/// request comes. A request that fits under no plan is refused here, before anything is
/// allocated (the API refuses it before queueing; this covers workers of a cluster).
pub fn plan_request(
    sd: &mut StableDiffusion,
    setup: &GpuSetup,
    params: &GenerationParams,
) -> Result<(), PipelineError> {
    let (Some(fp), Some(req)) = (&setup.footprint, &setup.plan_request) else {
        return Ok(());
    };
    let guidance = params.guidance_scale > 1.0;
    let (w, h, n) = (params.width, params.height, params.batch_size);
    let wanted = plan_for_request(fp, req, &setup.plan, w, h, n, guidance)
        .map_err(|o| PipelineError::InvalidRequest(o.describe(w, h, n)))?;
    let now = sd.memory_plan();
    if (now.attention, now.vae_tiling, now.offload)
        != (wanted.attention, wanted.vae_tiling, wanted.offload)
    {
        tracing::info!(
            width = w,
            height = h,
            batch_size = n,
            "memory plan for this request: {}",
            wanted.summary()
        );
        apply_plan(sd, &wanted)?;
    }
    Ok(())
}

/// Loads the pipeline with the setup's plan, then warms it up on a GPU: the first use of every
/// CUDA kernel compiles its PTX in the driver, which must not land on the first request.
pub fn load(setup: &GpuSetup, dir: &Path) -> Result<StableDiffusion, String> {
    let sd = StableDiffusion::load_with_plan(dir, &setup.device, setup.dtype, &setup.plan)
        .map_err(|e| e.to_string())?;
    if !setup.device.is_cpu() {
        warm_up(&sd).map_err(|e| format!("warm-up generation failed: {e}"))?;
    }
    Ok(sd)
}

/// One small generation (CFG on, two steps) touching every kernel the real requests use; an
/// inpainting model (which takes no text-only request) inpaints a grey square.
pub fn warm_up(sd: &StableDiffusion) -> Result<(), PipelineError> {
    let side = 8 * sd.vae_scale_factor();
    let square = |v: u8| sdserve_pipeline::pipeline::RgbImage {
        width: side as u32,
        height: side as u32,
        pixels: vec![v; side * side * 3],
    };
    let init_image = sd
        .is_inpainting()
        .then(|| sdserve_pipeline::pipeline::InitImage {
            image: square(128),
            mask: Some(square(255)),
            strength: 1.0,
        });
    let params = GenerationParams {
        prompt: "warm-up".into(),
        negative_prompt: String::new(),
        steps: 2,
        width: side,
        height: side,
        seed: 0,
        guidance_scale: 7.5,
        scheduler: None,
        init_image,
        ..Default::default()
    };
    sd.generate(&params, &mut |_| std::ops::ControlFlow::Continue(()))
        .map(|_| ())
}

/// The `gpu` block of /health; `None` on the CPU.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HealthGpu {
    pub name: String,
    pub memory_total_mb: u64,
    pub memory_used_mb: u64,
    pub memory_free_mb: u64,
}

pub fn health_gpu(device: &Device) -> Option<HealthGpu> {
    gpu_info(device).map(|g| HealthGpu {
        memory_total_mb: g.memory_total_bytes >> 20,
        memory_used_mb: g.memory_used_bytes() >> 20,
        memory_free_mb: g.memory_free_bytes >> 20,
        name: g.name,
    })
}

/// The out-of-memory circuit breaker as the worker uses it: admission before a job, the outcome
/// after it, and stepping the pipeline down to a leaner plan when OOMs repeat.
pub struct OomGuard {
    breaker: Mutex<OomBreaker>,
}

/// What the worker does with a job's outcome.
#[derive(Debug, Clone, PartialEq)]
pub enum OomOutcome {
    NotOom,
    /// This request failed with OOM; nothing else changes.
    Failed,
    /// Repeated OOMs: the pipeline now runs the leaner plan (log its summary).
    SwitchedPlan(String),
    /// Repeated OOMs and no leaner plan: new work is refused for a while.
    Paused {
        retry_after: Duration,
    },
}

impl OomGuard {
    pub fn new(config: BreakerConfig) -> Self {
        Self {
            breaker: Mutex::new(OomBreaker::new(config)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, OomBreaker> {
        self.breaker.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `Err(retry_after)` while the breaker refuses work (answer 503 `out_of_memory`).
    pub fn admit(&self, device: &Device) -> Result<(), Duration> {
        match self.lock().admit(free_bytes(device)) {
            Admission::Allow => Ok(()),
            Admission::Refuse { retry_after } => Err(retry_after),
        }
    }

    /// True while refusing work (for /health's `degraded`).
    pub fn is_open(&self) -> bool {
        !matches!(
            self.lock().state(),
            sdserve_pipeline::memory::breaker::BreakerState::Closed
        )
    }

    /// Feeds a job's result to the breaker when there is no pipeline to step down (the fake
    /// generator): repeated OOMs open the breaker.
    pub fn record_without_pipeline<T>(&self, result: &Result<T, PipelineError>) -> OomOutcome {
        if let Some(outcome) = self.record_non_oom(result) {
            return outcome;
        }
        match self.lock().record_oom(false) {
            OomAction::None | OomAction::UseLeanerPlan => OomOutcome::Failed,
            OomAction::Opened { until } => OomOutcome::Paused {
                retry_after: until.saturating_duration_since(std::time::Instant::now()),
            },
        }
    }

    /// `Some(NotOom)` (after noting a success) unless `result` is an out-of-memory failure.
    fn record_non_oom<T>(&self, result: &Result<T, PipelineError>) -> Option<OomOutcome> {
        match result {
            Err(e) if is_oom(e) => None,
            Ok(_) => {
                self.lock().record_success();
                Some(OomOutcome::NotOom)
            }
            Err(_) => {
                self.release_probe();
                Some(OomOutcome::NotOom)
            }
        }
    }

    /// A job ended without telling whether memory is back (failed otherwise, cancelled, or
    /// abandoned before it started). If it was the half-open probe, close the breaker rather
    /// than refuse all work forever; the next OOM counts again.
    pub fn release_probe(&self) {
        let mut b = self.lock();
        if b.state() == sdserve_pipeline::memory::breaker::BreakerState::HalfOpen {
            b.record_success();
        }
    }

    /// Feeds a job's result to the breaker; on repeated OOMs moves `sd` to a leaner plan.
    pub fn record<T>(
        &self,
        result: &Result<T, PipelineError>,
        sd: &mut StableDiffusion,
        setup: &mut GpuSetup,
    ) -> OomOutcome {
        if let Some(outcome) = self.record_non_oom(result) {
            return outcome;
        }
        let next = match (&setup.footprint, &setup.plan_request) {
            (Some(fp), Some(req)) => leaner(fp, req, &setup.plan),
            _ => None,
        };
        let action = self.lock().record_oom(next.is_some());
        match action {
            OomAction::None => OomOutcome::Failed,
            OomAction::UseLeanerPlan => {
                let next = next.expect("checked");
                match apply_plan(sd, &next) {
                    Ok(()) => {
                        setup.plan = next;
                        OomOutcome::SwitchedPlan(setup.plan.summary())
                    }
                    Err(e) => OomOutcome::SwitchedPlan(format!("failed to switch plan: {e}")),
                }
            }
            OomAction::Opened { until } => OomOutcome::Paused {
                retry_after: until.saturating_duration_since(std::time::Instant::now()),
            },
        }
    }
}

/// True for a device allocation failure, also when it arrives as a plain candle error whose text
/// says so (not every path classifies it into [`PipelineError::OutOfMemory`]).
pub fn is_oom(e: &PipelineError) -> bool {
    match e {
        PipelineError::OutOfMemory(_) => true,
        PipelineError::Candle(_) | PipelineError::Weights { .. } => {
            sdserve_pipeline::memory::breaker::is_out_of_memory_text(&e.to_string())
        }
        _ => false,
    }
}

/// Applies the levers of `plan` that can change without reloading the model.
pub fn apply_plan(sd: &mut StableDiffusion, plan: &MemoryPlan) -> Result<(), PipelineError> {
    sd.set_attention_slicing(plan.attention);
    sd.set_vae_tiling(plan.vae_tiling);
    sd.set_offload(plan.offload)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn fixture() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipeline/tests/fixtures/tiny-a")
    }

    fn args(extra: &[&str]) -> ModelArgs {
        #[derive(Parser)]
        struct A {
            #[command(flatten)]
            m: ModelArgs,
        }
        let mut argv = vec!["x"];
        argv.extend_from_slice(extra);
        A::parse_from(argv).m
    }

    #[test]
    fn cpu_setup_has_no_budget() {
        let s = resolve(&args(&["--device", "cpu"]), &fixture()).unwrap();
        assert!(s.device.is_cpu());
        assert_eq!(s.dtype, DType::F32);
        assert_eq!(s.plan.budget_bytes, None);
        assert!(s.describe().contains("device cpu dtype f32"));
        assert_eq!(health_gpu(&s.device), None);
    }

    #[test]
    fn auto_on_a_cpu_build_is_cpu() {
        let s = resolve(&args(&["--device", "auto"]), &fixture()).unwrap();
        if !sdserve_pipeline::device::cuda_compiled() {
            assert!(s.device.is_cpu());
            assert!(s.warnings.is_empty());
        }
    }

    #[test]
    fn explicit_cuda_without_cuda_is_an_error() {
        if sdserve_pipeline::device::cuda_compiled() {
            return;
        }
        let e = resolve(&args(&["--device", "cuda:0"]), &fixture()).unwrap_err();
        assert!(e.contains("without CUDA"), "{e}");
        assert!(resolve(&args(&["--device", "tpu"]), &fixture()).is_err());
    }

    #[test]
    fn oom_guard_without_pipeline_opens_after_repeated_ooms() {
        let guard = OomGuard::new(BreakerConfig {
            threshold: 2,
            ..Default::default()
        });
        // A candle error whose text says out of memory counts, like the classified variant.
        let oom: Result<(), _> = Err(PipelineError::Candle(candle_core::Error::Msg(
            "CUDA_ERROR_OUT_OF_MEMORY: out of memory".into(),
        )));
        let other: Result<(), _> = Err(PipelineError::Cancelled);
        assert_eq!(guard.record_without_pipeline(&other), OomOutcome::NotOom);
        assert_eq!(guard.record_without_pipeline(&oom), OomOutcome::Failed);
        assert!(!guard.is_open());
        assert!(guard.admit(&Device::Cpu).is_ok());
        match guard.record_without_pipeline(&oom) {
            OomOutcome::Paused { retry_after } => assert!(retry_after > Duration::ZERO),
            o => panic!("{o:?}"),
        }
        assert!(guard.is_open());
        assert!(guard.admit(&Device::Cpu).unwrap_err() >= Duration::from_secs(1));
    }

    #[test]
    fn an_abandoned_probe_does_not_keep_the_breaker_half_open() {
        let guard = OomGuard::new(BreakerConfig {
            threshold: 1,
            cooldown: Duration::from_millis(10),
            ..Default::default()
        });
        let oom: Result<(), _> = Err(PipelineError::OutOfMemory("test".into()));
        assert!(matches!(
            guard.record_without_pipeline(&oom),
            OomOutcome::Paused { .. }
        ));
        std::thread::sleep(Duration::from_millis(20));
        assert!(guard.admit(&Device::Cpu).is_ok()); // the probe
        assert!(guard.admit(&Device::Cpu).is_err()); // half-open: one probe at a time
        guard.release_probe(); // e.g. its client went away before it started
        assert!(!guard.is_open());
        assert!(guard.admit(&Device::Cpu).is_ok());
    }

    #[test]
    fn oom_guard_counts_only_oom_and_steps_down() {
        let dir = fixture();
        let mut setup = resolve(&args(&["--device", "cpu"]), &dir).unwrap();
        // Simulate a GPU setup on the CPU: a plan with a budget and a footprint.
        let fp = Footprint::from_model_dir(&dir, DType::F32).unwrap();
        let req = PlanRequest {
            budget_bytes: 1 << 30,
            max_width: 64,
            max_height: 64,
            batch: 2,
            dtype: DType::F32,
            overrides: LeverOverrides::default(),
        };
        setup.plan = plan(&fp, &req);
        setup.footprint = Some(fp);
        setup.plan_request = Some(req);
        let mut sd = load(&setup, &dir).unwrap();
        let guard = OomGuard::new(BreakerConfig {
            threshold: 2,
            ..Default::default()
        });
        let oom: Result<(), _> = Err(PipelineError::OutOfMemory("test".into()));
        let other: Result<(), _> = Err(PipelineError::Cancelled);
        assert_eq!(
            guard.record(&other, &mut sd, &mut setup),
            OomOutcome::NotOom
        );
        assert_eq!(guard.record(&oom, &mut sd, &mut setup), OomOutcome::Failed);
        let before = setup.plan.clone();
        match guard.record(&oom, &mut sd, &mut setup) {
            OomOutcome::SwitchedPlan(s) => assert!(!s.contains("failed"), "{s}"),
            o => panic!("{o:?}"),
        }
        assert_ne!(setup.plan, before);
        assert_eq!(sd.memory_plan().offload, setup.plan.offload);
        assert!(guard.admit(&Device::Cpu).is_ok());
        // The pipeline still generates after the switch.
        warm_up(&sd).unwrap();
    }

    #[test]
    fn each_request_gets_the_levers_its_batch_needs() {
        let dir = fixture();
        let mut setup = resolve(&args(&["--device", "cpu"]), &dir).unwrap();
        // A GPU setup simulated on the CPU: tiny-a (VAE factor 2, so 768 px is a 384x384
        // latent) planned for one image with guidance at 256 under 2 GB: sliced attention.
        let fp = Footprint::from_model_dir(&dir, DType::F32).unwrap();
        let req = PlanRequest {
            budget_bytes: 2048 << 20,
            max_width: 256,
            max_height: 256,
            batch: 2,
            dtype: DType::F32,
            overrides: LeverOverrides::default(),
        };
        setup.plan = plan(&fp, &req);
        setup.footprint = Some(fp.clone());
        setup.plan_request = Some(req);
        let mut sd = load(&setup, &dir).unwrap();
        let levers = |sd: &StableDiffusion| {
            let p = sd.memory_plan();
            (p.attention, p.vae_tiling, p.offload)
        };
        let start = levers(&sd);
        let params = |batch_size, side| GenerationParams {
            prompt: "x".into(),
            batch_size,
            width: side,
            height: side,
            ..Default::default()
        };
        // A side where eight images need more than the start-up plan but still fit.
        let side = [768, 704, 640, 576, 512, 448, 384, 320, 256]
            .into_iter()
            .find(|&s| {
                matches!(plan_for_request(&fp, &req, &setup.plan, s, s, 8, true),
                    Ok(p) if (p.attention, p.vae_tiling, p.offload) != start)
            })
            .expect("a size where a batch of 8 needs more levers");
        plan_request(&mut sd, &setup, &params(8, side)).unwrap();
        let big = levers(&sd);
        assert_ne!(big, start);
        assert!(
            big.2 >= start.2,
            "never a faster offload than the plan in use"
        );
        // One image again: back to the start-up plan.
        plan_request(&mut sd, &setup, &params(1, side)).unwrap();
        assert_eq!(levers(&sd), start);
        // Eight at 768 fit under no plan: refused before anything runs, the plan untouched.
        let e = plan_request(&mut sd, &setup, &params(8, 768)).unwrap_err();
        assert!(
            matches!(&e, PipelineError::InvalidRequest(m) if m.contains("batch_size 8")),
            "{e}"
        );
        assert_eq!(levers(&sd), start);
        // The CPU setup has no budget: nothing changes.
        let cpu = resolve(&args(&["--device", "cpu"]), &dir).unwrap();
        plan_request(&mut sd, &cpu, &params(8, 768)).unwrap();
        assert_eq!(levers(&sd), start);
    }
}
