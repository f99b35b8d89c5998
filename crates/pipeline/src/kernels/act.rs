//! Fused element-wise activations for f32 CPU tensors, parallel over rows.

use candle_core::{DType, Device, Result, Tensor};
use rayon::prelude::*;

use super::linear::with_slice;
use super::math::{geglu_rows, gelu_rows, quick_gelu_inplace};

/// Rows handed to one rayon task (enough work to amortise scheduling).
const ROWS_PER_TASK: usize = 16;

/// GEGLU over the last dim: `h[.., :inner] * gelu(h[.., inner:])` with `inner = last / 2`.
/// `None` when the fast path does not apply (not f32 on the CPU).
pub fn geglu(h: &Tensor) -> Result<Option<Tensor>> {
    if h.dtype() != DType::F32 || !matches!(h.device(), Device::Cpu) || h.rank() == 0 {
        return Ok(None);
    }
    let mut dims = h.dims().to_vec();
    let last = dims[dims.len() - 1];
    if !last.is_multiple_of(2) || last == 0 {
        return Ok(None);
    }
    let inner = last / 2;
    let rows = h.elem_count() / last;
    let mut out = vec![0f32; rows * inner];
    with_slice(h, |hs| {
        out.par_chunks_mut(ROWS_PER_TASK * inner)
            .zip(hs.par_chunks(ROWS_PER_TASK * last))
            .for_each(|(o, hr)| geglu_rows(hr, o, inner))
    })?;
    let n = dims.len();
    dims[n - 1] = inner;
    Tensor::from_vec(out, dims, &Device::Cpu).map(Some)
}

/// `x * sigmoid(1.702 x)` (CLIP's `quick_gelu`) in one parallel pass; `None` when the fast path
/// does not apply (not f32 on the CPU).
pub fn quick_gelu(x: &Tensor) -> Result<Option<Tensor>> {
    if x.dtype() != DType::F32 || !matches!(x.device(), Device::Cpu) {
        return Ok(None);
    }
    let mut v = x.flatten_all()?.to_vec1::<f32>()?;
    v.par_chunks_mut(ELEMS_PER_TASK)
        .for_each(quick_gelu_inplace);
    Tensor::from_vec(v, x.dims(), &Device::Cpu).map(Some)
}

/// SiLU (swish, `x / (1 + exp(-x))`) in one parallel pass; `None` when the fast path does not
/// apply (not f32 on the CPU). candle's runs on one thread.
pub fn silu(x: &Tensor) -> Result<Option<Tensor>> {
    if x.dtype() != DType::F32 || !matches!(x.device(), Device::Cpu) {
        return Ok(None);
    }
    let mut v = x.flatten_all()?.to_vec1::<f32>()?;
    // std's exp, as candle's and torch's: math::silu's faster exp moved networks whose
    // swish feeds dozens of layers (EfficientNet's) past their float-noise bounds.
    v.par_chunks_mut(ELEMS_PER_TASK).for_each(|c| {
        for e in c {
            *e /= 1.0 + (-*e).exp();
        }
    });
    Tensor::from_vec(v, x.dims(), &Device::Cpu).map(Some)
}

/// `F.leaky_relu(x, slope)` (`x > 0 ? x : x * slope`) in one parallel pass; `None` when the
/// fast path does not apply (not f32 on the CPU).
pub fn leaky_relu(x: &Tensor, slope: f32) -> Result<Option<Tensor>> {
    if x.dtype() != DType::F32 || !matches!(x.device(), Device::Cpu) {
        return Ok(None);
    }
    let mut v = x.flatten_all()?.to_vec1::<f32>()?;
    v.par_chunks_mut(ELEMS_PER_TASK).for_each(|c| {
        for e in c {
            if *e <= 0.0 {
                *e *= slope;
            }
        }
    });
    Tensor::from_vec(v, x.dims(), &Device::Cpu).map(Some)
}

