//! k-diffusion 0.1.1's `sample_dpmpp_2s_ancestral` (A1111's `DPM++ 2S a`) and
//! `sample_dpmpp_3m_sde` (`DPM++ 3M SDE`), samplers diffusers has no class for, on the sigmas A1111
//! hands them: `KDiffusionSampler.get_sigmas` of the CompVis denoiser (uniform: its
//! `get_sigmas(n)`, log-sigma interpolated at `linspace(999, 0, n)`), or k-diffusion's Karras /
//! exponential schedules and A1111's beta one between the training sigmas' ends; 3M SDE drops
//! the next-to-last sigma (A1111's `discard_next_to_last_sigma`). Each UNet call's timestep is
//! the denoiser's continuous `sigma_to_t`. Scalar math is float32, as torch does it on 0-dim
//! tensors.

use candle_core::Tensor;

use super::brownian::{self, BrownianNoise};
use super::common::{
    self, check_index, config_error, div_s, mul_s, to_f32, ClassDefaults, PredictionType,
    ResolvedConfig,
};
use super::euler::{pred_original, scale_by_sigma};
use super::interleaved::sigma_to_t_f32;
use super::torch_math::{exp, expm1, log};
use super::{Scheduler, SchedulerConfig, SigmaSchedule};
use crate::rng::TorchRng;
use crate::{PipelineError, Result};

/// The betas of the LDM configs A1111 loads (SD 1.5's); a model's file wins key by key.
const DEFAULTS: ClassDefaults = ClassDefaults {
    beta_start: 0.00085,
    beta_end: 0.012,
    beta_schedule: "scaled_linear",
    ..ClassDefaults::with_spacing("linspace")
};

/// The denoiser's tables and a run's sigmas.
pub(super) struct KSigmas {
    prediction_type: PredictionType,
    /// `n + 1` float32 sigmas, the last 0.
    pub(super) sigmas: Vec<f32>,
    /// `log` of the float32 training sigmas (the denoiser's `log_sigmas`).
    log_sigmas: Vec<f32>,
    /// The smallest and largest training sigma (the denoiser's `sigmas[0]`, `sigmas[-1]`).
    pub(super) train_ends: (f32, f32),
}

impl KSigmas {
    pub(super) fn new(cfg: &SchedulerConfig, n: usize, discard_penultimate: bool) -> Result<Self> {
        common::check_steps(n)?;
        let r = ResolvedConfig::resolve(cfg, &DEFAULTS)?;
        if r.prediction_type == PredictionType::Sample {
            return Err(config_error(
                "k-diffusion samplers support prediction_type epsilon or v_prediction",
            ));
        }
        let train = common::sigmas_from_alphas_cumprod(&r.alphas_cumprod()?);
        let log_sigmas: Vec<f32> = train.iter().map(|&s| log(s)).collect();
        // A1111 asks for one more sigma and drops the next-to-last where the sampler says so.
        let m = n + usize::from(discard_penultimate);
        let (min, max) = (train[0], train[train.len() - 1]);
        let mut sigmas: Vec<f32> = match SigmaSchedule::of_config(cfg)? {
            // t_to_sigma(linspace(t_max, 0, m)): log sigma interpolated between the two
            // training timesteps around each t.
            SigmaSchedule::Uniform => common::torch_linspace_f32((train.len() - 1) as f64, 0.0, m)
                .into_iter()
                .map(|t| {
                    let (lo, hi, w) = (t.floor() as usize, t.ceil() as usize, t.fract());
                    exp((1.0 - w) * log_sigmas[lo] + w * log_sigmas[hi])
                })
                .collect(),
            // get_sigmas_karras: a float32 ramp, Python-float ends, rho 7.
            SigmaSchedule::Karras => {
                let rho = 7.0f64;
                let (min_inv, max_inv) =
                    ((min as f64).powf(1.0 / rho), (max as f64).powf(1.0 / rho));
                common::torch_linspace_f32(0.0, 1.0, m)
                    .into_iter()
                    .map(|r| (max_inv as f32 + r * (min_inv - max_inv) as f32).powf(7.0))
                    .collect()
            }
            // get_sigmas_exponential: linspace(log max, log min).exp() in float32.
            SigmaSchedule::Exponential => {
                common::torch_linspace_f32((max as f64).ln(), (min as f64).ln(), m)
                    .into_iter()
                    .map(exp)
                    .collect()
            }
            // A1111's beta_scheduler: Python floats, then a FloatTensor.
            SigmaSchedule::Beta => super::sigma_schedule::beta_sigmas(min as f64, max as f64, m)
                .into_iter()
                .map(|s| s as f32)
                .collect(),
        };
        sigmas.push(0.0);
        if discard_penultimate {
            sigmas.remove(sigmas.len() - 2);
        }
        Ok(Self {
            prediction_type: r.prediction_type,
            sigmas,
            log_sigmas,
            train_ends: (min, max),
        })
    }

