//! The sd-webui-controlnet extension's inpaint modules in the pipeline (`inpaint`, its
//! inpaint_global_harmonious, and `inpaint_only`). A unit's feed is RGBA: the image and, in
//! alpha, its mask, resized together to the ControlNet's size and thresholded there (`> 127`,
//! `detectmap_proc`). Every ControlNet fed four channels sees `c * (1 - m) - m` (hook.py's
//! "ControlNet inpaint protocol", m = mask > 0.5): the masked pixels at -1.
//!
//! `inpaint_only` also restores the prediction outside the mask after every UNet evaluation
//! (hook.py's "Post-processing for restore", on every step of the pass whatever the unit's
//! window): the UNet input's x0 for its output, blended with the VAE latents of the image
//! (`used_hint_cond_latent`) through the mask max-pooled to the latent grid (kernel 10, stride
//! 8, padding 1), turned back into an output and mixed by the unit's weight clipped to [0, 1];
//! the output is read as a noise prediction whatever the model predicts, as the extension
//! reads it. After decoding, each image outside the mask (dilated and box-blurred by
//! `control_net_inpaint_blur_sigma`, 7) is the image's (controlnet.py's
//! `inpaint_only_post_processing`). On inpainting with the request's own mask it falls back
//! to `inpaint`, as the extension does on A1111's img2img inpainting.

use candle_core::{DType, Device, Tensor};

use super::control::{ControlPass, MaskedCrop};
use super::{GenerationParams, RgbImage, StableDiffusion};
use crate::controlnet::preprocess::Preprocessor;
use crate::controlnet::ControlNetUnit;
use crate::image_in::resize_lanczos;
use crate::Result;

/// The extension's `control_net_inpaint_blur_sigma` default: the post-processing's dilation
/// and box blur size.
const BLUR_SIGMA: usize = 7;

/// A unit's image and mask for a pass: the image (its hires image in the hires pass) and the
/// mask fitted to `params`' size as the ControlNet sees them (cropped as "only masked"
/// crops the init image where the unit says so); the mask's pixels, true = repaint.
pub(super) fn fitted_feed(
    unit: &ControlNetUnit,
    pass: ControlPass,
    crop: Option<MaskedCrop>,
    params: &GenerationParams,
) -> (RgbImage, Option<Vec<bool>>) {
    let (w, h) = (params.width, params.height);
    let hires = pass == ControlPass::Hires;
    let image = match (hires, &unit.hires_image) {
        (true, Some(i)) => i,
        _ => &unit.image,
    };
    let mask = match (hires, &unit.hires_mask) {
        (true, Some(m)) => Some(m),
        _ => unit.mask.as_ref(),
    };
    let fit = |i: &RgbImage| match crop {
        Some(c) if unit.inpaint_crop => c.apply(i, w, h),
        _ => resize_lanczos(i, w, h),
    };
    let mask = mask.map(|m| fit(m).pixels.chunks_exact(3).map(|p| p[0] > 127).collect());
    (fit(image), mask)
}

/// The control image the ControlNet is fed (`[1, 3, h, w]`): the RGB in [0, 1], the masked
/// pixels at -1 (`c * (1 - m) - m`).
pub(super) fn hint(image: &RgbImage, mask: Option<&[bool]>) -> Result<Tensor> {
    let (w, h) = (image.width as usize, image.height as usize);
    let plane = w * h;
    let mut chw = vec![0f32; 3 * plane];
    for (i, px) in image.pixels.chunks_exact(3).enumerate() {
        let masked = mask.is_some_and(|m| m[i]);
        for c in 0..3 {
            chw[c * plane + i] = match masked {
                true => -1.0,
                false => px[c] as f32 / 255.0,
            };
        }
    }
    Ok(Tensor::from_vec(chw, (1, 3, h, w), &Device::Cpu)?)
}

/// Whether a unit runs `inpaint_only`'s restore and post-processing in this request: not for
/// `inpaint_only` on inpainting with the request's own mask (the extension's fallback to
/// `inpaint`, which compares the module's name exactly: `inpaint_only+lama` keeps them).
pub(super) fn restores(unit: &ControlNetUnit, params: &GenerationParams) -> bool {
    let inpainting = params.init_image.as_ref().is_some_and(|i| i.mask.is_some());
    match unit.preprocessor {
        Some(Preprocessor::InpaintOnly) => !inpainting,
        Some(p) => p.restores(),
        None => false,
    }
}

/// One `inpaint_only` unit's restore: its weight clipped to [0, 1], the mask on the latent
/// grid (`[1, 1, h, w]`, 1 = repaint) and the image's latents (`[1, c, h, w]`), f32.
pub(super) struct Restore {
    weight: f64,
    mask: Tensor,
    latents: Tensor,
}

