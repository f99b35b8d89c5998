//! `DPMSolverMultistepScheduler` of diffusers 0.42.1 (DPM-Solver++ 2M and friends).
//!
//! The schedule (timesteps, float32 sigmas) is fixed at construction; `step` keeps the previous
//! data predictions, as diffusers does. Scalars are computed in f32 the way torch computes them on
//! its 0-d float32 tensors, tensors in f32 whatever the model's dtype (diffusers upcasts too).

use candle_core::Tensor;

use super::common::{
    self, config_error, div_s as div, mul_s as mul, ClassDefaults, PredictionType, TimestepSpacing,
};
use super::SchedulerConfig;
use crate::rng::TorchRng;
use crate::{PipelineError, Result};

// ---------------------------------------------------------------------------------------------
// Schedule helpers shared with `unipc`: both classes build timesteps and sigmas the same way.
// ---------------------------------------------------------------------------------------------

/// The timesteps (integers, as f64) and float32 sigmas (`n + 1`, the final one appended) that
/// `set_timesteps(n)` of DPMSolverMultistep / UniPCMultistep computes.
pub(crate) struct MultistepSchedule {
    pub(crate) timesteps: Vec<f64>,
    pub(crate) sigmas: Vec<f32>,
    pub(crate) prediction: PredictionType,
}

/// Which class's `set_timesteps` to follow; they differ only in corner cases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Family {
    Dpm,
    UniPc,
}

impl MultistepSchedule {
    pub(crate) fn new(
        cfg: &SchedulerConfig,
        n: usize,
        karras: bool,
        final_sigma_zero: bool,
        family: Family,
    ) -> Result<Self> {
        common::check_steps(n)?;
        // Both classes default to linspace spacing and offset 0 (not the file's class's defaults).
        let r = common::ResolvedConfig::resolve(cfg, &ClassDefaults::with_spacing("linspace"))?;
        let train_sigmas = common::sigmas_from_alphas_cumprod(&r.alphas_cumprod()?);
        let train = r.num_train_timesteps;
        let (timesteps, mut sigmas): (Vec<f64>, Vec<f32>) = if karras {
            if family == Family::Dpm && r.beta_schedule == "squaredcos_cap_v2" {
                // DPM leaves these timesteps fractional; the UNet path wants integers.
                return Err(config_error(
                    "Karras sigmas with squaredcos_cap_v2 are not supported",
                ));
            }
            // `in_sigmas` is the flipped training table: min is timestep 0, max the last. The
            // config's sigma_min/sigma_max win when present: UniPC declares them, and DPM reads any
            // keys the file carries through `hasattr(self.config, ...)`.
            let sigma_min = cfg.sigma_min.unwrap_or(train_sigmas[0] as f64);
            let sigma_max = cfg.sigma_max.unwrap_or(train_sigmas[train - 1] as f64);
            let ks = common::karras_sigmas(sigma_min, sigma_max, n);
            // np.log of the float32 table stays float32.
            let log_sigmas: Vec<f32> = train_sigmas.iter().map(|s| s.ln()).collect();
            let ts = ks
                .iter()
                .map(|&s| common::np_round(sigma_to_t_f32(s, &log_sigmas)))
                .collect();
            (ts, ks.iter().map(|&s| s as f32).collect())
        } else {
            // lambda_min_clipped (DPM) defaults to -inf: the whole schedule is used.
            let ts: Vec<f64> = match r.timestep_spacing {
                TimestepSpacing::Linspace => {
                    // np.linspace(0, T - 1, n + 1).round()[::-1][:-1]
                    let pts = common::np_linspace(0.0, (train - 1) as f64, n + 1);
                    pts.iter()
                        .rev()
                        .take(n)
                        .map(|&v| common::np_round(v))
                        .collect()
                }
                TimestepSpacing::Leading => {
                    // (arange(0, n + 1) * (T // (n + 1)))[::-1][:-1] + steps_offset
                    let ratio = train / (n + 1);
                    (1..=n)
                        .rev()
                        .map(|i| (i * ratio + r.steps_offset) as f64)
                        .collect()
                }
                TimestepSpacing::Trailing => common::trailing_timesteps(n, train),
            };
            let mut sig = Vec::with_capacity(ts.len());
            for &t in &ts {
                // np.interp at an integer point returns the table's float32 value exactly.
                let s = (t >= 0.0)
                    .then(|| train_sigmas.get(t as usize))
                    .flatten()
                    .ok_or_else(|| {
                        config_error(format!("timestep {t} outside the training schedule"))
                    })?;
                sig.push(*s);
            }
            (ts, sig)
        };
        let last = if final_sigma_zero {
            0.0
        } else if karras && family == Family::UniPc {
            // UniPC's karras branch repeats its own last sigma.
            sigmas[sigmas.len() - 1]
        } else {
            train_sigmas[0]
        };
        sigmas.push(last);
        Ok(Self {
            timesteps,
            sigmas,
            prediction: r.prediction_type,
        })
    }
}

