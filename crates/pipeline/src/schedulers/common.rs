//! Pieces every scheduler shares: the training noise schedule (betas, `alphas_cumprod`), timestep
//! spacing, sigma helpers, and f32 scalar arithmetic on tensors.
//!
//! Precision follows diffusers 0.42 / torch 2.11 / numpy exactly where it matters: betas are a
//! float32 torch tensor (`torch.linspace` in f32, which computes `start + step * i` with one
//! rounding, i.e. a fused multiply-add), `torch.cumprod` on CPU accumulates in f64 and rounds
//! each prefix to f32, while timestep and sigma arrays are numpy float64 (sometimes cast to f32).
//! Values that diffusers holds as f32 are kept as `f32` here, so the types document the dtypes.

use std::path::PathBuf;

use candle_core::{DType, Tensor};

use super::SchedulerConfig;
use crate::rng::TorchRng;
use crate::{PipelineError, Result};

/// What the model predicts (`prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    Epsilon,
    VPrediction,
    /// `sample` (diffusers also accepts `original_sample` in some classes).
    Sample,
}

impl PredictionType {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "epsilon" => Ok(Self::Epsilon),
            "v_prediction" => Ok(Self::VPrediction),
            "sample" | "original_sample" => Ok(Self::Sample),
            other => Err(config_error(format!("unknown prediction_type {other:?}"))),
        }
    }
}

/// `timestep_spacing`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSpacing {
    Linspace,
    Leading,
    Trailing,
}

impl TimestepSpacing {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "linspace" => Ok(Self::Linspace),
            "leading" => Ok(Self::Leading),
            "trailing" => Ok(Self::Trailing),
            other => Err(config_error(format!("unknown timestep_spacing {other:?}"))),
        }
    }
}

/// A config error about `scheduler_config.json`.
pub fn config_error(message: impl std::fmt::Display) -> PipelineError {
    PipelineError::config(PathBuf::from("scheduler_config.json"), message)
}

/// A class's `__init__` defaults for the keys all schedulers share.
#[derive(Debug, Clone, Copy)]
pub struct ClassDefaults {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: &'static str,
    pub prediction_type: &'static str,
    pub timestep_spacing: &'static str,
    pub steps_offset: usize,
}

impl ClassDefaults {
    /// The defaults nearly every diffusers scheduler class declares; only the spacing differs.
    pub const fn with_spacing(timestep_spacing: &'static str) -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: "linear",
            prediction_type: "epsilon",
            timestep_spacing,
            steps_offset: 0,
        }
    }
}

/// The shared keys after `from_config`: present keys win, absent keys take the class default.
#[derive(Debug, Clone)]
pub struct ResolvedConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: String,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: PredictionType,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: usize,
    pub rescale_betas_zero_snr: bool,
}

impl ResolvedConfig {
    pub fn resolve(cfg: &SchedulerConfig, d: &ClassDefaults) -> Result<Self> {
        let num_train_timesteps = cfg.num_train_timesteps.unwrap_or(d.num_train_timesteps);
        if num_train_timesteps < 2 {
            return Err(config_error(format!(
                "num_train_timesteps must be at least 2, got {num_train_timesteps}"
            )));
        }
        Ok(Self {
            num_train_timesteps,
            beta_start: cfg.beta_start.unwrap_or(d.beta_start),
            beta_end: cfg.beta_end.unwrap_or(d.beta_end),
            beta_schedule: cfg
                .beta_schedule
                .clone()
                .unwrap_or_else(|| d.beta_schedule.to_string()),
            trained_betas: cfg.trained_betas.clone(),
            prediction_type: PredictionType::parse(
                cfg.prediction_type.as_deref().unwrap_or(d.prediction_type),
            )?,
            timestep_spacing: TimestepSpacing::parse(
                cfg.timestep_spacing
                    .as_deref()
                    .unwrap_or(d.timestep_spacing),
            )?,
            steps_offset: cfg.steps_offset.unwrap_or(d.steps_offset),
            rescale_betas_zero_snr: cfg.rescale_betas_zero_snr.unwrap_or(false),
        })
    }

