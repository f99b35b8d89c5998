//! Images into the pipeline, as diffusers' `VaeImageProcessor` prepares them: PIL's Lanczos
//! resize to the request's size, `x / 255 * 2 - 1` for init images, and for masks PIL's
//! grayscale conversion, `/ 255`, then binarised at 0.5 (white = repaint).
//!
//! The resize is PIL's `Image.resize(size, LANCZOS)` (`libImaging/Resample.c`) step for step:
//! separable (the horizontal pass first, unless the height shrinks by more than twice the
//! width: Pillow 12+), coefficients in 22-bit fixed point, each pass rounded and clipped to u8.
//! Matching it exactly keeps resized requests as close to diffusers as others.

use candle_core::{Device, Tensor};

use crate::pipeline::RgbImage;
use crate::{PipelineError, Result};

/// PIL's `PRECISION_BITS` for 8-bit images: 32 - 8 - 2.
const PRECISION_BITS: u32 = 22;
/// Lanczos-3 support (PIL's `LANCZOS` filter).
const LANCZOS_SUPPORT: f64 = 3.0;

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

fn lanczos(x: f64) -> f64 {
    if (-LANCZOS_SUPPORT..LANCZOS_SUPPORT).contains(&x) {
        sinc(x) * sinc(x / LANCZOS_SUPPORT)
    } else {
        0.0
    }
}

/// PIL's `bicubic_filter` (a = -0.5).
fn bicubic(x: f64) -> f64 {
    let a = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * a
    } else {
        0.0
    }
}

/// The resampling filters PIL's `Image.resize` takes here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    Lanczos,
    /// `Image.resize`'s default for RGB and L images.
    Bicubic,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Lanczos => LANCZOS_SUPPORT,
            Filter::Bicubic => 2.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        match self {
            Filter::Lanczos => lanczos(x),
            Filter::Bicubic => bicubic(x),
        }
    }
}

