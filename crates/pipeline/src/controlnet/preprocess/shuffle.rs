//! The extension's `shuffle` module (`PreprocessorShuffle`: the image at the processor
//! resolution, the pad removed, through `annotator/shuffle`'s `ContentShuffleDetector`): the
//! image warped by a smooth random flow. Each flow axis is `make_noise_disk(H, W, 1, 256)`:
//! `(H // 256 + 2) x (W // 256 + 2)` uniforms from numpy's global generator, enlarged with
//! `INTER_CUBIC` (in f64) to `(H + 512) x (W + 512)`, the middle `H x W` cut out and
//! stretched to 0..=1, times `W - 1` (x, drawn first) or `H - 1` (y); `cv2.remap` then
//! samples the image there (`INTER_LINEAR`, constant black border).
//!
//! The extension seeds numpy before each unit (`set_numpy_seed`), so the seed decides the
//! map. OpenCV's float cubic resize (`HResizeCubic`/`VResizeCubic` in double with float
//! weights) and its remap (coordinates rounded to 1/32 pixel, 15-bit bilinear weights) are
//! reproduced operation for operation: bit for bit against opencv-python 4.10.

use super::resize::{resize_image_with_pad, Padded};
use crate::pipeline::RgbImage;
use crate::rng::NumpyRandomState;

/// `make_noise_disk`'s cell size.
const CELL: usize = 256;

/// The `shuffle` map of the padded image with numpy seeded by `seed`.
pub fn shuffle(padded: &Padded, seed: u32) -> RgbImage {
    let image = padded.crop_rgb();
    let (w, h) = (image.width as usize, image.height as usize);
    let mut rng = NumpyRandomState::new(seed);
    let x = noise_disk(&mut rng, h, w, (w - 1) as f64);
    let y = noise_disk(&mut rng, h, w, (h - 1) as f64);
    remap_linear(&image, &x, &y)
}

/// The `shuffle` map of `image` at `resolution` (the extension's hidden slider: 512).
pub fn shuffle_image(image: &RgbImage, resolution: u32, seed: u32) -> RgbImage {
    shuffle(&resize_image_with_pad(image, resolution), seed)
}

/// OpenCV's `interpolateCubic` (a = -0.75), in f32 as OpenCV computes it.
fn cubic_weights(x: f32) -> [f32; 4] {
    const A: f32 = -0.75;
    let c0 = ((A * (x + 1.0) - 5.0 * A) * (x + 1.0) + 8.0 * A) * (x + 1.0) - 4.0 * A;
    let c1 = ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let c2 = ((A + 2.0) * (1.0 - x) - (A + 3.0)) * (1.0 - x) * (1.0 - x) + 1.0;
    [c0, c1, c2, 1.0 - c0 - c1 - c2]
}

/// The cubic taps of destination indices `range` of a `src` -> `dst` resize: four source
/// indices (replicated at the ends) and their weights.
fn cubic_taps(
    src: usize,
    dst: usize,
    range: std::ops::Range<usize>,
) -> Vec<([usize; 4], [f64; 4])> {
    let scale = 1.0 / (dst as f64 / src as f64);
    range
        .map(|d| {
            let f = ((d as f64 + 0.5) * scale - 0.5) as f32;
            let s = f.floor();
            let idx = std::array::from_fn(|k| {
                (s as isize - 1 + k as isize).clamp(0, src as isize - 1) as usize
            });
            (idx, cubic_weights(f - s).map(f64::from))
        })
        .collect()
}

/// `make_noise_disk(h, w, 1, 256) * scale`, as f32 (the flow's type): only the cut-out part
/// of the enlarged noise is computed.
fn noise_disk(rng: &mut NumpyRandomState, h: usize, w: usize, scale: f64) -> Vec<f32> {
    let (nh, nw) = (h / CELL + 2, w / CELL + 2);
    let noise: Vec<f64> = (0..nh * nw).map(|_| rng.random_sample()).collect();
    let cols = cubic_taps(nw, w + 2 * CELL, CELL..CELL + w);
    let rows = cubic_taps(nh, h + 2 * CELL, CELL..CELL + h);
    // The horizontal pass of every noise row, then the vertical, summed in OpenCV's order.
    let horizontal: Vec<Vec<f64>> = noise
        .chunks(nw)
        .map(|row| {
            cols.iter()
                .map(|(i, c)| {
                    row[i[0]] * c[0] + row[i[1]] * c[1] + row[i[2]] * c[2] + row[i[3]] * c[3]
                })
                .collect()
        })
        .collect();
    let mut out = Vec::with_capacity(h * w);
    for (i, c) in &rows {
        let [r0, r1, r2, r3] = i.map(|k| &horizontal[k]);
        for (((a, b), d), e) in r0.iter().zip(r1).zip(r2).zip(r3) {
            out.push(a * c[0] + b * c[1] + d * c[2] + e * c[3]);
        }
    }
    let min = out.iter().copied().fold(f64::INFINITY, f64::min);
    for v in &mut out {
        *v -= min;
    }
    let max = out.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    out.iter().map(|v| (v / max * scale) as f32).collect()
}

/// `cv2.remap(image, flow, None, INTER_LINEAR)`: each coordinate rounded to 1/32 pixel, the
/// four neighbours weighted in 15 bits (`(32 - fy)(32 - fx) * 32`, ...), outside pixels black.
fn remap_linear(image: &RgbImage, x: &[f32], y: &[f32]) -> RgbImage {
    let (w, h) = (image.width as i64, image.height as i64);
    let px = |yy: i64, xx: i64, c: usize| -> i64 {
        if (0..w).contains(&xx) && (0..h).contains(&yy) {
            i64::from(image.pixels[((yy * w + xx) * 3) as usize + c])
        } else {
            0
        }
    };
    let mut pixels = Vec::with_capacity(image.pixels.len());
    for (&fx, &fy) in x.iter().zip(y) {
        let gx = (fx * 32.0).round_ties_even() as i64;
        let gy = (fy * 32.0).round_ties_even() as i64;
        let (ix, ax, iy, ay) = (gx >> 5, gx & 31, gy >> 5, gy & 31);
        let weights = [
            (32 - ay) * (32 - ax) * 32,
            (32 - ay) * ax * 32,
            ay * (32 - ax) * 32,
            ay * ax * 32,
        ];
        for c in 0..3 {
            let sum = px(iy, ix, c) * weights[0]
                + px(iy, ix + 1, c) * weights[1]
                + px(iy + 1, ix, c) * weights[2]
                + px(iy + 1, ix + 1, c) * weights[3];
            pixels.push(((sum + (1 << 14)) >> 15).clamp(0, 255) as u8);
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

    #[test]
    fn the_flow_stays_inside_and_the_seed_decides_it() {
        let image = RgbImage {
            width: 40,
            height: 30,
            pixels: (0..40 * 30 * 3).map(|i| (i * 7 % 251) as u8).collect(),
        };
        let a = shuffle_image(&image, 64, 7);
        assert_eq!((a.width, a.height), (85, 64));
        assert_eq!(a, shuffle_image(&image, 64, 7));
        assert_ne!(a, shuffle_image(&image, 64, 8));
        let mut rng = NumpyRandomState::new(3);
        let flow = noise_disk(&mut rng, 30, 40, 39.0);
        let (lo, hi) = flow
            .iter()
            .fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
        assert_eq!((lo, hi), (0.0, 39.0));
    }
}
