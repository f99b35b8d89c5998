//! OpenCV's `cv2.resize` with `INTER_LANCZOS4` (`imgproc/src/resize.cpp`, `resizeGeneric_`),
//! which OpenPose's `smart_resize` uses to enlarge, and `INTER_AREA` of a float map: each
//! destination pixel's 8 taps around `(d + 0.5) * scale - 0.5` (f32, `scale` = 1 /
//! (dst / src) as OpenCV takes it), edges clamped, the horizontal pass then the vertical.
//! The weights are `interpolateLanczos4`'s: `sin(πy/4)·sin(πy)/(πy/4)²`-style taps from a
//! double sine, each an f32, normalized by their f32 sum. f32 maps accumulate in f32 (the
//! vertical pass in two halves of four, as OpenCV's vector loop adds them); 8-bit images in
//! fixed point (weights times 2048 rounded to i16, `(sum + 2^21) >> 22`).

use super::resize::area_tab;
use crate::pipeline::RgbImage;

/// `interpolateLanczos4(x)`.
fn lanczos4(x: f32) -> [f32; 8] {
    const S45: f64 = std::f64::consts::FRAC_1_SQRT_2;
    const CS: [[f64; 2]; 8] = [
        [1.0, 0.0],
        [-S45, -S45],
        [0.0, 1.0],
        [S45, -S45],
        [-1.0, 0.0],
        [S45, S45],
        [0.0, -1.0],
        [-S45, S45],
    ];
    let y0 = -f64::from(x + 3.0) * std::f64::consts::PI * 0.25;
    let (s0, c0) = (y0.sin(), y0.cos());
    let mut coeffs = [0f32; 8];
    let mut sum = 0f32;
    for (i, c) in coeffs.iter_mut().enumerate() {
        let yi = x + 3.0 - i as f32;
        *c = if yi.abs() >= 1e-6 {
            let y = -f64::from(yi) * std::f64::consts::PI * 0.25;
            ((CS[i][0] * s0 + CS[i][1] * c0) / (y * y)) as f32
        } else {
            1e30
        };
        sum += *c;
    }
    let inv = 1.0 / sum;
    coeffs.map(|c| c * inv)
}

/// Each destination index's first source tap (`floor(f) - 3`) and its 8 weights.
fn taps(src: usize, dst: usize) -> Vec<(isize, [f32; 8])> {
    let scale = 1.0 / (dst as f64 / src as f64);
    (0..dst)
        .map(|d| {
            let f = ((d as f64 + 0.5) * scale - 0.5) as f32;
            let s = f.floor();
            (s as isize - 3, lanczos4(f - s))
        })
        .collect()
}

fn clamp(i: isize, n: usize) -> usize {
    i.clamp(0, n as isize - 1) as usize
}

/// `cv2.resize(map, (dw, dh), interpolation=INTER_LANCZOS4)` of a one-channel f32 map.
pub fn resize_lanczos4_f32(src: &[f32], sw: usize, sh: usize, dw: usize, dh: usize) -> Vec<f32> {
    if (sw, sh) == (dw, dh) {
        return src.to_vec();
    }
    let xs = taps(sw, dw);
    let ys = taps(sh, dh);
    let rows: Vec<Vec<f32>> = (0..sh)
        .map(|y| {
            let row = &src[y * sw..][..sw];
            xs.iter()
                .map(|&(s, a)| {
                    let mut v = 0f32;
                    for (j, &w) in a.iter().enumerate() {
                        v += row[clamp(s + j as isize, sw)] * w;
                    }
                    v
                })
                .collect()
        })
        .collect();
    let mut out = Vec::with_capacity(dw * dh);
    for &(s, b) in &ys {
        let r: Vec<&Vec<f32>> = (0..8).map(|k| &rows[clamp(s + k, sh)]).collect();
        out.extend((0..dw).map(|x| {
            let lo = r[0][x] * b[0] + r[1][x] * b[1] + r[2][x] * b[2] + r[3][x] * b[3];
            let hi = r[4][x] * b[4] + r[5][x] * b[5] + r[6][x] * b[6] + r[7][x] * b[7];
            lo + hi
        }));
    }
    out
}

