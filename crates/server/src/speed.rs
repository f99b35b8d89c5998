//! How fast this machine runs the model, measured on the CPU once the model is ready, so the
//! log can say which sizes and step counts fit GENERATION_TIMEOUT_SECONDS before a first
//! request meets a 408 (a CPU takes minutes where a GPU takes seconds).
//!
//! The probe is not on the readiness path: the worker runs it only after it has been idle for
//! `PROBE_IDLE`, and it gives way within a step to any job that arrives (then runs again at the
//! next idle moment). A model whose smallest image already takes a minute a step (a test model
//! with a small VAE factor) would otherwise hold /health at `loading` for minutes.

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use sdserve_pipeline::pipeline::GenerationParams;
use sdserve_pipeline::schedulers::SchedulerKind;
use sdserve_pipeline::PipelineError;

use crate::generator::Generator;
use crate::validate::{
    GUIDANCE_DEFAULT, SIZE_DEFAULT, SIZE_MAX, SIZE_MIN, STEPS_DEFAULT, STEPS_MAX,
};

/// How long the worker must have had nothing to do before it runs the probe: a client that
/// sends its first request as soon as /health says ready is served before the probe starts.
pub const PROBE_IDLE: Duration = Duration::from_secs(3);

/// Tries before the probe is given up on a worker that is never idle for long (each try the
/// queue interrupts costs the worker at most one step of the smallest image).
pub const PROBE_TRIES: usize = 3;

/// Timings of one small generation (smallest size, two steps, guidance on).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SpeedProbe {
    /// The side of the square image measured.
    pub side: usize,
    /// Prompt encoding and set-up before the first step.
    pub encode_secs: f64,
    /// One UNet evaluation with guidance (both halves of the batch).
    pub step_secs: f64,
    /// VAE decode and postprocessing.
    pub decode_secs: f64,
}

