//! A job as clients see it: its states, the JSON view, and the events it emits (README "Jobs";
//! "Jobs"). Shared by every backend.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use sdserve_pipeline::pipeline::{GenerationParams, GuidanceRule, Mode};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::api::{GenerateMetadata, GenerateResponse, LoraUse};
use crate::error::{ApiError, ErrorBody};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub fn is_final(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

/// Progress in UNet evaluations, counted the way the pipeline's step hook counts them (PNDM runs
/// steps + 1), once for a whole batch.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobProgress {
    /// Evaluations done.
    pub step: usize,
    /// Evaluations in all: the request's `steps` until the run starts and knows the real count.
    pub total: usize,
    /// Seconds left, from the mean time per evaluation so far; null before the first one.
    pub eta_seconds: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobLinks {
    /// `/jobs/{id}`
    #[serde(rename = "self")]
    pub self_: String,
    /// `/jobs/{id}/events` (Server-Sent Events)
    pub events: String,
}

impl JobLinks {
    pub fn for_id(id: &str) -> Self {
        Self {
            self_: format!("/jobs/{id}"),
            events: format!("/jobs/{id}/events"),
        }
    }
}

/// The body of `GET /jobs/{id}`, the first (`state`) event of its stream, and each entry of
/// `GET /jobs`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JobView {
    pub id: String,
    pub status: JobStatus,
    /// Place in the queue while queued (1 runs next); null otherwise.
    pub position: Option<usize>,
    pub progress: JobProgress,
    /// RFC 3339, UTC.
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    /// True once `DELETE /jobs/{id}` (or the waiting client of `/generate` leaving) asked to stop.
    pub cancel_requested: bool,
    /// The validated request the job runs, defaults filled and seed and scheduler resolved.
    #[schema(value_type = Object)]
    pub request: serde_json::Value,
    /// The `/generate` 200 body once succeeded.
    #[schema(value_type = Option<GenerateResponse>)]
    pub result: Option<Arc<GenerateResponse>>,
    /// The error body once failed (`timeout` past the deadline, `out_of_memory`, ...).
    pub error: Option<ErrorBody>,
    pub links: JobLinks,
    /// The model the worker is loading for this job (it names another than the loaded one);
    /// null otherwise.
    #[serde(default)]
    pub loading: Option<String>,
    /// The latest preview (step and base64 PNG), for dialects that poll (A1111 `current_image`).
    #[serde(skip)]
    #[allow(dead_code)] // read by dialects that poll
    pub preview: Option<(usize, Arc<String>)>,
}

/// One Server-Sent Event of `GET /jobs/{id}/events` after the first `state`.
#[derive(Debug, Clone)]
pub enum JobEvent {
    Queued {
        position: usize,
    },
    Started,
    /// The worker loads the model the job names (MODELS_DIR) before it runs.
    Loading {
        model: String,
    },
    Progress(JobProgress),
    Preview {
        step: usize,
        png_base64: Arc<String>,
    },
    Succeeded(Arc<GenerateResponse>),
    Failed(ErrorBody),
    Cancelled,
}

impl JobEvent {
    /// The SSE `event:` field.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Queued { .. } => "queued",
            Self::Started => "started",
            Self::Loading { .. } => "loading",
            Self::Progress(_) => "progress",
            Self::Preview { .. } => "preview",
            Self::Succeeded(_) => "succeeded",
            Self::Failed(_) => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    /// The SSE `data:` field (never empty: a browser drops events without data).
    pub fn data(&self, id: &str) -> serde_json::Value {
        use serde_json::json;
        match self {
            Self::Queued { position } => json!({ "id": id, "position": position }),
            Self::Started => json!({ "id": id }),
            Self::Loading { model } => json!({ "id": id, "model": model }),
            Self::Progress(p) => json!({
                "id": id, "step": p.step, "total": p.total, "eta_seconds": p.eta_seconds
            }),
            Self::Preview { step, png_base64 } => {
                json!({ "id": id, "step": step, "image_base64": png_base64.as_str() })
            }
            Self::Succeeded(r) => json!({ "id": id, "result": r }),
            Self::Failed(e) => json!({ "id": id, "error": e }),
            Self::Cancelled => json!({ "id": id }),
        }
    }

    pub fn is_final(&self) -> bool {
        matches!(self, Self::Succeeded(_) | Self::Failed(_) | Self::Cancelled)
    }

