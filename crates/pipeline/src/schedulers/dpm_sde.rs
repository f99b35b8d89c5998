//! `DPMSolverSDEScheduler` (dpmpp_sde, dpmpp_sde_karras; A1111's "DPM++ SDE"): k-diffusion's
//! DPM-Solver++ (stochastic) with a midpoint second stage, so two UNet evaluations per step
//! (`order` 2) except the last, and noise from a Brownian tree per image (`brownian`).
//!
//! The schedule interleaves each step's timestep with its midpoint's: `timesteps` is
//! `[T0, mid0, T1, mid1, ..., T(n-1)]` and `sigmas` `[s0, s1, s1, s2, s2, ..., s(n-1), s(n-1), 0]`.
//! A first-order call at `index` steps from `sigmas[index]` halfway (in `t = -ln sigma`) to the
//! next sigma and keeps its sample; the second-order call at `index + 1` evaluates the model at
//! that midpoint and makes the whole step from the kept sample. The last step (to sigma 0) is a
//! plain Euler step. Scalar math is float32, as diffusers does with 0-dim tensors.

use candle_core::Tensor;

use super::brownian::BrownianNoise;
use super::common::{
    self, check_index, config_error, div_s, mul_s, to_f32, ClassDefaults, PredictionType,
    ResolvedConfig, TimestepSpacing,
};
use super::euler::{pred_original, scale_by_sigma};
use super::torch_math;
use super::{Scheduler, SchedulerConfig, SigmaSchedule};
use crate::rng::TorchRng;
use crate::{PipelineError, Result};

/// The class's own `__init__` defaults (its betas differ from most classes').
const DEFAULTS: ClassDefaults = ClassDefaults {
    num_train_timesteps: 1000,
    beta_start: 0.00085,
    beta_end: 0.012,
    beta_schedule: "linear",
    prediction_type: "epsilon",
    timestep_spacing: "linspace",
    steps_offset: 0,
};

/// What a first-order call leaves for the second-order one.
struct Midpoint {
    sample: Tensor,
    sigma: f32,
}

pub struct DpmSolverSde {
    prediction_type: PredictionType,
    /// `[T0, mid0, T1, ..., T(n-1)]`, float64 as diffusers keeps them.
    timesteps: Vec<f64>,
    /// float32, interleaved (see the module docs), ending in 0.
    sigmas: Vec<f32>,
    init_noise_sigma: f32,
    midpoint: Option<Midpoint>,
    /// Made at the first step that draws noise, from the sample's shape and the image seeds.
    noise: Option<BrownianNoise>,
    /// k-diffusion's `eta` of `sample_dpmpp_sde` (1: diffusers' class).
    eta: f32,
}

impl DpmSolverSde {
    /// `DPMSolverSDEScheduler.from_config(cfg)` after `set_timesteps(num_inference_steps)`: Karras
    /// sigmas when the config's `use_karras_sigmas` says so (`SchedulerKind::config` sets it).
    pub fn new(cfg: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        common::check_steps(num_inference_steps)?;
        let r = ResolvedConfig::resolve(cfg, &DEFAULTS)?;
        if r.prediction_type == PredictionType::Sample {
            return Err(config_error(
                "DPM++ SDE does not support prediction_type \"sample\"",
            ));
        }
        if r.rescale_betas_zero_snr {
            return Err(config_error(
                "DPM++ SDE does not support rescale_betas_zero_snr",
            ));
        }
        let schedule = SigmaSchedule::of_config(cfg)?;
        let n = num_inference_steps;
        let train = r.num_train_timesteps;
        let mut timesteps = match r.timestep_spacing {
            // np.linspace(0, T - 1, n, dtype=float)[::-1]: float64, not rounded.
            TimestepSpacing::Linspace => {
                let mut t = common::np_linspace(0.0, (train - 1) as f64, n);
                t.reverse();
                t
            }
            TimestepSpacing::Leading => common::leading_timesteps(n, train, r.steps_offset),
            TimestepSpacing::Trailing => common::trailing_timesteps(n, train),
        };
        let train_sigmas = common::sigmas_from_alphas_cumprod(&r.alphas_cumprod()?);
        // np.log of the float32 table is float32.
        let log_sigmas: Vec<f64> = train_sigmas.iter().map(|s| s.ln() as f64).collect();
        let mut sigmas = common::interp_sigmas(&timesteps, &train_sigmas);
        let (in_min, in_max) = (sigmas[sigmas.len() - 1], sigmas[0]);
        let converted = match schedule {
            SigmaSchedule::Karras => Some(common::karras_sigmas(in_min, in_max, n)),
            other => other.convert(cfg, in_min, in_max, n),
        };
        if let Some(converted) = converted {
            sigmas = converted;
            timesteps = sigmas
                .iter()
                .map(|&s| common::sigma_to_t(s, &log_sigmas))
                .collect();
        }
        // _second_order_timesteps: the timestep of each step's midpoint in t = -ln(sigma).
        let midpoints: Vec<f64> = sigmas
            .windows(2)
            .map(|w| {
                let (t, t_next) = (-w[0].ln(), -w[1].ln());
                let t_proposed = t + (t_next - t) * 0.5;
                common::sigma_to_t((-t_proposed).exp(), &log_sigmas)
            })
            .collect();
        let mut steps_f32: Vec<f32> = sigmas.iter().map(|&s| s as f32).collect();
        steps_f32.push(0.0);
        let mut interleaved = vec![steps_f32[0]];
        for &s in &steps_f32[1..n] {
            interleaved.extend([s, s]);
        }
        interleaved.push(0.0);
        let mut all_timesteps = vec![timesteps[0]];
        for (mid, &t) in midpoints.iter().zip(&timesteps[1..]) {
            all_timesteps.extend([*mid, t]);
        }
        let max = interleaved
            .iter()
            .copied()
            .fold(f32::NEG_INFINITY, f32::max);
        let init_noise_sigma = match r.timestep_spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
            TimestepSpacing::Leading => (max * max + 1.0).sqrt(),
        };
        Ok(Self {
            prediction_type: r.prediction_type,
            timesteps: all_timesteps,
            sigmas: interleaved,
            init_noise_sigma,
            midpoint: None,
            noise: None,
            eta: 1.0,
        })
    }

    /// The float32 sigmas, interleaved as the timesteps are, plus the final zero.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// The Brownian noise of the whole batch between two sigmas, one tree per image, seeded
    /// with each image's generator's seed (A1111: one tree per image, seeded with its seed).
    fn noise(
        &mut self,
        like: &Tensor,
        rngs: &[TorchRng],
        sigma: f32,
        sigma_next: f32,
    ) -> Result<Tensor> {
        let batch = like.dim(0)?;
        if rngs.len() != batch {
            return Err(PipelineError::InvalidRequest(format!(
                "{} generators for a batch of {batch}",
                rngs.len()
            )));
        }
        if self.noise.is_none() {
            let positive = self.sigmas.iter().copied().filter(|&s| s > 0.0);
            let min = positive.fold(f32::INFINITY, f32::min);
            let max = self
                .sigmas
                .iter()
                .copied()
                .fold(f32::NEG_INFINITY, f32::max);
            let seeds: Vec<u64> = rngs.iter().map(TorchRng::initial_seed).collect();
            self.noise = Some(BrownianNoise::new(
                min,
                max,
                &seeds,
                like.elem_count() / batch.max(1),
            )?);
        }
        let values = self
            .noise
            .as_mut()
            .expect("made above")
            .sample(sigma, sigma_next)?;
        Ok(Tensor::from_vec(values, like.shape(), like.device())?)
    }
}

