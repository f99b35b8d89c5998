//! OpenCV's `cv2.GaussianBlur(image, (0, 0), sigma)` (`imgproc/src/smooth.dispatch.cpp`) on
//! 8-bit and 32-bit float RGB images, border `BORDER_REFLECT_101` (OpenCV's default).
//!
//! The kernel is `getGaussianKernelBitExact`'s: `exp(-x² / (2σ²))` for the taps off the
//! centre, normalised by their sum in f64 (OpenCV's softdouble, the same IEEE operations;
//! `exp` from libm). Its size is `cvRound(σ · 3 · 2 + 1) | 1` for 8-bit images and
//! `cvRound(σ · 4 · 2 + 1) | 1` for float ones; a side of one pixel takes a one-tap kernel.
//!
//! 8-bit images take OpenCV's bit-exact fixed-point path (`GaussianBlurFixedPoint`): the
//! kernel in 8 fraction bits by error diffusion (`getGaussianKernelFixedPoint_ED`, the centre
//! taking what makes the sum 256), the horizontal pass into 16-bit values, the vertical into
//! 32-bit ones rounded `(v + 2^15) >> 16`: integer arithmetic, so OpenCV's result bit for bit.
//! Float images take `sepFilter2D` in f32: the row pass accumulating the taps in order, the
//! column pass pairing the symmetric rows (OpenCV's `RowVec_32f`, `SymmColumnVec_32f`, with
//! fused multiply-adds); the summation order of OpenCV's SIMD tails may differ in the last
//! bits (`tests/integration/controlnet_preprocess_modules.rs` holds the bound).

/// OpenCV's `borderInterpolate(p, len, BORDER_REFLECT_101)`, repeated until inside (a kernel
/// wider than the image reflects more than once).
pub(crate) fn reflect_101(p: isize, len: usize) -> usize {
    if len == 1 {
        return 0;
    }
    let n = len as isize;
    let mut p = p;
    while p < 0 || p >= n {
        p = if p < 0 { -p } else { 2 * n - 2 - p };
    }
    p as usize
}

/// `cvRound(sigma * per_side * 2 + 1) | 1`.
fn kernel_size(sigma: f64, per_side: f64) -> usize {
    ((sigma * per_side * 2.0 + 1.0).round_ties_even() as usize) | 1
}

/// `getGaussianKernelBitExact(n, sigma)` for odd `n` and `sigma > 0`.
pub(crate) fn kernel_f64(n: usize, sigma: f64) -> Vec<f64> {
    let scale2x = -0.125 / (sigma * sigma);
    let half = (n - 1) / 2;
    // x runs over 1 - n, 3 - n, ...: twice the distance from the centre.
    let values: Vec<f64> = (0..half)
        .map(|i| {
            let x = 1 - n as i64 + 2 * i as i64;
            ((x * x) as f64 * scale2x).exp()
        })
        .collect();
    let mut sum = 0.0;
    for v in &values {
        sum += v;
    }
    sum = sum * 2.0 + 1.0;
    let mul = 1.0 / sum;
    let mut k = vec![0.0; n];
    for (i, v) in values.iter().enumerate() {
        k[i] = v * mul;
        k[n - 1 - i] = k[i];
    }
    k[half] = mul;
    k
}

/// `getGaussianKernelFixedPoint_ED(kernel, 8)`: taps in 1/256, the rounding error carried to
/// the next tap, the centre making the sum exactly 256.
fn kernel_fixed(kernel: &[f64]) -> Vec<u32> {
    let n = kernel.len();
    let half = n / 2;
    let mut out = vec![0i64; n];
    let (mut err, mut sum) = (0.0f64, 0i64);
    for i in 0..half {
        let adjusted = kernel[i] * 256.0 + err;
        let v = adjusted.round_ties_even() as i64;
        err = adjusted - v as f64;
        out[i] = v;
        out[n - 1 - i] = v;
        sum += v;
    }
    out[half] = 256 - 2 * sum;
    out.into_iter().map(|v| v as u32).collect()
}

/// The kernel for one axis of `len` pixels: one tap when the side is one pixel.
fn axis_kernel(len: usize, sigma: f64, per_side: f64) -> Vec<f64> {
    if len == 1 {
        return vec![1.0];
    }
    let n = kernel_size(sigma, per_side);
    if n == 1 {
        vec![1.0]
    } else {
        kernel_f64(n, sigma)
    }
}

