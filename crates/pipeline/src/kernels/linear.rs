//! Linear layers on f32 CPU tensors with the bias, a residual and layout changes folded into
//! one gemm call.
//!
//! candle's `Linear` is a matmul followed by a separate bias pass, and the residual add and the
//! NCHW <-> `[B, HW, C]` transposes around a transformer are more passes (single-threaded
//! element-wise ops and copies). Here the output buffer is filled with `bias (+ residual)` in
//! parallel and the gemm accumulates into it, reading and writing through strides, so
//! `proj_in` reads the NCHW image directly and `proj_out` writes NCHW plus the residual.

use candle_core::{DType, Device, Result, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

pub use super::dense::{DeferredTranspose, Dense};

/// Rows of the output prefilled per rayon task.
const FILL_ROWS: usize = 64;

/// f32 on the CPU, and the fused path not switched off (`SDSERVE_LINEAR=candle`, for A/B runs).
pub(super) fn f32_cpu(t: &Tensor) -> bool {
    transposes(t.dtype(), t.device())
}

/// Whether [`Dense`] keeps weights of this dtype on this device transposed.
pub(super) fn transposes(dtype: DType, device: &Device) -> bool {
    use std::sync::OnceLock;
    static OFF: OnceLock<bool> = OnceLock::new();
    let off = *OFF.get_or_init(|| std::env::var("SDSERVE_LINEAR").as_deref() == Ok("candle"));
    !off && dtype == DType::F32 && matches!(device, Device::Cpu)
}

/// Runs `f` on the contiguous f32 data of `t` (the caller checked f32 on the CPU).
pub(super) fn with_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (guard, layout) = t.storage_and_layout();
    match &*guard {
        candle_core::Storage::Cpu(c) => {
            let s = &c.as_slice::<f32>()?[layout.start_offset()..][..t.elem_count()];
            Ok(f(s))
        }
        _ => candle_core::bail!("not a CPU tensor"),
    }
}

/// `dst[i, j] (+)= sum_p lhs[i, p] rhs[p, j]` with element strides (`rs` between rows, `cs`
/// between columns) for every operand; `accumulate` keeps what `dst` holds.
///
/// # Safety
/// Every index the shapes and strides reach must be in bounds of its buffer.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_strided(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    (dst_rs, dst_cs): (isize, isize),
    lhs: *const f32,
    (lhs_rs, lhs_cs): (isize, isize),
    rhs: *const f32,
    (rhs_rs, rhs_cs): (isize, isize),
    accumulate: bool,
) {
    let threads = rayon::current_num_threads();
    let par = if threads > 1 && m * n * k > 1 << 15 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    super::math::sgemm(
        (m, n, k),
        dst,
        (dst_rs, dst_cs),
        lhs,
        (lhs_rs, lhs_cs),
        rhs,
        (rhs_rs, rhs_cs),
        accumulate,
        1.0f32,
        par,
    );
}

/// Checks the transposed weight `wt` `[k, n]` and `bias` `[n]` and returns `(n, k)`.
fn weight_dims(wt: &Tensor, bias: Option<&Tensor>) -> Result<Option<(usize, usize)>> {
    if !f32_cpu(wt) || wt.rank() != 2 {
        return Ok(None);
    }
    let (k, n) = wt.dims2()?;
    if let Some(b) = bias {
        if !f32_cpu(b) || b.elem_count() != n {
            return Ok(None);
        }
    }
    Ok(Some((n, k)))
}

