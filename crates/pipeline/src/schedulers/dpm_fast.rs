//! k-diffusion 0.1.1's `sample_dpm_fast` (DPM-Solver-Fast, Lu et al. 2022; A1111's `DPM fast`):
//! `n` UNet evaluations spread over `floor(n / 3) + 1` steps of equal size in `t = -ln sigma`,
//! third-order steps but the last one or two (orders `n % 3`, or 2 and 1), each step's
//! intermediate evaluations at `t + h / 3` and `t + 2h / 3` (third order) or `t + h / 2`
//! (second). With eta (A1111 passes its `eta_ancestral`, 1, unless the request has one) each
//! step aims below its end and fresh noise from the images' generators makes up the rest (A1111's
//! `randn_like`, drawn after every step, its scale 0 on the last).
//!
//! A1111 hands it the ends, not a schedule: text-to-image runs from the largest training sigma
//! down to the smallest (`model_wrap.sigmas`), `n` = steps; img2img (`sample_img2img`) from the
//! schedule's sigma where the pass starts down to its last positive sigma, `n` = the steps run.
//! The schedule (A1111's `get_sigmas`, the CompVis denoiser's) gives the starting noise level
//! and img2img's start. Every evaluation's sigma is known up front, so `timesteps` lists them all;
//! scalar math is float32, as torch does it on 0-dim tensors.

use candle_core::Tensor;

use super::common::{check_index, config_error, div_s, mul_s, to_f32};
use super::euler::scale_by_sigma;
use super::kdiffusion::{ancestral_step, KSigmas};
use super::torch_math::{exp, expm1, log};
use super::{Scheduler, SchedulerConfig};
use crate::rng::TorchRng;
use crate::Result;

/// `sample_dpm_fast`'s `s_noise` (A1111 passes none to it).
const S_NOISE: f32 = 1.0;

/// DPMSolver's `sigma(t)`: `exp(-t)`.
pub(super) fn sigma_of(t: f32) -> f32 {
    exp(-t)
}

/// DPMSolver's `t(sigma)`: `-ln sigma`.
pub(super) fn t_of(sigma: f32) -> f32 {
    -log(sigma)
}

/// One DPM-Solver step from `t` towards `t_to` (its `t_next_`) of order 1, 2 or 3, and the
/// intermediate points of its evaluations (`dpm_solver_{1,2,3}_step`; `r1` 1/2 for a second-order
/// step but 1/3 where DPM adaptive runs it as the third order's lower estimate).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct SolverStep {
    pub t: f32,
    pub t_to: f32,
    pub order: usize,
    pub r1: f32,
}

/// The float32 coefficients `dpm_solver_{2,3}_step` compute.
const R2: f32 = 2.0 / 3.0;

impl SolverStep {
    fn h(&self) -> f32 {
        self.t_to - self.t
    }

    /// The `t` of evaluation `stage` (0: the step's start).
    pub fn stage_t(&self, stage: usize) -> f32 {
        match stage {
            0 => self.t,
            1 => self.t + self.r1 * self.h(),
            _ => self.t + R2 * self.h(),
        }
    }

    /// `x - sigma(s) * expm1(r h) * eps`: the next evaluation's sample after the first.
    pub fn u1(&self, x: &Tensor, eps: &Tensor) -> Result<Tensor> {
        let c = sigma_of(self.stage_t(1)) * expm1(self.r1 * self.h());
        Ok((x - mul_s(eps, c)?)?)
    }

    /// The third-order step's second intermediate sample.
    pub fn u2(&self, x: &Tensor, eps: &Tensor, eps_r1: &Tensor) -> Result<Tensor> {
        let h = self.h();
        let s2 = sigma_of(self.stage_t(2));
        let a = s2 * expm1(R2 * h);
        // (r2 / r1) is 2.0 exactly in Python's float64.
        let b = s2 * 2.0 * (expm1(R2 * h) / (R2 * h) - 1.0);
        Ok(((x - mul_s(eps, a)?)? - mul_s(&(eps_r1 - eps)?, b)?)?)
    }

    /// The step's result from the evaluations' epsilons (`eps[0..order]`).
    pub fn finish(&self, x: &Tensor, eps: &[Tensor]) -> Result<Tensor> {
        let h = self.h();
        let s_to = sigma_of(self.t_to);
        let first = (x - mul_s(&eps[0], s_to * expm1(h))?)?;
        Ok(match self.order {
            1 => first,
            2 => {
                let b = s_to / (2.0 * self.r1) * expm1(h);
                (first - mul_s(&(&eps[1] - &eps[0])?, b)?)?
            }
            _ => {
                let b = s_to / R2 * (expm1(h) / h - 1.0);
                (first - mul_s(&(&eps[2] - &eps[0])?, b)?)?
            }
        })
    }
}

