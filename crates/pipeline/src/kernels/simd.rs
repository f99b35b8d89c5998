//! A small f32 vector abstraction for kernels written once and compiled per ISA: AVX-512 (16
//! lanes), AVX2+FMA (8 lanes) and a portable 8-lane array that LLVM vectorises as it can.
//!
//! Kernels are generic `#[inline(always)]` functions over [`F32s`]; a `#[target_feature]` entry
//! point per ISA instantiates them, so the intrinsics (themselves `#[inline]` with the same
//! features) inline into one body. [`Isa::detect`] picks the widest one the CPU has.

/// The vector ISA a kernel runs with, chosen once per call at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2,
    Portable,
}

impl Isa {
    /// The widest ISA this CPU supports (`SDSERVE_SIMD=avx2|portable` narrows it, for A/B runs
    /// and for testing the fallbacks on an AVX-512 machine).
    pub fn detect() -> Self {
        use std::sync::OnceLock;
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            let best = Self::best();
            match std::env::var("SDSERVE_SIMD").as_deref() {
                Ok("portable") => Self::Portable,
                Ok("avx2") if best != Self::Portable => Self::Avx2,
                _ => best,
            }
        })
    }

    fn best() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512dq")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Self::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Self::Avx2;
            }
        }
        Self::Portable
    }

    /// Every ISA this CPU can run (for tests).
    #[cfg(test)]
    pub fn available() -> Vec<Self> {
        let mut v = vec![Self::Portable];
        match Self::best() {
            Self::Avx512 => v.extend([Self::Avx2, Self::Avx512]),
            Self::Avx2 => v.push(Self::Avx2),
            Self::Portable => {}
        }
        v
    }
}

/// A vector of `LANES` f32. All methods are `unsafe`: pointers must be valid for `LANES` reads
/// or writes, and the CPU must have the type's ISA.
pub(crate) trait F32s: Copy {
    const LANES: usize;
    /// Vectors per row a P·V micro-kernel may keep in registers (4 rows at a time).
    const MAX_COLS: usize;
    /// Whether micro-kernels may take 8 rows at a time (enough registers: 32).
    const WIDE_ROWS: bool;
    unsafe fn splat(x: f32) -> Self;
    unsafe fn load(p: *const f32) -> Self;
    unsafe fn store(self, p: *mut f32);
    unsafe fn add(self, o: Self) -> Self;
    unsafe fn sub(self, o: Self) -> Self;
    unsafe fn mul(self, o: Self) -> Self;
    /// `self * b + c`.
    unsafe fn fma(self, b: Self, c: Self) -> Self;
    unsafe fn max(self, o: Self) -> Self;
    unsafe fn min(self, o: Self) -> Self;
    unsafe fn reduce_add(self) -> f32;
    unsafe fn reduce_max(self) -> f32;
    /// `self * 2^n` for integral `n` in [-126, 127].
    unsafe fn ldexp(self, n: Self) -> Self;

    /// `e^x` per lane, the algorithm of [`super::math::exp`] (Cephes polynomial), with inputs
    /// clamped to [-87.3, 88].
    #[inline(always)]
    unsafe fn exp(self) -> Self {
        const MAGIC: f32 = 12_582_912.0;
        let x = self.max(Self::splat(-87.3)).min(Self::splat(88.0));
        let t = x.fma(Self::splat(std::f32::consts::LOG2_E), Self::splat(MAGIC));
        let n = t.sub(Self::splat(MAGIC));
        let r = n.fma(Self::splat(-0.693_359_4), x);
        let r = n.fma(Self::splat(2.121_944_4e-4), r);
        let z = r.mul(r);
        let mut p = Self::splat(1.987_569_1e-4).fma(r, Self::splat(1.398_199_9e-3));
        p = p.fma(r, Self::splat(8.333_452e-3));
        p = p.fma(r, Self::splat(4.166_579_6e-2));
        p = p.fma(r, Self::splat(1.666_666_5e-1));
        p = p.fma(r, Self::splat(0.5));
        let y = p.fma(z, r).add(Self::splat(1.0));
        // n is in [-126, 127], so 2^n is a normal float.
        y.ldexp(n)
    }
}

/// Portable 8 lanes: plain arrays, vectorised by LLVM for whatever the build targets.
#[derive(Clone, Copy)]
pub(crate) struct Portable([f32; 8]);

