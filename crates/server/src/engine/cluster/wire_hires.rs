//! A hires pass (`GenerationParams::hires`) in a job's wire form (`wire::WireSpec`).

use sdserve_pipeline::pipeline::Hires;
use sdserve_pipeline::schedulers::{SchedulerKind, SigmaSchedule};
use serde::{Deserialize, Serialize};

/// A hires pass as JSON: the upscaler and schedulers by name.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireHires {
    width: usize,
    height: usize,
    upscale_width: usize,
    upscale_height: usize,
    upscaler: String,
    steps: usize,
    strength: f64,
    scheduler: Option<String>,
    /// Absent from processes older than the field: the scheduler's own schedule.
    #[serde(default)]
    schedule: Option<String>,
    prompt: Option<String>,
    negative_prompt: Option<String>,
}

impl WireHires {
    pub fn of(h: &Hires) -> Self {
        Self {
            width: h.width,
            height: h.height,
            upscale_width: h.upscale_width,
            upscale_height: h.upscale_height,
            upscaler: crate::validate::hires::upscaler_name(&h.upscaler).to_string(),
            steps: h.steps,
            strength: h.strength,
            scheduler: h.scheduler.map(|k| k.name().to_string()),
            schedule: h.schedule.map(|s| s.name().to_string()),
            prompt: h.prompt.clone(),
            negative_prompt: h.negative_prompt.clone(),
        }
    }

    pub fn hires(&self) -> Result<Hires, String> {
        Ok(Hires {
            width: self.width,
            height: self.height,
            upscale_width: self.upscale_width,
            upscale_height: self.upscale_height,
            // A model by name: the worker finds it in its own UPSCALERS_DIR.
            upscaler: crate::validate::hires::upscaler_named(&self.upscaler),
            steps: self.steps,
            strength: self.strength,
            scheduler: match &self.scheduler {
                Some(n) => Some(SchedulerKind::from_name(n).ok_or(format!("scheduler {n:?}"))?),
                None => None,
            },
            schedule: match &self.schedule {
                Some(n) => Some(SigmaSchedule::from_name(n).ok_or(format!("schedule {n:?}"))?),
                None => None,
            },
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
        })
    }
}
