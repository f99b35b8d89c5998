//! GroupNorm with an optional fused SiLU for f32 NCHW tensors, parallel over (batch, group).
//!
//! candle's element-wise ops run on one thread and the composed GroupNorm makes about eight
//! passes over memory (and as many allocations); this makes three (sum, centred sum of squares,
//! normalise + affine + activation) into one output buffer.

use candle_core::{DType, Device, Result, Tensor};
use rayon::prelude::*;

use super::linear::with_slice;
use super::math::affine_act;

/// Sum of `f(x)` over a slice: f32 lanes over blocks of 4096, blocks summed in f64 (accurate on
/// big groups).
#[inline(always)]
fn blocked_sum(xs: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    let mut total = 0f64;
    for block in xs.chunks(4096) {
        let mut acc = [0f32; 16];
        let mut it = block.chunks_exact(16);
        for c in &mut it {
            for i in 0..16 {
                acc[i] += f(c[i]);
            }
        }
        total += acc.iter().map(|&v| v as f64).sum::<f64>();
        total += it.remainder().iter().map(|&v| f(v) as f64).sum::<f64>();
    }
    total
}

/// Mean of a slice, blocked as [`blocked_sum`].
fn mean(xs: &[f32]) -> f64 {
    blocked_sum(xs, |v| v) / xs.len() as f64
}

/// Mean of `(x - m)^2`, blocked as [`blocked_sum`].
fn centred_var(xs: &[f32], m: f32) -> f64 {
    blocked_sum(xs, |v| (v - m) * (v - m)) / xs.len() as f64
}

/// `out = act(group_norm(x) * weight + bias)` over contiguous `x` of `batch * channels * spatial`
/// values; `silu` chooses the activation (identity otherwise).
#[allow(clippy::too_many_arguments)]
pub fn group_norm_f32(
    x: &[f32],
    batch: usize,
    channels: usize,
    spatial: usize,
    groups: usize,
    weight: &[f32],
    bias: &[f32],
    eps: f64,
    silu_act: bool,
    out: &mut [f32],
) {
    let cg = channels / groups;
    let glen = cg * spatial;
    assert_eq!(x.len(), batch * channels * spatial);
    assert_eq!(out.len(), x.len());
    out.par_chunks_mut(glen)
        .zip(x.par_chunks(glen))
        .enumerate()
        .for_each(|(bg, (o, xs))| {
            let g = bg % groups;
            let m = mean(xs) as f32;
            let var = centred_var(xs, m);
            let rstd = (1.0 / (var + eps).sqrt()) as f32;
            for c in 0..cg {
                let ch = g * cg + c;
                let (scale, shift) = (rstd * weight[ch], bias[ch]);
                let src = &xs[c * spatial..(c + 1) * spatial];
                let dst = &mut o[c * spatial..(c + 1) * spatial];
                affine_act(src, dst, m, scale, shift, silu_act);
            }
        });
}

/// Tensor front end of [`group_norm_f32`]; `None` when the fast path does not apply (not f32 on
/// the CPU), so the caller keeps its generic implementation.
pub fn group_norm(
    x: &Tensor,
    groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    silu_act: bool,
) -> Result<Option<Tensor>> {
    if x.dtype() != DType::F32 || !matches!(x.device(), Device::Cpu) || x.rank() < 2 {
        return Ok(None);
    }
    let dims = x.dims().to_vec();
    let (b, c) = (dims[0], dims[1]);
    let spatial: usize = dims[2..].iter().product();
    if groups == 0 || !c.is_multiple_of(groups) || spatial == 0 {
        return Ok(None);
    }
    let w = weight.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let bs = bias.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let mut out = vec![0f32; x.elem_count()];
    with_slice(x, |xs| {
        group_norm_f32(xs, b, c, spatial, groups, &w, &bs, eps, silu_act, &mut out)
    })?;
    Tensor::from_vec(out, dims, &Device::Cpu).map(Some)
}

/// LayerNorm over the last dim of an f32 CPU tensor (two-pass statistics, as torch), parallel
/// over rows; `None` when the fast path does not apply.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Option<Tensor>> {
    if x.dtype() != DType::F32 || !matches!(x.device(), Device::Cpu) || x.rank() == 0 {
        return Ok(None);
    }
    let dims = x.dims().to_vec();
    let d = dims[dims.len() - 1];
    if d == 0 || weight.elem_count() != d || bias.elem_count() != d {
        return Ok(None);
    }
    let w = weight.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let bs = bias.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let mut out = vec![0f32; x.elem_count()];
    with_slice(x, |xs| {
        let rows_per_task = (16384 / d).max(1);
        out.par_chunks_mut(rows_per_task * d)
            .zip(xs.par_chunks(rows_per_task * d))
            .for_each(|(o, xr)| {
                for (orow, xrow) in o.chunks_exact_mut(d).zip(xr.chunks_exact(d)) {
                    let m = mean(xrow) as f32;
                    let rstd = (1.0 / (centred_var(xrow, m) + eps).sqrt()) as f32;
                    affine_rows(xrow, orow, m, rstd, &w, &bs);
                }
            });
    })?;
    Tensor::from_vec(out, dims, &Device::Cpu).map(Some)
}

