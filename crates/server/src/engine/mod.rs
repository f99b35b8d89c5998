//! The job life cycle (README "Jobs"): one queue, one worker path, for every route.
//!
//! - `JobBackend` is the engine's one seam: the in-process backend (`local.rs`: records and queue
//!   behind a mutex, the worker thread in `worker.rs`) implements it; a Redis backend (issue 16)
//!   will too. `Engine` wraps a backend with what every route shares.
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
use crate::generator::{Loader, ModelInfo};
use crate::metrics::{Gauges, Metrics};

mod cluster;
pub mod job;
mod local;
mod worker;

pub use cluster::{ClusterConfig, ClusterHealth, Role, WorkerHealth};
pub use job::{Finished, JobEvent, JobSpec, JobStatus, JobView, StopReason};

#[derive(Debug, Clone, PartialEq)]
pub enum ModelState {
    Loading,
    Ready(ModelInfo),
    Failed(String),
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
}

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
        }
    }
}

/// Where jobs live and run. Every method answers at once; waiting is done on the event
/// channel `subscribe` hands out.
pub trait JobBackend: Send + Sync {
    fn model_state(&self) -> ModelState;
    fn gauges(&self) -> Gauges;
    fn oom_breaker_open(&self) -> bool;
    fn memory_plan(&self) -> Option<String>;
    /// What the CPU speed probe of this process's worker measured, once it has.
    fn speed(&self) -> Option<crate::speed::SpeedProbe> {
        None
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
    /// The replicas sharing the queue (QUEUE_URL), for /health; `None` for one process.
    fn cluster(&self) -> Option<ClusterHealth> {
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
    pub fn start(cfg: EngineConfig, loader: Loader, metrics: Arc<Metrics>) -> Self {
        let backend = Arc::new(local::Local::start(cfg.clone(), loader, metrics));
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
        metrics: Arc<Metrics>,
    ) -> Result<Self, String> {
        let local = match (cluster.role.runs_jobs(), loader) {
            (true, Some(loader)) => {
                // One job at a time, taken from Redis only when idle; its records are only
                // read until the job's end is written to Redis.
                let local_cfg = EngineConfig {
                    max_queued: 4,
                    job_ttl: Duration::from_secs(60),
                    ..cfg.clone()
                };
                Some(Arc::new(local::Local::start(local_cfg, loader, metrics)))
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

    pub fn gauges(&self) -> Gauges {
        self.backend.gauges()
    }

    /// True while the out-of-memory circuit breaker refuses work.
    pub fn oom_breaker_open(&self) -> bool {
        self.backend.oom_breaker_open()
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
        let timeout = spec.timeout;
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
            .ok_or_else(|| ApiError::Internal("the job ended without a record".into()))?;
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
mod tests {
    use super::*;
    use crate::generator::FakeSpec;
    use sdserve_pipeline::pipeline::GenerationParams;
    use sdserve_pipeline::schedulers::SchedulerKind;

    fn spec(steps: usize, timeout: Duration) -> JobSpec {
        JobSpec {
            params: GenerationParams {
                prompt: "p".into(),
                negative_prompt: String::new(),
                steps,
                width: 256,
                height: 256,
                seed: 1,
                guidance_scale: 7.5,
                scheduler: Some(SchedulerKind::Euler),
                ..Default::default()
            },
            request: serde_json::json!({}),
            png_texts: vec!["t".into()],
            model_version: "fake@0".into(),
            timeout,
        }
    }

    async fn ready(engine: &Engine) {
        while matches!(engine.state(), ModelState::Loading) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn png_of(f: &Finished) -> Vec<u8> {
        use base64::Engine as _;
        let r = f.result.as_ref().unwrap();
        base64::engine::general_purpose::STANDARD
            .decode(&r.image_base64)
            .unwrap()
    }

    #[tokio::test]
    async fn runs_times_out_and_frees_the_worker() {
        const STEP: Duration = Duration::from_millis(20);
        let s: FakeSpec = "step_ms=20".parse().unwrap();
        let timeout = Duration::from_millis(300);
        let engine = Engine::start(
            EngineConfig::new(2, timeout),
            s.loader(),
            Arc::new(Metrics::default()),
        );
        ready(&engine).await;
        let out = engine.run(spec(2, timeout), |_| {}).await.unwrap();
        assert!(png_of(&out).starts_with(b"\x89PNG"));
        let id = std::sync::Mutex::new(String::new());
        let t = Instant::now();
        let err = engine
            .run(spec(1000, timeout), |i| *id.lock().unwrap() = i.to_string())
            .await
            .unwrap_err();
        let took = t.elapsed();
        let ApiError::Timeout(info) = &err else {
            panic!("{err:?}")
        };
        // Answered at the deadline: not before it, and late by no more than a few steps at the
        // speed the steps ran (under load both the steps and this waiter's timer run late).
        let step = Duration::from_secs_f64(info.running_secs / info.step.max(1) as f64).max(STEP);
        assert!(
            took >= timeout && took < timeout + 4 * step,
            "{took:?}, steps of {step:?}: {info:?}"
        );
        // The worker stops within a step or two of the deadline. Each fake step sleeps at least
        // STEP, so at most timeout / STEP steps fit before it; a late stop would let more run.
        let id = id.into_inner().unwrap();
        let waiting = Instant::now();
        while !engine.job(&id).unwrap().status.is_final() {
            assert!(waiting.elapsed() < Duration::from_secs(30), "never stopped");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let ran = engine.job(&id).unwrap().progress.step;
        let fit = (timeout.as_millis() / STEP.as_millis()) as usize;
        assert!(
            (info.step..=fit + 2).contains(&ran),
            "ran {ran}, heard {}",
            info.step
        );
        // The worker is free: the next short job runs.
        assert_eq!(engine.gauges().running, 0);
        engine.run(spec(2, timeout), |_| {}).await.unwrap();
    }

    #[tokio::test]
    async fn overload_and_failed_load() {
        let s: FakeSpec = "step_ms=20".parse().unwrap();
        let timeout = Duration::from_secs(5);
        let engine = Engine::start(
            EngineConfig::new(1, timeout),
            s.loader(),
            Arc::new(Metrics::default()),
        );
        ready(&engine).await;
        let e2 = engine.clone();
        let first = tokio::spawn(async move { e2.run(spec(10, timeout), |_| {}).await });
        tokio::time::sleep(Duration::from_millis(30)).await;
        let err = engine.run(spec(1, timeout), |_| {}).await.unwrap_err();
        assert!(matches!(err, ApiError::Overloaded { .. }), "{err:?}");
        first.await.unwrap().unwrap();

        let s: FakeSpec = "fail_load=no weights".parse().unwrap();
        let engine = Engine::start(
            EngineConfig::new(1, timeout),
            s.loader(),
            Arc::new(Metrics::default()),
        );
        assert!(engine.wait_worker(Duration::from_secs(5)));
        assert_eq!(engine.state(), ModelState::Failed("no weights".into()));
        assert!(matches!(
            engine.model_info(),
            Err(ApiError::ModelUnavailable(_))
        ));
    }

    /// The bytes a finished record of `spec(steps, _)` holds: its result's base64, twice.
    fn result_bytes(f: &Finished) -> usize {
        let r = f.result.as_ref().unwrap();
        r.image_base64.len() + r.images.iter().map(String::len).sum::<usize>()
    }

    #[tokio::test]
    async fn finished_jobs_past_the_results_budget_are_dropped_oldest_first() {
        // 1 ms steps: the long job below runs for minutes unless cancelled.
        let s: FakeSpec = "step_ms=1".parse().unwrap();
        let timeout = Duration::from_secs(30);
        // Every job here is the same request: its result has the same size.
        let probe = Engine::start(
            EngineConfig::new(1, timeout),
            s.clone().loader(),
            Arc::new(Metrics::default()),
        );
        ready(&probe).await;
        let one = result_bytes(&probe.run(spec(1, timeout), |_| {}).await.unwrap());
        let mut cfg = EngineConfig::new(1, timeout);
        cfg.job_results_bytes = 3 * one + one / 2;
        let metrics = Arc::new(Metrics::default());
        let engine = Engine::start(cfg, s.loader(), metrics.clone());
        ready(&engine).await;
        let finished_ids = |engine: &Engine| -> Vec<String> {
            let jobs = engine.jobs().unwrap();
            jobs.into_iter()
                .filter(|j| j.status.is_final())
                .map(|j| j.id)
                .collect()
        };
        let mut ids = Vec::new();
        for _ in 0..5 {
            let view = engine.submit(spec(1, timeout)).unwrap();
            let (_, mut rx) = engine.subscribe(&view.id).unwrap();
            while !rx.recv().await.unwrap().is_final() {}
            drop(rx);
            ids.push(view.id);
        }
        // A running and a waiting job are never dropped, however full the budget.
        let long = Duration::from_secs(60);
        let running = engine.submit(spec(100_000, long)).unwrap();
        while engine.job(&running.id).unwrap().status != JobStatus::Running {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let waiting = engine.submit(spec(1, long)).unwrap();
        // Three results fit: the two oldest went, oldest first, counted; 404 as if expired.
        for id in &ids[..2] {
            assert!(
                matches!(engine.job(id), Err(ApiError::JobNotFound(_))),
                "{id}"
            );
        }
        let mut newest: Vec<String> = ids[2..].to_vec();
        newest.reverse();
        assert_eq!(finished_ids(&engine), newest);
        assert_eq!(metrics.jobs_evicted.get(), 2);
        assert_eq!(engine.job(&running.id).unwrap().status, JobStatus::Running);
        assert_eq!(engine.job(&waiting.id).unwrap().status, JobStatus::Queued);
        engine.cancel(&waiting.id).unwrap();
        engine.cancel(&running.id).unwrap();
        while !engine.job(&running.id).unwrap().status.is_final() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // A record someone follows stays until they let go; the next oldest goes instead.
        let (_, followed) = engine.subscribe(&ids[2]).unwrap();
        let out = engine.run(spec(1, timeout), |_| {}).await.unwrap();
        assert_eq!(result_bytes(&out), one);
        assert!(engine.job(&ids[2]).is_ok());
        assert!(matches!(engine.job(&ids[3]), Err(ApiError::JobNotFound(_))));
        drop(followed);
        engine.run(spec(1, timeout), |_| {}).await.unwrap();
        assert!(matches!(engine.job(&ids[2]), Err(ApiError::JobNotFound(_))));
        assert_eq!(metrics.jobs_evicted.get(), 4);
    }

    #[tokio::test]
    async fn queue_limit_positions_cancel_and_ttl() {
        let s: FakeSpec = "step_ms=10".parse().unwrap();
        let mut cfg = EngineConfig::new(1, Duration::from_secs(5));
        cfg.max_queued = 2;
        cfg.job_ttl = Duration::from_millis(300);
        let engine = Engine::start(cfg, s.loader(), Arc::new(Metrics::default()));
        ready(&engine).await;
        let long = Duration::from_secs(30);
        let a = engine.submit(spec(1000, long)).unwrap();
        // Wait until `a` runs, so the two below are the waiting ones.
        while engine.job(&a.id).unwrap().status != JobStatus::Running {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let b = engine.submit(spec(3, long)).unwrap();
        let c = engine.submit(spec(3, long)).unwrap();
        assert_eq!((b.position, c.position), (Some(1), Some(2)));
        let full = engine.submit(spec(3, long)).unwrap_err();
        assert!(matches!(full, ApiError::Overloaded { .. }), "{full:?}");
        // Cancelling the queued `b` moves `c` up; `b` never runs.
        let (_, mut rx) = engine.subscribe(&c.id).unwrap();
        let bv = engine.cancel(&b.id).unwrap();
        assert_eq!(bv.status, JobStatus::Cancelled);
        assert!(bv.cancel_requested && bv.started_at.is_none());
        assert!(matches!(
            rx.recv().await.unwrap(),
            JobEvent::Queued { position: 1 }
        ));
        let before = engine.job(&a.id).unwrap().progress.step;
        engine.cancel(&a.id).unwrap();
        let fin = loop {
            if let Some(f) = engine.backend.finished(&a.id).unwrap() {
                break f;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        assert!(fin.result.is_err());
        assert_eq!(engine.job(&a.id).unwrap().status, JobStatus::Cancelled);
        // It stopped at once: at most the step in flight and one racing the cancel ran on.
        let ran = engine.job(&a.id).unwrap().progress.step;
        assert!((before..=before + 2).contains(&ran), "{before} -> {ran}");
        while !engine.job(&c.id).unwrap().status.is_final() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(engine.job(&c.id).unwrap().status, JobStatus::Succeeded);
        assert_eq!(engine.job(&b.id).unwrap().progress.step, 0);
        // Past the TTL every finished job is gone (the reaper looks every REAP_EVERY; under
        // load its thread runs late, so wait for it rather than a fixed time).
        let waiting = Instant::now();
        while engine.job(&c.id).is_ok() {
            assert!(waiting.elapsed() < Duration::from_secs(30), "never expired");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(matches!(engine.job(&c.id), Err(ApiError::JobNotFound(_))));
        assert!(engine.jobs().unwrap().is_empty());
    }
}
