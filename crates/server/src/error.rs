//! The one API error type, and the one table from error to HTTP status and `error_code`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

/// Every error the HTTP API can answer with.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApiError {
    /// The body is not a JSON object (syntax error, wrong content type, not an object).
    #[error("request body is not valid JSON")]
    InvalidJson(String),
    /// Fields break rules of the contract (including unknown fields and wrong types): every
    /// broken field of the request, never an empty list.
    #[error("request validation failed")]
    Validation(Vec<FieldError>),
    #[error("no such route")]
    NotFound(String),
    /// An unknown job id (never existed, or finished more than JOB_TTL_SECONDS ago).
    #[error("no such job")]
    JobNotFound(String),
    #[error("method not allowed")]
    MethodNotAllowed(String),
    #[error("request body too large")]
    PayloadTooLarge(usize),
    /// Queue wait plus generation passed the deadline; the run was cancelled.
    #[error("generation timed out")]
    Timeout(TimeoutInfo),
    /// MAX_CONCURRENT_REQUESTS are already admitted.
    #[error("server overloaded, retry later")]
    Overloaded { retry_after_secs: u64 },
    /// The model is loading, failed to load, or the server is shutting down.
    #[error("model unavailable")]
    ModelUnavailable(String),
    /// QUEUE_URL's Redis cannot be reached (or answers errors): the job queue is unavailable
    /// until it is back, which the server notices by itself.
    #[error("job queue unavailable")]
    QueueUnavailable(String),
    /// The device ran out of memory; with `retry_after_secs` when the memory breaker is open.
    #[error("out of memory")]
    OutOfMemory {
        detail: String,
        retry_after_secs: Option<u64>,
    },
    /// Keys are on and the request has no valid one (the reason says which header is wrong,
    /// never anything about the keys).
    #[error("a valid API key is required")]
    Unauthorized(String),
    /// `RATE_LIMIT_PER_MINUTE` is spent for this key (or client address).
    #[error("rate limit reached, retry later")]
    RateLimited { retry_after_secs: u64 },
    /// The request body did not arrive within REQUEST_BODY_TIMEOUT_SECONDS.
    #[error("request body too slow")]
    BodyTimeout(u64),
    /// Anything else. The cause goes to the log, never to the client.
    #[error("internal error")]
    Internal(String),
}

/// The setting a job's deadline comes from: the one its 408 tells the client to raise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, serde::Deserialize)]
pub enum DeadlineSetting {
    /// `/generate` and the dialects' routes.
    #[default]
    Generation,
    /// `POST /jobs`.
    Job,
}

impl DeadlineSetting {
    pub fn name(self) -> &'static str {
        match self {
            Self::Generation => "GENERATION_TIMEOUT_SECONDS",
            Self::Job => "JOB_TIMEOUT_SECONDS",
        }
    }
}

/// How far a request got before its deadline, for the 408's details. `TimeoutInfo::from(secs)`
/// when nothing more is known.
#[derive(Debug, Clone, PartialEq, Default, Serialize, serde::Deserialize)]
pub struct TimeoutInfo {
    /// The deadline in seconds (0: unknown), and the setting it comes from.
    pub limit_secs: u64,
    #[serde(default)]
    pub setting: DeadlineSetting,
    /// Seconds in the queue before the run started (all of them when it never started).
    pub queued_secs: f64,
    /// Steps done and planned when it was stopped (0 of 0: it never started a step).
    pub step: usize,
    pub total: usize,
    /// Seconds the run took until it was stopped.
    pub running_secs: f64,
    /// Seconds the request needs alone at the speed the CPU speed probe measured (`speed`);
    /// `None` when nothing was measured (not yet, or not on a CPU).
    #[serde(default)]
    pub alone_secs: Option<f64>,
}

impl From<u64> for TimeoutInfo {
    fn from(limit_secs: u64) -> Self {
        Self {
            limit_secs,
            ..Self::default()
        }
    }
}

