//! Previews across replicas. The running worker makes a job's previews only while someone can
//! see them, and API replicas say so through Redis:
//! - an event stream showing previews holds a `ClusterWatch`; while any does, its process's
//!   poller keeps the job's `previews` key alive (`PREVIEWS_TTL`);
//! - a poller's ask (A1111 `progress`) sets that key for its window;
//! - the worker reads the key with its stop-request poll, and keeps the latest preview it made
//!   under the job's `latest_preview` key, which pollers on any replica read.

use std::sync::Arc;
use std::time::Duration;

use redis::AsyncCommands;

use super::{lock, unavailable, Shared, CALL_TIMEOUT};
use crate::engine::PreviewWatch;
use crate::error::ApiError;

/// Life of a job's `previews` key as a stream renews it: a few of the poller's renewals, so a
/// watcher gone stops previews about this much later.
pub(super) const PREVIEWS_TTL: Duration = Duration::from_millis(1000);

/// One event stream showing a job's previews, counted in `Shared::preview_watchers` while it
/// lives.
struct ClusterWatch {
    sh: Arc<Shared>,
    id: String,
}

impl Drop for ClusterWatch {
    fn drop(&mut self) {
        let mut watchers = lock(&self.sh.preview_watchers);
        if let Some(n) = watchers.get_mut(&self.id) {
            *n -= 1;
            if *n == 0 {
                watchers.remove(&self.id);
            }
        }
    }
}

/// An event stream of `id` that shows previews, counted while it lives.
pub(super) fn watch(sh: &Arc<Shared>, id: &str) -> PreviewWatch {
    *lock(&sh.preview_watchers)
        .entry(id.to_string())
        .or_insert(0) += 1;
    Box::new(ClusterWatch {
        sh: sh.clone(),
        id: id.to_string(),
    })
}

/// Keeps the `previews` key of every job this process's streams watch alive.
pub(super) async fn renew_keys(sh: &Shared) {
    let ids: Vec<String> = lock(&sh.preview_watchers).keys().cloned().collect();
    if ids.is_empty() {
        return;
    }
    let mut pipe = redis::pipe();
    for id in &ids {
        pipe.set(sh.keys.previews(id), 1)
            .arg("PX")
            .arg(PREVIEWS_TTL.as_millis() as u64)
            .ignore();
    }
    let _: Result<(), _> =
        tokio::time::timeout(CALL_TIMEOUT, pipe.query_async::<()>(&mut sh.conn.clone()))
            .await
            .unwrap_or(Ok(()));
}

/// A poller shows `id`'s latest preview: previews are made for `window`.
pub(super) async fn ask(sh: &Shared, id: &str, window: Duration) -> Result<(), ApiError> {
    sh.conn
        .clone()
        .set_options::<_, _, ()>(
            sh.keys.previews(id),
            1,
            redis::SetOptions::default()
                .with_expiration(redis::SetExpiry::PX(window.as_millis() as u64)),
        )
        .await
        .map_err(unavailable)
}

/// The worker keeps the preview it made as the job's latest, for `ttl`.
pub(super) async fn store_latest(sh: &Shared, id: &str, step: usize, png: &str, ttl: Duration) {
    let _: Result<(), _> = sh
        .conn
        .clone()
        .pset_ex(
            sh.keys.latest_preview(id),
            format!("{step}:{png}"),
            ttl.as_millis().max(1) as u64,
        )
        .await;
}

/// The latest preview made of `id` (its step and base64 PNG), if any.
pub(super) async fn latest(
    sh: &Shared,
    id: &str,
) -> Result<Option<(usize, Arc<String>)>, ApiError> {
    let held: Option<String> = sh
        .conn
        .clone()
        .get(sh.keys.latest_preview(id))
        .await
        .map_err(unavailable)?;
    Ok(held.and_then(|h| {
        let (step, png) = h.split_once(':')?;
        Some((step.parse().ok()?, Arc::new(png.to_string())))
    }))
}
