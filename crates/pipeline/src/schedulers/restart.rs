//! A1111's `Restart` (`modules/sd_samplers_extra.py` `restart_sampler`, Xu et al. 2023): Heun
//! steps down the sigma schedule and, from 20 steps, a restart: back up from sigma ~0.1 to ~2
//! with fresh noise, then Heun steps down again on a Karras segment. A1111 hands it its own
//! schedule's sigmas (Karras unless asked otherwise); from 20 steps the sampler swaps them for
//! `steps - restart_steps * restart_times` Karras sigmas between the schedule's ends, so the
//! number of Heun steps stays `steps`.
//!
//! Each Heun step is two UNet evaluations (one where it ends at sigma 0), so `timesteps` lists
//! every evaluation of the run, worked out up front (the sampler is deterministic in its sigmas).
//! A run that begins at step `s` (img2img) is the sampler called on the schedule's sigmas from
//! index `s` (A1111's `sigma_sched`), a plan of its own: `set_begin_index(2 * s)` rebuilds it
//! after `2 * s` entries that stand for the steps skipped (`first_index_of_step`, as Heun's).

use candle_core::Tensor;

use super::common::{self, check_index, div_s, mul_s, to_f32, PredictionType, ResolvedConfig};
use super::euler::{pred_original, scale_by_sigma};
use super::interleaved::step_schedule;
use super::{Scheduler, SchedulerConfig, SigmaSchedule};
use crate::rng::TorchRng;
use crate::Result;

/// `restart_sampler`'s `s_noise` (A1111 passes none: its `sampler_extra_params` has no entry
/// for the function).
const S_NOISE: f32 = 1.0;
/// Its automatic `restart_list`: one restart from the sigma nearest 0.1 up to the one nearest 2.
const RESTART_FROM: f32 = 0.1;
const RESTART_TO: f32 = 2.0;
/// From this many steps the restart runs (9 steps, once); from `TWICE_FROM`, `steps // 4`
/// steps twice.
const RESTART_FROM_STEPS: usize = 20;
const TWICE_FROM: usize = 36;
/// k-diffusion's `get_sigmas_karras` default.
const RHO: f32 = 7.0;

/// What one UNet evaluation does with its prediction.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Role {
    /// The first half of a Heun step from `sigma` to `next` (> 0): an Euler predictor.
    Predict { next: f32 },
    /// The corrector at the end of the step begun at the previous evaluation.
    Correct,
    /// A last Euler step to `next` (0).
    Euler { next: f32 },
    /// A skipped step's entry (before the run's start): never stepped.
    Skipped,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Eval {
    sigma: f32,
    timestep: f64,
    role: Role,
    /// The noise level the sample is raised to after this evaluation's step ends (A1111 adds
    /// `randn * s_noise * sqrt(next_old^2 - last^2)` before the next step begins at a higher
    /// sigma): `Some((last, next_old))`.
    restart: Option<(f32, f32)>,
}

/// What a predictor leaves for its corrector.
struct Predicted {
    sample: Tensor,
    derivative: Tensor,
    dt: f32,
}

pub struct Restart {
    prediction_type: PredictionType,
    /// The schedule's float32 sigmas (one per step plus the final zero) and timesteps (float32
    /// values, as Heun's).
    sigmas: Vec<f32>,
    step_timesteps: Vec<f64>,
    /// `np.log` of the training sigmas, for the timesteps of sigmas off the schedule.
    log_sigmas: Vec<f64>,
    evals: Vec<Eval>,
    timesteps: Vec<f64>,
    predicted: Option<Predicted>,
}

impl Restart {
    /// The schedule Heun's `set_timesteps` computes on the config's sigmas (`schedule` keys as
    /// `SchedulerKind::config_with` sets them), and the plan of a run from its first step.
    pub fn new(cfg: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        common::check_steps(num_inference_steps)?;
        let r = ResolvedConfig::resolve(cfg, &super::heun::DEFAULTS)?;
        if r.prediction_type == PredictionType::Sample {
            return Err(common::config_error(
                "Restart runs on epsilon or v_prediction models (A1111's denoisers)",
            ));
        }
        let s = step_schedule(cfg, &r, num_inference_steps, SigmaSchedule::of_config(cfg)?)?;
        let mut me = Self {
            prediction_type: r.prediction_type,
            step_timesteps: s.timesteps.iter().map(|&t| t as f32 as f64).collect(),
            sigmas: s.sigmas,
            log_sigmas: s.log_sigmas.iter().map(|&l| l as f64).collect(),
            evals: Vec::new(),
            timesteps: Vec::new(),
            predicted: None,
        };
        me.plan_from(0);
        Ok(me)
    }

