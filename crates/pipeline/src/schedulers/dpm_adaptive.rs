//! k-diffusion 0.1.1's `sample_dpm_adaptive` (DPM-Solver-23 with adaptive step size, Lu et al.
//! 2022; A1111's `DPM adaptive`) with the arguments A1111 gives it: the sigmas' ends as
//! [`super::dpm_fast`] has them (no step count), order 3, eta (A1111's `eta_ancestral`, 1, unless
//! the request has one) and k-diffusion's defaults for the rest (rtol 0.05, atol 0.0078, h_init
//! 0.05, a PID controller with pcoeff 0, icoeff 1, dcoeff 0, accept_safety 0.81).
//!
//! Every try is three UNet evaluations (at `s`, `s + h / 3`, `s + 2h / 3` in `t = -ln sigma`):
//! a second-order and a third-order estimate whose difference decides whether the step is
//! taken (then fresh noise from the images' generators) and how large the next try is. How many
//! tries the run needs is known only as it goes, so `timesteps` grows: each try's three
//! evaluations are listed once the one before it is decided, and [`Scheduler::planned_evaluations`]
//! estimates the rest from the distance left and the current step size (for the progress).

use candle_core::{DType, Tensor};

use super::common::{check_index, config_error, div_s, mul_s, to_f32};
use super::dpm_fast::{ancestral_target, sigma_of, t_of, SolverStep};
use super::euler::scale_by_sigma;
use super::kdiffusion::KSigmas;
use super::{Scheduler, SchedulerConfig};
use crate::rng::TorchRng;
use crate::Result;

/// `sample_dpm_adaptive`'s defaults (A1111 passes none of them).
const RTOL: f32 = 0.05;
const ATOL: f32 = 0.0078;
const H_INIT: f64 = 0.05;
const ICOEFF: f64 = 1.0;
const ACCEPT_SAFETY: f64 = 0.81;
const PID_EPS: f64 = 1e-8;
const S_NOISE: f32 = 1.0;
/// The solver's order (A1111's default 3); its controller works at order 1.5 with eta.
const ORDER: f64 = 3.0;
const ORDER_WITH_ETA: f64 = 1.5;
/// The loop runs while `s < t_end - 1e-5`.
const END_SLACK: f32 = 1e-5;

/// k-diffusion's `PIDStepSizeController` with pcoeff = dcoeff = 0 (Python floats).
#[derive(Debug, Clone)]
struct Pid {
    h: f64,
    b1: f64,
    errs: Option<[f64; 3]>,
}

impl Pid {
    fn new(order: f64) -> Self {
        Self {
            h: H_INIT,
            b1: ICOEFF / order,
            errs: None,
        }
    }

    /// `propose_step`: scales `h` and says whether the try is accepted (b2 and b3 are 0, so
    /// their factors are 1).
    fn propose(&mut self, error: f32) -> bool {
        let inv = 1.0 / (f64::from(error) + PID_EPS);
        let errs = self.errs.get_or_insert([inv; 3]);
        errs[0] = inv;
        let factor = errs[0].powf(self.b1);
        let factor = 1.0 + (factor - 1.0).atan();
        let accept = factor >= ACCEPT_SAFETY;
        if accept {
            errs[2] = errs[1];
            errs[1] = errs[0];
        }
        self.h *= factor;
        accept
    }
}

/// One entry of `timesteps`.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Entry {
    /// A schedule step before the pass's start (img2img), or before `set_begin_index` plans
    /// the run: never evaluated.
    Skipped(f32),
    /// Evaluation `stage` (0..3) of the current try, at `sigma`.
    Eval { stage: usize, sigma: f32 },
}

/// The try under way: its solver step, the noise scale after it and its end `t`.
#[derive(Debug, Clone, Copy)]
struct Try {
    solver: SolverStep,
    su: f32,
    t: f32,
}

pub struct DpmAdaptive {
    k: KSigmas,
    eta: f32,
    img2img: bool,
    t_end: f32,
    /// The run's `s` (where the next try starts) and controller.
    s: f32,
    pid: Pid,
    current: Option<Try>,
    entries: Vec<Entry>,
    timesteps: Vec<f64>,
    /// The try's start sample, its epsilons, and the last accepted low estimate (`x_prev`).
    start: Option<Tensor>,
    eps: Vec<Tensor>,
    x_prev: Option<Tensor>,
}

