//! The extension's line modules made from Gaussian differences, in f32 as it computes them
//! (`tests/integration/controlnet_preprocess_modules.rs` holds the bounds where OpenCV's float blur
//! rounds differently):
//! - `scribble_xdog` (`PreprocessorScribbleXdog`): `g1`, `g2` the image blurred with σ 0.5
//!   and 5; `dog = uint8(clip(255 - min_c(g2 - g1), 0, 255))`; white where
//!   `2 * (255 - dog) > threshold`, that product in numpy's uint8 (it wraps past 255).
//! - `lineart_standard` (the legacy `lineart_standard`): `g` the image blurred with σ 6;
//!   `intensity = clip(min_c(g - x), 0, 255)`, divided by `max(16, median of the values above
//!   8)` (over the padded image; 16 when there are none), times 127, clipped, truncated.
//!
//! Both run on the padded image and crop the pad off, as the extension does.

use super::gaussian::gaussian_blur_f32;
use super::resize::Padded;
use crate::pipeline::RgbImage;

fn as_f32(image: &RgbImage) -> Vec<f32> {
    image.pixels.iter().map(|&v| f32::from(v)).collect()
}

/// numpy's `min(axis=2)` of a 3-channel float image.
fn channel_min(pixels: &[f32]) -> Vec<f32> {
    pixels
        .chunks_exact(3)
        .map(|p| p[0].min(p[1]).min(p[2]))
        .collect()
}

/// numpy's float to uint8 cast of a value already clipped to 0..=255 (truncation).
fn to_u8(v: f32) -> u8 {
    v as u8
}

/// The `scribble_xdog` map of the padded image.
pub fn scribble_xdog(padded: &Padded, threshold: u32) -> RgbImage {
    let (w, h) = (padded.image.width as usize, padded.image.height as usize);
    let x = as_f32(&padded.image);
    let g1 = gaussian_blur_f32(&x, w, h, 0.5);
    let g2 = gaussian_blur_f32(&x, w, h, 5.0);
    let diff: Vec<f32> = g2.iter().zip(&g1).map(|(a, b)| a - b).collect();
    let map: Vec<u8> = channel_min(&diff)
        .into_iter()
        .map(|d| {
            let dog = to_u8((255.0 - d).clamp(0.0, 255.0));
            let scaled = 2u8.wrapping_mul(255 - dog);
            if u32::from(scaled) > threshold {
                255
            } else {
                0
            }
        })
        .collect();
    padded.crop_gray_to_rgb(&map)
}

/// numpy's `median` of f32 values (the mean of the two middle ones, in f32, for an even
/// count); `None` for none.
fn median(mut values: Vec<f32>) -> Option<f32> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f32::total_cmp);
    let n = values.len();
    Some(if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    })
}

/// The `lineart_standard` map of the padded image.
pub fn lineart_standard(padded: &Padded) -> RgbImage {
    let (w, h) = (padded.image.width as usize, padded.image.height as usize);
    let x = as_f32(&padded.image);
    let g = gaussian_blur_f32(&x, w, h, 6.0);
    let diff: Vec<f32> = g.iter().zip(&x).map(|(a, b)| a - b).collect();
    let intensity: Vec<f32> = channel_min(&diff)
        .into_iter()
        .map(|v| v.clamp(0.0, 255.0))
        .collect();
    // `max(16, nan)` is 16 in Python: the empty median leaves the divisor at 16.
    let divisor = median(intensity.iter().copied().filter(|&v| v > 8.0).collect())
        .filter(|&m| m > 16.0)
        .unwrap_or(16.0);
    let map: Vec<u8> = intensity
        .iter()
        .map(|&v| to_u8((v / divisor * 127.0).clamp(0.0, 255.0)))
        .collect();
    padded.crop_gray_to_rgb(&map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_is_numpy_s() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 9.0]), Some(3.0));
    }

    #[test]
    fn a_dark_line_on_white_is_a_line_and_flat_is_nothing() {
        let (w, h) = (40usize, 30usize);
        let mut pixels = vec![240u8; w * h * 3];
        for y in 0..h {
            pixels[(y * w + 20) * 3..][..3].fill(10);
        }
        let image = RgbImage {
            width: w as u32,
            height: h as u32,
            pixels,
        };
        let padded = super::super::resize_image_with_pad(&image, 30);
        let lines = lineart_standard(&padded);
        let at = |m: &RgbImage, x: usize, y: usize| m.pixels[(y * w + x) * 3];
        // One line: its strength is the median, which maps to 127.
        assert_eq!(at(&lines, 20, 15), 127);
        assert_eq!(at(&lines, 5, 15), 0);
        let xdog = scribble_xdog(&padded, 32);
        assert_eq!(at(&xdog, 20, 15), 255);
        assert_eq!(at(&xdog, 5, 15), 0);
        let flat = RgbImage {
            width: 10,
            height: 10,
            pixels: vec![99; 300],
        };
        let padded = super::super::resize_image_with_pad(&flat, 10);
        assert!(lineart_standard(&padded).pixels.iter().all(|&v| v == 0));
        assert!(scribble_xdog(&padded, 1).pixels.iter().all(|&v| v == 0));
    }
}
