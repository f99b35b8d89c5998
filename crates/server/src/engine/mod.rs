//! Admission, queue, the one worker thread, deadlines and cancellation (DESIGN.md §2).
//!
//! - Admission: a semaphore with MAX_CONCURRENT_REQUESTS permits (running + waiting); when none is
//!   left the request gets 429 at once. The permit travels with the job and is released when the
//!   job leaves the engine.
//! - Queue: a bounded `VecDeque` (never longer than the permit count) behind a mutex + condvar;
//!   a request that gives up (deadline, client gone) removes its own job, so it is never started.
//! - Worker: one `std::thread` that loads the model and then owns the generator, so the async
//!   runtime never blocks on model work. Each job answers on its own oneshot channel.
//! - Cancellation: an `AtomicBool` per job, set by the handler's drop guard (deadline passed or
//!   client disconnected), checked in the step hook together with the deadline itself, so the
//!   worker is free within one step.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use sdserve_pipeline::pipeline::GenerationParams;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use candle_core::Device;
use sdserve_pipeline::memory::breaker::BreakerConfig;

use crate::error::{ApiError, TimeoutInfo};
use crate::generator::{Loader, ModelInfo};
use crate::gpu::OomGuard;
use crate::metrics::{Gauges, Metrics};

mod worker;
use worker::worker_main;

#[derive(Debug, Clone, PartialEq)]
pub enum ModelState {
    Loading,
    Ready(ModelInfo),
    Failed(String),
}

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub max_concurrent: usize,
    pub timeout: Duration,
}

/// A finished generation: one PNG per image of the batch, in order.
#[derive(Debug)]
pub struct Outcome {
    pub pngs: Vec<Vec<u8>>,
    pub queue_secs: f64,
    pub gen_secs: f64,
}

#[derive(Debug)]
enum JobError {
    Timeout,
    ShuttingDown,
    Cancelled,
    OutOfMemory,
    Invalid(String),
    Internal(String),
}

/// How far a job got, shared between the worker and the waiting handler (for the 408's details).
#[derive(Debug, Default)]
struct RunProgress {
    started: std::sync::OnceLock<Instant>,
    step: AtomicUsize,
    total: AtomicUsize,
}

impl RunProgress {
    fn timeout_info(&self, limit: Duration, enqueued: Instant) -> TimeoutInfo {
        let now = Instant::now();
        let (queued, running) = match self.started.get() {
            Some(&s) => (s.duration_since(enqueued), now.duration_since(s)),
            None => (now.duration_since(enqueued), Duration::ZERO),
        };
        TimeoutInfo {
            limit_secs: limit.as_secs(),
            queued_secs: queued.as_secs_f64(),
            step: self.step.load(Ordering::SeqCst),
            total: self.total.load(Ordering::SeqCst),
            running_secs: running.as_secs_f64(),
        }
    }
}

struct Job {
    id: u64,
    params: GenerationParams,
    /// The PNG parameters text of each image of the batch.
    png_texts: Vec<String>,
    cancel: Arc<AtomicBool>,
    progress: Arc<RunProgress>,
    deadline: Instant,
    enqueued: Instant,
    reply: oneshot::Sender<Result<Outcome, JobError>>,
    _permit: OwnedSemaphorePermit,
}

struct Queue {
    jobs: VecDeque<Job>,
    shutting_down: bool,
}

struct Inner {
    cfg: EngineConfig,
    semaphore: Arc<Semaphore>,
    queue: Mutex<Queue>,
    wake: Condvar,
    state: RwLock<ModelState>,
    running: AtomicUsize,
    /// Once set, the running job is cancelled at its next step after this instant.
    shutdown_deadline: Mutex<Option<Instant>>,
    /// The out-of-memory circuit breaker: repeated OOMs step the pipeline to a leaner memory
    /// plan, or (with none left) refuse new work for a while.
    oom: OomGuard,
    /// The loaded model's device (for the breaker's free-memory check).
    device: RwLock<Device>,
    /// The memory plan in use (changes when the breaker steps down), for /health.
    memory_plan: RwLock<Option<String>>,
    /// Moving average of generation time, for Retry-After.
    avg_gen_ms: AtomicU64,
    next_id: AtomicU64,
    worker_done: Mutex<bool>,
    worker_done_cv: Condvar,
    metrics: Arc<Metrics>,
}

#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Sets the job's cancel flag and takes it out of the queue when the handler's future ends,
/// whatever the reason (answered, deadline, client disconnected).
struct CancelGuard {
    engine: Arc<Inner>,
    id: u64,
    cancel: Arc<AtomicBool>,
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::SeqCst);
        let removed = {
            let mut q = lock(&self.engine.queue);
            q.jobs
                .iter()
                .position(|j| j.id == self.id)
                .and_then(|pos| q.jobs.remove(pos))
        };
        if removed.is_some() {
            self.engine.oom.release_probe();
            self.engine
                .metrics
                .cancelled
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(job = self.id, "queued job abandoned before it started");
        }
    }
}

