//! The recolor modules (for the recolor ControlNets, which colour a grey image) as the
//! sd-webui-controlnet extension has them, in two halves:
//! - the preprocessors (`scripts/preprocessor/legacy/processor.py`): `recolor_luminance`, the
//!   L of `cv2.cvtColor(image, COLOR_BGR2LAB)` (the RGB image converted as if it were BGR, as
//!   the extension does), and `recolor_intensity`, the V of `COLOR_BGR2HSV`; each as `v / 255`
//!   raised to the gamma in float32, times 255, truncated to 8 bits, in all three channels; at
//!   the image's own size (the legacy wrapper resizes nothing without a resolution slider);
//! - the post-processing (`scripts/controlnet.py`, run in `postprocess_batch` on the decoded
//!   images before A1111 converts them to 8 bits): each image's L (`COLOR_RGB2LAB`) or V
//!   (`COLOR_RGB2HSV`) replaced by the unit's final control map (its first channel), converted
//!   back (`COLOR_LAB2RGB` / `COLOR_HSV2RGB`); an image whose size differs from the map's is
//!   left as it is.

use super::colour::{hsv_to_rgb_row, lab_to_rgb, rgb_to_hsv, rgb_to_lab};
use crate::pipeline::RgbImage;

/// Which channel a recolor module works on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecolorChannel {
    /// Lab's L (`recolor_luminance`).
    Luminance,
    /// HSV's V (`recolor_intensity`).
    Intensity,
}

/// The preprocessor's map of `image` with `gamma` (the extension's Gamma Correction slider):
/// the channel's level `v` as `trunc(clip((v / 255)^gamma * 255))`, grey in RGB.
pub fn recolor(image: &RgbImage, channel: RecolorChannel, gamma: f64) -> RgbImage {
    // numpy: a float32 array to a Python float's power stays float32.
    let gamma = gamma as f32;
    let pixels = image
        .pixels
        .chunks_exact(3)
        .flat_map(|p| {
            // The RGB pixel read as BGR.
            let bgr_as_rgb = [p[2], p[1], p[0]];
            let level = match channel {
                RecolorChannel::Luminance => rgb_to_lab(bgr_as_rgb)[0],
                RecolorChannel::Intensity => rgb_to_hsv(bgr_as_rgb)[2],
            };
            let x = (f32::from(level) / 255.0).powf(gamma) * 255.0;
            let v = x.clamp(0.0, 255.0) as u8;
            [v, v, v]
        })
        .collect();
    RgbImage {
        width: image.width,
        height: image.height,
        pixels,
    }
}

/// The extension's post-processing of one decoded image (`image`: A1111's 8-bit truncation of
/// `clamp((x + 1) / 2, 0, 1)`, which is what the extension converts) with the unit's final
/// control map `map` (its first channel is used): the channel replaced by the map's and the
/// pixel converted back. A map of another size leaves the image as it is (the extension logs
/// the mismatch and returns the image).
pub fn recolor_post_process(image: &RgbImage, map: &RgbImage, channel: RecolorChannel) -> RgbImage {
    if (image.width, image.height) != (map.width, map.height) {
        return image.clone();
    }
    let levels = map.pixels.chunks_exact(3).map(|p| p[0]);
    let mut pixels = vec![0u8; image.pixels.len()];
    match channel {
        RecolorChannel::Luminance => {
            for ((src, level), dst) in image
                .pixels
                .chunks_exact(3)
                .zip(levels)
                .zip(pixels.chunks_exact_mut(3))
            {
                let [_, a, b] = rgb_to_lab([src[0], src[1], src[2]]);
                dst.copy_from_slice(&lab_to_rgb([level, a, b]));
            }
        }
        RecolorChannel::Intensity => {
            let hsv: Vec<u8> = image
                .pixels
                .chunks_exact(3)
                .zip(levels)
                .flat_map(|(src, level)| {
                    let [h, s, _] = rgb_to_hsv([src[0], src[1], src[2]]);
                    [h, s, level]
                })
                .collect();
            // OpenCV converts row by row; a pixel's column decides its code path.
            let row = image.width as usize * 3;
            if row > 0 {
                for (src, dst) in hsv.chunks(row).zip(pixels.chunks_mut(row)) {
                    hsv_to_rgb_row(src, dst);
                }
            }
        }
    }
    RgbImage {
        width: image.width,
        height: image.height,
        pixels,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(pixels: Vec<u8>, width: u32) -> RgbImage {
        RgbImage {
            width,
            height: (pixels.len() / 3) as u32 / width,
            pixels,
        }
    }

    #[test]
    fn the_map_is_the_channel_raised_to_gamma_and_post_processing_puts_it_back() {
        // White's L and V are 255 whatever the gamma; black's 0.
        let img = image(vec![255, 255, 255, 0, 0, 0], 2);
        for channel in [RecolorChannel::Luminance, RecolorChannel::Intensity] {
            let map = recolor(&img, channel, 0.3);
            assert_eq!(map.pixels, vec![255, 255, 255, 0, 0, 0]);
        }
        // Intensity is the largest channel (read as BGR: still the largest); gamma 2 squares it.
        let img = image(vec![10, 200, 30], 1);
        assert_eq!(
            recolor(&img, RecolorChannel::Intensity, 1.0).pixels,
            [200; 3]
        );
        let squared = (200f32 / 255.0).powf(2.0) * 255.0;
        assert_eq!(
            recolor(&img, RecolorChannel::Intensity, 2.0).pixels,
            [squared as u8; 3]
        );
        // A grey map's level becomes the image's V; another size leaves the image alone.
        let map = image(vec![90, 0, 0], 1);
        let out = recolor_post_process(&img, &map, RecolorChannel::Intensity);
        assert_eq!(out.pixels.iter().max(), Some(&90));
        let other = image(vec![90; 6], 2);
        assert_eq!(
            recolor_post_process(&img, &other, RecolorChannel::Luminance),
            img
        );
    }
}
