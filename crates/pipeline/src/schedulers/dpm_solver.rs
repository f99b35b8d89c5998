//! `DPMSolverMultistepScheduler` of diffusers 0.42.1 (DPM-Solver++ 2M, its SDE variant and
//! friends).
//!
//! The schedule (timesteps, float32 sigmas) is fixed at construction; `step` keeps the previous
//! data predictions, as diffusers does. Scalars are computed in f32 the way torch computes them on
//! its 0-d float32 tensors, tensors in f32 whatever the model's dtype (diffusers upcasts too).

use candle_core::Tensor;

use super::brownian::{self, BrownianNoise};
use super::common::{self, config_error, mul_s as mul, PredictionType};
use super::multistep::{
    add_noise_alpha_sigma, alpha_sigma, convert_model_output, current_step_index, final_sigma_zero,
    lambda, newest_output, Family, MultistepSchedule,
};
use super::{SchedulerConfig, SigmaSchedule};
use crate::rng::TorchRng;
use crate::Result;

// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Algorithm {
    /// Data prediction (`dpmsolver++`).
    DpmSolverPp,
    /// Noise prediction (`dpmsolver`, deprecated in diffusers but deterministic).
    DpmSolver,
    /// Data prediction with noise added at every step (`sde-dpmsolver++`, A1111's
    /// `DPM++ 2M SDE`): the noise comes from the request's generators, or with
    /// [`DpmSolverMultistep::use_brownian_noise`] from Brownian trees (A1111's).
    SdeDpmSolverPp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SolverType {
    Midpoint,
    Heun,
}

/// `DPMSolverMultistepScheduler.from_config(cfg)` after `set_timesteps(n)`.
pub struct DpmSolverMultistep {
    timesteps: Vec<f64>,
    /// `n + 1` float32 sigmas, the last being the final sigma (0 for `final_sigmas_type` zero).
    sigmas: Vec<f32>,
    algorithm: Algorithm,
    solver_type: SolverType,
    prediction: PredictionType,
    solver_order: usize,
    lower_order_final: bool,
    euler_at_final: bool,
    final_sigma_zero: bool,
    /// The last `solver_order` converted model outputs, oldest first (f32).
    model_outputs: Vec<Option<Tensor>>,
    lower_order_nums: usize,
    step_index: Option<usize>,
    /// The SDE solver's share of fresh noise: k-diffusion's `eta` of `sample_dpmpp_2m_sde` /
    /// `_3m_sde` (A1111's `DPM++ 2M SDE`); 1 is diffusers' `sde-dpmsolver++`.
    eta: f32,
    /// A1111's noise for the SDE solver: k-diffusion's `BrownianTreeNoiseSampler` seeded with
    /// the images' seeds (`create_noise_sampler`), rather than diffusers' generator draws.
    brownian: bool,
    tree: Option<BrownianNoise>,
}

impl DpmSolverMultistep {
    /// As `from_config(cfg)`: the config's `use_karras_sigmas` and `algorithm_type` decide
    /// (`SchedulerKind::config` sets them from the API name).
    pub fn new(cfg: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        let algorithm = match cfg.algorithm_type.as_deref().unwrap_or("dpmsolver++") {
            // diffusers maps "deis" onto dpmsolver++.
            "dpmsolver++" | "deis" => Algorithm::DpmSolverPp,
            "dpmsolver" => Algorithm::DpmSolver,
            "sde-dpmsolver++" => Algorithm::SdeDpmSolverPp,
            other => {
                return Err(config_error(format!(
                    "unsupported algorithm_type {other:?} for DPMSolverMultistep"
                )))
            }
        };
        let solver_type = match cfg.solver_type.as_deref().unwrap_or("midpoint") {
            // diffusers maps UniPC's and DEIS's solver types onto midpoint.
            "midpoint" | "logrho" | "bh1" | "bh2" => SolverType::Midpoint,
            "heun" => SolverType::Heun,
            other => return Err(config_error(format!("unsupported solver_type {other:?}"))),
        };
        let solver_order = cfg.solver_order.unwrap_or(2);
        if !(1..=3).contains(&solver_order) {
            return Err(config_error(format!(
                "solver_order must be 1, 2 or 3, not {solver_order}"
            )));
        }
        if cfg.thresholding == Some(true) {
            return Err(config_error("thresholding is not supported"));
        }
        let final_sigma_zero = final_sigma_zero(cfg)?;
        if algorithm == Algorithm::DpmSolver && final_sigma_zero {
            return Err(config_error(
                "final_sigmas_type \"zero\" needs algorithm_type dpmsolver++",
            ));
        }
        let schedule = MultistepSchedule::new(
            cfg,
            num_inference_steps,
            SigmaSchedule::of_config(cfg)?,
            final_sigma_zero,
            Family::Dpm,
        )?;
        Ok(Self {
            timesteps: schedule.timesteps,
            sigmas: schedule.sigmas,
            algorithm,
            solver_type,
            prediction: schedule.prediction,
            solver_order,
            lower_order_final: cfg.lower_order_final.unwrap_or(true),
            euler_at_final: cfg.euler_at_final.unwrap_or(false),
            final_sigma_zero,
            model_outputs: vec![None; solver_order],
            lower_order_nums: 0,
            step_index: None,
            eta: 1.0,
            brownian: false,
            tree: None,
        })
    }

