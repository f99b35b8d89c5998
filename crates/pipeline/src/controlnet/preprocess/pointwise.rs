//! The extension's per-pixel modules: `invert` (`PreprocessorInvert`: `255 - HWC3(image)`, at
//! the image's own size) and `threshold` (the legacy `threshold`: white where the darkest
//! channel is above the threshold, at the processor resolution). Integer arithmetic: exact.

use super::resize::Padded;
use crate::pipeline::RgbImage;

/// `255 - image`.
pub fn invert(image: &RgbImage) -> RgbImage {
    RgbImage {
        width: image.width,
        height: image.height,
        pixels: image.pixels.iter().map(|&v| 255 - v).collect(),
    }
}

/// `result[np.min(img, axis=2) > threshold] = 255` on the padded image, the pad removed; a
/// threshold of `t.5` is the same as `t` for 8-bit values, hence an integer.
pub fn threshold(padded: &Padded, threshold: u32) -> RgbImage {
    let map: Vec<u8> = padded
        .image
        .pixels
        .chunks_exact(3)
        .map(|p| {
            if u32::from(p[0].min(p[1]).min(p[2])) > threshold {
                255
            } else {
                0
            }
        })
        .collect();
    padded.crop_gray_to_rgb(&map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invert_flips_and_threshold_takes_the_darkest_channel() {
        let image = RgbImage {
            width: 2,
            height: 1,
            pixels: vec![0, 128, 255, 200, 201, 202],
        };
        assert_eq!(invert(&image).pixels, vec![255, 127, 0, 55, 54, 53]);
        let padded = super::super::resize_image_with_pad(&image, 1);
        assert_eq!(threshold(&padded, 127).pixels, vec![0, 0, 0, 255, 255, 255]);
        assert_eq!(threshold(&padded, 200).pixels, vec![0; 6]);
        assert_eq!(threshold(&padded, 199).pixels[3..], [255; 3]);
    }
}