impl TimeoutInfo {
    /// Seconds the whole request would have needed at the speed it ran (queue wait included,
    /// the final decode not), when at least one step finished.
    pub fn needed_secs(&self) -> Option<f64> {
        (self.step > 0 && self.total >= self.step)
            .then(|| self.queued_secs + self.running_secs * self.total as f64 / self.step as f64)
    }

    fn details(&self) -> Option<String> {
        if self.limit_secs == 0 {
            return None;
        }
        let setting = self.setting.name();
        let head = format!(
            "queue wait plus generation passed {setting}={}; the run was stopped",
            self.limit_secs
        );
        Some(match self.needed_secs() {
            Some(needed) => format!(
                "{head} at step {} of {} after {:.1} s ({:.1} s of it in the queue). At this speed \
                 the request needs about {needed:.0} s: raise {setting} to at least {:.0}, or \
                 ask for fewer steps or a smaller size",
                self.step,
                self.total,
                self.queued_secs + self.running_secs,
                self.queued_secs,
                (needed * 1.15).ceil()
            ),
            None => {
                let waited = if self.running_secs > 0.0 {
                    format!(
                        "after {:.1} s in the queue and {:.1} s on its first step",
                        self.queued_secs, self.running_secs
                    )
                } else {
                    format!("after {:.1} s in the queue", self.queued_secs)
                };
                let speed = match self.alone_secs {
                    Some(alone) => format!(
                        "At the speed measured on this machine it needs about {alone:.0} s \
                         once it runs: {setting} must cover that plus the queue wait"
                    ),
                    None => "How long it needs is not known: no step of it ran and no speed \
                             has been measured on this machine yet"
                        .to_string(),
                };
                format!(
                    "{head} before its first step ended, {waited}. {speed}. \
                     Raise {setting}, or send fewer requests at once"
                )
            }
        })
    }
}

/// One broken rule of one request field.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, ToSchema)]
pub struct FieldError {
    /// The field's name in the request.
    pub field: String,
    /// The rule it breaks, and the value it had when that helps.
    pub rule: String,
}

/// The body of every error response.
#[derive(Debug, Clone, Serialize, serde::Deserialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong, for a person.
    pub error: String,
    /// Which field and which rule (every broken field, `field: rule` joined by `; `), or other
    /// specifics; null when there is nothing to add.
    pub details: Option<String>,
    /// Stable snake_case code.
    pub error_code: String,
    /// Only with `validation_error`: every broken field, so a client can fix its request in one
    /// round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fields: Option<Vec<FieldError>>,
}

