//! The UNet's building blocks, named and wired as in diffusers (`resnet.py`, `attention.py`,
//! `transformer_2d.py`, `unet_2d_blocks.py`, `downsampling.py`, `upsampling.py`) so that the
//! safetensors keys map one to one.
//!
//! Files: `resnet`, `transformer` (attention, feed-forward, `Transformer2D`), `resampling`
//! (down/up sampling), `unet_2d_blocks` (down, mid and up blocks); this one holds the norms,
//! activations and convolution/linear helpers they share. Each block's `LoraTargets` impl (the
//! weights a LoRA may change) sits beside it.

use candle_core::{DType, Result, Tensor, D};
use candle_nn::VarBuilder;

use crate::attention::AttentionSlicing;
pub(crate) use crate::kernels::{conv2d, Conv2d};

use crate::lora::Target;

mod resampling;
mod resnet;
mod transformer;
mod unet_2d_blocks;

pub(crate) use resampling::Downsample;
pub(crate) use resnet::ResnetParams;
pub(crate) use transformer::TransformerParams;
pub(crate) use unet_2d_blocks::{DownBlock, MidBlock, UpBlock};

/// diffusers' `get_activation` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Act {
    Silu,
    Gelu,
    Relu,
    Mish,
}

impl Act {
    pub(crate) fn from_name(name: &str) -> Result<Self> {
        Ok(match name {
            "silu" | "swish" => Self::Silu,
            "gelu" => Self::Gelu,
            "relu" => Self::Relu,
            "mish" => Self::Mish,
            _ => candle_core::bail!("unsupported activation {name}"),
        })
    }

    pub(crate) fn forward(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Silu => x.silu(),
            Self::Gelu => x.gelu_erf(),
            Self::Relu => x.relu(),
            // x * tanh(softplus(x)); softplus written stably as max(x,0) + ln(1 + e^-|x|).
            Self::Mish => {
                let sp = (x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
                x * sp.tanh()?
            }
        }
    }
}

/// GroupNorm computed in f32 whatever the input dtype (cast in, cast out), like torch's autocast.
#[derive(Debug, Clone)]
pub(crate) struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    /// Its weight and bias as a LoRA target (a norm diff's).
    pub(crate) fn lora_target(&self) -> crate::lora::Target<'_> {
        crate::lora::Target::Norm(&self.weight, &self.bias)
    }

    pub(crate) fn new(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            candle_core::bail!(
                "GroupNorm {}: {groups} groups do not divide {channels} channels",
                vb.prefix()
            );
        }
        let weight = vb.get(channels, "weight")?.to_dtype(DType::F32)?;
        let bias = vb.get(channels, "bias")?.to_dtype(DType::F32)?;
        Ok(Self {
            weight,
            bias,
            groups,
            eps,
        })
    }

    /// `act(group_norm(x))`, fused into one pass for SiLU on f32 CPU tensors.
    pub(crate) fn forward_act(&self, x: &Tensor, act: Act) -> Result<Tensor> {
        let silu = act == Act::Silu;
        let fast =
            crate::kernels::group_norm(x, self.groups, &self.weight, &self.bias, self.eps, silu)?;
        match fast {
            Some(y) if silu => Ok(y),
            Some(y) => act.forward(&y),
            None => act.forward(&self.forward(x)?),
        }
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let fast = crate::kernels::group_norm;
        if let Some(y) = fast(x, self.groups, &self.weight, &self.bias, self.eps, false)? {
            return Ok(y);
        }
        let dtype = x.dtype();
        let dims = x.dims().to_vec();
        let (b, c) = (dims[0], dims[1]);
        let x = x.to_dtype(DType::F32)?.reshape((b, self.groups, ()))?;
        let n = x.dim(2)? as f64;
        let mean = (x.sum_keepdim(2)? / n)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = (xc.sqr()?.sum_keepdim(2)? / n)?;
        let xn = xc.broadcast_mul(&(var + self.eps)?.sqrt()?.recip()?)?;
        let mut wshape = vec![1usize; dims.len()];
        wshape[1] = c;
        xn.reshape(dims)?
            .broadcast_mul(&self.weight.reshape(wshape.clone())?)?
            .broadcast_add(&self.bias.reshape(wshape)?)?
            .to_dtype(dtype)
    }
}