    /// The noise level of each entry of `timesteps()`.
    pub fn eval_sigmas(&self) -> Vec<f32> {
        self.evals.iter().map(|e| e.sigma).collect()
    }

    /// The timestep the UNet gets at `sigma`: the schedule's own where `sigma` is one of its
    /// sigmas, else `_sigma_to_t` (float32, as Heun keeps its timesteps).
    fn timestep_of(&self, sigma: f32) -> f64 {
        match self.sigmas.iter().position(|&s| s == sigma) {
            Some(i) if i < self.step_timesteps.len() => self.step_timesteps[i],
            _ => common::sigma_to_t(sigma as f64, &self.log_sigmas) as f32 as f64,
        }
    }

    /// `restart_sampler`'s step list for the schedule from step `start`, after `2 * start`
    /// entries for the steps before it.
    fn plan_from(&mut self, start: usize) {
        let mut evals: Vec<Eval> = (0..2 * start)
            .map(|i| {
                let sigma = self.sigmas[i.div_ceil(2)];
                Eval {
                    sigma,
                    timestep: self.timestep_of(sigma),
                    role: Role::Skipped,
                    restart: None,
                }
            })
            .collect();
        let pairs = step_list(&self.sigmas[start..]);
        for (k, &(old, new)) in pairs.iter().enumerate() {
            let restart_next = pairs
                .get(k + 1)
                .filter(|(next_old, _)| new < *next_old)
                .map(|&(next_old, _)| (new, next_old));
            let eval = |sigma: f32, role| Eval {
                sigma,
                timestep: self.timestep_of(sigma),
                role,
                restart: None,
            };
            if new == 0.0 {
                evals.push(Eval {
                    restart: restart_next,
                    ..eval(old, Role::Euler { next: new })
                });
            } else {
                evals.push(eval(old, Role::Predict { next: new }));
                evals.push(Eval {
                    restart: restart_next,
                    ..eval(new, Role::Correct)
                });
            }
        }
        self.timesteps = evals.iter().map(|e| e.timestep).collect();
        self.evals = evals;
        self.predicted = None;
    }
}

/// k-diffusion's `get_sigmas_karras(n, sigma_min, sigma_max)` in float32 (torch's), without the
/// appended zero.
fn karras_f32(n: usize, sigma_min: f32, sigma_max: f32) -> Vec<f32> {
    let min_inv = (sigma_min as f64).powf(1.0 / RHO as f64);
    let max_inv = (sigma_max as f64).powf(1.0 / RHO as f64);
    let span = (min_inv - max_inv) as f32;
    common::torch_linspace_f32(0.0, 1.0, n)
        .into_iter()
        .map(|r| (r * span + max_inv as f32).powf(RHO))
        .collect()
}

/// `int(torch.argmin(abs(sigmas - value)))`: the first of the nearest.
fn nearest(sigmas: &[f32], value: f32) -> usize {
    let mut best = 0;
    for (i, s) in sigmas.iter().enumerate() {
        if (s - value).abs() < (sigmas[best] - value).abs() {
            best = i;
        }
    }
    best
}

/// `restart_sampler`'s `(old_sigma, new_sigma)` pairs for `sigmas` (ending in 0) with its
/// automatic `restart_list`.
fn step_list(sigmas: &[f32]) -> Vec<(f32, f32)> {
    let steps = sigmas.len() - 1;
    let mut sigmas = sigmas.to_vec();
    // (restart_steps, restart_times) of its automatic restart_list, where it has one.
    let restart = (steps >= RESTART_FROM_STEPS).then(|| {
        let (restart_steps, times) = if steps >= TWICE_FROM {
            (steps / 4, 2)
        } else {
            (9, 1)
        };
        let n = steps - restart_steps * times;
        let (lo, hi) = (sigmas[sigmas.len() - 2], sigmas[0]);
        sigmas = karras_f32(n, lo, hi);
        sigmas.push(0.0);
        (restart_steps + 1, times)
    });
    let restart = restart.map(|(n, times)| (nearest(&sigmas, RESTART_FROM), n, times));
    let mut pairs = Vec::new();
    for i in 0..sigmas.len() - 1 {
        pairs.push((sigmas[i], sigmas[i + 1]));
        let Some((at, n, times)) = restart.filter(|r| r.0 == i + 1) else {
            continue;
        };
        let max_idx = nearest(&sigmas, RESTART_TO);
        if max_idx < at {
            let segment = karras_f32(n, sigmas[at], sigmas[max_idx]);
            for _ in 0..times {
                pairs.extend(segment.windows(2).map(|w| (w[0], w[1])));
            }
        }
    }
    pairs
}

