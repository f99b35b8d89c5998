//! The sd-webui-controlnet extension's `resize_image_with_pad` (`scripts/utils.py`): the image
//! scaled so its shorter side is the processor resolution (`k = res / min(H, W)`, sides
//! `int(np.round(side * k))`), with OpenCV's `INTER_CUBIC` when enlarging and `INTER_AREA`
//! otherwise, then padded with its edge pixels to multiples of 64 (`pad64`); preprocessors run
//! on the padded image and crop their result back (`remove_pad`).
//!
//! `INTER_AREA` is OpenCV's own code (`imgproc/src/resize.cpp`): the 2x2 box with `+2 >> 2`
//! for an integer scale of 2, the integer box times `1.f / area` for other integer scales, the
//! float area table (`computeResizeAreaTab`) otherwise; bit for bit. `INTER_CUBIC` in the
//! OpenCV wheels A1111 installs runs Intel IPP's resize, whose code is not public: here the
//! same a = -0.75 cubic in f32, the vertical pass then the horizontal, rounded once, which
//! matches it on all but about one value in 10,000, by one level
//! (`tests/integration/controlnet_preprocess.rs` holds the bound).

use crate::pipeline::RgbImage;

/// The padded image and the size to crop results back to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Padded {
    pub image: RgbImage,
    pub width: usize,
    pub height: usize,
}

impl Padded {
    /// `remove_pad` of a one-channel map of the padded image's size.
    pub fn crop_gray(&self, map: &[u8]) -> Vec<u8> {
        let pw = self.image.width as usize;
        (0..self.height)
            .flat_map(|y| map[y * pw..y * pw + self.width].iter().copied())
            .collect()
    }

    /// `remove_pad` of the padded image itself.
    pub fn crop_rgb(&self) -> RgbImage {
        let pw = self.image.width as usize * 3;
        RgbImage {
            width: self.width as u32,
            height: self.height as u32,
            pixels: (0..self.height)
                .flat_map(|y| {
                    self.image.pixels[y * pw..][..self.width * 3]
                        .iter()
                        .copied()
                })
                .collect(),
        }
    }

    /// `remove_pad` of a one-channel map, as RGB (`cv2.COLOR_GRAY2RGB`, `HWC3`).
    pub fn crop_gray_to_rgb(&self, map: &[u8]) -> RgbImage {
        RgbImage {
            width: self.width as u32,
            height: self.height as u32,
            pixels: self
                .crop_gray(map)
                .iter()
                .flat_map(|&v| [v, v, v])
                .collect(),
        }
    }
}

/// `int(np.round(x))`: halves to even.
fn round_side(x: f64) -> usize {
    x.round_ties_even() as usize
}

/// `pad64(x)`: what makes `x` a multiple of 64.
fn pad64(x: usize) -> usize {
    x.div_ceil(64) * 64 - x
}

/// The extension's `resize_image_with_pad(image, resolution)`.
pub fn resize_image_with_pad(image: &RgbImage, resolution: u32) -> Padded {
    let (w0, h0) = (image.width as usize, image.height as usize);
    let k = f64::from(resolution) / w0.min(h0) as f64;
    let (h, w) = (round_side(h0 as f64 * k), round_side(w0 as f64 * k));
    let resized = if k > 1.0 {
        resize_cubic(image, w, h)
    } else {
        resize_area(image, w, h)
    };
    let (pw, ph) = (w + pad64(w), h + pad64(h));
    let mut pixels = Vec::with_capacity(pw * ph * 3);
    for y in 0..ph {
        let row = &resized.pixels[y.min(h - 1) * w * 3..][..w * 3];
        pixels.extend_from_slice(row);
        let last = &row[(w - 1) * 3..];
        for _ in w..pw {
            pixels.extend_from_slice(last);
        }
    }
    Padded {
        image: RgbImage {
            width: pw as u32,
            height: ph as u32,
            pixels,
        },
        width: w,
        height: h,
    }
}