/// The same for an 8-bit RGB image, in OpenCV's fixed point.
pub fn resize_lanczos4_u8(image: &RgbImage, dw: usize, dh: usize) -> RgbImage {
    let (sw, sh) = (image.width as usize, image.height as usize);
    if (sw, sh) == (dw, dh) {
        return image.clone();
    }
    let fixed =
        |a: [f32; 8]| a.map(|w| (w * 2048.0).round_ties_even().clamp(-32768.0, 32767.0) as i32);
    let xs: Vec<(isize, [i32; 8])> = taps(sw, dw)
        .into_iter()
        .map(|(s, a)| (s, fixed(a)))
        .collect();
    let ys: Vec<(isize, [i32; 8])> = taps(sh, dh)
        .into_iter()
        .map(|(s, a)| (s, fixed(a)))
        .collect();
    let rows: Vec<Vec<i32>> = (0..sh)
        .map(|y| {
            let row = &image.pixels[y * sw * 3..][..sw * 3];
            let mut out = Vec::with_capacity(dw * 3);
            for &(s, a) in &xs {
                for c in 0..3 {
                    let mut v = 0i32;
                    for (j, &w) in a.iter().enumerate() {
                        v += i32::from(row[clamp(s + j as isize, sw) * 3 + c]) * w;
                    }
                    out.push(v);
                }
            }
            out
        })
        .collect();
    let mut pixels = Vec::with_capacity(dw * dh * 3);
    for &(s, b) in &ys {
        let r: Vec<&Vec<i32>> = (0..8).map(|k| &rows[clamp(s + k, sh)]).collect();
        pixels.extend((0..dw * 3).map(|x| {
            let v: i64 = r
                .iter()
                .zip(b)
                .map(|(row, w)| i64::from(row[x]) * i64::from(w))
                .sum();
            ((v + (1 << 21)) >> 22).clamp(0, 255) as u8
        }));
    }
    RgbImage {
        width: dw as u32,
        height: dh as u32,
        pixels,
    }
}

/// `cv2.resize(map, (dw, dh), interpolation=INTER_AREA)` of a one-channel f32 map shrunk:
/// whole boxes averaged for an integer scale, OpenCV's area table otherwise.
pub fn resize_area_f32(src: &[f32], sw: usize, sh: usize, dw: usize, dh: usize) -> Vec<f32> {
    if (sw, sh) == (dw, dh) {
        return src.to_vec();
    }
    let (sx, sy) = (sw as f64 / dw as f64, sh as f64 / dh as f64);
    let (ix, iy) = (sx.round(), sy.round());
    if (sx - ix).abs() < f64::EPSILON && (sy - iy).abs() < f64::EPSILON {
        let (ix, iy) = (ix as usize, iy as usize);
        let scale = 1.0f32 / (ix * iy) as f32;
        let mut out = Vec::with_capacity(dw * dh);
        for y in 0..dh {
            for x in 0..dw {
                let mut sum = 0f32;
                for dy in 0..iy {
                    for dx in 0..ix {
                        sum += src[(y * iy + dy) * sw + x * ix + dx];
                    }
                }
                out.push(sum * scale);
            }
        }
        return out;
    }
    let xtab = area_tab(sw, dw, sx);
    let ytab = area_tab(sh, dh, sy);
    let mut out = vec![0f32; dw * dh];
    let mut sum = vec![0f32; dw];
    let mut buf = vec![0f32; dw];
    let mut prev = ytab[0].0;
    for &(dy, y, beta) in &ytab {
        let row = &src[y * sw..][..sw];
        buf.fill(0.0);
        for &(dx, x, alpha) in &xtab {
            buf[dx] += row[x] * alpha;
        }
        if dy != prev {
            out[prev * dw..][..dw].copy_from_slice(&sum);
            for (s, b) in sum.iter_mut().zip(&buf) {
                *s = beta * b;
            }
            prev = dy;
        } else {
            for (s, b) in sum.iter_mut().zip(&buf) {
                *s += beta * b;
            }
        }
    }
    out[prev * dw..][..dw].copy_from_slice(&sum);
    out
}