impl SpeedProbe {
    /// Runs the probe: 2 Euler steps at the smallest size, timed at each step. `stop` is asked
    /// after every step; when it says yes the probe ends there and gives `Ok(None)`.
    pub fn measure(
        generator: &mut dyn Generator,
        stop: &dyn Fn() -> bool,
    ) -> Result<Option<Self>, PipelineError> {
        let side = SIZE_MIN as usize;
        let params = GenerationParams {
            prompt: "a lighthouse on a rocky coast".into(),
            negative_prompt: String::new(),
            steps: 2,
            width: side,
            height: side,
            seed: 0,
            guidance_scale: GUIDANCE_DEFAULT,
            scheduler: Some(SchedulerKind::Euler),
            ..Default::default()
        };
        let t0 = Instant::now();
        let mut at = Vec::with_capacity(2);
        let run = generator.generate(&params, &mut |_| {
            at.push(t0.elapsed());
            if stop() {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        match run {
            Ok(_) => {}
            Err(PipelineError::Cancelled) => return Ok(None),
            Err(e) => return Err(e),
        }
        let end = t0.elapsed();
        let (first, last) = match at.as_slice() {
            [first, .., last] => (*first, *last),
            _ => {
                return Err(PipelineError::InvalidRequest(
                    "the speed probe saw fewer than 2 steps".into(),
                ))
            }
        };
        let step = (last - first) / (at.len() as u32 - 1);
        Ok(Some(Self {
            side,
            encode_secs: first.saturating_sub(step).as_secs_f64(),
            step_secs: step.as_secs_f64(),
            decode_secs: (end - last).as_secs_f64(),
        }))
    }

    /// Estimated seconds for a `width`x`height` image with `unet_evals` UNet evaluations (steps,
    /// plus one for PNDM): step and decode time scaled by the pixel count.
    pub fn estimate_secs(&self, width: usize, height: usize, unet_evals: usize) -> f64 {
        let scale = (width * height) as f64 / (self.side * self.side) as f64;
        self.encode_secs + scale * (self.step_secs * unet_evals as f64 + self.decode_secs)
    }

    /// Estimated seconds for one request run alone: its images' pixels, its steps (those
    /// `strength` leaves for an init image, plus one for PNDM's extra evaluation, counted for
    /// every scheduler).
    pub fn estimate_request_secs(&self, p: &GenerationParams) -> f64 {
        let steps = match &p.init_image {
            Some(init) => ((p.steps as f64 * init.strength) as usize).max(1),
            None => p.steps,
        };
        self.estimate_secs(p.width, p.height * p.batch_size.max(1), steps + 1)
    }

    /// The most steps (1..=STEPS_MAX) a square image of `side` may have to finish within
    /// `deadline` (the model's own scheduler may add one evaluation: counted); 0 when none fits.
    pub fn max_steps(&self, side: usize, deadline: Duration) -> usize {
        (1..=STEPS_MAX as usize)
            .take_while(|&s| self.estimate_secs(side, side, s + 1) <= deadline.as_secs_f64())
            .last()
            .unwrap_or(0)
    }

    /// One line for the start-up log; `job_deadline` (JOB_TIMEOUT_SECONDS) is named as the
    /// way out when the default request does not fit `deadline`.
    pub fn summary(&self, deadline: Duration, job_deadline: Option<Duration>) -> String {
        let sides: Vec<usize> = (SIZE_MIN as usize..=SIZE_MAX as usize)
            .step_by(128)
            .collect();
        let fits: Vec<String> = sides
            .iter()
            .map(|&side| match self.max_steps(side, deadline) {
                0 => format!("{side}x{side}: none"),
                n if n >= STEPS_MAX as usize => format!("{side}x{side}: any step count"),
                1 => format!("{side}x{side}: 1 step"),
                n => format!("{side}x{side}: up to {n} steps"),
            })
            .collect();
        let default_needs = self.estimate_secs(SIZE_DEFAULT, SIZE_DEFAULT, STEPS_DEFAULT + 1);
        // Room for a slower step than the probe's.
        let enough = (default_needs * 1.2).ceil();
        let verdict = if default_needs <= deadline.as_secs_f64() {
            "fits".to_string()
        } else {
            let jobs = match job_deadline {
                Some(d) if default_needs <= d.as_secs_f64() => format!(
                    ", or send it to POST /jobs, whose deadline (JOB_TIMEOUT_SECONDS={}) it fits",
                    d.as_secs()
                ),
                Some(d) => format!(
                    ", or send it to POST /jobs with JOB_TIMEOUT_SECONDS (now {}) of at least {enough:.0}",
                    d.as_secs()
                ),
                None => String::new(),
            };
            format!(
                "does not fit: raise GENERATION_TIMEOUT_SECONDS (or --generation-timeout-seconds) to at least {enough:.0}, or ask for fewer steps or a smaller size{jobs}"
            )
        };
        format!(
            "CPU speed: a step at {side}x{side} takes {:.2} s, the decode {:.2} s; within GENERATION_TIMEOUT_SECONDS={} a lone request may be {}; the default request ({SIZE_DEFAULT}x{SIZE_DEFAULT}, {STEPS_DEFAULT} steps) needs about {default_needs:.0} s and {verdict}",
            self.step_secs,
            self.decode_secs,
            deadline.as_secs(),
            fits.join(", "),
            side = self.side,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Roughly SD 1.5 in f32 on 2 cores: 1.7 s a step and 1.9 s to decode at 256x256.
    const CPU: SpeedProbe = SpeedProbe {
        side: 256,
        encode_secs: 0.3,
        step_secs: 1.7,
        decode_secs: 1.9,
    };

    #[test]
    fn estimates_scale_with_pixels() {
        let small = CPU.estimate_secs(256, 256, 21);
        assert!((small - (0.3 + 1.7 * 21.0 + 1.9)).abs() < 1e-9);
        let big = CPU.estimate_secs(512, 512, 21);
        assert!((big - (0.3 + 4.0 * (1.7 * 21.0 + 1.9))).abs() < 1e-9);
    }

    #[test]
    fn max_steps_fit_the_deadline_and_no_more() {
        let deadline = Duration::from_secs(60);
        let n = CPU.max_steps(512, deadline);
        assert!(CPU.estimate_secs(512, 512, n + 1) <= 60.0);
        assert!(CPU.estimate_secs(512, 512, n + 2) > 60.0);
        assert_eq!(CPU.max_steps(768, Duration::from_secs(5)), 0);
        let fast = SpeedProbe {
            step_secs: 0.001,
            decode_secs: 0.001,
            ..CPU
        };
        assert_eq!(fast.max_steps(768, deadline), STEPS_MAX as usize);
        let line = CPU.summary(deadline, None);
        assert!(line.contains("512x512: up to 6 steps"), "{line}");
        assert!(line.contains("768x768: 1 step"), "{line}");
        assert!(
            line.contains("does not fit: raise GENERATION_TIMEOUT_SECONDS"),
            "{line}"
        );
        assert!(!line.contains("/jobs"), "{line}");
        assert!(fast.summary(deadline, None).contains("and fits"));
        // The default request (512x512, 21 evaluations) needs about 151 s here.
        let line = CPU.summary(deadline, Some(Duration::from_secs(600)));
        assert!(
            line.contains("POST /jobs, whose deadline (JOB_TIMEOUT_SECONDS=600) it fits"),
            "{line}"
        );
        let line = CPU.summary(deadline, Some(Duration::from_secs(100)));
        assert!(
            line.contains("JOB_TIMEOUT_SECONDS (now 100) of at least 181"),
            "{line}"
        );
    }
}
