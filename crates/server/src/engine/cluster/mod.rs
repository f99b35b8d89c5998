//! Replicas sharing jobs through Redis (QUEUE_URL, README "Several machines"): the `JobBackend` of every
//! process that has a QUEUE_URL, and (for `--role all|worker`) the worker that takes jobs from
//! Redis and runs them on the in-process engine (`worker.rs`).
//!
//! - A job is a record key with a TTL; its id goes on one list (the queue). A worker moves it
//!   atomically to its own processing list and leases it (CLAIM), renews the lease while it
//!   runs, and ends it at most once (FINISH: a `done` key set with NX). A reaper in every
//!   process queues again the jobs whose lease ran out (their worker died).
//! - Events go over one pub/sub channel to every API process, which hands them to its own
//!   subscribers; a poller also reads the records of jobs someone follows, so a missed event
//!   (Redis restarted, connection lost) still ends the stream from the record.
//! - Previews are made only for jobs someone watches, and pollers read the latest from Redis
//!   (`previews.rs`).
//! - The trait's methods are synchronous and answer at once: each runs its Redis commands on
//!   this backend's own small runtime, bounded by `CALL_TIMEOUT`, and answers 503
//!   `queue_unavailable` while Redis cannot be reached. The connection manager reconnects by
//!   itself when Redis is back.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use utoipa::ToSchema;

use super::job::{timestamp, Finished, JobEvent, JobSpec, JobView};
use super::local::Local;
use super::{EngineConfig, JobBackend, ModelState, PreviewWatch, StopReason};
use crate::error::ApiError;
use crate::metrics::Gauges;

mod follow;
mod keys;
mod previews;
mod scripts;
mod store;
mod unreadable;
mod worker;

use store::Store;
pub mod wire;
mod wire_hires;
mod wire_record;

/// Longest a request waits on Redis before answering 503.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// How often API processes read the records of followed jobs, and refresh workers and queue.
const POLL_EVERY: Duration = Duration::from_millis(250);
const EVENT_BUFFER: usize = 256;

/// `--role`: what this process does when it has a QUEUE_URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// Serves the API and runs jobs.
    All,
    /// Serves the API; loads no model.
    Api,
    /// Loads the model and runs jobs; its port answers /health and /metrics only.
    Worker,
}

impl Role {
    pub fn runs_jobs(self) -> bool {
        matches!(self, Self::All | Self::Worker)
    }
}

#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// QUEUE_URL
    pub url: String,
    pub role: Role,
    /// JOB_LEASE_SECONDS
    pub lease: Duration,
}

/// One live worker, as /health lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct WorkerHealth {
    /// Host name and process id, unique per process.
    pub id: String,
    /// `loading`, `ready`, `failed`, or `stuck`: a run passed its job's deadline by two
    /// leases without returning (the job failed with `timeout`); it takes no job until then.
    pub state: String,
    pub model_version: Option<String>,
    /// The job it runs now, if any.
    pub running_job: Option<String>,
    /// Jobs it ended since it started.
    pub jobs_done: u64,
    /// RFC 3339, UTC.
    pub started_at: String,
}

/// The shared queue as this process sees it (for /health).
#[derive(Debug, Clone)]
pub struct ClusterHealth {
    /// Why Redis cannot be used now; `None` while it answers.
    pub unreachable: Option<String>,
    /// Workers whose heartbeat is fresh.
    pub workers: Vec<WorkerHealth>,
}

/// What the poller last saw: workers, queue length, reachability.
#[derive(Default)]
struct Seen {
    workers: Vec<wire::Heartbeat>,
    waiting: usize,
    unreachable: Option<String>,
    /// The model of the last ready worker, kept while Redis is away.
    info: Option<crate::generator::ModelInfo>,
}

/// A job some client of this process follows.
struct Follow {
    tx: broadcast::Sender<JobEvent>,
    position: Option<usize>,
    ended: bool,
}

