//! Noise schedulers, each built from the model's `scheduler_config.json` the way diffusers'
//! `Class.from_config` builds it: keys present in the file win, absent keys take the class's defaults.

use candle_core::Tensor;

use crate::rng::TorchRng;
use crate::Result;

pub use churn::Churn;
pub use kind::{Sampler, SchedulerKind};
pub use sigma_schedule::SigmaSchedule;

pub mod a1111_timesteps;
pub mod brownian;
pub mod churn;
pub mod common;
pub mod ddim;
pub mod dpm2;
pub mod dpm2_a1111;
pub mod dpm_adaptive;
pub mod dpm_fast;
pub mod dpm_sde;
pub mod dpm_solver;
pub mod euler;
pub mod heun;
mod interleaved;
pub mod kdiffusion;
mod kind;
pub mod lcm;
pub mod lms;
pub mod multistep;
pub mod pndm;
pub mod restart;
pub mod seed_sequence;
pub mod sigma_schedule;
pub mod torch_math;
pub mod unipc;
pub mod unipc_a1111;

/// Builds `kind` on its own schedule ([`SchedulerKind::schedule`]): see [`build_with`].
pub fn build(
    kind: SchedulerKind,
    cfg: &SchedulerConfig,
    num_inference_steps: usize,
) -> Result<Box<dyn Scheduler>> {
    build_with(kind, kind.schedule(), cfg, num_inference_steps)
}

/// Builds `kind` on `schedule` from the model's scheduler config (as
/// `Class.from_config(cfg, **overrides)`, see [`SchedulerKind::config_with`]) and runs its
/// `set_timesteps(num_inference_steps)`.
pub fn build_with(
    kind: SchedulerKind,
    schedule: SigmaSchedule,
    cfg: &SchedulerConfig,
    num_inference_steps: usize,
) -> Result<Box<dyn Scheduler>> {
    common::check_steps(num_inference_steps)?;
    let cfg = &kind.config_with(schedule, cfg)?;
    let n = num_inference_steps;
    Ok(match kind.sampler() {
        Sampler::Pndm => Box::new(pndm::Pndm::new(cfg, n)?),
        Sampler::Ddim => Box::new(ddim::Ddim::new(cfg, n)?),
        Sampler::Euler => Box::new(euler::EulerDiscrete::new(cfg, n)?),
        Sampler::EulerAncestral => Box::new(euler::EulerAncestral::new(cfg, n)?),
        Sampler::DpmPp2m | Sampler::DpmPp2mSde | Sampler::DpmPp2mSdeHeun => {
            Box::new(dpm_solver::DpmSolverMultistep::new(cfg, n)?)
        }
        Sampler::DpmPp2mSdeBrownian | Sampler::DpmPp2mSdeHeunBrownian => {
            let mut s = dpm_solver::DpmSolverMultistep::new(cfg, n)?;
            s.use_brownian_noise();
            Box::new(s)
        }
        Sampler::DpmPpSde => Box::new(dpm_sde::DpmSolverSde::new(cfg, n)?),
        Sampler::DpmPp2sAncestral => Box::new(kdiffusion::DpmPp2sAncestral::new(cfg, n)?),
        Sampler::DpmPp3mSde => Box::new(kdiffusion::DpmPp3mSde::new(cfg, n)?),
        Sampler::Lms => Box::new(lms::LmsDiscrete::new(cfg, n)?),
        Sampler::UniPc => Box::new(unipc::UniPcMultistep::new(cfg, n)?),
        Sampler::Heun => Box::new(heun::HeunDiscrete::new(cfg, n)?),
        Sampler::Dpm2 => Box::new(dpm2::KDpm2::new(cfg, n)?),
        Sampler::Dpm2Ancestral => Box::new(dpm2::KDpm2Ancestral::new(cfg, n)?),
        Sampler::Dpm2A1111 => Box::new(dpm2_a1111::Dpm2A1111::new(cfg, n, false)?),
        Sampler::Dpm2AncestralA1111 => Box::new(dpm2_a1111::Dpm2A1111::new(cfg, n, true)?),
        Sampler::Lcm => Box::new(lcm::Lcm::new(cfg, n)?),
        Sampler::DdimA1111 => Box::new(a1111_timesteps::A1111Timesteps::new(
            a1111_timesteps::Rule::Ddim,
            cfg,
            n,
        )?),
        Sampler::DdimCfgpp => Box::new(a1111_timesteps::A1111Timesteps::new(
            a1111_timesteps::Rule::DdimCfgpp,
            cfg,
            n,
        )?),
        Sampler::PlmsA1111 => Box::new(a1111_timesteps::A1111Timesteps::new(
            a1111_timesteps::Rule::Plms,
            cfg,
            n,
        )?),
        Sampler::UniPcA1111 => Box::new(unipc_a1111::UniPcA1111::new(cfg, n)?),
        Sampler::Restart => Box::new(restart::Restart::new(cfg, n)?),
        Sampler::DpmFast => Box::new(dpm_fast::DpmFast::new(cfg, n)?),
        Sampler::DpmAdaptive => Box::new(dpm_adaptive::DpmAdaptive::new(cfg, n)?),
    })
}

