//! UniPCMultistep (unipc). PLACEHOLDER created by the schedulers-A engineer
//! so the factory compiles; helper-6 owns this file and replaces it entirely.

use candle_core::Tensor;

use super::{Scheduler, SchedulerConfig};
use crate::rng::TorchRng;
use crate::{PipelineError, Result};

pub struct UniPcMultistep {
    timesteps: Vec<f64>,
}

impl UniPcMultistep {
    pub fn new(_cfg: &SchedulerConfig, _steps: usize) -> Result<Self> {
        Err(PipelineError::InvalidRequest("unipc is not implemented yet".into()))
    }
}

impl Scheduler for UniPcMultistep {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    fn scale_model_input(&self, sample: &Tensor, _index: usize) -> Result<Tensor> {
        Ok(sample.clone())
    }
    fn step(&mut self, _m: &Tensor, _i: usize, sample: &Tensor, _rng: &mut TorchRng) -> Result<Tensor> {
        Ok(sample.clone())
    }
}
