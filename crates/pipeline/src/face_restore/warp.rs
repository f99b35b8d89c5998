//! `cv2.warpAffine(img, M, (size, size), borderMode=cv2.BORDER_CONSTANT, borderValue=...)` of an
//! 8-bit 3-channel picture with the default `INTER_LINEAR`, in OpenCV's fixed point
//! (`imgproc/src/imgwarp.cpp`: `WarpAffineInvoker`, `remapBilinear`):
//!
//! - `M` is inverted (`invertAffineTransform`'s formulas) to map each destination pixel back;
//! - per destination pixel, the source position in 1/32 pixel (`INTER_BITS` 5): with
//!   `AB_SCALE` 1024, `X = (round((M01 * y + M02) * 1024) + 16 + round(M00 * x * 1024)) >> 5`
//!   (rounding half to even, `saturate_cast<int>`), likewise `Y`; the integer part
//!   `X >> 5`, the fraction `X & 31`;
//! - the four neighbours weighted by `BilinearTab_i`: `(32 - fx)(32 - fy)`, ... times 32 (their
//!   sum `INTER_REMAP_COEF_SCALE` = 32768, exact for every fraction), summed in integers,
//!   `(sum + 16384) >> 15`;
//! - a neighbour outside the picture reads the border value; a pixel whose four neighbours all
//!   lie outside is the border value.

use crate::pipeline::RgbImage;

/// `INTER_BITS`: the source position's fraction bits.
const INTER_BITS: i32 = 5;
const INTER_TAB_SIZE: i32 = 1 << INTER_BITS;
/// `AB_BITS = max(10, INTER_BITS)`.
const AB_BITS: i32 = 10;
const AB_SCALE: f64 = (1 << AB_BITS) as f64;
/// `INTER_REMAP_COEF_BITS`.
const COEF_BITS: i32 = 15;

/// `invertAffineTransform`.
pub fn invert_affine(m: &[[f64; 3]; 2]) -> [[f64; 3]; 2] {
    let d = m[0][0] * m[1][1] - m[0][1] * m[1][0];
    let d = if d != 0.0 { 1.0 / d } else { 0.0 };
    let (a11, a22) = (m[1][1] * d, m[0][0] * d);
    let (a12, a21) = (m[0][1] * -d, m[1][0] * -d);
    let b1 = -a11 * m[0][2] - a12 * m[1][2];
    let b2 = -a21 * m[0][2] - a22 * m[1][2];
    [[a11, a12, b1], [a21, a22, b2]]
}

/// `saturate_cast<int>(double)`: rounded half to even, clamped.
fn round_int(v: f64) -> i32 {
    v.round_ties_even()
        .clamp(f64::from(i32::MIN), f64::from(i32::MAX)) as i32
}

/// facexlib's crop: `image` warped by `affine` (facexlib's `affine_matrices` entry, picture to
/// crop) into a `size` x `size` RGB picture, the border [`super::align::BORDER_RGB`].
pub fn warp_face(image: &RgbImage, affine: &[[f64; 3]; 2], size: u32) -> RgbImage {
    warp_affine(image, affine, size, size, super::align::BORDER_RGB)
}

