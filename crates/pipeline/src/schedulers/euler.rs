//! `EulerDiscreteScheduler` (euler) and `EulerAncestralDiscreteScheduler` (euler_a), plus the
//! sigma schedule they share with LMS (k-diffusion style: the sample lives at noise level sigma).

use candle_core::Tensor;

use super::churn::{self, Churn};
use super::common::{
    self, check_index, config_error, div_s, mul_s, to_f32, ClassDefaults, PredictionType,
    ResolvedConfig, TimestepSpacing,
};
use super::{Scheduler, SchedulerConfig, SigmaSchedule};
use crate::rng::TorchRng;
use crate::Result;

const DEFAULTS: ClassDefaults = ClassDefaults::with_spacing("linspace");

/// Timesteps and sigmas after `set_timesteps`, plus `init_noise_sigma`.
pub(super) struct SigmaSteps {
    /// float32 values, loop order.
    pub timesteps: Vec<f64>,
    /// float32 sigmas, one per timestep plus the final one.
    pub sigmas: Vec<f32>,
    pub init_noise_sigma: f32,
}

/// Which options of `set_timesteps` a class has.
#[derive(Clone, Copy)]
pub(super) struct SigmaOptions {
    /// Euler: `interpolation_type`, `final_sigmas_type`, `timestep_type`, `sigma_min/max`.
    pub euler_options: bool,
    /// Euler and LMS read `use_karras_sigmas`; so does Euler ancestral here (`euler_a_karras`).
    pub karras: bool,
    /// Euler and LMS read `use_exponential_sigmas` and `use_beta_sigmas`; Euler ancestral not.
    pub exponential_beta: bool,
}

pub(super) fn sigma_schedule(
    r: &ResolvedConfig,
    cfg: &SchedulerConfig,
    n: usize,
    opts: SigmaOptions,
) -> Result<SigmaSteps> {
    let ac = r.alphas_cumprod()?;
    let mut ac_for_sigmas = ac.clone();
    if opts.euler_options && r.rescale_betas_zero_snr {
        // Euler keeps the terminal sigma finite.
        let last = ac_for_sigmas.len() - 1;
        ac_for_sigmas[last] = 2f32.powi(-24);
    }
    let train_sigmas = common::sigmas_from_alphas_cumprod(&ac_for_sigmas);
    let mut timesteps = common::sigma_family_timesteps(r, n);
    let mut sigmas: Vec<f64> =
        if opts.euler_options && cfg.interpolation_type.as_deref() == Some("log_linear") {
            // torch.linspace(log(s[-1]), log(s[0]), n + 1).exp(), all in float32.
            let lo = train_sigmas[train_sigmas.len() - 1].ln() as f64;
            let hi = train_sigmas[0].ln() as f64;
            common::torch_linspace_f32(lo, hi, n + 1)
                .into_iter()
                .map(|x| x.exp() as f64)
                .collect()
        } else {
            match cfg.interpolation_type.as_deref() {
                None | Some("linear") => {}
                Some(other) if opts.euler_options => {
                    return Err(config_error(format!(
                        "interpolation_type {other:?} is not supported"
                    )))
                }
                Some(_) => {}
            }
            common::interp_sigmas(&timesteps, &train_sigmas)
        };
    // Euler ancestral's class reads none of the schedule keys (our `euler_a_karras` reads Karras').
    let schedule = match SigmaSchedule::of_config(cfg)? {
        SigmaSchedule::Exponential | SigmaSchedule::Beta if !opts.exponential_beta => {
            SigmaSchedule::Uniform
        }
        SigmaSchedule::Karras if !opts.karras => SigmaSchedule::Uniform,
        s => s,
    };
    let (in_min, in_max) = (sigmas[sigmas.len() - 1], sigmas[0]);
    let converted = match schedule {
        SigmaSchedule::Uniform => None,
        SigmaSchedule::Karras => {
            // Only Euler's `_convert_to_karras` reads the config's sigma_min/sigma_max.
            let (smin, smax) = if opts.euler_options {
                (cfg.sigma_min, cfg.sigma_max)
            } else {
                (None, None)
            };
            Some(common::karras_sigmas(
                smin.unwrap_or(in_min),
                smax.unwrap_or(in_max),
                n,
            ))
        }
        other => other.convert(cfg, in_min, in_max, n),
    };
    if let Some(converted) = converted {
        sigmas = converted;
        // np.log of the float32 training sigmas.
        let log_sigmas: Vec<f64> = train_sigmas.iter().map(|s| s.ln() as f64).collect();
        timesteps = sigmas
            .iter()
            .map(|&s| common::sigma_to_t(s, &log_sigmas) as f32 as f64)
            .collect();
    }
    let sigma_last = if opts.euler_options {
        match cfg.final_sigmas_type.as_deref().unwrap_or("zero") {
            "zero" => 0.0,
            "sigma_min" => ((1.0 - ac[0]) / ac[0]).sqrt(),
            other => {
                return Err(config_error(format!(
                    "final_sigmas_type {other:?} is not supported"
                )))
            }
        }
    } else {
        0.0
    };
    let mut sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
    sigmas.push(sigma_last);
    if opts.euler_options
        && cfg.timestep_type.as_deref() == Some("continuous")
        && r.prediction_type == PredictionType::VPrediction
    {
        timesteps = sigmas[..sigmas.len() - 1]
            .iter()
            .map(|s| (0.25f32 * s.ln()) as f64)
            .collect();
    }
    let max = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let init_noise_sigma = match r.timestep_spacing {
        TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
        TimestepSpacing::Leading => (max * max + 1.0).sqrt(),
    };
    Ok(SigmaSteps {
        timesteps,
        sigmas,
        init_noise_sigma,
    })
}