    pub(super) fn t(&self, sigma: f32) -> f64 {
        sigma_to_t_f32(sigma, &self.log_sigmas) as f64
    }

    pub(super) fn x0(&self, mo: &Tensor, x: &Tensor, sigma: f32) -> Result<Tensor> {
        pred_original(self.prediction_type, mo, x, sigma)
    }

    pub(super) fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        sigma: f32,
    ) -> Result<Tensor> {
        let dtype = original.dtype();
        Ok((to_f32(original)? + mul_s(&to_f32(noise)?, sigma)?)?.to_dtype(dtype)?)
    }

    /// A1111's img2img start on a schedule it hands over whole (`sigma_sched[0]`): the image
    /// plus the noise at the schedule's sigma at `begin` (the last one past its end).
    pub(super) fn add_start_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        begin: usize,
    ) -> Result<Tensor> {
        let sigma = self.sigmas[begin.min(self.sigmas.len() - 1)];
        self.add_noise(original, noise, sigma)
    }
}

/// k-diffusion's `get_ancestral_step(sigma_from, sigma_to, eta)` in float32: (down, up).
pub(super) fn ancestral_step(from: f32, to: f32, eta: f32) -> (f32, f32) {
    if eta == 0.0 {
        return (to, 0.0);
    }
    let up = eta * (to * to * (from * from - to * to) / (from * from)).sqrt();
    // Python's min(a, b): b only when b < a.
    let up = if up < to { up } else { to };
    ((to * to - up * up).sqrt(), up)
}

/// One step of DPM++ 2S a: its sigmas and whether it evaluates the UNet at a midpoint.
#[derive(Debug, Clone, Copy)]
struct AncestralStep {
    sigma: f32,
    sigma_next: f32,
    down: f32,
    up: f32,
    /// `sigma_fn(t + h / 2)` where `sigma_down > 0` (DPM-Solver++(2S)); `None`: an Euler step.
    mid: Option<f32>,
}

/// The UNet calls of a k-diffusion sampler that evaluates each step at its start and, where the
/// step has one, again at a midpoint (DPM++ 2S a, A1111's DPM2 and DPM2 a): per call, its step,
/// whether it is the midpoint, the sigma the UNet sees and its timestep.
#[derive(Default)]
pub(super) struct MidpointCalls {
    calls: Vec<(usize, bool)>,
    sigmas: Vec<f32>,
    timesteps: Vec<f64>,
}

impl MidpointCalls {
    /// The calls of `steps` (each step's starting sigma and midpoint), timesteps from `k`.
    pub(super) fn new(k: &KSigmas, steps: impl Iterator<Item = (f32, Option<f32>)>) -> Self {
        let mut out = Self::default();
        for (i, (start, mid)) in steps.enumerate() {
            for (sigma, is_mid) in std::iter::once((start, false)).chain(mid.map(|m| (m, true))) {
                out.calls.push((i, is_mid));
                out.sigmas.push(sigma);
                out.timesteps.push(k.t(sigma));
            }
        }
        out
    }

    /// Call `index`'s step and whether it is that step's midpoint.
    pub(super) fn get(&self, index: usize) -> Result<(usize, bool)> {
        check_index(index, self.calls.len())?;
        Ok(self.calls[index])
    }

    /// The sigma the UNet sees at call `index`.
    pub(super) fn sigma(&self, index: usize) -> Result<f32> {
        check_index(index, self.calls.len())?;
        Ok(self.sigmas[index])
    }

    pub(super) fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// The first call of `step` (the call count past the last step).
    pub(super) fn first_of_step(&self, step: usize) -> usize {
        self.calls
            .iter()
            .position(|&(s, _)| s == step)
            .unwrap_or(self.calls.len())
    }