/// Carried in response extensions so the request log and metrics can name the error code.
#[derive(Debug, Clone, Copy)]
pub struct ErrorCode(pub &'static str);

impl ApiError {
    /// The table: status and stable code for each error.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Self::InvalidJson(_) => (StatusCode::BAD_REQUEST, "invalid_json"),
            Self::Validation(_) => (StatusCode::UNPROCESSABLE_ENTITY, "validation_error"),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            Self::JobNotFound(_) => (StatusCode::NOT_FOUND, "job_not_found"),
            Self::MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            Self::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            Self::Timeout(_) => (StatusCode::REQUEST_TIMEOUT, "timeout"),
            Self::Overloaded { .. } => (StatusCode::TOO_MANY_REQUESTS, "overloaded"),
            Self::ModelUnavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "model_unavailable"),
            Self::QueueUnavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "queue_unavailable"),
            Self::OutOfMemory { .. } => (StatusCode::SERVICE_UNAVAILABLE, "out_of_memory"),
            Self::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Self::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            Self::BodyTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "body_timeout"),
            Self::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error"),
        }
    }

    /// A 422 for one broken field.
    pub fn validation(field: &str, rule: impl Into<String>) -> Self {
        Self::Validation(vec![FieldError {
            field: field.to_string(),
            rule: rule.into(),
        }])
    }

    /// The broken fields of a 422, in request-reading order (empty for other errors).
    pub fn fields(&self) -> &[FieldError] {
        match self {
            Self::Validation(fields) => fields,
            _ => &[],
        }
    }

    /// The error for a bare status (used for responses that axum produced itself).
    pub fn from_status(status: StatusCode) -> Self {
        match status {
            StatusCode::NOT_FOUND => Self::NotFound("no such route".into()),
            StatusCode::METHOD_NOT_ALLOWED => {
                Self::MethodNotAllowed("method not allowed on this route".into())
            }
            StatusCode::PAYLOAD_TOO_LARGE => Self::PayloadTooLarge(0),
            StatusCode::REQUEST_TIMEOUT => Self::Timeout(TimeoutInfo::default()),
            StatusCode::SERVICE_UNAVAILABLE => Self::ModelUnavailable("service unavailable".into()),
            s if s.is_client_error() => Self::InvalidJson(format!("request rejected ({s})")),
            s => Self::Internal(format!("status {s}")),
        }
    }

    fn details(&self) -> Option<String> {
        match self {
            Self::InvalidJson(d)
            | Self::NotFound(d)
            | Self::JobNotFound(d)
            | Self::MethodNotAllowed(d)
            | Self::ModelUnavailable(d)
            | Self::QueueUnavailable(d)
            | Self::Unauthorized(d)
            | Self::OutOfMemory { detail: d, .. } => Some(d.clone()),
            Self::Validation(fields) => Some(
                fields
                    .iter()
                    .map(|f| format!("{}: {}", f.field, f.rule))
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
            Self::PayloadTooLarge(0) => None,
            Self::PayloadTooLarge(n) => Some(format!("the body may hold at most {n} bytes")),
            Self::Timeout(info) => info.details(),
            Self::Overloaded { retry_after_secs } => Some(format!(
                "all request slots are taken; retry after {retry_after_secs} s"
            )),
            Self::RateLimited { retry_after_secs } => Some(format!(
                "RATE_LIMIT_PER_MINUTE is spent for this caller; retry after {retry_after_secs} s"
            )),
            Self::BodyTimeout(s) => Some(format!(
                "the whole request body must arrive within {s} seconds"
            )),
            // Never leak internals: the cause is logged by whoever built this error.
            Self::Internal(_) => None,
        }
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: self.to_string(),
            details: self.details(),
            error_code: self.status_and_code().1.to_string(),
            fields: (!self.fields().is_empty()).then(|| self.fields().to_vec()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if let Self::Internal(cause) = &self {
            tracing::error!(cause = %cause, "internal error");
        }
        let mut resp = (status, axum::Json(self.body())).into_response();
        let retry_after = match self {
            Self::Overloaded { retry_after_secs } | Self::RateLimited { retry_after_secs } => {
                Some(retry_after_secs)
            }
            Self::OutOfMemory {
                retry_after_secs, ..
            } => retry_after_secs,
            _ => None,
        };
        if let Some(secs) = retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let Self::Unauthorized(_) = self {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"sdserve\""),
            );
        }
        resp.extensions_mut().insert(ErrorCode(code));
        // The error itself, so a dialect's outer layer (OpenAI's `/v1` shape) can re-render it.
        resp.extensions_mut().insert(self);
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_the_contract() {
        let cases = [
            (ApiError::InvalidJson("x".into()), 400, "invalid_json"),
            (ApiError::validation("steps", "x"), 422, "validation_error"),
            (ApiError::NotFound("x".into()), 404, "not_found"),
            (ApiError::JobNotFound("x".into()), 404, "job_not_found"),
            (
                ApiError::MethodNotAllowed("x".into()),
                405,
                "method_not_allowed",
            ),
            (ApiError::PayloadTooLarge(1), 413, "payload_too_large"),
            (ApiError::Timeout(60.into()), 408, "timeout"),
            (
                ApiError::Overloaded {
                    retry_after_secs: 1,
                },
                429,
                "overloaded",
            ),
            (
                ApiError::ModelUnavailable("x".into()),
                503,
                "model_unavailable",
            ),
            (
                ApiError::QueueUnavailable("x".into()),
                503,
                "queue_unavailable",
            ),
            (
                ApiError::OutOfMemory {
                    detail: "x".into(),
                    retry_after_secs: None,
                },
                503,
                "out_of_memory",
            ),
            (ApiError::Unauthorized("x".into()), 401, "unauthorized"),
            (
                ApiError::RateLimited {
                    retry_after_secs: 1,
                },
                429,
                "rate_limited",
            ),
            (ApiError::BodyTimeout(30), 408, "body_timeout"),
            (ApiError::Internal("secret".into()), 500, "internal_error"),
        ];
        for (err, status, code) in cases {
            assert_eq!(
                err.status_and_code(),
                (StatusCode::from_u16(status).unwrap(), code)
            );
            assert_eq!(err.body().error_code, code);
        }
    }

    #[test]
    fn internal_details_are_hidden_and_fields_named() {
        let body = ApiError::Internal("secret path /x".into()).body();
        assert!(body.details.is_none());
        assert!(!body.error.contains("secret"));
        let body = ApiError::validation("steps", "must be between 1 and 50").body();
        assert_eq!(
            body.details.as_deref(),
            Some("steps: must be between 1 and 50")
        );
        assert!(ApiError::Timeout(60.into()).body().fields.is_none());
    }

    #[test]
    fn every_broken_field_is_in_details_and_the_list() {
        let err = ApiError::Validation(vec![
            FieldError {
                field: "steps".into(),
                rule: "too many".into(),
            },
            FieldError {
                field: "width".into(),
                rule: "odd".into(),
            },
        ]);
        let body = serde_json::to_value(err.body()).unwrap();
        assert_eq!(body["details"], "steps: too many; width: odd");
        assert_eq!(
            body["fields"],
            serde_json::json!([{"field": "steps", "rule": "too many"}, {"field": "width", "rule": "odd"}])
        );
        let other = serde_json::to_value(ApiError::Timeout(60.into()).body()).unwrap();
        assert!(other.get("fields").is_none(), "{other}");
    }

    #[test]
    fn a_timeout_says_what_the_request_needed_and_what_to_raise() {
        // 8 of 20 steps in 30 s after 6 s in the queue: 6 + 30 * 20 / 8 = 81 s.
        let info = TimeoutInfo {
            limit_secs: 60,
            setting: DeadlineSetting::Generation,
            queued_secs: 6.0,
            step: 8,
            total: 20,
            running_secs: 30.0,
            alone_secs: None,
        };
        assert_eq!(info.needed_secs(), Some(81.0));
        let d = ApiError::Timeout(info.clone()).body().details.unwrap();
        for want in [
            "GENERATION_TIMEOUT_SECONDS=60",
            "at step 8 of 20 after 36.0 s (6.0 s of it in the queue)",
            "needs about 81 s",
            "raise GENERATION_TIMEOUT_SECONDS to at least 94",
            "fewer steps or a smaller size",
        ] {
            assert!(d.contains(want), "{want:?} not in {d}");
        }
        // A `/jobs` job names the setting its deadline comes from.
        let d = ApiError::Timeout(TimeoutInfo {
            setting: DeadlineSetting::Job,
            ..info.clone()
        })
        .body()
        .details
        .unwrap();
        assert!(d.contains("JOB_TIMEOUT_SECONDS=60"), "{d}");
        assert!(
            d.contains("raise JOB_TIMEOUT_SECONDS to at least 94"),
            "{d}"
        );
        assert!(!d.contains("GENERATION_TIMEOUT_SECONDS"), "{d}");
        let queued = ApiError::Timeout(TimeoutInfo {
            queued_secs: 60.2,
            ..60.into()
        });
        let d = queued.body().details.unwrap();
        assert!(
            d.contains("before its first step ended, after 60.2 s in the queue"),
            "{d}"
        );
        assert!(
            d.contains("no speed has been measured on this machine yet"),
            "{d}"
        );
        let measured = ApiError::Timeout(TimeoutInfo {
            queued_secs: 60.2,
            alone_secs: Some(151.4),
            ..60.into()
        });
        let d = measured.body().details.unwrap();
        assert!(
            d.contains("measured on this machine it needs about 151 s once it runs"),
            "{d}"
        );
        assert!(ApiError::Timeout(TimeoutInfo::default())
            .body()
            .details
            .is_none());
    }
}