/// `_sigma_to_t` with diffusers' dtypes: `log_sigmas` is float32, and so is the denominator
/// `low - high`; the rest is float64. (The index logic is `common::sigma_to_t`'s.)
fn sigma_to_t_f32(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // cumsum(dists >= 0).argmax(): the last index with log_sigma >= log_sigmas[i] (0 if none).
    let low_idx = log_sigmas
        .iter()
        .rposition(|&l| log_sigma - l as f64 >= 0.0)
        .unwrap_or(0);
    let low_idx = low_idx.min(log_sigmas.len() - 2);
    let high_idx = low_idx + 1;
    let (low, high) = (log_sigmas[low_idx], log_sigmas[high_idx]);
    let w = ((low as f64 - log_sigma) / (low - high) as f64).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// `_sigma_to_alpha_sigma_t` on a 0-d float32 tensor: `alpha = 1/sqrt(sigma^2+1)`, `sigma*alpha`.
pub(crate) fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// `final_sigmas_type` (both classes default to "zero"): whether the appended sigma is 0 rather
/// than the training schedule's smallest.
pub(crate) fn final_sigma_zero(cfg: &SchedulerConfig) -> Result<bool> {
    match cfg.final_sigmas_type.as_deref().unwrap_or("zero") {
        "zero" => Ok(true),
        "sigma_min" => Ok(false),
        other => Err(config_error(format!(
            "unsupported final_sigmas_type {other:?}"
        ))),
    }
}

/// `convert_model_output` at `sigma`: the data prediction x0 (`data`: dpmsolver++, UniPC's
/// predict_x0) or the noise prediction, from a model that predicts `prediction`.
pub(crate) fn convert_model_output(
    model_output: &Tensor,
    sample: &Tensor,
    sigma: f32,
    data: bool,
    prediction: PredictionType,
) -> Result<Tensor> {
    let (alpha_t, sigma_t) = alpha_sigma(sigma);
    Ok(match (data, prediction) {
        (true, PredictionType::Epsilon) => div(&(sample - mul(model_output, sigma_t)?)?, alpha_t)?,
        (true, PredictionType::Sample) | (false, PredictionType::Epsilon) => model_output.clone(),
        (true, PredictionType::VPrediction) => {
            (mul(sample, alpha_t)? - mul(model_output, sigma_t)?)?
        }
        (false, PredictionType::Sample) => div(&(sample - mul(model_output, alpha_t)?)?, sigma_t)?,
        (false, PredictionType::VPrediction) => {
            (mul(model_output, alpha_t)? + mul(sample, sigma_t)?)?
        }
    })
}

/// The `k`-th newest of the stored model outputs (1 = newest; they are kept oldest first).
pub(crate) fn newest_output(model_outputs: &[Option<Tensor>], k: usize) -> Result<&Tensor> {
    model_outputs[model_outputs.len() - k]
        .as_ref()
        .ok_or_else(|| PipelineError::InvalidRequest("multistep scheduler history is empty".into()))
}

/// The multistep solvers' `add_noise`: `alpha_t * original + sigma_t * noise` at
/// `sigmas[index]`, float32.
pub(crate) fn add_noise_alpha_sigma(
    sigmas: &[f32],
    timesteps: &[f64],
    original: &Tensor,
    noise: &Tensor,
    index: usize,
) -> Result<Tensor> {
    let (alpha_t, sigma_t) = alpha_sigma(sigmas[common::noise_index(index, timesteps.len())?]);
    let dtype = original.dtype();
    let x = (common::mul_s(&common::to_f32(original)?, alpha_t)?
        + common::mul_s(&common::to_f32(noise)?, sigma_t)?)?;
    Ok(x.to_dtype(dtype)?)
}

/// `log(alpha_t) - log(sigma_t)` (+inf at sigma 0).
pub(crate) fn lambda(alpha: f32, sigma: f32) -> f32 {
    alpha.ln() - sigma.ln()
}

/// diffusers' `index_for_timestep` for the first call: the second match if the timestep repeats.
pub(crate) fn first_step_index(timesteps: &[f64], t: f64) -> usize {
    let hits: Vec<usize> = timesteps
        .iter()
        .enumerate()
        .filter(|(_, &v)| v == t)
        .map(|(i, _)| i)
        .collect();
    match hits.len() {
        0 => timesteps.len() - 1,
        1 => hits[0],
        _ => hits[1],
    }
}

/// The step the multistep solvers are at: diffusers keeps its own counter (`step_index`), seeded
/// on the first call from that call's timestep.
pub(crate) fn current_step_index(
    step_index: Option<usize>,
    timesteps: &[f64],
    index: usize,
) -> Result<usize> {
    let n = timesteps.len();
    let i = match step_index {
        Some(i) => i,
        None => {
            let t = *timesteps.get(index).ok_or_else(|| {
                PipelineError::InvalidRequest(format!(
                    "step index {index} out of range ({n} timesteps)"
                ))
            })?;
            first_step_index(timesteps, t)
        }
    };
    common::check_index(i, n)?;
    Ok(i)
}

// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Algorithm {
    /// Data prediction (`dpmsolver++`).
    DpmSolverPp,
    /// Noise prediction (`dpmsolver`, deprecated in diffusers but deterministic).
    DpmSolver,
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
}

