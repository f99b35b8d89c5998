//! A1111's `DPM2` and `DPM2 a`: k-diffusion 0.1.1's `sample_dpm_2` and `sample_dpm_2_ancestral`
//! on the sigmas A1111 hands them. Both carry `discard_next_to_last_sigma` in A1111's sampler
//! table, so `get_sigmas` builds the schedule (Automatic = the CompVis denoiser's uniform one,
//! Karras, Exponential, Beta) for `steps + 1` and drops its next-to-last sigma. diffusers'
//! KDPM2 classes (our `dpm2`, `dpm2_a`) keep that sigma and interpolate their schedule in sigma,
//! not log sigma: another run.
//!
//! Each step evaluates the UNet at its sigma and again at the midpoint in log sigma towards its
//! end; a step that ends at 0 is one Euler step. DPM2 takes k-diffusion's churn (the step starts
//! from `sigma_hat`); DPM2 a aims each step at `sigma_down` and adds `sigma_up` of fresh noise
//! from the images' generators (A1111's `randn_like`), drawn after every step, the last too.
//! Scalar math is float32, as torch does it on 0-dim tensors.

use candle_core::Tensor;

use super::churn::Churn;
use super::common::{self, div_s, mul_s, to_f32};
use super::euler::scale_by_sigma;
use super::interleaved::log_midpoint;
use super::kdiffusion::{ancestral_step, KSigmas, MidpointCalls};
use super::{Scheduler, SchedulerConfig};
use crate::rng::TorchRng;
use crate::{PipelineError, Result};

/// One step: where it starts (`hat`: churn's `sigma_hat`, else its sigma), where it ends
/// (`to`: the next sigma, or DPM2 a's `sigma_down`), its fresh noise and midpoint.
#[derive(Debug, Clone, Copy)]
struct Step {
    sigma: f32,
    hat: f32,
    to: f32,
    up: f32,
    /// `hat.log().lerp(to.log(), 0.5).exp()` where `to > 0`; `None`: an Euler step.
    mid: Option<f32>,
}

pub struct Dpm2A1111 {
    k: KSigmas,
    ancestral: bool,
    eta: f32,
    churn: Churn,
    /// The step an img2img pass starts at (churn's run length counts from it).
    start_step: usize,
    steps: Vec<Step>,
    calls: MidpointCalls,
    /// The step's starting sample while its midpoint call is pending.
    start: Option<Tensor>,
}

impl Dpm2A1111 {
    /// `sample_dpm_2` (`ancestral` false) or `sample_dpm_2_ancestral` on A1111's `n` steps.
    pub fn new(cfg: &SchedulerConfig, n: usize, ancestral: bool) -> Result<Self> {
        let mut s = Self {
            k: KSigmas::new(cfg, n, true)?,
            ancestral,
            eta: 1.0,
            churn: Churn::default(),
            start_step: 0,
            steps: Vec::new(),
            calls: MidpointCalls::default(),
            start: None,
        };
        s.layout();
        Ok(s)
    }

    /// The steps for the current eta / churn and start, and the UNet calls.
    fn layout(&mut self) {
        let sig = &self.k.sigmas;
        let hats = self.churn.sigma_hats(sig, self.start_step);
        self.steps = sig
            .windows(2)
            .zip(hats)
            .map(|(w, hat)| {
                let (sigma, next) = (w[0], w[1]);
                let (hat, to, up) = if self.ancestral {
                    let (down, up) = ancestral_step(sigma, next, self.eta);
                    (sigma, down, up)
                } else {
                    (hat, next, 0.0)
                };
                let mid = (to != 0.0).then(|| log_midpoint(hat, to));
                Step {
                    sigma,
                    hat,
                    to,
                    up,
                    mid,
                }
            })
            .collect();
        self.calls = MidpointCalls::new(&self.k, self.steps.iter().map(|st| (st.hat, st.mid)));
    }

    /// The run's sigmas (one per step, then 0), the next-to-last of A1111's `steps + 1` gone.
    pub fn sigmas(&self) -> &[f32] {
        &self.k.sigmas
    }

    /// DPM2 a's fresh noise after a step (drawn on every step, as k-diffusion draws it).
    fn finish(&self, x: Tensor, st: &Step, rngs: &mut [TorchRng]) -> Result<Tensor> {
        if !self.ancestral {
            return Ok(x);
        }
        let noise = common::batch_randn(&x, rngs)?;
        Ok((x + mul_s(&noise, st.up)?)?)
    }
}

impl Scheduler for Dpm2A1111 {
    fn timesteps(&self) -> &[f64] {
        self.calls.timesteps()
    }

    fn init_noise_sigma(&self) -> f64 {
        self.k.sigmas[0] as f64
    }

    fn eta(&self) -> Option<f64> {
        self.ancestral.then_some(f64::from(self.eta))
    }