    /// The SDE solver draws its noise as A1111 gives it to k-diffusion's `sample_dpmpp_2m_sde`:
    /// the Brownian increment between the step's two sigmas (none on the step to sigma 0,
    /// where k-diffusion returns the denoised estimate).
    pub fn use_brownian_noise(&mut self) {
        self.brownian = true;
    }

    /// The float32 sigmas, `timesteps().len() + 1` of them.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// `convert_model_output`: the data prediction (dpmsolver++) or noise prediction (dpmsolver).
    fn convert_model_output(
        &self,
        model_output: &Tensor,
        sample: &Tensor,
        i: usize,
    ) -> Result<Tensor> {
        let data = self.algorithm != Algorithm::DpmSolver;
        convert_model_output(model_output, sample, self.sigmas[i], data, self.prediction)
    }

    /// `dpm_solver_first_order_update` (DDIM-like); `noise` for the SDE solver.
    fn first_order_update(
        &self,
        m0: &Tensor,
        sample: &Tensor,
        noise: Option<&Tensor>,
        i: usize,
    ) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s, sigma_s) = alpha_sigma(self.sigmas[i]);
        let h = lambda(alpha_t, sigma_t) - lambda(alpha_s, sigma_s);
        Ok(match self.algorithm {
            Algorithm::DpmSolverPp => {
                (mul(sample, sigma_t / sigma_s)? - mul(m0, alpha_t * ((-h).exp() - 1.0))?)?
            }
            Algorithm::DpmSolver => {
                (mul(sample, alpha_t / alpha_s)? - mul(m0, sigma_t * (h.exp() - 1.0))?)?
            }
            Algorithm::SdeDpmSolverPp => {
                let sde = self.sde_terms(h);
                let x = (mul(sample, sigma_t / sigma_s * sde.keep)? + mul(m0, alpha_t * sde.e2)?)?;
                (x + sde.noise(noise, sigma_t)?)?
            }
        })
    }

    /// `multistep_dpm_solver_second_order_update`.
    fn second_order_update(
        &self,
        sample: &Tensor,
        noise: Option<&Tensor>,
        i: usize,
    ) -> Result<Tensor> {
        let (m0, m1) = (self.output(1)?, self.output(2)?);
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[i]);
        let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[i - 1]);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let lambda_s1 = lambda(alpha_s1, sigma_s1);
        let (h, h_0) = (lambda_t - lambda_s0, lambda_s0 - lambda_s1);
        let r0 = h_0 / h;
        let d0 = m0;
        let d1 = mul(&(m0 - m1)?, 1.0 / r0)?;
        Ok(match (self.algorithm, self.solver_type) {
            (Algorithm::DpmSolverPp, SolverType::Midpoint) => {
                let c = alpha_t * ((-h).exp() - 1.0);
                ((mul(sample, sigma_t / sigma_s0)? - mul(d0, c)?)? - mul(&d1, 0.5 * c)?)?
            }
            (Algorithm::DpmSolverPp, SolverType::Heun) => {
                let c = alpha_t * ((-h).exp() - 1.0);
                let c1 = alpha_t * (((-h).exp() - 1.0) / h + 1.0);
                ((mul(sample, sigma_t / sigma_s0)? - mul(d0, c)?)? + mul(&d1, c1)?)?
            }
            (Algorithm::DpmSolver, SolverType::Midpoint) => {
                let c = sigma_t * (h.exp() - 1.0);
                ((mul(sample, alpha_t / alpha_s0)? - mul(d0, c)?)? - mul(&d1, 0.5 * c)?)?
            }
            (Algorithm::DpmSolver, SolverType::Heun) => {
                let c = sigma_t * (h.exp() - 1.0);
                let c1 = sigma_t * ((h.exp() - 1.0) / h - 1.0);
                ((mul(sample, alpha_t / alpha_s0)? - mul(d0, c)?)? - mul(&d1, c1)?)?
            }
            (Algorithm::SdeDpmSolverPp, solver_type) => {
                let sde = self.sde_terms(h);
                let c = alpha_t * sde.e2;
                let c1 = match solver_type {
                    SolverType::Midpoint => 0.5 * c,
                    SolverType::Heun => alpha_t * (sde.e2 / (-sde.h_eta) + 1.0),
                };
                let x = (mul(sample, sigma_t / sigma_s0 * sde.keep)? + mul(d0, c)?)?;
                ((x + mul(&d1, c1)?)? + sde.noise(noise, sigma_t)?)?
            }
        })
    }

    /// `multistep_dpm_solver_third_order_update`.
    fn third_order_update(
        &self,
        sample: &Tensor,
        noise: Option<&Tensor>,
        i: usize,
    ) -> Result<Tensor> {
        let (m0, m1, m2) = (self.output(1)?, self.output(2)?, self.output(3)?);
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[i]);
        let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[i - 1]);
        let (alpha_s2, sigma_s2) = alpha_sigma(self.sigmas[i - 2]);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let lambda_s1 = lambda(alpha_s1, sigma_s1);
        let lambda_s2 = lambda(alpha_s2, sigma_s2);
        let (h, h_0, h_1) = (
            lambda_t - lambda_s0,
            lambda_s0 - lambda_s1,
            lambda_s1 - lambda_s2,
        );
        let (r0, r1) = (h_0 / h, h_1 / h);
        let d0 = m0;
        let d1_0 = mul(&(m0 - m1)?, 1.0 / r0)?;
        let d1_1 = mul(&(m1 - m2)?, 1.0 / r1)?;
        let diff = (&d1_0 - &d1_1)?;
        let d1 = (&d1_0 + mul(&diff, r0 / (r0 + r1))?)?;
        let d2 = mul(&diff, 1.0 / (r0 + r1))?;
        Ok(match self.algorithm {
            Algorithm::DpmSolverPp => {
                let e = (-h).exp() - 1.0;
                let x = (mul(sample, sigma_t / sigma_s0)? - mul(d0, alpha_t * e)?)?;
                let x = (x + mul(&d1, alpha_t * (e / h + 1.0))?)?;
                (x - mul(&d2, alpha_t * ((e + h) / (h * h) - 0.5))?)?
            }
            Algorithm::DpmSolver => {
                let e = h.exp() - 1.0;
                let x = (mul(sample, alpha_t / alpha_s0)? - mul(d0, sigma_t * e)?)?;
                let x = (x - mul(&d1, sigma_t * (e / h - 1.0))?)?;
                (x - mul(&d2, sigma_t * ((e - h) / (h * h) - 0.5))?)?
            }
            Algorithm::SdeDpmSolverPp => {
                let sde = self.sde_terms(h);
                let (e2, h_eta) = (sde.e2, sde.h_eta);
                let x = (mul(sample, sigma_t / sigma_s0 * sde.keep)? + mul(d0, alpha_t * e2)?)?;
                let x = (x + mul(&d1, alpha_t * (e2 / (-h_eta) + 1.0))?)?;
                let c2 = alpha_t * ((e2 - h_eta) / (h_eta * h_eta) - 0.5);
                ((x + mul(&d2, c2)?)? + sde.noise(noise, sigma_t)?)?
            }
        })
    }

    fn sde_terms(&self, h: f32) -> SdeTerms {
        // The step to a final sigma of 0 has h = inf: eta 0 must give eta h = 0 there, not NaN.
        let eta_h = if self.eta == 0.0 { 0.0 } else { self.eta * h };
        let h_eta = h + eta_h;
        SdeTerms {
            keep: (-eta_h).exp(),
            h_eta,
            e2: 1.0 - (-h_eta).exp(),
            noise: (1.0 - (-2.0 * eta_h).exp()).sqrt(),
        }
    }

    /// The `k`-th newest stored model output (1 = newest).
    fn output(&self, k: usize) -> Result<&Tensor> {
        newest_output(&self.model_outputs, k)
    }
}

