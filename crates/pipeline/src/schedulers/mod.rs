//! Noise schedulers, each built from the model's `scheduler_config.json` the way diffusers'
//! `Class.from_config` builds it: keys present in the file win, absent keys take the class's defaults.

use candle_core::Tensor;

use crate::rng::TorchRng;
use crate::Result;

pub mod brownian;
pub mod common;
pub mod ddim;
pub mod dpm2;
pub mod dpm_sde;
pub mod dpm_solver;
pub mod euler;
pub mod heun;
mod interleaved;
pub mod lcm;
pub mod lms;
pub mod pndm;
pub mod seed_sequence;
pub mod torch_math;
pub mod unipc;

/// The scheduler names of the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    Pndm,
    Ddim,
    Euler,
    EulerAncestral,
    DpmPp2m,
    DpmPp2mKarras,
    Lms,
    UniPc,
}

impl SchedulerKind {
    /// Every kind, in the order of the API documentation.
    pub const ALL: [SchedulerKind; 8] = [
        Self::Pndm,
        Self::Ddim,
        Self::Euler,
        Self::EulerAncestral,
        Self::DpmPp2m,
        Self::DpmPp2mKarras,
        Self::Lms,
        Self::UniPc,
    ];

    /// The API name (`"euler_a"`, ...); `None` for an unknown name.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    /// The API name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Pndm => "pndm",
            Self::Ddim => "ddim",
            Self::Euler => "euler",
            Self::EulerAncestral => "euler_a",
            Self::DpmPp2m => "dpmpp_2m",
            Self::DpmPp2mKarras => "dpmpp_2m_karras",
            Self::Lms => "lms",
            Self::UniPc => "unipc",
        }
    }

    /// The model's own scheduler, from `_class_name` of its `scheduler_config.json`.
    pub fn default_for(cfg: &SchedulerConfig) -> Result<Self> {
        let class = cfg.class_name.as_deref().ok_or_else(|| {
            common::config_error("no _class_name to choose the default scheduler")
        })?;
        Ok(match class {
            "PNDMScheduler" => Self::Pndm,
            "DDIMScheduler" => Self::Ddim,
            "EulerDiscreteScheduler" => Self::Euler,
            "EulerAncestralDiscreteScheduler" => Self::EulerAncestral,
            "DPMSolverMultistepScheduler" if cfg.use_karras_sigmas == Some(true) => {
                Self::DpmPp2mKarras
            }
            "DPMSolverMultistepScheduler" => Self::DpmPp2m,
            "LMSDiscreteScheduler" => Self::Lms,
            "UniPCMultistepScheduler" => Self::UniPc,
            other => {
                return Err(common::config_error(format!(
                    "unsupported scheduler class {other:?}"
                )))
            }
        })
    }

    /// Same as [`Self::default_for`] (the name docs/ARCHITECTURE.md uses).
    pub fn from_class_name(cfg: &SchedulerConfig) -> Result<Self> {
        Self::default_for(cfg)
    }
}

impl std::fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for SchedulerKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Self::from_name(s).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|k| k.name()).collect();
            format!(
                "unknown scheduler {s:?}; expected one of {}",
                names.join(", ")
            )
        })
    }
}

/// Builds `kind` from the model's scheduler config (as `Class.from_config(cfg)`) and runs its
/// `set_timesteps(num_inference_steps)`.
pub fn build(
    kind: SchedulerKind,
    cfg: &SchedulerConfig,
    num_inference_steps: usize,
) -> Result<Box<dyn Scheduler>> {
    common::check_steps(num_inference_steps)?;
    Ok(match kind {
        SchedulerKind::Pndm => Box::new(pndm::Pndm::new(cfg, num_inference_steps)?),
        SchedulerKind::Ddim => Box::new(ddim::Ddim::new(cfg, num_inference_steps)?),
        SchedulerKind::Euler => Box::new(euler::EulerDiscrete::new(cfg, num_inference_steps)?),
        SchedulerKind::EulerAncestral => {
            Box::new(euler::EulerAncestral::new(cfg, num_inference_steps)?)
        }
        SchedulerKind::DpmPp2m => Box::new(dpm_solver::DpmSolverMultistep::new(
            cfg,
            num_inference_steps,
            false,
        )?),
        SchedulerKind::DpmPp2mKarras => Box::new(dpm_solver::DpmSolverMultistep::new(
            cfg,
            num_inference_steps,
            true,
        )?),
        SchedulerKind::Lms => Box::new(lms::LmsDiscrete::new(cfg, num_inference_steps)?),
        SchedulerKind::UniPc => Box::new(unipc::UniPcMultistep::new(cfg, num_inference_steps)?),
    })
}

/// One sampling run: made for a fixed number of inference steps; `step` is called once per
/// entry of `timesteps()`, in order.
pub trait Scheduler: Send {
    /// The timesteps handed to the UNet, in loop order (may be longer than the step count, e.g. PNDM).
    fn timesteps(&self) -> &[f64];
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
    /// Model evaluations per step (diffusers' `scheduler.order`): 2 for Heun and KDPM2, else 1.
    fn order(&self) -> usize {
        1
    }
    /// `set_begin_index`: the run starts at `timesteps()[begin]` (img2img's `t_start * order`).
    /// Only schedulers that keep their own step counter need it; the others read `index`.
    fn set_begin_index(&mut self, _begin: usize) {}
    /// `add_noise(original, noise, timesteps()[index])`: the sample at that timestep's noise level
    /// (img2img's start, inpainting's known region after each step).
    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor>;
}

/// `scheduler_config.json`, every key optional: `None` means "absent from the file", and each
/// scheduler then takes its own class default, as diffusers' `from_config` does.
#[derive(Debug, Clone, Default, serde::Deserialize)]
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
    pub original_inference_steps: Option<usize>,
    pub timestep_scaling: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for k in SchedulerKind::ALL {
            assert_eq!(SchedulerKind::from_name(k.name()), Some(k));
            assert_eq!(k.name().parse::<SchedulerKind>(), Ok(k));
        }
        assert_eq!(SchedulerKind::from_name("euler-a"), None);
        assert!("k_lms".parse::<SchedulerKind>().is_err());
    }

    #[test]
    fn default_from_class_name() {
        let cfg = |class: &str, karras: Option<bool>| SchedulerConfig {
            class_name: Some(class.to_string()),
            use_karras_sigmas: karras,
            ..Default::default()
        };
        assert_eq!(
            SchedulerKind::default_for(&cfg("PNDMScheduler", None)).unwrap(),
            SchedulerKind::Pndm
        );
        assert_eq!(
            SchedulerKind::default_for(&cfg("DPMSolverMultistepScheduler", Some(true))).unwrap(),
            SchedulerKind::DpmPp2mKarras
        );
        assert_eq!(
            SchedulerKind::default_for(&cfg("DPMSolverMultistepScheduler", Some(false))).unwrap(),
            SchedulerKind::DpmPp2m
        );
        assert_eq!(
            SchedulerKind::default_for(&cfg("EulerAncestralDiscreteScheduler", None)).unwrap(),
            SchedulerKind::EulerAncestral
        );
        assert!(SchedulerKind::default_for(&cfg("HeunDiscreteScheduler", None)).is_err());
        assert!(SchedulerKind::default_for(&SchedulerConfig::default()).is_err());
    }
}
