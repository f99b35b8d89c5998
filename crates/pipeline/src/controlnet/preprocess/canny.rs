//! OpenCV's `cv2.Canny(image, low, high)` (aperture 3, L1 gradient) on an RGB image, as
//! `imgproc/src/canny.cpp` computes it: each channel's 3x3 Sobel derivatives (replicated
//! border, 16-bit), per pixel the channel of the largest `|dx| + |dy|` (the first on ties),
//! non-maximum suppression along the gradient's sector (OpenCV's fixed-point tan 22.5° test,
//! its strict/non-strict neighbour comparisons), then hysteresis: a pixel above `low` that
//! survives suppression is an edge when 8-connected through such pixels to one above `high`.
//! Everything is integer arithmetic, so the result is OpenCV's bit for bit.

use crate::pipeline::RgbImage;

/// OpenCV's `CANNY_SHIFT`.
const SHIFT: i32 = 15;
/// `(int)(tan(22.5°) * (1 << CANNY_SHIFT) + 0.5)`.
const TG22: i32 = 13573;

/// The edge map (0 or 255 per pixel, row-major, one channel) of `image`; thresholds as
/// OpenCV takes them (swapped when `low > high`; a magnitude must exceed them).
pub fn canny(image: &RgbImage, low: u32, high: u32) -> Vec<u8> {
    let (w, h) = (image.width as usize, image.height as usize);
    if w == 0 || h == 0 {
        return Vec::new();
    }
    let (low, high) = (low.min(high) as i32, low.max(high) as i32);
    let (dx, dy, mag) = gradients(image);
    // 0: below `low` or suppressed; 1: a candidate; 2: an edge.
    let mut map = vec![0u8; w * h];
    let mut stack = Vec::new();
    let at = |y: isize, x: isize| -> i32 {
        // Magnitudes outside the image are 0 (OpenCV's zeroed border rows and columns).
        if y < 0 || x < 0 || y >= h as isize || x >= w as isize {
            0
        } else {
            mag[y as usize * w + x as usize]
        }
    };
    for y in 0..h {
        for x in 0..w {
            let i = y * w + x;
            let m = mag[i];
            if m <= low {
                continue;
            }
            let (xs, ys) = (i32::from(dx[i]), i32::from(dy[i]));
            let ax = xs.abs();
            let ay = ys.abs() << SHIFT;
            let tg22x = ax * TG22;
            let (yi, xi) = (y as isize, x as isize);
            let keep = if ay < tg22x {
                m > at(yi, xi - 1) && m >= at(yi, xi + 1)
            } else {
                let tg67x = tg22x + (ax << (SHIFT + 1));
                if ay > tg67x {
                    m > at(yi - 1, xi) && m >= at(yi + 1, xi)
                } else {
                    let s: isize = if (xs ^ ys) < 0 { -1 } else { 1 };
                    m > at(yi - 1, xi - s) && m > at(yi + 1, xi + s)
                }
            };
            if keep {
                map[i] = 1;
                if m > high {
                    map[i] = 2;
                    stack.push(i);
                }
            }
        }
    }
    // Hysteresis: grow every edge into its 8-neighbours that are candidates.
    while let Some(i) = stack.pop() {
        let (y, x) = ((i / w) as isize, (i % w) as isize);
        for (oy, ox) in [
            (-1, -1),
            (-1, 0),
            (-1, 1),
            (0, -1),
            (0, 1),
            (1, -1),
            (1, 0),
            (1, 1),
        ] {
            let (ny, nx) = (y + oy, x + ox);
            if ny < 0 || nx < 0 || ny >= h as isize || nx >= w as isize {
                continue;
            }
            let j = ny as usize * w + nx as usize;
            if map[j] == 1 {
                map[j] = 2;
                stack.push(j);
            }
        }
    }
    map.into_iter()
        .map(|v| if v == 2 { 255 } else { 0 })
        .collect()
}

/// Per pixel: `dx`, `dy` and `|dx| + |dy|` of the channel with the largest magnitude.
fn gradients(image: &RgbImage) -> (Vec<i16>, Vec<i16>, Vec<i32>) {
    let (w, h) = (image.width as usize, image.height as usize);
    let px = |y: isize, x: isize, c: usize| -> i32 {
        // cv::BORDER_REPLICATE.
        let y = y.clamp(0, h as isize - 1) as usize;
        let x = x.clamp(0, w as isize - 1) as usize;
        i32::from(image.pixels[(y * w + x) * 3 + c])
    };
    let n = w * h;
    let (mut dx, mut dy, mut mag) = (vec![0i16; n], vec![0i16; n], vec![0i32; n]);
    for y in 0..h as isize {
        for x in 0..w as isize {
            let mut best: Option<(i32, i32, i32)> = None;
            for c in 0..3 {
                let p = |oy: isize, ox: isize| px(y + oy, x + ox, c);
                // Sobel kernels [-1 0 1; -2 0 2; -1 0 1] and its transpose.
                let gx = (p(-1, 1) - p(-1, -1)) + 2 * (p(0, 1) - p(0, -1)) + (p(1, 1) - p(1, -1));
                let gy = (p(1, -1) - p(-1, -1)) + 2 * (p(1, 0) - p(-1, 0)) + (p(1, 1) - p(-1, 1));
                let m = gx.abs() + gy.abs();
                if best.is_none_or(|(bm, _, _)| m > bm) {
                    best = Some((m, gx, gy));
                }
            }
            let (m, gx, gy) = best.expect("three channels");
            let i = y as usize * w + x as usize;
            // |Sobel| of 8-bit input is at most 4 * 255: the i16 OpenCV stores holds it.
            (dx[i], dy[i], mag[i]) = (gx as i16, gy as i16, m);
        }
    }
    (dx, dy, mag)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(w: u32, h: u32, f: impl Fn(u32, u32) -> [u8; 3]) -> RgbImage {
        let mut p = Vec::with_capacity((w * h * 3) as usize);
        for y in 0..h {
            for x in 0..w {
                p.extend_from_slice(&f(x, y));
            }
        }
        RgbImage {
            width: w,
            height: h,
            pixels: p,
        }
    }

    #[test]
    fn a_vertical_step_is_one_thin_edge_and_flat_is_none() {
        let step = image(12, 8, |x, _| if x < 6 { [0; 3] } else { [200, 10, 10] });
        let e = canny(&step, 100, 200);
        for y in 0..8 {
            let row: Vec<u8> = e[y * 12..(y + 1) * 12].to_vec();
            // Both sides of the step have the same magnitude; suppression keeps the left one
            // (strictly above its left neighbour, not below its right).
            assert_eq!(row.iter().filter(|&&v| v == 255).count(), 1, "{row:?}");
            assert_eq!(row[5], 255, "{row:?}");
        }
        let flat = image(9, 9, |_, _| [77, 77, 77]);
        assert!(canny(&flat, 1, 1).iter().all(|&v| v == 0));
    }

    #[test]
    fn thresholds_are_swapped_when_low_is_above_high() {
        let ramp = image(10, 10, |x, y| [(x * 25) as u8, (y * 20) as u8, 0]);
        assert_eq!(canny(&ramp, 30, 90), canny(&ramp, 90, 30));
    }
}
