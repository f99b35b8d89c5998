//! OpenCV 4.10's `cv2.invertAffineTransform` and `cv2.warpAffine` with `INTER_LINEAR` (and
//! `INTER_AREA`, which warpAffine runs as linear) and `BORDER_CONSTANT` 0, as facexlib's
//! paste calls them (`modules/imgproc/src/imgwarp.cpp`, before 4.11's rewrite):
//!
//! - the matrix given maps source to destination; warpAffine inverts it (the same formula as
//!   `invertAffineTransform`) to map each destination pixel back;
//! - each destination pixel's source position is computed in fixed point: the matrix's terms
//!   times 2^10 (`AB_BITS`), rounded to even, per row and per column, plus half of a 1/32
//!   step, then shifted down to 1/32 pixel (`INTER_BITS` 5): an integer pixel (saturated to
//!   16 bits) and a fraction index `fy * 32 + fx`;
//! - the four neighbours are weighed by the fraction's bilinear table: for 8-bit images its
//!   weights times 2^15 (`INTER_REMAP_COEF_BITS`), rounded, the sum `(s + 2^14) >> 15`; for
//!   float images the f32 weights (exact: multiples of 1/1024), summed in the sample type;
//! - a pixel whose 2x2 neighbourhood lies inside the image reads it; one wholly outside
//!   (`sx >= w || sx + 1 < 0`, likewise y) is the border value; one across the edge reads the
//!   border value for each neighbour outside.

use std::sync::OnceLock;

/// A 2x3 affine matrix as OpenCV and facexlib hold it: `[[a, b, tx], [c, d, ty]]`.
pub type Affine = [[f64; 3]; 2];

const INTER_BITS: i32 = 5;
const INTER_TAB_SIZE: i32 = 1 << INTER_BITS;
const AB_BITS: i32 = 10;
const AB_SCALE: f64 = (1 << AB_BITS) as f64;
/// Half a 1/32 step, in `AB_BITS` fixed point: the shift to 1/32 rounds to nearest.
const ROUND_DELTA: i32 = (1 << AB_BITS) / INTER_TAB_SIZE / 2;
const REMAP_COEF_BITS: i32 = 15;
const REMAP_COEF_SCALE: i32 = 1 << REMAP_COEF_BITS;

/// `cv2.invertAffineTransform` (and warpAffine's own inversion): the determinant's
/// reciprocal (0 for a singular matrix), in OpenCV's order of operations.
pub fn invert_affine(m: &Affine) -> Affine {
    let d = m[0][0] * m[1][1] - m[0][1] * m[1][0];
    let d = if d != 0.0 { 1.0 / d } else { 0.0 };
    let (a11, a22) = (m[1][1] * d, m[0][0] * d);
    let (a12, a21) = (-m[0][1] * d, -m[1][0] * d);
    let b1 = -a11 * m[0][2] - a12 * m[1][2];
    let b2 = -a21 * m[0][2] - a22 * m[1][2];
    [[a11, a12, b1], [a21, a22, b2]]
}

/// `saturate_cast<int>(double)`: rounded half to even (`cvRound`), saturated.
fn round_i32(v: f64) -> i32 {
    v.round_ties_even() as i32
}

/// OpenCV's `BilinearTab_f`: for fraction index `fy * 32 + fx`, the weights of the
/// neighbours (top-left, top-right, bottom-left, bottom-right) in f32.
fn float_table() -> &'static [[f32; 4]] {
    static TABLE: OnceLock<Vec<[f32; 4]>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let scale = 1.0f32 / INTER_TAB_SIZE as f32;
        let one_d = |i: i32| [1.0 - i as f32 * scale, i as f32 * scale];
        (0..INTER_TAB_SIZE * INTER_TAB_SIZE)
            .map(|k| {
                let (y, x) = (one_d(k / INTER_TAB_SIZE), one_d(k % INTER_TAB_SIZE));
                [y[0] * x[0], y[0] * x[1], y[1] * x[0], y[1] * x[1]]
            })
            .collect()
    })
}

/// OpenCV's `BilinearTab_i`: [`float_table`] times 2^15, rounded and saturated to i16, an
/// entry whose sum is not 2^15 corrected as `initInterTab2D` does. Only the first entry
/// (weight 1 saturating to 32767) needs it; OpenCV's search for the largest weight there
/// reads past the entry into the next ones (still zero while the table is built) and lands
/// on the last weight, which takes the missing 1. Any placement gives the same bytes.
fn fixed_table() -> &'static [[i32; 4]] {
    static TABLE: OnceLock<Vec<[i32; 4]>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let n = float_table().len();
        // Flat as OpenCV's, with room for the search's reads past the last entry.
        let mut itab = vec![0i32; 4 * n + 4];
        for (e, weights) in float_table().iter().enumerate() {
            let base = 4 * e;
            let mut sum = 0;
            for (k, &v) in weights.iter().enumerate() {
                let q = (v * REMAP_COEF_SCALE as f32).round_ties_even() as i32;
                itab[base + k] = q.clamp(i16::MIN as i32, i16::MAX as i32);
                sum += itab[base + k];
            }
            if sum != REMAP_COEF_SCALE {
                let diff = sum - REMAP_COEF_SCALE;
                let at = |k1: usize, k2: usize| base + k1 * 2 + k2;
                let (mut min, mut max) = (at(1, 1), at(1, 1));
                for k1 in 1..3 {
                    for k2 in 1..3 {
                        if itab[at(k1, k2)] < itab[min] {
                            min = at(k1, k2);
                        } else if itab[at(k1, k2)] > itab[max] {
                            max = at(k1, k2);
                        }
                    }
                }
                let fix = if diff < 0 { max } else { min };
                itab[fix] -= diff;
            }
        }
        itab.chunks_exact(4)
            .take(n)
            .map(|c| [c[0], c[1], c[2], c[3]])
            .collect()
    })
}

