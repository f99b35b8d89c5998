//! Getting the model (through `hub`: local folder, single file or hub id) and loading the real
//! pipeline with the device, dtype and memory plan of `gpu::resolve`.

use candle_core::DType;
use sdserve_pipeline::pipeline::{GenerationParams, RgbImage, StableDiffusion, StepHook};
use sdserve_pipeline::PipelineError;

use crate::cli::ModelArgs;
use crate::config::Runtime;
use crate::generator::{Generator, Loaded, Loader, ModelInfo};
use crate::gpu::{self, GpuSetup, OomGuard, OomOutcome};
use crate::hub;

/// What `serve` adds to loading (`generate` and `bench` use the defaults: no retries, no probe).
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// While the hub cannot be reached, try again in the background so (`None`: the first
    /// failure is final).
    pub patience: Option<hub::RetryPolicy>,
    /// On the CPU, have the worker time a small generation once it is idle (`speed`) and log
    /// what fits the deadlines.
    pub speed_probe: bool,
    /// The default model's files, shared by the loads of one server: the default model's load
    /// records them; a MODELS_DIR model's (`other_model`) judges LORA_DIR's and
    /// EMBEDDINGS_DIR's files against them, so the published listing stays the default model's.
    pub default_files: DefaultModelFiles,
    /// This load is a MODELS_DIR model's, not the default model's.
    pub other_model: bool,
}

/// What another model's listing is judged against, once the default model has loaded.
#[derive(Debug, Clone, Default)]
pub struct DefaultModelFiles(std::sync::Arc<std::sync::Mutex<Option<DefaultModel>>>);

/// The default model as the adapter listings judge against it.
#[derive(Debug, Clone)]
pub struct DefaultModel {
    /// Its files: a diffusers folder, or a single file's conversion.
    pub files: std::path::PathBuf,
    /// Its text encoder's width (an embedding fits it with vectors of this width).
    pub text_hidden_size: usize,
}

impl DefaultModelFiles {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<DefaultModel>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Loads the real pipeline on the worker thread; download/conversion progress goes to `status`
/// (shown by /health while loading).
pub fn real_loader(
    args: ModelArgs,
    rt: Runtime,
    status: hub::LoadStatus,
    opts: LoadOptions,
) -> Loader {
    Box::new(move || load_real(&args, &rt, &status, &opts))
}

/// Loads the models jobs name (MODELS_DIR `dir`, by name; `None`: `args.model` again) on the
/// worker, with `args`' device, dtype and levers; no TAESD (the worker keeps the first one),
/// no hub retries, no speed probe. Without `dir`, only `args.model` again (after an unload).
pub fn switcher(
    args: ModelArgs,
    rt: Runtime,
    dir: Option<std::path::PathBuf>,
    status: hub::LoadStatus,
    default_files: DefaultModelFiles,
) -> crate::generator::Switcher {
    let by_name = dir.is_some();
    let load = Box::new(move |name: Option<&str>| {
        let mut args = args.clone();
        if let Some(name) = name {
            let dir = dir.clone().ok_or("this server has no MODELS_DIR")?;
            // Only a name the folder lists reaches a path.
            let entry = crate::models::Catalog::new(Some(dir), "", None)
                .find(name)
                .ok_or_else(|| format!("{name:?} is no longer in MODELS_DIR"))?;
            args.model = entry.path.to_string_lossy().into_owned();
            // MODEL_CONFIG describes `--model`'s checkpoint, not the folder's.
            args.model_config = None;
        }
        let opts = LoadOptions {
            default_files: default_files.clone(),
            other_model: name.is_some(),
            ..LoadOptions::default()
        };
        load_real(&args, &rt, &status, &opts)
    });
    crate::generator::Switcher { load, by_name }
}

/// The real pipeline together with the setup it was loaded with, so repeated out-of-memory
/// failures can step it down to a leaner plan.
pub struct GpuGenerator {
    sd: StableDiffusion,
    setup: GpuSetup,
    /// LORA_DIR and EMBEDDINGS_DIR, read again when they change.
    adapters: crate::adapters::AdapterFolders,
    /// VAE_DIR and MODELS_DIR, where `set_vae` finds a VAE by name.
    vae_dir: Option<std::path::PathBuf>,
    vae_models_dir: Option<std::path::PathBuf>,
    /// UPSCALERS_DIR, where a hires pass's upscaler model is found by name.
    upscalers_dir: Option<std::path::PathBuf>,
    /// CONTROLNET_DIR, where a request's ControlNets are found by name.
    controlnet_dir: Option<std::path::PathBuf>,
    /// IP_ADAPTER_DIR, where a request's IP-Adapters and their image encoder are found.
    ip_adapter_dir: Option<std::path::PathBuf>,
    /// FACE_RESTORE_DIR, where a request's face restoration finds its networks.
    face_restore_dir: Option<std::path::PathBuf>,
}

/// Why a VAE cannot be used, without the server's paths: the weights' message (which tensor,
/// which shapes) is kept.
fn vae_error_for_client(e: &PipelineError) -> String {
    match e {
        PipelineError::Weights { message, .. } | PipelineError::Config { message, .. } => {
            format!("this VAE cannot be used with the model: {message}")
        }
        PipelineError::Io { source, .. } => format!("this VAE cannot be read: {source}"),
        other => format!("this VAE cannot be used with the model: {other}"),
    }
}

impl Generator for GpuGenerator {
    fn generate(
        &mut self,
        params: &GenerationParams,
        on_step: StepHook,
    ) -> Result<Vec<RgbImage>, PipelineError> {
        // A hires upscaler model by name: found in this process's UPSCALERS_DIR, its network
        // (cached) on the pipeline's device, in float32.
        let resolved = crate::upscalers::with_hires_network(
            params,
            self.upscalers_dir.as_deref(),
            self.sd.device(),
        )?;
        let params = resolved.as_ref().unwrap_or(params);
        // ControlNets by name: found in this process's CONTROLNET_DIR, loaded (cached) on the
        // pipeline's device in its dtype.
        let controlled = crate::controlnets::with_controlnet_models(
            params,
            self.controlnet_dir.as_deref(),
            &self.sd,
        )?;
        let params = controlled.as_ref().unwrap_or(params);
        // IP-Adapters by name: their files and the image encoder in IP_ADAPTER_DIR, read for
        // this request on the pipeline's device in its dtype.
        let prompted =
            crate::ip_adapters::with_ip_adapter_files(params, self.ip_adapter_dir.as_deref())?;
        let params = prompted.as_ref().unwrap_or(params);
        // Face restoration: its networks (cached) on the pipeline's device, in float32.
        let restoring = crate::face_restorers::with_face_restorer(
            params,
            self.face_restore_dir.as_deref(),
            self.sd.device(),
        )?;
        let params = restoring.as_ref().unwrap_or(params);
        gpu::plan_request(&mut self.sd, &self.setup, params)?;
        self.sd.generate(params, on_step)
    }

