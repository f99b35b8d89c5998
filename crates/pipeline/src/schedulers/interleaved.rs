//! What the second-order sigma schedulers (Heun, KDPM2, KDPM2 ancestral) share: the per-step
//! schedule their `set_timesteps` computes before interleaving (each interior entry is then used
//! twice: once by the first-order half of a step and once by its second-order half). Their noise
//! per image of a batch is `common::batch_randn`.

use super::common::{self, ResolvedConfig};
use super::{SchedulerConfig, SigmaSchedule};
use crate::Result;

/// `set_timesteps` up to the interleaving.
pub(super) struct StepSchedule {
    /// One timestep per inference step, descending: numpy's float32 spacing, or with converted
    /// sigmas `_sigma_to_t` of each sigma in float64 (not yet cast or rounded).
    pub timesteps: Vec<f64>,
    /// `concatenate([sigmas, [0.0]]).astype(float32)`: one per step plus the final zero.
    pub sigmas: Vec<f32>,
    /// `np.log` of the float32 training sigmas (float32 values).
    pub log_sigmas: Vec<f32>,
}

/// The timesteps and sigmas of `n` steps on `schedule`, as Heun's and KDPM2's `set_timesteps`
/// compute them (their `_convert_to_karras` reads no `sigma_min`/`sigma_max`; the exponential and
/// beta conversions read the keys a file carries).
pub(super) fn step_schedule(
    cfg: &SchedulerConfig,
    r: &ResolvedConfig,
    n: usize,
    schedule: SigmaSchedule,
) -> Result<StepSchedule> {
    let ac = r.alphas_cumprod()?;
    let train_sigmas = common::sigmas_from_alphas_cumprod(&ac);
    let log_sigmas: Vec<f32> = train_sigmas.iter().map(|s| s.ln()).collect();
    let mut timesteps = common::sigma_family_timesteps(r, n);
    let mut sigmas = common::interp_sigmas(&timesteps, &train_sigmas);
    let (in_min, in_max) = (sigmas[sigmas.len() - 1], sigmas[0]);
    let converted = match schedule {
        SigmaSchedule::Karras => Some(common::karras_sigmas(in_min, in_max, n)),
        other => other.convert(cfg, in_min, in_max, n),
    };
    if let Some(converted) = converted {
        sigmas = converted;
        let logs: Vec<f64> = log_sigmas.iter().map(|&l| l as f64).collect();
        timesteps = sigmas
            .iter()
            .map(|&s| common::sigma_to_t(s, &logs))
            .collect();
    }
    let mut sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
    sigmas.push(0.0);
    Ok(StepSchedule {
        timesteps,
        sigmas,
        log_sigmas,
    })
}

/// `torch.cat([x[:1], x[1:].repeat_interleave(2), x[-1:]])`.
pub(super) fn repeat_interior<T: Copy>(x: &[T]) -> Vec<T> {
    let mut out = Vec::with_capacity(2 * x.len());
    out.push(x[0]);
    for &v in &x[1..] {
        out.extend([v, v]);
    }
    out.push(x[x.len() - 1]);
    out
}

/// `sigmas.log().lerp(other.log(), 0.5).exp()` in float32 (torch's lerp at weight 0.5 is
/// `end - (end - start) * 0.5`; a zero sigma gives -inf, and -inf on both sides NaN, as in torch).
pub(super) fn log_midpoint(a: f32, b: f32) -> f32 {
    let (start, end) = (a.ln(), b.ln());
    (end - (end - start) * 0.5).exp()
}

/// `_sigma_to_t` as KDPM2 calls it for its interpolated sigmas: the sigma is a float32 torch
/// value and `log_sigmas` a float32 tensor, so the interpolation runs in float32.
pub(super) fn sigma_to_t_f32(sigma: f32, log_sigmas: &[f32]) -> f32 {
    if sigma.is_nan() {
        return f32::NAN;
    }
    let log_sigma = sigma.max(1e-10).ln();
    let n = log_sigmas.len();
    // cumsum(dists >= 0).argmax(): the last index where log_sigma >= log_sigmas[i] (0 if none).
    let low = log_sigmas
        .iter()
        .rposition(|&ls| log_sigma - ls >= 0.0)
        .unwrap_or(0)
        .min(n - 2);
    let (lo, hi) = (log_sigmas[low], log_sigmas[low + 1]);
    let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
    (1.0 - w) * low as f32 + w * (low + 1) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interior_entries_repeat() {
        assert_eq!(repeat_interior(&[3, 2, 1, 0]), vec![3, 2, 2, 1, 1, 0, 0, 0]);
        assert_eq!(repeat_interior(&[5, 0]), vec![5, 0, 0, 0]);
    }

    #[test]
    fn log_midpoint_is_the_geometric_mean_and_zero_at_zero() {
        assert!((log_midpoint(4.0, 9.0) - 6.0).abs() < 1e-5);
        assert_eq!(log_midpoint(0.0, 2.0), 0.0);
        assert!(log_midpoint(0.0, 0.0).is_nan());
    }

    #[test]
    fn cumsum_argmax_picks_the_last_crossing() {
        let logs: Vec<f32> = (1..=10).map(|i| (i as f32).ln()).collect();
        assert!((sigma_to_t_f32(4.0, &logs) - 3.0).abs() < 1e-5);
        assert_eq!(sigma_to_t_f32(0.5, &logs), 0.0);
        assert_eq!(sigma_to_t_f32(100.0, &logs), 9.0);
    }
}