/// torch's exact GELU (`nn.GELU()`, erf) in one parallel pass into a new tensor; `None` when the
/// fast path does not apply (not f32 on the CPU).
pub fn gelu_erf(x: &Tensor) -> Result<Option<Tensor>> {
    if x.dtype() != DType::F32 || !matches!(x.device(), Device::Cpu) {
        return Ok(None);
    }
    let mut out = vec![0f32; x.elem_count()];
    with_slice(x, |xs| {
        out.par_chunks_mut(ELEMS_PER_TASK)
            .zip(xs.par_chunks(ELEMS_PER_TASK))
            .for_each(|(o, x)| gelu_rows(x, o))
    })?;
    Tensor::from_vec(out, x.dims(), &Device::Cpu).map(Some)
}

/// Elements handed to one rayon task by element-wise kernels.
const ELEMS_PER_TASK: usize = 1 << 14;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::max_abs_diff;

    #[test]
    fn matches_candle_ops() -> Result<()> {
        let dev = Device::Cpu;
        // Seeded, so a failure reproduces; values up to ~10, products up to ~100.
        let h = (crate::rng::TorchRng::new(11)
            .randn_tensor((2, 37, 2 * 24), &dev, DType::F32)
            .unwrap()
            * 3.0)?;
        let got = geglu(&h)?.expect("fast path");
        let want = (h.narrow(2, 0, 24)? * h.narrow(2, 24, 24)?.gelu_erf()?)?;
        assert_eq!(got.dims(), &[2, 37, 24]);
        // f32 rounding scales with the magnitude: compare relative to 1 + |want|.
        let d = ((got - &want)?.abs()? / (want.abs()? + 1.0)?)?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(d < 1e-5, "{d}");
        assert!(geglu(&h.to_dtype(DType::F16)?)?.is_none());
        Ok(())
    }

    #[test]
    fn gelu_erf_matches_candle_ops() -> Result<()> {
        // Past one task's elements, so the chunks are stitched back in order.
        let x = (crate::rng::TorchRng::new(13)
            .randn_tensor((3, ELEMS_PER_TASK / 100 + 7, 100), &Device::Cpu, DType::F32)
            .unwrap()
            * 4.0)?;
        let got = gelu_erf(&x)?.expect("fast path");
        let want = x.gelu_erf()?;
        let d = max_abs_diff(&got, &want);
        assert!(d < 1e-5, "{d}");
        // tanh's GELU differs by more: the bound tells them apart.
        assert!(max_abs_diff(&got, &x.gelu()?) > 1e-4);
        assert!(gelu_erf(&x.to_dtype(DType::F16)?)?.is_none());
        Ok(())
    }

    #[test]
    fn silu_and_leaky_relu_match_candle_ops() -> Result<()> {
        // Past one task's elements, so the chunks are stitched back in order.
        let x = (crate::rng::TorchRng::new(14)
            .randn_tensor((3, ELEMS_PER_TASK / 100 + 7, 100), &Device::Cpu, DType::F32)
            .unwrap()
            * 4.0)?;
        let d = max_abs_diff(&silu(&x)?.expect("fast path"), &x.silu()?);
        assert!(d < 1e-6, "{d}");
        let got = leaky_relu(&x, 0.01)?.expect("fast path");
        let want = (x.relu()? + (x.minimum(0f32)? * 0.01)?)?;
        assert_eq!(max_abs_diff(&got, &want), 0.0);
        assert!(silu(&x.to_dtype(DType::F16)?)?.is_none());
        Ok(())
    }

    #[test]
    fn quick_gelu_matches_candle_ops() -> Result<()> {
        let x = (crate::rng::TorchRng::new(12)
            .randn_tensor((2, 77, 100), &Device::Cpu, DType::F32)
            .unwrap()
            * 4.0)?;
        let got = quick_gelu(&x)?.expect("fast path");
        let want = (&x * candle_nn::ops::sigmoid(&(&x * 1.702)?)?)?;
        let d = max_abs_diff(&got, &want);
        assert!(d < 1e-5, "{d}");
        Ok(())
    }
}
