//! torch-compatible CPU normal RNG.
//!
//! [`TorchRng`] reproduces `torch.Generator("cpu").manual_seed(seed)` followed by
//! `torch.randn(n, generator=g)` calls (torch 2.11), so a request's seed gives the same
//! initial latents as diffusers. The generator is an MT19937 seeded with the low 32 bits of
//! the seed. torch has two code paths for normals (ATen `normal_kernel` on CPU):
//!
//! * `n >= 16` (contiguous float): `normal_fill`. Every element first gets one 24-bit uniform
//!   `(draw & 0xFFFFFF) * 2^-24`; then each block of 16 is Box-Muller transformed in place
//!   (`u1 = 1 - d[j]`, `u2 = d[j+8]`); if `n % 16 != 0` the last 16 slots are refilled with
//!   fresh uniforms and transformed again.
//! * `n < 16`: one `at::normal_distribution<double>` per element: two 53-bit doubles, each from
//!   two 32-bit draws (`hi << 32 | lo`), `r = sqrt(-2 ln(1 - u2))`, `θ = 2π u1`, result `r cos θ`,
//!   and `r sin θ` is cached in the generator and returned by the next such draw.
//!
//! The cache lives in the generator, so it survives across calls (and is untouched by the
//! `n >= 16` path), exactly as torch does. Verified against torch by `tools/make_rng_fixtures.py`.

use candle_core::{DType, Device, Shape, Tensor};

use crate::Result;

const MT_N: usize = 624;
const MT_M: usize = 397;

/// The standard 32-bit Mersenne Twister (as `std::mt19937` and torch's `at::mt19937`).
#[derive(Clone)]
struct Mt19937 {
    state: [u32; MT_N],
    index: usize,
}

impl Mt19937 {
    fn new(seed: u32) -> Self {
        let mut state = [0u32; MT_N];
        state[0] = seed;
        for i in 1..MT_N {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        Self { state, index: MT_N }
    }

    fn twist(&mut self) {
        for k in 0..MT_N {
            let y = (self.state[k] & 0x8000_0000) | (self.state[(k + 1) % MT_N] & 0x7fff_ffff);
            let mag = if y & 1 == 1 { 0x9908_b0df } else { 0 };
            self.state[k] = self.state[(k + MT_M) % MT_N] ^ (y >> 1) ^ mag;
        }
        self.index = 0;
    }

    fn next_u32(&mut self) -> u32 {
        if self.index >= MT_N {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }
}

/// numpy's legacy global generator after `np.random.seed(seed)` (`RandomState`: the same
/// MT19937, `init_genrand` of the 32-bit seed), drawing `np.random.uniform(0, 1)` /
/// `random_sample`: 53 bits from two draws, `(a >> 5) * 2^26 + (b >> 6)` over 2^53. The
/// sd-webui-controlnet extension seeds it before each unit's preprocessor (`shuffle`).
#[derive(Clone)]
pub struct NumpyRandomState {
    mt: Mt19937,
}

impl NumpyRandomState {
    /// `np.random.seed(seed)`.
    pub fn new(seed: u32) -> Self {
        Self {
            mt: Mt19937::new(seed),
        }
    }

    /// `np.random.random_sample()`: uniform in [0, 1).
    pub fn random_sample(&mut self) -> f64 {
        let a = u64::from(self.mt.next_u32() >> 5);
        let b = u64::from(self.mt.next_u32() >> 6);
        (a * 67_108_864 + b) as f64 / 9_007_199_254_740_992.0
    }
}

/// A CPU generator that draws the same normals as one seeded `torch.Generator("cpu")`.
#[derive(Clone)]
pub struct TorchRng {
    /// The seed as given (`Generator.initial_seed()`): all 64 bits, though MT19937 reads 32.
    seed: u64,
    mt: Mt19937,
    /// torch's `next_double_normal_sample`: the sine half of the last per-element Box-Muller.
    cached_normal: Option<f64>,
}

impl std::fmt::Debug for TorchRng {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TorchRng")
            .field("index", &self.mt.index)
            .finish_non_exhaustive()
    }
}

impl TorchRng {
    /// `torch.Generator("cpu").manual_seed(seed)`: torch keeps only the low 32 bits.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            mt: Mt19937::new(seed as u32),
            cached_normal: None,
        }
    }

    /// `Generator.initial_seed()`: the seed this generator was made with (DPM++ SDE seeds its
    /// Brownian tree with it, as A1111 seeds one per image).
    pub fn initial_seed(&self) -> u64 {
        self.seed
    }

    /// `uniform_real_distribution<float>(0, 1)`: 24 bits of one draw.
    fn uniform_f32(&mut self) -> f32 {
        (self.mt.next_u32() & 0x00ff_ffff) as f32 * (1.0 / 16_777_216.0)
    }

    /// `uniform_real_distribution<double>(0, 1)`: 53 bits of two draws (first is high).
    fn uniform_f64(&mut self) -> f64 {
        let hi = self.mt.next_u32() as u64;
        let lo = self.mt.next_u32() as u64;
        (((hi << 32) | lo) & ((1u64 << 53) - 1)) as f64 * (1.0 / 9_007_199_254_740_992.0)
    }

    /// `at::normal_distribution<double>(0, 1)` with the generator's cached second value.
    fn normal_f64(&mut self) -> f64 {
        if let Some(v) = self.cached_normal.take() {
            return v;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let r = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.cached_normal = Some(r * theta.sin());
        r * theta.cos()
    }

    /// `torch.randn(n, generator=g)`: `n` standard normals; the state carries on to the next call.
    pub fn randn(&mut self, n: usize) -> Vec<f32> {
        if n < 16 {
            return (0..n).map(|_| self.normal_f64() as f32).collect();
        }
        let mut data: Vec<f32> = (0..n).map(|_| self.uniform_f32()).collect();
        for block in data.chunks_exact_mut(16) {
            box_muller_16(block);
        }
        if !n.is_multiple_of(16) {
            // torch recomputes the (overlapping) last 16 values from fresh uniforms.
            let tail = &mut data[n - 16..];
            for v in tail.iter_mut() {
                *v = self.uniform_f32();
            }
            box_muller_16(tail);
        }
        data
    }

    /// `torch.randn(shape, generator=g)` as float32 on the host, then moved and cast.
    pub fn randn_tensor(
        &mut self,
        shape: impl Into<Shape>,
        device: &Device,
        dtype: DType,
    ) -> Result<Tensor> {
        let shape = shape.into();
        let values = self.randn(shape.elem_count());
        let t = Tensor::from_vec(values, shape, &Device::Cpu)?;
        Ok(t.to_dtype(dtype)?.to_device(device)?)
    }
}