pub(super) struct Shared {
    pub cfg: EngineConfig,
    pub cluster: ClusterConfig,
    pub keys: wire::Keys,
    pub conn: ConnectionManager,
    client: redis::Client,
    seen: RwLock<Seen>,
    follows: Mutex<HashMap<String, Follow>>,
    /// Event streams showing previews, by job (see `PREVIEWS_TTL`).
    preview_watchers: Mutex<HashMap<String, usize>>,
    /// Keys that did not parse and were warned about (once each; bounded).
    unparsable: Mutex<HashSet<String>>,
    /// The in-process run this process's worker gave up on as stuck, and when; until it returns.
    pub stuck_run: Mutex<Option<(String, std::time::Instant)>>,
    /// The forced adapter reads every ready worker has made (`Heartbeat::adapters_rescan`;
    /// `u64::MAX` while none is ready: nobody to wait for).
    rescans_done: tokio::sync::watch::Sender<u64>,
}

impl Shared {
    /// One warning per key (however often listings, the reaper and pollers meet it): a key
    /// written by hand or by another sdserve version is skipped, the rest answered.
    pub fn note_unparsable(&self, key: &str, e: &serde_json::Error) {
        let mut seen = lock(&self.unparsable);
        if seen.len() >= 10_000 {
            seen.clear();
        }
        if seen.insert(key.to_string()) {
            tracing::warn!(key = %key, error = %e, "a record in QUEUE_URL's Redis does not parse (written by hand, or by another sdserve version?); skipped");
        }
    }
}

pub(super) fn unavailable(e: impl std::fmt::Display) -> ApiError {
    ApiError::QueueUnavailable(format!("QUEUE_URL's Redis cannot be used: {e}"))
}

/// A job whose record left Redis before it ended (expired, evicted under `maxmemory`, deleted):
/// it is dropped, and its clients hear this instead of waiting forever.
pub(super) fn record_gone() -> ApiError {
    ApiError::QueueUnavailable(
        "the job's record is gone from QUEUE_URL's Redis (expired or evicted, see README \"Several machines\"); the job was dropped: submit it again".into(),
    )
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(super) struct Cluster {
    sh: Arc<Shared>,
    rt: &'static tokio::runtime::Runtime,
    /// The in-process engine this process's worker runs jobs on (`--role all|worker`).
    local: Option<Arc<Local>>,
}

impl Cluster {
    /// Connects lazily (the server starts while Redis is down and answers 503 until it is up)
    /// and starts the event listener, the poller and reaper, and the worker if `local` is set.
    pub fn start(
        cfg: EngineConfig,
        cluster: ClusterConfig,
        local: Option<Arc<Local>>,
    ) -> Result<Self, String> {
        let client = redis::Client::open(cluster.url.as_str())
            .map_err(|e| format!("QUEUE_URL {:?}: {e}", cluster.url))?;
        // Its own runtime: the trait's synchronous methods wait on it from any thread.
        let rt: &'static tokio::runtime::Runtime = Box::leak(Box::new(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("sdserve-queue")
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start the queue runtime: {e}"))?,
        ));
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = {
            let _guard = rt.enter();
            ConnectionManager::new_lazy_with_config(client.clone(), config)
                .map_err(|e| format!("QUEUE_URL {:?}: {e}", cluster.url))?
        };
        let sh = Arc::new(Shared {
            cfg,
            keys: wire::Keys::new("sdserve"),
            cluster,
            conn,
            client,
            seen: RwLock::new(Seen::default()),
            follows: Mutex::new(HashMap::new()),
            unparsable: Mutex::new(HashSet::new()),
            preview_watchers: Mutex::new(HashMap::new()),
            stuck_run: Mutex::new(None),
            rescans_done: tokio::sync::watch::Sender::new(u64::MAX),
        });
        rt.spawn(follow::listen(sh.clone()));
        rt.spawn(follow::poll(sh.clone()));
        if let Some(local) = &local {
            worker::spawn(rt, sh.clone(), local.clone());
        }
        Ok(Self { sh, rt, local })
    }

    fn store(&self) -> Store {
        Store::new(self.sh.clone())
    }

    /// Runs `fut` on the queue runtime and waits for it, at most CALL_TIMEOUT.
    fn call<T: Send + 'static>(
        &self,
        fut: impl Future<Output = Result<T, ApiError>> + Send + 'static,
    ) -> Result<T, ApiError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.rt.spawn(async move {
            let out = match tokio::time::timeout(CALL_TIMEOUT, fut).await {
                Ok(r) => r,
                Err(_) => Err(unavailable("no answer within 3 s")),
            };
            let _ = tx.send(out);
        });
        let wait = move || {
            rx.recv()
                .unwrap_or_else(|_| Err(unavailable("the queue runtime stopped")))
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(wait)
            }
            _ => wait(),
        }
    }

    fn seen(&self) -> std::sync::RwLockReadGuard<'_, Seen> {
        self.sh.seen.read().unwrap_or_else(|e| e.into_inner())
    }
}

