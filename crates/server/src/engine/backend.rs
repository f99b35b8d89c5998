//! `JobBackend`, the engine's one seam: where jobs live and run (the in-process `local`, the
//! Redis-shared `cluster`), and the tickets its asks answer with.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::broadcast;

use super::{
    ClusterHealth, Finished, JobEvent, JobSpec, JobView, LoadedModel, ModelAsk, ModelHold,
    ModelState, PreviewWatch, StopReason,
};
use crate::error::ApiError;
use crate::metrics::Gauges;

/// A read of LORA_DIR/EMBEDDINGS_DIR asked of the worker(s): done once `done` reaches
/// `target`.
pub struct RescanTicket {
    pub target: u64,
    pub done: tokio::sync::watch::Receiver<u64>,
}

/// The worker's answer to a `ModelAsk`; dropping it withdraws an ask not yet done.
pub type ModelAskTicket = tokio::sync::oneshot::Receiver<Result<(), ApiError>>;

/// Where jobs live and run. Every method answers at once; waiting is done on the event
/// channel `subscribe` hands out.
pub trait JobBackend: Send + Sync {
    fn model_state(&self) -> ModelState;
    fn gauges(&self) -> Gauges;
    fn oom_breaker_open(&self) -> bool;
    /// Why this process's own run is stuck (past its job's deadline by the stuck grace, its
    /// job ended without it) while it has not returned; `None` otherwise.
    fn stuck_run(&self) -> Option<String> {
        None
    }
    /// Since when this process's own run has been stuck (as `stuck_run` says), while it has
    /// not returned.
    fn stuck_since(&self) -> Option<Instant> {
        None
    }
    fn memory_plan(&self) -> Option<String>;
    /// The model this process's worker holds now; `None` while it holds none (loading, a
    /// failed switch) or runs no jobs.
    fn loaded_model(&self) -> Option<LoadedModel> {
        None
    }
    /// Where this process's worker stands with its model when it is unloaded or reloading.
    fn model_hold(&self) -> Option<ModelHold> {
        None
    }
    /// Asks this process's worker to unload or reload its model between jobs (after the
    /// running one); the answer comes once it is done. `None` where this process runs no jobs.
    fn ask_model(&self, _ask: ModelAsk) -> Option<ModelAskTicket> {
        None
    }
    /// What the CPU speed probe of this process's worker measured, once it has.
    fn speed(&self) -> Option<crate::speed::SpeedProbe> {
        None
    }
    /// Bytes finished records hold, as JOB_RESULTS_MB counts them (in-process jobs only).
    #[cfg(test)]
    fn finished_bytes(&self) -> usize {
        0
    }
    /// Seconds a refused client should wait, from the recent generation time and the queue.
    fn retry_after_secs(&self) -> u64;
    /// Queues a job: 429 `overloaded` past MAX_QUEUED_JOBS, 503 while shutting down or when the
    /// out-of-memory breaker is open.
    fn submit(&self, spec: JobSpec) -> Result<JobView, ApiError>;
    /// `Err` only when the jobs cannot be reached (QUEUE_URL's Redis is down); `Ok(None)` for an
    /// unknown id. The same for the methods below.
    fn get(&self, id: &str) -> Result<Option<JobView>, ApiError>;
    /// Running and queued jobs in run order, then finished ones, newest first.
    fn list(&self) -> Result<Vec<JobView>, ApiError>;
    /// Asks a job to stop: a queued one ends now, a running one at its next step. Answers the
    /// job as it stands; `None` for an unknown id.
    fn cancel(&self, id: &str, why: StopReason) -> Result<Option<JobView>, ApiError>;
    /// The job now and every event after that moment.
    #[allow(clippy::type_complexity)]
    fn subscribe(
        &self,
        id: &str,
    ) -> Result<Option<(JobView, broadcast::Receiver<JobEvent>)>, ApiError>;
    /// The outcome of a job that has ended; `None` while it has not (or for an unknown id).
    fn finished(&self, id: &str) -> Result<Option<Finished>, ApiError>;
    /// Previews of `id` are made (PREVIEW) only while someone can see them: while the
    /// returned watch lives (an event stream), or for `window` after `ask_previews` (a
    /// poller). `None` for an unknown id.
    fn watch_previews(&self, id: &str) -> Option<PreviewWatch>;
    fn ask_previews(&self, id: &str, window: Duration);
    /// The latest preview made of `id` (step, base64 PNG), for pollers.
    fn latest_preview(&self, id: &str) -> Option<(usize, Arc<String>)> {
        self.get(id).ok().flatten().and_then(|v| v.preview)
    }
    /// The replicas sharing the queue (QUEUE_URL), for /health; `None` for one process.
    fn cluster(&self) -> Option<ClusterHealth> {
        None
    }
    /// Asks the worker(s) to look at LORA_DIR and EMBEDDINGS_DIR now (between jobs, never
    /// during one), reading them again if they changed, or in any case with `force`; `None`
    /// where no worker can be asked.
    fn rescan_adapters(&self, _force: bool) -> Option<RescanTicket> {
        None
    }
    /// The response cache replicas share (QUEUE_URL): `Some(hit or miss)`, `None` when there
    /// is no shared cache (the process's own is used) or it cannot be read now.
    fn shared_cache_get(&self, _key: &str) -> Option<Option<Vec<u8>>> {
        None
    }
    /// Stores in the shared cache; false when there is none.
    fn shared_cache_put(&self, _key: &str, _body: &[u8]) -> bool {
        false
    }
    /// Stops taking work: queued jobs fail now (503), the running one may go on until `grace`
    /// has passed, then it is stopped at its next step.
    fn begin_shutdown(&self, grace: Duration);
    /// Waits up to `bound` for the worker to finish; true if it did.
    fn wait_worker(&self, bound: Duration) -> bool;
}
