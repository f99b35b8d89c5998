//! k-diffusion's "churn" (Karras et al. 2022, Algorithm 2), as `sample_euler`, `sample_heun` and
//! `sample_dpm_2` take it (A1111 1.10 passes `s_churn`, `s_tmin`, `s_tmax`, `s_noise` to those
//! three only): before a step at sigma within `[s_tmin, s_tmax]` the sample is raised to
//! `sigma_hat = sigma * (1 + gamma)`, `gamma = min(s_churn / steps, sqrt(2) - 1)`, with
//! `randn * s_noise * sqrt(sigma_hat^2 - sigma^2)`, and the step starts from `sigma_hat` (the
//! UNet evaluated there). The noise is drawn at every step, churned or not, as k-diffusion draws
//! it; `steps` is the run's length (`len(sigmas) - 1` of the sigmas the sampler is given: an
//! img2img run's own).

use candle_core::Tensor;

use super::common::{self, mul_s, to_f32};
use crate::rng::TorchRng;
use crate::Result;

/// The four parameters; the default changes nothing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Churn {
    /// `s_churn`: 0 is off.
    pub churn: f64,
    /// `s_tmin`, `s_tmax`: the sigmas churned (`f64::INFINITY`: no upper bound).
    pub tmin: f64,
    pub tmax: f64,
    /// `s_noise`: the churn noise's scale.
    pub noise: f64,
}

impl Default for Churn {
    fn default() -> Self {
        Self {
            churn: 0.0,
            tmin: 0.0,
            tmax: f64::INFINITY,
            noise: 1.0,
        }
    }
}

impl Churn {
    /// Whether any step is churned (and noise drawn).
    pub fn is_on(&self) -> bool {
        self.churn > 0.0
    }

    /// `sigma_hat` of a step at `sigma` in a run of `steps` steps, in float32 as torch computes
    /// `sigmas[i] * (gamma + 1)` (the range test compares float32 values, the tensor's dtype).
    pub fn sigma_hat(&self, sigma: f32, steps: usize) -> f32 {
        let in_range = self.tmin as f32 <= sigma && sigma <= self.tmax as f32;
        if !self.is_on() || !in_range || steps == 0 {
            return sigma;
        }
        let gamma = (self.churn / steps as f64).min(2f64.sqrt() - 1.0);
        sigma * (gamma + 1.0) as f32
    }

    /// `sigma_hat` of every step of `step_sigmas` (one per step plus the final one) for a run
    /// that begins at step `start` (the steps before it keep their sigma).
    pub fn sigma_hats(&self, step_sigmas: &[f32], start: usize) -> Vec<f32> {
        let steps = step_sigmas.len().saturating_sub(1);
        let run = steps.saturating_sub(start);
        step_sigmas[..steps]
            .iter()
            .enumerate()
            .map(|(i, &s)| if i < start { s } else { self.sigma_hat(s, run) })
            .collect()
    }

    /// The step's noise (drawn from every image's generator whenever churn is on) and the
    /// sample raised from `sigma` to `hat`: `x + randn * s_noise * sqrt(hat^2 - sigma^2)`.
    pub fn raise(
        &self,
        sample: &Tensor,
        sigma: f32,
        hat: f32,
        rngs: &mut [TorchRng],
    ) -> Result<Option<Tensor>> {
        if !self.is_on() {
            return Ok(None);
        }
        let noise = common::batch_randn(sample, rngs)?;
        if hat == sigma {
            return Ok(None);
        }
        let eps = mul_s(&noise, self.noise as f32)?;
        let scale = (hat * hat - sigma * sigma).sqrt();
        let dtype = sample.dtype();
        let raised = (to_f32(sample)? + mul_s(&eps, scale)?)?;
        Ok(Some(raised.to_dtype(dtype)?))
    }
}

/// The timestep the UNet gets at `sigma`: `own` where the sigma is the schedule's (`hat ==
/// sigma`), else diffusers' `_sigma_to_t` in float64, kept as float32 (as Restart's).
pub(super) fn timestep_at(sigma: f32, scheduled: f32, own: f64, log_sigmas: &[f64]) -> f64 {
    if sigma == scheduled {
        own
    } else {
        common::sigma_to_t(sigma as f64, log_sigmas) as f32 as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gamma_follows_the_run_length_and_the_range() {
        let c = Churn {
            churn: 2.0,
            tmin: 1.0,
            tmax: 5.0,
            noise: 1.0,
        };
        // 2 / 10 = 0.2 < sqrt(2) - 1.
        assert_eq!(c.sigma_hat(2.0, 10), 2.0 * 1.2f32);
        // 2 / 4 = 0.5 is capped at sqrt(2) - 1.
        assert_eq!(c.sigma_hat(2.0, 4), 2.0 * (2f64.sqrt() as f32));
        // Outside [tmin, tmax]: unchanged.
        assert_eq!(c.sigma_hat(6.0, 10), 6.0);
        assert_eq!(c.sigma_hat(0.5, 10), 0.5);
        assert_eq!(Churn::default().sigma_hat(2.0, 10), 2.0);
        // A run from step 1 of 3 steps is 2 steps long: gamma capped, step 0 untouched.
        let hats = c.sigma_hats(&[3.0, 2.0, 1.0, 0.0], 1);
        assert_eq!(
            hats,
            vec![3.0, 2.0 * (2f64.sqrt() as f32), 1.0 * (2f64.sqrt() as f32)]
        );
    }
}