/// `x W^T + bias (+ residual)` over the last dim of `x` (`[.., k]`, `wt` = W^T `[k, n]`,
/// `residual` shaped like the output). `None` when the fast path does not apply (not all f32
/// on the CPU, or shapes it does not cover): the caller then uses candle's ops.
pub fn linear(
    x: &Tensor,
    wt: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    let Some((n, k)) = weight_dims(wt, bias)? else {
        return Ok(None);
    };
    if !f32_cpu(x) || x.rank() == 0 || x.dims()[x.rank() - 1] != k || k == 0 {
        return Ok(None);
    }
    let mut dims = x.dims().to_vec();
    let rank = dims.len();
    dims[rank - 1] = n;
    if let Some(r) = residual {
        if !f32_cpu(r) || r.dims() != dims.as_slice() {
            return Ok(None);
        }
    }
    let rows = x.elem_count() / k;
    let mut out = vec![0f32; rows * n];
    let bias_v = match bias {
        Some(b) => Some(b.flatten_all()?.to_vec1::<f32>()?),
        None => None,
    };
    let fill = |res: Option<&[f32]>, out: &mut [f32]| {
        out.par_chunks_mut(FILL_ROWS * n)
            .enumerate()
            .for_each(|(ci, o)| {
                for (ri, row) in o.chunks_exact_mut(n).enumerate() {
                    let r0 = (ci * FILL_ROWS + ri) * n;
                    match (res, &bias_v) {
                        (Some(res), Some(b)) => {
                            for ((d, &r), &bv) in row.iter_mut().zip(&res[r0..r0 + n]).zip(b) {
                                *d = r + bv;
                            }
                        }
                        (Some(res), None) => row.copy_from_slice(&res[r0..r0 + n]),
                        (None, Some(b)) => row.copy_from_slice(b),
                        (None, None) => {}
                    }
                }
            });
    };
    match residual {
        Some(r) => with_slice(r, |rs| fill(Some(rs), &mut out))?,
        None => fill(None, &mut out),
    }
    let accumulate = residual.is_some() || bias.is_some();
    with_slice(x, |xs| {
        with_slice(wt, |ws| {
            // SAFETY: dst is rows x n (row stride n), lhs rows x k (row stride k), rhs W^T
            // [k, n] (row stride n).
            unsafe {
                gemm_strided(
                    (rows, n, k),
                    out.as_mut_ptr(),
                    (n as isize, 1),
                    xs.as_ptr(),
                    (k as isize, 1),
                    ws.as_ptr(),
                    (n as isize, 1),
                    accumulate,
                )
            }
        })
    })??;
    Tensor::from_vec(out, dims, &Device::Cpu).map(Some)
}

/// `proj_in` of a transformer over an NCHW image: `x` `[B, k, H, W]` -> `[B, H*W, n]`
/// `= x_b^T W^T + bias`, reading `x` in place (no transpose copy).
pub fn linear_from_nchw(x: &Tensor, wt: &Tensor, bias: Option<&Tensor>) -> Result<Option<Tensor>> {
    let Some((n, k)) = weight_dims(wt, bias)? else {
        return Ok(None);
    };
    if !f32_cpu(x) || x.rank() != 4 {
        return Ok(None);
    }
    let (b, c, h, w) = x.dims4()?;
    let hw = h * w;
    if c != k || hw == 0 {
        return Ok(None);
    }
    let mut out = vec![0f32; b * hw * n];
    if let Some(bias) = bias {
        let bv = bias.flatten_all()?.to_vec1::<f32>()?;
        out.par_chunks_mut(FILL_ROWS * n).for_each(|o| {
            for row in o.chunks_exact_mut(n) {
                row.copy_from_slice(&bv);
            }
        });
    }
    with_slice(x, |xs| {
        with_slice(wt, |ws| {
            for bi in 0..b {
                // SAFETY: per image: dst [hw, n] row stride n; lhs (i, p) = x[p*hw + i]; rhs as
                // in `linear`.
                unsafe {
                    gemm_strided(
                        (hw, n, k),
                        out.as_mut_ptr().add(bi * hw * n),
                        (n as isize, 1),
                        xs.as_ptr().add(bi * k * hw),
                        (1, hw as isize),
                        ws.as_ptr(),
                        (n as isize, 1),
                        bias.is_some(),
                    )
                }
            }
        })
    })??;
    Tensor::from_vec(out, (b, hw, n), &Device::Cpu).map(Some)
}