/// One sampling run: made for a fixed number of inference steps; `step` is called once per
/// entry of `timesteps()`, in order.
pub trait Scheduler: Send {
    /// The timesteps handed to the UNet, in loop order (may be longer than the step count, e.g. PNDM).
    /// A sampler with adaptive steps (DPM adaptive) lists its evaluations as it decides them:
    /// the list grows after a `step`, and the loop reads it again.
    fn timesteps(&self) -> &[f64];
    /// How many entries `timesteps()` will have when the run ends, for the progress: its
    /// length, or an estimate where it grows (never below its length).
    fn planned_evaluations(&self) -> usize {
        self.timesteps().len()
    }
    /// Standard deviation of the initial noise (`init_noise_sigma`).
    /// 1 unless the scheduler works in sigma space (Euler, LMS).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    /// `scale_model_input` for the `index`-th entry of `timesteps()`: the identity unless the
    /// scheduler works in sigma space.
    fn scale_model_input(&self, sample: &Tensor, _index: usize) -> Result<Tensor> {
        Ok(sample.clone())
    }
    /// One step: the model output at `timesteps()[index]` and the current sample give the previous
    /// sample. Stochastic schedulers draw their noise from `rngs`, one generator per image of the
    /// batch (diffusers' list of generators; one generator for a batch of one).
    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        rngs: &mut [TorchRng],
    ) -> Result<Tensor>;
    /// The sampler's eta (the DDIM paper's; k-diffusion's for ancestral samplers): how much of
    /// each step's noise level is fresh noise. `None`: the scheduler has no eta, and a request's
    /// is ignored (as diffusers' `prepare_extra_step_kwargs` and A1111 ignore it).
    fn eta(&self) -> Option<f64> {
        None
    }
    /// Sets [`Self::eta`]; nothing for a scheduler without one.
    fn set_eta(&mut self, _eta: f64) {}
    /// k-diffusion's churn ([`Churn`]): Euler, Heun and DPM2 take it (as A1111 passes it);
    /// nothing for the others. Set before [`Self::set_begin_index`].
    fn set_churn(&mut self, _churn: Churn) {}
    /// Before the UNet evaluation at `index`: the sample it and the step then take, where the
    /// scheduler changes it first (churn's noise, drawn from `rngs`); `None`: unchanged.
    fn prepare_sample(
        &mut self,
        _sample: &Tensor,
        _index: usize,
        _rngs: &mut [TorchRng],
    ) -> Result<Option<Tensor>> {
        Ok(None)
    }
    /// What A1111's CFG denoiser calls `sigma` at the UNet evaluation `index` (its
    /// `s_min_uncond` test): the evaluation's noise level on sigma samplers, the timestep on
    /// A1111's own timestep samplers. `None`: the noise level of the evaluation's timestep.
    fn guidance_sigma(&self, _index: usize) -> Option<f64> {
        None
    }
    /// What the guidance scale is multiplied by where the negative prompt is run (A1111's
    /// `cond_scale_miltiplier`): 1 but for CFG++ (1 / 12.5).
    fn guidance_scale_multiplier(&self) -> f64 {
        1.0
    }
    /// Whether [`Self::step`] needs the evaluation's unconditional prediction (CFG++'s
    /// direction, A1111's `need_last_noise_uncond`); the loop then hands it over with
    /// [`Self::set_uncond_prediction`] before the step.
    fn takes_uncond_prediction(&self) -> bool {
        false
    }
    /// The unconditional prediction of the evaluation the next [`Self::step`] takes (the
    /// prompt's where the evaluation skipped the negative prompt, as A1111's `fake_uncond`).
    fn set_uncond_prediction(&mut self, _uncond: Tensor) {}
    /// A1111's `mask_before_denoising` (the CFG denoiser of its timestep samplers, DDIM, DDIM
    /// CFG++, PLMS and UniPC): A1111's inpainting blends the model's input with the init latents
    /// before every evaluation instead of blending its prediction after it.
    fn blends_model_input(&self) -> bool {
        false
    }
    /// Model evaluations per step (diffusers' `scheduler.order`): 2 for Heun, KDPM2 and DPM++ SDE,
    /// else 1.
    fn order(&self) -> usize {
        1
    }
    /// The index in `timesteps()` of step `step`'s first UNet evaluation, where a run that
    /// starts at that step's noise level begins (A1111's img2img rule): `step * order`, the
    /// second-order samplers' pairs included.
    fn first_index_of_step(&self, step: usize) -> usize {
        step * self.order()
    }
    /// `set_begin_index`: the run starts at `timesteps()[begin]` (img2img's `t_start * order`).
    /// Only schedulers that keep their own step counter need it; the others read `index`.
    fn set_begin_index(&mut self, _begin: usize) {}
    /// An A1111 img2img pass starts from step `step` of the schedule (called before
    /// [`Self::set_begin_index`]); only A1111's own timestep samplers, whose start is not their
    /// first evaluation's noise level, need it.
    fn set_start_step(&mut self, _step: usize) {}
    /// `add_noise(original, noise, timesteps()[index])`: the sample at that timestep's noise level
    /// (inpainting's known region after each step; the blend's coefficients).
    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor>;
    /// The noised image a pass that begins at `begin` starts from: [`Self::add_noise`] there,
    /// except for A1111's timestep samplers (one level above, [`Self::set_start_step`]).
    fn add_start_noise(&self, original: &Tensor, noise: &Tensor, begin: usize) -> Result<Tensor> {
        self.add_noise(original, noise, begin)
    }
}