/// The sigma family's `add_noise`: `original + noise * sigmas[index]`, float32.
pub(super) fn add_noise_sigma(
    sched: &SigmaSteps,
    original: &Tensor,
    noise: &Tensor,
    index: usize,
) -> Result<Tensor> {
    let sigma = sched.sigmas[common::noise_index(index, sched.timesteps.len())?];
    let dtype = original.dtype();
    let x = (to_f32(original)? + mul_s(&to_f32(noise)?, sigma)?)?;
    Ok(x.to_dtype(dtype)?)
}

/// `sample / sqrt(sigma^2 + 1)`, float32.
pub(super) fn scale_by_sigma(sample: &Tensor, sigma: f32) -> Result<Tensor> {
    let dtype = sample.dtype();
    Ok(div_s(&to_f32(sample)?, (sigma * sigma + 1.0).sqrt())?.to_dtype(dtype)?)
}

/// The denoised estimate x0 from the model output at noise level `sigma`.
pub(super) fn pred_original(
    pt: PredictionType,
    mo: &Tensor,
    sample: &Tensor,
    sigma: f32,
) -> Result<Tensor> {
    Ok(match pt {
        PredictionType::Epsilon => (sample - mul_s(mo, sigma)?)?,
        PredictionType::VPrediction => {
            let c = -sigma / (sigma * sigma + 1.0).sqrt();
            (mul_s(mo, c)? + div_s(sample, sigma * sigma + 1.0)?)?
        }
        PredictionType::Sample => mo.clone(),
    })
}

/// What the sigma-space schedulers (Euler, Euler ancestral, LMS) share: the prediction type, the
/// schedule, and the `Scheduler` methods that read nothing else (`sigma_scheduler_methods!`).
pub(super) struct SigmaBase {
    pub prediction_type: PredictionType,
    pub sched: SigmaSteps,
}

