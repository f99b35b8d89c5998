//! OpenCV 4.10's `cv2.GaussianBlur(mask, (n, n), sigma)` on a one-channel float64 image
//! (`imgproc/src/smooth.dispatch.cpp`, `filter.simd.hpp`), as facexlib blurs the parse mask:
//!
//! - the kernel is `getGaussianKernel(n, sigma, CV_64F)`, `getGaussianKernelBitExact`:
//!   `exp(x² · (-0.125 / σ²))` at twice the offsets from the centre, normalised by the
//!   reciprocal of their sum (`2 · Σ + 1`, the centre's term being 1);
//! - `sepFilter2D` in f64 (no fixed-point path for float64, no IPP): the row pass sums the
//!   taps left to right (`RowFilter`), the column pass takes the centre row times the centre
//!   tap, then adds each tap times the sum of the rows above and below it (`SymmColumnFilter`
//!   on the symmetric kernel); both with the border `BORDER_REFLECT_101`.

use crate::controlnet::preprocess::gaussian::{kernel_f64, reflect_101};

/// `getGaussianKernel(n, sigma, CV_64F)` for odd `n` and `sigma > 0` (the ControlNet
/// preprocessors' `getGaussianKernelBitExact`).
pub fn gaussian_kernel(n: usize, sigma: f64) -> Vec<f64> {
    assert!(
        n % 2 == 1 && sigma > 0.0,
        "an odd kernel of a positive sigma"
    );
    kernel_f64(n, sigma)
}

/// `cv2.GaussianBlur` of a `w` x `h` float64 image by the symmetric `kernel` (odd length).
pub fn gaussian_blur_f64(src: &[f64], w: usize, h: usize, kernel: &[f64]) -> Vec<f64> {
    assert_eq!(src.len(), w * h, "the image's size");
    let n = kernel.len();
    let half = n / 2;
    let cols: Vec<Vec<usize>> = (0..w)
        .map(|x| {
            (0..n)
                .map(|k| reflect_101(x as isize + k as isize - half as isize, w))
                .collect()
        })
        .collect();
    let mut rows = vec![0.0; w * h];
    for y in 0..h {
        let s = &src[y * w..(y + 1) * w];
        for (x, taps) in cols.iter().enumerate() {
            let mut acc = kernel[0] * s[taps[0]];
            for k in 1..n {
                acc += kernel[k] * s[taps[k]];
            }
            rows[y * w + x] = acc;
        }
    }
    let mut out = vec![0.0; w * h];
    for y in 0..h {
        let d = &mut out[y * w..(y + 1) * w];
        for (x, v) in d.iter_mut().enumerate() {
            *v = kernel[half] * rows[y * w + x] + 0.0;
        }
        for k in 1..=half {
            let below = reflect_101(y as isize + k as isize, h) * w;
            let above = reflect_101(y as isize - k as isize, h) * w;
            let f = kernel[half + k];
            for (x, v) in d.iter_mut().enumerate() {
                *v += f * (rows[below + x] + rows[above + x]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_is_a_normalised_gaussian() {
        let k = gaussian_kernel(101, 11.0);
        assert_eq!(k.len(), 101);
        assert!((k.iter().sum::<f64>() - 1.0).abs() < 1e-15);
        for i in 0..50 {
            assert_eq!(k[i], k[100 - i]);
            let ratio = k[50 + i + 1] / k[50 + i];
            let want = (-(((i + 1) * (i + 1) - i * i) as f64) / (2.0 * 121.0)).exp();
            assert!((ratio - want).abs() < 1e-13, "{i}: {ratio} against {want}");
        }
    }

    #[test]
    fn a_flat_image_stays_flat_and_a_point_spreads_as_the_kernel() {
        let k = gaussian_kernel(5, 1.0);
        let flat = gaussian_blur_f64(&[3.0; 6 * 4], 6, 4, &k);
        assert!(flat.iter().all(|v| (v - 3.0).abs() < 1e-14), "{flat:?}");
        // A point far from the borders: the outer product of the kernel.
        let (w, h) = (11, 9);
        let mut point = vec![0.0; w * h];
        point[4 * w + 5] = 1.0;
        let out = gaussian_blur_f64(&point, w, h, &k);
        for y in 2..7 {
            for x in 3..8 {
                let want = k[y - 2] * k[x - 3];
                assert!((out[y * w + x] - want).abs() < 1e-16, "({x}, {y})");
            }
        }
        assert_eq!(out[0], 0.0);
    }
}
