//! The job life cycle (README "Jobs"): one queue, one worker path, for every route.
//!
//! - `JobBackend` (`backend.rs`) is the engine's one seam: the in-process backend (`local.rs`:
//!   records and queue behind a mutex, the worker thread in `worker.rs`) and the Redis-shared one
//!   (`cluster/`, QUEUE_URL) implement it. `Engine` wraps a backend with what every route shares.
//! - `POST /jobs` submits and answers at once; `/generate` is a job whose client waits
//!   (`Engine::run`): same queue, same worker, same cancellation, with its own deadline
//!   (GENERATION_TIMEOUT_SECONDS) and admission (MAX_CONCURRENT_REQUESTS waiting clients).
//! - MAX_QUEUED_JOBS bounds the waiting jobs of every route (429 past it); finished jobs are
//!   kept JOB_TTL_SECONDS, the oldest dropped earlier when they hold more than JOB_RESULTS_MB.
//! - Cancellation: a stop flag per job, read by the step hook, so a running job stops within one
//!   step; a queued job is taken out of the queue and never starts.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, Semaphore};

use crate::error::{ApiError, TimeoutInfo};
use crate::generator::{Loader, ModelInfo, Switcher};
use crate::metrics::{Gauges, Metrics};

mod backend;
mod cluster;
pub mod job;
mod local;
mod record;
mod switch;
mod table;
mod worker;

pub use backend::{JobBackend, ModelAskTicket, RescanTicket};
pub use cluster::{ClusterConfig, ClusterHealth, Role, WorkerHealth};
pub use job::{Finished, JobEvent, JobSpec, JobStatus, JobView, StopReason};
pub use switch::ModelAsk;

/// Where this process's worker stands with its model, beyond which one it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelHold {
    /// Unloaded (`unload-checkpoint`): the next job, or `reload-checkpoint`, loads it again.
    Unloaded,
    /// `reload-checkpoint` is loading it.
    Reloading,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ModelState {
    Loading,
    Ready(ModelInfo),
    Failed(String),
}

/// The model a worker holds (one at a time).
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedModel {
    /// Its MODELS_DIR name; `None`: the default model (`--model`).
    pub name: Option<String>,
    pub model_version: String,
}

/// `PREVIEW`: what a `preview` event shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PreviewMode {
    /// No previews.
    Off,
    /// A fixed linear map from the 4 latent channels to RGB, at 1/8 of the image size.
    Latent,
    /// The tiny autoencoder TAESD (`PREVIEW_TAESD`) at the full image size; latent previews
    /// when it could not be loaded (logged at start-up).
    Taesd,
}

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// MAX_CONCURRENT_REQUESTS: `/generate` clients waiting at once.
    pub max_concurrent: usize,
    /// GENERATION_TIMEOUT_SECONDS: a `/generate` job's deadline, queue wait included.
    pub timeout: Duration,
    /// JOB_TIMEOUT_SECONDS: a `/jobs` job's deadline, queue wait included.
    pub job_timeout: Duration,
    /// MAX_QUEUED_JOBS: waiting jobs of every route.
    pub max_queued: usize,
    /// JOB_TTL_SECONDS: how long a finished job stays visible.
    pub job_ttl: Duration,
    /// JOB_RESULTS_MB in bytes: what finished jobs may hold (results, request images) before
    /// the oldest are dropped early.
    pub job_results_bytes: usize,
    pub preview: PreviewMode,
    /// PREVIEW_EVERY: a preview every this many steps (and at the last).
    pub preview_every: usize,
    /// How long a run may go on past its job's deadline (its last step and decode) before the
    /// job is ended `failed` (`timeout`) without it: the run is stuck (a device call that
    /// never returns), and its clients should not wait for it.
    pub stuck_grace: Duration,
}

/// Keeps a job's previews wanted while it lives (an event stream that shows them).
pub type PreviewWatch = Box<dyn Send>;

/// How long a poller's ask for the latest preview (A1111 `current_image`) keeps previews
/// being made: a few of its polls.
pub const PREVIEW_ASK_WINDOW: Duration = Duration::from_secs(5);

/// `EngineConfig::stuck_grace` by default (STUCK_GRACE_SECONDS).
#[cfg(test)]
pub const STUCK_GRACE: Duration = Duration::from_secs(60);

#[cfg(test)]
impl EngineConfig {
    /// Defaults of the CLI for everything but the two limits tests vary most.
    pub fn new(max_concurrent: usize, timeout: Duration) -> Self {
        Self {
            max_concurrent,
            timeout,
            job_timeout: Duration::from_secs(600),
            max_queued: 64,
            job_ttl: Duration::from_secs(600),
            job_results_bytes: 256 << 20,
            preview: PreviewMode::Off,
            preview_every: 5,
            stuck_grace: STUCK_GRACE,
        }
    }
}