impl SigmaBase {
    pub fn new(
        cfg: &SchedulerConfig,
        num_inference_steps: usize,
        opts: SigmaOptions,
    ) -> Result<Self> {
        common::check_steps(num_inference_steps)?;
        let r = ResolvedConfig::resolve(cfg, &DEFAULTS)?;
        let sched = sigma_schedule(&r, cfg, num_inference_steps, opts)?;
        Ok(Self {
            prediction_type: r.prediction_type,
            sched,
        })
    }

    /// The start of every step: the sample in float32, its sigma and the denoised estimate x0.
    pub fn step_start(
        &self,
        model_output: &Tensor,
        sample: &Tensor,
        index: usize,
    ) -> Result<(Tensor, f32, Tensor)> {
        check_index(index, self.sched.timesteps.len())?;
        let (mo, s) = (to_f32(model_output)?, to_f32(sample)?);
        let sigma = self.sched.sigmas[index];
        let x0 = pred_original(self.prediction_type, &mo, &s, sigma)?;
        Ok((s, sigma, x0))
    }
}

/// The `Scheduler` methods of a type whose `base` field is a `SigmaBase`.
macro_rules! sigma_scheduler_methods {
    () => {
        fn timesteps(&self) -> &[f64] {
            &self.base.sched.timesteps
        }

        fn init_noise_sigma(&self) -> f64 {
            self.base.sched.init_noise_sigma as f64
        }

        fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
            $crate::schedulers::euler::add_noise_sigma(&self.base.sched, original, noise, index)
        }

        fn scale_model_input(&self, sample: &Tensor, index: usize) -> Result<Tensor> {
            $crate::schedulers::common::check_index(index, self.base.sched.timesteps.len())?;
            $crate::schedulers::euler::scale_by_sigma(sample, self.base.sched.sigmas[index])
        }

        fn guidance_sigma(&self, index: usize) -> Option<f64> {
            self.base.sched.sigmas.get(index).map(|&s| s as f64)
        }
    };
}
pub(super) use sigma_scheduler_methods;

pub struct EulerDiscrete {
    base: SigmaBase,
    churn: Churn,
    /// `np.log` of the training sigmas, for the timesteps of churned sigmas.
    log_sigmas: Vec<f64>,
    /// Each step's `sigma_hat` (its sigma without churn) and the UNet's timestep there.
    hats: Vec<f32>,
    timesteps: Vec<f64>,
}

impl EulerDiscrete {
    pub fn new(cfg: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        let opts = SigmaOptions {
            euler_options: true,
            karras: true,
            exponential_beta: true,
        };
        let base = SigmaBase::new(cfg, num_inference_steps, opts)?;
        let r = ResolvedConfig::resolve(cfg, &DEFAULTS)?;
        let train = common::sigmas_from_alphas_cumprod(&r.alphas_cumprod()?);
        let mut me = Self {
            hats: base.sched.sigmas[..base.sched.timesteps.len()].to_vec(),
            timesteps: base.sched.timesteps.clone(),
            base,
            churn: Churn::default(),
            log_sigmas: train.iter().map(|s| s.ln() as f64).collect(),
        };
        me.plan_from(0);
        Ok(me)
    }

    /// The float32 sigmas (one per timestep plus the final one).
    pub fn sigmas(&self) -> &[f32] {
        &self.base.sched.sigmas
    }

    /// The churned sigmas and their timesteps of a run from step `start`.
    fn plan_from(&mut self, start: usize) {
        let sched = &self.base.sched;
        self.hats = self.churn.sigma_hats(&sched.sigmas, start);
        self.timesteps = (0..sched.timesteps.len())
            .map(|i| {
                churn::timestep_at(
                    self.hats[i],
                    sched.sigmas[i],
                    sched.timesteps[i],
                    &self.log_sigmas,
                )
            })
            .collect();
    }
}