impl Restore {
    /// The image's latents (`used_hint_cond_latent`).
    pub(super) fn latents(&self) -> &Tensor {
        &self.latents
    }
}

impl StableDiffusion {
    /// The restore of a unit's fitted image and mask: the latents the extension's
    /// `call_vae_using_process` makes (`image * 2 - 1` through the VAE encoder, times the
    /// scaling factor; the distribution's mean, where A1111 draws a sample from torch's
    /// global generator, which no seed fixes).
    pub(super) fn restore_of(
        &self,
        unit: &ControlNetUnit,
        image: &RgbImage,
        mask: &[bool],
    ) -> Result<Restore> {
        let (w, h) = (image.width as usize, image.height as usize);
        let x = crate::image_in::image_tensor(image, w, h, &self.device)?;
        let dist = self.encode_images(&[&x])?;
        let latents = (dist[0].mean.to_dtype(DType::F32)? * self.vae_scaling_factor)?;
        let f = self.vae_scale_factor;
        let mask = Tensor::from_vec(
            max_pool_mask(mask, w, h, f),
            (1, 1, h / f, w / f),
            &self.device,
        )?;
        Ok(Restore {
            weight: unit.scale.clamp(0.0, 1.0),
            mask,
            latents: latents.to_device(&self.device)?,
        })
    }
}

/// `max_pool2d(mask, (f + 2, f + 2), stride=f, padding=1)` (the extension's 10, 8, 1 for a
/// factor of 8): a latent cell repaints where any pixel of its cell or the ring around it does.
fn max_pool_mask(mask: &[bool], w: usize, h: usize, f: usize) -> Vec<f32> {
    let (lw, lh) = (w / f, h / f);
    let mut out = vec![0f32; lw * lh];
    for (cy, row) in out.chunks_exact_mut(lw).enumerate() {
        let ys = (cy * f).saturating_sub(1)..(cy * f + f + 1).min(h);
        for (cx, v) in row.iter_mut().enumerate() {
            let xs = (cx * f).saturating_sub(1)..(cx * f + f + 1).min(w);
            let any = ys.clone().any(|y| xs.clone().any(|x| mask[y * w + x]));
            *v = if any { 1.0 } else { 0.0 };
        }
    }
    out
}

/// The UNet output `out` for the input `x` (its first `c` channels the scaled latents, `c` the
/// restore latents' channels) after every restore in turn: `sigma` is the training noise
/// level at the timestep rounded (`sqrt(1 / ac - 1)`; `sqrt(1 / ac)` is `sqrt(1 + sigma²)`).
pub(super) fn restore(
    restores: &[Restore],
    x: &Tensor,
    out: &Tensor,
    sigma: f64,
) -> Result<Tensor> {
    if restores.is_empty() || sigma <= 0.0 {
        return Ok(out.clone());
    }
    let dtype = out.dtype();
    let mut h = out.to_dtype(DType::F32)?;
    let c = restores[0].latents.dim(1)?;
    let xt = x.narrow(1, 0, c)?.to_dtype(DType::F32)?;
    let recip = (1.0 + sigma * sigma).sqrt();
    let scaled = (&xt * recip)?;
    for r in restores {
        let x0_pred = (&scaled - (&h * sigma)?)?;
        let keep = r.mask.affine(-1.0, 1.0)?;
        let x0 = x0_pred
            .broadcast_mul(&r.mask)?
            .broadcast_add(&r.latents.broadcast_mul(&keep)?)?;
        let eps = ((&scaled - x0)? / sigma)?;
        h = ((eps * r.weight)? + (&h * (1.0 - r.weight))?)?;
    }
    Ok(h.to_dtype(dtype)?)
}

/// The post-processing's feeds: each restoring unit's final image and mask (the hires pass's
/// after one, the extension's `hr_control`), fitted as the ControlNet sees them.
pub(super) fn post_feeds(
    params: &GenerationParams,
    pass: ControlPass,
    crop: Option<MaskedCrop>,
) -> Vec<(RgbImage, Vec<f32>)> {
    params
        .controlnets
        .iter()
        .filter(|u| restores(u, params))
        .filter_map(|unit| {
            let (image, mask) = fitted_feed(unit, pass, crop, params);
            let (w, h) = (image.width as usize, image.height as usize);
            Some((image, blurred_mask(&mask?, w, h)))
        })
        .collect()
}