#[derive(Clone)]
pub struct Engine {
    backend: Arc<dyn JobBackend>,
    /// MAX_CONCURRENT_REQUESTS permits for clients that wait (`/generate`).
    waiters: Arc<Semaphore>,
    cfg: EngineConfig,
}

/// Cancels the job when the waiting client's future ends early (deadline, client gone).
struct CancelOnDrop {
    backend: Arc<dyn JobBackend>,
    id: String,
    armed: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.backend.cancel(&self.id, StopReason::Cancelled);
        }
    }
}

fn not_found(id: &str) -> ApiError {
    ApiError::JobNotFound(format!(
        "no job {id:?}; finished jobs are kept for JOB_TTL_SECONDS (the oldest for less when their results pass JOB_RESULTS_MB)"
    ))
}

impl Engine {
    /// The in-process engine: starts the worker thread, which loads the model first.
    #[cfg(test)]
    pub fn start(cfg: EngineConfig, loader: Loader, metrics: Arc<Metrics>) -> Self {
        Self::start_switching(cfg, loader, None, metrics)
    }

    /// `start`, with `switcher` loading the model a job names (MODELS_DIR) in place of the
    /// loaded one.
    pub fn start_switching(
        cfg: EngineConfig,
        loader: Loader,
        switcher: Option<Switcher>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let backend = Arc::new(local::Local::start(cfg.clone(), loader, switcher, metrics));
        Self {
            backend,
            waiters: Arc::new(Semaphore::new(cfg.max_concurrent)),
            cfg,
        }
    }

