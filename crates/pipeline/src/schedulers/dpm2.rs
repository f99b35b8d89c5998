//! `KDPM2DiscreteScheduler` (A1111 `DPM2`) and `KDPM2AncestralDiscreteScheduler` (`DPM2 a`):
//! k-diffusion's DPM-Solver-2, a midpoint method in sigma space. Each step but the last evaluates
//! the UNet at its sigma and again at an interpolated sigma (the geometric mean of its two ends),
//! so `timesteps` interleaves the interpolated timesteps (`2 * steps - 1` entries) and `step`
//! alternates halves as diffusers does. The ancestral one adds fresh noise at each second half,
//! drawn from the request's generators.

use candle_core::Tensor;

use super::churn::{self, Churn};
use super::common::{
    self, check_index, config_error, div_s, mul_s, np_round, to_f32, ClassDefaults, PredictionType,
    ResolvedConfig,
};
use super::euler::{pred_original, scale_by_sigma};
use super::interleaved::{
    log_midpoint, repeat_interior, sigma_to_t_f32, step_schedule, StepSchedule,
};
use super::{Scheduler, SchedulerConfig, SigmaSchedule};
use crate::rng::TorchRng;
use crate::Result;

const DEFAULTS: ClassDefaults = ClassDefaults {
    beta_start: 0.00085,
    beta_end: 0.012,
    ..ClassDefaults::with_spacing("linspace")
};

/// What both classes compute in `set_timesteps`, before the ancestral one's extra sigmas.
struct Common {
    prediction_type: PredictionType,
    s: StepSchedule,
    /// The per-step timesteps as torch holds them (float32 values; Karras ones rounded).
    timesteps: Vec<f64>,
    init_noise_sigma: f32,
}

impl Common {
    fn new(cfg: &SchedulerConfig, n: usize) -> Result<Self> {
        common::check_steps(n)?;
        let schedule = SigmaSchedule::of_config(cfg)?;
        let r = ResolvedConfig::resolve(cfg, &DEFAULTS)?;
        if r.prediction_type == PredictionType::Sample {
            return Err(config_error(
                "KDPM2 schedulers support prediction_type epsilon or v_prediction",
            ));
        }
        let s = step_schedule(cfg, &r, n, schedule)?;
        // Karras timesteps are `_sigma_to_t(...).round()` in float64, exponential and beta ones
        // `_sigma_to_t(...)` in float64 (so the whole array stays float64); uniform ones float32.
        let timesteps = s
            .timesteps
            .iter()
            .map(|&t| match schedule {
                SigmaSchedule::Karras => np_round(t),
                SigmaSchedule::Exponential | SigmaSchedule::Beta => t,
                SigmaSchedule::Uniform => t as f32 as f64,
            })
            .collect();
        let max = s.sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let init_noise_sigma = match r.timestep_spacing {
            common::TimestepSpacing::Leading => (max * max + 1.0).sqrt(),
            _ => max,
        };
        Ok(Self {
            prediction_type: r.prediction_type,
            s,
            timesteps,
            init_noise_sigma,
        })
    }

    /// `cat([t[:1], stack((interpolated[a..b], t[1:])).flatten()])`.
    fn interleave(&self, interpolated: &[f32]) -> Vec<f64> {
        let t = &self.timesteps;
        let mut out = vec![t[0]];
        for (ti, &tk) in interpolated.iter().zip(&t[1..]) {
            out.extend([*ti as f64, tk]);
        }
        out
    }

    /// The denoised estimate at `sigma_input`.
    fn x0(&self, mo: &Tensor, s: &Tensor, sigma_input: f32) -> Result<Tensor> {
        pred_original(self.prediction_type, mo, s, sigma_input)
    }
}

