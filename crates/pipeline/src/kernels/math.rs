//! Branch-free f32 math that LLVM auto-vectorises, and run-time ISA dispatch for slice loops.
//!
//! The default x86_64 target only assumes SSE2; loops over slices are compiled a second and third
//! time with AVX2+FMA and AVX-512 enabled and the widest one the CPU supports is chosen at run
//! time (other architectures use the portable build).

/// `e^x` to about 1 ulp (Cephes' expf polynomial after range reduction by ln 2). No libm call,
/// no branches, so loops over it vectorise. Inputs are clamped to the finite range.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // 1.5 * 2^23: adding it rounds to the nearest integer and leaves that integer in the low
    // mantissa bits (floor/round would be libm calls on plain SSE2).
    const MAGIC: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.7);
    let t = x * LOG2E + MAGIC;
    let n = t - MAGIC;
    let ni = t.to_bits() as i32 - MAGIC.to_bits() as i32;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let z = r * r;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let y = p * z + r + 1.0;
    // 2^n is exact for n in [-126, 127]; the clamp keeps n in [-126, 128), and y < 2 so the
    // product of y and 2^n for n = 127 is still finite.
    let scale = f32::from_bits(((ni + 127).clamp(1, 254) as u32) << 23);
    y * scale
}

/// `x * sigmoid(x)`.
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// `erf(x)` to a few ulp: the rational minimax approximation on [-4, 4] that Eigen uses for
/// float (`generic_fast_erf_float`), odd numerator over even denominator in x^2.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = x2 * -2.726_142_3e-10 + 2.770_681_4e-8;
    p = p * x2 + -2.101_024e-6;
    p = p * x2 + -5.692_506_4e-5;
    p = p * x2 + -7.349_906_3e-4;
    p = p * x2 + -2.954_600_1e-3;
    p = p * x2 + -1.609_603_3e-2;
    let mut q = x2 * -1.456_607_2e-5 + -2.133_740_6e-4;
    q = q * x2 + -1.682_827e-3;
    q = q * x2 + -7.373_329_2e-3;
    q = q * x2 + -1.426_474e-2;
    x * p / q
}

