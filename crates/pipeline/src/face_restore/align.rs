//! The aligned 512x512 face crop of facexlib's `FaceRestoreHelper.align_warp_face` (A1111's
//! `face_size=512, crop_ratio=(1, 1)`): the similarity transform from a face's five landmarks
//! to FFHQ's five-point template, `cv2.estimateAffinePartial2D(landmarks, template,
//! method=cv2.LMEDS)` as OpenCV 4.10 computes it (`calib3d/src/ptsetreg.cpp`, `levmarq.cpp`),
//! then `cv2.warpAffine(picture, M, (512, 512), borderMode=BORDER_CONSTANT,
//! borderValue=(135, 133, 132))` ([`super::warp`]).
//!
//! The estimate, on the points as float32 (OpenCV converts both sets):
//! 1. LMeDS: 13 draws (`RANSACUpdateNumIters(0.99, 0.45, 2, 2000)`) of two distinct points
//!    from OpenCV's `RNG((uint64)-1)` (a multiply-with-carry generator, `uniform(0, 5)` its
//!    next value mod 5); each pair's exact similarity (`AffinePartial2DEstimatorCallback`),
//!    its squared errors over all five points in float32, their median (the third smallest);
//!    the first pair of the lowest median wins;
//! 2. the inliers: squared error at most `sigma^2` (float32), `sigma = 2.5 * 1.4826 *
//!    (1 + 5 / (5 - 2)) * sqrt(median)`, at least 0.001;
//! 3. `LMSolver` (10 iterations at most, eps `FLT_EPSILON`) refining `(a, b, tx, ty)` of
//!    `[[a, -b, tx], [b, a, ty]]` over the inliers (Levenberg-Marquardt with the diagonal of
//!    `J^T J` as the damping, Balda's LMSolve rules).

use super::detect::DetectedFace;
use crate::pipeline::RgbImage;

/// facexlib's "standard 5 landmarks for FFHQ faces with 512 x 512", times `face_size / 512`
/// (1 at A1111's 512; `crop_ratio` (1, 1) moves nothing).
pub const FACE_TEMPLATE: [[f64; 2]; 5] = [
    [192.98138, 239.94708],
    [318.90277, 240.1936],
    [256.63416, 314.01935],
    [201.26117, 371.41043],
    [313.08905, 371.15118],
];
/// A1111's `face_size`.
pub const FACE_SIZE: u32 = 512;
/// `align_warp_face`'s `borderValue=(135, 133, 132)`, given in BGR: RGB (132, 133, 135).
pub const BORDER_RGB: [u8; 3] = [132, 133, 135];

/// `LMeDSPointSetRegistrator`'s outlier ratio and confidence (`estimateAffinePartial2D`'s
/// default 0.99), its points per model, and the Python binding's `maxIters` and
/// `refineIters` defaults.
const OUTLIER_RATIO: f64 = 0.45;
const CONFIDENCE: f64 = 0.99;
const MODEL_POINTS: usize = 2;
const MAX_ITERS: i32 = 2000;
const REFINE_ITERS: usize = 10;

/// OpenCV's `cv::RNG`: multiply-with-carry, `state = lo32(state) * 4164903690 + hi32(state)`.
#[derive(Debug, Clone)]
pub struct CvRng(u64);

impl CvRng {
    pub fn new(seed: u64) -> Self {
        Self(if seed == 0 { 0xffff_ffff } else { seed })
    }

    pub fn next_u32(&mut self) -> u32 {
        self.0 = (self.0 & 0xffff_ffff) * 4_164_903_690 + (self.0 >> 32);
        self.0 as u32
    }

    /// `uniform(a, b)` for ints: `a` when equal, else `next() % (b - a) + a`.
    pub fn uniform(&mut self, a: i32, b: i32) -> i32 {
        if a == b {
            return a;
        }
        (self.next_u32() % (b - a) as u32) as i32 + a
    }
}

/// `RANSACUpdateNumIters(p, ep, model_points, max_iters)`.
pub fn update_num_iters(p: f64, ep: f64, model_points: usize, max_iters: i32) -> i32 {
    let (p, ep) = (p.clamp(0.0, 1.0), ep.clamp(0.0, 1.0));
    let num = (1.0 - p).max(f64::MIN_POSITIVE);
    let denom = 1.0 - (1.0 - ep).powi(model_points as i32);
    if denom < f64::MIN_POSITIVE {
        return 0;
    }
    let (num, denom) = (num.ln(), denom.ln());
    if denom >= 0.0 || -num >= f64::from(max_iters) * -denom {
        max_iters
    } else {
        (num / denom).round_ties_even() as i32
    }
}