/// OpenCV's `interpolateCubic` (a = -0.75) at fraction `x`.
fn cubic_coeffs(x: f64) -> [f32; 4] {
    const A: f64 = -0.75;
    let c0 = ((A * (x + 1.0) - 5.0 * A) * (x + 1.0) + 8.0 * A) * (x + 1.0) - 4.0 * A;
    let c1 = ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let c2 = ((A + 2.0) * (1.0 - x) - (A + 3.0)) * (1.0 - x) * (1.0 - x) + 1.0;
    let c3 = 1.0 - c0 - c1 - c2;
    [c0 as f32, c1 as f32, c2 as f32, c3 as f32]
}

/// For each destination index: its four source indices (replicated at the ends) and weights,
/// the pixel centres aligned (`(d + 0.5) * src / dst - 0.5`).
pub(super) fn cubic_taps(src: usize, dst: usize) -> Vec<([usize; 4], [f32; 4])> {
    let scale = src as f64 / dst as f64;
    (0..dst)
        .map(|d| {
            let f = (d as f64 + 0.5) * scale - 0.5;
            let s = f.floor();
            let idx = std::array::from_fn(|k| {
                (s as isize - 1 + k as isize).clamp(0, src as isize - 1) as usize
            });
            (idx, cubic_coeffs(f - s))
        })
        .collect()
}

/// `cv2.resize(..., INTER_CUBIC)` as IPP computes it (within one level; see the module).
pub(super) fn resize_cubic(image: &RgbImage, w: usize, h: usize) -> RgbImage {
    let (w0, h0) = (image.width as usize, image.height as usize);
    let rows = cubic_taps(h0, h);
    let cols = cubic_taps(w0, w);
    // The vertical pass, in f32.
    let mut mid = vec![0f32; h * w0 * 3];
    for (y, (idx, c)) in rows.iter().enumerate() {
        for i in 0..w0 * 3 {
            let mut acc = 0f32;
            for k in 0..4 {
                acc += c[k] * f32::from(image.pixels[idx[k] * w0 * 3 + i]);
            }
            mid[y * w0 * 3 + i] = acc;
        }
    }
    let mut pixels = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        let row = &mid[y * w0 * 3..][..w0 * 3];
        for (idx, c) in &cols {
            for ch in 0..3 {
                let mut acc = 0f32;
                for k in 0..4 {
                    acc += c[k] * row[idx[k] * 3 + ch];
                }
                pixels.push(acc.round_ties_even().clamp(0.0, 255.0) as u8);
            }
        }
    }
    RgbImage {
        width: w as u32,
        height: h as u32,
        pixels,
    }
}

/// `cv2.resize(..., INTER_AREA)` for a shrink (or the same size: a copy).
pub(super) fn resize_area(image: &RgbImage, w: usize, h: usize) -> RgbImage {
    let (w0, h0) = (image.width as usize, image.height as usize);
    if (w, h) == (w0, h0) {
        return image.clone();
    }
    let (sx, sy) = (w0 as f64 / w as f64, h0 as f64 / h as f64);
    let (ix, iy) = (sx.round(), sy.round());
    let pixels = if (sx - ix).abs() < f64::EPSILON && (sy - iy).abs() < f64::EPSILON {
        area_fast(image, w, h, ix as usize, iy as usize)
    } else {
        area_table(image, w, h, sx, sy)
    };
    RgbImage {
        width: w as u32,
        height: h as u32,
        pixels,
    }
}

/// OpenCV's `saturate_cast<uchar>(float)`: `cvRound` (halves to even), clamped.
fn saturate_u8(v: f32) -> u8 {
    v.round_ties_even().clamp(0.0, 255.0) as u8
}