/// torch's `normal_fill_16`: Box-Muller over 8 pairs `(d[j], d[j+8])` of uniforms in place.
/// Computed in f64 and rounded once; torch's float (Sleef) math differs by about 1e-6.
fn box_muller_16(d: &mut [f32]) {
    for j in 0..8 {
        let u1 = 1.0 - d[j] as f64;
        let u2 = d[j + 8] as f64;
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u2;
        d[j] = (r * theta.cos()) as f32;
        d[j + 8] = (r * theta.sin()) as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt19937_matches_the_standard_reference_value() {
        // The C++ standard fixes the 10000th output of mt19937 with the default seed 5489.
        let mut mt = Mt19937::new(5489);
        let mut last = 0;
        for _ in 0..10_000 {
            last = mt.next_u32();
        }
        assert_eq!(last, 4_123_659_995);
    }

    #[test]
    fn seed_uses_low_32_bits() {
        let a = TorchRng::new(5).randn(20);
        let b = TorchRng::new((1u64 << 32) + 5).randn(20);
        assert_eq!(a, b);
    }

    #[test]
    fn small_draws_use_the_cached_sine() {
        // Two single draws = one pair of a per-element Box-Muller: 4 u32 per pair, not per value.
        let mut g = TorchRng::new(7);
        let a = g.randn(1);
        let b = g.randn(1);
        let mut h = TorchRng::new(7);
        let both = h.randn(2);
        assert_eq!([a[0], b[0]], [both[0], both[1]]);
        assert_eq!(g.mt.index, 4);
    }

    #[test]
    fn tensor_has_shape_and_dtype() {
        let t = TorchRng::new(0)
            .randn_tensor((1, 4, 8, 8), &Device::Cpu, DType::F16)
            .unwrap();
        assert_eq!(t.dims(), &[1, 4, 8, 8]);
        assert_eq!(t.dtype(), DType::F16);
    }
}