impl DpmSolverMultistep {
    /// `karras` forces Karras sigmas on (`dpmpp_2m_karras`); otherwise the config's
    /// `use_karras_sigmas` decides, as `from_config` would.
    pub fn new(cfg: &SchedulerConfig, num_inference_steps: usize, karras: bool) -> Result<Self> {
        let algorithm = match cfg.algorithm_type.as_deref().unwrap_or("dpmsolver++") {
            // diffusers maps "deis" onto dpmsolver++.
            "dpmsolver++" | "deis" => Algorithm::DpmSolverPp,
            "dpmsolver" => Algorithm::DpmSolver,
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
        let karras = karras || cfg.use_karras_sigmas == Some(true);
        let schedule = MultistepSchedule::new(
            cfg,
            num_inference_steps,
            karras,
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
        })
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
        let data = self.algorithm == Algorithm::DpmSolverPp;
        convert_model_output(model_output, sample, self.sigmas[i], data, self.prediction)
    }

    /// `dpm_solver_first_order_update` (DDIM-like).
    fn first_order_update(&self, m0: &Tensor, sample: &Tensor, i: usize) -> Result<Tensor> {
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
        })
    }

    /// `multistep_dpm_solver_second_order_update`.
    fn second_order_update(&self, sample: &Tensor, i: usize) -> Result<Tensor> {
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
        })
    }

    /// `multistep_dpm_solver_third_order_update`.
    fn third_order_update(&self, sample: &Tensor, i: usize) -> Result<Tensor> {
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
        })
    }

    /// The `k`-th newest stored model output (1 = newest).
    fn output(&self, k: usize) -> Result<&Tensor> {
        newest_output(&self.model_outputs, k)
    }
}

impl super::Scheduler for DpmSolverMultistep {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
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
        _rngs: &mut [TorchRng],
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

        let prev = if self.solver_order == 1 || self.lower_order_nums < 1 || lower_order_final {
            self.first_order_update(&converted, &sample, i)?
        } else if self.solver_order == 2 || self.lower_order_nums < 2 || lower_order_second {
            self.second_order_update(&sample, i)?
        } else {
            self.third_order_update(&sample, i)?
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
    fn zero_sigma_gives_unit_alpha_and_infinite_lambda() {
        let (a, s) = alpha_sigma(0.0);
        assert_eq!((a, s), (1.0, 0.0));
        assert_eq!(lambda(a, s), f32::INFINITY);
        let (a, s) = alpha_sigma(1.0);
        assert!((a - std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-7 && (a - s).abs() < 1e-7);
    }

    #[test]
    fn first_call_takes_the_second_of_repeated_timesteps() {
        assert_eq!(first_step_index(&[999.0, 500.0, 0.0], 500.0), 1);
        assert_eq!(first_step_index(&[999.0, 1.0, 1.0, 0.0], 1.0), 2);
        // Unknown timestep: diffusers falls back to the last index.
        assert_eq!(first_step_index(&[999.0, 500.0], 7.0), 1);
    }

    #[test]
    fn sigma_to_t_interpolates_in_log_space() {
        let logs: Vec<f32> = [1.0f32, 2.0, 4.0, 8.0].iter().map(|s| s.ln()).collect();
        assert!((sigma_to_t_f32(2.0, &logs) - 1.0).abs() < 1e-6);
        assert!((sigma_to_t_f32(4.0, &logs) - 2.0).abs() < 1e-6);
        assert!((sigma_to_t_f32(32f64.sqrt(), &logs) - 2.5).abs() < 1e-6);
        // Outside the table: clamped to its ends.
        assert_eq!(sigma_to_t_f32(100.0, &logs), 3.0);
        assert_eq!(sigma_to_t_f32(0.0, &logs), 0.0);
    }

    #[test]
    fn last_step_to_zero_sigma_returns_the_data_prediction() {
        // One step from the top of the schedule to sigma 0 is x0 = (x - sigma * eps) / alpha.
        let cfg = SchedulerConfig::default();
        let mut s = DpmSolverMultistep::new(&cfg, 1, false).unwrap();
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
