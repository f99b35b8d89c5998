//! The in-process backend: job records and the queue behind one mutex, one worker thread that
//! owns the generator (worker.rs), and a reaper thread for deadlines of queued jobs and TTLs.
//!
//! Every state change happens under the mutex and sends its event on the job's broadcast
//! channel while still holding it, so a subscriber that takes a snapshot under the same lock
//! sees each change exactly once: either in the snapshot or as an event after it.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, Weak};
use std::time::{Duration, Instant, SystemTime};

use candle_core::Device;
use sdserve_pipeline::memory::breaker::BreakerConfig;
use tokio::sync::broadcast;

use super::job::{
    new_id, Finished, JobEvent, JobProgress, JobSpec, JobStatus, JobView, StopReason,
};
use super::record::{Record, WatcherCount, EVENT_BUFFER};
use super::table::{outcome_of, Jobs};
use super::{EngineConfig, JobBackend, ModelState, PreviewWatch};
use crate::error::{ApiError, TimeoutInfo};
use crate::generator::{Loader, Switcher};
use crate::gpu::OomGuard;
use crate::metrics::{Gauges, Metrics};
use crate::speed::SpeedProbe;

/// How often the reaper looks for queued jobs past their deadline and expired records.
const REAP_EVERY: Duration = Duration::from_millis(100);

pub(super) struct Inner {
    pub cfg: EngineConfig,
    pub jobs: Mutex<Jobs>,
    pub wake: Condvar,
    pub state: RwLock<ModelState>,
    /// Once set, the running job is stopped at its next step after this instant.
    pub shutdown_deadline: Mutex<Option<Instant>>,
    /// The out-of-memory circuit breaker: repeated OOMs step the pipeline to a leaner memory
    /// plan, or (with none left) refuse new work for a while.
    pub oom: OomGuard,
    /// The loaded model's device (for the breaker's free-memory check).
    pub device: RwLock<Device>,
    /// The memory plan in use (changes when the breaker steps down), for /health.
    pub memory_plan: RwLock<Option<String>>,
    /// The model the worker holds (MODELS_DIR switches it per job).
    pub loaded: RwLock<Option<super::LoadedModel>>,
    /// Moving average of generation time, for Retry-After.
    pub avg_gen_ms: AtomicU64,
    /// Reads of LORA_DIR/EMBEDDINGS_DIR asked of the worker.
    pub rescans: super::worker::Rescans,
    /// The worker holds no model since `unload-checkpoint` (until a job or a reload loads one).
    pub unloaded: AtomicBool,
    /// `reload-checkpoint` is loading a model now.
    pub reloading: AtomicBool,
    next_seq: AtomicU64,
    worker_done: Mutex<bool>,
    worker_done_cv: Condvar,
    pub metrics: Arc<Metrics>,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Inner {
    pub fn jobs(&self) -> MutexGuard<'_, Jobs> {
        lock(&self.jobs)
    }
}

pub(super) struct Local {
    inner: Arc<Inner>,
}

impl Local {
    /// Queues a job and, with `follow`, subscribes to its events in the same step: the cluster
    /// worker relays every event of the job it runs (a subscription made after `submit` could
    /// miss the first ones, a model switch's `loading`, when the worker thread starts at once).
    pub fn submit_followed(
        &self,
        spec: JobSpec,
    ) -> Result<(JobView, broadcast::Receiver<JobEvent>), ApiError> {
        let (view, rx) = self.enqueue(spec, true)?;
        Ok((view, rx.expect("a followed job has an event channel")))
    }

