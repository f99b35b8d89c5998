//! The jobs routes: `POST /jobs`, `GET /jobs`, `GET /jobs/{id}`, `GET /jobs/{id}/events` (SSE),
//! `DELETE /jobs/{id}`. Thin: the engine owns the life cycle.

use std::convert::Infallible;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, Stream};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use utoipa::ToSchema;

use super::{job_spec, read_generate_body, GenerateRequest, Shared};
use crate::engine::job::JobLinks;
use crate::engine::{Engine, JobEvent, JobStatus, JobView};
use crate::error::{ApiError, ErrorBody};

/// The 202 body of `POST /jobs`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JobCreated {
    pub id: String,
    pub status: JobStatus,
    /// Place in the queue (1 runs next).
    pub position: Option<usize>,
    pub links: JobLinks,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JobList {
    /// Running and queued jobs in run order, then finished ones (kept JOB_TTL_SECONDS), newest
    /// first.
    pub jobs: Vec<JobView>,
}

/// Queue a generation; answers at once.
#[utoipa::path(
    post,
    path = "/jobs",
    tag = "jobs",
    request_body = GenerateRequest,
    responses(
        (status = 202, description = "Queued; `Location: /jobs/{id}`", body = JobCreated),
        (status = 400, description = "`invalid_json`", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 422, description = "`validation_error`: `details` names the field and rule", body = ErrorBody),
        (status = 429, description = "`overloaded`: MAX_QUEUED_JOBS jobs (of every route) are waiting; see `Retry-After`", body = ErrorBody),
        (status = 503, description = "`model_unavailable`, `out_of_memory`, or `queue_unavailable` (QUEUE_URL's Redis cannot be reached)", body = ErrorBody),
    )
)]
pub(super) async fn create(
    State(app): State<Shared>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let mut req = read_generate_body(&app, &headers, body).await?;
    let info = app.engine.model_info()?;
    let (info, _) = super::resolve::adapters_info(&app, info, &req, None).await;
    let info = super::resolve::named_model(&app, info, &mut req, "model").await?;
    let vae = super::resolve::named_vae(&app, &req, "vae", info.limits).await?;
    super::resolve::named_upscaler(&app, &req).await?;
    super::resolve::face_restorer(&app, &req).await?;
    super::resolve::named_controlnets(&app, &mut req, "controlnets").await?;
    super::resolve::named_ip_adapters(&app, &mut req, "ip_adapters").await?;
    let spec = job_spec(
        req,
        vae,
        &info,
        app.engine.config().job_timeout,
        crate::error::DeadlineSetting::Job,
    )?;
    let view = app.engine.submit(spec)?;
    let location = view.links.self_.clone();
    let body = JobCreated {
        id: view.id,
        status: view.status,
        position: view.position,
        links: view.links,
    };
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        Json(body),
    )
        .into_response())
}

/// Running and queued jobs in run order, then the recent finished ones.
#[utoipa::path(get, path = "/jobs", tag = "jobs", responses((status = 200, body = JobList), (status = 503, description = "`queue_unavailable`: QUEUE_URL's Redis cannot be reached", body = ErrorBody)))]
pub(super) async fn list(State(app): State<Shared>) -> Result<Json<JobList>, ApiError> {
    Ok(Json(JobList {
        jobs: app.engine.jobs()?,
    }))
}

/// One job: status, queue position, progress with ETA, and its result or error once ended.
#[utoipa::path(
    get,
    path = "/jobs/{id}",
    tag = "jobs",
    params(("id" = String, Path, description = "The job id")),
    responses(
        (status = 200, body = JobView),
        (status = 404, description = "`job_not_found`", body = ErrorBody),
        (status = 503, description = "`queue_unavailable`: QUEUE_URL's Redis cannot be reached", body = ErrorBody),
    )
)]
pub(super) async fn get_one(
    State(app): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    app.engine.job(&id).map(Json)
}

/// Cancel: a queued job never runs, a running one stops within one step. Answers at once.
#[utoipa::path(
    delete,
    path = "/jobs/{id}",
    tag = "jobs",
    params(("id" = String, Path, description = "The job id")),
    responses(
        (status = 200, description = "The job as it stands, `cancel_requested: true`", body = JobView),
        (status = 404, description = "`job_not_found`", body = ErrorBody),
        (status = 503, description = "`queue_unavailable`: QUEUE_URL's Redis cannot be reached", body = ErrorBody),
    )
)]
pub(super) async fn cancel(
    State(app): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    app.engine.cancel(&id).map(Json)
}