    fn device(&self) -> candle_core::Device {
        self.setup.device.clone()
    }

    fn memory_plan(&self) -> Option<String> {
        Some(self.setup.plan.summary())
    }

    fn refresh_adapters(&mut self, force: bool) -> Option<crate::adapters::Adapters> {
        self.adapters.refresh(&mut self.sd, force)
    }

    fn set_vae(&mut self, name: Option<&str>) -> Result<(), String> {
        let path = match name {
            None => None,
            Some(name) => Some(
                crate::vaes::VaeCatalog::new(self.vae_dir.clone(), None)
                    .with_models_dir(self.vae_models_dir.clone())
                    .find(name)
                    .ok_or_else(|| format!("{name:?} is no longer in VAE_DIR or MODELS_DIR"))?
                    .path,
            ),
        };
        if self.sd.vae_in_use() == path.as_deref() {
            return Ok(());
        }
        let t0 = std::time::Instant::now();
        match self.sd.set_vae(path.as_deref()) {
            Ok(()) => {
                tracing::info!(
                    vae = name.unwrap_or("the model's own"),
                    seconds = t0.elapsed().as_secs_f64(),
                    rss_mb = crate::config::rss_mb(),
                    "VAE swapped"
                );
                Ok(())
            }
            Err(e) => {
                tracing::warn!(vae = name.unwrap_or_default(), error = %e, "VAE cannot be used; the model's own is in place");
                // The error names the file by its path; the client hears its name only.
                Err(vae_error_for_client(&e))
            }
        }
    }

    fn last_memory_usage(&self) -> Option<sdserve_pipeline::memory::MemoryUsage> {
        self.sd.last_memory_usage()
    }

