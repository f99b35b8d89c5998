//! The extension's Tile modules: `blur_gaussian` (`PreprocessorBlurGaussian`: the image at
//! the processor resolution, the pad removed, then `cv2.GaussianBlur(img, (0, 0), sigma)`,
//! OpenCV's bit-exact 8-bit blur) and `tile_resample` (the legacy `tile_resample`: below a
//! rate of 1.1 the image itself, else `cv2.resize` with `INTER_AREA` to
//! `int(H / rate)` x `int(W / rate)`; no processor resolution).

use super::gaussian::gaussian_blur_u8;
use super::resize::{resize_area, Padded};
use crate::pipeline::RgbImage;

/// The `blur_gaussian` map of the padded image.
pub fn blur_gaussian(padded: &Padded, sigma: f64) -> RgbImage {
    let image = padded.crop_rgb();
    let pixels = gaussian_blur_u8(
        &image.pixels,
        image.width as usize,
        image.height as usize,
        sigma,
    );
    RgbImage { pixels, ..image }
}

/// The size `tile_resample` makes: `int(side / rate)` (0 for a side shorter than the rate,
/// which OpenCV refuses).
pub fn tile_resample_size(width: u32, height: u32, rate: f64) -> (u32, u32) {
    if rate < 1.1 {
        return (width, height);
    }
    let side = |s: u32| (f64::from(s) / rate) as u32;
    (side(width), side(height))
}

/// The `tile_resample` map; the image's sides must be at least `rate` (see
/// [`tile_resample_size`]).
pub fn tile_resample(image: &RgbImage, rate: f64) -> RgbImage {
    let (w, h) = tile_resample_size(image.width, image.height, rate);
    resize_area(image, w as usize, h as usize)
}