super::math::dispatch! {
    /// `dst = (src - m) * rstd * w + b` element-wise over one row.
    fn affine_rows(src: &[f32], dst: &mut [f32], m: f32, rstd: f32, w: &[f32], b: &[f32]) {
        for (((d, &v), &wv), &bv) in dst.iter_mut().zip(src).zip(w).zip(b) {
            *d = (v - m) * rstd * wv + bv;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{max_abs_diff, max_abs_diff_f32};

    #[test]
    fn layer_norm_matches_candle_ops() -> Result<()> {
        let dev = Device::Cpu;
        let x = (Tensor::randn(0f32, 2.0, (2, 13, 40), &dev)? + 5.0)?;
        let w = Tensor::randn(1f32, 0.1, 40, &dev)?;
        let b = Tensor::randn(0f32, 0.1, 40, &dev)?;
        let got = layer_norm(&x, &w, &b, 1e-5)?.expect("fast path");
        let m = x.mean_keepdim(2)?;
        let xc = x.broadcast_sub(&m)?;
        let var = xc.sqr()?.mean_keepdim(2)?;
        let want = xc
            .broadcast_div(&(var + 1e-5)?.sqrt()?)?
            .broadcast_mul(&w)?
            .broadcast_add(&b)?;
        let d = max_abs_diff(&got, &want);
        assert!(d < 1e-5, "{d}");
        Ok(())
    }

    /// Plain reference in f64.
    fn reference(x: &[f32], b: usize, c: usize, sp: usize, g: usize, silu_act: bool) -> Vec<f32> {
        let w: Vec<f32> = (0..c).map(|i| 0.5 + i as f32 * 0.1).collect();
        let bs: Vec<f32> = (0..c).map(|i| i as f32 * 0.03 - 0.2).collect();
        let cg = c / g;
        let mut out = vec![0f32; x.len()];
        for bi in 0..b {
            for gi in 0..g {
                let s = (bi * c + gi * cg) * sp;
                let xs = &x[s..s + cg * sp];
                let n = xs.len() as f64;
                let m = xs.iter().map(|&v| v as f64).sum::<f64>() / n;
                let var = xs.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / n;
                for (i, &v) in xs.iter().enumerate() {
                    let ch = gi * cg + i / sp;
                    let y = (v as f64 - m) / (var + 1e-6).sqrt() * w[ch] as f64 + bs[ch] as f64;
                    out[s + i] = if silu_act {
                        (y / (1.0 + (-y).exp())) as f32
                    } else {
                        y as f32
                    };
                }
            }
        }
        out
    }

    #[test]
    fn matches_f64_reference() -> Result<()> {
        let dev = Device::Cpu;
        // Seeded: unseeded inputs sometimes gave a 2-element group two nearly equal values,
        // whose tiny variance magnifies f32 rounding past any fixed bound.
        let mut rng = crate::rng::TorchRng::new(3);
        for &(b, c, h, w, g) in &[(2, 8, 5, 7, 4), (1, 6, 33, 31, 3), (2, 4, 1, 1, 2)] {
            let x = ((rng.randn_tensor((b, c, h, w), &dev, DType::F32).unwrap() * 3.0)? + 10.0)?;
            let wt = Tensor::from_vec((0..c).map(|i| 0.5 + i as f32 * 0.1).collect(), c, &dev)?;
            let bs = Tensor::from_vec((0..c).map(|i| i as f32 * 0.03 - 0.2).collect(), c, &dev)?;
            let xv = x.flatten_all()?.to_vec1::<f32>()?;
            for silu_act in [false, true] {
                let got = group_norm(&x, g, &wt, &bs, 1e-6, silu_act)?
                    .expect("f32 cpu path")
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                let want = reference(&xv, b, c, h * w, g, silu_act);
                let d = max_abs_diff_f32(&got, &want);
                assert!(d < 2e-5, "{b}x{c}x{h}x{w}/{g} silu={silu_act}: {d}");
            }
        }
        Ok(())
    }

    #[test]
    fn other_dtypes_are_declined() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 4, 2, 2), DType::F16, &dev)?;
        let w = Tensor::ones(4, DType::F32, &dev)?;
        assert!(group_norm(&x, 2, &w, &w, 1e-6, false)?.is_none());
        Ok(())
    }
}