    fn record_oom(
        &mut self,
        guard: &OomGuard,
        result: &Result<Vec<RgbImage>, PipelineError>,
    ) -> OomOutcome {
        guard.record(result, &mut self.sd, &mut self.setup)
    }
}

pub fn load_real(
    args: &ModelArgs,
    rt: &Runtime,
    status: &hub::LoadStatus,
    load: &LoadOptions,
) -> Result<Loaded, String> {
    // The hub prefers fp16 weight variants when the model will run in f16; `rt` made the same
    // device/dtype choice `gpu::resolve` makes below.
    let mut opts = hub::HubOptions::from_env(args.model_cache_dir.clone(), rt.dtype == DType::F16);
    if args.model_config.is_some() {
        opts.single_file_config = args.model_config.clone();
    }
    let s = status.clone();
    let progress = move |p: &hub::Progress| s.update(p);
    let resolved = match load.patience {
        Some(policy) => {
            // The background tries take over from long request retries (a cut download resumes).
            opts.retries = opts.retries.min(1);
            let w = status.clone();
            hub::resolve_model_patiently(&args.model, &opts, &progress, policy, &move |wait| {
                w.set_waiting(wait)
            })
        }
        None => hub::resolve_model(&args.model, &opts, &progress),
    }
    .map_err(|e| e.to_string())?;
    tracing::info!(dir = %resolved.dir.display(), source = ?resolved.source, model_version = %resolved.model_version, "model files ready");
    let setup = gpu::resolve(args, &resolved.dir)?;
    for w in &setup.warnings {
        tracing::warn!("{w}");
    }
    if let Some(g) = sdserve_pipeline::device::gpu_info(&setup.device) {
        tracing::info!(
            device = %setup.device_label,
            compute_capability = %g
                .compute_capability
                .map_or("unknown".to_string(), |(major, minor)| format!("{major}.{minor}")),
            memory_total_mb = g.memory_total_bytes >> 20,
            memory_free_mb = g.memory_free_bytes >> 20,
            "GPU {}",
            g.name
        );
    }
    tracing::info!(
        device = %setup.device_label,
        vram_limit_mb = args.vram_limit_mb,
        "{}",
        setup.describe()
    );
    let t0 = std::time::Instant::now();
    let mut sd = gpu::load(&setup, &resolved.dir)?;
    for (component, seconds) in sd.load_seconds() {
        tracing::debug!(component, seconds, "component loaded");
    }
    let mut folders = crate::adapters::AdapterFolders::new(args.adapter_dirs());
    if !load.other_model {
        *load.default_files.lock() = Some(DefaultModel {
            files: resolved.dir.clone(),
            text_hidden_size: sd.text_hidden_size(),
        });
    } else if let Some(default) = load.default_files.lock().clone() {
        folders = folders.judged_against(default);
    }
    let adapters = folders.load(&mut sd)?;
    if !setup.device.is_cpu() {
        tracing::info!(
            seconds = t0.elapsed().as_secs_f64(),
            "weights on the device and kernels warmed up"
        );
    }
    let info = ModelInfo {
        model_version: resolved.model_version,
        default_scheduler: sd.default_scheduler(),
        default_schedule: sd.default_schedule(),
        adapters,
        guidance_distilled: sd.is_guidance_distilled(),
        memory: gpu::MemoryBudget::of(&setup).map(std::sync::Arc::new),
        schedules: Some(std::sync::Arc::new(sd.schedules().clone())),
        limits: Some(sd.limits()),
    };
    Ok(Loaded {
        speed_probe: load.speed_probe && setup.device.is_cpu(),
        generator: Box::new(GpuGenerator {
            sd,
            setup,
            adapters: folders,
            vae_dir: args.vae_dir.clone(),
            vae_models_dir: args.vae_models_dir.clone(),
            upscalers_dir: args.upscalers_dir.clone(),
            controlnet_dir: args.controlnet_dir.clone(),
            ip_adapter_dir: args.ip_adapter_dir.clone(),
            face_restore_dir: args.face_restore_dir.clone(),
        }),
        info,
        taesd: None,
    })
}

/// Wraps a loader so that, once the model is loaded, the TAESD preview decoder named by `spec`
/// (a folder or hub id) is loaded on the model's device. A TAESD that cannot be had is not
/// fatal: previews are a view of the run, not its result, so the model serves anyway, previews
/// fall back to the latent map and the log says why (as ComfyUI does for a missing TAESD).
pub fn with_taesd(
    inner: Loader,
    spec: String,
    mut opts: hub::HubOptions,
    dtype: DType,
    status: hub::LoadStatus,
) -> Loader {
    Box::new(move || {
        let mut loaded = inner()?;
        let device = loaded.generator.device();
        let t0 = std::time::Instant::now();
        opts.layout = hub::Layout::Component;
        // The model already waited for the hub; the TAESD does not hold start-up for long.
        opts.retries = opts.retries.min(1);
        let progress = move |p: &hub::Progress| status.update(p);
        let taesd = hub::resolve_model(&spec, &opts, &progress)
            .map_err(|e| e.to_string())
            .and_then(|m| {
                sdserve_pipeline::taesd::Taesd::load(&m.dir, &device, dtype)
                    .map(|t| (t, m.model_version))
                    .map_err(|e| e.to_string())
            });
        match taesd {
            Ok((t, version)) => {
                tracing::info!(
                    taesd = %version,
                    seconds = t0.elapsed().as_secs_f64(),
                    "TAESD previews ready"
                );
                loaded.taesd = Some(t);
            }
            Err(e) => tracing::warn!(
                taesd = %spec,
                error = %e,
                "PREVIEW=taesd but the TAESD cannot be loaded; previews fall back to the latent map"
            ),
        }
        Ok(loaded)
    })
}
