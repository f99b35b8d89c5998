//! The worker of a replica with QUEUE_URL: takes one job at a time from Redis (when its model
//! is ready), runs it on the in-process engine (the same worker thread as without Redis),
//! forwards its progress and previews, renews its lease, passes on cancellation, and ends it
//! at most once. A heartbeat announces the worker and its model.
//!
//! The lease is renewed only while the run is alive: a run that passes its job's deadline by
//! two leases without ending (its last step and decode had that long) is stuck, e.g. in a
//! device call that never returns. The worker then ends the job `failed` (`timeout`), stops
//! renewing, and takes no job until the run returns (its heartbeat says `stuck`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::{AsyncCommands, Script};
use tokio::sync::broadcast;

use super::scripts;
use super::store::{Store, Written};
use super::wire::{self, now_ms, Heartbeat, Record, WireInfo};
use super::{started_at, worker_id, Shared, WorkerHealth};
use crate::engine::job::{timestamp, JobEvent, JobStatus, StopReason};
use crate::engine::local::Local;
use crate::engine::table::outcome_of;
use crate::engine::{JobBackend, ModelState};
use crate::error::ApiError;

/// Set at shutdown: take no more jobs.
static STOPPING: AtomicBool = AtomicBool::new(false);
/// How often a running job's stop request is looked for.
const CANCEL_POLL: Duration = Duration::from_millis(100);
/// How often a worker looks for forced reads of its adapter folders asked through Redis.
const RESCAN_LOOK: Duration = Duration::from_millis(250);
/// How often the heartbeat looks for a new read of the adapter folders.
const ADAPTERS_LOOK: Duration = Duration::from_millis(100);
/// How long an idle worker waits before looking at the queue again.
const IDLE_POLL: Duration = Duration::from_millis(100);

pub(super) fn stop_taking_jobs() {
    STOPPING.store(true, Ordering::SeqCst);
}

struct Worker {
    sh: Arc<Shared>,
    store: Store,
    local: Arc<Local>,
    id: String,
    started_at: String,
    running: Mutex<Option<String>>,
    done: AtomicU64,
    /// The last forced read of the adapter folders asked through Redis that this worker made.
    rescanned: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(super) fn spawn(rt: &tokio::runtime::Runtime, sh: Arc<Shared>, local: Arc<Local>) {
    let w = Arc::new(Worker {
        store: Store::new(sh.clone()),
        sh,
        local,
        id: worker_id(),
        started_at: started_at(),
        running: Mutex::new(None),
        done: AtomicU64::new(0),
        rescanned: AtomicU64::new(0),
    });
    tracing::info!(worker = %w.id, lease_secs = w.sh.cluster.lease.as_secs_f64(), "worker: taking jobs from QUEUE_URL once the model is ready");
    rt.spawn(heartbeat(w.clone()));
    rt.spawn(follow_rescans(w.clone()));
    rt.spawn(take_jobs(w));
}

impl Worker {
    fn lease_ms(&self) -> u64 {
        self.sh.cluster.lease.as_millis() as u64
    }

    /// How long a run may go on past its job's deadline before it counts as stuck.
    fn grace_ms(&self) -> u64 {
        2 * self.lease_ms()
    }

    /// True while the in-process engine has a job running or waiting.
    fn local_busy(&self) -> bool {
        let g = self.local.gauges();
        g.running + g.waiting > 0
    }

    /// True while a run this worker gave up on still holds the in-process engine.
    fn is_stuck(&self) -> bool {
        let mut stuck = lock(&self.sh.stuck_run);
        if stuck.is_some() && !self.local_busy() {
            tracing::warn!(worker = %self.id, "the stuck run returned at last; taking jobs again");
            *stuck = None;
        }
        stuck.is_some()
    }