/// `proj_out` of a transformer back to NCHW plus the residual: `t` `[B, H*W, k]`, `residual`
/// `[B, n, H, W]` -> `residual + (t_b W^T + bias)^T` as `[B, n, H, W]` (no transpose copy).
pub fn linear_to_nchw_add(
    t: &Tensor,
    wt: &Tensor,
    bias: Option<&Tensor>,
    residual: &Tensor,
) -> Result<Option<Tensor>> {
    let Some((n, k)) = weight_dims(wt, bias)? else {
        return Ok(None);
    };
    if !f32_cpu(t) || !f32_cpu(residual) || t.rank() != 3 || residual.rank() != 4 {
        return Ok(None);
    }
    let (b, hw, tk) = t.dims3()?;
    let (rb, rc, h, w) = residual.dims4()?;
    if tk != k || rb != b || rc != n || h * w != hw || hw == 0 {
        return Ok(None);
    }
    let mut out = vec![0f32; b * n * hw];
    let bv = match bias {
        Some(bias) => bias.flatten_all()?.to_vec1::<f32>()?,
        None => vec![0f32; n],
    };
    with_slice(residual, |rs| {
        out.par_chunks_mut(hw)
            .zip(rs.par_chunks(hw))
            .enumerate()
            .for_each(|(bc, (o, r))| {
                let bias = bv[bc % n];
                for (d, &x) in o.iter_mut().zip(r) {
                    *d = x + bias;
                }
            });
    })?;
    with_slice(t, |ts| {
        with_slice(wt, |ws| {
            for bi in 0..b {
                // SAFETY: per image: dst (i, j) at j*hw + i inside the image's n*hw block; lhs
                // [hw, k] row stride k; rhs as in `linear`.
                unsafe {
                    gemm_strided(
                        (hw, n, k),
                        out.as_mut_ptr().add(bi * n * hw),
                        (1, hw as isize),
                        ts.as_ptr().add(bi * hw * k),
                        (k as isize, 1),
                        ws.as_ptr(),
                        (n as isize, 1),
                        true,
                    )
                }
            }
        })
    })??;
    Tensor::from_vec(out, (b, n, h, w), &Device::Cpu).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::max_abs_diff;

    #[test]
    fn linear_with_bias_and_residual_matches_candle() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 37, 24), &dev)?;
        let w = Tensor::randn(0f32, 1.0, (40, 24), &dev)?;
        let b = Tensor::randn(0f32, 1.0, 40, &dev)?;
        let r = Tensor::randn(0f32, 1.0, (2, 37, 40), &dev)?;
        let plain = x.broadcast_matmul(&w.t()?)?;
        let wt = w.t()?.contiguous()?;
        for (bias, res) in [
            (None, None),
            (Some(&b), None),
            (None, Some(&r)),
            (Some(&b), Some(&r)),
        ] {
            let got = linear(&x, &wt, bias, res)?.expect("fast path");
            let mut want = plain.clone();
            if let Some(b) = bias {
                want = want.broadcast_add(b)?;
            }
            if let Some(r) = res {
                want = (want + r)?;
            }
            let d = max_abs_diff(&got, &want);
            assert!(
                d < 1e-4,
                "bias={} res={}: {d}",
                bias.is_some(),
                res.is_some()
            );
        }
        // 2-D input, and a declined f16 input.
        let x2 = x.get(0)?;
        let got = linear(&x2, &wt, Some(&b), None)?.expect("fast path");
        let want = x2.matmul(&w.t()?)?.broadcast_add(&b)?;
        assert!(max_abs_diff(&got, &want) < 1e-4);
        assert!(linear(&x.to_dtype(DType::F16)?, &wt, None, None)?.is_none());
        // Dense: the transposed layer and candle's agree; f16 stays candle's.
        let l = candle_nn::Linear::new(w.clone(), Some(b.clone()));
        let d = Dense::new(l.clone())?;
        assert!(d.transposed()?.is_some());
        let want = (candle_core::Module::forward(&l, &x)? + &r)?;
        assert!(max_abs_diff(&d.forward(&x, Some(&r))?, &want) < 1e-4);
        let lh = candle_nn::Linear::new(w.to_dtype(DType::F16)?, None);
        assert!(Dense::new(lh)?.transposed()?.is_none());
        Ok(())
    }

    /// `Dense::load` through the safetensors loader (weights written transposed from the
    /// file) gives the layer `Dense::new` makes from candle's `Linear`, for linear and 1x1
    /// convolution weights, with and without bias; a wrong shape is an error naming the stored
    /// and the implied shape.
    #[test]
    fn nchw_projections_match_transpose_and_matmul() -> Result<()> {
        let dev = Device::Cpu;
        let (b, c, h, w, n) = (2, 12, 5, 7, 20);
        let x = Tensor::randn(0f32, 1.0, (b, c, h, w), &dev)?;
        let wt = Tensor::randn(0f32, 1.0, (n, c), &dev)?;
        let bias = Tensor::randn(0f32, 1.0, n, &dev)?;
        let tokens = x.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?;
        let want = tokens.broadcast_matmul(&wt.t()?)?.broadcast_add(&bias)?;
        let got = linear_from_nchw(&x, &wt.t()?.contiguous()?, Some(&bias))?.expect("fast path");
        assert!(max_abs_diff(&got, &want) < 1e-4);

        let wo = Tensor::randn(0f32, 1.0, (c, n), &dev)?;
        let bo = Tensor::randn(0f32, 1.0, c, &dev)?;
        let proj = want.broadcast_matmul(&wo.t()?)?.broadcast_add(&bo)?;
        let want_out = (proj.transpose(1, 2)?.reshape((b, c, h, w))? + &x)?;
        let got_out =
            linear_to_nchw_add(&want, &wo.t()?.contiguous()?, Some(&bo), &x)?.expect("fast path");
        assert!(max_abs_diff(&got_out, &want_out) < 1e-4);
        Ok(())
    }
}