/// The `Scheduler` methods both classes share.
macro_rules! kdpm2_methods {
    () => {
        fn timesteps(&self) -> &[f64] {
            &self.timesteps
        }

        fn init_noise_sigma(&self) -> f64 {
            self.c.init_noise_sigma as f64
        }

        fn order(&self) -> usize {
            2
        }

        fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
            check_index(index, self.timesteps.len())?;
            let dtype = original.dtype();
            let x = (to_f32(original)? + mul_s(&to_f32(noise)?, self.sigmas[index])?)?;
            Ok(x.to_dtype(dtype)?)
        }
    };
}

pub struct KDpm2 {
    c: Common,
    timesteps: Vec<f64>,
    /// float32, `2 * steps + 2` each: the first, every later one twice, the last again.
    sigmas: Vec<f32>,
    sigmas_interpol: Vec<f32>,
    /// The sample at the start of the step while its second half is pending.
    first_half: Option<Tensor>,
    churn: Churn,
    /// Each step's `sigma_hat` (churn's; its sigma without it), the midpoint its second half
    /// evaluates at, and the unchurned timesteps.
    hats: Vec<f32>,
    mids: Vec<f32>,
    own_timesteps: Vec<f64>,
}

impl KDpm2 {
    /// `KDPM2DiscreteScheduler.from_config(cfg)`, then `set_timesteps(num_inference_steps)`.
    pub fn new(cfg: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        let c = Common::new(cfg, num_inference_steps)?;
        let sig = &c.s.sigmas;
        // lerp towards sigmas.roll(1): each sigma with the one before it (the first with the
        // final zero, a NaN that is never read).
        let interpol: Vec<f32> = (0..sig.len())
            .map(|i| log_midpoint(sig[i], sig[(i + sig.len() - 1) % sig.len()]))
            .collect();
        let t_interpol: Vec<f32> = interpol
            .iter()
            .map(|&s| sigma_to_t_f32(s, &c.s.log_sigmas))
            .collect();
        let timesteps = c.interleave(&t_interpol[1..t_interpol.len() - 1]);
        let mut me = Self {
            sigmas: repeat_interior(sig),
            sigmas_interpol: repeat_interior(&interpol),
            own_timesteps: timesteps.clone(),
            timesteps,
            c,
            first_half: None,
            churn: Churn::default(),
            hats: Vec::new(),
            mids: Vec::new(),
        };
        me.plan_from(0);
        Ok(me)
    }

    /// The churned sigmas of a run from step `start`: a churned step's midpoint is
    /// k-diffusion's `sigma_hat.log().lerp(sigmas[i + 1].log(), 0.5).exp()` (0 on the last
    /// step, an Euler step), its timesteps `_sigma_to_t`'s; an unchurned one keeps the class's.
    fn plan_from(&mut self, start: usize) {
        let step_sigmas = &self.c.s.sigmas;
        let logs: Vec<f64> = self.c.s.log_sigmas.iter().map(|&l| l as f64).collect();
        self.hats = self.churn.sigma_hats(step_sigmas, start);
        self.mids = Vec::with_capacity(self.hats.len());
        for (k, &hat) in self.hats.iter().enumerate() {
            let (sigma, next) = (step_sigmas[k], step_sigmas[k + 1]);
            let own_mid = self.sigmas_interpol[2 * k + 1];
            let mid = match (hat == sigma, next == 0.0) {
                (true, _) => own_mid,
                (false, true) => 0.0,
                (false, false) => log_midpoint(hat, next),
            };
            self.mids.push(mid);
            self.timesteps[2 * k] =
                churn::timestep_at(hat, sigma, self.own_timesteps[2 * k], &logs);
            if 2 * k + 1 < self.timesteps.len() {
                let own = self.own_timesteps[2 * k + 1];
                self.timesteps[2 * k + 1] = churn::timestep_at(mid, own_mid, own, &logs);
            }
        }
    }

    /// The float32 sigmas (diffusers' `sigmas`).
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// The float32 interpolated sigmas (diffusers' `sigmas_interpol`).
    pub fn sigmas_interpol(&self) -> &[f32] {
        &self.sigmas_interpol
    }
}