/// torch's exact GELU, `x/2 * (1 + erf(x/sqrt 2))`.
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// Runs `$body` (a closure-free block using the given arguments) compiled for the widest
/// available x86 vector ISA. The block must be safe code; it is wrapped in functions carrying
/// `#[target_feature]` so that LLVM vectorises it with those instructions.
macro_rules! dispatch {
    ($(#[$m:meta])* fn $name:ident($($arg:ident : $ty:ty),*) $body:block) => {
        $(#[$m])*
        pub fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn generic($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
                unsafe fn v4($($arg: $ty),*) { generic($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) { generic($($arg),*) }
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512dq")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                {
                    // SAFETY: the CPU has the features the function was compiled for.
                    return unsafe { v4($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: as above.
                    return unsafe { v3($($arg),*) };
                }
            }
            generic($($arg),*)
        }
    };
}
pub(crate) use dispatch;

dispatch! {
    /// `dst = gelu(src)` (erf, as torch's `nn.GELU()`).
    fn gelu_rows(src: &[f32], dst: &mut [f32]) {
        for (d, &v) in dst.iter_mut().zip(src) {
            *d = gelu(v);
        }
    }
}

dispatch! {
    fn silu_inplace(xs: &mut [f32]) {
        for v in xs.iter_mut() {
            *v = silu(*v);
        }
    }
}

dispatch! {
    /// `dst = (src - m) * scale + shift`, then SiLU when `act`.
    fn affine_act(src: &[f32], dst: &mut [f32], m: f32, scale: f32, shift: f32, act: bool) {
        if act {
            for (d, &v) in dst.iter_mut().zip(src) {
                *d = silu((v - m) * scale + shift);
            }
        } else {
            for (d, &v) in dst.iter_mut().zip(src) {
                *d = (v - m) * scale + shift;
            }
        }
    }
}

dispatch! {
    /// In-place softmax of one row: `e^(x - max) / sum`.
    fn softmax_inplace(xs: &mut [f32]) {
        let mut lanes = [f32::NEG_INFINITY; 16];
        let mut it = xs.chunks_exact(16);
        for c in &mut it {
            for i in 0..16 {
                lanes[i] = if c[i] > lanes[i] { c[i] } else { lanes[i] };
            }
        }
        let mut m = it.remainder().iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        for l in lanes {
            m = m.max(l);
        }
        let mut sums = [0f32; 16];
        let mut it = xs.chunks_exact_mut(16);
        for c in &mut it {
            for i in 0..16 {
                c[i] = exp(c[i] - m);
                sums[i] += c[i];
            }
        }
        let mut sum = 0f32;
        for v in it.into_remainder() {
            *v = exp(*v - m);
            sum += *v;
        }
        sum += sums.iter().sum::<f32>();
        let inv = 1.0 / sum;
        for v in xs.iter_mut() {
            *v *= inv;
        }
    }
}

dispatch! {
    /// GEGLU: `out[r, j] = h[r, j] * gelu(h[r, inner + j])` over rows of `h` `[rows, 2*inner]`.
    fn geglu_rows(h: &[f32], out: &mut [f32], inner: usize) {
        for (o, row) in out.chunks_exact_mut(inner).zip(h.chunks_exact(2 * inner)) {
            let (a, g) = row.split_at(inner);
            for ((d, &av), &gv) in o.iter_mut().zip(a).zip(g) {
                *d = av * gelu(gv);
            }
        }
    }
}

dispatch! {
    /// transformers' `quick_gelu` in place: `x * sigmoid(1.702 x)`.
    fn quick_gelu_inplace(xs: &mut [f32]) {
        for v in xs.iter_mut() {
            *v /= 1.0 + exp(-1.702 * *v);
        }
    }
}

/// Row-major f32 matrix product on strided operands: `dst = scale * lhs · rhs`, or
/// `dst += scale * lhs · rhs` with `accumulate`; `lhs` is `[m, k]`, `rhs` `[k, n]`, `dst` `[m, n]`,
/// each with element strides `(between rows, between columns)`. The one door to the gemm crate.
///
/// # Safety
/// Every index the shapes and strides reach must be in bounds of its buffer, and `dst` must not
/// overlap `lhs` or `rhs`.
#[allow(clippy::too_many_arguments)]
#[inline]
pub(crate) unsafe fn sgemm(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    (dst_rs, dst_cs): (isize, isize),
    lhs: *const f32,
    (lhs_rs, lhs_cs): (isize, isize),
    rhs: *const f32,
    (rhs_rs, rhs_cs): (isize, isize),
    accumulate: bool,
    scale: f32,
    parallelism: gemm::Parallelism,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        dst_cs,
        dst_rs,
        accumulate,
        lhs,
        lhs_cs,
        lhs_rs,
        rhs,
        rhs_cs,
        rhs_rs,
        if accumulate { 1.0 } else { 0.0 },
        scale,
        false,
        false,
        false,
        parallelism,
    );
}

/// Runs `f` on the first `need` values of this thread's buffer `buf`, grown (zero-filled) when
/// shorter and kept between calls, so that tasks do not allocate.
#[inline]
pub(crate) fn with_scratch<R>(
    buf: &'static std::thread::LocalKey<std::cell::RefCell<Vec<f32>>>,
    need: usize,
    f: impl FnOnce(&mut [f32]) -> R,
) -> R {
    buf.with(|b| {
        let mut b = b.borrow_mut();
        if b.len() < need {
            b.resize(need, 0.0);
        }
        f(&mut b[..need])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_of_libm() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.00731;
        }
        assert!(worst < 2.5e-7, "relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-200.0) < 1e-37 && exp(-200.0) >= 0.0);
        assert!(exp(200.0).is_finite());
    }

    #[test]
    fn erf_and_gelu_match_candle() {
        // Reference: candle's gelu_erf (its own accurate erf). The approximation's erf is within
        // ~1.5e-7 absolute, which GELU scales by |x|/2 in the tails.
        let xs: Vec<f32> = (0..4001).map(|i| (i as f32 - 2000.0) * 0.004).collect();
        let t = candle_core::Tensor::new(xs.as_slice(), &candle_core::Device::Cpu).unwrap();
        let want = t.gelu_erf().unwrap().to_vec1::<f32>().unwrap();
        for (&x, &w) in xs.iter().zip(&want) {
            let g = gelu(x);
            assert!(
                (g - w).abs() <= 2e-7 * (1.0 + x.abs()),
                "gelu({x}) = {g}, candle {w}"
            );
        }
        assert_eq!(erf(0.0), 0.0);
        assert!((erf(10.0) - 1.0).abs() < 2e-7 && (erf(-10.0) + 1.0).abs() < 2e-7);
    }

    #[test]
    fn softmax_sums_to_one_and_matches_f64() {
        for n in [1usize, 7, 16, 77, 1000] {
            let xs: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.3)
                .collect();
            let mut ys = xs.clone();
            softmax_inplace(&mut ys);
            let m = xs.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
            let z: f64 = xs.iter().map(|&v| (v as f64 - m).exp()).sum();
            for (&x, &y) in xs.iter().zip(&ys) {
                let want = (x as f64 - m).exp() / z;
                assert!(
                    (y as f64 - want).abs() < 1e-6 * want.max(1e-3),
                    "{n}: {y} vs {want}"
                );
            }
        }
    }

    #[test]
    fn geglu_rows_gates_the_first_half() {
        let h: Vec<f32> = (0..12).map(|i| i as f32 * 0.25 - 1.0).collect();
        let mut out = vec![0f32; 6];
        geglu_rows(&h, &mut out, 3);
        for r in 0..2 {
            for j in 0..3 {
                let want = h[r * 6 + j] * gelu(h[r * 6 + 3 + j]);
                assert_eq!(out[r * 3 + j], want);
            }
        }
    }

    #[test]
    fn quick_gelu_matches_definition() {
        let xs: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.037).collect();
        let mut ys = xs.clone();
        quick_gelu_inplace(&mut ys);
        for (&x, &y) in xs.iter().zip(&ys) {
            let want = x as f64 / (1.0 + (-1.702 * x as f64).exp());
            assert!(
                (y as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()),
                "{x}: {y} vs {want}"
            );
        }
    }

    #[test]
    fn silu_matches_definition_and_dispatch_agrees() {
        let xs: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.037).collect();
        let mut ys = xs.clone();
        silu_inplace(&mut ys);
        for (&x, &y) in xs.iter().zip(&ys) {
            let want = x as f64 / (1.0 + (-(x as f64)).exp());
            assert!(
                (y as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()),
                "{x}: {y} vs {want}"
            );
            assert_eq!(y, silu(x));
        }
        assert!(silu(-100.0).abs() < 1e-30);
    }
}