/// `resizeAreaFast_`: whole `sx` x `sy` boxes.
fn area_fast(image: &RgbImage, w: usize, h: usize, sx: usize, sy: usize) -> Vec<u8> {
    let w0 = image.width as usize;
    let px = |y: usize, x: usize, c: usize| u32::from(image.pixels[(y * w0 + x) * 3 + c]);
    let scale = 1.0f32 / (sx * sy) as f32;
    let mut out = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            for c in 0..3 {
                let mut sum = 0u32;
                for dy in 0..sy {
                    for dx in 0..sx {
                        sum += px(y * sy + dy, x * sx + dx, c);
                    }
                }
                out.push(if (sx, sy) == (2, 2) {
                    // `ResizeAreaFastVec`'s 2x2 case.
                    ((sum + 2) >> 2) as u8
                } else {
                    saturate_u8(sum as f32 * scale)
                });
            }
        }
    }
    out
}

/// One axis of `computeResizeAreaTab`: (destination, source, weight) in order.
pub(super) fn area_tab(src: usize, dst: usize, scale: f64) -> Vec<(usize, usize, f32)> {
    let mut tab = Vec::new();
    for d in 0..dst {
        let fs1 = d as f64 * scale;
        let fs2 = fs1 + scale;
        let cell = scale.min(src as f64 - fs1);
        let s2 = (fs2.floor() as usize).min(src - 1);
        let s1 = (fs1.ceil() as usize).min(s2);
        if s1 as f64 - fs1 > 1e-3 {
            tab.push((d, s1 - 1, ((s1 as f64 - fs1) / cell) as f32));
        }
        for s in s1..s2 {
            tab.push((d, s, (1.0 / cell) as f32));
        }
        if fs2 - s2 as f64 > 1e-3 {
            tab.push((d, s2, ((fs2 - s2 as f64).min(1.0).min(cell) / cell) as f32));
        }
    }
    tab
}

/// `ResizeArea_Invoker`: each source row's weighted columns summed into a row buffer, the
/// buffers weighted into the destination row, all in f32.
fn area_table(image: &RgbImage, w: usize, h: usize, sx: f64, sy: f64) -> Vec<u8> {
    let (w0, h0) = (image.width as usize, image.height as usize);
    let xtab = area_tab(w0, w, sx);
    let ytab = area_tab(h0, h, sy);
    let mut out = vec![0u8; w * h * 3];
    let mut sum = vec![0f32; w * 3];
    let mut buf = vec![0f32; w * 3];
    let mut prev_dy = ytab[0].0;
    for &(dy, sy, beta) in &ytab {
        let src = &image.pixels[sy * w0 * 3..][..w0 * 3];
        buf.fill(0.0);
        for &(dx, sx, alpha) in &xtab {
            for c in 0..3 {
                buf[dx * 3 + c] += f32::from(src[sx * 3 + c]) * alpha;
            }
        }
        if dy != prev_dy {
            for (i, s) in sum.iter_mut().enumerate() {
                out[prev_dy * w * 3 + i] = saturate_u8(*s);
                *s = beta * buf[i];
            }
            prev_dy = dy;
        } else {
            for (s, b) in sum.iter_mut().zip(&buf) {
                *s += beta * b;
            }
        }
    }
    for (i, s) in sum.iter().enumerate() {
        out[prev_dy * w * 3 + i] = saturate_u8(*s);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_to_64_with_edge_pixels_and_keeps_the_size_to_crop() {
        let image = RgbImage {
            width: 3,
            height: 2,
            pixels: (0..18).collect(),
        };
        // k = 1: a copy, padded to 64 x 64.
        let p = resize_image_with_pad(&image, 2);
        assert_eq!((p.width, p.height), (3, 2));
        assert_eq!((p.image.width, p.image.height), (64, 64));
        assert_eq!(&p.image.pixels[..9], &image.pixels[..9]);
        assert_eq!(&p.image.pixels[9..12], &image.pixels[6..9]);
        let last_row = &p.image.pixels[63 * 64 * 3..];
        assert_eq!(&last_row[..9], &image.pixels[9..18]);
        let map: Vec<u8> = (0..64 * 64).map(|i| (i % 251) as u8).collect();
        assert_eq!(p.crop_gray(&map), vec![0, 1, 2, 64, 65, 66]);
        assert_eq!((pad64(64), pad64(65), pad64(1)), (0, 63, 63));
    }
}