impl Scheduler for Restart {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// A1111 scales the noise by the first sigma (`x * sigmas[0]`).
    fn init_noise_sigma(&self) -> f64 {
        self.sigmas[0] as f64
    }

    fn scale_model_input(&self, sample: &Tensor, index: usize) -> Result<Tensor> {
        check_index(index, self.evals.len())?;
        scale_by_sigma(sample, self.evals[index].sigma)
    }

    fn guidance_sigma(&self, index: usize) -> Option<f64> {
        self.evals.get(index).map(|e| e.sigma as f64)
    }

    fn order(&self) -> usize {
        2
    }

    fn set_begin_index(&mut self, begin: usize) {
        self.plan_from(begin / 2);
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        check_index(index, self.evals.len())?;
        let dtype = original.dtype();
        let sigma = self.evals[index].sigma;
        Ok((to_f32(original)? + mul_s(&to_f32(noise)?, sigma)?)?.to_dtype(dtype)?)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        rngs: &mut [TorchRng],
    ) -> Result<Tensor> {
        check_index(index, self.evals.len())?;
        let eval = self.evals[index];
        let dtype = model_output.dtype();
        let (mo, x) = (to_f32(model_output)?, to_f32(sample)?);
        let denoised = pred_original(self.prediction_type, &mo, &x, eval.sigma)?;
        // k-diffusion's to_d.
        let derivative = div_s(&(&x - denoised)?, eval.sigma)?;
        let mut out = match eval.role {
            Role::Skipped => {
                return Err(crate::PipelineError::InvalidRequest(format!(
                    "Restart step {index} is before the run's start"
                )))
            }
            Role::Predict { next } => {
                let dt = next - eval.sigma;
                let x2 = (&x + mul_s(&derivative, dt)?)?;
                self.predicted = Some(Predicted {
                    sample: x,
                    derivative,
                    dt,
                });
                x2
            }
            Role::Euler { next } => (&x + mul_s(&derivative, next - eval.sigma)?)?,
            Role::Correct => {
                let p = self.predicted.take().ok_or_else(|| {
                    crate::PipelineError::InvalidRequest(
                        "Restart's corrector before its predictor".into(),
                    )
                })?;
                let d_prime = div_s(&(p.derivative + derivative)?, 2.0)?;
                (p.sample + mul_s(&d_prime, p.dt)?)?
            }
        };
        if let Some((last, to)) = eval.restart {
            let scale = S_NOISE * (to * to - last * last).sqrt();
            let noise = common::batch_randn(&out, rngs)?;
            out = (out + mul_s(&noise, scale)?)?;
        }
        Ok(out.to_dtype(dtype)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(n: usize) -> Vec<f32> {
        let mut s = karras_f32(n, 0.0292, 14.6146);
        s.push(0.0);
        s
    }

    #[test]
    fn below_20_steps_it_is_heun() {
        let sigmas = schedule(10);
        let pairs = step_list(&sigmas);
        assert_eq!(pairs.len(), 10);
        assert!(pairs
            .iter()
            .zip(sigmas.windows(2))
            .all(|(p, w)| *p == (w[0], w[1])));
    }

    #[test]
    fn restarts_keep_the_step_count() {
        for (steps, times) in [(20, 1), (30, 1), (36, 2), (50, 2)] {
            let pairs = step_list(&schedule(steps));
            assert_eq!(pairs.len(), steps, "{steps}");
            let jumps = pairs.windows(2).filter(|w| w[1].0 > w[0].1).count();
            assert_eq!(jumps, times, "{steps}");
        }
    }

    #[test]
    fn the_plan_adds_noise_before_each_restart() {
        let cfg = SchedulerConfig::default();
        let r = Restart::new(&cfg, 20).unwrap();
        // 20 Heun steps, the last an Euler step: 39 evaluations.
        assert_eq!(r.timesteps().len(), 39);
        assert_eq!(r.evals.iter().filter(|e| e.restart.is_some()).count(), 1);
        let mut img2img = Restart::new(&cfg, 20).unwrap();
        img2img.set_begin_index(14);
        assert_eq!(img2img.timesteps().len(), 14 + 2 * 13 - 1);
        assert_eq!(img2img.evals[14].sigma, img2img.sigmas[7]);
    }
}
