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
//!
//! Files: `oom` (the out-of-memory guard, `is_oom`, `apply_plan`), `tests`; this one resolves the
//! setup, budgets requests, loads, warms up and reports.

use std::path::Path;

use candle_core::{DType, Device};
use sdserve_pipeline::device::{
    dtype_label, gpu_info, select_device, select_dtype, DTypeRequest, DeviceRequest,
};
use sdserve_pipeline::memory::footprint::{
    controlnet_weight_count, image_prompt_load as image_prompt_load_of,
};
use sdserve_pipeline::memory::plan::{
    check_request, plan, plan_for_request, ControlNetLoad, ImagePromptLoad, OverBudget,
    DEFAULT_MAX_SIDE,
};
use sdserve_pipeline::memory::{Footprint, LeverOverrides, MemoryPlan, PlanRequest};
use sdserve_pipeline::pipeline::{GenerationParams, StableDiffusion};
use sdserve_pipeline::PipelineError;

use crate::cli::{DtypeArg, ModelArgs};

mod oom;

pub use oom::{apply_plan, is_oom, OomGuard, OomOutcome};

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
        controlnets: ControlNetLoad::default(),
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

    /// Whether `batch_size` images of `width` x `height` with `controlnets` fit with the
    /// leanest levers allowed.
    pub fn check(
        &self,
        width: usize,
        height: usize,
        batch_size: usize,
        guidance: bool,
        controlnets: ControlNetLoad,
    ) -> Result<(), OverBudget> {
        check_request(
            &self.footprint,
            &PlanRequest {
                controlnets,
                ..self.request
            },
            width,
            height,
            batch_size,
            guidance,
        )
    }
}

/// What `params`' ControlNets weigh for the planner, from their files' headers (read before
/// the models are). A ControlNet known by name only (a cluster's API process), or whose
/// header cannot be read (its load will say why), counts its unit without weights.
pub fn controlnet_load(params: &GenerationParams, dtype: DType) -> ControlNetLoad {
    let mut paths: Vec<&Path> = params
        .controlnets
        .iter()
        .map(|u| u.model.path.as_path())
        .filter(|p| !p.as_os_str().is_empty())
        .collect();
    paths.sort();
    paths.dedup();
    let params_of = |path: &Path| {
        controlnet_weight_count(path, dtype).unwrap_or_else(|e| {
            tracing::debug!(path = %path.display(), "ControlNet not counted: {e}");
            0
        })
    };
    ControlNetLoad {
        units: params.controlnets.len(),
        params: paths.into_iter().map(params_of).sum(),
        references: params.references.len(),
        image_prompts: image_prompt_load(params, dtype),
    }
}

/// What `params`' IP-Adapters put on the device while their images are encoded, from the
/// encoder's config and the files' headers. Adapters known by name only (before the worker
/// finds them in its IP_ADAPTER_DIR), or whose files cannot be read (their load will say why),
/// count nothing.
fn image_prompt_load(params: &GenerationParams, dtype: DType) -> ImagePromptLoad {
    let Some(encoder) = params
        .ip_adapters
        .first()
        .map(|u| u.image_encoder.path.as_path())
    else {
        return ImagePromptLoad::default();
    };
    let adapters: Vec<&Path> = params
        .ip_adapters
        .iter()
        .map(|u| u.model.path.as_path())
        .collect();
    let named_only = |p: &Path| p.as_os_str().is_empty();
    if named_only(encoder) || adapters.iter().any(|p| named_only(p)) {
        return ImagePromptLoad::default();
    }
    image_prompt_load_of(encoder, &adapters, dtype).unwrap_or_else(|e| {
        tracing::debug!(encoder = %encoder.display(), "IP-Adapters not counted: {e}");
        ImagePromptLoad::default()
    })
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
    // AND parts are UNet rows too (one per part and one for the negative prompt).
    let guidance = params.any_pass_runs_negative_prompt() || params.composed_parts().is_some();
    let (w, h, n) = (
        params.width,
        params.height,
        params.guided_batch_equivalent(),
    );
    let req = &PlanRequest {
        controlnets: controlnet_load(params, req.dtype),
        ..*req
    };
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

/// One small generation (CFG on, two steps) touching every kernel the real requests use (an
/// inpainting model's text-to-image encodes its grey conditioning image too).
pub fn warm_up(sd: &StableDiffusion) -> Result<(), PipelineError> {
    let side = 8 * sd.vae_scale_factor();
    let params = GenerationParams {
        prompt: "warm-up".into(),
        negative_prompt: String::new(),
        steps: 2,
        width: side,
        height: side,
        seed: 0,
        guidance_scale: 7.5,
        scheduler: None,
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

#[cfg(test)]
mod tests;
