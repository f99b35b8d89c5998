//! The extension's `inpaint_only+lama` module (`scripts/preprocessor/lama_inpaint.py`,
//! `annotator/lama/__init__.py`): the masked area painted by LaMa (the network in `lama/`)
//! before the ControlNet sees the image.
//! - [`lama_inpaint`] is `LamaInpainting.__call__` on the padded RGBA image: colour / 255, the
//!   mask / 255 above 0.5 as 0 or 1, the colour zeroed under it, the mask appended; the
//!   generator; its output under the mask and the colour elsewhere, times 255, clipped and
//!   truncated to u8 (all in f32, in the reference's order).
//! - [`inpaint_only_lama`] is the preprocessor: the RGBA image (the unit's image and its mask,
//!   the mask's raw values) through `resize_image_with_pad` at 256 always (LaMa's training
//!   size; the resolution slider is hidden), LaMa, the pad removed, `cv2.resize` back to the
//!   image's size (OpenCV's default `INTER_LINEAR`: [`resize_linear`]), and
//!   `lama * a + image * (1 - a)` with the raw mask / 255 as `a` (f32, clipped, truncated).
//!   The module's RGBA result is that colour with the raw mask as its alpha.

use std::sync::Arc;

use candle_core::{Device, Tensor};

use super::networks::{lllyasviel, AnnotatorFile};
use super::resize::{resize_area, resize_image_with_pad, Padded};
use crate::pipeline::RgbImage;
use crate::{PipelineError, Result};

mod ffc;
mod fourier;

pub use ffc::LamaNetwork;

/// The file the extension loads LaMa from (`annotator/downloads/lama/`).
pub const LAMA_FILE: &str = "ControlNetLama.pth";

/// [`LamaNetwork`]'s weights file, for an [`AnnotatorNetworks`](super::AnnotatorNetworks).
pub static LAMA: AnnotatorFile = AnnotatorFile {
    name: LAMA_FILE,
    subfolder: "lama",
    hub: lllyasviel(LAMA_FILE),
    load: |path| Ok(Arc::new(LamaNetwork::load(path, &Device::Cpu)?)),
};

/// The resolution the module always runs LaMa at (`res = 256`).
pub const LAMA_RESOLUTION: u32 = 256;

/// The generator's input of a padded RGBA image (`color` and its `mask`, one value a
/// pixel): `[1, 4, H, W]`, the colour / 255 zeroed where the mask / 255 is above 0.5, then
/// that 0 or 1. Also the colour (`[3, H, W]`, / 255, zeroed) and the 0/1 mask, for the
/// composite after.
fn feed(color: &RgbImage, mask: &[u8]) -> (Vec<f32>, Vec<f32>) {
    let n = mask.len();
    let hole: Vec<f32> = mask
        .iter()
        .map(|&m| f32::from(u8::from(f32::from(m) / 255.0 > 0.5)))
        .collect();
    let mut input = vec![0f32; 4 * n];
    for c in 0..3 {
        for (i, (px, m)) in color.pixels.chunks_exact(3).zip(&hole).enumerate() {
            input[c * n + i] = f32::from(px[c]) / 255.0 * (1.0 - m);
        }
    }
    input[3 * n..].copy_from_slice(&hole);
    (input, hole)
}

/// The generator's output (`[3, H, W]`, 0..1, f32) on the padded RGBA image.
pub fn lama_output(net: &LamaNetwork, color: &RgbImage, mask: &[u8]) -> Result<Vec<f32>> {
    let (w, h) = (color.width as usize, color.height as usize);
    let (input, _) = feed(color, mask);
    let x = Tensor::from_vec(input, (1, 4, h, w), net.device())?;
    let y = net.forward(&x)?.to_device(&Device::Cpu)?;
    Ok(y.flatten_all()?.to_vec1::<f32>()?)
}