/// `sigma_fn(t) = exp(-t)` and `t_fn(sigma) = -ln(sigma)`, float32.
fn sigma_fn(t: f32) -> f32 {
    torch_math::exp(-t)
}

fn t_fn(sigma: f32) -> f32 {
    -torch_math::log(sigma)
}

impl Scheduler for DpmSolverSde {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn eta(&self) -> Option<f64> {
        Some(f64::from(self.eta))
    }

    fn set_eta(&mut self, eta: f64) {
        self.eta = eta as f32;
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma as f64
    }

    fn scale_model_input(&self, sample: &Tensor, index: usize) -> Result<Tensor> {
        check_index(index, self.timesteps.len())?;
        let sigma = match &self.midpoint {
            None => self.sigmas[index],
            Some(mid) => mid.sigma,
        };
        scale_by_sigma(sample, sigma)
    }

    fn order(&self) -> usize {
        2
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        let sigma = self.sigmas[common::noise_index(index, self.timesteps.len())?];
        let dtype = original.dtype();
        Ok((to_f32(original)? + mul_s(&to_f32(noise)?, sigma)?)?.to_dtype(dtype)?)
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
        let first_order = self.midpoint.is_none();
        let (sigma, sigma_next) = if first_order {
            (self.sigmas[index], self.sigmas[index + 1])
        } else {
            if index == 0 {
                return Err(PipelineError::InvalidRequest(
                    "DPM++ SDE second stage before its first".into(),
                ));
            }
            (self.sigmas[index - 1], self.sigmas[index])
        };
        let (t, t_next) = (t_fn(sigma), t_fn(sigma_next));
        let t_proposed = t + (t_next - t) * 0.5;
        let sigma_input = if first_order {
            sigma
        } else {
            sigma_fn(t_proposed)
        };
        let x0 = pred_original(self.prediction_type, &mo, &s, sigma_input)?;
        if sigma_next == 0.0 {
            // The last step: Euler to sigma 0, no noise.
            let derivative = div_s(&(&s - &x0)?, sigma)?;
            let prev = (&s + mul_s(&derivative, sigma_next - sigma)?)?;
            return Ok(prev.to_dtype(dtype)?);
        }
        let (t_next, base) = match self.midpoint.take() {
            None => (t_proposed, s),
            Some(mid) => (t_next, mid.sample),
        };
        let (sigma_from, sigma_to) = (sigma_fn(t), sigma_fn(t_next));
        let (from2, to2) = (sigma_from.powi(2), sigma_to.powi(2));
        // k-diffusion's get_ancestral_step: min(sigma_to, eta * ...); diffusers' with eta 1.
        let up = self.eta * ((to2 * (from2 - to2)) / from2).sqrt();
        // Python's min(a, b): b only when b < a.
        let sigma_up = if up < sigma_to { up } else { sigma_to };
        let sigma_down = (to2 - sigma_up.powi(2)).sqrt();
        let ancestral_t = t_fn(sigma_down);
        let keep = sigma_fn(ancestral_t) / sigma_fn(t);
        let toward_x0 = torch_math::expm1(t - ancestral_t);
        let prev = (mul_s(&base, keep)? - mul_s(&x0, toward_x0)?)?;
        let noise = self.noise(&base, rngs, sigma_fn(t), sigma_fn(t_next))?;
        let prev = (prev + mul_s(&noise, sigma_up)?)?;
        if first_order {
            self.midpoint = Some(Midpoint {
                sample: base,
                sigma: sigma_fn(t_next),
            });
        }
        Ok(prev.to_dtype(dtype)?)
    }
}
