//! `GET /health`'s answer.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct GpuInfo {
    pub name: String,
    pub memory_total_mb: u64,
    /// Now, from the driver (all processes, CUDA context included).
    pub memory_used_mb: u64,
    pub memory_free_mb: u64,
    /// Highest device memory in use during the last request; null before the first.
    pub last_request_peak_mb: Option<u64>,
    /// Highest device memory in use during any request since start; null before the first.
    pub peak_mb: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct QueueInfo {
    pub running: usize,
    pub waiting: usize,
    /// MAX_CONCURRENT_REQUESTS: running plus waiting admitted at once.
    pub capacity: usize,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum HealthStatus {
    Ok,
    Loading,
    Unavailable,
    Degraded,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HealthResponse {
    pub status: HealthStatus,
    /// Null until the model is loaded, and for the fake generator.
    pub model_version: Option<String>,
    /// Where the model runs: `cpu`, or `cuda:N` for GPU N.
    pub device: String,
    /// `f32`, `f16` or `bf16`.
    pub dtype: String,
    /// Null on the CPU.
    pub gpu: Option<GpuInfo>,
    /// The memory plan in use (levers, estimated peak against VRAM_LIMIT_MB); it changes when
    /// repeated out-of-memory failures step down to a leaner plan. Null until the model is loaded.
    pub memory_plan: Option<String>,
    pub queue: QueueInfo,
    /// Seconds since the process started.
    pub uptime_seconds: f64,
    /// sdserve's version.
    pub version: String,
    /// Why the status is not `ok` (download progress while loading; the load failure; while the
    /// hub cannot be reached, the last failure, the ways out and when the next background try
    /// is; the circuit breaker; a run stuck past its deadline, or every worker `stuck`;
    /// QUEUE_URL's Redis unreachable); with `ok`, that the model is unloaded
    /// (`/sdapi/v1/unload-checkpoint`) or being reloaded; else null.
    pub detail: Option<String>,
    /// The model this process's worker holds now (MODELS_DIR switches it per job; `model_version`
    /// above stays the default model's); null while it holds none (loading, a switch under
    /// way or failed, unloaded by `/sdapi/v1/unload-checkpoint`) and on an API replica.
    pub loaded_model: Option<crate::models::LoadedModelHealth>,
    /// With QUEUE_URL: the workers whose heartbeat is fresh (id, state, model_version,
    /// running_job, jobs_done, started_at); null without QUEUE_URL.
    pub workers: Option<Vec<crate::engine::WorkerHealth>>,
}
