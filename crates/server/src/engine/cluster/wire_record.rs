//! What a job is in Redis besides its request ([`super::wire::WireSpec`]): its record, the
//! error it ended with, the events channel's messages, and what workers announce.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::wire::WireSpec;
use crate::adapters::Adapters;
use crate::api::GenerateResponse;
use crate::engine::job::{JobEvent, JobProgress, JobView};
use crate::error::{ApiError, ErrorBody, FieldError, TimeoutInfo};
use crate::generator::ModelInfo;
use sdserve_pipeline::schedulers::{SchedulerKind, SigmaSchedule};

/// The errors a job can end with, whole (a 408 keeps its details across processes).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", content = "data", rename_all = "snake_case")]
pub enum WireError {
    Timeout(TimeoutInfo),
    Validation(Vec<FieldError>),
    OutOfMemory {
        detail: String,
        retry_after_secs: Option<u64>,
    },
    ModelUnavailable(String),
    Internal(String),
}

impl WireError {
    pub fn of(e: &ApiError) -> Self {
        match e {
            ApiError::Timeout(info) => Self::Timeout(info.clone()),
            ApiError::Validation(f) => Self::Validation(f.clone()),
            ApiError::OutOfMemory {
                detail,
                retry_after_secs,
            } => Self::OutOfMemory {
                detail: detail.clone(),
                retry_after_secs: *retry_after_secs,
            },
            ApiError::ModelUnavailable(d) => Self::ModelUnavailable(d.clone()),
            other => Self::Internal(other.to_string()),
        }
    }

    pub fn error(&self) -> ApiError {
        match self {
            Self::Timeout(info) => ApiError::Timeout(info.clone()),
            Self::Validation(f) => ApiError::Validation(f.clone()),
            Self::OutOfMemory {
                detail,
                retry_after_secs,
            } => ApiError::OutOfMemory {
                detail: detail.clone(),
                retry_after_secs: *retry_after_secs,
            },
            Self::ModelUnavailable(d) => ApiError::ModelUnavailable(d.clone()),
            Self::Internal(d) => ApiError::Internal(d.clone()),
        }
    }
}

/// A job in Redis (`{prefix}:job:{id}`): the view clients read (its `position` and
/// `cancel_requested` are filled in when read) and what a worker needs to run it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub view: JobView,
    pub spec: WireSpec,
    pub created_ms: u64,
    /// Deadline (unix ms), queue wait included.
    pub deadline_ms: u64,
    pub started_ms: Option<u64>,
    pub gen_secs: f64,
    pub error: Option<WireError>,
    /// Runs started (more than one when a worker died and another took the job over).
    pub attempts: u32,
    pub worker: Option<String>,
}

impl Record {
    pub fn queue_secs(&self) -> f64 {
        self.started_ms
            .map(|s| s.saturating_sub(self.created_ms) as f64 / 1000.0)
            .unwrap_or(0.0)
    }

    /// Back in the queue, as before it first started (a worker died or shut down).
    pub fn requeued(&self) -> Self {
        let mut r = self.clone();
        r.view.status = crate::engine::JobStatus::Queued;
        r.view.started_at = None;
        r.view.progress = JobProgress {
            step: 0,
            total: self.spec.steps,
            eta_seconds: None,
        };
        r.started_ms = None;
        r.worker = None;
        r
    }

    /// How far it got, for a 408's details.
    pub fn timeout_info(&self, now_ms: u64) -> TimeoutInfo {
        let started = self.started_ms.unwrap_or(now_ms).max(self.created_ms);
        TimeoutInfo {
            limit_secs: self.spec.timeout_ms / 1000,
            setting: self.spec.timeout_setting,
            queued_secs: started.saturating_sub(self.created_ms) as f64 / 1000.0,
            step: self.started_ms.map_or(0, |_| self.view.progress.step),
            total: self.started_ms.map_or(0, |_| self.view.progress.total),
            running_secs: now_ms.saturating_sub(started) as f64 / 1000.0,
            // The API side has no speed measurement of the worker that would run it.
            alone_secs: None,
        }
    }
}