    fn enqueue(
        &self,
        spec: JobSpec,
        follow: bool,
    ) -> Result<(JobView, Option<broadcast::Receiver<JobEvent>>), ApiError> {
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
        let retry_after_secs = self.retry_after_secs();
        let mut jobs = inner.jobs();
        if jobs.shutting_down {
            inner.oom.release_probe();
            return Err(ApiError::ModelUnavailable(
                "the server is shutting down".into(),
            ));
        }
        if jobs.queue.len() >= inner.cfg.max_queued {
            inner.oom.release_probe();
            return Err(ApiError::Overloaded { retry_after_secs });
        }
        let seq = inner.next_seq.fetch_add(1, Ordering::Relaxed);
        let id = new_id(seq);
        let now = Instant::now();
        // Both passes of a hires request, as the pipeline counts them.
        let total = spec.progress_total;
        let record = Record {
            id: id.clone(),
            seq,
            deadline: now + spec.timeout,
            spec: Arc::new(spec),
            status: JobStatus::Queued,
            created: SystemTime::now(),
            created_instant: now,
            started: None,
            finished: None,
            progress: JobProgress {
                step: 0,
                total,
                eta_seconds: None,
            },
            cancel_requested: false,
            stop: Arc::new(AtomicU8::new(0)),
            result: None,
            error: None,
            gen_secs: 0.0,
            preview: None,
            loading: None,
            preview_watchers: Default::default(),
            previews_asked_until: None,
            // Made before the job can start, so a follower misses none of its events.
            events: follow.then(|| broadcast::channel(EVENT_BUFFER).0),
        };
        jobs.records.insert(id.clone(), record);
        jobs.queue.push_back(id.clone());
        let view = jobs.view(&id).expect("just inserted");
        let rx = jobs.records[&id]
            .events
            .as_ref()
            .map(broadcast::Sender::subscribe);
        drop(jobs);
        inner.wake.notify_one();
        Ok((view, rx))
    }

    /// Starts the worker thread (which loads the model first) and the reaper.
    pub fn start(
        cfg: EngineConfig,
        loader: Loader,
        switcher: Option<Switcher>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let results_budget = cfg.job_results_bytes;
        let inner = Arc::new(Inner {
            cfg,
            jobs: Mutex::new(Jobs {
                results_budget,
                evicted: metrics.jobs_evicted.clone(),
                ..Jobs::default()
            }),
            wake: Condvar::new(),
            state: RwLock::new(ModelState::Loading),
            shutdown_deadline: Mutex::new(None),
            oom: OomGuard::new(BreakerConfig::default()),
            device: RwLock::new(Device::Cpu),
            memory_plan: RwLock::new(None),
            loaded: RwLock::new(None),
            avg_gen_ms: AtomicU64::new(0),
            rescans: Default::default(),
            unloaded: AtomicBool::new(false),
            reloading: AtomicBool::new(false),
            next_seq: AtomicU64::new(1),
            worker_done: Mutex::new(false),
            worker_done_cv: Condvar::new(),
            metrics,
        });
        let worker = inner.clone();
        std::thread::Builder::new()
            .name("sdserve-worker".into())
            .spawn(move || {
                super::worker::worker_main(&worker, loader, switcher);
                *lock(&worker.worker_done) = true;
                worker.worker_done_cv.notify_all();
            })
            .expect("spawn worker thread");
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("sdserve-reaper".into())
            .spawn(move || reaper(weak))
            .expect("spawn reaper thread");
        Self { inner }
    }
}

/// Fails queued jobs past their deadline and forgets finished ones past JOB_TTL_SECONDS; ends
/// when the engine is dropped.
fn reaper(inner: Weak<Inner>) {
    loop {
        std::thread::sleep(REAP_EVERY);
        let Some(inner) = inner.upgrade() else { return };
        let now = Instant::now();
        let ttl = inner.cfg.job_ttl;
        let mut jobs = inner.jobs();
        let late: Vec<String> = jobs
            .queue
            .iter()
            .filter_map(|id| jobs.records.get(id))
            .filter(|r| now >= r.deadline)
            .map(|r| r.id.clone())
            .collect();
        for id in late {
            if jobs.remove_queued(&id, StopReason::Timeout) {
                inner.oom.release_probe();
                tracing::info!(job = %id, "queued job passed its deadline before it started");
            }
        }
        end_stuck_run(&mut jobs, now, inner.cfg.stuck_grace);
        jobs.expire(now, ttl);
    }
}