    /// `self.betas` as the class computes it (float32), including `rescale_betas_zero_snr`.
    pub fn betas(&self) -> Result<Vec<f32>> {
        let n = self.num_train_timesteps;
        let betas = if let Some(tb) = &self.trained_betas {
            if tb.len() != n {
                return Err(config_error(format!(
                    "trained_betas has {} entries, num_train_timesteps is {n}",
                    tb.len()
                )));
            }
            tb.iter().map(|&b| b as f32).collect()
        } else {
            match self.beta_schedule.as_str() {
                "linear" => torch_linspace_f32(self.beta_start, self.beta_end, n),
                "scaled_linear" => {
                    torch_linspace_f32(self.beta_start.sqrt(), self.beta_end.sqrt(), n)
                        .into_iter()
                        .map(|b| b * b)
                        .collect()
                }
                "squaredcos_cap_v2" => betas_for_alpha_bar_cosine(n, 0.999),
                other => {
                    return Err(config_error(format!(
                        "beta_schedule {other:?} is not supported"
                    )))
                }
            }
        };
        Ok(if self.rescale_betas_zero_snr {
            rescale_zero_terminal_snr(&betas)
        } else {
            betas
        })
    }

    /// `alphas_cumprod` (float32) of [`Self::betas`].
    pub fn alphas_cumprod(&self) -> Result<Vec<f32>> {
        Ok(alphas_cumprod(&self.betas()?))
    }
}

/// `torch.linspace(start, end, n, dtype=torch.float32)` on CPU: start and end rounded to f32,
/// step in f32; the first half counts up from `start`, the second half down from `end`, each value
/// with a single rounding.
pub fn torch_linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let (s, e) = (start as f32, end as f32);
    if n == 1 {
        return vec![s];
    }
    let step = (e - s) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                step.mul_add(i as f32, s)
            } else {
                (-step).mul_add((n - 1 - i) as f32, e)
            }
        })
        .collect()
}

/// diffusers' `betas_for_alpha_bar` with the cosine transform (Python floats, then float32).
pub fn betas_for_alpha_bar_cosine(n: usize, max_beta: f64) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2)
    };
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(max_beta) as f32
        })
        .collect()
}

/// diffusers' `rescale_zero_terminal_snr`, in float32 as torch does it.
pub fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let ac = alphas_cumprod(betas);
    let mut sqrt: Vec<f32> = ac.iter().map(|a| a.sqrt()).collect();
    let s0 = sqrt[0];
    let st = sqrt[sqrt.len() - 1];
    let scale = s0 / (s0 - st);
    for v in sqrt.iter_mut() {
        *v -= st;
        *v *= scale;
    }
    let bar: Vec<f32> = sqrt.iter().map(|v| v * v).collect();
    let mut out = Vec::with_capacity(bar.len());
    out.push(1.0 - bar[0]);
    for i in 1..bar.len() {
        out.push(1.0 - bar[i] / bar[i - 1]);
    }
    out
}

/// `torch.cumprod(1 - betas)`: CPU cumprod accumulates in f64 and stores each prefix as f32.
pub fn alphas_cumprod(betas: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    betas
        .iter()
        .map(|b| {
            acc *= (1.0f32 - b) as f64;
            acc as f32
        })
        .collect()
}

/// `((1 - alphas_cumprod) / alphas_cumprod) ** 0.5` in float32 (index = training timestep).
pub fn sigmas_from_alphas_cumprod(ac: &[f32]) -> Vec<f32> {
    ac.iter().map(|a| ((1.0 - a) / a).sqrt()).collect()
}

/// `np.linspace(start, stop, num)` (float64): `i * step + start`, the last value exactly `stop`.
pub fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    match num {
        0 => vec![],
        1 => vec![start],
        _ => {
            let step = (stop - start) / (num - 1) as f64;
            let mut v: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
            v[num - 1] = stop;
            v
        }
    }
}

/// `np.arange(start, stop, step)` for floats: length `ceil((stop - start) / step)`, values
/// `start + i * delta` with `delta = (start + step) - start`, as numpy's fill does.
pub fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return vec![];
    }
    let len = len as usize;
    if len == 1 {
        return vec![start];
    }
    let delta = (start + step) - start;
    (0..len)
        .map(|i| {
            if i == 0 {
                start
            } else {
                start + i as f64 * delta
            }
        })
        .collect()
}

/// `np.round`: half to even.
pub fn np_round(x: f64) -> f64 {
    x.round_ties_even()
}

/// `leading` spacing, descending: `(arange(0, n) * (T // n)).round()[::-1] + steps_offset`.
pub fn leading_timesteps(n: usize, train: usize, steps_offset: usize) -> Vec<f64> {
    let ratio = train / n;
    (0..n)
        .rev()
        .map(|i| (i * ratio + steps_offset) as f64)
        .collect()
}

/// `trailing` spacing, descending: `np.round(np.arange(T, 0, -T / n)) - 1`.
pub fn trailing_timesteps(n: usize, train: usize) -> Vec<f64> {
    let ratio = train as f64 / n as f64;
    np_arange(train as f64, 0.0, -ratio)
        .into_iter()
        .map(|t| np_round(t) - 1.0)
        .collect()
}