impl DpmAdaptive {
    pub fn new(cfg: &SchedulerConfig, n: usize) -> Result<Self> {
        let k = KSigmas::new(cfg, n, false)?;
        // Until set_begin_index plans the run: one stand-in per schedule step.
        let entries: Vec<Entry> = k.sigmas[..n].iter().map(|&s| Entry::Skipped(s)).collect();
        let mut s = Self {
            eta: 1.0,
            img2img: false,
            t_end: 0.0,
            s: 0.0,
            pid: Pid::new(ORDER_WITH_ETA),
            current: None,
            timesteps: Vec::new(),
            entries,
            start: None,
            eps: Vec::new(),
            x_prev: None,
            k,
        };
        s.timesteps = s.entries.iter().map(|e| s.t_of_entry(e)).collect();
        Ok(s)
    }

    /// The noise level of each entry of `timesteps()`.
    pub fn eval_sigmas(&self) -> Vec<f32> {
        self.entries.iter().map(entry_sigma).collect()
    }

    fn t_of_entry(&self, e: &Entry) -> f64 {
        self.k.t(entry_sigma(e))
    }

    /// A pass from schedule step `begin`: A1111's ends, the controller afresh, the first try.
    fn plan_from(&mut self, begin: usize) {
        let sig = &self.k.sigmas;
        let schedule = sig.len() - 1;
        let begin = begin.min(schedule);
        let (sigma_min, sigma_max) = if begin == 0 && !self.img2img {
            self.k.train_ends
        } else {
            (sig[schedule.saturating_sub(1)], sig[begin])
        };
        self.entries = sig[..begin].iter().map(|&s| Entry::Skipped(s)).collect();
        self.timesteps = self.entries.iter().map(|e| self.t_of_entry(e)).collect();
        self.t_end = t_of(sigma_min);
        self.s = t_of(sigma_max);
        let order = if self.eta != 0.0 {
            ORDER_WITH_ETA
        } else {
            ORDER
        };
        self.pid = Pid::new(order);
        self.start = None;
        self.eps.clear();
        self.x_prev = None;
        self.current = None;
        if begin < schedule {
            self.next_try();
        }
    }

    /// Lists the next try's evaluations, where the run has not reached its end.
    fn next_try(&mut self) {
        self.current = None;
        // `while s < t_end - 1e-5`: a NaN ends the run too.
        let running = self.s < self.t_end - END_SLACK;
        if !running {
            return;
        }
        // torch.minimum(t_end, s + pid.h): the Python float added in float32.
        let t = self.t_end.min(self.s + self.pid.h as f32);
        let (t_to, su) = ancestral_target(self.s, t, self.t_end, self.eta);
        let solver = SolverStep {
            t: self.s,
            t_to,
            order: 3,
            r1: 1.0 / 3.0,
        };
        for stage in 0..3 {
            let entry = Entry::Eval {
                stage,
                sigma: sigma_of(solver.stage_t(stage)),
            };
            self.timesteps.push(self.t_of_entry(&entry));
            self.entries.push(entry);
        }
        self.current = Some(Try { solver, su, t });
    }

    fn sigma_at(&self, index: usize) -> Result<f32> {
        check_index(index, self.entries.len())?;
        Ok(entry_sigma(&self.entries[index]))
    }

    /// The try's error: `norm((x_low - x_high) / delta) / sqrt(numel)` with
    /// `delta = max(atol, rtol * max(|x_low|, |x_prev|))`.
    fn error(&self, x_low: &Tensor, x_high: &Tensor, x_prev: &Tensor) -> Result<f32> {
        let scale = x_low.abs()?.maximum(&x_prev.abs()?)?;
        let delta = mul_s(&scale, RTOL)?.maximum(ATOL)?;
        let r = ((x_low - x_high)? / delta)?;
        let sum: f64 = r
            .to_dtype(DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?;
        let norm = sum.sqrt() as f32;
        Ok(norm / (r.elem_count() as f64).sqrt() as f32)
    }
}

fn entry_sigma(e: &Entry) -> f32 {
    match *e {
        Entry::Skipped(s) | Entry::Eval { sigma: s, .. } => s,
    }
}

impl Scheduler for DpmAdaptive {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// The evaluations so far plus three for every step of the current size the distance
    /// left needs (at least the try under way): an estimate, never below what is listed.
    fn planned_evaluations(&self) -> usize {
        let listed = self.timesteps.len();
        let Some(cur) = self.current else {
            return listed;
        };
        let left = f64::from(self.t_end - cur.t).max(0.0);
        let tries = (left / self.pid.h.abs().max(1e-3)).ceil().min(1000.0) as usize;
        listed + 3 * tries
    }