    /// The step of call `index` (the step count past the last call).
    pub(super) fn step_of(&self, index: usize, steps: usize) -> usize {
        self.calls.get(index).map_or(steps, |c| c.0)
    }
}

/// `sample_dpmpp_2s_ancestral`: each step with `sigma_down > 0` evaluates the UNet at its sigma
/// and at the midpoint (in `t = -ln sigma`) towards `sigma_down`; the last step (and any other
/// with `sigma_down == 0`) is one Euler step. Fresh noise from the images' generators (A1111:
/// `torch.randn_like`, which its ImageRNG answers image by image) after every step but the last.
pub struct DpmPp2sAncestral {
    k: KSigmas,
    eta: f32,
    steps: Vec<AncestralStep>,
    calls: MidpointCalls,
    /// The step's starting sample while its midpoint call is pending.
    start: Option<Tensor>,
}

impl DpmPp2sAncestral {
    pub fn new(cfg: &SchedulerConfig, n: usize) -> Result<Self> {
        let mut s = Self {
            k: KSigmas::new(cfg, n, false)?,
            eta: 1.0,
            steps: Vec::new(),
            calls: MidpointCalls::default(),
            start: None,
        };
        s.layout();
        Ok(s)
    }

    /// The steps' ancestral sigmas and midpoints for the current eta, and the UNet calls.
    fn layout(&mut self) {
        let sig = &self.k.sigmas;
        self.steps = sig
            .windows(2)
            .map(|w| {
                let (down, up) = ancestral_step(w[0], w[1], self.eta);
                let mid = (down != 0.0).then(|| {
                    let (t, t_next) = (-log(w[0]), -log(down));
                    exp(-(t + 0.5 * (t_next - t)))
                });
                AncestralStep {
                    sigma: w[0],
                    sigma_next: w[1],
                    down,
                    up,
                    mid,
                }
            })
            .collect();
        self.calls = MidpointCalls::new(&self.k, self.steps.iter().map(|st| (st.sigma, st.mid)));
    }

    /// The run's sigmas (one per step, then 0).
    pub fn sigmas(&self) -> &[f32] {
        &self.k.sigmas
    }

    fn ancestral_noise(
        &self,
        x: Tensor,
        st: &AncestralStep,
        rngs: &mut [TorchRng],
    ) -> Result<Tensor> {
        if st.sigma_next > 0.0 {
            let noise = common::batch_randn(&x, rngs)?;
            Ok((x + mul_s(&noise, st.up)?)?)
        } else {
            Ok(x)
        }
    }
}

impl Scheduler for DpmPp2sAncestral {
    fn timesteps(&self) -> &[f64] {
        self.calls.timesteps()
    }

    fn init_noise_sigma(&self) -> f64 {
        self.k.sigmas[0] as f64
    }

    fn eta(&self) -> Option<f64> {
        Some(f64::from(self.eta))
    }

    fn set_eta(&mut self, eta: f64) {
        self.eta = eta as f32;
        self.layout();
    }

    fn order(&self) -> usize {
        2
    }

    fn first_index_of_step(&self, step: usize) -> usize {
        self.calls.first_of_step(step)
    }

    fn scale_model_input(&self, sample: &Tensor, index: usize) -> Result<Tensor> {
        scale_by_sigma(sample, self.calls.sigma(index)?)
    }

    fn guidance_sigma(&self, index: usize) -> Option<f64> {
        self.calls.sigma(index).ok().map(f64::from)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        self.k.add_noise(original, noise, self.calls.sigma(index)?)
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
        let (t, t_next) = (-log(st.sigma), -log(st.down));
        let h = t_next - t;
        let out = match (is_mid, st.mid) {
            (false, None) => {
                // Euler to sigma_down.
                let denoised = self.k.x0(&mo, &x, st.sigma)?;
                let d = div_s(&(&x - denoised)?, st.sigma)?;
                let x = (&x + mul_s(&d, st.down - st.sigma)?)?;
                self.ancestral_noise(x, &st, rngs)?
            }
            (false, Some(mid)) => {
                let denoised = self.k.x0(&mo, &x, st.sigma)?;
                let ratio = mid / exp(-t);
                let x2 = (mul_s(&x, ratio)? - mul_s(&denoised, expm1(-h * 0.5))?)?;
                self.start = Some(x);
                x2
            }
            (true, Some(mid)) => {
                let start = self.start.take().ok_or_else(|| {
                    PipelineError::InvalidRequest("DPM++ 2S a midpoint before its step".into())
                })?;
                let denoised = self.k.x0(&mo, &x, mid)?;
                let ratio = exp(-t_next) / exp(-t);
                let x = (mul_s(&start, ratio)? - mul_s(&denoised, expm1(-h))?)?;
                self.ancestral_noise(x, &st, rngs)?
            }
            (true, None) => unreachable!("a midpoint call only where the step has one"),
        };
        Ok(out.to_dtype(dtype)?)
    }
}

