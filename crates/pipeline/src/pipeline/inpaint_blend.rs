//! A1111's inpainting, latent side: the latent mask (`init`'s `latmask`: the processed mask
//! resized to the latent grid with Pillow's default bicubic, rounded) and the blend. A1111
//! mixes the denoiser's prediction of the clean latents with the init latents in the kept
//! region after every model evaluation (`sd_samplers_cfg_denoiser.py`: `denoised * nmask +
//! init_latent * mask`), and the samples once more after the last step (`sample`). Our
//! schedulers take the model's output, not k-diffusion's `denoised`, so the blend is made on
//! the x0 the output implies at that step and turned back into an output of the model's
//! prediction type: the same update for every scheduler.

use candle_core::{DType, Device, Tensor};

use super::RgbImage;
use crate::schedulers::common::PredictionType;
use crate::schedulers::Scheduler;
use crate::Result;

/// A1111's `latmask` as a `[1, 1, h, w]` tensor (1 = repaint), rounded when `round`.
pub(super) fn latent_mask(
    mask: &RgbImage,
    w: usize,
    h: usize,
    round: bool,
    device: &Device,
) -> Result<Tensor> {
    let values = crate::inpaint_a1111::latent_mask(mask, w, h, round);
    Ok(Tensor::from_vec(values, (1, 1, h, w), device)?)
}

/// The blend's inputs for the batch.
pub(super) struct A1111Blend {
    /// `init_latent`, `[n, c, h, w]` f32 (after "latent noise" / "latent nothing").
    pub init: Tensor,
    /// `nmask`, `[n, 1, h, w]` f32: 1 = repaint.
    pub nmask: Tensor,
    pub prediction: PredictionType,
}

/// `add_noise(x0, eps, index) = a * x0 + b * eps` for the scheduler's latents at `index`.
fn noise_coefficients(scheduler: &dyn Scheduler, index: usize) -> Result<(f64, f64)> {
    let one = Tensor::ones((1, 1, 1, 1), DType::F32, &Device::Cpu)?;
    let zero = one.zeros_like()?;
    let at = |x: &Tensor, e: &Tensor| -> Result<f64> {
        Ok(scheduler
            .add_noise(x, e, index)?
            .flatten_all()?
            .to_vec1::<f32>()?[0] as f64)
    };
    Ok((at(&one, &zero)?, at(&zero, &one)?))
}

impl A1111Blend {
    /// The model output at `timesteps()[index]` for `latents`, changed so that the clean
    /// latents it implies are A1111's `denoised * nmask + init_latent * (1 - nmask)`.
    pub(super) fn blend_prediction(
        &self,
        output: &Tensor,
        latents: &Tensor,
        scheduler: &dyn Scheduler,
        index: usize,
    ) -> Result<Tensor> {
        let (a, b) = noise_coefficients(scheduler, index)?;
        if a == 0.0 || b == 0.0 {
            return Ok(output.clone());
        }
        let dtype = output.dtype();
        let out = output.to_dtype(DType::F32)?;
        let x = latents.to_dtype(DType::F32)?;
        let norm = (a * a + b * b).sqrt();
        let (alpha, sigma) = (a / norm, b / norm);
        // The clean latents the output implies (latents = a * x0 + b * eps).
        let x0 = match self.prediction {
            PredictionType::Epsilon => ((&x - (&out * b)?)? / a)?,
            PredictionType::VPrediction => (((&x / norm)? * alpha)? - (&out * sigma)?)?,
            PredictionType::Sample => out.clone(),
        };
        let keep = self.nmask.affine(-1.0, 1.0)?;
        let blended = (x0.broadcast_mul(&self.nmask)? + self.init.broadcast_mul(&keep)?)?;
        let eps = ((&x - (&blended * a)?)? / b)?;
        let result = match self.prediction {
            PredictionType::Epsilon => eps,
            PredictionType::VPrediction => ((&eps * alpha)? - (&blended * sigma)?)?,
            PredictionType::Sample => blended,
        };
        Ok(result.to_dtype(dtype)?)
    }

    /// `samples * nmask + init_latent * mask` after the last step.
    pub(super) fn blend_samples(&self, latents: &Tensor) -> Result<Tensor> {
        let dtype = latents.dtype();
        let keep = self.nmask.affine(-1.0, 1.0)?;
        let out = (latents.to_dtype(DType::F32)?.broadcast_mul(&self.nmask)?
            + self.init.broadcast_mul(&keep)?)?;
        Ok(out.to_dtype(dtype)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedulers::{build, SchedulerConfig, SchedulerKind};

    /// Where the mask keeps everything, the output's x0 is the init latents exactly; where it
    /// repaints everything, the output is unchanged.
    #[test]
    fn the_blend_replaces_the_kept_regions_x0_for_every_prediction_type() -> Result<()> {
        let dev = Device::Cpu;
        for prediction in ["epsilon", "v_prediction"] {
            let cfg = SchedulerConfig {
                prediction_type: Some(prediction.into()),
                ..Default::default()
            };
            for kind in [
                SchedulerKind::from_name("euler").unwrap(),
                SchedulerKind::from_name("ddim").unwrap(),
            ] {
                let s = build(kind, &kind.config(&cfg), 10)?;
                let x = Tensor::arange(0f32, 8.0, &dev)?.reshape((1, 2, 2, 2))?;
                let out = (Tensor::ones((1, 2, 2, 2), DType::F32, &dev)? * 0.3)?;
                let init = (Tensor::ones((1, 2, 2, 2), DType::F32, &dev)? * -0.7)?;
                let nmask = Tensor::from_vec(vec![1f32, 0.0, 1.0, 0.0], (1, 1, 2, 2), &dev)?;
                let p = PredictionType::parse(prediction)?;
                let blend = A1111Blend {
                    init: init.clone(),
                    nmask,
                    prediction: p,
                };
                let got = blend.blend_prediction(&out, &x, s.as_ref(), 3)?;
                let (a, b) = noise_coefficients(s.as_ref(), 3)?;
                let norm = (a * a + b * b).sqrt();
                let got = got.flatten_all()?.to_vec1::<f32>()?;
                let want_out = out.flatten_all()?.to_vec1::<f32>()?;
                let xs = x.flatten_all()?.to_vec1::<f32>()?;
                for (i, (&g, &o)) in got.iter().zip(&want_out).enumerate() {
                    let repaint = (i % 4) % 2 == 0;
                    if repaint {
                        assert!((g - o).abs() < 1e-5, "{prediction} {kind}: {g} vs {o}");
                    } else {
                        let x0 = match p {
                            PredictionType::Epsilon => (xs[i] as f64 - b * g as f64) / a,
                            _ => (a / norm) * xs[i] as f64 / norm - (b / norm) * g as f64,
                        };
                        assert!((x0 + 0.7).abs() < 1e-4, "{prediction} {kind}: x0 {x0}");
                    }
                }
            }
        }
        Ok(())
    }
}