/// One message on the events channel: `event.data(id)` plus the name.
pub fn event_message(id: &str, event: &JobEvent) -> String {
    serde_json::json!({ "id": id, "event": event.name(), "data": event.data(id) }).to_string()
}

/// The job id and event of a message from the events channel.
pub fn parse_event(msg: &str) -> Option<(String, JobEvent)> {
    let v: serde_json::Value = serde_json::from_str(msg).ok()?;
    let id = v["id"].as_str()?.to_string();
    let d = &v["data"];
    let usize_of = |k: &str| d[k].as_u64().map(|n| n as usize);
    let event = match v["event"].as_str()? {
        "queued" => JobEvent::Queued {
            position: usize_of("position")?,
        },
        "started" => JobEvent::Started,
        "loading" => JobEvent::Loading {
            model: d["model"].as_str()?.to_string(),
        },
        "progress" => JobEvent::Progress(JobProgress {
            step: usize_of("step")?,
            total: usize_of("total")?,
            eta_seconds: d["eta_seconds"].as_f64(),
        }),
        "preview" => JobEvent::Preview {
            step: usize_of("step")?,
            png_base64: Arc::new(d["image_base64"].as_str()?.to_string()),
        },
        "succeeded" => JobEvent::Succeeded(Arc::new(
            serde_json::from_value::<GenerateResponse>(d["result"].clone())
                .ok()?
                .share_first_image(),
        )),
        "failed" => JobEvent::Failed(serde_json::from_value::<ErrorBody>(d["error"].clone()).ok()?),
        "cancelled" => JobEvent::Cancelled,
        _ => return None,
    };
    Some((id, event))
}

/// A model's description as a worker announces it, for API processes that load none.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireInfo {
    model_version: String,
    default_scheduler: String,
    /// Absent from workers older than the field: the scheduler name's own.
    #[serde(default)]
    default_schedule: Option<String>,
    adapters: Adapters,
    /// Absent from workers older than the field: not distilled (their workers still refuse
    /// AND parts when they run the job).
    #[serde(default)]
    guidance_distilled: bool,
    /// Absent from workers older than the field: not known (their workers refuse a request
    /// past them when they run it).
    #[serde(default)]
    limits: Option<sdserve_pipeline::pipeline::ModelLimits>,
}

impl WireInfo {
    pub fn of(i: &ModelInfo) -> Self {
        Self {
            model_version: i.model_version.clone(),
            default_scheduler: i.default_scheduler.name().to_string(),
            default_schedule: Some(i.default_schedule.name().to_string()),
            adapters: i.adapters.clone(),
            guidance_distilled: i.guidance_distilled,
            limits: i.limits,
        }
    }
    pub fn info(&self) -> Option<ModelInfo> {
        let default_scheduler = SchedulerKind::from_name(&self.default_scheduler)?;
        Some(ModelInfo {
            model_version: self.model_version.clone(),
            default_scheduler,
            default_schedule: match &self.default_schedule {
                Some(name) => SigmaSchedule::from_name(name)?,
                None => default_scheduler.schedule(),
            },
            adapters: self.adapters.clone(),
            guidance_distilled: self.guidance_distilled,
            // The worker checks each job against its own budget before running it.
            memory: None,
            schedules: None,
            limits: self.limits,
        })
    }
}

/// A worker's heartbeat (`{prefix}:worker:{id}`, expiring after JOB_LEASE_SECONDS).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Heartbeat {
    pub health: super::WorkerHealth,
    pub info: Option<WireInfo>,
    /// The load failure, when the model failed to load.
    pub failed: Option<String>,
    /// The last forced read of its adapter folders asked through `Keys::adapters_rescan` that
    /// this worker has made (API replicas wait for it on their refresh routes).
    #[serde(default)]
    pub adapters_rescan: u64,
}