/// Server-Sent Events: `state` (the job now) first, then `queued {position}`, `started`,
/// `progress {step, total, eta_seconds}`, `preview {step, image_base64}`, and last exactly one of
/// `succeeded {result}`, `failed {error}`, `cancelled`; then the stream closes.
/// One Server-Sent Event of `GET /jobs/{id}/events`, as a client's parser sees it.
#[derive(Serialize, ToSchema)]
#[allow(dead_code)] // documentation only
pub struct SseEvent {
    /// The event's type.
    event: SseEventName,
    /// JSON: `state` the job view, `queued {id, position}`, `started {id}`, `loading {id,
    /// model}` (the worker loads the MODELS_DIR model the job names), `progress {id,
    /// step, total, eta_seconds}`, `preview {id, step, image_base64}`, `succeeded {id, result}`,
    /// `failed {id, error}`, `cancelled {id}`.
    data: String,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)] // documentation only
pub enum SseEventName {
    State,
    Queued,
    Started,
    Loading,
    Progress,
    Preview,
    Succeeded,
    Failed,
    Cancelled,
}

#[utoipa::path(
    get,
    path = "/jobs/{id}/events",
    tag = "jobs",
    params(("id" = String, Path, description = "The job id")),
    responses(
        (status = 200, description = "`text/event-stream`; each `data:` is JSON", content_type = "text/event-stream", body = SseEvent),
        (status = 404, description = "`job_not_found`", body = ErrorBody),
        (status = 503, description = "`queue_unavailable`: QUEUE_URL's Redis cannot be reached", body = ErrorBody),
    )
)]
pub(super) async fn events(
    State(app): State<Shared>,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let (view, rx) = app.engine.subscribe(&id)?;
    // This stream shows previews: they are made while it lives.
    let watch = app.engine.watch_previews(&id);
    let stream = event_stream(app.engine.clone(), id, view, rx, watch);
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

enum Phase {
    First(Box<JobView>, broadcast::Receiver<JobEvent>),
    /// The latest preview made before the stream joined, then live from its step on.
    CatchUp(JobEvent, usize, broadcast::Receiver<JobEvent>),
    /// Live events; previews of steps up to the one caught up with are not sent twice.
    Live(broadcast::Receiver<JobEvent>, usize),
    Last(JobEvent),
    Done,
}

fn sse(event: &JobEvent, id: &str) -> Event {
    Event::default()
        .event(event.name())
        .data(event.data(id).to_string())
}

/// The terminal event of the job as the record has it, when it has ended.
fn terminal_from_record(engine: &Engine, id: &str) -> Option<JobEvent> {
    engine.job(id).ok().as_ref().and_then(JobEvent::terminal)
}

/// `state`, then the live events until exactly one terminal event.
fn event_stream(
    engine: Engine,
    id: String,
    view: JobView,
    rx: broadcast::Receiver<JobEvent>,
    watch: Option<crate::engine::PreviewWatch>,
) -> impl Stream<Item = Result<Event, Infallible>> {
    stream::unfold(Phase::First(Box::new(view), rx), move |phase| {
        // Owned by the stream: dropped with it (the end, or the client gone).
        let _watch = &watch;
        let engine = engine.clone();
        let id = id.clone();
        async move {
            let (event, next) = match phase {
                Phase::First(view, rx) => {
                    let data = serde_json::to_string(&*view).unwrap_or_default();
                    // A stream that joins a running job shows its latest preview at once
                    // rather than after the next PREVIEW_EVERY steps.
                    let next = match JobEvent::terminal(&view) {
                        Some(t) => Phase::Last(t),
                        None => match engine.latest_preview(&id) {
                            Some((step, png_base64)) => {
                                Phase::CatchUp(JobEvent::Preview { step, png_base64 }, step, rx)
                            }
                            None => Phase::Live(rx, 0),
                        },
                    };
                    (Event::default().event("state").data(data), next)
                }
                Phase::CatchUp(preview, step, rx) => (sse(&preview, &id), Phase::Live(rx, step)),
                Phase::Live(mut rx, seen) => loop {
                    match rx.recv().await {
                        Ok(e) if e.is_final() => break (sse(&e, &id), Phase::Done),
                        Ok(JobEvent::Preview { step, .. }) if step <= seen => {}
                        Ok(e) => break (sse(&e, &id), Phase::Live(rx, seen)),
                        // A slow reader skipped events; the end is never lost: the record
                        // has it.
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            if let Some(t) = terminal_from_record(&engine, &id) {
                                break (sse(&t, &id), Phase::Done);
                            }
                        }
                        Err(broadcast::error::RecvError::Closed) => {
                            match terminal_from_record(&engine, &id) {
                                Some(t) => break (sse(&t, &id), Phase::Done),
                                None => return None,
                            }
                        }
                    }
                },
                Phase::Last(t) => (sse(&t, &id), Phase::Done),
                Phase::Done => return None,
            };
            Some((Ok(event), next))
        }
    })
}
