//! The `decode_latents` and `postprocess` stages: latents through the VAE to RGB8 pixels.

use candle_core::{DType, Tensor};

use super::{RgbImage, StableDiffusion};
use crate::memory::precision::{decode_checked, DecodeOutcome, Fallback};
use crate::vae::AutoencoderKlDecoder;
use crate::{PipelineError, Result};

impl StableDiffusion {
    /// `vae.decode(latents / scaling_factor)`, in `[-1, 1]`: tiled when the plan says so; a
    /// half-precision decode with NaN/Inf (the "black image") is redone in f32.
    pub fn decode_latents(&self, latents: &Tensor) -> Result<Tensor> {
        let z = (latents / self.vae_scaling_factor)?;
        let vae = self.vae_for_run(&self.vae)?;
        let mut retry = |z: &Tensor| -> Result<Tensor> {
            let vae32 = self.vae_for_run(self.vae_f32.as_ref().expect("checked below"))?;
            self.decode_with(&vae32, z)
        };
        let fallback: Option<Fallback> = if self.plan.vae_nan_retry && self.vae_f32.is_some() {
            Some(&mut retry)
        } else {
            None
        };
        let (image, outcome) = decode_checked(&z, |z| self.decode_with(&vae, z), fallback)?;
        self.last_decode_retried.store(
            outcome == DecodeOutcome::RetriedInF32,
            std::sync::atomic::Ordering::Relaxed,
        );
        Ok(image)
    }

    /// One VAE decode of `z` (already divided by the scaling factor), tiled when the plan says so
    /// and the latent is larger than a tile. Not under circular padding (`tiling`): each tile
    /// would wrap onto its own edges instead of the image's, so the image is decoded whole.
    fn decode_with(&self, vae: &AutoencoderKlDecoder, z: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = z.dims4()?;
        match self.plan.vae_tiling {
            Some(t)
                if (h > t.tile_latent || w > t.tile_latent)
                    && !crate::kernels::conv::circular_padding_on() =>
            {
                crate::memory::tiling::decode_tiled(z, t, self.vae_scale_factor, |tile| {
                    vae.decode(tile)
                })
            }
            _ => vae.decode(z),
        }
    }
}

/// `(x / 2 + 0.5).clamp(0, 1)`, then `round(x * 255)` to RGB8, as diffusers' image processor.
pub(crate) fn postprocess(image: &Tensor) -> Result<RgbImage> {
    to_rgb8(image, |x| {
        ((x / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0).round() as u8
    })
}

/// The first pass's image as A1111's hires fix makes it (`sample_hr_pass`):
/// `255. * clamp((x + 1) / 2, 0, 1)` in float32, then numpy's `astype(np.uint8)`, which
/// truncates.
pub fn postprocess_truncated(image: &Tensor) -> Result<RgbImage> {
    to_rgb8(image, |x| (255.0 * ((x + 1.0) / 2.0).clamp(0.0, 1.0)) as u8)
}

fn to_rgb8(image: &Tensor, quantize: impl Fn(f32) -> u8) -> Result<RgbImage> {
    let (_, channels, height, width) = image.dims4()?;
    if channels != 3 {
        return Err(PipelineError::InvalidRequest(format!(
            "the VAE produced {channels} channels; only RGB is supported"
        )));
    }
    let hwc = image.get(0)?.permute((1, 2, 0))?.to_dtype(DType::F32)?;
    let values = hwc.flatten_all()?.to_vec1::<f32>()?;
    Ok(RgbImage {
        width: width as u32,
        height: height as u32,
        pixels: values.into_iter().map(quantize).collect(),
    })
}