impl F32s for Portable {
    const LANES: usize = 8;
    const MAX_COLS: usize = 2;
    const WIDE_ROWS: bool = false;
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        Self([x; 8])
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        Self(std::ptr::read_unaligned(p as *const [f32; 8]))
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        std::ptr::write_unaligned(p as *mut [f32; 8], self.0)
    }
    #[inline(always)]
    unsafe fn add(self, o: Self) -> Self {
        Self(std::array::from_fn(|i| self.0[i] + o.0[i]))
    }
    #[inline(always)]
    unsafe fn sub(self, o: Self) -> Self {
        Self(std::array::from_fn(|i| self.0[i] - o.0[i]))
    }
    #[inline(always)]
    unsafe fn mul(self, o: Self) -> Self {
        Self(std::array::from_fn(|i| self.0[i] * o.0[i]))
    }
    #[inline(always)]
    unsafe fn fma(self, b: Self, c: Self) -> Self {
        // Unfused: mul_add would be a libm call without hardware FMA.
        Self(std::array::from_fn(|i| self.0[i] * b.0[i] + c.0[i]))
    }
    #[inline(always)]
    unsafe fn max(self, o: Self) -> Self {
        Self(std::array::from_fn(|i| {
            if self.0[i] > o.0[i] {
                self.0[i]
            } else {
                o.0[i]
            }
        }))
    }
    #[inline(always)]
    unsafe fn min(self, o: Self) -> Self {
        Self(std::array::from_fn(|i| {
            if self.0[i] < o.0[i] {
                self.0[i]
            } else {
                o.0[i]
            }
        }))
    }
    #[inline(always)]
    unsafe fn reduce_add(self) -> f32 {
        let a = self.0;
        ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))
    }
    #[inline(always)]
    unsafe fn reduce_max(self) -> f32 {
        self.0.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v))
    }
    #[inline(always)]
    unsafe fn ldexp(self, n: Self) -> Self {
        Self(std::array::from_fn(|i| {
            self.0[i] * f32::from_bits(((n.0[i] as i32 + 127) as u32) << 23)
        }))
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{Avx2, Avx512};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::F32s;
    use std::arch::x86_64::*;

    /// 16 lanes in a zmm register.
    #[derive(Clone, Copy)]
    pub(crate) struct Avx512(__m512);

    impl F32s for Avx512 {
        const LANES: usize = 16;
        const MAX_COLS: usize = 5;
        const WIDE_ROWS: bool = true;
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn splat(x: f32) -> Self {
            Self(_mm512_set1_ps(x))
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn load(p: *const f32) -> Self {
            Self(_mm512_loadu_ps(p))
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn store(self, p: *mut f32) {
            _mm512_storeu_ps(p, self.0)
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn add(self, o: Self) -> Self {
            Self(_mm512_add_ps(self.0, o.0))
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn sub(self, o: Self) -> Self {
            Self(_mm512_sub_ps(self.0, o.0))
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn mul(self, o: Self) -> Self {
            Self(_mm512_mul_ps(self.0, o.0))
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn fma(self, b: Self, c: Self) -> Self {
            Self(_mm512_fmadd_ps(self.0, b.0, c.0))
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn max(self, o: Self) -> Self {
            Self(_mm512_max_ps(self.0, o.0))
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn min(self, o: Self) -> Self {
            Self(_mm512_min_ps(self.0, o.0))
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn reduce_add(self) -> f32 {
            _mm512_reduce_add_ps(self.0)
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn reduce_max(self) -> f32 {
            _mm512_reduce_max_ps(self.0)
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn ldexp(self, n: Self) -> Self {
            Self(_mm512_scalef_ps(self.0, n.0))
        }
    }

    /// 8 lanes in a ymm register, with FMA.
    #[derive(Clone, Copy)]
    pub(crate) struct Avx2(__m256);

    impl F32s for Avx2 {
        const LANES: usize = 8;
        const MAX_COLS: usize = 2;
        const WIDE_ROWS: bool = false;
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn splat(x: f32) -> Self {
            Self(_mm256_set1_ps(x))
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn load(p: *const f32) -> Self {
            Self(_mm256_loadu_ps(p))
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn store(self, p: *mut f32) {
            _mm256_storeu_ps(p, self.0)
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn add(self, o: Self) -> Self {
            Self(_mm256_add_ps(self.0, o.0))
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn sub(self, o: Self) -> Self {
            Self(_mm256_sub_ps(self.0, o.0))
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn mul(self, o: Self) -> Self {
            Self(_mm256_mul_ps(self.0, o.0))
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn fma(self, b: Self, c: Self) -> Self {
            Self(_mm256_fmadd_ps(self.0, b.0, c.0))
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn max(self, o: Self) -> Self {
            Self(_mm256_max_ps(self.0, o.0))
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn min(self, o: Self) -> Self {
            Self(_mm256_min_ps(self.0, o.0))
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn reduce_add(self) -> f32 {
            let lo = _mm256_castps256_ps128(self.0);
            let hi = _mm256_extractf128_ps(self.0, 1);
            let s = _mm_add_ps(lo, hi);
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
            _mm_cvtss_f32(s)
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn reduce_max(self) -> f32 {
            let lo = _mm256_castps256_ps128(self.0);
            let hi = _mm256_extractf128_ps(self.0, 1);
            let s = _mm_max_ps(lo, hi);
            let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_max_ss(s, _mm_shuffle_ps(s, s, 1));
            _mm_cvtss_f32(s)
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn ldexp(self, n: Self) -> Self {
            let e = _mm256_slli_epi32(
                _mm256_add_epi32(_mm256_cvtps_epi32(n.0), _mm256_set1_epi32(127)),
                23,
            );
            Self(_mm256_mul_ps(self.0, _mm256_castsi256_ps(e)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    unsafe fn exp_all<S: F32s>(xs: &[f32]) -> Vec<f32> {
        let mut out = vec![0f32; xs.len()];
        for (o, x) in out
            .chunks_exact_mut(S::LANES)
            .zip(xs.chunks_exact(S::LANES))
        {
            S::load(x.as_ptr()).exp().store(o.as_mut_ptr());
        }
        out
    }

    #[test]
    fn vector_exp_matches_libm_on_every_isa() {
        let xs: Vec<f32> = (0..16 * 2000)
            .map(|i| -100.0 + i as f32 * 0.0059)
            .chain([f32::NEG_INFINITY; 16])
            .chain([88.7f32; 16])
            .collect();
        for isa in Isa::available() {
            // SAFETY: `available` lists only ISAs this CPU has.
            let got = unsafe {
                match isa {
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx512 => exp_all::<Avx512>(&xs),
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx2 => exp_all::<Avx2>(&xs),
                    _ => exp_all::<Portable>(&xs),
                }
            };
            for (&x, &g) in xs.iter().zip(&got) {
                let want = (x.clamp(-87.3, 88.0) as f64).exp();
                let rel = ((g as f64 - want) / want).abs();
                assert!(rel < 3e-7, "{isa:?} exp({x}) = {g}, want {want}");
            }
        }
    }
}