impl JobBackend for Cluster {
    fn rescan_adapters(&self, force: bool) -> Option<super::RescanTicket> {
        if let Some(local) = &self.local {
            return local.rescan_adapters(force);
        }
        // An API replica: the workers look at their folders by themselves; a forced read is
        // asked through Redis, and done once every ready worker's heartbeat says so.
        if !force {
            return None;
        }
        let sh = self.sh.clone();
        let target = self
            .call(async move {
                let mut conn = sh.conn.clone();
                redis::AsyncCommands::incr::<_, _, u64>(&mut conn, sh.keys.adapters_rescan(), 1)
                    .await
                    .map_err(unavailable)
            })
            .ok()?;
        Some(super::RescanTicket {
            target,
            done: self.sh.rescans_done.subscribe(),
        })
    }

    fn model_state(&self) -> ModelState {
        if let Some(local) = &self.local {
            return local.model_state();
        }
        let seen = self.seen();
        if let Some(info) = &seen.info {
            return ModelState::Ready(info.clone());
        }
        match seen.workers.iter().find_map(|w| w.failed.clone()) {
            Some(why) if seen.workers.iter().all(|w| w.failed.is_some()) => {
                ModelState::Failed(format!("every worker failed to load the model: {why}"))
            }
            _ => ModelState::Loading,
        }
    }

    fn gauges(&self) -> Gauges {
        let seen = self.seen();
        Gauges {
            running: seen
                .workers
                .iter()
                .filter(|w| w.health.running_job.is_some())
                .count(),
            waiting: seen.waiting,
            capacity: self.sh.cfg.max_concurrent,
            model_ready: matches!(self.model_state(), ModelState::Ready(_)),
            cache: None,
        }
    }

    fn oom_breaker_open(&self) -> bool {
        self.local.as_ref().is_some_and(|l| l.oom_breaker_open())
    }

    fn memory_plan(&self) -> Option<String> {
        self.local.as_ref().and_then(|l| l.memory_plan())
    }

    fn model_hold(&self) -> Option<super::ModelHold> {
        self.local.as_ref().and_then(|l| l.model_hold())
    }

    fn ask_model(&self, ask: super::ModelAsk) -> Option<super::ModelAskTicket> {
        self.local.as_ref().and_then(|l| l.ask_model(ask))
    }

    fn loaded_model(&self) -> Option<super::LoadedModel> {
        self.local.as_ref().and_then(|l| l.loaded_model())
    }

    /// Since the worker gave the job up (two leases past its deadline) while the run has not
    /// returned; else the in-process engine's own mark (its grace is four leases, a fallback).
    fn stuck_since(&self) -> Option<std::time::Instant> {
        let local = self.local.as_ref()?;
        let g = local.gauges();
        let given_up = lock(&self.sh.stuck_run).as_ref().map(|(_, at)| *at);
        given_up
            .filter(|_| g.running + g.waiting > 0)
            .or_else(|| local.stuck_since())
    }

    fn speed(&self) -> Option<crate::speed::SpeedProbe> {
        self.local.as_ref().and_then(|l| l.speed())
    }

    fn retry_after_secs(&self) -> u64 {
        let seen = self.seen();
        let workers = seen.workers.len().max(1);
        ((seen.waiting / workers) as u64 + 1).clamp(1, self.sh.cfg.timeout.as_secs().max(1))
    }

