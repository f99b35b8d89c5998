//! Transposed convolutions whose kernel equals their stride (no padding): every input pixel
//! paints its own `k x k` block of the output, so the whole layer is one gemm
//! `W^T [cout*k*k, cin] x x [cin, h*w]` and a scatter of its rows into the blocks. A DPT head's
//! 4x and 2x `resize_layers` are of this kind; candle's CPU `conv_transpose2d` takes one dot
//! product per output value.

use candle_core::{DType, Device, Result, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use crate::kernels::linear::with_slice;

/// `conv_transpose2d(x, weight, stride = k, padding 0) + bias` for f32 CPU tensors: `x`
/// `[B, cin, h, w]`, `weight` `[cin, cout, k, k]` (torch's layout), `bias` `[cout]`; the output
/// `[B, cout, k*h, k*w]`. `None` when the fast path does not apply (not f32 on the CPU, or
/// not a square kernel).
pub fn conv_transpose_unpatch(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    let f32_cpu = |t: &Tensor| t.dtype() == DType::F32 && matches!(t.device(), Device::Cpu);
    if !f32_cpu(x) || !f32_cpu(weight) || x.rank() != 4 || weight.rank() != 4 {
        return Ok(None);
    }
    let (batch, cin, h, w) = x.dims4()?;
    let (wcin, cout, k, kw) = weight.dims4()?;
    if wcin != cin || k != kw || k == 0 {
        return Ok(None);
    }
    let bias = match bias {
        Some(b) if b.elem_count() == cout => b.to_dtype(DType::F32)?.to_vec1::<f32>()?,
        Some(_) => return Ok(None),
        None => vec![0.0; cout],
    };
    let (hw, rows) = (h * w, cout * k * k);
    let (oh, ow) = (h * k, w * k);
    let mut out = vec![0f32; batch * cout * oh * ow];
    let mut cols = vec![0f32; rows * hw];
    with_slice(weight, |ws| {
        with_slice(x, |xs| {
            for (bi, o) in out.chunks_exact_mut(cout * oh * ow).enumerate() {
                let xb = &xs[bi * cin * hw..][..cin * hw];
                let threads = rayon::current_num_threads();
                let par = match threads {
                    1 => Parallelism::None,
                    t => Parallelism::Rayon(t),
                };
                // SAFETY: dst `[rows, hw]`; lhs (r, ci) = weight[ci, r] (rows contiguous per
                // input channel); rhs `[cin, hw]`: all in bounds by the checked shapes.
                unsafe {
                    crate::kernels::math::sgemm(
                        (rows, hw, cin),
                        cols.as_mut_ptr(),
                        (hw as isize, 1),
                        ws.as_ptr(),
                        (1, rows as isize),
                        xb.as_ptr(),
                        (hw as isize, 1),
                        false,
                        1.0,
                        par,
                    );
                }
                // Row (co, ky, kx) of `cols` lands at (co, y*k + ky, x*k + kx).
                o.par_chunks_mut(oh * ow)
                    .zip(cols.par_chunks(k * k * hw))
                    .zip(&bias)
                    .for_each(|((plane, src), &b)| {
                        for y in 0..h {
                            for ky in 0..k {
                                let dst = &mut plane[(y * k + ky) * ow..][..ow];
                                for kx in 0..k {
                                    let s = &src[(ky * k + kx) * hw + y * w..][..w];
                                    for (x, &v) in s.iter().enumerate() {
                                        dst[x * k + kx] = v + b;
                                    }
                                }
                            }
                        }
                    });
            }
        })
    })??;
    Tensor::from_vec(out, (batch, cout, oh, ow), &Device::Cpu).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::max_abs_diff;

    /// Against candle's `conv_transpose2d` (stride = kernel, then the bias), at the DPT's 4x and
    /// 2x kernels and a batch of two, on a grid that is not square.
    #[test]
    fn matches_candle_conv_transpose() -> Result<()> {
        let dev = Device::Cpu;
        let mut rng = crate::rng::TorchRng::new(21);
        for &(b, cin, cout, h, w, k) in
            &[(1, 6, 5, 3, 4, 4), (2, 8, 8, 5, 7, 2), (1, 3, 2, 1, 1, 3)]
        {
            let x = rng.randn_tensor((b, cin, h, w), &dev, DType::F32).unwrap();
            let wt = rng
                .randn_tensor((cin, cout, k, k), &dev, DType::F32)
                .unwrap();
            let bias = rng.randn_tensor(cout, &dev, DType::F32).unwrap();
            let got = conv_transpose_unpatch(&x, &wt, Some(&bias))?.expect("fast path");
            let want = x
                .conv_transpose2d(&wt, 0, 0, k, 1)?
                .broadcast_add(&bias.reshape((1, (), 1, 1))?)?;
            assert_eq!(got.dims(), want.dims());
            let d = max_abs_diff(&got, &want);
            assert!(d < 1e-5, "{b} {cin} {cout} {h} {w} {k}: {d}");
            // The kernel flipped (a plain conv's orientation) is another result.
            let flipped = x
                .conv_transpose2d(&wt.flip(&[2, 3])?, 0, 0, k, 1)?
                .broadcast_add(&bias.reshape((1, (), 1, 1))?)?;
            if k > 1 {
                assert!(max_abs_diff(&got, &flipped) > 1e-3);
            }
        }
        let half = Tensor::zeros((1, 2, 2, 2), DType::F16, &dev)?;
        let wt = Tensor::zeros((2, 2, 2, 2), DType::F32, &dev)?;
        assert!(conv_transpose_unpatch(&half, &wt, None)?.is_none());
        Ok(())
    }
}