impl Scheduler for KDpm2 {
    kdpm2_methods!();

    fn scale_model_input(&self, sample: &Tensor, index: usize) -> Result<Tensor> {
        check_index(index, self.timesteps.len())?;
        let sigma = if self.first_half.is_none() {
            self.hats[index / 2]
        } else {
            self.mids[index / 2]
        };
        scale_by_sigma(sample, sigma)
    }

    fn set_churn(&mut self, churn: Churn) {
        self.churn = churn;
        self.plan_from(0);
    }

    fn set_begin_index(&mut self, begin: usize) {
        self.plan_from(begin / 2);
    }

    /// Even entries begin a step (churned there), odd ones evaluate its midpoint.
    fn prepare_sample(
        &mut self,
        sample: &Tensor,
        index: usize,
        rngs: &mut [TorchRng],
    ) -> Result<Option<Tensor>> {
        check_index(index, self.timesteps.len())?;
        if index % 2 == 1 {
            return Ok(None);
        }
        let k = index / 2;
        self.churn
            .raise(sample, self.c.s.sigmas[k], self.hats[k], rngs)
    }

    fn guidance_sigma(&self, index: usize) -> Option<f64> {
        let sigmas = if index.is_multiple_of(2) {
            &self.hats
        } else {
            &self.mids
        };
        sigmas.get(index / 2).map(|&s| s as f64)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        _rngs: &mut [TorchRng],
    ) -> Result<Tensor> {
        check_index(index, self.timesteps.len())?;
        let dtype = model_output.dtype();
        let (mo, s) = (to_f32(model_output)?, to_f32(sample)?);
        let prev = match self.first_half.take() {
            None => {
                // From sigma_hat (the sigma without churn) to the step's midpoint.
                let (sigma, sigma_interpol) = (self.hats[index / 2], self.mids[index / 2]);
                let x0 = self.c.x0(&mo, &s, sigma)?;
                let derivative = div_s(&(&s - x0)?, sigma)?;
                let prev = (&s + mul_s(&derivative, sigma_interpol - sigma)?)?;
                self.first_half = Some(s);
                prev
            }
            Some(start) => {
                let sigma = self.hats[index / 2];
                let sigma_interpol = self.mids[index / 2];
                let sigma_next = self.sigmas[index];
                let x0 = self.c.x0(&mo, &s, sigma_interpol)?;
                let derivative = div_s(&(&s - x0)?, sigma_interpol)?;
                (start + mul_s(&derivative, sigma_next - sigma)?)?
            }
        };
        Ok(prev.to_dtype(dtype)?)
    }
}

pub struct KDpm2Ancestral {
    c: Common,
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    sigmas_interpol: Vec<f32>,
    sigmas_up: Vec<f32>,
    sigmas_down: Vec<f32>,
    /// k-diffusion's `eta` (1: diffusers' class).
    eta: f32,
    first_half: Option<Tensor>,
}

impl KDpm2Ancestral {
    /// `KDPM2AncestralDiscreteScheduler.from_config(cfg)`, then
    /// `set_timesteps(num_inference_steps)`.
    pub fn new(cfg: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        let c = Common::new(cfg, num_inference_steps)?;
        let mut s = Self {
            sigmas: repeat_interior(&c.s.sigmas),
            c,
            timesteps: Vec::new(),
            sigmas_interpol: Vec::new(),
            sigmas_up: Vec::new(),
            sigmas_down: Vec::new(),
            eta: 1.0,
            first_half: None,
        };
        s.build_ancestral_sigmas();
        Ok(s)
    }