/// `AffinePartial2DEstimatorCallback::runKernel`: the similarity taking `from[0..2]` to
/// `to[0..2]`, `[a, -b, tx, b, a, ty]`.
fn two_point_model(from: [[f32; 2]; 2], to: [[f32; 2]; 2]) -> [f64; 6] {
    let [[x1, y1], [x2, y2]] = from.map(|p| p.map(f64::from));
    let [[u1, v1], [u2, v2]] = to.map(|p| p.map(f64::from));
    let d = 1.0 / ((x1 - x2) * (x1 - x2) + (y1 - y2) * (y1 - y2));
    let s0 = d * ((u1 - u2) * (x1 - x2) + (v1 - v2) * (y1 - y2));
    let s1 = d * ((v1 - v2) * (x1 - x2) - (u1 - u2) * (y1 - y2));
    let s2 = d
        * ((v1 - v2) * (x1 * y2 - x2 * y1)
            - (u1 * y2 - u2 * y1) * (y1 - y2)
            - (u1 * x2 - u2 * x1) * (x1 - x2));
    let s3 = d
        * (-(u1 - u2) * (x1 * y2 - x2 * y1)
            - (v1 * x2 - v2 * x1) * (x1 - x2)
            - (v1 * y2 - v2 * y1) * (y1 - y2));
    [s0, -s1, s2, s1, s0, s3]
}

/// `Affine2DEstimatorCallback::computeError`: squared errors in float32, the model cast first.
fn squared_errors(from: &[[f32; 2]], to: &[[f32; 2]], m: &[f64; 6]) -> Vec<f32> {
    let f = m.map(|v| v as f32);
    from.iter()
        .zip(to)
        .map(|(p, t)| {
            let a = f[0] * p[0] + f[1] * p[1] + f[2] - t[0];
            let b = f[3] * p[0] + f[4] * p[1] + f[5] - t[1];
            a * a + b * b
        })
        .collect()
}

/// `LMeDSPointSetRegistrator::run`: the model of the lowest median error and the inliers, or
/// `None` where OpenCV finds none.
pub fn lmeds(from: &[[f32; 2]], to: &[[f32; 2]]) -> Option<([f64; 6], Vec<bool>)> {
    let count = from.len();
    if count < MODEL_POINTS || to.len() != count {
        return None;
    }
    if count == MODEL_POINTS {
        let m = two_point_model([from[0], from[1]], [to[0], to[1]]);
        return Some((m, vec![true; count]));
    }
    let mut rng = CvRng::new(u64::MAX);
    let iters = update_num_iters(CONFIDENCE, OUTLIER_RATIO, MODEL_POINTS, MAX_ITERS).max(3);
    let mut best: Option<([f64; 6], f32)> = None;
    for _ in 0..iters {
        // getSubset: two distinct indices (checkSubset passes any two points).
        let i = rng.uniform(0, count as i32) as usize;
        let j = loop {
            let j = rng.uniform(0, count as i32) as usize;
            if j != i {
                break j;
            }
        };
        let m = two_point_model([from[i], from[j]], [to[i], to[j]]);
        let mut err = squared_errors(from, to, &m);
        err.sort_by(f32::total_cmp);
        let median = err[count / 2];
        if best.is_none_or(|(_, b)| median < b) {
            best = Some((m, median));
        }
    }
    let (model, median) = best?;
    let sigma =
        (2.5 * 1.4826 * (1.0 + 5.0 / (count - MODEL_POINTS) as f64) * f64::from(median).sqrt())
            .max(0.001);
    let t = (sigma * sigma) as f32;
    let inliers: Vec<bool> = squared_errors(from, to, &model)
        .iter()
        .map(|&e| e <= t)
        .collect();
    (inliers.iter().filter(|&&b| b).count() >= MODEL_POINTS).then_some((model, inliers))
}

