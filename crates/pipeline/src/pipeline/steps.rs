//! Which part of the schedule a pass that starts from an image runs (img2img, inpainting, the
//! hires fix's second pass): diffusers' rule or AUTOMATIC1111's.
//!
//! diffusers (`StableDiffusionImg2ImgPipeline.get_timesteps`): a schedule of `steps`, of which
//! the last `int(steps * strength)` run. A1111 1.10 (`sd_samplers_common.setup_img2img_steps`
//! and `sd_samplers_kdiffusion.sample_img2img`): plain img2img keeps the whole `steps`
//! schedule and runs `t_enc + 1` steps from index `steps - t_enc - 1`, `t_enc = int(min(strength,
//! 0.999) * steps)` (20 steps at 0.75: 16 steps from index 4); the hires pass, or img2img with
//! its option `img2img_fix_steps`, stretches the schedule to `int(steps / min(strength, 0.999))`
//! steps and runs exactly `steps` of them. Either way the latents start at the noise level of
//! the first step run.

use crate::{PipelineError, Result};

/// How an init image's `strength` chooses the steps that run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StepRule {
    /// diffusers: `int(steps * strength)` steps of a `steps` schedule (the hires pass too).
    #[default]
    Diffusers,
    /// A1111 1.10: img2img runs `int(min(strength, 0.999) * steps) + 1` steps of the `steps`
    /// schedule; the hires pass runs its `steps` of a stretched schedule.
    A1111,
    /// A1111 with `img2img_fix_steps` on: img2img runs exactly `steps`, as the hires pass.
    A1111FixSteps,
}

impl StepRule {
    /// Every rule and its API name.
    pub const ALL: [(StepRule, &'static str); 3] = [
        (StepRule::Diffusers, "diffusers"),
        (StepRule::A1111, "a1111"),
        (StepRule::A1111FixSteps, "a1111_fix_steps"),
    ];

    pub fn name(self) -> &'static str {
        Self::ALL.iter().find(|(r, _)| *r == self).unwrap().1
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.iter().find(|(_, n)| *n == name).map(|(r, _)| *r)
    }

    /// The rule of a hires pass under this request's rule: A1111 always stretches it
    /// (`sample_hr_pass` hands `setup_img2img_steps` its steps).
    pub fn for_hires(self) -> Self {
        match self {
            Self::Diffusers => Self::Diffusers,
            Self::A1111 | Self::A1111FixSteps => Self::A1111FixSteps,
        }
    }

    /// Whether the pass starts at the noise level of its first step as A1111 does (the step's
    /// first UNet evaluation; [`crate::schedulers::Scheduler::first_index_of_step`]) rather
    /// than at diffusers' `t_start * order`.
    pub fn is_a1111(self) -> bool {
        self != Self::Diffusers
    }

    /// The schedule a pass of `steps` at `strength` builds and the step it starts from.
    pub fn slice(self, steps: usize, strength: f64) -> Result<ScheduleSlice> {
        let refuse = |rule: String| Err(PipelineError::InvalidRequest(rule));
        if steps == 0 {
            return refuse("steps must be at least 1".into());
        }
        if !(0.0..=1.0).contains(&strength) {
            return refuse(format!("strength must be within 0..=1, got {strength}"));
        }
        // A1111 caps the strength below 1: the start is always the image plus noise.
        let capped = strength.min(0.999);
        match self {
            Self::Diffusers => {
                let run = init_steps(steps, strength);
                if run == 0 {
                    return refuse(format!(
                        "int(steps * strength) = int({steps} * {strength}) is 0: no step would run"
                    ));
                }
                Ok(ScheduleSlice {
                    schedule_steps: steps,
                    start: steps - run,
                })
            }
            Self::A1111 => {
                let t_enc = ((capped * steps as f64) as usize).min(steps - 1);
                Ok(ScheduleSlice {
                    schedule_steps: steps,
                    start: steps - t_enc - 1,
                })
            }
            Self::A1111FixSteps => {
                if strength <= 0.0 {
                    return refuse(format!(
                        "a strength of {strength} stretches the schedule without end \
                         (int(steps / strength)): it must be above 0"
                    ));
                }
                let schedule_steps = (steps as f64 / capped) as usize;
                Ok(ScheduleSlice {
                    schedule_steps,
                    start: schedule_steps - steps,
                })
            }
        }
    }
}

/// `min(int(steps * strength), steps)`: the steps diffusers' img2img runs (its `init_timestep`).
pub(super) fn init_steps(steps: usize, strength: f64) -> usize {
    ((steps as f64 * strength) as usize).min(steps)
}

/// A pass's schedule (`schedule_steps` long) and the step it starts from: steps `start..`
/// run, from the noise level of step `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScheduleSlice {
    pub schedule_steps: usize,
    pub start: usize,
}

impl ScheduleSlice {
    /// Steps that run (UNet evaluations for first-order samplers).
    pub fn steps_run(&self) -> usize {
        self.schedule_steps - self.start
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(rule: StepRule, steps: usize, strength: f64) -> (usize, usize, usize) {
        let s = rule.slice(steps, strength).unwrap();
        (s.schedule_steps, s.start, s.steps_run())
    }

    #[test]
    fn a1111_img2img_keeps_the_schedule_and_runs_one_step_more() {
        // README's example: 20 steps at 0.75: 16 steps from index 4 (diffusers: 15 from 5).
        assert_eq!(slice(StepRule::A1111, 20, 0.75), (20, 4, 16));
        assert_eq!(slice(StepRule::Diffusers, 20, 0.75), (20, 5, 15));
        // Strength 1 is capped at 0.999: int(19.98) = 19, every step from index 0.
        assert_eq!(slice(StepRule::A1111, 20, 1.0), (20, 0, 20));
        // Strength 0 still runs the last step (diffusers runs none: refused).
        assert_eq!(slice(StepRule::A1111, 20, 0.0), (20, 19, 1));
        assert!(StepRule::Diffusers.slice(20, 0.0).is_err());
        // int(0.3 * 3) = 0 in float64 (0.8999...): one step, the last.
        assert_eq!(slice(StepRule::A1111, 3, 0.3), (3, 2, 1));
    }

    #[test]
    fn a1111_fixed_steps_stretch_the_schedule() {
        // int(20 / 0.75) = 26 steps, the last 20 of them run.
        assert_eq!(slice(StepRule::A1111FixSteps, 20, 0.75), (26, 6, 20));
        assert_eq!(slice(StepRule::A1111FixSteps, 4, 0.5), (8, 4, 4));
        // 1.0 is 0.999: int(20 / 0.999) = 20.
        assert_eq!(slice(StepRule::A1111FixSteps, 20, 1.0), (20, 0, 20));
        assert!(StepRule::A1111FixSteps.slice(20, 0.0).is_err());
        assert_eq!(StepRule::A1111.for_hires(), StepRule::A1111FixSteps);
        assert_eq!(StepRule::Diffusers.for_hires(), StepRule::Diffusers);
    }

    #[test]
    fn names_round_trip() {
        for (rule, name) in StepRule::ALL {
            assert_eq!(rule.name(), name);
            assert_eq!(StepRule::from_name(name), Some(rule));
        }
        assert_eq!(StepRule::from_name("A1111"), None);
    }
}