/// `LamaInpainting.__call__` of a padded RGBA image (`color`, `mask` one value a pixel): the
/// generator's colour under the mask (above 127), the image's elsewhere, 8-bit.
pub fn lama_inpaint(net: &LamaNetwork, color: &RgbImage, mask: &[u8]) -> Result<RgbImage> {
    let (input, hole) = feed(color, mask);
    let out = lama_output(net, color, mask)?;
    let n = hole.len();
    let mut pixels = vec![0u8; 3 * n];
    for (i, m) in hole.iter().enumerate() {
        for c in 0..3 {
            // `result * mask + color * (1 - mask)`, `*= 255`, clip, astype(uint8).
            let v = (out[c * n + i] * m + input[c * n + i] * (1.0 - m)) * 255.0;
            pixels[3 * i + c] = v.clamp(0.0, 255.0) as u8;
        }
    }
    Ok(RgbImage {
        width: color.width,
        height: color.height,
        pixels,
    })
}

/// The `inpaint_only+lama` preprocessor: the RGB of its RGBA result for `image` with `mask`
/// (one value a pixel, white repaints; the result's alpha is `mask` itself).
pub fn inpaint_only_lama(net: &LamaNetwork, image: &RgbImage, mask: &[u8]) -> Result<RgbImage> {
    let (padded, padded_mask) = lama_padded(image, mask)?;
    lama_finish(net, &padded, &padded_mask, image, mask)
}

/// `resize_image_with_pad(rgba, 256)`: the image and its mask (a fourth channel, resized
/// alike) padded.
pub fn lama_padded(image: &RgbImage, mask: &[u8]) -> Result<(Padded, Vec<u8>)> {
    let (w, h) = (image.width as usize, image.height as usize);
    if mask.len() != w * h {
        return Err(PipelineError::InvalidRequest(format!(
            "inpaint_only+lama: the mask has {} values for a {w}x{h} image",
            mask.len()
        )));
    }
    let padded = resize_image_with_pad(image, LAMA_RESOLUTION);
    let grey = RgbImage {
        width: image.width,
        height: image.height,
        pixels: mask.iter().flat_map(|&m| [m, m, m]).collect(),
    };
    let padded_mask = resize_image_with_pad(&grey, LAMA_RESOLUTION)
        .image
        .pixels
        .iter()
        .step_by(3)
        .copied()
        .collect();
    Ok((padded, padded_mask))
}

/// The preprocessor after its resize: LaMa on the padded RGBA, the pad removed, resized back
/// to `image`'s size, composited over `image` with the raw `mask` / 255 as alpha.
pub fn lama_finish(
    net: &LamaNetwork,
    padded: &Padded,
    padded_mask: &[u8],
    image: &RgbImage,
    mask: &[u8],
) -> Result<RgbImage> {
    let lama = lama_inpaint(net, &padded.image, padded_mask)?;
    let cropped = Padded {
        image: lama,
        ..padded.clone()
    }
    .crop_rgb();
    let (w, h) = (image.width as usize, image.height as usize);
    let back = resize_linear(&cropped, w, h);
    let pixels = back
        .pixels
        .chunks_exact(3)
        .zip(image.pixels.chunks_exact(3))
        .zip(mask)
        .flat_map(|((lama, raw), &m)| {
            let alpha = f32::from(m) / 255.0;
            std::array::from_fn::<u8, 3, _>(|c| {
                let v = f32::from(lama[c]) * alpha + f32::from(raw[c]) * (1.0 - alpha);
                v.clamp(0.0, 255.0) as u8
            })
        })
        .collect();
    Ok(RgbImage {
        width: image.width,
        height: image.height,
        pixels,
    })
}