/// `x` solved from the 4x4 system `a x = b` (Gaussian elimination with partial pivoting;
/// OpenCV's `DECOMP_EIG` of the same symmetric system, to rounding).
fn solve4(mut a: [[f64; 4]; 4], mut b: [f64; 4]) -> [f64; 4] {
    for c in 0..4 {
        let p = (c..4)
            .max_by(|&i, &j| a[i][c].abs().total_cmp(&a[j][c].abs()))
            .unwrap_or(c);
        a.swap(c, p);
        b.swap(c, p);
        for r in c + 1..4 {
            let f = a[r][c] / a[c][c];
            let pivot = a[c];
            for (x, p) in a[r][c..].iter_mut().zip(&pivot[c..]) {
                *x -= f * p;
            }
            b[r] -= f * b[c];
        }
    }
    let mut x = [0f64; 4];
    for c in (0..4).rev() {
        let s: f64 = (c + 1..4).map(|k| a[c][k] * x[k]).sum();
        x[c] = (b[c] - s) / a[c][c];
    }
    x
}

/// The residuals `[x_i - u_i, y_i - v_i]` and Jacobian rows of `AffinePartial2DRefineCallback`.
fn residuals(src: &[[f32; 2]], dst: &[[f32; 2]], h: &[f64; 4]) -> (Vec<f64>, Vec<[f64; 4]>) {
    let mut r = Vec::with_capacity(2 * src.len());
    let mut j = Vec::with_capacity(2 * src.len());
    for (p, q) in src.iter().zip(dst) {
        let (mx, my) = (f64::from(p[0]), f64::from(p[1]));
        r.push(h[0] * mx - h[1] * my + h[2] - f64::from(q[0]));
        r.push(h[1] * mx + h[0] * my + h[3] - f64::from(q[1]));
        j.push([mx, -my, 1.0, 0.0]);
        j.push([my, mx, 0.0, 1.0]);
    }
    (r, j)
}

/// `J^T J` and `J^T r`.
fn normal(r: &[f64], j: &[[f64; 4]]) -> ([[f64; 4]; 4], [f64; 4]) {
    let mut a = [[0f64; 4]; 4];
    let mut v = [0f64; 4];
    for (row, &e) in j.iter().zip(r) {
        for p in 0..4 {
            v[p] += row[p] * e;
            for q in 0..4 {
                a[p][q] += row[p] * row[q];
            }
        }
    }
    (a, v)
}