/// The ancestral split of a step from `t` to `t_next` (A1111's eta): where the solver aims
/// (`t_next_`, at most `t_end`) and the noise's scale `su`.
pub(super) fn ancestral_target(t: f32, t_next: f32, t_end: f32, eta: f32) -> (f32, f32) {
    if eta == 0.0 {
        return (t_next, 0.0);
    }
    let (sd, _) = ancestral_step(sigma_of(t), sigma_of(t_next), eta);
    let t_to = t_end.min(t_of(sd));
    let (a, b) = (sigma_of(t_next), sigma_of(t_to));
    (t_to, (a * a - b * b).sqrt())
}

/// One entry of `timesteps`.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Entry {
    /// A step before the pass's start (img2img): never evaluated; its schedule sigma.
    Skipped(f32),
    /// Evaluation `stage` of step `step`, at `sigma`.
    Eval {
        step: usize,
        stage: usize,
        sigma: f32,
    },
}

/// A planned step: the solver step and the noise added after it.
#[derive(Debug, Clone, Copy)]
struct FastStep {
    solver: SolverStep,
    su: f32,
}

pub struct DpmFast {
    k: KSigmas,
    eta: f32,
    /// Where the pass begins (img2img's first step), as `set_begin_index` gave it.
    begin: usize,
    /// Whether an img2img pass set its start (A1111's `sample_img2img` passes the schedule's
    /// ends even from its first step).
    img2img: bool,
    steps: Vec<FastStep>,
    entries: Vec<Entry>,
    timesteps: Vec<f64>,
    /// The step's starting sample and its epsilons so far.
    start: Option<Tensor>,
    eps: Vec<Tensor>,
}

impl DpmFast {
    pub fn new(cfg: &SchedulerConfig, n: usize) -> Result<Self> {
        let mut s = Self {
            k: KSigmas::new(cfg, n, false)?,
            eta: 1.0,
            begin: 0,
            img2img: false,
            steps: Vec::new(),
            entries: Vec::new(),
            timesteps: Vec::new(),
            start: None,
            eps: Vec::new(),
        };
        s.plan();
        Ok(s)
    }

    /// The noise level of each entry of `timesteps()`.
    pub fn eval_sigmas(&self) -> Vec<f32> {
        self.entries
            .iter()
            .map(|e| match *e {
                Entry::Skipped(s) | Entry::Eval { sigma: s, .. } => s,
            })
            .collect()
    }

    /// `sample_dpm_fast`'s steps for a pass from `self.begin`: A1111's ends and `n`.
    fn plan(&mut self) {
        let sig = &self.k.sigmas;
        let schedule = sig.len() - 1;
        let begin = self.begin.min(schedule);
        let nfe = schedule - begin;
        let (sigma_min, sigma_max) = if begin == 0 && !self.img2img {
            self.k.train_ends
        } else {
            (sig[schedule - 1], sig[begin])
        };
        let (t_start, t_end) = (t_of(sigma_max), t_of(sigma_min));
        let m = nfe / 3 + 1;
        let orders: Vec<usize> = if nfe.is_multiple_of(3) {
            let mut o = vec![3; m.saturating_sub(2)];
            o.extend([2, 1]);
            o
        } else {
            let mut o = vec![3; m - 1];
            o.push(nfe % 3);
            o
        };
        let ts = super::common::torch_linspace_f32(t_start as f64, t_end as f64, m + 1);
        self.steps = if nfe == 0 {
            Vec::new()
        } else {
            orders
                .iter()
                .enumerate()
                .map(|(i, &order)| {
                    let (t_to, su) = ancestral_target(ts[i], ts[i + 1], t_end, self.eta);
                    FastStep {
                        solver: SolverStep {
                            t: ts[i],
                            t_to,
                            order,
                            r1: if order == 2 { 0.5 } else { 1.0 / 3.0 },
                        },
                        su,
                    }
                })
                .collect()
        };
        let mut entries: Vec<Entry> = sig[..begin].iter().map(|&s| Entry::Skipped(s)).collect();
        for (step, st) in self.steps.iter().enumerate() {
            for stage in 0..st.solver.order {
                entries.push(Entry::Eval {
                    step,
                    stage,
                    sigma: sigma_of(st.solver.stage_t(stage)),
                });
            }
        }
        self.timesteps = entries
            .iter()
            .map(|e| match *e {
                Entry::Skipped(s) => self.k.t(s),
                Entry::Eval { sigma, .. } => self.k.t(sigma),
            })
            .collect();
        self.entries = entries;
        self.start = None;
        self.eps.clear();
    }

    fn sigma_at(&self, index: usize) -> Result<f32> {
        check_index(index, self.entries.len())?;
        Ok(match self.entries[index] {
            Entry::Skipped(s) | Entry::Eval { sigma: s, .. } => s,
        })
    }
}

impl Scheduler for DpmFast {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// A1111 scales the noise by its schedule's first sigma.
    fn init_noise_sigma(&self) -> f64 {
        self.k.sigmas[0] as f64
    }

    fn eta(&self) -> Option<f64> {
        Some(f64::from(self.eta))
    }

