//! Scaled dot-product attention shared by the UNet's transformer blocks (and usable by the VAE's
//! single-head mid-block attention).
//!
//! The score matrix `[batch*heads, N, M]` is the largest tensor in Stable Diffusion (about 1 GiB
//! per self-attention at 512² with CFG in f32), so it is computed in slices: groups of
//! `(batch, head)` pairs and, when one head alone is too big, groups of query rows. Softmax always
//! runs in f32 whatever the weights' dtype.

use candle_core::{DType, Result, Tensor};

/// How attention is split into pieces so that the whole score matrix never has to exist at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttentionSlicing {
    /// Slice automatically: on the CPU into cache-sized pieces of [`CPU_PIECE_BYTES`] (faster
    /// than one big matrix as well as smaller), elsewhere into pieces of at most
    /// [`AUTO_SLICE_BYTES`]. This is the default.
    #[default]
    Auto,
    /// Everything at once (fastest on small inputs, most memory).
    Off,
    /// `n` (batch, head) pairs per piece, like diffusers' `set_attention_slice(n)`; query rows are
    /// additionally chunked if even that exceeds [`AUTO_SLICE_BYTES`].
    Heads(usize),
    /// Pieces of at most this many bytes of f32 scores (at least one query row each).
    MaxBytes(usize),
}

/// Upper bound, in bytes of f32 scores, of one attention piece under [`AttentionSlicing::Auto`]
/// on an accelerator (where fewer, larger kernels are faster).
pub const AUTO_SLICE_BYTES: usize = 256 << 20;

/// Piece size under [`AttentionSlicing::Auto`] on the CPU: scores that stay in cache between the
/// q·k product, the softmax and the product with v. Measured on SD 1.5's 4096-token
/// self-attention (2 cores): about 1.8x less CPU time than 256 MiB pieces.
pub const CPU_PIECE_BYTES: usize = 4 << 20;

/// Splits `[B, N, heads*dh]` into `[B*heads, N, dh]` (contiguous) for batched matmuls.
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, n, c) = x.dims3()?;
    let dh = c / heads;
    x.reshape((b, n, heads, dh))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b * heads, n, dh))
}

/// Inverse of [`split_heads`]: `[B*heads, N, dh]` back to `[B, N, heads*dh]`.
pub fn merge_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (bh, n, dh) = x.dims3()?;
    let b = bh / heads;
    x.reshape((b, heads, n, dh))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, n, heads * dh))
}

/// `softmax(q k^T * scale) v` over `[BH, N, dh]` queries and `[BH, M, dh]` keys/values, computed
/// piecewise as `slicing` says. With `upcast` the q·k product itself runs in f32 (diffusers'
/// `upcast_attention`); the softmax is in f32 either way. Returns `[BH, N, dv]` in `v`'s dtype.
pub fn sdpa(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    slicing: AttentionSlicing,
    upcast: bool,
) -> Result<Tensor> {
    let (bh, n, _) = q.dims3()?;
    let (_, m, _) = k.dims3()?;
    let out_dtype = v.dtype();
    let (q, k) = if upcast {
        (q.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?)
    } else {
        (q.clone(), k.clone())
    };
    // Scaling q (N*dh values) is cheaper than scaling the scores (N*M values).
    let q = (q * scale)?;
    let kt = k.t()?;

    let row_bytes = m * 4; // one query row of f32 scores
    let head_bytes = n * row_bytes;
    let (heads_per_piece, rows_per_piece) = match slicing {
        AttentionSlicing::Off => (bh, n),
        AttentionSlicing::Heads(s) => {
            let hp = s.clamp(1, bh);
            let rows = if hp == 1 && head_bytes > AUTO_SLICE_BYTES {
                (AUTO_SLICE_BYTES / row_bytes.max(1)).clamp(1, n)
            } else {
                n
            };
            (hp, rows)
        }
        AttentionSlicing::Auto | AttentionSlicing::MaxBytes(_) => {
            let budget = match slicing {
                AttentionSlicing::MaxBytes(b) => b,
                _ if q.device().is_cpu() => CPU_PIECE_BYTES,
                _ => AUTO_SLICE_BYTES,
            };
            let hp = (budget / head_bytes.max(1)).clamp(1, bh);
            let rows = if hp == 1 && head_bytes > budget {
                (budget / row_bytes.max(1)).clamp(1, n)
            } else {
                n
            };
            (hp, rows)
        }
    };

    let piece = |q: &Tensor, kt: &Tensor, v: &Tensor| -> Result<Tensor> {
        let scores = q.matmul(kt)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?;
        probs.to_dtype(out_dtype)?.matmul(v)
    };

    if heads_per_piece >= bh && rows_per_piece >= n {
        return piece(&q, &kt, v);
    }
    let mut outs = Vec::with_capacity(bh.div_ceil(heads_per_piece));
    let mut h0 = 0;
    while h0 < bh {
        let hl = heads_per_piece.min(bh - h0);
        let (qh, kh, vh) = (
            q.narrow(0, h0, hl)?,
            kt.narrow(0, h0, hl)?,
            v.narrow(0, h0, hl)?,
        );
        if rows_per_piece >= n {
            outs.push(piece(&qh, &kh, &vh)?);
        } else {
            let mut rows = Vec::with_capacity(n.div_ceil(rows_per_piece));
            let mut r0 = 0;
            while r0 < n {
                let rl = rows_per_piece.min(n - r0);
                rows.push(piece(&qh.narrow(1, r0, rl)?, &kh, &vh)?);
                r0 += rl;
            }
            outs.push(Tensor::cat(&rows, 1)?);
        }
        h0 += hl;
    }
    Tensor::cat(&outs, 0)
}

