//! What every request passes through: its id, the contract's error body for responses axum
//! made itself, one log line and the request metrics; and errors answered before any route ran.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{openai, Shared};
use crate::error::{ApiError, ErrorCode};

/// Per-request figures the handler leaves for the request log.
#[derive(Debug, Clone, Default)]
pub(super) struct RequestStats {
    pub(super) queue_secs: Option<f64>,
    pub(super) gen_secs: Option<f64>,
    pub(super) steps: Option<usize>,
    pub(super) size: Option<String>,
    pub(super) cache: Option<&'static str>,
}

/// An error answered before any route ran (keys, rate limits, body deadline), in the shape of
/// the dialect the path belongs to: OpenAI's on `/v1`, the native contract elsewhere.
pub fn dialect_error(path: &str, e: ApiError) -> Response {
    if path == "/v1" || path.starts_with("/v1/") {
        openai::translate::OpenAiError(e).into_response()
    } else {
        e.into_response()
    }
}

/// A usable request id from the client (visible ASCII, at most 128 bytes), else a fresh one.
fn request_id(headers: &HeaderMap) -> String {
    if let Some(v) = headers.get("x-request-id").and_then(|v| v.to_str().ok()) {
        if !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()) {
            return v.to_string();
        }
    }
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    format!("{:016x}", h.finish())
}

/// Error codes that mean "turned away before any work"; counted in `sdserve_rejections_total`.
const REJECTION_CODES: &[&str] = &[
    "unauthorized",
    "rate_limited",
    "overloaded",
    "payload_too_large",
    "body_timeout",
];

/// Request id, the contract's error body for responses axum made itself (405, rejections),
/// one log line and the request metrics.
pub(super) async fn observe(State(app): State<Shared>, req: Request, next: Next) -> Response {
    let t0 = Instant::now();
    let id = request_id(req.headers());
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let client = crate::security::client_addr(&req).map(|ip| ip.to_string());
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string());
    let mut resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if (status.is_client_error() || status.is_server_error())
        && resp.extensions().get::<ErrorCode>().is_none()
        && !is_json
    {
        // An error axum produced without our body (405, rejections): give it one, keep its
        // headers (e.g. Allow). Our own JSON answers (a 503 /health) pass unchanged.
        let old = std::mem::replace(&mut resp, ApiError::from_status(status).into_response());
        let (parts, _) = old.into_parts();
        for (k, v) in parts.headers.iter() {
            if k != header::CONTENT_TYPE && k != header::CONTENT_LENGTH {
                resp.headers_mut().insert(k.clone(), v.clone());
            }
        }
        *resp.status_mut() = status;
    }
    let code = resp
        .extensions()
        .get::<ErrorCode>()
        .map(|c| c.0)
        .unwrap_or("");
    let stats = resp
        .extensions()
        .get::<RequestStats>()
        .cloned()
        .unwrap_or_default();
    let total = t0.elapsed().as_secs_f64();
    if let Some(reason) = REJECTION_CODES.iter().find(|c| **c == code) {
        app.metrics.count_rejection(reason);
    }
    let key_id = resp
        .extensions()
        .get::<crate::security::CallerKey>()
        .map(|k| k.0.to_string());
    let route_label = route.as_deref().unwrap_or("unmatched");
    app.metrics
        .count_request(route_label, status.as_u16(), code);
    if route.as_deref() == Some("/generate") {
        app.metrics.request_seconds.observe(total);
    }
    tracing::info!(
        request_id = %id,
        key_id = key_id.as_deref(),
        client = client.as_deref(),
        method = %method,
        path = %path,
        status = status.as_u16(),
        error_code = code,
        queue_seconds = stats.queue_secs,
        generation_seconds = stats.gen_secs,
        total_seconds = total,
        steps = stats.steps,
        size = stats.size.as_deref(),
        cache = stats.cache,
        "request"
    );
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}