/// `cv2.warpAffine(image, m, (width, height), borderMode=BORDER_CONSTANT, borderValue=border)`
/// with `INTER_LINEAR` (`border` in the picture's channel order).
pub fn warp_affine(
    image: &RgbImage,
    m: &[[f64; 3]; 2],
    width: u32,
    height: u32,
    border: [u8; 3],
) -> RgbImage {
    let inv = invert_affine(m);
    let (sw, sh) = (image.width as i32, image.height as i32);
    let (dw, dh) = (width as usize, height as usize);
    let adelta: Vec<i32> = (0..dw)
        .map(|x| round_int(inv[0][0] * x as f64 * AB_SCALE))
        .collect();
    let bdelta: Vec<i32> = (0..dw)
        .map(|x| round_int(inv[1][0] * x as f64 * AB_SCALE))
        .collect();
    let round_delta = (AB_SCALE as i32) / INTER_TAB_SIZE / 2;
    let src = &image.pixels;
    let pixel = |x: i32, y: i32| -> [u8; 3] {
        if x >= 0 && x < sw && y >= 0 && y < sh {
            let i = 3 * (y as usize * sw as usize + x as usize);
            [src[i], src[i + 1], src[i + 2]]
        } else {
            border
        }
    };
    let mut pixels = vec![0u8; 3 * dw * dh];
    for (y, row) in pixels.chunks_exact_mut(3 * dw).enumerate() {
        let x0 = round_int((inv[0][1] * y as f64 + inv[0][2]) * AB_SCALE) + round_delta;
        let y0 = round_int((inv[1][1] * y as f64 + inv[1][2]) * AB_SCALE) + round_delta;
        for (x, out) in row.chunks_exact_mut(3).enumerate() {
            let fx = x0.wrapping_add(adelta[x]) >> (AB_BITS - INTER_BITS);
            let fy = y0.wrapping_add(bdelta[x]) >> (AB_BITS - INTER_BITS);
            let (sx, sy) = (fx >> INTER_BITS, fy >> INTER_BITS);
            let (ax, ay) = (fx & (INTER_TAB_SIZE - 1), fy & (INTER_TAB_SIZE - 1));
            if sx >= sw || sx + 1 < 0 || sy >= sh || sy + 1 < 0 {
                out.copy_from_slice(&border);
                continue;
            }
            let w = [
                (INTER_TAB_SIZE - ay) * (INTER_TAB_SIZE - ax) * INTER_TAB_SIZE,
                (INTER_TAB_SIZE - ay) * ax * INTER_TAB_SIZE,
                ay * (INTER_TAB_SIZE - ax) * INTER_TAB_SIZE,
                ay * ax * INTER_TAB_SIZE,
            ];
            let taps = [
                pixel(sx, sy),
                pixel(sx + 1, sy),
                pixel(sx, sy + 1),
                pixel(sx + 1, sy + 1),
            ];
            for (c, o) in out.iter_mut().enumerate() {
                let sum: i32 = taps.iter().zip(&w).map(|(t, w)| i32::from(t[c]) * w).sum();
                *o = ((sum + (1 << (COEF_BITS - 1))) >> COEF_BITS).clamp(0, 255) as u8;
            }
        }
    }
    RgbImage {
        width,
        height,
        pixels,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn picture(w: u32, h: u32) -> RgbImage {
        let pixels = (0..w * h * 3).map(|i| (i * 37 % 251) as u8).collect();
        RgbImage {
            width: w,
            height: h,
            pixels,
        }
    }

    #[test]
    fn the_identity_copies_and_a_shift_pads_with_the_border() {
        let im = picture(7, 5);
        let id = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]];
        assert_eq!(warp_affine(&im, &id, 7, 5, [1, 2, 3]), im);
        // Shifted right by 2: the first two columns are the border, the rest the picture.
        let out = warp_affine(&im, &[[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]], 7, 5, [1, 2, 3]);
        assert_eq!(&out.pixels[..6], &[1, 2, 3, 1, 2, 3]);
        assert_eq!(&out.pixels[6..9], &im.pixels[..3]);
    }

    #[test]
    fn half_a_pixel_averages_with_rounding() {
        // Shift by -0.5: each pixel is the mean of two neighbours, (a + b + 1) / 2 by the
        // fixed-point rounding; the last column mixes with the border.
        let im = RgbImage {
            width: 2,
            height: 1,
            pixels: vec![10, 20, 30, 11, 40, 255],
        };
        let out = warp_affine(&im, &[[1.0, 0.0, -0.5], [0.0, 1.0, 0.0]], 2, 1, [0, 0, 0]);
        assert_eq!(out.pixels, vec![11, 30, 143, 6, 20, 128]);
    }

    #[test]
    fn inversion_round_trips() {
        let m = [[0.8, -0.6, 5.0], [0.6, 0.8, 7.0]];
        let back = invert_affine(&invert_affine(&m));
        for r in 0..2 {
            for k in 0..3 {
                assert!((back[r][k] - m[r][k]).abs() < 1e-12);
            }
        }
    }
}
