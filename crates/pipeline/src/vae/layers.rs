//! The VAE's layers shared by decoder and encoder: activation, group norm (f32 statistics),
//! convolution, the resnet block without a time embedding, and the mid block's single-head
//! self-attention.

use candle_core::{DType, Module, Tensor};
use candle_nn::{Linear, VarBuilder};

use super::VaeConfig;
use crate::kernels::Conv2d;
use crate::{PipelineError, Result};

/// diffusers hard-codes this eps for every norm in the VAE decoder.
pub(crate) const NORM_EPS: f64 = 1e-6;

/// diffusers' `get_activation`.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Activation {
    Silu,
    Gelu,
    Relu,
    Mish,
}

impl Activation {
    pub(crate) fn from_name(name: &str) -> Result<Self> {
        match name {
            "silu" | "swish" => Ok(Self::Silu),
            "gelu" => Ok(Self::Gelu),
            "relu" => Ok(Self::Relu),
            "mish" => Ok(Self::Mish),
            other => Err(PipelineError::config(
                "vae/config.json",
                format!("unsupported act_fn {other:?}"),
            )),
        }
    }

    pub(crate) fn forward(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Silu => x.silu(),
            // torch.nn.GELU() is the exact erf form.
            Self::Gelu => x.gelu_erf(),
            Self::Relu => x.relu(),
            // x * tanh(softplus(x)); softplus as ln(1 + e^x) with torch's threshold of 20.
            Self::Mish => {
                let big = x.ge(20.0)?;
                let sp = x.exp()?.affine(1.0, 1.0)?.log()?;
                let sp = big.where_cond(x, &sp)?;
                x.mul(&sp.tanh()?)
            }
        }
    }
}

/// `torch.nn.GroupNorm` with affine weights; statistics in f32 whatever the input dtype.
#[derive(Debug, Clone)]
pub(crate) struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub(crate) fn new(
        channels: usize,
        groups: usize,
        eps: f64,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let weight = vb.get(channels, "weight")?.to_dtype(DType::F32)?;
        let bias = vb.get(channels, "bias")?.to_dtype(DType::F32)?;
        Ok(Self {
            weight,
            bias,
            groups,
            eps,
        })
    }

    /// The norm of `weight` and `bias` (`[channels]`, any dtype; kept in f32) as they are.
    pub(crate) fn from_tensors(
        weight: &Tensor,
        bias: &Tensor,
        groups: usize,
        eps: f64,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            weight: weight.to_dtype(DType::F32)?,
            bias: bias.to_dtype(DType::F32)?,
            groups,
            eps,
        })
    }

    /// `act(group_norm(x))`, fused into one pass for SiLU on f32 CPU tensors and on CUDA.
    pub(crate) fn forward_act(&self, x: &Tensor, act: Activation) -> candle_core::Result<Tensor> {
        let silu = matches!(act, Activation::Silu);
        let fast =
            crate::kernels::group_norm(x, self.groups, &self.weight, &self.bias, self.eps, silu)?;
        if let Some(y) = fast {
            return if silu { Ok(y) } else { act.forward(&y) };
        }
        act.forward(&self.forward(x)?)
    }

    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let fast = crate::kernels::group_norm;
        if let Some(y) = fast(x, self.groups, &self.weight, &self.bias, self.eps, false)? {
            return Ok(y);
        }
        let dtype = x.dtype();
        let (b, c, h, w) = x.dims4()?;
        let x = x
            .to_dtype(DType::F32)?
            .reshape((b, self.groups, c / self.groups, h * w))?;
        // Two-level mean (per channel, then per group) keeps f32 sums accurate on big images.
        let mean = x.mean_keepdim(3)?.mean_keepdim(2)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(3)?.mean_keepdim(2)?;
        let x = xc
            .broadcast_div(&(var + self.eps)?.sqrt()?)?
            .reshape((b, c, h, w))?;
        x.broadcast_mul(&self.weight.reshape((1, c, 1, 1))?)?
            .broadcast_add(&self.bias.reshape((1, c, 1, 1))?)?
            .to_dtype(dtype)
    }
}

pub(crate) fn conv(
    cin: usize,
    cout: usize,
    k: usize,
    vb: VarBuilder,
) -> candle_core::Result<Conv2d> {
    crate::kernels::conv2d(cin, cout, k, 1, k / 2, vb)
}

/// diffusers `ResnetBlock2D` without a time embedding (pre-norm, output scale 1).
#[derive(Debug, Clone)]
pub(crate) struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    act: Activation,
}