/// `cv2.GaussianBlur(image, (0, 0), sigma)` of a `width` x `height` x 3 8-bit image.
pub fn gaussian_blur_u8(pixels: &[u8], width: usize, height: usize, sigma: f64) -> Vec<u8> {
    let kx = kernel_fixed(&axis_kernel(width, sigma, 3.0));
    let ky = kernel_fixed(&axis_kernel(height, sigma, 3.0));
    if kx.len() == 1 && ky.len() == 1 {
        return pixels.to_vec();
    }
    let (rx, ry) = ((kx.len() / 2) as isize, (ky.len() / 2) as isize);
    let taps_x: Vec<Vec<usize>> = (0..width as isize)
        .map(|x| {
            (0..kx.len() as isize)
                .map(|i| reflect_101(x + i - rx, width))
                .collect()
        })
        .collect();
    // The horizontal pass: 8.8 fixed point (at most 255 · 256, no saturation).
    let mut rows = vec![0u32; width * height * 3];
    for y in 0..height {
        let src = &pixels[y * width * 3..][..width * 3];
        for (x, taps) in taps_x.iter().enumerate() {
            for c in 0..3 {
                rows[(y * width + x) * 3 + c] = taps
                    .iter()
                    .zip(&kx)
                    .map(|(&sx, &k)| k * u32::from(src[sx * 3 + c]))
                    .sum();
            }
        }
    }
    // The vertical pass: 16 fraction bits, rounded to the nearest (`v_rshr_pack<16>`).
    let mut out = vec![0u8; width * height * 3];
    for y in 0..height {
        let src_rows: Vec<usize> = (0..ky.len() as isize)
            .map(|j| reflect_101(y as isize + j - ry, height))
            .collect();
        for i in 0..width * 3 {
            let v: u32 = src_rows
                .iter()
                .zip(&ky)
                .map(|(&sy, &k)| k * rows[sy * width * 3 + i])
                .sum();
            out[y * width * 3 + i] = ((v + (1 << 15)) >> 16).min(255) as u8;
        }
    }
    out
}

/// `cv2.GaussianBlur(image, (0, 0), sigma)` of a `width` x `height` x 3 float image.
pub fn gaussian_blur_f32(pixels: &[f32], width: usize, height: usize, sigma: f64) -> Vec<f32> {
    let kx: Vec<f32> = axis_kernel(width, sigma, 4.0)
        .iter()
        .map(|&k| k as f32)
        .collect();
    let ky: Vec<f32> = axis_kernel(height, sigma, 4.0)
        .iter()
        .map(|&k| k as f32)
        .collect();
    if kx.len() == 1 && ky.len() == 1 {
        return pixels.to_vec();
    }
    let (rx, ry) = ((kx.len() / 2) as isize, ky.len() / 2);
    let mut rows = vec![0f32; width * height * 3];
    for y in 0..height {
        let src = &pixels[y * width * 3..][..width * 3];
        for x in 0..width {
            for c in 0..3 {
                let mut s = 0f32;
                for (i, k) in kx.iter().enumerate() {
                    let sx = reflect_101(x as isize + i as isize - rx, width);
                    s = src[sx * 3 + c].mul_add(*k, s);
                }
                rows[(y * width + x) * 3 + c] = s;
            }
        }
    }
    let mut out = vec![0f32; width * height * 3];
    for y in 0..height {
        let row = |d: isize| &rows[reflect_101(y as isize + d, height) * width * 3..][..width * 3];
        let centre = row(0);
        for i in 0..width * 3 {
            let mut s = centre[i] * ky[ry];
            for d in 1..=ry {
                let pair = row(d as isize)[i] + row(-(d as isize))[i];
                s = pair.mul_add(ky[ry + d], s);
            }
            out[y * width * 3 + i] = s;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_are_opencv_s() {
        // Sizes: `cvRound(σ·6 + 1) | 1` for 8 bits, `cvRound(σ·8 + 1) | 1` for floats.
        assert_eq!(kernel_size(9.0, 3.0), 55);
        assert_eq!(kernel_size(0.5, 4.0), 5);
        assert_eq!(kernel_size(5.0, 4.0), 41);
        assert_eq!(kernel_size(0.01, 3.0), 1);
        let k = kernel_f64(5, 0.5);
        assert!((k.iter().sum::<f64>() - 1.0).abs() < 1e-15);
        let fixed = kernel_fixed(&kernel_f64(55, 9.0));
        assert_eq!(fixed.iter().sum::<u32>(), 256);
        assert_eq!(fixed, fixed.iter().rev().copied().collect::<Vec<_>>());
    }

    #[test]
    fn reflect_101_mirrors_without_repeating_the_edge_even_twice_over() {
        let seq: Vec<usize> = (-5..8).map(|p| reflect_101(p, 3)).collect();
        assert_eq!(seq, vec![1, 0, 1, 2, 1, 0, 1, 2, 1, 0, 1, 2, 1]);
        assert_eq!(reflect_101(-3, 1), 0);
    }

    #[test]
    fn a_flat_image_stays_flat_and_a_one_pixel_image_is_copied() {
        let flat = vec![77u8; 9 * 7 * 3];
        assert_eq!(gaussian_blur_u8(&flat, 9, 7, 2.0), flat);
        let one = vec![1u8, 2, 3];
        assert_eq!(gaussian_blur_u8(&one, 1, 1, 30.0), one);
        let f: Vec<f32> = flat.iter().map(|&v| f32::from(v)).collect();
        assert!(gaussian_blur_f32(&f, 9, 7, 2.0)
            .iter()
            .all(|v| (v - 77.0).abs() < 1e-3));
    }
}
