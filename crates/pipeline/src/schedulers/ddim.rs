//! `DDIMScheduler`: deterministic with `eta = 0` (what `StableDiffusionPipeline` passes by
//! default); with `eta > 0` each step adds `eta`-scaled noise from the images' generators.

use candle_core::Tensor;

use super::common::{
    self, check_index, config_error, div_s, mul_s, to_f32, ClassDefaults, PredictionType,
    ResolvedConfig, TimestepSpacing,
};
use super::{Scheduler, SchedulerConfig};
use crate::rng::TorchRng;
use crate::Result;

const DEFAULTS: ClassDefaults = ClassDefaults::with_spacing("leading");

pub struct Ddim {
    prediction_type: PredictionType,
    /// `Some(range)` when `clip_sample` is on.
    clip: Option<f64>,
    step_ratio: i64,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    timesteps: Vec<f64>,
    /// The pipeline's `eta` (0: no noise).
    eta: f64,
}

impl Ddim {
    pub fn new(cfg: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        common::check_steps(num_inference_steps)?;
        let r = ResolvedConfig::resolve(cfg, &DEFAULTS)?;
        if cfg.thresholding.unwrap_or(false) {
            return Err(config_error("DDIMScheduler thresholding is not supported"));
        }
        let n = num_inference_steps;
        let train = r.num_train_timesteps;
        if n > train {
            return Err(config_error(format!(
                "{n} steps exceed num_train_timesteps {train}"
            )));
        }
        let ac = r.alphas_cumprod()?;
        let final_alpha_cumprod = if cfg.set_alpha_to_one.unwrap_or(true) {
            1.0
        } else {
            ac[0]
        };
        let clip = if cfg.clip_sample.unwrap_or(true) {
            Some(cfg.clip_sample_range.unwrap_or(1.0))
        } else {
            None
        };
        let timesteps = match r.timestep_spacing {
            TimestepSpacing::Linspace => common::linspace_rounded_timesteps(n, train),
            TimestepSpacing::Leading => common::leading_timesteps(n, train, r.steps_offset),
            TimestepSpacing::Trailing => common::trailing_timesteps(n, train),
        };
        Ok(Self {
            prediction_type: r.prediction_type,
            clip,
            step_ratio: (train / n) as i64,
            alphas_cumprod: ac,
            final_alpha_cumprod,
            timesteps,
            eta: 0.0,
        })
    }

    fn alpha(&self, t: i64) -> Result<f32> {
        if t < 0 {
            return Ok(self.final_alpha_cumprod);
        }
        self.alphas_cumprod
            .get(t as usize)
            .copied()
            .ok_or_else(|| config_error(format!("timestep {t} is outside the training schedule")))
    }
}

impl Scheduler for Ddim {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        common::add_noise_alphas(
            &self.alphas_cumprod,
            &self.timesteps,
            original,
            noise,
            index,
        )
    }

    fn eta(&self) -> Option<f64> {
        Some(self.eta)
    }

    fn set_eta(&mut self, eta: f64) {
        self.eta = eta;
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        rngs: &mut [TorchRng],
    ) -> Result<Tensor> {
        check_index(index, self.timesteps.len())?;
        let dtype = sample.dtype();
        let (mo, s) = (to_f32(model_output)?, to_f32(sample)?);
        let t = self.timesteps[index] as i64;
        let a_t = self.alpha(t)?;
        let a_prev = self.alpha(t - self.step_ratio)?;
        let b_t = 1.0 - a_t;
        // All scalars are 0-dim float32 tensors in diffusers.
        let (pred_x0, pred_eps) = match self.prediction_type {
            PredictionType::Epsilon => (
                div_s(&(&s - mul_s(&mo, b_t.sqrt())?)?, a_t.sqrt())?,
                mo.clone(),
            ),
            PredictionType::Sample => {
                let eps = div_s(&(&s - mul_s(&mo, a_t.sqrt())?)?, b_t.sqrt())?;
                (mo.clone(), eps)
            }
            PredictionType::VPrediction => (
                (mul_s(&s, a_t.sqrt())? - mul_s(&mo, b_t.sqrt())?)?,
                (mul_s(&mo, a_t.sqrt())? + mul_s(&s, b_t.sqrt())?)?,
            ),
        };
        let pred_x0 = match self.clip {
            Some(range) => pred_x0.clamp(-range as f32, range as f32)?,
            None => pred_x0,
        };
        // `_get_variance`, then `std_dev_t = eta * variance ** 0.5` (float32).
        let variance = (1.0 - a_prev) / b_t * (1.0 - a_t / a_prev);
        let std_dev_t = self.eta as f32 * variance.sqrt();
        let dir = mul_s(&pred_eps, (1.0 - a_prev - std_dev_t * std_dev_t).sqrt())?;
        let prev = (mul_s(&pred_x0, a_prev.sqrt())? + dir)?;
        // diffusers draws the noise only when eta > 0.
        let prev = if self.eta > 0.0 {
            let noise = common::batch_randn(&mo, rngs)?;
            (prev + mul_s(&noise, std_dev_t)?)?
        } else {
            prev
        };
        Ok(prev.to_dtype(dtype)?)
    }
}