/// LayerNorm over the last dim, in f32 (two-pass variance, as torch).
#[derive(Debug, Clone)]
pub(crate) struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// Its weight and bias as a LoRA target (a norm diff's).
    pub(crate) fn lora_target(&self) -> crate::lora::Target<'_> {
        crate::lora::Target::Norm(&self.weight, &self.bias)
    }

    pub(crate) fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get(dim, "weight")?.to_dtype(DType::F32)?;
        let bias = vb.get(dim, "bias")?.to_dtype(DType::F32)?;
        Ok(Self { weight, bias, eps })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = crate::kernels::cuda::layer_norm(x, &self.weight, &self.bias, self.eps)? {
            return Ok(y);
        }
        let fast = crate::kernels::norm::layer_norm;
        if let Some(y) = fast(x, &self.weight, &self.bias, self.eps)? {
            return Ok(y);
        }
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?;
        let n = x.dim(D::Minus1)? as f64;
        let mean = (x.sum_keepdim(D::Minus1)? / n)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = (xc.sqr()?.sum_keepdim(D::Minus1)? / n)?;
        xc.broadcast_mul(&(var + self.eps)?.sqrt()?.recip()?)?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)?
            .to_dtype(dtype)
    }
}

// Linear layers of the transformers: weights stored transposed on the CPU, bias and residual
// folded into the gemm ([`crate::kernels::linear::Dense`]).
use crate::kernels::linear::Dense;

fn linear_fwd(l: &Dense, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
    l.forward(x, residual)
}

/// Options every block needs at run time.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RunOpts<'a> {
    pub slicing: AttentionSlicing,
    /// The IP-Adapters' image keys and values for this call's batch, by cross-attention.
    pub ip: Option<&'a crate::ip_adapter::ImageTokens>,
    /// The reference modules' hooks, while a request has them.
    pub reference: Option<&'a crate::unet::reference::ReferenceBanks>,
}

impl RunOpts<'_> {
    /// A hooked block's output (`key`, see `crate::unet::reference`) through the reference
    /// hook, if any.
    pub(crate) fn renormalised(&self, key: impl FnOnce() -> String, x: Tensor) -> Result<Tensor> {
        match self.reference {
            Some(r) => r.group_norm(&key(), &x),
            None => Ok(x),
        }
    }
}

// The weights a LoRA may change, by diffusers module path (see `crate::lora`).
type Out<'a> = Vec<(String, Target<'a>)>;

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn norms_normalise_in_f32() -> Result<()> {
        let dev = Device::Cpu;
        let mut ts = std::collections::HashMap::new();
        ts.insert("gn.weight".to_string(), Tensor::ones(4, DType::F32, &dev)?);
        ts.insert("gn.bias".to_string(), Tensor::zeros(4, DType::F32, &dev)?);
        ts.insert("ln.weight".to_string(), Tensor::ones(8, DType::F32, &dev)?);
        ts.insert("ln.bias".to_string(), Tensor::zeros(8, DType::F32, &dev)?);
        let vb = VarBuilder::from_tensors(ts, DType::F32, &dev);
        let gn = GroupNorm::new(2, 4, 1e-6, vb.pp("gn"))?;
        let x = (Tensor::randn(0f32, 3.0, (2, 4, 5, 5), &dev)? + 100.0)?;
        let y = gn.forward(&x)?.reshape((2, 2, 50))?;
        let mean = y
            .mean_keepdim(2)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(mean < 1e-4, "{mean}");
        let yh = gn.forward(&x.to_dtype(DType::F16)?)?;
        assert_eq!(yh.dtype(), DType::F16);
        let ln = LayerNorm::new(8, 1e-5, vb.pp("ln"))?;
        let x = (Tensor::randn(0f32, 1.0, (3, 8), &dev)? * 1000.0)?;
        let y = ln.forward(&x)?;
        let var = y.sqr()?.mean_keepdim(1)?.flatten_all()?.to_vec1::<f32>()?;
        assert!(var.iter().all(|v| (v - 1.0).abs() < 1e-3), "{var:?}");
        Ok(())
    }
}
