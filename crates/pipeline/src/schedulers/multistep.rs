//! What DPMSolverMultistep and UniPCMultistep of diffusers 0.42.1 share: `set_timesteps` (they
//! build timesteps and sigmas the same way), the data/noise prediction conversion, the
//! alpha/sigma/lambda scalars in torch's 0-d float32 arithmetic, and the step counter.

use candle_core::Tensor;

use super::common::{
    self, config_error, div_s as div, mul_s as mul, ClassDefaults, PredictionType, TimestepSpacing,
};
use super::{torch_math, SchedulerConfig, SigmaSchedule};
use crate::{PipelineError, Result};

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
        schedule: SigmaSchedule,
        final_sigma_zero: bool,
        family: Family,
    ) -> Result<Self> {
        let karras = schedule == SigmaSchedule::Karras;
        common::check_steps(n)?;
        refuse_unsupported(cfg, family)?;
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
        } else if let Some(conv) = schedule.convert(
            cfg,
            train_sigmas[0] as f64,
            train_sigmas[train - 1] as f64,
            n,
        ) {
            // Exponential and beta: `_sigma_to_t` not rounded, then `.to(torch.int64)` truncates.
            let log_sigmas: Vec<f32> = train_sigmas.iter().map(|s| s.ln()).collect();
            let ts = conv
                .iter()
                .map(|&s| sigma_to_t_f32(s, &log_sigmas).trunc())
                .collect();
            (ts, conv.iter().map(|&s| s as f32).collect())
        } else {
            // DPM's lambda_min_clipped ends the schedule at `last` (the whole one by default).
            let last = clipped_last_timestep(cfg, &r, family)?;
            let ts: Vec<f64> = match r.timestep_spacing {
                TimestepSpacing::Linspace => {
                    // np.linspace(0, last - 1, n + 1).round()[::-1][:-1]
                    let pts = common::np_linspace(0.0, (last - 1) as f64, n + 1);
                    pts.iter()
                        .rev()
                        .take(n)
                        .map(|&v| common::np_round(v))
                        .collect()
                }
                TimestepSpacing::Leading => {
                    // (arange(0, n + 1) * (last // (n + 1)))[::-1][:-1] + steps_offset
                    let ratio = last / (n + 1);
                    (1..=n)
                        .rev()
                        .map(|i| (i * ratio + r.steps_offset) as f64)
                        .collect()
                }
                TimestepSpacing::Trailing if last < train => {
                    // np.arange(last, 0, -T / n) has fewer than n steps: not a schedule the
                    // request's step count describes.
                    return Err(config_error(
                        "lambda_min_clipped with trailing timestep spacing is not supported",
                    ));
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
        } else if schedule != SigmaSchedule::Uniform && family == Family::UniPc {
            // UniPC's karras, exponential and beta branches repeat their own last sigma.
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

/// Keys of these classes that change the schedule or the model's output in ways we do not
/// implement: an error naming the key, never a silently different image. A key only the other
/// class declares is ignored, as that class's code never reads it (`from_config` keeps it).
pub(crate) fn refuse_unsupported(cfg: &SchedulerConfig, family: Family) -> Result<()> {
    let dpm = family == Family::Dpm;
    let set = [
        ("use_lu_lambdas", dpm && cfg.use_lu_lambdas == Some(true)),
        ("use_flow_sigmas", cfg.use_flow_sigmas == Some(true)),
        (
            "use_dynamic_shifting",
            cfg.use_dynamic_shifting == Some(true),
        ),
        ("variance_type", dpm && cfg.variance_type.is_some()),
        ("shift_terminal", !dpm && cfg.shift_terminal.is_some()),
    ];
    match set.iter().find(|(_, on)| *on) {
        Some((key, _)) => Err(config_error(format!("{key} is not supported"))),
        None => Ok(()),
    }
}

/// DPMSolverMultistep's `lambda_min_clipped`: `T - searchsorted(flip(lambda_t), clip)`, so the
/// schedule leaves out the noisiest timesteps, whose log-SNR `lambda_t` is below the clip. Its
/// default -inf (what a saved config holds) keeps all `T`; UniPC has no such key.
fn clipped_last_timestep(
    cfg: &SchedulerConfig,
    r: &common::ResolvedConfig,
    family: Family,
) -> Result<usize> {
    let train = r.num_train_timesteps;
    let clip = match cfg.lambda_min_clipped {
        Some(c) if family == Family::Dpm && c != f64::NEG_INFINITY => c,
        _ => return Ok(train),
    };
    let mut ac = r.alphas_cumprod()?;
    if r.rescale_betas_zero_snr {
        // As DPM's __init__: a zero last alphas_cumprod is replaced before lambda_t is taken.
        ac[train - 1] = 2f32.powi(-24);
    }
    // torch's float32: log(sqrt(ac)) - log(sqrt(1 - ac)), flipped to rise with the index; the
    // Python float is compared as float32 (a wrapped scalar takes the table's dtype).
    let flipped: Vec<f32> = ac
        .iter()
        .rev()
        .map(|&a| torch_math::log(a.sqrt()) - torch_math::log((1.0 - a).sqrt()))
        .collect();
    let clip32 = clip as f32;
    // searchsorted's lower bound; NaN or a clip above every lambda leaves no timestep.
    let clipped = flipped.partition_point(|&l| l < clip32);
    if clip.is_nan() || clipped >= train {
        return Err(config_error(format!(
            "lambda_min_clipped {clip} leaves no timestep to sample"
        )));
    }
    Ok(train - clipped)
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

#[cfg(test)]
mod tests {
    use super::*;

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

    fn sd15_with(key: &str, value: serde_json::Value) -> SchedulerConfig {
        let mut v = serde_json::json!({
            "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
            "beta_start": 0.00085, "beta_end": 0.012
        });
        if !key.is_empty() {
            v[key] = value;
        }
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn keys_we_do_not_run_are_errors_naming_them() {
        let base = sd15_with("", serde_json::Value::Null);
        for family in [Family::Dpm, Family::UniPc] {
            let ok = MultistepSchedule::new(&base, 5, SigmaSchedule::Uniform, true, family);
            assert!(ok.is_ok());
        }
        // (key, value, the family whose class reads it, or None for both)
        for (key, value, only) in [
            ("use_lu_lambdas", serde_json::json!(true), Some(Family::Dpm)),
            ("use_flow_sigmas", serde_json::json!(true), None),
            ("use_dynamic_shifting", serde_json::json!(true), None),
            (
                "variance_type",
                serde_json::json!("learned_range"),
                Some(Family::Dpm),
            ),
            (
                "shift_terminal",
                serde_json::json!(0.1),
                Some(Family::UniPc),
            ),
        ] {
            let cfg = sd15_with(key, value);
            for family in [Family::Dpm, Family::UniPc] {
                let got = MultistepSchedule::new(&cfg, 5, SigmaSchedule::Uniform, true, family);
                if only.is_none_or(|f| f == family) {
                    let err = got.err().expect(key);
                    assert!(err.to_string().contains(key), "{err}");
                } else {
                    // The other class's key: its code never reads it.
                    assert!(got.is_ok(), "{key} {family:?}");
                }
            }
        }
        // Off is fine.
        let mut off = base.clone();
        off.use_lu_lambdas = Some(false);
        off.use_flow_sigmas = Some(false);
        assert!(MultistepSchedule::new(&off, 5, SigmaSchedule::Uniform, true, Family::Dpm).is_ok());
    }

    #[test]
    fn lambda_min_clipped_minus_infinity_is_the_default() {
        let schedule = |cfg: &SchedulerConfig, family| {
            let s = MultistepSchedule::new(cfg, 7, SigmaSchedule::Uniform, true, family).unwrap();
            (s.timesteps, s.sigmas)
        };
        let base = sd15_with("", serde_json::Value::Null);
        let mut minus_inf = base.clone();
        minus_inf.lambda_min_clipped = Some(f64::NEG_INFINITY);
        let mut clipped = base.clone();
        clipped.lambda_min_clipped = Some(-2.5);
        for family in [Family::Dpm, Family::UniPc] {
            assert_eq!(schedule(&minus_inf, family), schedule(&base, family));
        }
        // UniPC has no such key; DPM starts below the noisiest timesteps.
        assert_eq!(
            schedule(&clipped, Family::UniPc),
            schedule(&base, Family::UniPc)
        );
        let (ts, _) = schedule(&clipped, Family::Dpm);
        assert!(ts[0] < 999.0, "{ts:?}");
        for bad in [f64::NAN, f64::INFINITY, 100.0] {
            let mut cfg = base.clone();
            cfg.lambda_min_clipped = Some(bad);
            let err = MultistepSchedule::new(&cfg, 7, SigmaSchedule::Uniform, true, Family::Dpm)
                .err()
                .expect("no timestep left");
            assert!(err.to_string().contains("lambda_min_clipped"), "{err}");
        }
        let mut trailing = clipped.clone();
        trailing.timestep_spacing = Some("trailing".into());
        let err = MultistepSchedule::new(&trailing, 7, SigmaSchedule::Uniform, true, Family::Dpm)
            .err()
            .expect("trailing refused");
        assert!(err.to_string().contains("trailing"), "{err}");
        // A clip below every lambda clips nothing, trailing or not.
        trailing.lambda_min_clipped = Some(-100.0);
        trailing.timestep_spacing = Some("trailing".into());
        assert!(
            MultistepSchedule::new(&trailing, 7, SigmaSchedule::Uniform, true, Family::Dpm).is_ok()
        );
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
}
