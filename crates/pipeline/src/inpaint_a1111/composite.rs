//! A1111's overlay: the original image with the mask's inverse as alpha
//! (`image_masked.paste(image RGBa, mask=invert(mask_for_overlay))`, then RGBA) composited
//! over each result (`apply_overlay`: `alpha_composite`), so the kept region comes back as
//! sent. Pillow's integer arithmetic (`Paste.c`, `Convert.c`, `AlphaComposite.c`) step for step.

use super::crop::resize_image;
use crate::pipeline::RgbImage;

/// Pillow's `DIV255`: `(a + 128 + ((a + 128) >> 8)) >> 8`.
pub(super) fn div255(a: u32) -> u32 {
    let t = a + 128;
    ((t >> 8) + t) >> 8
}

/// The original image as an RGBA overlay: alpha `255 - mask_for_overlay`.
#[derive(Debug, Clone, PartialEq)]
pub struct Overlay {
    pub width: usize,
    pub height: usize,
    /// RGBA8, unpremultiplied.
    pub rgba: Vec<u8>,
}

impl Overlay {
    /// `Image.new('RGBa')`, pasted with the RGB image (premultiplied by its alpha of 255: the
    /// same colours) through `invert(mask)`, then `.convert('RGBA')` (unpremultiplied).
    pub fn new(image: &RgbImage, mask_for_overlay: &[u8]) -> Self {
        let (width, height) = (image.width as usize, image.height as usize);
        let mut rgba = Vec::with_capacity(width * height * 4);
        for (px, &m) in image.pixels.chunks_exact(3).zip(mask_for_overlay) {
            // paste_mask_L: BLEND(mask, out = 0, in) = DIV255(in * mask).
            let keep = 255 - m as u32;
            let a = div255(255 * keep);
            let c = |v: u8| div255(v as u32 * keep) as u8;
            rgba.extend(unpremultiply([c(px[0]), c(px[1]), c(px[2]), a as u8]));
        }
        Self {
            width,
            height,
            rgba,
        }
    }

    /// `apply_overlay(image, paste_loc, overlay)`: with `paste_to` (x, y, w, h) the image is
    /// first `resize_image(1, image, w, h)` and pasted there onto a transparent canvas of the
    /// overlay's size; then `alpha_composite(overlay)` and RGB.
    pub fn apply(
        &self,
        image: &RgbImage,
        paste_to: Option<(usize, usize, usize, usize)>,
    ) -> RgbImage {
        let (w, h) = (self.width, self.height);
        // RGBA below the overlay.
        let mut base = vec![0u8; w * h * 4];
        match paste_to {
            Some((x, y, pw, ph)) => {
                let resized = resize_image(1, image, pw, ph);
                for sy in 0..ph {
                    for sx in 0..pw {
                        let (tx, ty) = (x + sx, y + sy);
                        if tx < w && ty < h {
                            let s = (sy * pw + sx) * 3;
                            let d = (ty * w + tx) * 4;
                            base[d..d + 3].copy_from_slice(&resized.pixels[s..s + 3]);
                            base[d + 3] = 255;
                        }
                    }
                }
            }
            None => {
                for (d, s) in base.chunks_exact_mut(4).zip(image.pixels.chunks_exact(3)) {
                    d[..3].copy_from_slice(s);
                    d[3] = 255;
                }
            }
        }
        let mut pixels = Vec::with_capacity(w * h * 3);
        for (dst, src) in base.chunks_exact(4).zip(self.rgba.chunks_exact(4)) {
            pixels.extend_from_slice(&alpha_composite(dst, src)[..3]);
        }
        RgbImage {
            width: w as u32,
            height: h as u32,
            pixels,
        }
    }
}

/// Pillow's `rgba2rgbA` (RGBa to RGBA): `255 * c / a`, truncated, for `0 < a < 255`.
pub(super) fn unpremultiply(p: [u8; 4]) -> [u8; 4] {
    let a = p[3] as u32;
    let c = |v: u8| match a {
        0 | 255 => v,
        _ => (255 * v as u32 / a).min(255) as u8,
    };
    [c(p[0]), c(p[1]), c(p[2]), p[3]]
}

/// Pillow's `ImagingAlphaComposite` for one pixel (`src` over `dst`, both RGBA): 7 extra bits
/// of precision, divisions rounded.
pub(super) fn alpha_composite(dst: &[u8], src: &[u8]) -> [u8; 4] {
    const PRECISION_BITS: u32 = 7;
    let sa = src[3] as u32;
    if sa == 0 {
        return [dst[0], dst[1], dst[2], dst[3]];
    }
    let blend = dst[3] as u32 * (255 - sa);
    let outa255 = sa * 255 + blend;
    let coef1 = sa * 255 * 255 * (1 << PRECISION_BITS) / outa255;
    let coef2 = 255 * (1 << PRECISION_BITS) - coef1;
    let shift = |a: u32| ((a >> 8) + a) >> 8;
    let mut out = [0u8; 4];
    for c in 0..3 {
        let tmp = src[c] as u32 * coef1 + dst[c] as u32 * coef2;
        out[c] = (shift(tmp + (0x80 << PRECISION_BITS)) >> PRECISION_BITS) as u8;
    }
    out[3] = shift(outa255 + 0x80) as u8;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_pixels_come_back_exactly_and_repainted_ones_are_the_result() {
        let image = RgbImage {
            width: 3,
            height: 1,
            pixels: vec![10, 20, 30, 40, 50, 60, 70, 80, 90],
        };
        let result = RgbImage {
            width: 3,
            height: 1,
            pixels: vec![200; 9],
        };
        let overlay = Overlay::new(&image, &[0, 255, 128]);
        let out = overlay.apply(&result, None);
        assert_eq!(&out.pixels[..3], &[10, 20, 30]);
        assert_eq!(&out.pixels[3..6], &[200, 200, 200]);
        // Half way: between the two.
        assert!(
            out.pixels[6..].iter().all(|&v| (120..=150).contains(&v)),
            "{:?}",
            out.pixels
        );
    }
}