/// `sample_dpmpp_3m_sde`: one UNet call per step, a third-order multistep update from the last
/// two denoised estimates, Brownian-tree noise (one tree per image, seeded with its seed, over
/// the whole schedule's sigmas: A1111's `create_noise_sampler`) where eta is not 0, and the last
/// step (to sigma 0) the denoised estimate itself.
pub struct DpmPp3mSde {
    k: KSigmas,
    eta: f32,
    timesteps: Vec<f64>,
    /// The two previous steps' denoised estimates and step sizes, newest first.
    history: Vec<(Tensor, f32)>,
    noise: Option<BrownianNoise>,
}

impl DpmPp3mSde {
    pub fn new(cfg: &SchedulerConfig, n: usize) -> Result<Self> {
        let k = KSigmas::new(cfg, n, true)?;
        let timesteps = k.sigmas[..n].iter().map(|&s| k.t(s)).collect();
        Ok(Self {
            k,
            eta: 1.0,
            timesteps,
            history: Vec::new(),
            noise: None,
        })
    }

    /// The run's sigmas (one per step, then 0).
    pub fn sigmas(&self) -> &[f32] {
        &self.k.sigmas
    }
}

impl Scheduler for DpmPp3mSde {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
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

    fn scale_model_input(&self, sample: &Tensor, index: usize) -> Result<Tensor> {
        check_index(index, self.timesteps.len())?;
        scale_by_sigma(sample, self.k.sigmas[index])
    }

    fn guidance_sigma(&self, index: usize) -> Option<f64> {
        self.k.sigmas.get(index).map(|&s| s as f64)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        check_index(index, self.timesteps.len())?;
        self.k.add_noise(original, noise, self.k.sigmas[index])
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
        let (mo, x) = (to_f32(model_output)?, to_f32(sample)?);
        let (sigma, next) = (self.k.sigmas[index], self.k.sigmas[index + 1]);
        let denoised = self.k.x0(&mo, &x, sigma)?;
        if next == 0.0 {
            // The denoising step.
            return Ok(denoised.to_dtype(dtype)?);
        }
        let h = -log(next) - -log(sigma);
        let h_eta = h * (self.eta + 1.0);
        let e = expm1(-h_eta);
        let mut x = (mul_s(&x, exp(-h_eta))? + mul_s(&denoised, -e)?)?;
        let phi_2 = e / h_eta + 1.0;
        match self.history.as_slice() {
            [(d_1, h_1), (d_2, h_2)] => {
                let (r0, r1) = (h_1 / h, h_2 / h);
                let d1_0 = div_s(&(&denoised - d_1)?, r0)?;
                let d1_1 = div_s(&(d_1 - d_2)?, r1)?;
                let diff = (&d1_0 - &d1_1)?;
                let d1 = (&d1_0 + div_s(&mul_s(&diff, r0)?, r0 + r1)?)?;
                let d2 = div_s(&diff, r0 + r1)?;
                let phi_3 = phi_2 / h_eta - 0.5;
                x = ((x + mul_s(&d1, phi_2)?)? - mul_s(&d2, phi_3)?)?;
            }
            [(d_1, h_1)] => {
                let d = div_s(&(&denoised - d_1)?, h_1 / h)?;
                x = (x + mul_s(&d, phi_2)?)?;
            }
            _ => {}
        }
        if self.eta != 0.0 {
            let noise =
                brownian::batch_noise(&mut self.noise, &self.k.sigmas, &x, rngs, sigma, next)?;
            let scale = (-expm1(-2.0 * h * self.eta)).sqrt();
            x = (x + mul_s(&mul_s(&noise, next)?, scale)?)?;
        }
        self.history.insert(0, (denoised, h));
        self.history.truncate(2);
        Ok(x.to_dtype(dtype)?)
    }
}