/// PIL's `precompute_coeffs` + `normalize_coeffs_8bpc` for one axis of the source span
/// `in0..in1` (a box; `0..in_size` for a plain resize): per output pixel the first input index
/// and its fixed-point weights.
fn coefficients(
    in_size: usize,
    (in0, in1): (f32, f32),
    out_size: usize,
    filter: Filter,
) -> Vec<(usize, Vec<i32>)> {
    let scale = (in1 - in0) as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = filter.support() * filter_scale;
    (0..out_size)
        .map(|xx| {
            let center = in0 as f64 + (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filter_scale;
            // C casts truncate toward zero.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let weights: Vec<f64> = (xmin..xmax.max(xmin))
                .map(|x| filter.weight((x as f64 - center + 0.5) * ss))
                .collect();
            let total: f64 = weights.iter().sum();
            let fixed = weights
                .iter()
                .map(|&w| {
                    let w = if total != 0.0 { w / total } else { w };
                    let scaled = w * (1u32 << PRECISION_BITS) as f64;
                    if w < 0.0 {
                        (-0.5 + scaled) as i32
                    } else {
                        (0.5 + scaled) as i32
                    }
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

/// PIL's `clip8`: the fixed-point sum back to u8, saturating.
fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// `image.resize((width, height), Image.LANCZOS)` as Pillow computes it for RGB images.
/// Pillow 12+ (`ImagingResampleInner`) runs the vertical pass first when the height shrinks by
/// more than twice as many pixels as the width does, else the horizontal pass first; each
/// pass rounds to u8, so the order shows in the pixels.
pub fn resize_lanczos(image: &RgbImage, width: usize, height: usize) -> RgbImage {
    resize_with(image, width, height, Filter::Lanczos, None)
}

/// `image.resize((width, height), filter, box=(x0, y0, x1, y1))` as Pillow computes it for RGB
/// (and, channel by channel, L) images; `None` is the whole image. A box may be empty along
/// an axis: each output pixel then blends the source pixels around that edge (A1111's
/// `resize_image` fills its borders so).
pub fn resize_with(
    image: &RgbImage,
    width: usize,
    height: usize,
    filter: Filter,
    bbox: Option<[f32; 4]>,
) -> RgbImage {
    let (w0, h0) = (image.width as usize, image.height as usize);
    let [x0, y0, x1, y1] = bbox.unwrap_or([0.0, 0.0, w0 as f32, h0 as f32]);
    // Pillow's need_horizontal / need_vertical.
    let need_h = width != w0 || x0 != 0.0 || x1 != width as f32;
    let need_v = height != h0 || y0 != 0.0 || y1 != height as f32;
    if !need_h && !need_v {
        return image.clone();
    }
    let shrink_h = h0 as i64 - height as i64;
    let vertical_first = shrink_h > 0 && shrink_h > (w0 as i64 - width as i64) * 2;
    let horizontal = |pixels: &[u8], h: usize| {
        if need_h {
            let coeffs = coefficients(w0, (x0, x1), width, filter);
            (lanczos_horizontal(pixels, w0, h, &coeffs), width)
        } else {
            (pixels.to_vec(), w0)
        }
    };
    let vertical = |pixels: &[u8], w: usize| {
        if need_v {
            let coeffs = coefficients(h0, (y0, y1), height, filter);
            lanczos_vertical(pixels, w, &coeffs)
        } else {
            pixels.to_vec()
        }
    };
    let pixels = if vertical_first {
        let tall = vertical(&image.pixels, w0);
        horizontal(&tall, height).0
    } else {
        let (wide, w) = horizontal(&image.pixels, h0);
        vertical(&wide, w)
    };
    RgbImage {
        width: width as u32,
        height: height as u32,
        pixels,
    }
}

/// One horizontal pass of an RGB8 `w0` x `h` image through `coeffs` (one entry per output
/// column).
fn lanczos_horizontal(pixels: &[u8], w0: usize, h: usize, coeffs: &[(usize, Vec<i32>)]) -> Vec<u8> {
    let round = 1i64 << (PRECISION_BITS - 1);
    let width = coeffs.len();
    let mut out = vec![0u8; width * h * 3];
    for y in 0..h {
        let row = &pixels[y * w0 * 3..(y + 1) * w0 * 3];
        for (xx, (xmin, k)) in coeffs.iter().enumerate() {
            for c in 0..3 {
                let acc = k.iter().enumerate().fold(round, |acc, (i, &wt)| {
                    acc + row[(xmin + i) * 3 + c] as i64 * wt as i64
                });
                out[(y * width + xx) * 3 + c] = clip8(acc);
            }
        }
    }
    out
}

/// One vertical pass of an RGB8 image `w` wide through `coeffs` (one entry per output row).
fn lanczos_vertical(pixels: &[u8], w: usize, coeffs: &[(usize, Vec<i32>)]) -> Vec<u8> {
    let round = 1i64 << (PRECISION_BITS - 1);
    let height = coeffs.len();
    let mut out = vec![0u8; w * height * 3];
    for (yy, (ymin, k)) in coeffs.iter().enumerate() {
        for x in 0..w * 3 {
            let acc = k.iter().enumerate().fold(round, |acc, (i, &wt)| {
                acc + pixels[(ymin + i) * w * 3 + x] as i64 * wt as i64
            });
            out[yy * w * 3 + x] = clip8(acc);
        }
    }
    out
}

/// `image.resize((width, height), Image.NEAREST)` as Pillow computes it (`ImagingScaleAffine`:
/// the source of pixel `x` is `int(a/2 + x*a)`, `a = in/out`, summed step by step in f64).
pub fn resize_nearest(image: &RgbImage, width: usize, height: usize) -> RgbImage {
    let (w0, h0) = (image.width as usize, image.height as usize);
    if (w0, h0) == (width, height) {
        return image.clone();
    }
    let sources = |input: usize, output: usize| -> Vec<usize> {
        let a = input as f64 / output as f64;
        let mut at = a * 0.5;
        (0..output)
            .map(|_| {
                let i = (at as usize).min(input - 1);
                at += a;
                i
            })
            .collect()
    };
    let (xs, ys) = (sources(w0, width), sources(h0, height));
    let mut pixels = Vec::with_capacity(width * height * 3);
    for &y in &ys {
        for &x in &xs {
            let at = (y * w0 + x) * 3;
            pixels.extend_from_slice(&image.pixels[at..at + 3]);
        }
    }
    RgbImage {
        width: width as u32,
        height: height as u32,
        pixels,
    }
}

fn check_size(image: &RgbImage, what: &str) -> Result<()> {
    let expected = image.width as usize * image.height as usize * 3;
    if image.width == 0 || image.height == 0 || image.pixels.len() != expected {
        return Err(PipelineError::InvalidRequest(format!(
            "{what}: {}x{} image with {} bytes, expected {expected}",
            image.width,
            image.height,
            image.pixels.len()
        )));
    }
    Ok(())
}

/// The init image as the VAE takes it: resized to `width` x `height`, `[1, 3, H, W]` f32 in
/// [-1, 1] (`np.float32(x) / 255`, then `2 * x - 1`).
pub fn image_tensor(
    image: &RgbImage,
    width: usize,
    height: usize,
    device: &Device,
) -> Result<Tensor> {
    check_size(image, "init image")?;
    let image = resize_lanczos(image, width, height);
    let plane = width * height;
    let mut chw = vec![0f32; 3 * plane];
    for (i, px) in image.pixels.chunks_exact(3).enumerate() {
        for c in 0..3 {
            chw[c * plane + i] = 2.0 * (px[c] as f32 / 255.0) - 1.0;
        }
    }
    Ok(Tensor::from_vec(chw, (1, 3, height, width), device)?)
}

/// The mask as diffusers' mask processor makes it: resized like the image, PIL's RGB-to-L
/// conversion, `/ 255`, binarised (`>= 0.5` is 1 = repaint): `[1, 1, H, W]` f32 of 0 and 1.
pub fn mask_tensor(
    mask: &RgbImage,
    width: usize,
    height: usize,
    device: &Device,
) -> Result<Tensor> {
    check_size(mask, "mask image")?;
    let mask = resize_lanczos(mask, width, height);
    let values: Vec<f32> = mask
        .pixels
        .chunks_exact(3)
        .map(|px| {
            // Pillow's L24: ITU-R 601-2 luma in 16-bit fixed point, rounded.
            let l =
                (px[0] as u32 * 19595 + px[1] as u32 * 38470 + px[2] as u32 * 7471 + 0x8000) >> 16;
            if l as f32 / 255.0 >= 0.5 {
                1.0
            } else {
                0.0
            }
        })
        .collect();
    Ok(Tensor::from_vec(values, (1, 1, height, width), device)?)
}

/// A mask's grey levels as they are, Pillow's RGB-to-L `/ 255` (1 = repaint), at its own size:
/// `[1, 1, H, W]` f32. A1111's conditioning mask with `mask_round` false.
pub fn grey_mask_tensor(mask: &RgbImage, device: &Device) -> Result<Tensor> {
    let values: Vec<f32> = crate::inpaint_a1111::luma(mask)
        .into_iter()
        .map(|l| l as f32 / 255.0)
        .collect();
    let (w, h) = (mask.width as usize, mask.height as usize);
    Ok(Tensor::from_vec(values, (1, 1, h, w), device)?)
}

/// `F.interpolate(mask, size=(h, w))` (mode `nearest`): source index `floor(i * in / out)`
/// with the ratio in f32, as torch computes it.
pub fn mask_to_latent_size(mask: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (_, _, h0, w0) = mask.dims4()?;
    let index = |input: usize, output: usize| -> Result<Tensor> {
        let scale = input as f32 / output as f32;
        let idx: Vec<u32> = (0..output)
            .map(|i| ((i as f32 * scale).floor() as usize).min(input - 1) as u32)
            .collect();
        Ok(Tensor::from_vec(idx, output, mask.device())?)
    };
    Ok(mask
        .index_select(&index(h0, h)?, 2)?
        .index_select(&index(w0, w)?, 3)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(w: u32, h: u32, f: impl Fn(u32, u32, u32) -> u8) -> RgbImage {
        let mut pixels = Vec::new();
        for y in 0..h {
            for x in 0..w {
                for c in 0..3 {
                    pixels.push(f(x, y, c));
                }
            }
        }
        RgbImage {
            width: w,
            height: h,
            pixels,
        }
    }

    #[test]
    fn resize_keeps_constant_images_constant_and_same_size_untouched() {
        let flat = image(50, 35, |_, _, c| 40 + 50 * c as u8);
        let out = resize_lanczos(&flat, 32, 24);
        assert_eq!((out.width, out.height), (32, 24));
        assert!(out.pixels.chunks(3).all(|p| p == [40, 90, 140]));
        let grad = image(8, 8, |x, y, _| (x * 20 + y) as u8);
        assert_eq!(resize_lanczos(&grad, 8, 8), grad);
    }

    #[test]
    fn lanczos_coefficients_sum_to_one_in_fixed_point() {
        for (a, b) in [(50, 32), (35, 32), (16, 40)] {
            for (_, k) in coefficients(a, (0.0, a as f32), b, Filter::Lanczos) {
                let sum: i64 = k.iter().map(|&v| v as i64).sum();
                assert!(
                    (sum - (1 << PRECISION_BITS)).abs() <= k.len() as i64,
                    "{sum}"
                );
            }
        }
    }

    #[test]
    fn mask_binarises_at_half_after_grayscale() {
        let dev = Device::Cpu;
        let m = image(4, 1, |x, _, _| [0u8, 127, 128, 255][x as usize]);
        let t = mask_tensor(&m, 4, 1, &dev).unwrap();
        assert_eq!(
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [0.0, 0.0, 1.0, 1.0]
        );
        // Pure red is L = 76: kept.
        let red = image(1, 1, |_, _, c| if c == 0 { 255 } else { 0 });
        let t = mask_tensor(&red, 1, 1, &dev).unwrap();
        assert_eq!(t.flatten_all().unwrap().to_vec1::<f32>().unwrap(), [0.0]);
    }

    #[test]
    fn nearest_downsizing_takes_the_top_left_of_each_cell() {
        let dev = Device::Cpu;
        let m = Tensor::arange(0f32, 16.0, &dev)
            .unwrap()
            .reshape((1, 1, 4, 4))
            .unwrap();
        let s = mask_to_latent_size(&m, 2, 2).unwrap();
        assert_eq!(
            s.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [0.0, 2.0, 8.0, 10.0]
        );
    }
}