    fn set_eta(&mut self, eta: f64) {
        if self.ancestral {
            self.eta = eta as f32;
            self.layout();
        }
    }

    fn set_churn(&mut self, churn: Churn) {
        if !self.ancestral {
            self.churn = churn;
            self.layout();
        }
    }

    fn order(&self) -> usize {
        2
    }

    fn first_index_of_step(&self, step: usize) -> usize {
        self.calls.first_of_step(step)
    }

    /// Churn's gamma counts the pass's own steps (k-diffusion's `len(sigmas) - 1` of
    /// `sigma_sched`), so the hats are planned again from the pass's first step.
    fn set_begin_index(&mut self, begin: usize) {
        let step = self.calls.step_of(begin, self.steps.len());
        if step != self.start_step {
            self.start_step = step;
            self.layout();
        }
    }

    fn prepare_sample(
        &mut self,
        sample: &Tensor,
        index: usize,
        rngs: &mut [TorchRng],
    ) -> Result<Option<Tensor>> {
        let (step, mid) = self.calls.get(index)?;
        if mid || self.ancestral {
            return Ok(None);
        }
        let st = self.steps[step];
        self.churn.raise(sample, st.sigma, st.hat, rngs)
    }

    fn scale_model_input(&self, sample: &Tensor, index: usize) -> Result<Tensor> {
        scale_by_sigma(sample, self.calls.sigma(index)?)
    }

    fn guidance_sigma(&self, index: usize) -> Option<f64> {
        self.calls.sigma(index).ok().map(f64::from)
    }

    /// The image at the call's noise level; a step's first call at the schedule's sigma
    /// (`sigma_sched[0]` for img2img's start), not churn's.
    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        let (step, mid) = self.calls.get(index)?;
        let sigma = match mid {
            true => self.calls.sigma(index)?,
            false => self.steps[step].sigma,
        };
        self.k.add_noise(original, noise, sigma)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        rngs: &mut [TorchRng],
    ) -> Result<Tensor> {
        let (step, is_mid) = self.calls.get(index)?;
        let dtype = model_output.dtype();
        let (mo, x) = (to_f32(model_output)?, to_f32(sample)?);
        let st = self.steps[step];
        let out = match (is_mid, st.mid) {
            (false, mid) => {
                let denoised = self.k.x0(&mo, &x, st.hat)?;
                let d = div_s(&(&x - denoised)?, st.hat)?;
                match mid {
                    // The last step: Euler to 0 (DPM2 a: to sigma_down, then the noise).
                    None => {
                        let x = (&x + mul_s(&d, st.to - st.hat)?)?;
                        self.finish(x, &st, rngs)?
                    }
                    Some(mid) => {
                        let x2 = (&x + mul_s(&d, mid - st.hat)?)?;
                        self.start = Some(x);
                        x2
                    }
                }
            }
            (true, Some(mid)) => {
                let start = self.start.take().ok_or_else(|| {
                    PipelineError::InvalidRequest("DPM2 midpoint before its step".into())
                })?;
                let denoised = self.k.x0(&mo, &x, mid)?;
                let d2 = div_s(&(&x - denoised)?, mid)?;
                let x = (start + mul_s(&d2, st.to - st.hat)?)?;
                self.finish(x, &st, rngs)?
            }
            (true, None) => unreachable!("a midpoint call only where the step has one"),
        };
        Ok(out.to_dtype(dtype)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedulers::a1111_timesteps::tests::sd15;

    #[test]
    fn drops_the_next_to_last_of_steps_plus_one() {
        let cfg = sd15();
        let s = Dpm2A1111::new(&cfg, 5, false).unwrap();
        let k = KSigmas::new(&cfg, 6, false).unwrap();
        // A1111's get_sigmas(6 + 1) less the next-to-last: 5 steps, then 0.
        let mut want = k.sigmas.clone();
        want.remove(5);
        assert_eq!(s.sigmas(), &want[..]);
        // 2 calls per step but the last (an Euler step to 0).
        assert_eq!(s.timesteps().len(), 9);
        assert_eq!(s.first_index_of_step(4), 8);
        // DPM2 a with eta 0: sigma_down is the next sigma, the same calls.
        let mut a = Dpm2A1111::new(&cfg, 5, true).unwrap();
        a.set_eta(0.0);
        assert_eq!(a.timesteps(), s.timesteps());
    }

    #[test]
    fn churn_counts_the_pass_from_its_start() {
        let cfg = sd15();
        let mut s = Dpm2A1111::new(&cfg, 6, false).unwrap();
        s.set_churn(Churn {
            churn: 1.0,
            ..Churn::default()
        });
        let whole = s.steps[3].hat;
        s.set_begin_index(s.first_index_of_step(2));
        // 1 / 4 steps instead of 1 / 6: a larger gamma at the same sigma.
        assert!(s.steps[3].hat > whole);
        assert_eq!(s.steps[3].hat, s.steps[3].sigma * 1.25);
    }
}