    fn set_eta(&mut self, eta: f64) {
        self.eta = eta as f32;
        self.plan();
    }

    fn set_start_step(&mut self, _step: usize) {
        self.img2img = true;
    }

    fn set_begin_index(&mut self, begin: usize) {
        self.begin = begin;
        self.plan();
    }

    fn scale_model_input(&self, sample: &Tensor, index: usize) -> Result<Tensor> {
        scale_by_sigma(sample, self.sigma_at(index)?)
    }

    fn guidance_sigma(&self, index: usize) -> Option<f64> {
        self.sigma_at(index).ok().map(f64::from)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        self.k.add_noise(original, noise, self.sigma_at(index)?)
    }

    /// A1111's img2img start: the image plus the noise at the schedule's sigma there
    /// (`sigma_sched[0]`).
    fn add_start_noise(&self, original: &Tensor, noise: &Tensor, begin: usize) -> Result<Tensor> {
        self.k.add_start_noise(original, noise, begin)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        rngs: &mut [TorchRng],
    ) -> Result<Tensor> {
        check_index(index, self.entries.len())?;
        let Entry::Eval { step, stage, sigma } = self.entries[index] else {
            return Err(config_error("DPM fast stepped before its pass's start"));
        };
        let dtype = model_output.dtype();
        let (mo, x) = (to_f32(model_output)?, to_f32(sample)?);
        // DPMSolver.eps: (x - denoised) / sigma.
        let eps = div_s(&(&x - self.k.x0(&mo, &x, sigma)?)?, sigma)?;
        if stage == 0 {
            self.start = Some(x.clone());
            self.eps.clear();
        }
        self.eps.push(eps);
        let st = self.steps[step];
        let start = self
            .start
            .as_ref()
            .ok_or_else(|| config_error("DPM fast's stage before its step"))?;
        let out = if stage + 1 < st.solver.order {
            match stage {
                0 => st.solver.u1(start, &self.eps[0])?,
                _ => st.solver.u2(start, &self.eps[0], &self.eps[1])?,
            }
        } else {
            let x = st.solver.finish(start, &self.eps)?;
            // Drawn after every step; its scale is 0 without eta and on the last step.
            let noise = super::common::batch_randn(&x, rngs)?;
            (x + mul_s(&noise, st.su * S_NOISE)?)?
        };
        Ok(out.to_dtype(dtype)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedulers::a1111_timesteps::tests::sd15;

    #[test]
    fn evaluations_are_the_step_count() {
        for n in 1..=12 {
            let s = DpmFast::new(&sd15(), n).unwrap();
            assert_eq!(s.timesteps().len(), n, "{n}");
            // Runs from the largest training sigma down, never to 0.
            let sig = s.eval_sigmas();
            assert!((sig[0] - s.k.train_ends.1).abs() < 1e-5 * sig[0]);
            assert!(sig.iter().all(|&x| x > 0.0));
        }
        // 10 = 3 + 3 + 3 + 1: four steps.
        let s = DpmFast::new(&sd15(), 10).unwrap();
        let orders: Vec<usize> = s.steps.iter().map(|s| s.solver.order).collect();
        assert_eq!(orders, [3, 3, 3, 1]);
        // 9: 3 + 3 + 2 + 1.
        let s = DpmFast::new(&sd15(), 9).unwrap();
        let orders: Vec<usize> = s.steps.iter().map(|s| s.solver.order).collect();
        assert_eq!(orders, [3, 3, 2, 1]);
    }

    #[test]
    fn img2img_plans_from_the_start() {
        let mut s = DpmFast::new(&sd15(), 10).unwrap();
        s.set_begin_index(4);
        assert_eq!(s.timesteps().len(), 10);
        let sig = s.eval_sigmas();
        // Skipped entries keep the schedule's sigmas; the pass starts at sigmas[4].
        assert_eq!(&sig[..4], &s.k.sigmas[..4]);
        assert!((sig[4] - s.k.sigmas[4]).abs() < 1e-5 * sig[4]);
        // Six evaluations: 3 + 3 steps... 6 % 3 == 0: 3, 2, 1.
        let orders: Vec<usize> = s.steps.iter().map(|s| s.solver.order).collect();
        assert_eq!(orders, [3, 2, 1]);
        // Its last step ends at the schedule's last positive sigma.
        let last = s.steps.last().unwrap().solver;
        assert!((sigma_of(last.t_to) - s.k.sigmas[9]).abs() < 1e-5);
    }

    #[test]
    fn eta_noise_ends_at_zero() {
        let s = DpmFast::new(&sd15(), 8).unwrap();
        assert!(s.steps[..s.steps.len() - 1].iter().all(|st| st.su > 0.0));
        assert_eq!(s.steps.last().unwrap().su, 0.0);
        let mut s = s;
        s.set_eta(0.0);
        assert!(s.steps.iter().all(|st| st.su == 0.0));
    }
}