/// The SDE solver's scalars for a step of `h` (in lambda) and its `eta`, as k-diffusion's
/// `sample_dpmpp_2m_sde` writes them: with eta 1 they are diffusers' `exp(-h)`, `1 - exp(-2h)`,
/// `2h` and `sqrt(1 - exp(-2h))`, computed the same way (so eta 1 is diffusers' bit for bit).
/// The third-order update takes them in diffusers' form too.
struct SdeTerms {
    /// `exp(-eta h)`: how much of the sample is kept beyond the deterministic ratio.
    keep: f32,
    /// `h + eta h`.
    h_eta: f32,
    /// `1 - exp(-(1 + eta) h)`: the data prediction's weight (times alpha_t).
    e2: f32,
    /// `sqrt(1 - exp(-2 eta h))`: the fresh noise's weight (times sigma_t).
    noise: f32,
}

impl SdeTerms {
    /// The noise term `sigma_t * sqrt(1 - exp(-2 eta h)) * noise` (scalar first, as torch
    /// evaluates it left to right).
    fn noise(&self, noise: Option<&Tensor>, sigma_t: f32) -> Result<Tensor> {
        let noise = noise.expect("the SDE solver draws its noise before the update");
        mul(noise, sigma_t * self.noise)
    }
}

impl super::Scheduler for DpmSolverMultistep {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn guidance_sigma(&self, index: usize) -> Option<f64> {
        self.sigmas.get(index).map(|&s| s as f64)
    }

