//! A1111's inpainting, latent side: the latent mask (`init`'s `latmask`: the processed mask
//! resized to the latent grid with Pillow's default bicubic, rounded) and the blend. A1111
//! mixes the denoiser's prediction of the clean latents with the init latents in the kept
//! region after every model evaluation (`sd_samplers_cfg_denoiser.py`: `denoised * nmask +
//! init_latent * mask`), and the samples once more after the last step (`sample`). Our
//! schedulers take the model's output, not k-diffusion's `denoised`, so the blend is made on
//! the x0 the output implies at that step and turned back into an output of the model's
//! prediction type: the same update for every scheduler.
//!
//! A1111's timestep samplers (DDIM, DDIM CFG++, PLMS, UniPC: `CFGDenoiserTimesteps`'s
//! `mask_before_denoising`) blend the model's input instead, the sample with the clean init
//! latents (`x * nmask + init_latent * mask`), and leave the prediction as it is; the sampler
//! steps from its own, unblended sample with that epsilon.

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

    /// The model output computed on `evaluated` (the blended input) as an output for `latents`
    /// with the same epsilon: A1111's timestep denoisers hand their samplers epsilon, a
    /// v-prediction's taken on the model's input (`CompVisTimestepsVDenoiser`), and our
    /// schedulers read a non-epsilon output against their own sample.
    pub(super) fn carry_output(
        &self,
        output: Tensor,
        evaluated: &Tensor,
        latents: &Tensor,
        scheduler: &dyn Scheduler,
        index: usize,
    ) -> Result<Tensor> {
        // The factor of `evaluated - latents` that moves the output.
        let factor = |(a, b): (f64, f64)| match self.prediction {
            PredictionType::Epsilon => None,
            // eps = alpha * v + sigma * x / norm: v moves by sigma / alpha * (x_in - x) / norm.
            PredictionType::VPrediction => Some(b / a / (a * a + b * b).sqrt()),
            // eps = (x - a * x0) / b: x0 moves by (x - x_in) / a.
            PredictionType::Sample => Some(-1.0 / a),
        };
        if self.prediction == PredictionType::Epsilon {
            return Ok(output);
        }
        let Some(factor) = factor(noise_coefficients(scheduler, index)?).filter(|f| f.is_finite())
        else {
            return Ok(output);
        };
        let shift = (evaluated.to_dtype(DType::F32)? - latents.to_dtype(DType::F32)?)?;
        let result = (output.to_dtype(DType::F32)? + (shift * factor)?)?;
        Ok(result.to_dtype(output.dtype())?)
    }

    /// `latents * nmask + init_latent * mask`: the samples after the last step, and on A1111's
    /// timestep samplers the model's input before every evaluation.
    pub(super) fn blend_latents(&self, latents: &Tensor) -> Result<Tensor> {
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

    /// Carried to the unblended latents, a v or sample output implies the epsilon it implied on
    /// the blended input (what A1111's timestep denoisers hand their samplers); epsilon stays.
    #[test]
    fn a_carried_output_keeps_the_epsilon_of_the_blended_input() -> Result<()> {
        let dev = Device::Cpu;
        for prediction in ["epsilon", "v_prediction", "sample"] {
            let cfg = SchedulerConfig {
                prediction_type: Some(prediction.into()),
                ..Default::default()
            };
            let kind = SchedulerKind::from_name("ddim_a1111").unwrap();
            let s = build(kind, &kind.config(&cfg), 10)?;
            let (a, b) = noise_coefficients(s.as_ref(), 2)?;
            let x = Tensor::arange(0f32, 8.0, &dev)?.reshape((1, 2, 2, 2))?;
            let evaluated = (x.affine(0.5, 0.0)? - 1.0)?;
            let out = Tensor::arange(-4f32, 4.0, &dev)?.reshape((1, 2, 2, 2))?;
            let blend = A1111Blend {
                init: x.zeros_like()?,
                nmask: Tensor::ones((1, 1, 2, 2), DType::F32, &dev)?,
                prediction: PredictionType::parse(prediction)?,
            };
            let carried = blend.carry_output(out.clone(), &evaluated, &x, s.as_ref(), 2)?;
            // eps of (output, sample) with sample = a * x0 + b * eps (a^2 + b^2 = 1 here).
            let eps = |o: &Tensor, sample: &Tensor| -> Result<Vec<f32>> {
                let e = match blend.prediction {
                    PredictionType::Epsilon => o.clone(),
                    PredictionType::VPrediction => ((o * a)? + (sample * b)?)?,
                    PredictionType::Sample => ((sample - (o * a)?)? / b)?,
                };
                Ok(e.flatten_all()?.to_vec1::<f32>()?)
            };
            let (got, want) = (eps(&carried, &x)?, eps(&out, &evaluated)?);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-4, "{prediction}: {got:?} vs {want:?}");
            }
        }
        Ok(())
    }
}
