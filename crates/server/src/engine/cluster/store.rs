//! The job records in Redis: submit, read, list, cancel, finish, and the reaper.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use redis::{AsyncCommands, Script};

use super::scripts;
use super::unreadable::Unreadable;
use super::wire::{self, now_ms, Record, WireError, WireSpec};
use super::{unavailable, Shared};
use crate::engine::job::{
    new_id, timestamp, Finished, JobEvent, JobLinks, JobProgress, JobSpec, JobStatus, JobView,
    StopReason,
};
use crate::engine::table::outcome_of;
use crate::error::ApiError;

/// Jobs `GET /jobs` lists at most.
const LIST_MAX: isize = 200;

/// What a write to a running job's record did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Written {
    /// Written (for FINISH: this call ended the job).
    Yes,
    /// The job had already ended (someone else finished it); nothing written.
    Ended,
    /// The record is gone (expired or evicted); nothing written, so it does not come back
    /// without a TTL.
    Gone,
}

impl Written {
    fn of(code: i64) -> Self {
        match code {
            1 => Self::Yes,
            0 => Self::Ended,
            _ => Self::Gone,
        }
    }
}

#[derive(Clone)]
pub(super) struct Store {
    sh: Arc<Shared>,
}

fn script(code: &'static str) -> Script {
    Script::new(code)
}

/// One record key as read: absent (`None`), unparsable (`Some(Err)`: written by hand or by
/// another sdserve version; warned about once), or the record and the view a client sees.
pub(super) type Found = Option<Result<(Record, JobView), Unreadable>>;

impl Store {
    pub fn new(sh: Arc<Shared>) -> Self {
        Self { sh }
    }

    fn conn(&self) -> redis::aio::ConnectionManager {
        self.sh.conn.clone()
    }

    fn keys(&self) -> &wire::Keys {
        &self.sh.keys
    }

    /// A record as JSON and the view a client sees: `cancel` whether a stop was asked for,
    /// `from_right` the job's place in the queue counted from the end workers take from.
    /// A record that does not parse answers only its own reads ([`Unreadable`]), the cause
    /// (naming the key) in the log; listings and the reaper skip it.
    fn seen_as(
        &self,
        id: &str,
        json: &str,
        cancel: bool,
        from_right: Option<i64>,
    ) -> Result<(Record, JobView), Unreadable> {
        let record: Record = match serde_json::from_str(json) {
            Ok(r) => r,
            Err(e) => {
                let key = self.keys().job(id);
                self.sh.note_unparsable(&key, &e);
                return Err(Unreadable::of(id, json));
            }
        };
        let mut view = record.view.clone();
        view.cancel_requested |= cancel;
        view.position = match (view.status, from_right) {
            // Pushed on the left, taken from the right: the rightmost runs next.
            (JobStatus::Queued, Some(p)) => Some(p as usize),
            _ => None,
        };
        Ok((record, view))
    }

    /// How long a record lives before it ends: its deadline, then JOB_TTL_SECONDS, with room.
    fn active_ttl_ms(&self, spec: &JobSpec) -> u64 {
        (spec.timeout + self.sh.cfg.job_ttl + self.sh.cluster.lease * 2).as_millis() as u64
    }

    pub fn ended_ttl_ms(&self) -> u64 {
        (self.sh.cfg.job_ttl.as_millis() as u64).max(1)
    }

    pub async fn submit(&self, spec: JobSpec, retry_after_secs: u64) -> Result<JobView, ApiError> {
        let id = new_id(now_ms());
        let created = SystemTime::now();
        let created_ms = wire::unix_ms(created);
        let view = JobView {
            id: id.clone(),
            status: JobStatus::Queued,
            position: None,
            progress: JobProgress {
                step: 0,
                total: spec.progress_total,
                eta_seconds: None,
            },
            created_at: timestamp(created),
            started_at: None,
            finished_at: None,
            cancel_requested: false,
            request: spec.request.clone(),
            result: None,
            error: None,
            links: JobLinks::for_id(&id),
            loading: None,
            preview: None,
        };
        let record = Record {
            view: view.clone(),
            spec: WireSpec::of(&spec),
            created_ms,
            deadline_ms: created_ms + spec.timeout.as_millis() as u64,
            started_ms: None,
            gen_secs: 0.0,
            error: None,
            attempts: 0,
            worker: None,
        };
        let json = serde_json::to_string(&record).map_err(|e| ApiError::Internal(e.to_string()))?;
        let k = self.keys();
        let position: i64 = script(scripts::SUBMIT)
            .key(k.queue())
            .key(k.job(&id))
            .key(k.index())
            .arg(&id)
            .arg(json)
            .arg(self.sh.cfg.max_queued)
            .arg(self.active_ttl_ms(&spec))
            .arg(created_ms)
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        if position < 0 {
            return Err(ApiError::Overloaded { retry_after_secs });
        }
        Ok(JobView {
            position: Some(position as usize),
            ..view
        })
    }