/// Each destination pixel's source pixel (saturated to i16, as OpenCV stores them) and
/// fraction index, row-major, for the inverse map `inv`.
fn source_positions(inv: &Affine, dw: usize, dh: usize) -> Vec<(i32, i32, usize)> {
    let shift = AB_BITS - INTER_BITS;
    let adelta: Vec<i32> = (0..dw)
        .map(|x| round_i32(inv[0][0] * x as f64 * AB_SCALE))
        .collect();
    let bdelta: Vec<i32> = (0..dw)
        .map(|x| round_i32(inv[1][0] * x as f64 * AB_SCALE))
        .collect();
    let mut out = Vec::with_capacity(dw * dh);
    for y in 0..dh {
        let x0 = round_i32((inv[0][1] * y as f64 + inv[0][2]) * AB_SCALE) + ROUND_DELTA;
        let y0 = round_i32((inv[1][1] * y as f64 + inv[1][2]) * AB_SCALE) + ROUND_DELTA;
        for x in 0..dw {
            let sx = x0.wrapping_add(adelta[x]) >> shift;
            let sy = y0.wrapping_add(bdelta[x]) >> shift;
            let frac = ((sy & (INTER_TAB_SIZE - 1)) * INTER_TAB_SIZE + (sx & (INTER_TAB_SIZE - 1)))
                as usize;
            let clamp16 = |v: i32| (v >> INTER_BITS).clamp(i16::MIN as i32, i16::MAX as i32);
            out.push((clamp16(sx), clamp16(sy), frac));
        }
    }
    out
}

/// The warp of `src` (`sw` x `sh`, `cn` interleaved channels) to `dw` x `dh` by the forward
/// matrix `m`, each pixel from its four neighbours through `blend` (`border`: each channel's
/// value outside the source).
#[allow(clippy::too_many_arguments)]
fn warp<T: Copy>(
    src: &[T],
    (sw, sh, cn): (usize, usize, usize),
    m: &Affine,
    (dw, dh): (usize, usize),
    border: &[T],
    blend: impl Fn([T; 4], usize) -> T,
) -> Vec<T> {
    assert_eq!(src.len(), sw * sh * cn, "the source's size");
    assert_eq!(border.len(), cn, "a border value per channel");
    let (w, h) = (sw as i32, sh as i32);
    let mut out: Vec<T> = border.iter().copied().cycle().take(dw * dh * cn).collect();
    for (i, &(sx, sy, frac)) in source_positions(&invert_affine(m), dw, dh)
        .iter()
        .enumerate()
    {
        let d = &mut out[i * cn..(i + 1) * cn];
        if sx >= w || sx + 1 < 0 || sy >= h || sy + 1 < 0 {
            continue;
        }
        let inside = |x: i32, y: i32| (0..w).contains(&x) && (0..h).contains(&y);
        let at = |x: i32, y: i32, c: usize| match inside(x, y) {
            true => src[(y as usize * sw + x as usize) * cn + c],
            false => border[c],
        };
        for (c, v) in d.iter_mut().enumerate() {
            let near = [
                at(sx, sy, c),
                at(sx + 1, sy, c),
                at(sx, sy + 1, c),
                at(sx + 1, sy + 1, c),
            ];
            *v = blend(near, frac);
        }
    }
    out
}

/// `cv2.warpAffine(src, m, (dw, dh))` of an 8-bit image of `cn` interleaved channels:
/// `INTER_LINEAR`, `BORDER_CONSTANT` 0.
pub fn warp_affine_u8(
    src: &[u8],
    (sw, sh, cn): (usize, usize, usize),
    m: &Affine,
    (dw, dh): (usize, usize),
) -> Vec<u8> {
    warp_affine_u8_border(src, (sw, sh, cn), m, (dw, dh), &vec![0; cn])
}

