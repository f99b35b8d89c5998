//! A job's record in the in-process backend: its state, result and event channel, and what it
//! holds for JOB_RESULTS_MB.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use tokio::sync::broadcast;

use super::job::{timestamp, JobEvent, JobLinks, JobProgress, JobSpec, JobStatus, JobView};
use crate::api::GenerateResponse;
use crate::error::{ApiError, TimeoutInfo};
use crate::speed::SpeedProbe;

/// Events buffered per subscriber; a slower one skips progress (never the terminal event:
/// the stream reads it from the record). tokio allocates a channel's slots up front, so a
/// record has a channel only while someone follows it (created by the first `subscribe`).
pub(super) const EVENT_BUFFER: usize = 256;

pub(super) struct Record {
    pub id: String,
    pub seq: u64,
    pub spec: Arc<JobSpec>,
    pub status: JobStatus,
    pub created: SystemTime,
    pub created_instant: Instant,
    pub started: Option<(SystemTime, Instant)>,
    pub finished: Option<(SystemTime, Instant)>,
    pub progress: JobProgress,
    pub cancel_requested: bool,
    /// A `StopReason` as u8 (0: none), read by the worker at every step.
    pub stop: Arc<AtomicU8>,
    pub deadline: Instant,
    pub result: Option<Arc<GenerateResponse>>,
    pub error: Option<ApiError>,
    pub gen_secs: f64,
    pub preview: Option<(usize, Arc<String>)>,
    /// The model the worker is loading for this job (`engine::switch`).
    pub loading: Option<String>,
    /// Who can see previews: event streams that show them (each holds a `PreviewWatch`),
    /// and until when a poller last asked for the latest (A1111 `current_image`). Previews
    /// are made only while one of them can see them.
    pub preview_watchers: Arc<AtomicUsize>,
    pub previews_asked_until: Option<Instant>,
    /// The job's event channel, while someone follows it: a subscriber takes the record's
    /// state and every event after it; nobody needs the events of an unfollowed job.
    pub events: Option<broadcast::Sender<JobEvent>>,
}

/// Bytes of `v` as JSON, counted without building the text.
fn json_len(v: &impl serde::Serialize) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0);
    let _ = serde_json::to_writer(&mut c, v);
    c.0
}

impl Record {
    /// Memory the record holds once finished, roughly, for JOB_RESULTS_MB: its result's base64
    /// images (the first once: `image_base64` and `images[0]` share it) and metadata, the
    /// request (decoded init image and mask, its JSON, PNG texts, prompts), the last preview,
    /// and the record itself. Its event channel's slots are not counted: a finished record has
    /// one only while someone follows it (such records are never dropped early), and the
    /// reaper drops it when they let go.
    pub(super) fn held_bytes(&self) -> usize {
        let result = self
            .result
            .as_ref()
            .map_or(0, |r| r.image_bytes() + json_len(&r.metadata));
        let p = &self.spec.params;
        let images = p.init_image.as_ref().map_or(0, |i| {
            i.image.pixels.len() + i.mask.as_ref().map_or(0, |m| m.pixels.len())
        });
        let request = images
            + json_len(&self.spec.request)
            + self.spec.png_texts.iter().map(String::len).sum::<usize>()
            + p.prompt.len()
            + p.negative_prompt.len()
            + self.spec.model_version.len();
        let preview = self.preview.as_ref().map_or(0, |(_, png)| png.len());
        // The record and its id (map key and the finished queue).
        let fixed =
            std::mem::size_of::<Record>() + std::mem::size_of::<JobSpec>() + 3 * self.id.len();
        result + request + preview + fixed
    }

    /// How far it got by `now`, for a 408's details; `speed` (the CPU speed probe's) says how
    /// long it needs alone.
    pub fn timeout_info(&self, now: Instant, speed: Option<SpeedProbe>) -> TimeoutInfo {
        let started = self.started.map(|s| s.1);
        let started_at = started.unwrap_or(now).max(self.created_instant);
        TimeoutInfo {
            limit_secs: self.spec.timeout.as_secs(),
            setting: self.spec.timeout_setting,
            queued_secs: started_at
                .duration_since(self.created_instant)
                .as_secs_f64(),
            step: started.map_or(0, |_| self.progress.step),
            total: started.map_or(0, |_| self.progress.total),
            running_secs: now.saturating_duration_since(started_at).as_secs_f64(),
            alone_secs: speed.map(|p| p.estimate_request_secs(&self.spec.params)),
        }
    }

    pub(super) fn view(&self, position: Option<usize>) -> JobView {
        JobView {
            id: self.id.clone(),
            status: self.status,
            position,
            progress: self.progress,
            created_at: timestamp(self.created),
            started_at: self.started.map(|s| timestamp(s.0)),
            finished_at: self.finished.map(|f| timestamp(f.0)),
            cancel_requested: self.cancel_requested,
            request: self.spec.request.clone(),
            result: self.result.clone(),
            error: self.error.as_ref().map(ApiError::body),
            links: JobLinks::for_id(&self.id),
            loading: self.loading.clone(),
            preview: self.preview.clone(),
        }
    }

    pub fn emit(&self, event: JobEvent) {
        if let Some(tx) = &self.events {
            let _ = tx.send(event); // no subscriber left is fine
        }
    }

    /// True while someone can see this job's previews (see `preview_watchers`).
    pub(super) fn previews_wanted(&self, now: Instant) -> bool {
        self.preview_watchers.load(Ordering::SeqCst) > 0
            || self.previews_asked_until.is_some_and(|until| now < until)
    }

    pub(super) fn followed(&self) -> bool {
        self.events
            .as_ref()
            .is_some_and(|tx| tx.receiver_count() > 0)
    }
}

/// Holds a job's previews wanted (`Record::preview_watchers`) until dropped.
pub(super) struct WatcherCount(pub Arc<AtomicUsize>);

impl WatcherCount {
    pub fn new(count: Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Self(count)
    }
}

impl Drop for WatcherCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