/// `cv2.blur(cv2.dilate(m, ones((s, s))), (s, s))` on the 0/1 mask: the dilation's border
/// adds nothing, the normalised box filter reflects (BORDER_REFLECT_101), summing in f64.
fn blurred_mask(mask: &[bool], w: usize, h: usize) -> Vec<f32> {
    let s = BLUR_SIGMA;
    let (before, after) = (s / 2, s - 1 - s / 2);
    let dilated: Vec<f64> = (0..h * w)
        .map(|i| {
            let (y, x) = (i / w, i % w);
            let ys = y.saturating_sub(before)..(y + after + 1).min(h);
            let xs = x.saturating_sub(before)..(x + after + 1).min(w);
            let any = ys.clone().any(|yy| xs.clone().any(|xx| mask[yy * w + xx]));
            if any {
                1.0
            } else {
                0.0
            }
        })
        .collect();
    let reflect = |i: isize, n: usize| -> usize {
        let n = n as isize;
        if n == 1 {
            return 0;
        }
        let mut i = i;
        while i < 0 || i >= n {
            i = if i < 0 { -i } else { 2 * n - 2 - i };
        }
        i as usize
    };
    let area = (s * s) as f64;
    (0..h * w)
        .map(|i| {
            let (y, x) = ((i / w) as isize, (i % w) as isize);
            let mut sum = 0.0;
            for dy in -(before as isize)..=(after as isize) {
                let yy = reflect(y + dy, h);
                for dx in -(before as isize)..=(after as isize) {
                    sum += dilated[yy * w + reflect(x + dx, w)];
                }
            }
            (sum / area) as f32
        })
        .collect()
}

/// A decoded image (`[1, 3, h, w]` in [-1, 1]) to [0, 1] RGB floats (HWC), clamped as A1111
/// hands them to `postprocess_batch`, with each feed's image put back outside its mask:
/// `m * x + (1 - m) * image`, clipped; `None` for a feed of another size (the extension logs
/// the mismatch and leaves the image).
pub(super) fn post_process(decoded: &Tensor, feeds: &[(RgbImage, Vec<f32>)]) -> Result<Vec<f32>> {
    let hwc = decoded.get(0)?.permute((1, 2, 0))?.to_dtype(DType::F32)?;
    let (h, w, _) = hwc.dims3()?;
    let mut x: Vec<f32> = hwc
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(|v| ((v + 1.0) / 2.0).clamp(0.0, 1.0))
        .collect();
    for (image, mask) in feeds {
        if (image.width as usize, image.height as usize) != (w, h) {
            continue;
        }
        for (i, v) in x.iter_mut().enumerate() {
            let m = mask[i / 3];
            let r = image.pixels[i] as f32 / 255.0;
            *v = (m * *v + (1.0 - m) * r).clamp(0.0, 1.0);
        }
    }
    Ok(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_latent_mask_is_the_extensions_max_pool() {
        // One masked pixel at (9, 9) of 32 x 32: cells whose 10-wide window (from 8c - 1)
        // holds it, c = 1 only (rows and columns 7..=16).
        let mut mask = vec![false; 32 * 32];
        mask[9 * 32 + 9] = true;
        let m = max_pool_mask(&mask, 32, 32, 8);
        let on: Vec<usize> = (0..16).filter(|&i| m[i] == 1.0).collect();
        assert_eq!(on, vec![5]);
        // At (8, 16): the windows of cells 0 (rows -1..=8) and 1 (7..=16) in y; 1 and 2 in x.
        let mut mask = vec![false; 32 * 32];
        mask[8 * 32 + 16] = true;
        let m = max_pool_mask(&mask, 32, 32, 8);
        let on: Vec<usize> = (0..16).filter(|&i| m[i] == 1.0).collect();
        assert_eq!(on, vec![1, 2, 5, 6]);
    }

    #[test]
    fn the_post_processing_mask_is_dilated_then_box_blurred() {
        let (w, h) = (16, 12);
        let mut mask = vec![false; w * h];
        mask[5 * w + 8] = true;
        let m = blurred_mask(&mask, w, h);
        // The dilation: columns 5..=11, rows 2..=8; the blur of that is 1 at its centre, 6/7
        // at (9, 5) (its box's columns 6..=12, six in the square), 0 at column 15 (columns
        // 12..=15 and their reflections 14, 13, 12).
        assert_eq!(m[5 * w + 8], 1.0);
        assert_eq!(m[5 * w + 9], (42.0f64 / 49.0) as f32);
        assert_eq!(m[5 * w + 15], 0.0);
        assert!(blurred_mask(&vec![false; w * h], w, h)
            .iter()
            .all(|&v| v == 0.0));
    }
}