/// [`warp_affine_u8`] with `borderValue` (one value per channel, in the image's order).
pub fn warp_affine_u8_border(
    src: &[u8],
    (sw, sh, cn): (usize, usize, usize),
    m: &Affine,
    (dw, dh): (usize, usize),
    border: &[u8],
) -> Vec<u8> {
    let table = fixed_table();
    warp(src, (sw, sh, cn), m, (dw, dh), border, |v, frac| {
        let w = &table[frac];
        let s = v[0] as i32 * w[0] + v[1] as i32 * w[1] + v[2] as i32 * w[2] + v[3] as i32 * w[3];
        ((s + (1 << (REMAP_COEF_BITS - 1))) >> REMAP_COEF_BITS).clamp(0, 255) as u8
    })
}

/// `cv2.warpAffine(src, m, (dw, dh), flags=INTER_LINEAR or INTER_AREA)` of a one-channel
/// float64 image, `BORDER_CONSTANT` 0: the f32 weights, summed in f64 in OpenCV's order.
pub fn warp_affine_f64(
    src: &[f64],
    (sw, sh): (usize, usize),
    m: &Affine,
    (dw, dh): (usize, usize),
) -> Vec<f64> {
    let table = float_table();
    warp(src, (sw, sh, 1), m, (dw, dh), &[0.0], |v, frac| {
        let w = &table[frac];
        v[0] * w[0] as f64 + v[1] * w[1] as f64 + v[2] * w[2] as f64 + v[3] * w[3] as f64
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_inverse_of_the_inverse_is_the_matrix() {
        let m = [[2.5, -0.75, 13.0], [0.75, 2.5, -7.25]];
        let back = invert_affine(&invert_affine(&m));
        for r in 0..2 {
            for c in 0..3 {
                assert!((back[r][c] - m[r][c]).abs() < 1e-12, "{back:?}");
            }
        }
        // A scale by 2 with a shift: exact in binary.
        let inv = invert_affine(&[[2.0, 0.0, 4.0], [0.0, 2.0, -6.0]]);
        assert_eq!(inv, [[0.5, 0.0, -2.0], [0.0, 0.5, 3.0]]);
        // OpenCV's singular matrix: a zero determinant's reciprocal is 0.
        assert_eq!(
            invert_affine(&[[1.0, 2.0, 3.0], [2.0, 4.0, 5.0]])[0][0],
            0.0
        );
    }

    #[test]
    fn the_fixed_point_table_sums_to_one_and_corrects_only_the_first_entry() {
        let t = fixed_table();
        assert_eq!(t.len(), 1024);
        assert!(t.iter().all(|w| w.iter().sum::<i32>() == REMAP_COEF_SCALE));
        assert_eq!(t[0], [32767, 0, 0, 1]);
        // Half a pixel each way: a quarter to each neighbour.
        assert_eq!(t[16 * 32 + 16], [8192; 4]);
        assert_eq!(t[1], [31744, 1024, 0, 0]);
    }

    #[test]
    fn whole_pixel_shifts_copy_and_half_pixels_average_with_rounding() {
        // 3x2, one channel: a shift by one pixel right copies, the uncovered column is 0.
        let src = [10u8, 20, 30, 40, 50, 60];
        let shift = [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]];
        assert_eq!(
            warp_affine_u8(&src, (3, 2, 1), &shift, (3, 2)),
            [0, 10, 20, 0, 40, 50]
        );
        // Half a pixel left: each pixel the mean of two, (a + b) / 2 rounded half up in
        // fixed point; the last column reads the border 0 beside 30 (and 60).
        let half = [[1.0, 0.0, -0.5], [0.0, 1.0, 0.0]];
        assert_eq!(
            warp_affine_u8(&[10u8, 21, 30, 40, 51, 60], (3, 2, 1), &half, (3, 2)),
            [16, 26, 15, 46, 56, 30]
        );
        let f = warp_affine_f64(&[1.0, 2.0, 4.0, 8.0], (2, 2), &half, (2, 2));
        assert_eq!(f, [1.5, 1.0, 6.0, 4.0]);
    }

    #[test]
    fn the_identity_copies_and_a_shift_pads_with_each_channels_border() {
        let im: Vec<u8> = (0..7 * 5 * 3).map(|i| (i * 37 % 251) as u8).collect();
        let id = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]];
        assert_eq!(
            warp_affine_u8_border(&im, (7, 5, 3), &id, (7, 5), &[1, 2, 3]),
            im
        );
        // Shifted right by 2: the first two columns are the border, the rest the picture.
        let shift = [[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]];
        let out = warp_affine_u8_border(&im, (7, 5, 3), &shift, (7, 5), &[1, 2, 3]);
        assert_eq!(&out[..6], &[1, 2, 3, 1, 2, 3]);
        assert_eq!(&out[6..9], &im[..3]);
    }

    #[test]
    fn half_a_pixel_mixes_the_edge_with_the_border() {
        // Shift by -0.5: each pixel the rounded mean of two neighbours; the last column mixes
        // with the border.
        let im = [10, 20, 30, 11, 40, 255];
        let half = [[1.0, 0.0, -0.5], [0.0, 1.0, 0.0]];
        let out = warp_affine_u8_border(&im, (2, 1, 3), &half, (2, 1), &[0, 0, 200]);
        assert_eq!(out, vec![11, 30, 143, 6, 20, 228]);
    }
}