/// `cv2.resize(image, (w, h))` (`INTER_LINEAR`, 8-bit) as OpenCV 4.10 computes it, bit for
/// bit: the same size is a copy, exactly half of each side is its 2x2 area resize, otherwise
/// 11-bit fixed-point weights (`INTER_RESIZE_COEF_SCALE` 2048) from f32 fractions, columns
/// clamped at the edges (fraction 0) and rows not (the edge row taken twice), each row's
/// weighted sum in integers, then the vectorised vertical step:
/// `((b0 * (r0 >> 4)) >> 16) + ((b1 * (r1 >> 4)) >> 16)`, `+ 2 >> 2`.
pub fn resize_linear(image: &RgbImage, w: usize, h: usize) -> RgbImage {
    let (sw, sh) = (image.width as usize, image.height as usize);
    if (sw, sh) == (w, h) {
        return image.clone();
    }
    let scale = |src: usize, dst: usize| 1.0 / (dst as f64 / src as f64);
    if scale(sw, w) == 2.0 && scale(sh, h) == 2.0 {
        return resize_area(image, w, h);
    }
    // Per destination index: the first source index, its fraction (f32, as OpenCV's).
    let taps = |src: usize, dst: usize, clamp: bool| -> Vec<(isize, [i32; 2])> {
        let s = scale(src, dst);
        (0..dst)
            .map(|d| {
                let f = ((d as f64 + 0.5) * s - 0.5) as f32;
                let mut i = f.floor() as isize;
                let mut f = f - i as f32;
                if clamp && i < 0 {
                    (i, f) = (0, 0.0);
                }
                if clamp && i >= src as isize - 1 {
                    (i, f) = (src as isize - 1, 0.0);
                }
                let q = |v: f32| (v * 2048.0).round_ties_even() as i32;
                (i, [q(1.0 - f), q(f)])
            })
            .collect()
    };
    let (xs, ys) = (taps(sw, w, true), taps(sh, h, false));
    let at = |i: isize, n: usize| i.clamp(0, n as isize - 1) as usize;
    let rows: Vec<Vec<i32>> = (0..sh)
        .map(|y| {
            let src = &image.pixels[y * sw * 3..(y + 1) * sw * 3];
            xs.iter()
                .flat_map(|&(i, [a0, a1])| {
                    let (p, q) = (at(i, sw), at(i + 1, sw));
                    std::array::from_fn::<i32, 3, _>(|c| {
                        i32::from(src[3 * p + c]) * a0 + i32::from(src[3 * q + c]) * a1
                    })
                })
                .collect()
        })
        .collect();
    let mut pixels = Vec::with_capacity(w * h * 3);
    for &(i, [b0, b1]) in &ys {
        let (r0, r1) = (&rows[at(i, sh)], &rows[at(i + 1, sh)]);
        pixels.extend(r0.iter().zip(r1).map(|(&a, &b)| {
            let v = ((b0 * (a >> 4)) >> 16) + ((b1 * (b >> 4)) >> 16);
            ((v + 2) >> 2).clamp(0, 255) as u8
        }));
    }
    RgbImage {
        width: w as u32,
        height: h as u32,
        pixels,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(w: u32, h: u32, f: impl Fn(u32, u32, u32) -> u8) -> RgbImage {
        RgbImage {
            width: w,
            height: h,
            pixels: (0..h)
                .flat_map(|y| (0..w).flat_map(move |x| (0..3).map(move |c| (x, y, c))))
                .map(|(x, y, c)| f(x, y, c))
                .collect(),
        }
    }

    #[test]
    fn the_linear_resize_keeps_flat_images_and_interpolates_between_columns() {
        let flat = image(5, 3, |_, _, c| 40 + 50 * c as u8);
        let up = resize_linear(&flat, 12, 7);
        assert!(up.pixels.chunks(3).all(|p| p == [40, 90, 140]));
        // Two columns, 0 and 200, doubled: 0, 50, 150, 200 (fractions 0.25 and 0.75).
        let two = image(2, 1, |x, _, _| if x == 0 { 0 } else { 200 });
        let up = resize_linear(&two, 4, 1);
        let row: Vec<u8> = up.pixels.iter().step_by(3).copied().collect();
        assert_eq!(row, [0, 50, 150, 200]);
    }

    #[test]
    fn the_feed_zeroes_the_colour_above_half_the_mask() {
        let color = image(3, 1, |_, _, _| 255);
        let (input, hole) = feed(&color, &[127, 128, 255]);
        assert_eq!(hole, [0.0, 1.0, 1.0]);
        assert_eq!(&input[..3], &[1.0, 0.0, 0.0]);
        assert_eq!(&input[9..], &[0.0, 1.0, 1.0]);
    }
}