impl Scheduler for EulerDiscrete {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.base.sched.init_noise_sigma as f64
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        add_noise_sigma(&self.base.sched, original, noise, index)
    }

    fn scale_model_input(&self, sample: &Tensor, index: usize) -> Result<Tensor> {
        check_index(index, self.timesteps.len())?;
        scale_by_sigma(sample, self.hats[index])
    }

    fn set_churn(&mut self, churn: Churn) {
        self.churn = churn;
        self.plan_from(0);
    }

    fn set_begin_index(&mut self, begin: usize) {
        self.plan_from(begin);
    }

    fn prepare_sample(
        &mut self,
        sample: &Tensor,
        index: usize,
        rngs: &mut [TorchRng],
    ) -> Result<Option<Tensor>> {
        check_index(index, self.timesteps.len())?;
        let sigma = self.base.sched.sigmas[index];
        self.churn.raise(sample, sigma, self.hats[index], rngs)
    }

    fn guidance_sigma(&self, index: usize) -> Option<f64> {
        self.hats.get(index).map(|&s| s as f64)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        _rngs: &mut [TorchRng],
    ) -> Result<Tensor> {
        let dtype = model_output.dtype();
        check_index(index, self.timesteps.len())?;
        // k-diffusion's step from sigma_hat (the sigma itself where the step is not churned;
        // the sample was raised there by `prepare_sample`), whatever the prediction type.
        let sigma_hat = self.hats[index];
        let (mo, s) = (to_f32(model_output)?, to_f32(sample)?);
        let x0 = pred_original(self.base.prediction_type, &mo, &s, sigma_hat)?;
        let derivative = div_s(&(&s - x0)?, sigma_hat)?;
        let dt = self.base.sched.sigmas[index + 1] - sigma_hat;
        let prev = (&s + mul_s(&derivative, dt)?)?;
        Ok(prev.to_dtype(dtype)?)
    }
}

pub struct EulerAncestral {
    base: SigmaBase,
    /// k-diffusion's `eta` (1: diffusers' EulerAncestralDiscreteScheduler).
    eta: f32,
}

impl EulerAncestral {
    /// diffusers' class has no `use_karras_sigmas`; with the key set (`euler_a_karras`, A1111's
    /// `Euler a` + `Karras`) its step runs on the Karras schedule EulerDiscreteScheduler computes
    /// from the same config (tools/api_schedulers.py's `EulerAncestralKarras`).
    pub fn new(cfg: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        let opts = SigmaOptions {
            euler_options: false,
            karras: true,
            exponential_beta: false,
        };
        Ok(Self {
            base: SigmaBase::new(cfg, num_inference_steps, opts)?,
            eta: 1.0,
        })
    }

    /// The float32 sigmas (one per timestep plus the final zero).
    pub fn sigmas(&self) -> &[f32] {
        &self.base.sched.sigmas
    }
}

impl Scheduler for EulerAncestral {
    sigma_scheduler_methods!();

    fn eta(&self) -> Option<f64> {
        Some(f64::from(self.eta))
    }

    fn set_eta(&mut self, eta: f64) {
        self.eta = eta as f32;
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        rngs: &mut [TorchRng],
    ) -> Result<Tensor> {
        let dtype = model_output.dtype();
        let (s, sigma, x0) = self.base.step_start(model_output, sample, index)?;
        let mo = model_output;
        let (from, to) = (sigma, self.base.sched.sigmas[index + 1]);
        // k-diffusion's get_ancestral_step: min(sigma_to, eta * ...); with eta 1 the min never
        // binds and this is diffusers' step.
        let sigma_up =
            (self.eta * (to * to * (from * from - to * to) / (from * from)).sqrt()).min(to);
        let sigma_down = (to * to - sigma_up * sigma_up).sqrt();
        let derivative = div_s(&(&s - x0)?, sigma)?;
        let prev = (&s + mul_s(&derivative, sigma_down - sigma)?)?;
        let noise = common::batch_randn(mo, rngs)?;
        let prev = (prev + mul_s(&noise, sigma_up)?)?;
        Ok(prev.to_dtype(dtype)?)
    }
}