    fn submit(&self, spec: JobSpec) -> Result<JobView, ApiError> {
        let store = self.store();
        let retry_after_secs = self.retry_after_secs();
        self.call(async move { store.submit(spec, retry_after_secs).await })
    }

    fn get(&self, id: &str) -> Result<Option<JobView>, ApiError> {
        let (store, id) = (self.store(), id.to_string());
        self.call(async move { store.view(&id).await })
    }

    fn list(&self) -> Result<Vec<JobView>, ApiError> {
        let store = self.store();
        self.call(async move { store.list().await })
    }

    fn cancel(&self, id: &str, why: StopReason) -> Result<Option<JobView>, ApiError> {
        let (store, id) = (self.store(), id.to_string());
        self.call(async move { store.cancel(&id, why).await })
    }

    fn subscribe(
        &self,
        id: &str,
    ) -> Result<Option<(JobView, broadcast::Receiver<JobEvent>)>, ApiError> {
        // Follow first, then read: every event after the snapshot reaches the receiver.
        let rx = {
            let mut follows = lock(&self.sh.follows);
            let f = follows.entry(id.to_string()).or_insert_with(|| Follow {
                tx: broadcast::channel(EVENT_BUFFER).0,
                position: None,
                ended: false,
            });
            f.tx.subscribe()
        };
        let view = self.get(id)?;
        if let Some(v) = &view {
            let mut follows = lock(&self.sh.follows);
            if let Some(f) = follows.get_mut(id) {
                f.position = v.position;
            }
        }
        Ok(view.map(|v| (v, rx)))
    }

    fn finished(&self, id: &str) -> Result<Option<Finished>, ApiError> {
        let (store, id) = (self.store(), id.to_string());
        self.call(async move { store.finished(&id).await })
    }

    fn watch_previews(&self, id: &str) -> Option<PreviewWatch> {
        Some(previews::watch(&self.sh, id))
    }

    fn ask_previews(&self, id: &str, window: Duration) {
        let (sh, id) = (self.sh.clone(), id.to_string());
        let _ = self.call(async move { previews::ask(&sh, &id, window).await });
    }

    fn latest_preview(&self, id: &str) -> Option<(usize, std::sync::Arc<String>)> {
        let (sh, id) = (self.sh.clone(), id.to_string());
        self.call(async move { previews::latest(&sh, &id).await })
            .ok()
            .flatten()
    }

    fn cluster(&self) -> Option<ClusterHealth> {
        let seen = self.seen();
        Some(ClusterHealth {
            unreachable: seen.unreachable.clone(),
            workers: seen.workers.iter().map(|w| w.health.clone()).collect(),
        })
    }

    fn shared_cache_get(&self, key: &str) -> Option<Option<Vec<u8>>> {
        let (mut conn, key) = (self.sh.conn.clone(), self.sh.keys.cache(key));
        self.call(async move {
            redis::AsyncCommands::get::<_, Option<Vec<u8>>>(&mut conn, key)
                .await
                .map_err(unavailable)
        })
        .ok()
    }

    fn shared_cache_put(&self, key: &str, body: &[u8]) -> bool {
        let (mut conn, key, body) = (self.sh.conn.clone(), self.sh.keys.cache(key), body.to_vec());
        // Kept as long as finished jobs: Redis's own maxmemory policy bounds the rest.
        let ttl = self.sh.cfg.job_ttl.as_secs().max(1);
        let _ = self.call(async move {
            redis::AsyncCommands::set_ex::<_, _, ()>(&mut conn, key, body, ttl)
                .await
                .map_err(unavailable)
        });
        true
    }

    fn begin_shutdown(&self, grace: Duration) {
        if let Some(local) = &self.local {
            worker::stop_taking_jobs();
            local.begin_shutdown(grace);
        }
    }

    fn wait_worker(&self, bound: Duration) -> bool {
        match &self.local {
            Some(local) => local.wait_worker(bound),
            None => true,
        }
    }
}

/// A worker id: host name and process id.
pub(super) fn worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "host".into());
    format!("{host}-{}", std::process::id())
}

pub(super) fn started_at() -> String {
    timestamp(std::time::SystemTime::now())
}