impl ResnetBlock {
    pub(crate) fn new(
        cin: usize,
        cout: usize,
        cfg: &VaeConfig,
        act: Activation,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let g = cfg.norm_num_groups;
        let conv_shortcut = if cin != cout {
            Some(conv(cin, cout, 1, vb.pp("conv_shortcut"))?)
        } else {
            None
        };
        Ok(Self {
            norm1: GroupNorm::new(cin, g, NORM_EPS, vb.pp("norm1"))?,
            conv1: conv(cin, cout, 3, vb.pp("conv1"))?,
            norm2: GroupNorm::new(cout, g, NORM_EPS, vb.pp("norm2"))?,
            conv2: conv(cout, cout, 3, vb.pp("conv2"))?,
            conv_shortcut,
            act,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // Reassigning (not shadowing) frees each intermediate as soon as the next exists; shadowed
        // ones would all live to the end of the block (about 1 GB more at 512x512).
        let mut h = self.norm1.forward_act(x, self.act)?;
        h = self.conv1.forward(&h)?;
        h = self.norm2.forward_act(&h, self.act)?;
        h = self.conv2.forward(&h)?;
        let shortcut = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        shortcut + h
    }
}

/// Loads a `[C, C]` projection under its current name or its pre-0.14 name; old checkpoints
/// stored the legacy ones as 1x1 convolutions `[C, C, 1, 1]`, which are the same matrix.
fn projection(vb: &VarBuilder, name: &str, legacy: &str, c: usize) -> candle_core::Result<Linear> {
    let prefix = if vb.contains_tensor(&format!("{name}.weight")) {
        name
    } else {
        legacy
    };
    let vb = vb.pp(prefix);
    let w = vb.get_unchecked("weight")?;
    let w = match w.dims() {
        [o, i, 1, 1] if *o == c && *i == c => w.reshape((c, c))?,
        [o, i] if *o == c && *i == c => w,
        dims => candle_core::bail!(
            "shape mismatch for {}.weight: expected [{c}, {c}], got {dims:?}",
            prefix
        ),
    };
    let b = vb.get(c, "bias")?;
    Ok(Linear::new(w, Some(b)))
}

/// diffusers `UNetMidBlock2D` of the VAE (decoder and encoder alike): resnet, the optional
/// single-head attention (`mid_block_add_attention`), resnet, at the top `channels`.
#[derive(Debug, Clone)]
pub(crate) struct MidBlock {
    resnet_0: ResnetBlock,
    attention: Option<Attention>,
    resnet_1: ResnetBlock,
}

impl MidBlock {
    /// `vb` is rooted at the block (`decoder.mid_block` / `encoder.mid_block`).
    pub(crate) fn new(
        channels: usize,
        cfg: &VaeConfig,
        act: Activation,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let c = channels;
        let resnet_0 = ResnetBlock::new(c, c, cfg, act, vb.pp("resnets.0"))?;
        let attention = if cfg.mid_block_add_attention {
            Some(Attention::new(
                c,
                c,
                cfg.norm_num_groups,
                vb.pp("attentions.0"),
            )?)
        } else {
            None
        };
        let resnet_1 = ResnetBlock::new(c, c, cfg, act, vb.pp("resnets.1"))?;
        Ok(Self {
            resnet_0,
            attention,
            resnet_1,
        })
    }

    /// `slice`: the attention's query rows per score matrix (see [`Attention::forward`]).
    pub(crate) fn forward(&self, x: &Tensor, slice: Option<usize>) -> candle_core::Result<Tensor> {
        let mut x = self.resnet_0.forward(x)?;
        if let Some(a) = &self.attention {
            x = a.forward(&x, slice)?;
        }
        self.resnet_1.forward(&x)
    }
}

/// diffusers `Attention` as the VAE mid block builds it (`_from_deprecated_attn_block`):
/// group norm, q/k/v over the H*W tokens, `heads = C / attention_head_dim` (one head, since
/// `attention_head_dim = block_out_channels[-1]`), output projection, residual.
#[derive(Debug, Clone)]
pub(crate) struct Attention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    scale: f64,
}

impl Attention {
    pub(crate) fn new(
        c: usize,
        head_dim: usize,
        groups: usize,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let to_out_name = "to_out.0";
        Ok(Self {
            group_norm: GroupNorm::new(c, groups, NORM_EPS, vb.pp("group_norm"))?,
            to_q: projection(&vb, "to_q", "query", c)?,
            to_k: projection(&vb, "to_k", "key", c)?,
            to_v: projection(&vb, "to_v", "value", c)?,
            to_out: projection(&vb, to_out_name, "proj_attn", c)?,
            heads: c / head_dim,
            scale: 1.0 / (head_dim as f64).sqrt(),
        })
    }