/// Plain reference used by the tests: the whole score matrix at once, all in f32.
#[cfg(test)]
fn sdpa_reference(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let s = (q.matmul(&k.t()?)? * scale)?;
    let s = s
        .broadcast_sub(&s.max_keepdim(candle_core::D::Minus1)?)?
        .exp()?;
    let p = s.broadcast_div(&s.sum_keepdim(candle_core::D::Minus1)?)?;
    p.matmul(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::max_abs_diff;
    use candle_core::Device;

    #[test]
    fn slicing_modes_agree_with_reference() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (6, 37, 8), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (6, 29, 8), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (6, 29, 8), &dev)?;
        let want = sdpa_reference(&q, &k, &v, 0.125f64.sqrt())?;
        for s in [
            AttentionSlicing::Off,
            AttentionSlicing::Auto,
            AttentionSlicing::Heads(1),
            AttentionSlicing::Heads(4),
            AttentionSlicing::Heads(100),
            AttentionSlicing::MaxBytes(1),
            AttentionSlicing::MaxBytes(29 * 4 * 5),
            AttentionSlicing::MaxBytes(37 * 29 * 4 * 2),
        ] {
            let got = sdpa(&q, &k, &v, 0.125f64.sqrt(), s, false)?;
            assert_eq!(got.dims(), &[6, 37, 8]);
            let d = max_abs_diff(&got, &want);
            assert!(d < 1e-5, "{s:?}: max diff {d}");
        }
        Ok(())
    }

    #[test]
    fn split_merge_round_trip() -> Result<()> {
        let x = Tensor::arange(0f32, 2.0 * 5.0 * 12.0, &Device::Cpu)?.reshape((2, 5, 12))?;
        let s = split_heads(&x, 3)?;
        assert_eq!(s.dims(), &[6, 5, 4]);
        // head 1 of batch 0, token 2 = channels 4..8 of x[0, 2]
        let h = s.get(1)?.get(2)?.to_vec1::<f32>()?;
        assert_eq!(h, x.get(0)?.get(2)?.narrow(0, 4, 4)?.to_vec1::<f32>()?);
        let back = merge_heads(&s, 3)?;
        assert_eq!(max_abs_diff(&back, &x), 0.0);
        Ok(())
    }

    #[test]
    fn f16_inputs_give_f16_output_close_to_f32() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (2, 16, 8), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (2, 16, 8), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (2, 16, 8), &dev)?;
        let want = sdpa_reference(&q, &k, &v, 0.35)?;
        let h = |t: &Tensor| t.to_dtype(DType::F16).unwrap();
        for upcast in [false, true] {
            let got = sdpa(
                &h(&q),
                &h(&k),
                &h(&v),
                0.35,
                AttentionSlicing::Heads(1),
                upcast,
            )?;
            assert_eq!(got.dtype(), DType::F16);
            let d = max_abs_diff(&got.to_dtype(DType::F32)?, &want);
            assert!(d < 1e-2, "upcast={upcast}: {d}");
        }
        Ok(())
    }
}
