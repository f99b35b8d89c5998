//! CodeFormer's transformer (spandrel's `TransformerSALayer`, pre-norm): LayerNorm, torch's
//! `nn.MultiheadAttention` with the learned position embedding added to the queries and keys
//! (not the values), a residual; LayerNorm, linear, exact GELU, linear, a residual.

use candle_core::{Tensor, D};

use super::vqgan::Weights;
use crate::kernels::dense::Dense;
use crate::Result;

/// torch's LayerNorm over the last dim, eps 1e-5.
pub(super) struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
}

impl LayerNorm {
    pub fn load(w: &Weights, name: &str, dim: usize) -> Result<Self> {
        Ok(Self {
            weight: w.get(&format!("{name}.weight"), &[dim])?,
            bias: w.get(&format!("{name}.bias"), &[dim])?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = crate::kernels::norm::layer_norm(x, &self.weight, &self.bias, 1e-5)? {
            return Ok(y);
        }
        Ok(candle_nn::ops::layer_norm(
            x,
            &self.weight,
            &self.bias,
            1e-5,
        )?)
    }
}

/// Scaled dot-product attention over `[B, N, heads * d]` projections, `d^-0.5`: our blocked
/// kernel for f32 on the CPU, else candle's ops.
pub(super) fn attend(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, n, c) = q.dims3()?;
    let d = c / heads;
    let scale = (d as f64).powf(-0.5);
    if let Some(y) = crate::kernels::attention::attention(q, k, v, heads, scale)? {
        return Ok(y);
    }
    let split = |t: &Tensor| -> candle_core::Result<Tensor> {
        let m = t.dim(1)?;
        t.reshape((b, m, heads, d))?.transpose(1, 2)?.contiguous()
    };
    let (q, k, v) = (split(q)?, split(k)?, split(v)?);
    let scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    Ok(probs
        .matmul(&v)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, n, c))?)
}

/// One `ft_layers.N`.
pub(super) struct Layer {
    norm1: LayerNorm,
    /// `in_proj`'s first two thirds: the queries' and keys' projection.
    query_key: Dense,
    /// Its last third: the values'.
    value: Dense,
    out_proj: Dense,
    norm2: LayerNorm,
    linear1: Dense,
    linear2: Dense,
    heads: usize,
}

impl Layer {
    /// `dim` features, `heads` heads; the MLP's width from `linear1`.
    pub fn load(w: &Weights, name: &str, dim: usize, heads: usize) -> Result<Self> {
        let attn = format!("{name}.self_attn");
        let in_w = w.get(&format!("{attn}.in_proj_weight"), &[3 * dim, dim])?;
        let in_b = w.get(&format!("{attn}.in_proj_bias"), &[3 * dim])?;
        let part = |start: usize, len: usize| -> Result<Dense> {
            Ok(Dense::new(candle_nn::Linear::new(
                in_w.narrow(0, start, len)?.contiguous()?,
                Some(in_b.narrow(0, start, len)?.contiguous()?),
            ))?)
        };
        let mlp = w.dims(&format!("{name}.linear1.weight"))?[0];
        Ok(Self {
            norm1: LayerNorm::load(w, &format!("{name}.norm1"), dim)?,
            query_key: part(0, 2 * dim)?,
            value: part(2 * dim, dim)?,
            out_proj: w.dense(&format!("{attn}.out_proj"), dim, dim, true)?,
            norm2: LayerNorm::load(w, &format!("{name}.norm2"), dim)?,
            linear1: w.dense(&format!("{name}.linear1"), mlp, dim, true)?,
            linear2: w.dense(&format!("{name}.linear2"), dim, mlp, true)?,
            heads,
        })
    }

    /// `x`: `[B, N, dim]` tokens; `pos`: `[1, N, dim]`.
    pub fn forward(&self, x: &Tensor, pos: &Tensor) -> Result<Tensor> {
        let dim = x.dim(D::Minus1)?;
        let h = self.norm1.forward(x)?;
        let qk = self.query_key.forward(&h.broadcast_add(pos)?, None)?;
        let (q, k) = (qk.narrow(2, 0, dim)?, qk.narrow(2, dim, dim)?);
        let v = self.value.forward(&h, None)?;
        let attn = attend(&q.contiguous()?, &k.contiguous()?, &v, self.heads)?;
        let x = self.out_proj.forward(&attn, Some(x))?;
        let hidden = self.linear1.forward(&self.norm2.forward(&x)?, None)?;
        let hidden = match crate::kernels::act::gelu_erf(&hidden)? {
            Some(y) => y,
            None => hidden.gelu_erf()?,
        };
        Ok(self.linear2.forward(&hidden, Some(&x))?)
    }
}