    /// `slice`: at most this many query rows per score matrix (bounds memory at `slice * H*W`).
    pub(crate) fn forward(&self, x: &Tensor, slice: Option<usize>) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let n = h * w;
        let d = c / self.heads;
        let tokens = self
            .group_norm
            .forward(x)?
            .reshape((b, c, n))?
            .transpose(1, 2)?
            .contiguous()?;
        let (q, k, v) = (
            self.to_q.forward(&tokens)?,
            self.to_k.forward(&tokens)?,
            self.to_v.forward(&tokens)?,
        );
        // f32 on the CPU: blocked attention (bounded memory whatever `slice` says).
        if let Some(attn) =
            crate::kernels::attention::attention(&q, &k, &v, self.heads, self.scale)?
        {
            let out = self
                .to_out
                .forward(&attn)?
                .transpose(1, 2)?
                .reshape((b, c, h, w))?;
            return out + x;
        }
        let split = |t: Tensor| -> candle_core::Result<Tensor> {
            t.reshape((b, n, self.heads, d))?
                .transpose(1, 2)?
                .reshape((b * self.heads, n, d))
        };
        let q = split(q)?;
        let k = split(k)?;
        let v = split(v)?.contiguous()?;
        let kt = k.transpose(1, 2)?.contiguous()?;
        let rows = slice.filter(|s| *s > 0).unwrap_or(n).min(n);
        let mut outs = Vec::with_capacity(n.div_ceil(rows));
        let mut start = 0;
        while start < n {
            let len = rows.min(n - start);
            let qs = q.narrow(1, start, len)?.contiguous()?;
            let scores = (qs.matmul(&kt)? * self.scale)?;
            // upcast_softmax=True in diffusers: probabilities in f32, then back.
            let probs = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?
                .to_dtype(v.dtype())?;
            outs.push(probs.matmul(&v)?);
            start += len;
        }
        let attn = Tensor::cat(&outs, 1)?;
        let attn = attn
            .reshape((b, self.heads, n, d))?
            .transpose(1, 2)?
            .reshape((b, n, c))?;
        let out = self
            .to_out
            .forward(&attn)?
            .transpose(1, 2)?
            .reshape((b, c, h, w))?;
        // residual_connection=True, rescale_output_factor=1.
        out + x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_norm_normalizes_each_group() {
        let dev = candle_core::Device::Cpu;
        let x = Tensor::arange(0f32, 32.0, &dev)
            .unwrap()
            .reshape((1, 4, 2, 4))
            .unwrap();
        let gn = GroupNorm {
            weight: Tensor::ones(4, DType::F32, &dev).unwrap(),
            bias: Tensor::zeros(4, DType::F32, &dev).unwrap(),
            groups: 2,
            eps: 0.0,
        };
        let y = gn.forward(&x).unwrap().reshape((2, 16)).unwrap();
        let mean: Vec<f32> = y.mean(1).unwrap().to_vec1().unwrap();
        let var: Vec<f32> = y.sqr().unwrap().mean(1).unwrap().to_vec1().unwrap();
        for g in 0..2 {
            assert!(mean[g].abs() < 1e-6);
            assert!((var[g] - 1.0).abs() < 1e-5);
        }
    }

    #[test]
    fn sliced_attention_equals_full() {
        let dev = candle_core::Device::Cpu;
        let c = 8;
        let eye = |s: f64| (Tensor::eye(c, DType::F32, &dev).unwrap() * s).unwrap();
        let lin = |s| Linear::new(eye(s), Some(Tensor::zeros(c, DType::F32, &dev).unwrap()));
        let attn = Attention {
            group_norm: GroupNorm {
                weight: Tensor::ones(c, DType::F32, &dev).unwrap(),
                bias: Tensor::zeros(c, DType::F32, &dev).unwrap(),
                groups: 2,
                eps: 1e-6,
            },
            to_q: lin(0.7),
            to_k: lin(1.3),
            to_v: lin(1.0),
            to_out: lin(0.5),
            heads: 1,
            scale: 1.0 / (c as f64).sqrt(),
        };
        let x = Tensor::randn(0f32, 1.0, (2, c, 3, 5), &dev).unwrap();
        let full = attn.forward(&x, None).unwrap();
        let sliced = attn.forward(&x, Some(4)).unwrap();
        let d: f32 = (full - sliced)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(d < 1e-6, "{d}");
    }
}