    /// Replicas sharing jobs through Redis (QUEUE_URL): the API side reads and writes jobs in
    /// Redis; with a role that runs jobs, the in-process engine runs the jobs this process
    /// takes from the queue (`loader` must then be set).
    pub fn start_cluster(
        cfg: EngineConfig,
        cluster: ClusterConfig,
        loader: Option<Loader>,
        switcher: Option<Switcher>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, String> {
        let local = match (cluster.role.runs_jobs(), loader) {
            (true, Some(loader)) => {
                // One job at a time, taken from Redis only when idle; its records are only
                // read until the job's end is written to Redis.
                let local_cfg = EngineConfig {
                    max_queued: 4,
                    job_ttl: Duration::from_secs(60),
                    // The cluster's worker gives up first (two leases past the deadline) and
                    // says so in its heartbeat.
                    stuck_grace: cluster.lease * 4,
                    ..cfg.clone()
                };
                Some(Arc::new(local::Local::start(
                    local_cfg, loader, switcher, metrics,
                )))
            }
            (true, None) => return Err("a worker needs a model loader".into()),
            (false, _) => None,
        };
        let backend = Arc::new(cluster::Cluster::start(cfg.clone(), cluster, local)?);
        Ok(Self {
            backend,
            waiters: Arc::new(Semaphore::new(cfg.max_concurrent)),
            cfg,
        })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    pub fn state(&self) -> ModelState {
        self.backend.model_state()
    }

    /// The model's description, or 503 while it loads or after it failed.
    pub fn model_info(&self) -> Result<ModelInfo, ApiError> {
        match self.state() {
            ModelState::Ready(info) => Ok(info),
            ModelState::Loading => Err(ApiError::ModelUnavailable(
                "the model is still loading".into(),
            )),
            ModelState::Failed(why) => Err(ApiError::ModelUnavailable(format!(
                "the model failed to load: {why}"
            ))),
        }
    }

    #[cfg(test)]
    pub(crate) fn finished_bytes(&self) -> usize {
        self.backend.finished_bytes()
    }

    pub fn gauges(&self) -> Gauges {
        self.backend.gauges()
    }

    /// Why /health says `degraded` (the model is ready, but jobs may not run): the
    /// out-of-memory circuit breaker is open, this process's run is stuck, or every worker in
    /// `cluster` (QUEUE_URL; what `cluster()` answered) is `stuck`, or it has none. `None`: `ok`.
    pub fn degraded(&self, cluster: Option<&ClusterHealth>) -> Option<String> {
        if self.backend.oom_breaker_open() {
            return Some("out-of-memory circuit breaker open".into());
        }
        if let Some(why) = self.backend.stuck_run() {
            return Some(why);
        }
        let workers = &cluster?.workers;
        if workers.is_empty() {
            return Some(
                "no worker has sent a heartbeat within JOB_LEASE_SECONDS: jobs wait in the queue \
                 until one does"
                    .into(),
            );
        }
        workers.iter().all(|w| w.state == "stuck").then(|| {
            format!(
                "every worker is stuck ({}): each has a run past its job's deadline that has not \
                 returned, and takes no job until it does",
                workers.len()
            )
        })
    }

    /// Since when this process's own run has been stuck without returning (STUCK_EXIT_SECONDS).
    pub fn stuck_since(&self) -> Option<Instant> {
        self.backend.stuck_since()
    }

    /// The model this process's worker holds now (see `JobBackend::loaded_model`).
    pub fn loaded_model(&self) -> Option<LoadedModel> {
        self.backend.loaded_model()
    }

    /// The memory plan in use, once the model is loaded (`None` for the fake generator).
    pub fn memory_plan(&self) -> Option<String> {
        self.backend.memory_plan()
    }

    /// Queues a job and answers at once (`POST /jobs`).
    pub fn submit(&self, spec: JobSpec) -> Result<JobView, ApiError> {
        self.backend.submit(spec)
    }

    pub fn job(&self, id: &str) -> Result<JobView, ApiError> {
        self.backend.get(id)?.ok_or_else(|| not_found(id))
    }

    pub fn jobs(&self) -> Result<Vec<JobView>, ApiError> {
        self.backend.list()
    }

    /// The replicas sharing the queue (QUEUE_URL), for /health; `None` for one process.
    pub fn cluster(&self) -> Option<ClusterHealth> {
        self.backend.cluster()
    }

    /// A cached response from the cache replicas share (see `JobBackend::shared_cache_get`).
    pub fn shared_cache_get(&self, key: &str) -> Option<Option<Vec<u8>>> {
        self.backend.shared_cache_get(key)
    }

    pub fn shared_cache_put(&self, key: &str, body: &[u8]) -> bool {
        self.backend.shared_cache_put(key, body)
    }

    /// `DELETE /jobs/{id}`.
    pub fn cancel(&self, id: &str) -> Result<JobView, ApiError> {
        self.backend
            .cancel(id, StopReason::Cancelled)?
            .ok_or_else(|| not_found(id))
    }

    pub fn subscribe(
        &self,
        id: &str,
    ) -> Result<(JobView, broadcast::Receiver<JobEvent>), ApiError> {
        self.backend.subscribe(id)?.ok_or_else(|| not_found(id))
    }

    /// Has the worker(s) read LORA_DIR and EMBEDDINGS_DIR again now (after the running job, if
    /// any) and answers the model's description as it then stands; 503 when that took longer
    /// than `within`.
    pub async fn rescan_adapters(
        &self,
        force: bool,
        within: Duration,
    ) -> Result<ModelInfo, ApiError> {
        self.model_info()?;
        if let Some(mut ticket) = self.backend.rescan_adapters(force) {
            let target = ticket.target;
            let waited = tokio::time::timeout(within, ticket.done.wait_for(|d| *d >= target)).await;
            if !matches!(waited, Ok(Ok(_))) {
                return Err(ApiError::ModelUnavailable(format!(
                    "the LoRA and embedding folders were not read again within {} s (the worker reads them between jobs); they will be",
                    within.as_secs()
                )));
            }
        }
        self.model_info()
    }

    /// Has this process's worker unload or reload its model (A1111's `unload-checkpoint`,
    /// `reload-checkpoint`) after the running job, if any; 503 when this process runs no jobs
    /// (an API replica), when the worker cannot load its model again, or when it did not get
    /// to it within `within`. Then the ask is withdrawn (a worker that takes it later drops
    /// it), unless the worker already took it: a load under way goes on, and the 503 says so.
    pub async fn ask_model(&self, ask: ModelAsk, within: Duration) -> Result<(), ApiError> {
        self.model_info()?;
        let Some(ticket) = self.backend.ask_model(ask.clone()) else {
            return Err(ApiError::ModelUnavailable(
                "this process runs no jobs (--role api), so it holds no model: send this to a worker replica (--role worker or all), whose model it acts on".into(),
            ));
        };
        // The ticket is dropped with the timeout's future at the end of this statement: from
        // then on a worker that takes the ask drops it undone.
        let answer = tokio::time::timeout(within, ticket).await;
        match answer {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(ApiError::ModelUnavailable(
                "the worker stopped before it got to it".into(),
            )),
            Err(_) if self.backend.model_hold() == Some(ModelHold::Reloading) => {
                Err(ApiError::ModelUnavailable(format!(
                    "the model did not finish loading within {} s; the load goes on: GET /health \
                     says when it is ready (`loaded_model`)",
                    within.as_secs()
                )))
            }
            Err(_) => Err(ApiError::ModelUnavailable(format!(
                "the worker did not get to it within {} s (it does between jobs, after the \
                 running one): it is withdrawn, the worker drops it when it gets to it; GET \
                 /health says which model the worker holds (`loaded_model`)",
                within.as_secs()
            ))),
        }
    }

    /// Where this process's worker stands with its model when it is unloaded or reloading.
    pub fn model_hold(&self) -> Option<ModelHold> {
        self.backend.model_hold()
    }

    /// Keeps `id`'s previews made while the watch lives (see `JobBackend::watch_previews`).
    pub fn watch_previews(&self, id: &str) -> Option<PreviewWatch> {
        self.backend.watch_previews(id)
    }

    /// A poller shows `id`'s latest preview: previews are made for a while.
    pub fn ask_previews(&self, id: &str) {
        self.backend.ask_previews(id, PREVIEW_ASK_WINDOW)
    }

    /// The latest preview made of `id` (step, base64 PNG), if any.
    pub fn latest_preview(&self, id: &str) -> Option<(usize, Arc<String>)> {
        self.backend.latest_preview(id)
    }

    /// The running job, if any (for dialects that report "the" progress, like A1111's).
    #[allow(dead_code)] // for the A1111 dialect
    pub fn current(&self) -> Option<JobView> {
        self.backend
            .list()
            .unwrap_or_default()
            .into_iter()
            .find(|j| j.status == JobStatus::Running)
    }

    /// Runs a job for a client that waits (`/generate`): admitted against
    /// MAX_CONCURRENT_REQUESTS, answered when it ends or at its deadline. Dropping the future
    /// (client gone) cancels the job. The job's id goes to `queued` as soon as it is queued, so
    /// that a caller can follow it (A1111's `progress`) or cancel exactly it (`interrupt`).
    pub async fn run(
        &self,
        spec: JobSpec,
        queued: impl FnOnce(&str) + Send,
    ) -> Result<Finished, ApiError> {
        let _permit =
            self.waiters
                .clone()
                .try_acquire_owned()
                .map_err(|_| ApiError::Overloaded {
                    retry_after_secs: self.backend.retry_after_secs(),
                })?;
        let (timeout, setting) = (spec.timeout, spec.timeout_setting);
        let alone_secs = self
            .backend
            .speed()
            .map(|p| p.estimate_request_secs(&spec.params));
        let enqueued = Instant::now();
        let deadline = enqueued + timeout;
        let view = self.backend.submit(spec)?;
        queued(&view.id);
        let mut guard = CancelOnDrop {
            backend: self.backend.clone(),
            id: view.id.clone(),
            armed: true,
        };
        let (now, mut rx) = self.subscribe(&view.id)?;
        let mut ended = now.status.is_final();
        // How far it got, from its own events, for the 408's details.
        // A job that started before this subscription began has no `started` event to come:
        // it left the queue at once.
        let mut started = (now.status != JobStatus::Queued).then_some(enqueued);
        let mut progress = now.progress;
        while !ended {
            match tokio::time::timeout_at(deadline.into(), rx.recv()).await {
                Ok(Ok(event)) => {
                    match &event {
                        JobEvent::Started => started = Some(Instant::now()),
                        JobEvent::Progress(p) => progress = *p,
                        _ => {}
                    }
                    ended = event.is_final()
                }
                Ok(Err(broadcast::error::RecvError::Lagged(_))) => {
                    ended = matches!(self.backend.finished(&view.id), Ok(Some(_)))
                }
                Ok(Err(broadcast::error::RecvError::Closed)) => ended = true,
                Err(_) => {
                    // The worker stops it at its next step; the client hears now.
                    let _ = self.backend.cancel(&view.id, StopReason::Timeout);
                    guard.armed = false;
                    let at = Instant::now();
                    let started_at = started.unwrap_or(at);
                    return Err(ApiError::Timeout(TimeoutInfo {
                        limit_secs: timeout.as_secs(),
                        setting,
                        queued_secs: started_at.duration_since(enqueued).as_secs_f64(),
                        step: if started.is_some() { progress.step } else { 0 },
                        total: if started.is_some() { progress.total } else { 0 },
                        running_secs: at.duration_since(started_at).as_secs_f64(),
                        alone_secs,
                    }));
                }
            }
        }
        guard.armed = false;
        let finished = self
            .backend
            .finished(&view.id)?
            // Only a cluster's record can go before its end is read (expired, evicted).
            .ok_or_else(cluster::record_gone)?;
        // The worker may see the deadline before this waiter's timer does: the same 408.
        if let Err(e) = &finished.result {
            return Err(e.clone());
        }
        Ok(finished)
    }

    pub fn begin_shutdown(&self, grace: Duration) {
        self.backend.begin_shutdown(grace)
    }

    pub fn wait_worker(&self, bound: Duration) -> bool {
        self.backend.wait_worker(bound)
    }
}

#[cfg(test)]
mod tests;