/// `linspace` spacing rounded to integers, descending: `np.linspace(0, T - 1, n).round()[::-1]`
/// (PNDM, DDIM).
pub fn linspace_rounded_timesteps(n: usize, train: usize) -> Vec<f64> {
    np_linspace(0.0, (train - 1) as f64, n)
        .into_iter()
        .rev()
        .map(np_round)
        .collect()
}

/// `linspace` spacing as float32, not rounded, descending:
/// `np.linspace(0, T - 1, n, dtype=np.float32)[::-1]` (Euler, Euler ancestral, LMS).
pub fn linspace_f32_timesteps(n: usize, train: usize) -> Vec<f64> {
    np_linspace(0.0, (train - 1) as f64, n)
        .into_iter()
        .rev()
        .map(|t| t as f32 as f64)
        .collect()
}

/// The Euler/LMS family's timesteps (float32 values, descending) for a spacing.
pub fn sigma_family_timesteps(r: &ResolvedConfig, n: usize) -> Vec<f64> {
    let train = r.num_train_timesteps;
    match r.timestep_spacing {
        TimestepSpacing::Linspace => linspace_f32_timesteps(n, train),
        TimestepSpacing::Leading => leading_timesteps(n, train, r.steps_offset),
        TimestepSpacing::Trailing => trailing_timesteps(n, train),
    }
}

/// `np.interp(x, xp, fp)` for increasing `xp` (float64).
pub fn interp(x: &[f64], xp: &[f64], fp: &[f64]) -> Vec<f64> {
    let last = xp.len() - 1;
    x.iter()
        .map(|&v| {
            if v.is_nan() {
                v
            } else if v >= xp[last] {
                fp[last]
            } else if v < xp[0] {
                fp[0]
            } else {
                // Largest j with xp[j] <= v.
                let j = xp.partition_point(|&p| p <= v) - 1;
                if xp[j] == v {
                    fp[j]
                } else {
                    let slope = (fp[j + 1] - fp[j]) / (xp[j + 1] - xp[j]);
                    slope * (v - xp[j]) + fp[j]
                }
            }
        })
        .collect()
}

/// Sigmas at fractional timesteps, linearly interpolated over the training sigmas (float64 result).
pub fn interp_sigmas(timesteps: &[f64], train_sigmas: &[f32]) -> Vec<f64> {
    let xp: Vec<f64> = (0..train_sigmas.len()).map(|i| i as f64).collect();
    let fp: Vec<f64> = train_sigmas.iter().map(|&s| s as f64).collect();
    interp(timesteps, &xp, &fp)
}

/// Karras et al. (2022) sigmas, `rho = 7`, float64 as diffusers' `_convert_to_karras`.
pub fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0f64;
    let min_inv = sigma_min.powf(1.0 / rho);
    let max_inv = sigma_max.powf(1.0 / rho);
    np_linspace(0.0, 1.0, n)
        .into_iter()
        .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
        .collect()
}

/// diffusers' `_sigma_to_t`: the fractional training timestep whose log-sigma matches, by linear
/// interpolation in `log_sigmas` (ascending timestep order, i.e. increasing sigma).
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f64]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let n = log_sigmas.len();
    // cumsum(dists >= 0).argmax(): the last index where log_sigma >= log_sigmas[i] (0 if none).
    let mut low = 0usize;
    let mut count = 0usize;
    let mut best = 0usize;
    for (i, &ls) in log_sigmas.iter().enumerate() {
        if log_sigma - ls >= 0.0 {
            count += 1;
            if count > best {
                best = count;
                low = i;
            }
        }
    }
    let low = low.min(n - 2);
    let high = low + 1;
    let (lo, hi) = (log_sigmas[low], log_sigmas[high]);
    let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * high as f64
}

/// `tensor * c` in f32 (torch multiplies by a 0-dim f32 tensor or f32-cast Python scalar).
pub fn mul_s(t: &Tensor, c: f32) -> Result<Tensor> {
    Ok(t.affine(c as f64, 0.0)?)
}

/// `tensor / c` in f32: a true division (not a multiplication by the reciprocal), as torch does.
pub fn div_s(t: &Tensor, c: f32) -> Result<Tensor> {
    let s = Tensor::new(c, t.device())?.to_dtype(t.dtype())?;
    Ok(t.broadcast_div(&s)?)
}

/// The tensor as f32 (scheduler math runs in f32 like diffusers with an f32 pipeline).
pub fn to_f32(t: &Tensor) -> Result<Tensor> {
    Ok(if t.dtype() == DType::F32 {
        t.clone()
    } else {
        t.to_dtype(DType::F32)?
    })
}

