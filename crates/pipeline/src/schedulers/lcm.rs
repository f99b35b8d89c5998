//! `LCMScheduler` (A1111 `LCM`): latent consistency models' multistep sampling, for LCM-distilled
//! UNets and LCM-LoRAs (4-8 steps, low guidance). Each step maps the sample to its denoised
//! estimate with the consistency boundary scalings, then (but at the last step) noises it again
//! to the next timestep with fresh noise from the request's generators. Its timesteps are a
//! subset of the `original_inference_steps` schedule the model was distilled on. This is the
//! `timestep_cond`-free path (SD 1.5 LCM-LoRA); guidance stays the pipeline's own.

use candle_core::Tensor;

use super::common::{
    self, check_index, config_error, div_s, mul_s, to_f32, ClassDefaults, PredictionType,
    ResolvedConfig,
};
use super::{Scheduler, SchedulerConfig};
use crate::rng::TorchRng;
use crate::{PipelineError, Result};

const DEFAULTS: ClassDefaults = ClassDefaults {
    beta_start: 0.00085,
    beta_end: 0.012,
    beta_schedule: "scaled_linear",
    ..ClassDefaults::with_spacing("leading")
};

/// `sigma_data` of `get_scalings_for_boundary_condition_discrete`.
const SIGMA_DATA: f32 = 0.5;

pub struct Lcm {
    prediction_type: PredictionType,
    clip: Option<f32>,
    timestep_scaling: f32,
    alphas_cumprod: Vec<f32>,
    /// Integer training timesteps, descending.
    timesteps: Vec<f64>,
}

impl Lcm {
    /// `LCMScheduler.from_config(cfg)`, then `set_timesteps(num_inference_steps)` (strength 1,
    /// as the text-to-image and image-to-image pipelines both call it).
    pub fn new(cfg: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        common::check_steps(num_inference_steps)?;
        let r = ResolvedConfig::resolve(cfg, &DEFAULTS)?;
        if cfg.thresholding.unwrap_or(false) {
            return Err(config_error("LCMScheduler thresholding is not supported"));
        }
        let n = num_inference_steps;
        let train = r.num_train_timesteps;
        let original = cfg.original_inference_steps.unwrap_or(50);
        if original == 0 || original > train {
            return Err(config_error(format!(
                "original_inference_steps {original} must be 1..={train} (num_train_timesteps)"
            )));
        }
        if n > original {
            return Err(PipelineError::InvalidRequest(format!(
                "the LCM scheduler takes at most {original} steps (the model's \
                 original_inference_steps), got {n}"
            )));
        }
        // lcm_origin_timesteps = arange(1, original + 1) * (T // original) - 1, reversed; then
        // the entries at floor(linspace(0, original, n, endpoint=False)).
        let k = train / original;
        let origin: Vec<usize> = (1..=original).rev().map(|i| i * k - 1).collect();
        let step = origin.len() as f64 / n as f64;
        let timesteps = (0..n)
            .map(|i| origin[(i as f64 * step).floor() as usize] as f64)
            .collect();
        Ok(Self {
            prediction_type: r.prediction_type,
            clip: cfg
                .clip_sample
                .unwrap_or(false)
                .then(|| cfg.clip_sample_range.unwrap_or(1.0) as f32),
            timestep_scaling: cfg.timestep_scaling.unwrap_or(10.0) as f32,
            alphas_cumprod: r.alphas_cumprod()?,
            timesteps,
        })
    }

    fn alpha(&self, t: f64) -> Result<f32> {
        self.alphas_cumprod
            .get(t as usize)
            .copied()
            .ok_or_else(|| config_error(format!("timestep {t} is outside the training schedule")))
    }

    /// `(c_skip, c_out)` at timestep `t`, in float32 (the timestep is a torch integer tensor).
    fn boundary_scalings(&self, t: f64) -> (f32, f32) {
        let scaled = t as f32 * self.timestep_scaling;
        let denom = scaled * scaled + SIGMA_DATA * SIGMA_DATA;
        (SIGMA_DATA * SIGMA_DATA / denom, scaled / denom.sqrt())
    }
}

impl Scheduler for Lcm {
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

    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        rngs: &mut [TorchRng],
    ) -> Result<Tensor> {
        check_index(index, self.timesteps.len())?;
        let dtype = model_output.dtype();
        let (mo, s) = (to_f32(model_output)?, to_f32(sample)?);
        let t = self.timesteps[index];
        let last = index + 1 == self.timesteps.len();
        let prev_t = if last { t } else { self.timesteps[index + 1] };
        let a_t = self.alpha(t)?;
        let b_t = 1.0 - a_t;
        let (c_skip, c_out) = self.boundary_scalings(t);
        let mut x0 = match self.prediction_type {
            PredictionType::Epsilon => div_s(&(&s - mul_s(&mo, b_t.sqrt())?)?, a_t.sqrt())?,
            PredictionType::Sample => mo.clone(),
            PredictionType::VPrediction => (mul_s(&s, a_t.sqrt())? - mul_s(&mo, b_t.sqrt())?)?,
        };
        if let Some(range) = self.clip {
            x0 = x0.clamp(-range, range)?;
        }
        let denoised = (mul_s(&x0, c_out)? + mul_s(&s, c_skip)?)?;
        let prev = if last {
            denoised
        } else {
            let a_prev = self.alpha(prev_t)?;
            let noise = common::batch_randn(&mo, rngs)?;
            (mul_s(&denoised, a_prev.sqrt())? + mul_s(&noise, (1.0 - a_prev).sqrt())?)?
        };
        Ok(prev.to_dtype(dtype)?)
    }
}
