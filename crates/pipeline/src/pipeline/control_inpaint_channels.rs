//! An inpainting (9-channel) UNet under a ControlNet inpaint unit: the sd-webui-controlnet
//! extension's "inpaint hijack" (scripts/hook.py, "Replace x_t to support inpaint models").
//! On every UNet evaluation (both guidance halves, every step, inside the unit's guidance
//! window or not, in every pass) the UNet's mask and masked-image channels are replaced by the
//! unit's own: its mask (`> 0.5`) max-pooled to the latent grid, and the VAE latents of its
//! image in [-1, 1] with the masked pixels zeroed. With several such units the last one's
//! stand.

use candle_core::{DType, Tensor};

use super::{RgbImage, StableDiffusion};
use crate::Result;

impl StableDiffusion {
    /// `[1, 1 + latent channels, h / f, w / f]`: the unit's mask and masked-image latents for
    /// an inpainting UNet (`image` and `mask` fitted to the pass's size; true = repaint). The
    /// latents are the VAE distribution's mean times the scaling factor: the extension samples
    /// them from torch's global generator, which no seed fixes (as for `inpaint_only`'s
    /// restore).
    pub(super) fn unit_inpaint_channels(&self, image: &RgbImage, mask: &[bool]) -> Result<Tensor> {
        let (w, h) = (image.width as usize, image.height as usize);
        let f = self.vae_scale_factor;
        let keep: Vec<f32> = mask.iter().map(|&m| if m { 0.0 } else { 1.0 }).collect();
        let keep = Tensor::from_vec(keep, (1, 1, h, w), &self.device)?;
        let x = crate::image_in::image_tensor(image, w, h, &self.device)?.broadcast_mul(&keep)?;
        let latents =
            (self.encode_images(&[&x])?[0].mean.to_dtype(DType::F32)? * self.vae_scaling_factor)?;
        let pooled = Tensor::from_vec(cell_max(mask, w, h, f), (1, 1, h / f, w / f), &self.device)?;
        Ok(Tensor::cat(&[&pooled, &latents], 1)?.to_dtype(self.dtype)?)
    }
}

/// `max_pool2d(mask, (f, f))` (the extension's `(8, 8)`, SD's factor; the VAE's here): a latent
/// cell is 1 where any pixel of its f x f cell repaints.
fn cell_max(mask: &[bool], w: usize, h: usize, f: usize) -> Vec<f32> {
    let (lw, lh) = (w / f, h / f);
    let mut out = vec![0f32; lw * lh];
    for (cy, row) in out.chunks_exact_mut(lw).enumerate() {
        for (cx, v) in row.iter_mut().enumerate() {
            let any = (cy * f..cy * f + f)
                .any(|y| mask[y * w + cx * f..y * w + cx * f + f].contains(&true));
            *v = if any { 1.0 } else { 0.0 };
        }
    }
    out
}

/// The UNet's input with its mask and masked-image channels replaced by `channels`
/// (`[1, c, h, w]`, broadcast over the batch); the noisy latents (the first `latent` channels)
/// kept.
pub(super) fn with_unit_channels(
    input: &Tensor,
    channels: &Tensor,
    latent: usize,
) -> Result<Tensor> {
    let (n, _, h, w) = input.dims4()?;
    let c = channels.dim(1)?;
    let channels = channels
        .to_dtype(input.dtype())?
        .broadcast_as((n, c, h, w))?;
    Ok(Tensor::cat(
        &[&input.narrow(1, 0, latent)?, &channels.contiguous()?],
        1,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cell_repaints_where_any_of_its_pixels_does() {
        // 4x4 pixels, f 2: one masked pixel in the top-right cell, the bottom-left cell full.
        let mut mask = vec![false; 16];
        mask[3] = true;
        for i in [8, 9, 12, 13] {
            mask[i] = true;
        }
        assert_eq!(cell_max(&mask, 4, 4, 2), vec![0.0, 1.0, 1.0, 0.0]);
    }

    #[test]
    fn the_unit_channels_replace_all_but_the_latents() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let input = Tensor::arange(0f32, 2.0 * 9.0 * 4.0, &dev)?.reshape((2, 9, 2, 2))?;
        let channels = Tensor::full(-1f32, (1, 5, 2, 2), &dev)?;
        let out = with_unit_channels(&input, &channels, 4)?;
        assert_eq!(out.dims4()?, (2, 9, 2, 2));
        assert_eq!(
            out.narrow(1, 0, 4)?.flatten_all()?.to_vec1::<f32>()?,
            input.narrow(1, 0, 4)?.flatten_all()?.to_vec1::<f32>()?
        );
        let rest = out.narrow(1, 4, 5)?.flatten_all()?.to_vec1::<f32>()?;
        assert!(rest.iter().all(|&v| v == -1.0));
        Ok(())
    }
}