/// `scheduler_config.json`, every key optional: `None` means "absent from the file", and each
/// scheduler then takes its own class default, as diffusers' `from_config` does.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
pub struct SchedulerConfig {
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    pub num_train_timesteps: Option<usize>,
    pub beta_start: Option<f64>,
    pub beta_end: Option<f64>,
    pub beta_schedule: Option<String>,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: Option<String>,
    pub timestep_spacing: Option<String>,
    pub steps_offset: Option<usize>,
    pub set_alpha_to_one: Option<bool>,
    pub skip_prk_steps: Option<bool>,
    pub clip_sample: Option<bool>,
    pub clip_sample_range: Option<f64>,
    pub thresholding: Option<bool>,
    pub rescale_betas_zero_snr: Option<bool>,
    pub use_karras_sigmas: Option<bool>,
    pub interpolation_type: Option<String>,
    pub timestep_type: Option<String>,
    pub algorithm_type: Option<String>,
    pub solver_order: Option<usize>,
    pub solver_type: Option<String>,
    pub lower_order_final: Option<bool>,
    pub final_sigmas_type: Option<String>,
    pub euler_at_final: Option<bool>,
    pub predict_x0: Option<bool>,
    pub disable_corrector: Option<Vec<usize>>,
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    /// Exponential / beta sigma schedules ([`SigmaSchedule`]).
    pub use_exponential_sigmas: Option<bool>,
    pub use_beta_sigmas: Option<bool>,
    /// DPM-Solver / UniPC keys for schedules and models we do not run (flow matching, Lu's
    /// lambdas, clipped lambdas, learned variance): refused when set (`multistep::refuse_unsupported`).
    pub use_lu_lambdas: Option<bool>,
    pub use_flow_sigmas: Option<bool>,
    pub use_dynamic_shifting: Option<bool>,
    pub lambda_min_clipped: Option<f64>,
    pub variance_type: Option<String>,
    pub shift_terminal: Option<f64>,
    pub original_inference_steps: Option<usize>,
    pub timestep_scaling: Option<f64>,
}

#[cfg(test)]
mod kind_tests;
