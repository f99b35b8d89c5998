//! The out-of-memory circuit breaker as the worker uses it, and the plan levers it can switch
//! without a reload.

use std::sync::Mutex;
use std::time::Duration;

use candle_core::Device;
use sdserve_pipeline::memory::breaker::{Admission, BreakerConfig, OomAction, OomBreaker};
use sdserve_pipeline::memory::plan::leaner;
use sdserve_pipeline::memory::{free_bytes, MemoryPlan};
use sdserve_pipeline::pipeline::StableDiffusion;
use sdserve_pipeline::PipelineError;

use super::GpuSetup;

/// The out-of-memory circuit breaker as the worker uses it: admission before a job, the outcome
/// after it, and stepping the pipeline down to a leaner plan when OOMs repeat.
pub struct OomGuard {
    breaker: Mutex<OomBreaker>,
}

/// What the worker does with a job's outcome.
#[derive(Debug, Clone, PartialEq)]
pub enum OomOutcome {
    NotOom,
    /// This request failed with OOM; nothing else changes.
    Failed,
    /// Repeated OOMs: the pipeline now runs the leaner plan (log its summary).
    SwitchedPlan(String),
    /// Repeated OOMs and no leaner plan: new work is refused for a while.
    Paused {
        retry_after: Duration,
    },
}

impl OomGuard {
    pub fn new(config: BreakerConfig) -> Self {
        Self {
            breaker: Mutex::new(OomBreaker::new(config)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, OomBreaker> {
        self.breaker.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `Err(retry_after)` while the breaker refuses work (answer 503 `out_of_memory`).
    pub fn admit(&self, device: &Device) -> Result<(), Duration> {
        match self.lock().admit(free_bytes(device)) {
            Admission::Allow => Ok(()),
            Admission::Refuse { retry_after } => Err(retry_after),
        }
    }

    /// True while refusing work (for /health's `degraded`).
    pub fn is_open(&self) -> bool {
        !matches!(
            self.lock().state(),
            sdserve_pipeline::memory::breaker::BreakerState::Closed
        )
    }

    /// Feeds a job's result to the breaker when there is no pipeline to step down (the fake
    /// generator): repeated OOMs open the breaker.
    pub fn record_without_pipeline<T>(&self, result: &Result<T, PipelineError>) -> OomOutcome {
        if let Some(outcome) = self.record_non_oom(result) {
            return outcome;
        }
        match self.lock().record_oom(false) {
            OomAction::None | OomAction::UseLeanerPlan => OomOutcome::Failed,
            OomAction::Opened { until } => OomOutcome::Paused {
                retry_after: until.saturating_duration_since(std::time::Instant::now()),
            },
        }
    }

    /// `Some(NotOom)` (after noting a success) unless `result` is an out-of-memory failure.
    fn record_non_oom<T>(&self, result: &Result<T, PipelineError>) -> Option<OomOutcome> {
        match result {
            Err(e) if is_oom(e) => None,
            Ok(_) => {
                self.lock().record_success();
                Some(OomOutcome::NotOom)
            }
            Err(_) => {
                self.release_probe();
                Some(OomOutcome::NotOom)
            }
        }
    }

    /// A job ended without telling whether memory is back (failed otherwise, cancelled, or
    /// abandoned before it started). If it was the half-open probe, close the breaker rather
    /// than refuse all work forever; the next OOM counts again.
    pub fn release_probe(&self) {
        let mut b = self.lock();
        if b.state() == sdserve_pipeline::memory::breaker::BreakerState::HalfOpen {
            b.record_success();
        }
    }

    /// Feeds a job's result to the breaker; on repeated OOMs moves `sd` to a leaner plan.
    pub fn record<T>(
        &self,
        result: &Result<T, PipelineError>,
        sd: &mut StableDiffusion,
        setup: &mut GpuSetup,
    ) -> OomOutcome {
        if let Some(outcome) = self.record_non_oom(result) {
            return outcome;
        }
        let next = match (&setup.footprint, &setup.plan_request) {
            (Some(fp), Some(req)) => leaner(fp, req, &setup.plan),
            _ => None,
        };
        let action = self.lock().record_oom(next.is_some());
        match action {
            OomAction::None => OomOutcome::Failed,
            OomAction::UseLeanerPlan => {
                let next = next.expect("checked");
                match apply_plan(sd, &next) {
                    Ok(()) => {
                        setup.plan = next;
                        OomOutcome::SwitchedPlan(setup.plan.summary())
                    }
                    Err(e) => OomOutcome::SwitchedPlan(format!("failed to switch plan: {e}")),
                }
            }
            OomAction::Opened { until } => OomOutcome::Paused {
                retry_after: until.saturating_duration_since(std::time::Instant::now()),
            },
        }
    }
}

/// True for a device allocation failure, also when it arrives as a plain candle error whose text
/// says so (not every path classifies it into [`PipelineError::OutOfMemory`]).
pub fn is_oom(e: &PipelineError) -> bool {
    match e {
        PipelineError::OutOfMemory(_) => true,
        PipelineError::Candle(_) | PipelineError::Weights { .. } => {
            sdserve_pipeline::memory::breaker::is_out_of_memory_text(&e.to_string())
        }
        _ => false,
    }
}

/// Applies the levers of `plan` that can change without reloading the model.
pub fn apply_plan(sd: &mut StableDiffusion, plan: &MemoryPlan) -> Result<(), PipelineError> {
    sd.set_attention_slicing(plan.attention);
    sd.set_vae_tiling(plan.vae_tiling);
    sd.set_offload(plan.offload)?;
    Ok(())
}
