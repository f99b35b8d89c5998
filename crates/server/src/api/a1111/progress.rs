//! A1111's `progress`, `interrupt` and `skip`: they act on the A1111 requests in flight (the
//! dialect's `active` list), never on other dialects' work.

use std::sync::atomic::Ordering;

use axum::extract::{RawQuery, State};
use axum::Json;
use serde_json::{json, Value};

use super::{job_timestamp, lock, Active};
use crate::api::{query_bool, AppState, Shared};
use crate::error::ApiError;

/// A1111's `progress`: the oldest A1111 request in flight, its batch and step. Unless
/// `skip_current_image=true`, it asks for the job's previews (PREVIEW): they are made while
/// a client polls for them, and `current_image` is the latest.
#[utoipa::path(
    get,
    path = "/sdapi/v1/progress",
    tag = "a1111",
    params(("skip_current_image" = Option<bool>, Query, description = "`true`: no `current_image` (and no previews made for it)")),
    responses((status = 200, body = super::schema::A1111Progress), (status = 422, description = "`skip_current_image` is not a boolean", body = crate::error::ErrorBody))
)]
pub(super) async fn progress(
    State(app): State<Shared>,
    RawQuery(query): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let skip_image = query_bool(query.as_deref(), "skip_current_image")?.unwrap_or(false);
    let active = lock(&app.a1111.active).first().cloned();
    let Some(a) = active else {
        return Ok(Json(json!({
            "progress": 0.0,
            "eta_relative": 0.0,
            "state": {
                "skipped": false, "interrupted": false, "stopping_generation": false,
                "job": "", "job_count": 0, "job_timestamp": "0", "job_no": 0,
                "sampling_step": 0, "sampling_steps": 0,
            },
            "current_image": null,
            "textinfo": null,
        })));
    };
    let job_no = a.job_no.load(Ordering::SeqCst);
    let job_id = lock(&a.job).clone();
    if let (Some(id), false) = (&job_id, skip_image) {
        app.engine.ask_previews(id);
    }
    let preview = job_id
        .as_deref()
        .filter(|_| !skip_image)
        .and_then(|id| app.engine.latest_preview(id))
        .map(|(_, png)| png);
    let job = job_id.and_then(|id| app.engine.job(&id).ok());
    let (step, steps, job_eta, preview) = match &job {
        Some(j) => (
            j.progress.step,
            j.progress.total,
            j.progress.eta_seconds,
            preview,
        ),
        None => (0, 0, None, None),
    };
    let within = if steps > 0 {
        (step as f64 / steps as f64).min(1.0)
    } else {
        0.0
    };
    let batches_done = f64::from(job_no) + within;
    let progress = batches_done / f64::from(a.n_iter);
    let elapsed = a.started.elapsed().as_secs_f64();
    let batches_after = a.n_iter.saturating_sub(job_no + 1);
    let eta = match job_eta {
        Some(eta) => batches_eta(eta, elapsed, batches_done, batches_after),
        // Before the job's first step: A1111's own estimate from the time so far.
        None if progress > 0.0 => elapsed / progress - elapsed,
        None => 0.0,
    };
    Ok(Json(json!({
        "progress": progress,
        "eta_relative": eta,
        "state": {
            "skipped": a.skipped.load(Ordering::SeqCst),
            "interrupted": a.interrupted.load(Ordering::SeqCst),
            "stopping_generation": false,
            "job": format!("Batch {} out of {}", job_no + 1, a.n_iter),
            "job_count": a.n_iter,
            "job_timestamp": job_timestamp(),
            "job_no": job_no,
            "sampling_step": step,
            "sampling_steps": steps,
        },
        "current_image": preview.as_deref(),
        "textinfo": null,
    })))
}

/// Seconds left for the whole request: the running job's own ETA, plus the batches after it at
/// the mean time per batch so far (`elapsed / batches_done`).
fn batches_eta(job_eta: f64, elapsed: f64, batches_done: f64, batches_after: u32) -> f64 {
    let per_batch = if batches_done > 0.0 {
        elapsed / batches_done
    } else {
        0.0
    };
    job_eta + f64::from(batches_after) * per_batch
}

/// Cancels the job `a` runs now, as `DELETE /jobs/{id}` does (stopped within one step).
fn cancel_job(app: &AppState, a: &Active) {
    if let Some(id) = lock(&a.job).clone() {
        let _ = app.engine.cancel(&id);
    }
}

/// Stops every A1111 request in flight (each answers with the images it finished).
#[utoipa::path(post, path = "/sdapi/v1/interrupt", tag = "a1111", responses((status = 200, description = "`{}`")))]
pub(super) async fn interrupt(State(app): State<Shared>) -> Json<Value> {
    for a in lock(&app.a1111.active).iter() {
        a.interrupted.store(true, Ordering::SeqCst);
        cancel_job(&app, a);
        a.stop.notify_one();
    }
    Json(json!({}))
}

/// Stops the running batch of each A1111 request; the next batch goes on.
#[utoipa::path(post, path = "/sdapi/v1/skip", tag = "a1111", responses((status = 200, description = "`{}`")))]
pub(super) async fn skip(State(app): State<Shared>) -> Json<Value> {
    for a in lock(&app.a1111.active).iter() {
        a.skipped.store(true, Ordering::SeqCst);
        cancel_job(&app, a);
        a.stop.notify_one();
    }
    Json(json!({}))
}

#[cfg(test)]
mod tests {
    use super::batches_eta;

    #[test]
    fn the_eta_adds_the_batches_still_to_come() {
        // Half of batch 0 done in 10 s, 10 s left in it, one batch after it at 20 s a batch.
        assert_eq!(batches_eta(10.0, 10.0, 0.5, 1), 30.0);
        // The last batch: its own ETA only.
        assert_eq!(batches_eta(4.0, 50.0, 2.5, 0), 4.0);
        assert_eq!(batches_eta(3.0, 0.0, 0.0, 2), 3.0);
    }
}