    /// The terminal event of a job that has ended.
    pub fn terminal(view: &JobView) -> Option<Self> {
        match view.status {
            JobStatus::Succeeded => view.result.clone().map(Self::Succeeded),
            JobStatus::Failed => {
                Some(Self::Failed(view.error.clone().unwrap_or_else(|| {
                    ApiError::Internal("failed without a cause".into()).body()
                })))
            }
            JobStatus::Cancelled => Some(Self::Cancelled),
            JobStatus::Queued | JobStatus::Running => None,
        }
    }
}

/// What a backend runs: built by the API layer from a validated request.
#[derive(Debug, Clone)]
pub struct JobSpec {
    /// Resolved: seed and scheduler are set.
    pub params: GenerationParams,
    /// The validated request as JSON (the job's `request`).
    pub request: serde_json::Value,
    /// The PNG `parameters` text chunk of each image of the batch.
    pub png_texts: Vec<String>,
    /// The UNet evaluations the run will count (`progress.total` from the start: PNDM's extra
    /// step, second-order samplers, img2img's partial schedule, the hires pass); steps plus
    /// hires steps where the model's schedules are not known here (the run's own count
    /// replaces it at its first step).
    pub progress_total: usize,
    pub model_version: String,
    /// The MODELS_DIR model the job runs on; `None`: the default model.
    pub model: Option<String>,
    /// The VAE_DIR VAE the job decodes with; `None`: the model's own.
    pub vae: Option<crate::vaes::VaeUse>,
    /// Which of the two settings below `timeout` comes from (its 408 names it).
    pub timeout_setting: crate::error::DeadlineSetting,
    /// Deadline from creation, queue wait included: GENERATION_TIMEOUT_SECONDS for `/generate`,
    /// JOB_TIMEOUT_SECONDS for `/jobs`.
    pub timeout: Duration,
}

/// Why a job was asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum StopReason {
    /// `DELETE /jobs/{id}`, or the waiting `/generate` client went away: status `cancelled`.
    Cancelled = 1,
    /// Past its deadline: status `failed`, error `timeout`.
    Timeout = 2,
    /// Shutdown grace passed: status `failed`, error `model_unavailable`.
    ShuttingDown = 3,
}

impl StopReason {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Cancelled),
            2 => Some(Self::Timeout),
            3 => Some(Self::ShuttingDown),
            _ => None,
        }
    }
}

/// A finished job, for a client that waited on it (`/generate`).
#[derive(Debug, Clone)]
pub struct Finished {
    pub result: Result<Arc<GenerateResponse>, ApiError>,
    pub queue_secs: f64,
    pub gen_secs: f64,
}

