//! A job record this version cannot parse (written by another sdserve version, or by hand), as
//! its own reads answer it: the job failed with a named error, or no job.

use crate::engine::job::{JobLinks, JobProgress, JobStatus, JobView};
use crate::error::ApiError;

/// A record this version cannot parse, as its own reads answer it (the cause, naming the key,
/// is in the log): a job's record (its `view` names the job) is that job, failed with
/// `job_record_unreadable`, so a client stops waiting and can submit it again; anything else
/// under the key is no job (404 `job_not_found`).
#[derive(Debug, Clone)]
pub(super) struct Unreadable {
    /// The job, failed; `None` when the record is not a job's. Boxed: the error variant of
    /// every read stays small.
    pub view: Option<Box<JobView>>,
}

/// The error of a job whose record cannot be read.
pub(super) fn unreadable_error() -> crate::error::ErrorBody {
    crate::error::ErrorBody {
        error: "this job's record cannot be read by this server".into(),
        details: Some(
            "it was written by another sdserve version, or changed by hand (the server log \
             names the key); nothing runs it: submit the request again"
                .into(),
        ),
        error_code: "job_record_unreadable".into(),
        fields: None,
    }
}

impl Unreadable {
    /// What `json` under job `id`'s key says of the job, if it names it: the view as it
    /// parses (an ended one kept as it ended), failed when it had not ended or does not
    /// parse; the creation time kept where it reads.
    pub fn of(id: &str, json: &str) -> Self {
        let value: Option<serde_json::Value> = serde_json::from_str(json).ok();
        let view = value
            .as_ref()
            .and_then(|v| v.get("view"))
            .filter(|v| v.get("id").and_then(serde_json::Value::as_str) == Some(id));
        let Some(view) = view else {
            return Self { view: None };
        };
        let failed = |mut v: JobView| {
            if !v.status.is_final() {
                v.status = JobStatus::Failed;
                v.position = None;
                v.result = None;
                v.error = Some(unreadable_error());
            }
            v
        };
        let view = match serde_json::from_value::<JobView>(view.clone()) {
            Ok(v) => failed(v),
            Err(_) => JobView {
                id: id.to_string(),
                status: JobStatus::Failed,
                position: None,
                progress: JobProgress {
                    step: 0,
                    total: 0,
                    eta_seconds: None,
                },
                created_at: view
                    .get("created_at")
                    .and_then(serde_json::Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                started_at: None,
                finished_at: None,
                cancel_requested: false,
                request: serde_json::Value::Null,
                result: None,
                error: Some(unreadable_error()),
                links: JobLinks::for_id(id),
                loading: None,
                preview: None,
            },
        };
        Self {
            view: Some(Box::new(view)),
        }
    }

    /// The error its reads answer where they need one: the job's failure, or no such job.
    pub fn error(&self, id: &str) -> ApiError {
        match &self.view {
            Some(_) => ApiError::Internal(format!("job {id}'s record cannot be read")),
            None => ApiError::JobNotFound(format!("no job {id}")),
        }
    }
}