    fn init_noise_sigma(&self) -> f64 {
        self.k.sigmas[0] as f64
    }

    fn eta(&self) -> Option<f64> {
        Some(f64::from(self.eta))
    }

    fn set_eta(&mut self, eta: f64) {
        self.eta = eta as f32;
    }

    fn set_start_step(&mut self, _step: usize) {
        self.img2img = true;
    }

    fn set_begin_index(&mut self, begin: usize) {
        self.plan_from(begin);
    }

    fn scale_model_input(&self, sample: &Tensor, index: usize) -> Result<Tensor> {
        scale_by_sigma(sample, self.sigma_at(index)?)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        self.k.add_noise(original, noise, self.sigma_at(index)?)
    }

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
        let (Entry::Eval { stage, sigma }, Some(cur)) = (self.entries[index], self.current) else {
            return Err(config_error("DPM adaptive stepped outside its run"));
        };
        let dtype = model_output.dtype();
        let (mo, x) = (to_f32(model_output)?, to_f32(sample)?);
        let eps = div_s(&(&x - self.k.x0(&mo, &x, sigma)?)?, sigma)?;
        if stage == 0 {
            self.start = Some(x.clone());
            self.eps.clear();
        }
        self.eps.push(eps);
        let start = self
            .start
            .clone()
            .ok_or_else(|| config_error("DPM adaptive's stage before its try"))?;
        let out = match stage {
            0 => cur.solver.u1(&start, &self.eps[0])?,
            1 => cur.solver.u2(&start, &self.eps[0], &self.eps[1])?,
            _ => {
                // The second-order estimate with r1 = 1/3 (sharing the first two evaluations)
                // and the third-order one.
                let low = SolverStep {
                    order: 2,
                    ..cur.solver
                }
                .finish(&start, &self.eps[..2])?;
                let high = cur.solver.finish(&start, &self.eps)?;
                let x_prev = self.x_prev.clone().unwrap_or_else(|| start.clone());
                let error = self.error(&low, &high, &x_prev)?;
                let out = if self.pid.propose(error) {
                    self.x_prev = Some(low);
                    self.s = cur.t;
                    let noise = super::common::batch_randn(&high, rngs)?;
                    (high + mul_s(&noise, cur.su * S_NOISE)?)?
                } else {
                    start
                };
                self.next_try();
                out
            }
        };
        Ok(out.to_dtype(dtype)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedulers::a1111_timesteps::tests::sd15;

    #[test]
    fn the_run_is_planned_try_by_try() {
        let mut s = DpmAdaptive::new(&sd15(), 10).unwrap();
        assert_eq!(s.timesteps().len(), 10);
        s.set_begin_index(0);
        // The first try: three evaluations from the largest training sigma, h_init 0.05.
        let sig = s.eval_sigmas();
        assert_eq!(sig.len(), 3);
        assert!((sig[0] - s.k.train_ends.1).abs() < 1e-5 * sig[0]);
        assert!(sig[0] > sig[1] && sig[1] > sig[2]);
        assert!(s.planned_evaluations() > 3);
        // img2img from step 4: four stand-ins, then the try from the schedule's sigma there.
        s.set_start_step(4);
        s.set_begin_index(4);
        let sig = s.eval_sigmas();
        assert_eq!(sig.len(), 7);
        assert!((sig[4] - s.k.sigmas[4]).abs() < 1e-5 * sig[4]);
    }

    #[test]
    fn the_controller_grows_h_on_small_errors_and_rejects_large_ones() {
        let mut pid = Pid::new(ORDER);
        assert!(pid.propose(0.01));
        assert!(pid.h > H_INIT);
        let h = pid.h;
        assert!(!pid.propose(100.0));
        assert!(pid.h < h);
    }
}
