//! `HeunDiscreteScheduler` (A1111 `Heun`): Heun's second-order method in sigma space. Every step
//! but the last takes two UNet evaluations, so `timesteps` repeats each interior timestep
//! (`2 * steps - 1` entries) and `step` alternates between an Euler predictor and the averaged
//! corrector, as diffusers does.

use candle_core::Tensor;

use super::churn::{self, Churn};
use super::common::{self, check_index, div_s, mul_s, to_f32, ClassDefaults, ResolvedConfig};
use super::euler::{pred_original, scale_by_sigma};
use super::interleaved::{repeat_interior, step_schedule};
use super::{Scheduler, SchedulerConfig, SigmaSchedule};
use crate::rng::TorchRng;
use crate::Result;

/// The class's own defaults (its betas default to SD's, unlike most classes).
pub(super) const DEFAULTS: ClassDefaults = ClassDefaults {
    beta_start: 0.00085,
    beta_end: 0.012,
    ..ClassDefaults::with_spacing("linspace")
};

/// What the first half of a step leaves for the second (diffusers' `prev_derivative`, `dt`,
/// `sample`; `None` is `state_in_first_order`).
struct FirstHalf {
    derivative: Tensor,
    dt: f32,
    sample: Tensor,
}

pub struct HeunDiscrete {
    prediction_type: common::PredictionType,
    /// `Some(range)` when `clip_sample` is on.
    clip: Option<f32>,
    /// float32 values, `2 * steps - 1` of them.
    timesteps: Vec<f64>,
    /// float32, `2 * steps` of them: the first, each interior one twice, the final zero.
    sigmas: Vec<f32>,
    init_noise_sigma: f32,
    first_half: Option<FirstHalf>,
    churn: Churn,
    /// One sigma per step plus the final zero, each step's `sigma_hat` (churn's; the sigma
    /// without it), the unchurned timesteps and `np.log` of the training sigmas.
    step_sigmas: Vec<f32>,
    hats: Vec<f32>,
    own_timesteps: Vec<f64>,
    log_sigmas: Vec<f64>,
}

impl HeunDiscrete {
    /// `HeunDiscreteScheduler.from_config(cfg)`, then `set_timesteps(num_inference_steps)`.
    pub fn new(cfg: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        common::check_steps(num_inference_steps)?;
        let r = ResolvedConfig::resolve(cfg, &DEFAULTS)?;
        let schedule = SigmaSchedule::of_config(cfg)?;
        let s = step_schedule(cfg, &r, num_inference_steps, schedule)?;
        // Heun keeps its timesteps as float32, converted ones included.
        let timesteps: Vec<f64> = s.timesteps.iter().map(|&t| t as f32 as f64).collect();
        let sigmas = {
            let mut v = vec![s.sigmas[0]];
            for &x in &s.sigmas[1..s.sigmas.len() - 1] {
                v.extend([x, x]);
            }
            v.push(s.sigmas[s.sigmas.len() - 1]);
            v
        };
        let max = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let init_noise_sigma = match r.timestep_spacing {
            common::TimestepSpacing::Leading => (max * max + 1.0).sqrt(),
            _ => max,
        };
        let timesteps = repeat_interior(&timesteps)[..2 * num_inference_steps - 1].to_vec();
        Ok(Self {
            prediction_type: r.prediction_type,
            clip: cfg
                .clip_sample
                .unwrap_or(false)
                .then(|| cfg.clip_sample_range.unwrap_or(1.0) as f32),
            own_timesteps: timesteps.clone(),
            timesteps,
            sigmas,
            init_noise_sigma,
            first_half: None,
            churn: Churn::default(),
            hats: s.sigmas[..num_inference_steps].to_vec(),
            step_sigmas: s.sigmas,
            log_sigmas: s.log_sigmas.iter().map(|&l| l as f64).collect(),
        })
    }

    /// The churned sigmas of a run from step `start` and the first halves' timesteps there.
    fn plan_from(&mut self, start: usize) {
        self.hats = self.churn.sigma_hats(&self.step_sigmas, start);
        for (k, &hat) in self.hats.iter().enumerate() {
            let own = self.own_timesteps[2 * k];
            self.timesteps[2 * k] =
                churn::timestep_at(hat, self.step_sigmas[k], own, &self.log_sigmas);
        }
    }

    /// The float32 sigmas, one per entry of `timesteps()` plus the final zero.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }
}

impl Scheduler for HeunDiscrete {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma as f64
    }

    fn scale_model_input(&self, sample: &Tensor, index: usize) -> Result<Tensor> {
        check_index(index, self.timesteps.len())?;
        scale_by_sigma(sample, self.guidance_sigma(index).unwrap_or(0.0) as f32)
    }

    fn set_churn(&mut self, churn: Churn) {
        self.churn = churn;
        self.plan_from(0);
    }

    fn set_begin_index(&mut self, begin: usize) {
        self.plan_from(begin / 2);
    }

    /// Even entries begin a step (churned there), odd ones are its corrector.
    fn prepare_sample(
        &mut self,
        sample: &Tensor,
        index: usize,
        rngs: &mut [TorchRng],
    ) -> Result<Option<Tensor>> {
        check_index(index, self.timesteps.len())?;
        if index % 2 == 1 {
            return Ok(None);
        }
        let k = index / 2;
        self.churn
            .raise(sample, self.step_sigmas[k], self.hats[k], rngs)
    }

    fn guidance_sigma(&self, index: usize) -> Option<f64> {
        let sigma = if index.is_multiple_of(2) {
            *self.hats.get(index / 2)?
        } else {
            *self.sigmas.get(index)?
        };
        Some(sigma as f64)
    }

    fn order(&self) -> usize {
        2
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        check_index(index, self.timesteps.len())?;
        let dtype = original.dtype();
        let x = (to_f32(original)? + mul_s(&to_f32(noise)?, self.sigmas[index])?)?;
        Ok(x.to_dtype(dtype)?)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        _rngs: &mut [TorchRng],
    ) -> Result<Tensor> {
        check_index(index, self.timesteps.len())?;
        let dtype = model_output.dtype();
        let (mo, s) = (to_f32(model_output)?, to_f32(sample)?);
        let first = self.first_half.is_none();
        let (sigma, sigma_next) = if first {
            (self.hats[index / 2], self.sigmas[index + 1])
        } else {
            (self.sigmas[index - 1], self.sigmas[index])
        };
        // The step runs from sigma_hat (k-diffusion's churn; the sigma without it). The
        // corrector evaluates the model at sigma_next.
        let sigma_input = if first { sigma } else { sigma_next };
        let mut x0 = pred_original(self.prediction_type, &mo, &s, sigma_input)?;
        if let Some(range) = self.clip {
            x0 = x0.clamp(-range, range)?;
        }
        let prev = match self.first_half.take() {
            None => {
                let derivative = div_s(&(&s - &x0)?, sigma)?;
                let dt = sigma_next - sigma;
                let prev = (&s + mul_s(&derivative, dt)?)?;
                self.first_half = Some(FirstHalf {
                    derivative,
                    dt,
                    sample: s,
                });
                prev
            }
            Some(h) => {
                let derivative = div_s(&(&s - &x0)?, sigma_next)?;
                let derivative = div_s(&(h.derivative + derivative)?, 2.0)?;
                (h.sample + mul_s(&derivative, h.dt)?)?
            }
        };
        Ok(prev.to_dtype(dtype)?)
    }
}
