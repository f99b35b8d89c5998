//! The in-process job table: every record, the queue in run order, the running job, and the
//! finished jobs under their memory budget (JOB_RESULTS_MB) and TTL. local.rs holds it behind
//! one mutex; every method here runs under that lock.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::metrics::counter::Counter;

use super::job::{JobEvent, JobStatus, JobView, StopReason};
use super::record::Record;
use crate::api::GenerateResponse;
use crate::error::{ApiError, TimeoutInfo};
use crate::speed::SpeedProbe;

#[derive(Default)]
pub(super) struct Jobs {
    pub records: HashMap<String, Record>,
    /// Waiting job ids, in run order.
    pub queue: VecDeque<String>,
    pub running: Option<String>,
    /// The running job was ended without its run, which went on past its deadline by the
    /// stuck grace (`end_stuck_run`), since when; cleared when the run returns. /health is
    /// `degraded` then (and STUCK_EXIT_SECONDS counts from it).
    pub running_stuck: Option<Instant>,
    pub shutting_down: bool,
    /// What the CPU speed probe measured, once it has (for 408 details).
    pub speed: Option<SpeedProbe>,
    /// Finished jobs in the order they ended, with the bytes each holds; past
    /// `results_budget` (JOB_RESULTS_MB) the oldest are dropped before JOB_TTL_SECONDS.
    pub ended: VecDeque<(String, usize)>,
    pub ended_bytes: usize,
    pub results_budget: usize,
    /// Records dropped early (`sdserve_jobs_evicted_total`).
    pub evicted: Counter,
    /// What the API asked of the worker's model, done between jobs before the next one.
    pub model_asks: VecDeque<super::switch::PendingAsk>,
}

impl Jobs {
    pub fn position(&self, id: &str) -> Option<usize> {
        self.queue.iter().position(|q| q == id).map(|p| p + 1)
    }

    pub fn view(&self, id: &str) -> Option<JobView> {
        self.records.get(id).map(|r| r.view(self.position(id)))
    }

    /// Tells every queued job from index `from` on its new place.
    pub fn announce_positions(&self, from: usize) {
        for (i, id) in self.queue.iter().enumerate().skip(from) {
            if let Some(r) = self.records.get(id) {
                r.emit(JobEvent::Queued { position: i + 1 });
            }
        }
    }

    /// Ends a job: status, time, error, terminal event.
    pub fn finish(
        &mut self,
        id: &str,
        status: JobStatus,
        result: Result<Arc<GenerateResponse>, ApiError>,
    ) {
        let Some(r) = self.records.get_mut(id) else {
            return;
        };
        if r.status.is_final() {
            return; // a stuck run that returned after its job was ended without it
        }
        r.status = status;
        r.finished = Some((SystemTime::now(), Instant::now()));
        let event = match result {
            Ok(res) => {
                r.result = Some(res.clone());
                JobEvent::Succeeded(res)
            }
            Err(_) if status == JobStatus::Cancelled => JobEvent::Cancelled,
            Err(e) => {
                let body = e.body();
                r.error = Some(e);
                JobEvent::Failed(body)
            }
        };
        r.emit(event);
        if !r.followed() {
            r.events = None;
        }
        let bytes = r.held_bytes();
        self.ended.push_back((id.to_string(), bytes));
        self.ended_bytes += bytes;
        self.drop_over_budget();
    }

    /// Drops the oldest finished records while those kept hold more than JOB_RESULTS_MB. A
    /// record someone still follows (a `/generate` client about to read its result, an event
    /// stream) stays, and so does the newest.
    fn drop_over_budget(&mut self) {
        let mut kept = Vec::new();
        while self.ended_bytes > self.results_budget && self.ended.len() > 1 {
            let Some((id, bytes)) = self.ended.pop_front() else {
                break;
            };
            if self.records.get(&id).is_some_and(Record::followed) {
                kept.push((id, bytes));
                continue;
            }
            self.ended_bytes -= bytes;
            if self.records.remove(&id).is_some() {
                if self.evicted.get() == 0 {
                    tracing::info!(
                        job = %id,
                        job_results_mb = self.results_budget >> 20,
                        "finished jobs hold more than JOB_RESULTS_MB: the oldest are dropped before JOB_TTL_SECONDS (sdserve_jobs_evicted_total counts them)"
                    );
                } else {
                    tracing::debug!(job = %id, bytes, "finished job dropped (JOB_RESULTS_MB)");
                }
                self.evicted.inc();
            }
        }
        for e in kept.into_iter().rev() {
            self.ended.push_front(e);
        }
    }

    /// Forgets finished records past JOB_TTL_SECONDS, and the event channels of finished
    /// records nobody follows any more.
    pub fn expire(&mut self, now: Instant, ttl: Duration) {
        self.records.retain(|_, r| {
            r.finished
                .is_none_or(|(_, at)| now.duration_since(at) < ttl)
        });
        for r in self.records.values_mut() {
            if r.finished.is_some() && r.events.is_some() && !r.followed() {
                r.events = None;
            }
        }
        let records = &self.records;
        let mut freed = 0;
        self.ended.retain(|(id, bytes)| {
            let kept = records.contains_key(id);
            if !kept {
                freed += bytes;
            }
            kept
        });
        self.ended_bytes -= freed;
    }

    /// Takes a waiting job out of the queue and ends it (it never runs); false if it was not
    /// waiting.
    pub fn remove_queued(&mut self, id: &str, why: StopReason) -> bool {
        let Some(index) = self.queue.iter().position(|q| q == id) else {
            return false;
        };
        self.queue.remove(index);
        let speed = self.speed;
        let info = self
            .records
            .get(id)
            .map(|r| r.timeout_info(Instant::now(), speed))
            .unwrap_or_default();
        let (status, err) = outcome_of(why, info);
        self.finish(id, status, Err(err));
        self.announce_positions(index);
        true
    }
}

/// The status and error a stop reason ends a job with.
pub(super) fn outcome_of(why: StopReason, info: TimeoutInfo) -> (JobStatus, ApiError) {
    match why {
        StopReason::Cancelled => (JobStatus::Cancelled, ApiError::Internal("cancelled".into())),
        StopReason::Timeout => (JobStatus::Failed, ApiError::Timeout(info)),
        StopReason::ShuttingDown => (
            JobStatus::Failed,
            ApiError::ModelUnavailable("the server is shutting down".into()),
        ),
    }
}