/// The `/generate` 200 body for a finished run: `pngs` are the encoded images, in order.
pub fn build_result(spec: &JobSpec, pngs: &[Vec<u8>], gen_secs: f64) -> GenerateResponse {
    let p = &spec.params;
    // The images' own size: the hires pass's, or with A1111's "only masked" the init image's.
    let output = p.output_size();
    let image_size = pngs
        .first()
        .and_then(|png| png_size(png))
        .unwrap_or((output.0 as u32, output.1 as u32));
    let images: Vec<Arc<str>> = pngs
        .iter()
        .map(|png| Arc::from(base64::engine::general_purpose::STANDARD.encode(png)))
        .collect();
    let churn = crate::validate::sampler_params::applied_churn(p).unwrap_or_default();
    let guidance = crate::validate::sampler_params::applied_guidance(p);
    GenerateResponse {
        // One allocation for both fields: a record holds the first image once.
        image_base64: images.first().cloned().unwrap_or_else(|| Arc::from("")),
        images,
        metadata: GenerateMetadata {
            seeds: (0..p.batch_size).map(|i| p.image_seed(i)).collect(),
            batch_size: p.batch_size as u32,
            strength: p.init_image.as_ref().map(|i| i.strength),
            resize_mode: p
                .init_image
                .as_ref()
                .map(|_| crate::validate::resize_mode::name(p.resize_mode).to_string()),
            mode: Mode::of(p).name().to_string(),
            step_rule: (p.init_image.is_some() || p.hires.is_some())
                .then(|| p.step_rule.name().to_string()),
            noise_multiplier: (p.init_image.is_some() && p.noise_multiplier != 1.0)
                .then_some(p.noise_multiplier),
            extra_noise: ((p.init_image.is_some() || p.hires.is_some()) && p.extra_noise != 0.0)
                .then_some(p.extra_noise),
            sigma_churn: churn[0],
            sigma_tmin: churn[1],
            sigma_tmax: churn[2],
            sigma_noise: churn[3],
            negative_guidance_min_sigma: guidance.map(|g| g.min_sigma),
            negative_guidance_all_steps: guidance.map(|g| g.all_steps),
            negative_guidance_skip_early: crate::validate::sampler_params::applied_skip_early(p),
            prompt: p.prompt.clone(),
            negative_prompt: p.negative_prompt.clone(),
            steps: p.steps as u32,
            width: p.width as u32,
            height: p.height as u32,
            image_width: Some(image_size.0),
            image_height: Some(image_size.1),
            seed: p.seed,
            guidance_scale: p.guidance_scale,
            guidance_rule: (p.guidance_rule != GuidanceRule::Diffusers)
                .then(|| p.guidance_rule.name().to_string()),
            eta: p.eta,
            scheduler: p.scheduler.map(|k| k.name()).unwrap_or("").to_string(),
            schedule: p
                .scheduler
                .map(|k| p.schedule.unwrap_or(k.schedule()).name())
                .unwrap_or("")
                .to_string(),
            prompt_syntax: crate::api::prompt_syntax_name(p.prompt_syntax).to_string(),
            clip_skip: p.clip_skip as u32,
            loras: p
                .loras
                .iter()
                .map(|l| LoraUse {
                    name: l.name.clone(),
                    weight: l.weight,
                })
                .collect(),
            generation_time_seconds: (gen_secs * 1000.0).round() / 1000.0,
            model_version: spec.model_version.clone(),
            vae: spec.vae.as_ref().map(|v| v.name.clone()),
            hires: p.hires.as_ref().map(|h| crate::api::HiresMetadata {
                width: h.width as u32,
                height: h.height as u32,
                upscaler: crate::validate::hires::upscaler_name(&h.upscaler).to_string(),
                steps: h.steps as u32,
                strength: h.strength,
                scheduler: h.scheduler.map(|k| k.name().to_string()),
                // The pipeline runs the pass's own scheduler on `schedule`, or on its own.
                schedule: h
                    .scheduler
                    .map(|k| h.schedule.unwrap_or(k.schedule()).name().to_string()),
                prompt: h.prompt.clone(),
                negative_prompt: h.negative_prompt.clone(),
            }),
            tiling: p.tiling,
            restore_faces: p
                .face_restore
                .as_ref()
                .map(|f| crate::api::RestoreFaces { weight: f.weight }),
            variation_seed: p.image_variation(0).map(|(seed, _)| seed),
            variation_strength: p.image_variation(0).map_or(0.0, |(_, s)| s),
            seed_resize_from_width: p.seed_resize_from.map(|r| r.width as u32),
            seed_resize_from_height: p.seed_resize_from.map(|r| r.height as u32),
            // Every unit in the request's order (a reference unit's model the extension's "None").
            controlnets: p
                .units_with_references()
                .iter()
                .map(|c| crate::api::ControlNetMetadata {
                    model: crate::png::unit_model_name(c).to_string(),
                    preprocessor: c
                        .preprocessor
                        .as_ref()
                        .map(crate::validate::preprocessor::described),
                    scale: c.scale,
                    guidance_start: c.guidance_start,
                    guidance_end: c.guidance_end,
                    hr_option: c.hr_option.into(),
                    control_mode: c.control_mode.into(),
                })
                .collect(),
            ip_adapters: p
                .ip_adapters
                .iter()
                .map(|u| crate::api::IpAdapterMetadata {
                    model: u.model.name.clone(),
                    scale: u.scale,
                    a1111_unit: u
                        .extension
                        .as_ref()
                        .map(|run| crate::api::A1111IpUnitMetadata {
                            guidance_start: run.guidance_start,
                            guidance_end: run.guidance_end,
                            images: run.images.len(),
                            infotext: run
                                .record
                                .as_ref()
                                .map(|r| r.infotext.clone())
                                .unwrap_or_default(),
                        }),
                })
                .collect(),
            inpaint: p
                .a1111_inpaint
                .as_ref()
                .map(crate::api::InpaintMetadata::of),
        },
    }
}

/// A PNG's size from its IHDR chunk (bytes 16..24, big-endian).
fn png_size(png: &[u8]) -> Option<(u32, u32)> {
    let be = |at: usize| Some(u32::from_be_bytes(png.get(at..at + 4)?.try_into().ok()?));
    Some((be(16)?, be(20)?))
}

/// RFC 3339 in UTC with milliseconds.
pub fn timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// A fresh job id: 16 hex digits from a randomly keyed hash of a counter and the clock (ids are
/// not secrets; they only need to be unique and not guessable in sequence).
pub fn new_id(counter: u64) -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(counter);
    h.write_u128(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    format!("{:016x}", h.finish())
}
