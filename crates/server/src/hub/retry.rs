//! Trying a model again in the background while the hub cannot be reached.

use std::time::{Duration, Instant};

use super::{resolve_model, HubError, HubOptions, ProgressFn, ResolvedModel};

/// Resolution failed for a reason that may pass (the hub unreachable); the next try is planned.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryWait {
    /// Tries so far.
    pub attempts: u32,
    /// Why the last one failed, with the ways out.
    pub error: String,
    pub next_try: Instant,
}

impl RetryWait {
    pub fn describe(&self) -> String {
        let secs = self
            .next_try
            .saturating_duration_since(Instant::now())
            .as_secs_f64()
            .ceil();
        format!(
            "{} (try {} failed; next try in {secs:.0} s)",
            self.error, self.attempts
        )
    }
}

/// How long to wait between background tries of a model the hub cannot give yet: `first`,
/// doubling up to `max`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    pub first: Duration,
    pub max: Duration,
}

impl RetryPolicy {
    pub fn delay(&self, attempts: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempts.saturating_sub(1).min(16));
        self.first.saturating_mul(factor).min(self.max)
    }
}

/// [`resolve_model`], tried again in the background while the failure may pass (the hub
/// unreachable or failing): `waiting` hears of each planned retry (and `None` when a try
/// starts). Errors that will not pass (unknown repo, bad spec, offline without the model) end it.
pub fn resolve_model_patiently(
    spec: &str,
    opts: &HubOptions,
    progress: ProgressFn,
    policy: RetryPolicy,
    waiting: &dyn Fn(Option<RetryWait>),
) -> Result<ResolvedModel, HubError> {
    let mut attempts = 0;
    loop {
        attempts += 1;
        waiting(None);
        match resolve_model(spec, opts, progress) {
            Err(e @ HubError::Unreachable { .. }) if !policy.first.is_zero() => {
                let delay = policy.delay(attempts);
                tracing::warn!(
                    error = %e,
                    attempts,
                    next_try_seconds = delay.as_secs_f64(),
                    "model not available yet; trying again in the background"
                );
                waiting(Some(RetryWait {
                    attempts,
                    error: e.to_string(),
                    next_try: Instant::now() + delay,
                }));
                std::thread::sleep(delay);
            }
            other => return other,
        }
    }
}
