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