impl Engine {
    /// Starts the worker thread, which loads the model first.
    pub fn start(cfg: EngineConfig, loader: Loader, metrics: Arc<Metrics>) -> Self {
        let inner = Arc::new(Inner {
            semaphore: Arc::new(Semaphore::new(cfg.max_concurrent)),
            cfg,
            queue: Mutex::new(Queue {
                jobs: VecDeque::new(),
                shutting_down: false,
            }),
            wake: Condvar::new(),
            state: RwLock::new(ModelState::Loading),
            running: AtomicUsize::new(0),
            shutdown_deadline: Mutex::new(None),
            oom: OomGuard::new(BreakerConfig::default()),
            device: RwLock::new(Device::Cpu),
            memory_plan: RwLock::new(None),
            avg_gen_ms: AtomicU64::new(0),
            next_id: AtomicU64::new(1),
            worker_done: Mutex::new(false),
            worker_done_cv: Condvar::new(),
            metrics,
        });
        let worker = inner.clone();
        std::thread::Builder::new()
            .name("sdserve-worker".into())
            .spawn(move || {
                worker_main(&worker, loader);
                *lock(&worker.worker_done) = true;
                worker.worker_done_cv.notify_all();
            })
            .expect("spawn worker thread");
        Self { inner }
    }

    pub fn state(&self) -> ModelState {
        self.inner
            .state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
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
        Gauges {
            running: self.inner.running.load(Ordering::SeqCst),
            waiting: lock(&self.inner.queue).jobs.len(),
            capacity: self.inner.cfg.max_concurrent,
            model_ready: matches!(self.state(), ModelState::Ready(_)),
            cache: None,
        }
    }

    /// True while the out-of-memory circuit breaker refuses work.
    pub fn oom_breaker_open(&self) -> bool {
        self.inner.oom.is_open()
    }

