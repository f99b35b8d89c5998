//! The extension's `color` module (`t2ia_color_grid`, `annotator/color`'s `apply_color`): the
//! image scaled with `INTER_AREA` so its shorter side is the processor resolution
//! (`cv2_resize_shortest_edge`, no pad), shrunk with `INTER_CUBIC` to `w // 64` x `h // 64`,
//! then blown back up with `INTER_NEAREST`: a grid of 64-pixel colour cells.
//!
//! OpenCV's `INTER_AREA` only averages areas when shrinking; enlarging, it is a bilinear
//! resize whose weights come from the cells' overlap (`resize.cpp`, `area_mode`), in 11-bit
//! fixed point, the vertical pass rounded as its SIMD code does (`VResizeLinearVec_32s8u`:
//! each product's high 16 bits of `(S >> 4) * beta`, then `+2 >> 2`). The nearest resize
//! takes source `floor(d * (1 / (dst / src)))`. Both bit for bit (measured against
//! opencv-python 4.10 on 150 random sizes); the cubic shrink is the resize module's.

use super::resize::{resize_area, resize_cubic};
use crate::pipeline::RgbImage;

/// The size `cv2_resize_shortest_edge` makes: the shorter side `resolution`, the other
/// `int(round(long / short * resolution))` (halves to even; a square image's height is the
/// computed side).
pub fn color_size(width: u32, height: u32, resolution: u32) -> (u32, u32) {
    let (w, h, r) = (f64::from(width), f64::from(height), f64::from(resolution));
    if height < width {
        ((w / h * r).round_ties_even() as u32, resolution)
    } else {
        (resolution, (h / w * r).round_ties_even() as u32)
    }
}

/// `cv2_resize_shortest_edge(image, resolution)`: `INTER_AREA` to [`color_size`].
pub fn resize_shortest_edge(image: &RgbImage, resolution: u32) -> RgbImage {
    let (w, h) = color_size(image.width, image.height, resolution);
    let (w, h) = (w as usize, h as usize);
    // Both sides grow or neither does (the other side follows the shorter's scale).
    if w >= image.width as usize && h >= image.height as usize {
        resize_area_enlarge(image, w, h)
    } else {
        resize_area(image, w, h)
    }
}

/// `cv2.resize(image, (w, h), interpolation=INTER_AREA)` to any size: the area average where
/// neither side grows, else OpenCV's `area_mode` bilinear weights on both axes.
pub fn resize_area_any(image: &RgbImage, w: usize, h: usize) -> RgbImage {
    if w <= image.width as usize && h <= image.height as usize {
        resize_area(image, w, h)
    } else {
        resize_area_enlarge(image, w, h)
    }
}

/// The `color` map of `image` at `resolution` (at least 64, so every side keeps a cell).
pub fn color(image: &RgbImage, resolution: u32) -> RgbImage {
    let scaled = resize_shortest_edge(image, resolution);
    let (w, h) = (scaled.width as usize, scaled.height as usize);
    let cells = resize_cubic(&scaled, w / 64, h / 64);
    resize_nearest(&cells, w, h)
}

/// One axis of OpenCV's `area_mode` bilinear weights: for each destination index its first
/// source index and the two 11-bit weights.
fn area_linear_taps(src: usize, dst: usize) -> Vec<(usize, [i32; 2])> {
    let inv_scale = dst as f64 / src as f64;
    let scale = 1.0 / inv_scale;
    (0..dst)
        .map(|d| {
            let mut s = (d as f64 * scale).floor() as usize;
            let f = ((d + 1) as f64 - (s + 1) as f64 * inv_scale) as f32;
            let mut f = if f <= 0.0 { 0.0 } else { f - f.floor() };
            if s >= src - 1 {
                (s, f) = (src - 1, 0.0);
            }
            let fixed = |c: f32| (c * 2048.0).round_ties_even() as i32;
            (s, [fixed(1.0 - f), fixed(f)])
        })
        .collect()
}

/// `cv2.resize(..., INTER_AREA)` to a size no smaller on either side (the same size: a copy).
fn resize_area_enlarge(image: &RgbImage, w: usize, h: usize) -> RgbImage {
    let (w0, h0) = (image.width as usize, image.height as usize);
    if (w, h) == (w0, h0) {
        return image.clone();
    }
    let cols = area_linear_taps(w0, w);
    let rows = area_linear_taps(h0, h);
    // The horizontal pass of each source row, in integers (weights times 2048).
    let horizontal = |y: usize| -> Vec<i32> {
        let src = &image.pixels[y * w0 * 3..][..w0 * 3];
        let mut out = Vec::with_capacity(w * 3);
        for &(s, [a0, a1]) in &cols {
            let s1 = (s + 1).min(w0 - 1);
            for c in 0..3 {
                out.push(i32::from(src[s * 3 + c]) * a0 + i32::from(src[s1 * 3 + c]) * a1);
            }
        }
        out
    };
    let mid: Vec<Vec<i32>> = (0..h0).map(horizontal).collect();
    let mut pixels = Vec::with_capacity(w * h * 3);
    for &(s, [b0, b1]) in &rows {
        let (r0, r1) = (&mid[s], &mid[(s + 1).min(h0 - 1)]);
        for (&v0, &v1) in r0.iter().zip(r1) {
            let hi = |v: i32, b: i32| ((v >> 4) * b) >> 16;
            let v = (hi(v0, b0) + hi(v1, b1) + 2) >> 2;
            pixels.push(v.clamp(0, 255) as u8);
        }
    }
    RgbImage {
        width: w as u32,
        height: h as u32,
        pixels,
    }
}

/// `cv2.resize(..., INTER_NEAREST)`.
fn resize_nearest(image: &RgbImage, w: usize, h: usize) -> RgbImage {
    let (w0, h0) = (image.width as usize, image.height as usize);
    let index = |src: usize, dst: usize| -> Vec<usize> {
        let inverse = 1.0 / (dst as f64 / src as f64);
        (0..dst)
            .map(|d| ((d as f64 * inverse).floor() as usize).min(src - 1))
            .collect()
    };
    let (xs, ys) = (index(w0, w), index(h0, h));
    let mut pixels = Vec::with_capacity(w * h * 3);
    for &y in &ys {
        for &x in &xs {
            pixels.extend_from_slice(&image.pixels[(y * w0 + x) * 3..][..3]);
        }
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

    #[test]
    fn the_shorter_side_is_the_resolution() {
        assert_eq!(color_size(300, 200, 512), (768, 512));
        assert_eq!(color_size(200, 300, 512), (512, 768));
        assert_eq!(color_size(100, 100, 64), (64, 64));
        // 3 / 2 * 65 = 97.5: halves to even.
        assert_eq!(color_size(3, 2, 65), (98, 65));
    }

    #[test]
    fn a_flat_image_stays_flat_in_cells_of_64() {
        let image = RgbImage {
            width: 30,
            height: 20,
            pixels: [10, 200, 30].repeat(600),
        };
        let map = color(&image, 130);
        assert_eq!((map.width, map.height), (195, 130));
        assert_eq!(map.pixels, [10, 200, 30].repeat(195 * 130));
    }
}