/// Ends the running job `failed` (`timeout`) when its run is still going `grace` past the
/// job's deadline: the run is stuck (the step hook, which stops it at the deadline, is not
/// called), and its clients hear now. The worker stays busy until the run returns; its
/// outcome is then dropped.
fn end_stuck_run(jobs: &mut Jobs, now: Instant, grace: Duration) {
    let Some(id) = jobs.running.clone() else {
        return;
    };
    let speed = jobs.speed;
    let Some(r) = jobs.records.get(&id) else {
        return;
    };
    if r.status.is_final() || now < r.deadline + grace {
        return;
    }
    let info = r.timeout_info(now, speed);
    let _ = r.stop.compare_exchange(
        0,
        StopReason::Timeout as u8,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    tracing::error!(job = %id, grace_secs = grace.as_secs_f64(), "the run passed its deadline by the grace without ending (its generation is stuck): the job fails with `timeout`; the worker takes the next job when the run returns");
    jobs.running_stuck = Some(now);
    jobs.finish(&id, JobStatus::Failed, Err(ApiError::Timeout(info)));
}

impl JobBackend for Local {
    fn rescan_adapters(&self, force: bool) -> Option<super::RescanTicket> {
        Some(super::worker::ask_rescan(&self.inner, force))
    }

    #[cfg(test)]
    fn finished_bytes(&self) -> usize {
        self.inner.jobs().ended_bytes
    }

    fn model_state(&self) -> ModelState {
        self.inner
            .state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn gauges(&self) -> Gauges {
        let jobs = self.inner.jobs();
        Gauges {
            running: usize::from(jobs.running.is_some()),
            waiting: jobs.queue.len(),
            capacity: self.inner.cfg.max_concurrent,
            model_ready: matches!(self.model_state(), ModelState::Ready(_)),
            cache: None,
        }
    }

    fn oom_breaker_open(&self) -> bool {
        self.inner.oom.is_open()
    }

    fn stuck_run(&self) -> Option<String> {
        let jobs = self.inner.jobs();
        let id = jobs
            .running
            .as_ref()
            .filter(|_| jobs.running_stuck.is_some())?;
        Some(format!(
            "the run of job {id} went on {} s past its deadline without returning (a stuck \
             generation, e.g. a device call that never returns): its job failed with `timeout`, \
             and no other job runs until it returns",
            self.inner.cfg.stuck_grace.as_secs_f64()
        ))
    }

    fn stuck_since(&self) -> Option<Instant> {
        let jobs = self.inner.jobs();
        jobs.running.as_ref().and(jobs.running_stuck)
    }

    fn model_hold(&self) -> Option<super::ModelHold> {
        if self.inner.reloading.load(Ordering::SeqCst) {
            Some(super::ModelHold::Reloading)
        } else if self.inner.unloaded.load(Ordering::SeqCst) {
            Some(super::ModelHold::Unloaded)
        } else {
            None
        }
    }

    fn ask_model(&self, ask: super::ModelAsk) -> Option<super::ModelAskTicket> {
        let (reply, ticket) = tokio::sync::oneshot::channel();
        let mut jobs = self.inner.jobs();
        if jobs.shutting_down {
            let _ = reply.send(Err(ApiError::ModelUnavailable(
                "the server is shutting down".into(),
            )));
        } else {
            jobs.model_asks
                .push_back(super::switch::PendingAsk { ask, reply });
            // Under the lock the worker waits with, so the wake cannot be missed.
            self.inner.wake.notify_all();
        }
        Some(ticket)
    }

    fn speed(&self) -> Option<SpeedProbe> {
        self.inner.jobs().speed
    }

    fn loaded_model(&self) -> Option<super::LoadedModel> {
        self.inner
            .loaded
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn memory_plan(&self) -> Option<String> {
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

    fn submit(&self, spec: JobSpec) -> Result<JobView, ApiError> {
        self.enqueue(spec, false).map(|(view, _)| view)
    }

    fn get(&self, id: &str) -> Result<Option<JobView>, ApiError> {
        Ok(self.inner.jobs().view(id))
    }

    fn list(&self) -> Result<Vec<JobView>, ApiError> {
        let jobs = self.inner.jobs();
        let mut out: Vec<JobView> = jobs
            .running
            .iter()
            .chain(jobs.queue.iter())
            .filter_map(|id| jobs.view(id))
            .collect();
        let mut done: Vec<&Record> = jobs
            .records
            .values()
            .filter(|r| r.status.is_final())
            .collect();
        done.sort_by_key(|r| std::cmp::Reverse(r.seq));
        out.extend(done.into_iter().map(|r| r.view(None)));
        Ok(out)
    }

    fn cancel(&self, id: &str, why: StopReason) -> Result<Option<JobView>, ApiError> {
        let mut jobs = self.inner.jobs();
        let Some(r) = jobs.records.get_mut(id) else {
            return Ok(None);
        };
        if !r.status.is_final() {
            if why == StopReason::Cancelled {
                r.cancel_requested = true;
            }
            let _ = r
                .stop
                .compare_exchange(0, why as u8, Ordering::SeqCst, Ordering::SeqCst);
            if jobs.remove_queued(id, why) {
                self.inner.oom.release_probe();
                self.inner.metrics.cancelled.inc();
                tracing::info!(job = %id, reason = ?why, "queued job stopped before it started");
            }
        } else if why == StopReason::Cancelled {
            r.cancel_requested = true;
        }
        Ok(jobs.view(id))
    }

    fn subscribe(
        &self,
        id: &str,
    ) -> Result<Option<(JobView, broadcast::Receiver<JobEvent>)>, ApiError> {
        let mut jobs = self.inner.jobs();
        let Some(r) = jobs.records.get_mut(id) else {
            return Ok(None);
        };
        let rx = r
            .events
            .get_or_insert_with(|| broadcast::channel(EVENT_BUFFER).0)
            .subscribe();
        Ok(jobs.view(id).map(|v| (v, rx)))
    }

    fn watch_previews(&self, id: &str) -> Option<PreviewWatch> {
        let jobs = self.inner.jobs();
        let r = jobs.records.get(id)?;
        Some(Box::new(WatcherCount::new(r.preview_watchers.clone())))
    }

    fn ask_previews(&self, id: &str, window: Duration) {
        let mut jobs = self.inner.jobs();
        if let Some(r) = jobs.records.get_mut(id) {
            let until = Instant::now() + window;
            r.previews_asked_until = Some(r.previews_asked_until.map_or(until, |u| u.max(until)));
        }
    }

    fn finished(&self, id: &str) -> Result<Option<Finished>, ApiError> {
        let jobs = self.inner.jobs();
        let Some(r) = jobs.records.get(id) else {
            return Ok(None);
        };
        if !r.status.is_final() {
            return Ok(None);
        }
        let queue_secs = r
            .started
            .map(|(_, at)| at.duration_since(r.created_instant).as_secs_f64())
            .unwrap_or(0.0);
        let result = match (&r.result, &r.error) {
            (Some(res), _) => Ok(res.clone()),
            (None, Some(e)) => Err(e.clone()),
            (None, None) => Err(ApiError::Internal("the job was cancelled".into())),
        };
        Ok(Some(Finished {
            result,
            queue_secs,
            gen_secs: r.gen_secs,
        }))
    }

    fn begin_shutdown(&self, grace: Duration) {
        *lock(&self.inner.shutdown_deadline) = Some(Instant::now() + grace);
        let mut jobs = self.inner.jobs();
        jobs.shutting_down = true;
        let drained: Vec<String> = jobs.queue.drain(..).collect();
        for id in &drained {
            let (status, err) = outcome_of(StopReason::ShuttingDown, TimeoutInfo::default());
            jobs.finish(id, status, Err(err));
            self.inner.oom.release_probe();
        }
        drop(jobs);
        self.inner.wake.notify_all();
        tracing::info!(
            queued_answered_503 = drained.len(),
            grace_secs = grace.as_secs_f64(),
            "shutdown: queue drained"
        );
    }

    fn wait_worker(&self, bound: Duration) -> bool {
        let done = lock(&self.inner.worker_done);
        let (done, _) = self
            .inner
            .worker_done_cv
            .wait_timeout_while(done, bound, |d| !*d)
            .unwrap_or_else(|e| e.into_inner());
        *done
    }
}