fn dot(a: &[f64; 4], b: &[f64; 4]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn sum_sq(r: &[f64]) -> f64 {
    r.iter().map(|e| e * e).sum()
}

/// `LMSolverImpl::run` (OpenCV's legacy Levenberg-Marquardt) on `(a, b, tx, ty)`.
pub fn refine(src: &[[f32; 2]], dst: &[[f32; 2]], h: [f64; 4], max_iters: usize) -> [f64; 4] {
    let eps = f64::from(f32::EPSILON);
    let mut x = h;
    let (mut r, j) = residuals(src, dst, &x);
    let mut s = sum_sq(&r);
    let (mut a, mut v) = normal(&r, &j);
    let diag: [f64; 4] = std::array::from_fn(|i| a[i][i]);
    let (r_lo, r_hi) = (0.25, 0.75);
    let (mut lambda, mut lc) = (1.0f64, 0.75f64);
    let mut iter = 0;
    loop {
        let mut ap = a;
        for i in 0..4 {
            ap[i][i] += lambda * diag[i];
        }
        let d = solve4(ap, v);
        let xd: [f64; 4] = std::array::from_fn(|i| x[i] - d[i]);
        let (rd, _) = residuals(src, dst, &xd);
        let sd = sum_sq(&rd);
        // gemm(A, d, -1, v, 2): 2 v - A d.
        let temp: [f64; 4] = std::array::from_fn(|i| 2.0 * v[i] - dot(&a[i], &d));
        let ds = dot(&d, &temp);
        let ratio = (s - sd) / if ds.abs() > f64::EPSILON { ds } else { 1.0 };
        if ratio > r_hi {
            lambda *= 0.5;
            if lambda < lc {
                lambda = 0.0;
            }
        } else if ratio < r_lo {
            let t = dot(&d, &v);
            let mut nu = (sd - s) / if t.abs() > f64::EPSILON { t } else { 1.0 } + 2.0;
            nu = nu.clamp(2.0, 10.0);
            if lambda == 0.0 {
                let inv = invert4(&a);
                let maxval = (0..4).fold(f64::EPSILON, |m, i| m.max(inv[i][i].abs()));
                lambda = 1.0 / maxval;
                lc = lambda;
                nu *= 0.5;
            }
            lambda *= nu;
        }
        if sd < s {
            s = sd;
            x = xd;
            let (r2, j2) = residuals(src, dst, &x);
            r = r2;
            (a, v) = normal(&r, &j2);
        }
        iter += 1;
        let norm_inf = |e: &[f64]| e.iter().fold(0f64, |m, x| m.max(x.abs()));
        if !(iter < max_iters && norm_inf(&d) >= eps && norm_inf(&r) >= eps) {
            break;
        }
    }
    x
}

fn invert4(a: &[[f64; 4]; 4]) -> [[f64; 4]; 4] {
    let cols: [[f64; 4]; 4] = std::array::from_fn(|c| {
        let mut e = [0f64; 4];
        e[c] = 1.0;
        solve4(*a, e)
    });
    std::array::from_fn(|i| std::array::from_fn(|k| cols[k][i]))
}

/// `cv2.estimateAffinePartial2D(from, to, method=cv2.LMEDS)[0]` (Python's defaults:
/// confidence 0.99, maxIters 2000, refineIters 10), `None` where OpenCV returns `None`.
pub fn estimate_affine_partial(from: &[[f32; 2]], to: &[[f32; 2]]) -> Option<[[f64; 3]; 2]> {
    let (m, inliers) = lmeds(from, to)?;
    let mut m = m;
    if from.len() > MODEL_POINTS {
        let src: Vec<[f32; 2]> = from
            .iter()
            .zip(&inliers)
            .filter(|p| *p.1)
            .map(|p| *p.0)
            .collect();
        let dst: Vec<[f32; 2]> = to
            .iter()
            .zip(&inliers)
            .filter(|p| *p.1)
            .map(|p| *p.0)
            .collect();
        let h = refine(&src, &dst, [m[0], m[3], m[2], m[5]], REFINE_ITERS);
        m = [h[0], -h[1], h[2], h[1], h[0], h[3]];
    }
    Some([[m[0], m[1], m[2]], [m[3], m[4], m[5]]])
}

/// facexlib's `affine_matrices` entry for a face: its landmarks to [`FACE_TEMPLATE`] (both as
/// float32, as OpenCV takes them). Landmarks OpenCV cannot fit (two or more coinciding) give
/// a matrix of NaN, where facexlib would fail.
pub fn align_face(landmarks: &[[f32; 2]; 5]) -> [[f64; 3]; 2] {
    let template = FACE_TEMPLATE.map(|p| p.map(|v| v as f32));
    estimate_affine_partial(landmarks, &template).unwrap_or([[f64::NAN; 3]; 2])
}

/// facexlib's crop: `cv2.warpAffine(img, affine, (size, size), borderMode=BORDER_CONSTANT,
/// borderValue=(135, 133, 132))` of the picture (BGR there: [`BORDER_RGB`] here), bilinear in
/// OpenCV's fixed point (`paste::warp`).
pub fn warp_face(image: &RgbImage, affine: &[[f64; 3]; 2], size: u32) -> RgbImage {
    let (w, h) = (image.width as usize, image.height as usize);
    let s = size as usize;
    RgbImage {
        width: size,
        height: size,
        pixels: super::paste::warp_affine_u8_border(
            &image.pixels,
            (w, h, 3),
            affine,
            (s, s),
            &BORDER_RGB,
        ),
    }
}

/// One aligned face: facexlib's affine matrix, its 512x512 crop (RGB) and the detection.
#[derive(Debug, Clone)]
pub struct AlignedFace {
    pub affine: [[f64; 3]; 2],
    pub crop: RgbImage,
    pub face: DetectedFace,
}

/// `get_face_landmarks_5` then `align_warp_face` as A1111 runs them: every face kept, aligned
/// and cropped, in facexlib's order.
pub fn detect_and_align(
    det: &super::detect::RetinaFace,
    image: &RgbImage,
) -> crate::Result<Vec<AlignedFace>> {
    Ok(det
        .detect(image)?
        .into_iter()
        .map(|face| {
            let affine = align_face(&face.landmarks);
            let crop = warp_face(image, &affine, FACE_SIZE);
            AlignedFace { affine, crop, face }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opencv_rng_sequence() {
        // cv::RNG(-1): state = 0xffffffff * 4164903690 + 0xffffffff.
        let mut rng = CvRng::new(u64::MAX);
        let s = 0xffff_ffffu64 * 4_164_903_690 + 0xffff_ffff;
        assert_eq!(rng.next_u32(), s as u32);
        let s2 = (s & 0xffff_ffff) * 4_164_903_690 + (s >> 32);
        assert_eq!(rng.next_u32(), s2 as u32);
        assert_eq!(CvRng::new(0).0, 0xffff_ffff);
        assert_eq!(CvRng::new(7).uniform(3, 3), 3);
    }

    #[test]
    fn lmeds_draws_thirteen_pairs() {
        assert_eq!(update_num_iters(0.99, 0.45, 2, 2000), 13);
        assert_eq!(update_num_iters(0.99, 0.45, 2, 5), 5);
        assert_eq!(update_num_iters(0.99, 0.0, 2, 2000), 0);
    }

    fn similarity(m: [[f64; 3]; 2], p: [f32; 2]) -> [f32; 2] {
        let (x, y) = (f64::from(p[0]), f64::from(p[1]));
        [
            (m[0][0] * x + m[0][1] * y + m[0][2]) as f32,
            (m[1][0] * x + m[1][1] * y + m[1][2]) as f32,
        ]
    }

    #[test]
    fn exact_points_give_their_similarity() {
        // A rotation by 0.3 rad, scale 1.7, shift (40, -12): recovered to float noise.
        let (c, s) = (1.7 * 0.3f64.cos(), 1.7 * 0.3f64.sin());
        let m = [[c, -s, 40.0], [s, c, -12.0]];
        let from = [
            [10.0, 20.0],
            [50.0, 22.0],
            [30.0, 45.0],
            [14.0, 60.0],
            [48.0, 61.0],
        ];
        let to = from.map(|p| similarity(m, p));
        let got = estimate_affine_partial(&from, &to).unwrap();
        for r in 0..2 {
            for k in 0..3 {
                assert!((got[r][k] - m[r][k]).abs() < 1e-4, "{got:?} vs {m:?}");
            }
        }
    }

    #[test]
    fn an_outlier_is_left_out_and_noise_averaged() {
        let m = [[0.8, -0.6, 5.0], [0.6, 0.8, 7.0]];
        let from = [
            [0.0, 0.0],
            [100.0, 0.0],
            [0.0, 100.0],
            [100.0, 100.0],
            [50.0, 50.0],
        ];
        let mut to = from.map(|p| similarity(m, p));
        // Small noise on four points, and the fifth thrown far off: LMeDS's median ignores
        // it, its inlier test drops it, the refinement fits the four.
        let noise = [[0.3, -0.2], [-0.25, 0.1], [0.2, 0.3], [-0.1, -0.2]];
        for (t, n) in to.iter_mut().zip(noise) {
            t[0] += n[0];
            t[1] += n[1];
        }
        to[4] = [500.0, -300.0];
        let (_, inliers) = lmeds(&from, &to).unwrap();
        assert_eq!(inliers, vec![true, true, true, true, false]);
        let got = estimate_affine_partial(&from, &to).unwrap();
        // The least-squares similarity of the four noisy points: mean noise (0.0375, 0) moves
        // the shift; the rotation part barely moves.
        assert!((got[0][0] - 0.8).abs() < 5e-3 && (got[1][0] - 0.6).abs() < 5e-3);
        assert!((got[0][2] - 5.0).abs() < 0.5 && (got[1][2] - 7.0).abs() < 0.5);
        // Refined: closer to the four than the best pair alone.
        let err = |m: [[f64; 3]; 2]| -> f64 {
            (0..4)
                .map(|i| {
                    let p = similarity(m, from[i]);
                    f64::from((p[0] - to[i][0]).powi(2) + (p[1] - to[i][1]).powi(2))
                })
                .sum()
        };
        let (pair, _) = lmeds(&from, &to).unwrap();
        let pair = [[pair[0], pair[1], pair[2]], [pair[3], pair[4], pair[5]]];
        assert!(err(got) < err(pair), "{} !< {}", err(got), err(pair));
    }

    #[test]
    fn the_template_maps_to_itself() {
        let t = FACE_TEMPLATE.map(|p| p.map(|v| v as f32));
        let m = align_face(&t);
        assert!((m[0][0] - 1.0).abs() < 1e-6 && m[0][1].abs() < 1e-6 && m[0][2].abs() < 1e-3);
    }
}
