//! Noise schedulers, each built from the model's `scheduler_config.json` the way diffusers'
//! `Class.from_config` builds it: keys present in the file win, absent keys take the class's defaults.

use candle_core::Tensor;

use crate::rng::TorchRng;
use crate::Result;

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

/// One sampling run: made for a fixed number of inference steps; `step` is called once per
/// entry of `timesteps()`, in order.
pub trait Scheduler: Send {
    /// The timesteps handed to the UNet, in loop order (may be longer than the step count, e.g. PNDM).
    fn timesteps(&self) -> &[f64];
    /// Standard deviation of the initial noise (`init_noise_sigma`).
    fn init_noise_sigma(&self) -> f64;
    /// `scale_model_input` for the `index`-th entry of `timesteps()`.
    fn scale_model_input(&self, sample: &Tensor, index: usize) -> Result<Tensor>;
    /// One step: the model output at `timesteps()[index]` and the current sample give the previous
    /// sample. Stochastic schedulers draw their noise from `rng` (the request's generator).
    fn step(&mut self, model_output: &Tensor, index: usize, sample: &Tensor, rng: &mut TorchRng) -> Result<Tensor>;
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
}