    fn beat(&self) -> Heartbeat {
        let (state, info, failed) = match self.local.model_state() {
            ModelState::Loading => ("loading", None, None),
            ModelState::Ready(i) if self.is_stuck() => ("stuck", Some(i), None),
            ModelState::Ready(i) => ("ready", Some(i), None),
            ModelState::Failed(why) => ("failed", None, Some(why)),
        };
        Heartbeat {
            health: WorkerHealth {
                id: self.id.clone(),
                state: state.into(),
                model_version: info.as_ref().map(|i| i.model_version.clone()),
                running_job: lock(&self.running).clone(),
                jobs_done: self.done.load(Ordering::Relaxed),
                started_at: self.started_at.clone(),
            },
            info: info.as_ref().map(WireInfo::of),
            failed,
            adapters_rescan: self.rescanned.load(Ordering::SeqCst),
        }
    }
}

/// Announces the worker every third of a lease (the key expires after a lease), and at once
/// when its LoRA and embedding folders were read again, so that API replicas validate against
/// them (and key the response cache on them) without waiting for the next beat.
async fn heartbeat(w: Arc<Worker>) {
    let every = (w.sh.cluster.lease / 3).max(Duration::from_millis(100));
    let adapters = |w: &Worker| match w.local.model_state() {
        ModelState::Ready(i) => i.adapters.fingerprint,
        _ => String::new(),
    };
    loop {
        let announced = (adapters(&w), w.rescanned.load(Ordering::SeqCst));
        let k = &w.sh.keys;
        let json = serde_json::to_string(&w.beat()).unwrap_or_default();
        let mut conn = w.sh.conn.clone();
        let _: Result<(), _> = redis::pipe()
            .set(k.heartbeat(&w.id), json)
            .arg("PX")
            .arg(w.lease_ms())
            .ignore()
            .sadd(k.workers(), &w.id)
            .ignore()
            .query_async(&mut conn)
            .await;
        let next = tokio::time::Instant::now() + every;
        while tokio::time::Instant::now() < next
            && (adapters(&w), w.rescanned.load(Ordering::SeqCst)) == announced
        {
            tokio::time::sleep(ADAPTERS_LOOK.min(every)).await;
        }
    }
}

/// Makes the forced reads of the adapter folders that API replicas' refresh routes ask for
/// (the `adapters_rescan` counter): one read for however many were asked since the last,
/// made by the worker thread between jobs; the heartbeat then says it is done. A worker that
/// starts counts the reads asked before it as made (it has just read the folders).
async fn follow_rescans(w: Arc<Worker>) {
    let key = w.sh.keys.adapters_rescan();
    let mut seen_start = false;
    loop {
        tokio::time::sleep(RESCAN_LOOK).await;
        let Ok(asked) =
            w.sh.conn
                .clone()
                .get::<_, Option<u64>>(&key)
                .await
                .map(Option::unwrap_or_default)
        else {
            continue;
        };
        if !seen_start {
            seen_start = true;
            w.rescanned.store(asked, Ordering::SeqCst);
            continue;
        }
        if asked <= w.rescanned.load(Ordering::SeqCst) {
            continue;
        }
        if let Some(mut ticket) = w.local.rescan_adapters(true) {
            let target = ticket.target;
            let _ = ticket.done.wait_for(|d| *d >= target).await;
        }
        w.rescanned.store(asked, Ordering::SeqCst);
    }
}

async fn take_jobs(w: Arc<Worker>) {
    let claim = Script::new(scripts::CLAIM);
    loop {
        if STOPPING.load(Ordering::SeqCst) {
            return;
        }
        if !matches!(w.local.model_state(), ModelState::Ready(_)) {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        // One job at a time: a run still stopping (or stuck) holds the engine.
        if w.is_stuck() || w.local_busy() {
            tokio::time::sleep(IDLE_POLL).await;
            continue;
        }
        let k = &w.sh.keys;
        let taken: Result<Option<String>, _> = claim
            .key(k.queue())
            .key(k.processing(&w.id))
            .arg(k.lease_prefix())
            .arg(&w.id)
            .arg(w.lease_ms())
            .invoke_async(&mut w.sh.conn.clone())
            .await;
        match taken {
            Ok(Some(id)) => {
                *lock(&w.running) = Some(id.clone());
                if let Err(e) = run_one(&w, &id).await {
                    tracing::warn!(job = %id, error = %e, "worker: Redis failed during the job; its lease will lapse and another worker takes it");
                }
                *lock(&w.running) = None;
            }
            Ok(None) => tokio::time::sleep(IDLE_POLL).await,
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// Lets go of a job this worker took: out of its processing list, lease dropped.
async fn release(w: &Worker, id: &str) {
    let k = &w.sh.keys;
    let _: Result<(), _> = redis::pipe()
        .lrem(k.processing(&w.id), 0, id)
        .ignore()
        .del(k.lease(id))
        .ignore()
        .query_async(&mut w.sh.conn.clone())
        .await;
}

async fn end(
    w: &Worker,
    record: &Record,
    status: JobStatus,
    result: Result<Arc<crate::api::GenerateResponse>, ApiError>,
) -> Result<(), ApiError> {
    let id = record.view.id.clone();
    let (ended, event) = Store::ended(record, status, result);
    match w.store.finish(&w.id, &ended, &event).await? {
        Written::Yes => {
            w.done.fetch_add(1, Ordering::Relaxed);
            tracing::info!(job = %id, worker = %w.id, status = ?status, attempts = ended.attempts, "job ended");
        }
        Written::Ended => {
            tracing::info!(job = %id, worker = %w.id, "job already ended elsewhere; this run's outcome is dropped")
        }
        Written::Gone => {
            tracing::warn!(job = %id, worker = %w.id, "the job's record is gone from Redis (expired or evicted); this run's outcome is dropped")
        }
    }
    release(w, &id).await;
    Ok(())
}

/// Stops this worker's run of a job that ended elsewhere or whose record is gone from Redis
/// (nothing more is written for it, so the record does not come back).
async fn abandon(w: &Worker, id: &str, local_id: Option<&str>, why: Written) {
    if why == Written::Gone {
        tracing::warn!(job = %id, worker = %w.id, "the job's record is gone from Redis (expired or evicted); run stopped, nothing written back");
    } else {
        tracing::info!(job = %id, worker = %w.id, "the job ended elsewhere; run stopped");
    }
    if let Some(lid) = local_id {
        let _ = w.local.cancel(lid, StopReason::Cancelled);
    }
    release(w, id).await;
}

async fn run_one(w: &Worker, id: &str) -> Result<(), ApiError> {
    let k = &w.sh.keys;
    let mut conn = w.sh.conn.clone();
    let (mut record, view) = match w.store.read_found(id).await? {
        Some(Ok(found)) => found,
        found => {
            // Gone, or unparsable (warned about, naming the key): nothing to run.
            if found.is_some() {
                tracing::warn!(job = %id, worker = %w.id, "the job's record does not parse; let go of, not run");
            }
            release(w, id).await;
            return Ok(());
        }
    };
    let done: bool = conn.exists(k.done(id)).await.map_err(super::unavailable)?;
    if done || view.status.is_final() {
        release(w, id).await;
        return Ok(());
    }
    let now = now_ms();
    let stop: Option<u8> = conn.get(k.cancel(id)).await.map_err(super::unavailable)?;
    if let Some(why) = stop.and_then(StopReason::from_u8) {
        let (status, err) = outcome_of(why, record.timeout_info(now));
        return end(w, &record, status, Err(err)).await;
    }
    if now >= record.deadline_ms {
        let (status, err) = outcome_of(StopReason::Timeout, record.timeout_info(now));
        return end(w, &record, status, Err(err)).await;
    }
    let spec = match record
        .spec
        .spec(Duration::from_millis(record.deadline_ms - now))
    {
        Ok(s) => s,
        Err(e) => {
            return end(
                w,
                &record,
                JobStatus::Failed,
                Err(ApiError::Internal(format!("bad job spec in Redis: {e}"))),
            )
            .await
        }
    };
    record.view.status = JobStatus::Running;
    record.view.started_at = Some(timestamp(wire::time_of_ms(now)));
    record.started_ms = Some(now);
    record.attempts += 1;
    record.worker = Some(w.id.clone());
    let written = w
        .store
        .update(Some(&record), id, Some(&JobEvent::Started))
        .await?;
    if written != Written::Yes {
        abandon(w, id, None, written).await;
        return Ok(());
    }
    tracing::info!(job = %id, worker = %w.id, attempt = record.attempts, "job started");

    // Followed from before it can start: its first events (a switch's `loading`) reach Redis.
    let (local_view, mut rx) = match w.local.submit_followed(spec) {
        Ok(v) => v,
        Err(e) => return end(w, &record, JobStatus::Failed, Err(e)).await,
    };
    let lid = local_view.id;
    let renew = Script::new(scripts::RENEW);
    let renew_every = (w.sh.cluster.lease / 3).max(Duration::from_millis(100));
    let mut last_renew = tokio::time::Instant::now();
    let mut cancel_tick = tokio::time::interval(CANCEL_POLL);
    let mut asked_to_stop = false;
    loop {
        tokio::select! {
            event = rx.recv() => match event {
                Ok(e @ (JobEvent::Loading { .. } | JobEvent::Progress(_) | JobEvent::Preview { .. })) => {
                    if let JobEvent::Preview { step, png_base64 } = &e {
                        // Kept while the job may run, and a while after: what pollers read.
                        let ttl = Duration::from_millis(record.deadline_ms.saturating_sub(now_ms())) + w.sh.cfg.job_ttl;
                        super::previews::store_latest(&w.sh, id, *step, png_base64, ttl).await;
                    }
                    let record = match &e {
                        // The record says what the local one says: `loading` until the
                        // switch ends (its first step).
                        JobEvent::Loading { model } => {
                            record.view.loading = Some(model.clone());
                            Some(&record)
                        }
                        JobEvent::Progress(p) => {
                            record.view.progress = *p;
                            record.view.loading = None;
                            Some(&record)
                        }
                        _ => None,
                    };
                    // A failed write only loses a progress step; the lease says who runs it.
                    if let Ok(written @ (Written::Ended | Written::Gone)) = w.store.update(record, id, Some(&e)).await {
                        abandon(w, id, Some(&lid), written).await;
                        return Ok(());
                    }
                }
                Ok(e) if e.is_final() => break,
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => break,
            },
            _ = cancel_tick.tick() => {
                if matches!(w.local.finished(&lid), Ok(Some(_))) {
                    break;
                }
                // A stop request, and whether an API replica serves a stream showing previews.
                let asked: Result<(Option<u8>, bool), _> = redis::pipe()
                    .get(k.cancel(id))
                    .exists(k.previews(id))
                    .query_async(&mut conn)
                    .await;
                if let Ok((stop, watched)) = asked {
                    if let (false, Some(why)) = (asked_to_stop, stop.and_then(StopReason::from_u8)) {
                        asked_to_stop = true;
                        let _ = w.local.cancel(&lid, why);
                    }
                    if watched {
                        w.local.ask_previews(&lid, super::previews::PREVIEWS_TTL);
                    }
                }
                let now = now_ms();
                if now >= record.deadline_ms + w.grace_ms() {
                    // Stuck: no renewal, and the job's clients hear its end now.
                    tracing::error!(job = %id, worker = %w.id, over_deadline_secs = (now - record.deadline_ms) / 1000, "the run passed its deadline by two leases without ending (its generation is stuck): the job fails with `timeout`; this worker takes no job until the run returns");
                    let _ = w.local.cancel(&lid, StopReason::Timeout);
                    *lock(&w.sh.stuck_run) = Some((lid.clone(), std::time::Instant::now()));
                    let (status, err) = outcome_of(StopReason::Timeout, record.timeout_info(now));
                    return end(w, &record, status, Err(err)).await;
                }
                if last_renew.elapsed() >= renew_every {
                    last_renew = tokio::time::Instant::now();
                    let held: Result<i64, _> = renew.key(k.lease(id)).arg(&w.id).arg(w.lease_ms()).invoke_async(&mut conn).await;
                    if let Ok(0) = held {
                        tracing::warn!(job = %id, worker = %w.id, "lost the job's lease to another worker; stopping this run");
                        let _ = w.local.cancel(&lid, StopReason::Cancelled);
                        let _ = conn.lrem::<_, _, i64>(k.processing(&w.id), 0, id).await;
                        return Ok(());
                    }
                }
            }
        }
    }
    // The local job has ended (or its channel closed): wait for its record.
    let fin = loop {
        if let Ok(Some(f)) = w.local.finished(&lid) {
            break f;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let status = w
        .local
        .get(&lid)
        .ok()
        .flatten()
        .map(|v| v.status)
        .unwrap_or(JobStatus::Failed);
    record.gen_secs = fin.gen_secs;
    // Stopped because this worker shuts down: another worker runs it instead.
    if STOPPING.load(Ordering::SeqCst) && matches!(&fin.result, Err(ApiError::ModelUnavailable(_)))
    {
        if w.store.requeue(&w.id, id, true).await? {
            tracing::info!(job = %id, worker = %w.id, "shutting down: job given back to the queue");
        }
        return Ok(());
    }
    // The in-process run had only what was left of the deadline: the 408 speaks of the whole
    // one (its setting and limit, the time in Redis's queue), with the run's own step count.
    let result = match fin.result {
        Err(ApiError::Timeout(run)) => {
            let info = record.timeout_info(now_ms());
            Err(ApiError::Timeout(crate::error::TimeoutInfo {
                step: run.step,
                total: run.total,
                alone_secs: run.alone_secs,
                ..info
            }))
        }
        other => other,
    };
    end(w, &record, status, result).await
}