    fn eta(&self) -> Option<f64> {
        (self.algorithm == Algorithm::SdeDpmSolverPp).then_some(f64::from(self.eta))
    }

    fn set_eta(&mut self, eta: f64) {
        self.eta = eta as f32;
    }

    fn set_begin_index(&mut self, begin: usize) {
        self.step_index = Some(begin);
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        add_noise_alpha_sigma(&self.sigmas, &self.timesteps, original, noise, index)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        rngs: &mut [TorchRng],
    ) -> Result<Tensor> {
        let n = self.timesteps.len();
        let i = current_step_index(self.step_index, &self.timesteps, index)?;
        let lower_order_final = i == n - 1
            && (self.euler_at_final || (self.lower_order_final && n < 15) || self.final_sigma_zero);
        let lower_order_second = i + 2 == n && self.lower_order_final && n < 15;

        let out_dtype = model_output.dtype();
        let model_output = common::to_f32(model_output)?;
        let sample = common::to_f32(sample)?;
        let converted = self.convert_model_output(&model_output, &sample, i)?;
        self.model_outputs.rotate_left(1);
        *self.model_outputs.last_mut().expect("solver_order >= 1") = Some(converted.clone());

        // randn_tensor(model_output.shape, generator=...) at every step, the last one included.
        let noise = match self.algorithm {
            Algorithm::SdeDpmSolverPp if self.brownian => {
                let (sigma, next) = (self.sigmas[i], self.sigmas[i + 1]);
                Some(if next > 0.0 {
                    brownian::batch_noise(
                        &mut self.tree,
                        &self.sigmas,
                        &converted,
                        rngs,
                        sigma,
                        next,
                    )?
                } else {
                    converted.zeros_like()?
                })
            }
            Algorithm::SdeDpmSolverPp => Some(common::batch_randn(&converted, rngs)?),
            _ => None,
        };
        let noise = noise.as_ref();
        let prev = if self.solver_order == 1 || self.lower_order_nums < 1 || lower_order_final {
            self.first_order_update(&converted, &sample, noise, i)?
        } else if self.solver_order == 2 || self.lower_order_nums < 2 || lower_order_second {
            self.second_order_update(&sample, noise, i)?
        } else {
            self.third_order_update(&sample, noise, i)?
        };
        if self.lower_order_nums < self.solver_order {
            self.lower_order_nums += 1;
        }
        self.step_index = Some(i + 1);
        Ok(prev.to_dtype(out_dtype)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedulers::Scheduler;
    use candle_core::Device;

    #[test]
    fn last_step_to_zero_sigma_returns_the_data_prediction() {
        // One step from the top of the schedule to sigma 0 is x0 = (x - sigma * eps) / alpha.
        let cfg = SchedulerConfig::default();
        let mut s = DpmSolverMultistep::new(&cfg, 1).unwrap();
        assert_eq!(s.sigmas().len(), 2);
        assert_eq!(s.sigmas()[1], 0.0);
        let x = Tensor::new(&[1.0f32, -2.0, 3.0], &Device::Cpu).unwrap();
        let eps = Tensor::new(&[0.5f32, 0.25, -1.0], &Device::Cpu).unwrap();
        let out = s.step(&eps, 0, &x, &mut [TorchRng::new(0)]).unwrap();
        let (alpha, sigma) = alpha_sigma(s.sigmas()[0]);
        let got: Vec<f32> = out.to_vec1().unwrap();
        let xs = [1.0f32, -2.0, 3.0];
        let es = [0.5f32, 0.25, -1.0];
        for ((g, x), e) in got.iter().zip(xs).zip(es) {
            assert_eq!(*g, (x - sigma * e) / alpha);
        }
        // Stepping past the end is an error, not a panic.
        assert!(s.step(&eps, 0, &x, &mut [TorchRng::new(0)]).is_err());
    }
}
