//! The UNet's time embedding: diffusers' sinusoidal `Timesteps` and `TimestepEmbedding` (with
//! the guidance-distilled models' `cond_proj`).

use candle_core::{DType, Tensor};
use candle_nn::Linear;

use super::blocks::Act;

/// diffusers' `get_timestep_embedding` max_period for `Timesteps` (not a config key).
const TIMESTEP_MAX_PERIOD: f64 = 10000.0;

/// Sinusoidal timestep embedding `[B, dim]` in f32, as diffusers' `get_timestep_embedding`
/// (`scale` 1, `max_period` 10000): frequencies `exp(-ln(max_period) * i / (half - shift))`,
/// `[sin, cos]` (or `[cos, sin]` with `flip_sin_to_cos`), zero-padded to an odd `dim`.
pub fn timestep_embedding(
    timesteps: &Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
    downscale_freq_shift: f64,
) -> candle_core::Result<Tensor> {
    let half = dim / 2;
    // Computed in f32 step by step, as torch does for the float32 arange.
    let neg_log = -(TIMESTEP_MAX_PERIOD.ln()) as f32;
    let denom = (half as f64 - downscale_freq_shift) as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|i| (neg_log * i as f32 / denom).exp())
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), timesteps.device())?;
    let t = timesteps.to_dtype(DType::F32)?.unsqueeze(1)?;
    let args = t.broadcast_mul(&freqs)?;
    let (sin, cos) = (args.sin()?, args.cos()?);
    let emb = if flip_sin_to_cos {
        Tensor::cat(&[cos, sin], 1)?
    } else {
        Tensor::cat(&[sin, cos], 1)?
    };
    if dim % 2 == 1 {
        emb.pad_with_zeros(1, 0, 1)
    } else {
        Ok(emb)
    }
}

/// diffusers `TimestepEmbedding`: `cond_proj(condition)` added to the sinusoids when the model
/// has one (guidance-distilled UNets, `time_cond_proj_dim`), linear, activation, linear, optional
/// post activation.
#[derive(Debug, Clone)]
pub(super) struct TimestepEmbedding {
    pub(super) cond_proj: Option<Linear>,
    pub(super) linear_1: Linear,
    pub(super) act: Act,
    pub(super) linear_2: Linear,
    pub(super) post_act: Option<Act>,
}

impl TimestepEmbedding {
    /// `condition`: the `timestep_cond` input, used only by a model with `cond_proj` (diffusers
    /// ignores it otherwise, as it ignores a missing one).
    pub(super) fn forward(
        &self,
        x: &Tensor,
        condition: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        use crate::kernels::dense::linear_forward;
        let x = match (&self.cond_proj, condition) {
            (Some(proj), Some(c)) => (x + linear_forward(proj, &c.to_dtype(x.dtype())?)?)?,
            _ => x.clone(),
        };
        let h = self.act.forward(&linear_forward(&self.linear_1, &x)?)?;
        let h = linear_forward(&self.linear_2, &h)?;
        match self.post_act {
            Some(a) => a.forward(&h),
            None => Ok(h),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn timestep_embedding_matches_formula() -> candle_core::Result<()> {
        let t = Tensor::new(&[0f32, 1.0, 999.0], &Device::Cpu)?;
        let dim = 8;
        let e = timestep_embedding(&t, dim, true, 1.0)?;
        assert_eq!(e.dims(), &[3, 8]);
        let e = e.to_vec2::<f32>()?;
        for (row, tv) in e.iter().zip([0f64, 1.0, 999.0]) {
            for i in 0..4 {
                let f = (-(10000f64.ln()) * i as f64 / (4.0 - 1.0)).exp();
                assert!((row[i] as f64 - (tv * f).cos()).abs() < 1e-3, "{row:?}");
                assert!((row[i + 4] as f64 - (tv * f).sin()).abs() < 1e-3, "{row:?}");
            }
        }
        // Not flipped: sin first; odd dims get a zero pad column.
        let e = timestep_embedding(&t, 7, false, 0.0)?.to_vec2::<f32>()?;
        assert_eq!(e[1].len(), 7);
        assert!((e[1][0] - 1f32.sin()).abs() < 1e-6);
        assert_eq!(e[2][6], 0.0);
        Ok(())
    }
}