    /// The record, and the view as a client sees it now (an unparsable record: its error).
    pub async fn read(&self, id: &str) -> Result<Option<(Record, JobView)>, ApiError> {
        self.read_found(id)
            .await?
            .transpose()
            .map_err(|u| u.error(id))
    }

    /// `read`, telling an unparsable record (`Some(Err)`) from Redis failing (`Err`).
    pub async fn read_found(&self, id: &str) -> Result<Found, ApiError> {
        let k = self.keys();
        let (json, cancel, index, len): (Option<String>, bool, Option<i64>, i64) = redis::pipe()
            .get(k.job(id))
            .exists(k.cancel(id))
            .cmd("LPOS")
            .arg(k.queue())
            .arg(id)
            .llen(k.queue())
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(json.map(|json| self.seen_as(id, &json, cancel, index.map(|i| len - i))))
    }

    /// `read` for many jobs in one round trip of three commands (two MGETs and the queue),
    /// however many there are: the same answers, in the order of `ids`.
    pub async fn read_many(&self, ids: &[String]) -> Result<Vec<Found>, ApiError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let k = self.keys();
        let (jsons, cancels, queue): (Vec<Option<String>>, Vec<Option<String>>, Vec<String>) =
            redis::pipe()
                .mget(ids.iter().map(|id| k.job(id)).collect::<Vec<_>>())
                .mget(ids.iter().map(|id| k.cancel(id)).collect::<Vec<_>>())
                .lrange(k.queue(), 0, -1)
                .query_async(&mut self.conn())
                .await
                .map_err(unavailable)?;
        // An id's place as LPOS finds it (its first, from the left), counted from the right.
        let mut from_right = HashMap::with_capacity(queue.len());
        for (i, id) in queue.iter().enumerate() {
            from_right
                .entry(id.as_str())
                .or_insert((queue.len() - i) as i64);
        }
        Ok(ids
            .iter()
            .zip(jsons.into_iter().zip(cancels))
            .map(|(id, (json, cancel))| {
                json.map(|json| {
                    self.seen_as(
                        id,
                        &json,
                        cancel.is_some(),
                        from_right.get(id.as_str()).copied(),
                    )
                })
            })
            .collect())
    }

    /// The view a client sees; an unparsable record's is the job failed, or none.
    pub async fn view(&self, id: &str) -> Result<Option<JobView>, ApiError> {
        Ok(match self.read_found(id).await? {
            Some(Ok((_, v))) => Some(v),
            Some(Err(u)) => u.view.map(|v| *v),
            None => None,
        })
    }

    pub async fn list(&self) -> Result<Vec<JobView>, ApiError> {
        let k = self.keys();
        let mut conn = self.conn();
        let ids: Vec<String> = conn
            .zrevrange(k.index(), 0, LIST_MAX - 1)
            .await
            .map_err(unavailable)?;
        let read = self.read_many(&ids).await?;
        let mut views = Vec::with_capacity(ids.len());
        let mut gone = Vec::new();
        for (id, seen) in ids.into_iter().zip(read) {
            match seen {
                Some(Ok((_, v))) => views.push(v),
                // Unparsable: skipped (warned about once); GET /jobs/{id} answers it.
                Some(Err(_)) => {}
                None => gone.push(id),
            }
        }
        if !gone.is_empty() {
            let _: Result<i64, _> = conn.zrem(k.index(), gone).await;
        }
        // Running, then queued in run order, then ended ones newest first (the index order).
        views.sort_by_key(|v| match v.status {
            JobStatus::Running => (0, 0),
            JobStatus::Queued => (1, v.position.unwrap_or(usize::MAX)),
            _ => (2, 0),
        });
        Ok(views)
    }

    pub async fn finished(&self, id: &str) -> Result<Option<Finished>, ApiError> {
        let Some((record, view)) = self.read(id).await? else {
            return Ok(None);
        };
        if !view.status.is_final() {
            return Ok(None);
        }
        let result = match (&view.result, &record.error) {
            (Some(r), _) => Ok(r.clone()),
            (None, Some(e)) => Err(e.error()),
            (None, None) => Err(ApiError::Internal("the job was cancelled".into())),
        };
        Ok(Some(Finished {
            result,
            queue_secs: record.queue_secs(),
            gen_secs: record.gen_secs,
        }))
    }

    pub async fn cancel(&self, id: &str, why: StopReason) -> Result<Option<JobView>, ApiError> {
        let (record, view) = match self.read_found(id).await? {
            Some(Ok(found)) => found,
            // Nothing runs it: nothing to stop; its view says so.
            Some(Err(u)) => return Ok(u.view.map(|v| *v)),
            None => return Ok(None),
        };
        let k = self.keys();
        if why == StopReason::Cancelled || !view.status.is_final() {
            let _: () = self
                .conn()
                .set_ex(k.cancel(id), why as u8, self.ended_ttl_ms().div_ceil(1000))
                .await
                .map_err(unavailable)?;
        }
        if view.status == JobStatus::Queued {
            let info = record.timeout_info(now_ms());
            let (status, err) = outcome_of(why, info);
            if self.end_queued(&record, status, err).await? {
                tracing::info!(job = %id, reason = ?why, "queued job stopped before it started");
            }
        }
        self.view(id).await
    }

    /// The record of a job that ended with `status`.
    pub fn ended(
        record: &Record,
        status: JobStatus,
        result: Result<Arc<crate::api::GenerateResponse>, ApiError>,
    ) -> (Record, JobEvent) {
        let mut r = record.clone();
        r.view.status = status;
        r.view.finished_at = Some(timestamp(SystemTime::now()));
        r.view.position = None;
        r.view.loading = None;
        let event = match result {
            Ok(res) => {
                r.view.result = Some(res.clone());
                JobEvent::Succeeded(res)
            }
            Err(_) if status == JobStatus::Cancelled => JobEvent::Cancelled,
            Err(e) => {
                r.view.error = Some(e.body());
                r.error = Some(WireError::of(&e));
                JobEvent::Failed(e.body())
            }
        };
        (r, event)
    }

    async fn end_queued(
        &self,
        record: &Record,
        status: JobStatus,
        err: ApiError,
    ) -> Result<bool, ApiError> {
        let id = &record.view.id;
        let (ended, event) = Self::ended(record, status, Err(err));
        let k = self.keys();
        let done: i64 = script(scripts::END_QUEUED)
            .key(k.queue())
            .key(k.done(id))
            .key(k.job(id))
            .arg(id)
            .arg(serde_json::to_string(&ended).map_err(|e| ApiError::Internal(e.to_string()))?)
            .arg(self.ended_ttl_ms())
            .arg(k.events())
            .arg(wire::event_message(id, &event))
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(done == 1)
    }

    /// Ends a job at most once (whoever comes first); `Yes` if this call ended it.
    pub async fn finish(
        &self,
        who: &str,
        ended: &Record,
        event: &JobEvent,
    ) -> Result<Written, ApiError> {
        let id = &ended.view.id;
        let k = self.keys();
        let done: i64 = script(scripts::FINISH)
            .key(k.done(id))
            .key(k.job(id))
            .arg(who)
            .arg(serde_json::to_string(ended).map_err(|e| ApiError::Internal(e.to_string()))?)
            .arg(self.ended_ttl_ms())
            .arg(k.events())
            .arg(wire::event_message(id, event))
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(Written::of(done))
    }

    /// Writes a running job's record (when given) and publishes an event (when given),
    /// unless the job has ended or its record is gone.
    pub async fn update(
        &self,
        record: Option<&Record>,
        id: &str,
        event: Option<&JobEvent>,
    ) -> Result<Written, ApiError> {
        let k = self.keys();
        let json = match record {
            Some(r) => serde_json::to_string(r).map_err(|e| ApiError::Internal(e.to_string()))?,
            None => String::new(),
        };
        let written: i64 = script(scripts::UPDATE)
            .key(k.done(id))
            .key(k.job(id))
            .arg(json)
            .arg(k.events())
            .arg(
                event
                    .map(|e| wire::event_message(id, e))
                    .unwrap_or_default(),
            )
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(Written::of(written))
    }

    /// Puts a taken job back at the head of the queue. `own`: a worker gives back its own
    /// lease; otherwise only a lapsed lease counts. True if it was queued again.
    pub async fn requeue(&self, worker: &str, id: &str, own: bool) -> Result<bool, ApiError> {
        let k = self.keys();
        let record = match self.read_found(id).await? {
            Some(Ok((record, _))) => record,
            found => {
                // Gone, or unparsable (no worker could run it): only let go of it.
                let _: Result<i64, _> = self.conn().lrem(k.processing(worker), 0, id).await;
                if found.is_some() {
                    tracing::warn!(job = %id, worker = %worker, "an unparsable job record let go of (not queued again)");
                }
                return Ok(false);
            }
        };
        let reset = record.requeued();
        let done: i64 = script(scripts::REQUEUE)
            .key(k.processing(worker))
            .key(k.lease(id))
            .key(k.done(id))
            .key(k.queue())
            .key(k.job(id))
            .arg(id)
            .arg(serde_json::to_string(&reset).map_err(|e| ApiError::Internal(e.to_string()))?)
            .arg(if own { "1" } else { "0" })
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        if done == 1 {
            self.update(None, id, Some(&JobEvent::Queued { position: 1 }))
                .await?;
        }
        Ok(done == 1)
    }

    /// Workers with a fresh heartbeat, and the queue's length.
    pub async fn overview(&self) -> Result<(Vec<wire::Heartbeat>, usize), ApiError> {
        let k = self.keys();
        let mut conn = self.conn();
        let ids: Vec<String> = conn.smembers(k.workers()).await.map_err(unavailable)?;
        let waiting: usize = conn.llen(k.queue()).await.map_err(unavailable)?;
        let beats: Vec<Option<String>> = if ids.is_empty() {
            Vec::new()
        } else {
            conn.mget(ids.iter().map(|id| k.heartbeat(id)).collect::<Vec<_>>())
                .await
                .map_err(unavailable)?
        };
        let mut workers: Vec<wire::Heartbeat> = ids
            .iter()
            .zip(beats)
            .filter_map(|(id, beat)| match serde_json::from_str(&beat?) {
                Ok(b) => Some(b),
                Err(e) => {
                    self.sh.note_unparsable(&k.heartbeat(id), &e);
                    None
                }
            })
            .collect();
        workers.sort_by(|a: &wire::Heartbeat, b| a.health.id.cmp(&b.health.id));
        Ok((workers, waiting))
    }

    /// Fails waiting jobs past their deadline (they never start); queues again every taken
    /// job whose lease ran out; forgets workers that are gone and hold nothing.
    pub async fn reap(&self) -> Result<(), ApiError> {
        let k = self.keys();
        let mut conn = self.conn();
        let waiting: Vec<String> = conn.lrange(k.queue(), 0, -1).await.map_err(unavailable)?;
        let now = now_ms();
        for (id, seen) in waiting.iter().zip(self.read_many(&waiting).await?) {
            let Some(Ok((record, view))) = seen else {
                continue;
            };
            if view.status == JobStatus::Queued && now >= record.deadline_ms {
                let (status, err) = outcome_of(StopReason::Timeout, record.timeout_info(now));
                if self.end_queued(&record, status, err).await? {
                    tracing::info!(job = %id, "queued job passed its deadline before it started");
                }
            }
        }
        let workers: Vec<String> = conn.smembers(k.workers()).await.map_err(unavailable)?;
        for w in workers {
            let taken: Vec<String> = conn
                .lrange(k.processing(&w), 0, -1)
                .await
                .map_err(unavailable)?;
            for id in &taken {
                let leased: bool = conn.exists(k.lease(id)).await.map_err(unavailable)?;
                if !leased && self.requeue(&w, id, false).await? {
                    tracing::warn!(job = %id, worker = %w, "the job's lease ran out (its worker is gone); queued again");
                }
            }
            let alive: bool = conn.exists(k.heartbeat(&w)).await.map_err(unavailable)?;
            let holding: usize = conn.llen(k.processing(&w)).await.map_err(unavailable)?;
            if !alive && holding == 0 {
                let _: i64 = conn.srem(k.workers(), &w).await.map_err(unavailable)?;
            }
        }
        Ok(())
    }
}