/// `randn_tensor(like.shape, generator=...)` in float32: one draw per step of the whole tensor,
/// or with a list of generators (one per image), of each image's part from its own generator.
pub fn batch_randn(like: &Tensor, rngs: &mut [TorchRng]) -> Result<Tensor> {
    let batch = like.dim(0)?;
    if rngs.len() != batch {
        return Err(PipelineError::InvalidRequest(format!(
            "{} generators for a batch of {batch}",
            rngs.len()
        )));
    }
    let per_image = like.elem_count() / batch.max(1);
    let noise: Vec<f32> = rngs.iter_mut().flat_map(|r| r.randn(per_image)).collect();
    Ok(Tensor::from_vec(noise, like.shape(), like.device())?)
}

/// DDPM-style `add_noise` at training timestep `t = timesteps[index]`:
/// `sqrt(ac[t]) * x + sqrt(1 - ac[t]) * noise`, in float32 as diffusers computes it (PNDM, DDIM).
pub fn add_noise_alphas(
    alphas_cumprod: &[f32],
    timesteps: &[f64],
    original: &Tensor,
    noise: &Tensor,
    index: usize,
) -> Result<Tensor> {
    let t = timesteps[noise_index(index, timesteps.len())?];
    let ac = *alphas_cumprod
        .get(t as usize)
        .ok_or_else(|| config_error(format!("timestep {t} is outside the training schedule")))?;
    let dtype = original.dtype();
    let x = (mul_s(&to_f32(original)?, ac.sqrt())? + mul_s(&to_f32(noise)?, (1.0 - ac).sqrt())?)?;
    Ok(x.to_dtype(dtype)?)
}

/// The timestep index `add_noise` was asked for, checked against the schedule.
pub fn noise_index(index: usize, len: usize) -> Result<usize> {
    check_index(index, len)?;
    Ok(index)
}

/// Checks a step index against the schedule length.
pub fn check_index(index: usize, len: usize) -> Result<()> {
    if index >= len {
        return Err(PipelineError::InvalidRequest(format!(
            "scheduler step {index} is past the end of its {len} timesteps"
        )));
    }
    Ok(())
}

/// Rejects a zero step count.
pub fn check_steps(n: usize) -> Result<()> {
    if n == 0 {
        return Err(PipelineError::InvalidRequest(
            "num_inference_steps must be at least 1".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn np_linspace_endpoints() {
        let v = np_linspace(0.0, 999.0, 4);
        assert_eq!(v, vec![0.0, 333.0, 666.0, 999.0]);
        assert_eq!(np_linspace(0.0, 999.0, 1), vec![0.0]);
    }

    #[test]
    fn rounding_is_half_to_even() {
        assert_eq!(np_round(2.5), 2.0);
        assert_eq!(np_round(3.5), 4.0);
        assert_eq!(np_round(-0.5), -0.0);
    }

    #[test]
    fn spacings() {
        assert_eq!(
            leading_timesteps(4, 1000, 1),
            vec![751.0, 501.0, 251.0, 1.0]
        );
        assert_eq!(
            trailing_timesteps(4, 1000),
            vec![999.0, 749.0, 499.0, 249.0]
        );
        assert_eq!(linspace_rounded_timesteps(3, 1000), vec![999.0, 500.0, 0.0]);
        // A non-integer step ratio: numpy's float arange, rounded half to even.
        assert_eq!(
            trailing_timesteps(7, 1000),
            vec![999.0, 856.0, 713.0, 570.0, 428.0, 285.0, 142.0]
        );
    }

    #[test]
    fn interp_matches_definition() {
        let xp = [0.0, 1.0, 2.0];
        let fp = [0.0, 10.0, 30.0];
        assert_eq!(
            interp(&[0.5, 1.0, 1.5, 5.0, -1.0], &xp, &fp),
            vec![5.0, 10.0, 20.0, 30.0, 0.0]
        );
    }

    #[test]
    fn sigma_to_t_inverts_log_interpolation() {
        let sigmas: Vec<f64> = (1..=10).map(|i| i as f64).collect();
        let logs: Vec<f64> = sigmas.iter().map(|s| s.ln()).collect();
        assert!((sigma_to_t(4.0, &logs) - 3.0).abs() < 1e-12);
        let mid = (4.0f64.ln() + 5.0f64.ln()) / 2.0;
        assert!((sigma_to_t(mid.exp(), &logs) - 3.5).abs() < 1e-9);
        assert_eq!(sigma_to_t(0.0, &logs), 0.0);
    }

    #[test]
    fn karras_endpoints() {
        let s = karras_sigmas(0.03, 14.6, 5);
        assert!((s[0] - 14.6).abs() < 1e-9 && (s[4] - 0.03).abs() < 1e-12);
        assert!(s.windows(2).all(|w| w[0] > w[1]));
    }
}