    /// The ancestral sigmas of each step and the interpolated timesteps that follow from them.
    /// With eta 1 this is diffusers' `set_timesteps`; another eta is k-diffusion's
    /// `get_ancestral_step(sigma, sigma_next, eta)` (what A1111's `DPM2 a` runs), whose
    /// `sigma_down` moves the midpoint the UNet is evaluated at.
    fn build_ancestral_sigmas(&mut self) {
        let c = &self.c;
        let sig = &c.s.sigmas;
        let len = sig.len();
        let next = |i: usize| if i + 1 < len { sig[i + 1] } else { 0.0 };
        // Float32, in torch's order of operations; the final sigma_up is 0/0 = NaN, never read.
        let up: Vec<f32> = (0..len)
            .map(|i| {
                let (s, n) = (sig[i], next(i));
                let up = (n * n * (s * s - n * n) / (s * s)).sqrt();
                if self.eta == 1.0 {
                    up
                } else {
                    // k-diffusion: min(sigma_to, eta * ...) (eta 0: no fresh noise).
                    (self.eta * up).min(n)
                }
            })
            .collect();
        let down: Vec<f32> = (0..len)
            .map(|i| {
                if i + 1 == len {
                    0.0
                } else {
                    let n = next(i);
                    (n * n - up[i] * up[i]).sqrt()
                }
            })
            .collect();
        let mut interpol: Vec<f32> = (0..len).map(|i| log_midpoint(sig[i], down[i])).collect();
        for v in interpol.iter_mut().skip(len.saturating_sub(2)) {
            *v = 0.0;
        }
        let t_interpol: Vec<f32> = interpol
            .iter()
            .map(|&s| sigma_to_t_f32(s, &c.s.log_sigmas))
            .collect();
        self.timesteps = c.interleave(&t_interpol[..len - 2]);
        self.sigmas_interpol = repeat_interior(&interpol);
        self.sigmas_up = repeat_interior(&up);
        self.sigmas_down = repeat_interior(&down);
    }

    /// The float32 sigmas (diffusers' `sigmas`).
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }
}

impl Scheduler for KDpm2Ancestral {
    kdpm2_methods!();

    fn eta(&self) -> Option<f64> {
        Some(f64::from(self.eta))
    }

    fn set_eta(&mut self, eta: f64) {
        self.eta = eta as f32;
        self.build_ancestral_sigmas();
    }

    fn scale_model_input(&self, sample: &Tensor, index: usize) -> Result<Tensor> {
        check_index(index, self.timesteps.len())?;
        let sigma = if self.first_half.is_none() {
            self.sigmas[index]
        } else {
            self.sigmas_interpol[index - 1]
        };
        scale_by_sigma(sample, sigma)
    }

    fn guidance_sigma(&self, index: usize) -> Option<f64> {
        let sigma = if index.is_multiple_of(2) {
            self.sigmas.get(index)
        } else {
            self.sigmas_interpol.get(index - 1)
        };
        sigma.map(|&s| s as f64)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        rngs: &mut [TorchRng],
    ) -> Result<Tensor> {
        check_index(index, self.timesteps.len())?;
        let dtype = model_output.dtype();
        let (mo, s) = (to_f32(model_output)?, to_f32(sample)?);
        let prev = match self.first_half.take() {
            None => {
                let (sigma, sigma_interpol) = (self.sigmas[index], self.sigmas_interpol[index]);
                let x0 = self.c.x0(&mo, &s, sigma)?;
                let derivative = div_s(&(&s - x0)?, sigma)?;
                let prev = (&s + mul_s(&derivative, sigma_interpol - sigma)?)?;
                self.first_half = Some(s);
                prev
            }
            Some(start) => {
                let sigma = self.sigmas[index - 1];
                let sigma_interpol = self.sigmas_interpol[index - 1];
                let sigma_up = self.sigmas_up[index - 1];
                let sigma_down = self.sigmas_down[index - 1];
                let x0 = self.c.x0(&mo, &s, sigma_interpol)?;
                let derivative = div_s(&(&s - x0)?, sigma_interpol)?;
                let prev = (start + mul_s(&derivative, sigma_down - sigma)?)?;
                let noise = common::batch_randn(&mo, rngs)?;
                (prev + mul_s(&noise, sigma_up)?)?
            }
        };
        Ok(prev.to_dtype(dtype)?)
    }
}
