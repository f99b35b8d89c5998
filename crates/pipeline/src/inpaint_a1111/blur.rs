//! `cv2.GaussianBlur` on an 8-bit single-channel image with a one-dimensional kernel, as
//! A1111 blurs its masks (`(2 * int(2.5 * sigma + 0.5) + 1, 1)` wide, then the same tall).
//! OpenCV blurs 8-bit images bit-exactly in fixed point (`GaussianBlurFixedPoint`): the
//! kernel from `getGaussianKernelBitExact` rounded to `ufixedpoint16` (8 fractional bits),
//! products summed per pixel, then rounded back to u8; the border is `BORDER_REFLECT_101`.

/// OpenCV's kernel size for A1111's `mask_blur` sigma: `2 * int(2.5 * sigma + 0.5) + 1`.
pub fn kernel_size(sigma: u32) -> usize {
    2 * ((2.5 * sigma as f64 + 0.5) as usize) + 1
}

/// `getGaussianKernelBitExact(n, sigma)` (sigma > 0, n odd) in `ufixedpoint16` as
/// `getGaussianKernelFixedPoint_ED` rounds it: `exp(-x^2 / (2 sigma^2))` over
/// `x = i - (n - 1) / 2` normalised to sum 1, then from the outside in each tap times 256
/// plus the rounding error carried from the last, rounded (half to even); the centre takes
/// what is left of 256, so the taps sum to exactly 1.0.
pub fn fixed_kernel(n: usize, sigma: f64) -> Vec<u32> {
    let scale2x = -0.125 / (sigma * sigma);
    let half = n / 2;
    // OpenCV steps x by 2 from 1 - n: (2i - (n - 1))^2 / 4 is the squared distance.
    let values: Vec<f64> = (0..half)
        .map(|i| {
            let x = (2 * i as i64 + 1 - n as i64) as f64;
            (x * x * scale2x).exp()
        })
        .collect();
    let sum = 2.0 * values.iter().sum::<f64>() + 1.0;
    let mul = 1.0 / sum;
    let mut kernel = vec![0u32; n];
    let (mut err, mut total) = (0.0f64, 0i64);
    for (i, &v) in values.iter().enumerate() {
        let adjusted = v * mul * 256.0 + err;
        let rounded = adjusted.round_ties_even();
        err = adjusted - rounded;
        kernel[i] = rounded as u32;
        kernel[n - 1 - i] = rounded as u32;
        total += rounded as i64;
    }
    kernel[half] = (256 - 2 * total) as u32;
    kernel
}

/// OpenCV's `borderInterpolate` for `BORDER_REFLECT_101` (`gfedcb|abcdefgh|gfedcba`).
fn reflect_101(mut p: i64, len: usize) -> usize {
    let len = len as i64;
    if len == 1 {
        return 0;
    }
    while p < 0 || p >= len {
        p = if p < 0 { -p } else { 2 * (len - 1) - p };
    }
    p as usize
}

/// Blurs `len` samples `stride` apart starting at `start` in place (one row or column).
fn blur_line(pixels: &mut [u8], start: usize, stride: usize, len: usize, kernel: &[u32]) {
    let radius = (kernel.len() / 2) as i64;
    let line: Vec<u8> = (0..len).map(|i| pixels[start + i * stride]).collect();
    for i in 0..len {
        // Horizontal sums are ufixedpoint16 (saturating), the 1-tap pass multiplies by 1.0
        // (256) into ufixedpoint32, which rounds back to u8: (sum + 128) >> 8.
        let sum: u32 = kernel
            .iter()
            .enumerate()
            .map(|(k, &w)| w * line[reflect_101(i as i64 + k as i64 - radius, len)] as u32)
            .sum::<u32>()
            .min(u16::MAX as u32);
        pixels[start + i * stride] = ((sum + 128) >> 8).min(255) as u8;
    }
}

/// `cv2.GaussianBlur(mask, (kernel_size(sigma), 1), sigma)`: along rows.
pub fn blur_horizontal(pixels: &mut [u8], width: usize, height: usize, sigma: u32) {
    let kernel = fixed_kernel(kernel_size(sigma), sigma as f64);
    for y in 0..height {
        blur_line(pixels, y * width, 1, width, &kernel);
    }
}

/// `cv2.GaussianBlur(mask, (1, kernel_size(sigma)), sigma)`: along columns.
pub fn blur_vertical(pixels: &mut [u8], width: usize, height: usize, sigma: u32) {
    let kernel = fixed_kernel(kernel_size(sigma), sigma as f64);
    for x in 0..width {
        blur_line(pixels, x, width, height, &kernel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_sizes_follow_a1111s_rule() {
        assert_eq!(kernel_size(4), 21);
        assert_eq!(kernel_size(1), 7);
        assert_eq!(kernel_size(64), 321);
    }

    #[test]
    fn kernels_are_symmetric_and_sum_to_one() {
        for sigma in [1u32, 4, 16, 64] {
            let k = fixed_kernel(kernel_size(sigma), sigma as f64);
            assert!(k.iter().eq(k.iter().rev()));
            assert_eq!(k.iter().sum::<u32>(), 256, "{sigma}");
        }
    }

    #[test]
    fn reflect_101_mirrors_without_the_edge() {
        let got: Vec<usize> = (-3..8).map(|p| reflect_101(p, 5)).collect();
        assert_eq!(got, [3, 2, 1, 0, 1, 2, 3, 4, 3, 2, 1]);
        // Wider than the line: it bounces on.
        assert_eq!(reflect_101(-7, 3), 1);
    }
}