    /// The memory plan in use, once the model is loaded (`None` for the fake generator).
    pub fn memory_plan(&self) -> Option<String> {
        self.inner
            .memory_plan
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn retry_after_secs(&self) -> u64 {
        let g = self.gauges();
        let avg = self.inner.avg_gen_ms.load(Ordering::Relaxed) as f64 / 1000.0;
        let est = (avg * (g.waiting + g.running).max(1) as f64).ceil() as u64;
        est.clamp(1, self.inner.cfg.timeout.as_secs().max(1))
    }

    /// Admits, queues and waits for one generation. Dropping the returned future (client gone)
    /// cancels the job; the deadline covers queue wait and generation.
    pub async fn submit(
        &self,
        params: GenerationParams,
        png_texts: Vec<String>,
    ) -> Result<Outcome, ApiError> {
        let inner = &self.inner;
        let device = inner
            .device
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Err(retry_after) = inner.oom.admit(&device) {
            let secs = retry_after.as_secs().max(1);
            return Err(ApiError::OutOfMemory {
                detail: format!(
                    "memory circuit breaker open after repeated out-of-memory failures; retry after {secs} s"
                ),
                retry_after_secs: Some(secs),
            });
        }
        let permit = inner.semaphore.clone().try_acquire_owned().map_err(|_| {
            inner.oom.release_probe();
            ApiError::Overloaded {
                retry_after_secs: self.retry_after_secs(),
            }
        })?;
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let cancel = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(RunProgress::default());
        let now = Instant::now();
        let deadline = now + inner.cfg.timeout;
        let (tx, rx) = oneshot::channel();
        let job = Job {
            id,
            params,
            png_texts,
            cancel: cancel.clone(),
            progress: progress.clone(),
            deadline,
            enqueued: now,
            reply: tx,
            _permit: permit,
        };
        {
            let mut q = lock(&inner.queue);
            if q.shutting_down {
                inner.oom.release_probe();
                return Err(ApiError::ModelUnavailable(
                    "the server is shutting down".into(),
                ));
            }
            // Cannot overflow: at most `max_concurrent` permits exist.
            q.jobs.push_back(job);
        }
        inner.wake.notify_one();
        let _guard = CancelGuard {
            engine: inner.clone(),
            id,
            cancel,
        };
        match tokio::time::timeout_at(deadline.into(), rx).await {
            Err(_) => Err(ApiError::Timeout(
                progress.timeout_info(inner.cfg.timeout, now),
            )),
            Ok(Err(_)) => Err(ApiError::Internal("the worker dropped the job".into())),
            Ok(Ok(Ok(outcome))) => Ok(outcome),
            Ok(Ok(Err(e))) => Err(match e {
                JobError::Timeout => {
                    ApiError::Timeout(progress.timeout_info(inner.cfg.timeout, now))
                }
                JobError::ShuttingDown => {
                    ApiError::ModelUnavailable("the server is shutting down".into())
                }
                JobError::Cancelled => ApiError::Internal("the job was cancelled".into()),
                JobError::OutOfMemory => ApiError::OutOfMemory {
                    detail: "the device ran out of memory for this request".into(),
                    retry_after_secs: None,
                },
                JobError::Invalid(m) => ApiError::validation("request", m),
                JobError::Internal(m) => ApiError::Internal(m),
            }),
        }
    }

    /// Stops taking work: queued jobs are answered 503 now, the running one may go on until
    /// `grace` has passed (then it is cancelled at its next step).
    pub fn begin_shutdown(&self, grace: Duration) {
        *lock(&self.inner.shutdown_deadline) = Some(Instant::now() + grace);
        let drained: Vec<Job> = {
            let mut q = lock(&self.inner.queue);
            q.shutting_down = true;
            q.jobs.drain(..).collect()
        };
        self.inner.wake.notify_all();
        let n = drained.len();
        for job in drained {
            let _ = job.reply.send(Err(JobError::ShuttingDown));
        }
        tracing::info!(
            queued_answered_503 = n,
            grace_secs = grace.as_secs_f64(),
            "shutdown: queue drained"
        );
    }

    /// Waits up to `bound` for the worker thread to finish; true if it did.
    pub fn wait_worker(&self, bound: Duration) -> bool {
        let done = lock(&self.inner.worker_done);
        let (done, _) = self
            .inner
            .worker_done_cv
            .wait_timeout_while(done, bound, |d| !*d)
            .unwrap_or_else(|e| e.into_inner());
        *done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generator::FakeSpec;
    use sdserve_pipeline::schedulers::SchedulerKind;

    fn params(steps: usize) -> GenerationParams {
        GenerationParams {
            prompt: "p".into(),
            negative_prompt: String::new(),
            steps,
            width: 256,
            height: 256,
            seed: 1,
            guidance_scale: 7.5,
            scheduler: Some(SchedulerKind::Euler),
            ..Default::default()
        }
    }

    async fn ready(engine: &Engine) {
        while matches!(engine.state(), ModelState::Loading) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn runs_times_out_and_frees_the_worker() {
        let spec: FakeSpec = "step_ms=20".parse().unwrap();
        let cfg = EngineConfig {
            max_concurrent: 2,
            timeout: Duration::from_millis(300),
        };
        let engine = Engine::start(cfg, spec.loader(), Arc::new(Metrics::default()));
        ready(&engine).await;
        let out = engine.submit(params(2), vec!["t".into()]).await.unwrap();
        assert!(out.pngs[0].starts_with(b"\x89PNG"));
        let t = Instant::now();
        let err = engine
            .submit(params(1000), vec!["t".into()])
            .await
            .unwrap_err();
        assert!(matches!(err, ApiError::Timeout(_)), "{err:?}");
        assert!(t.elapsed() < Duration::from_millis(450));
        // The worker stops within one step, so the next short job finishes well within the deadline.
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert_eq!(engine.gauges().running, 0);
        engine.submit(params(2), vec!["t".into()]).await.unwrap();
    }

    #[tokio::test]
    async fn overload_and_failed_load() {
        let spec: FakeSpec = "step_ms=20".parse().unwrap();
        let cfg = EngineConfig {
            max_concurrent: 1,
            timeout: Duration::from_secs(5),
        };
        let engine = Engine::start(cfg, spec.loader(), Arc::new(Metrics::default()));
        ready(&engine).await;
        let e2 = engine.clone();
        let first = tokio::spawn(async move { e2.submit(params(10), vec!["t".into()]).await });
        tokio::time::sleep(Duration::from_millis(30)).await;
        let err = engine
            .submit(params(1), vec!["t".into()])
            .await
            .unwrap_err();
        assert!(matches!(err, ApiError::Overloaded { .. }), "{err:?}");
        first.await.unwrap().unwrap();

        let spec: FakeSpec = "fail_load=no weights".parse().unwrap();
        let cfg = EngineConfig {
            max_concurrent: 1,
            timeout: Duration::from_secs(5),
        };
        let engine = Engine::start(cfg, spec.loader(), Arc::new(Metrics::default()));
        assert!(engine.wait_worker(Duration::from_secs(5)));
        assert_eq!(engine.state(), ModelState::Failed("no weights".into()));
        assert!(matches!(
            engine.model_info(),
            Err(ApiError::ModelUnavailable(_))
        ));
    }
}
