//! The decoder half of diffusers' `AutoencoderKL` (`vae/`): latents to images.
//!
//! Layout as `diffusers.models.autoencoders.vae.Decoder` (0.42): `post_quant_conv` (1x1), then
//! `decoder.conv_in`, `decoder.mid_block` (resnet, single-head self-attention, resnet),
//! `decoder.up_blocks.*` (`layers_per_block + 1` resnets each, nearest-2x + 3x3 conv upsampler on
//! all but the last), `conv_norm_out`, activation, `conv_out`. Every number comes from
//! [`VaeConfig`]; the fixed ones (norm eps 1e-6, one attention head) are fixed in diffusers too.
//!
//! Generic over the VarBuilder's dtype: convolutions and matmuls run in it, group norms and the
//! attention softmax run in f32 when the weights are half precision.

use candle_core::{DType, Module, Tensor};
use candle_nn::{Linear, VarBuilder};
use serde::Deserialize;

use crate::kernels::Conv2d;
use crate::{PipelineError, Result};

/// diffusers hard-codes this eps for every norm in the VAE decoder.
pub(crate) const NORM_EPS: f64 = 1e-6;

/// `vae/config.json` (diffusers `AutoencoderKL`); absent keys take diffusers' defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "default_3")]
    pub in_channels: usize,
    #[serde(default = "default_3")]
    pub out_channels: usize,
    #[serde(default = "default_4")]
    pub latent_channels: usize,
    #[serde(default = "default_block_out_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "default_1")]
    pub layers_per_block: usize,
    #[serde(default = "default_32")]
    pub norm_num_groups: usize,
    #[serde(default = "default_act_fn")]
    pub act_fn: String,
    #[serde(default = "default_scaling_factor")]
    pub scaling_factor: f64,
    /// `None` for SD 1.5; SD3/Flux-style VAEs subtract it before scaling.
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "default_down_block_types")]
    pub down_block_types: Vec<String>,
    #[serde(default = "default_up_block_types")]
    pub up_block_types: Vec<String>,
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
    /// The VAE overflows in fp16; the pipeline decodes in f32 when this is set.
    #[serde(default = "default_true")]
    pub force_upcast: bool,
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    /// An int or a pair; only informative for decoding.
    #[serde(default)]
    pub sample_size: Option<serde_json::Value>,
    #[serde(default)]
    pub latents_mean: Option<Vec<f64>>,
    #[serde(default)]
    pub latents_std: Option<Vec<f64>>,
}

fn default_1() -> usize {
    1
}
fn default_3() -> usize {
    3
}
fn default_4() -> usize {
    4
}
fn default_32() -> usize {
    32
}
fn default_true() -> bool {
    true
}
fn default_block_out_channels() -> Vec<usize> {
    vec![64]
}
fn default_act_fn() -> String {
    "silu".into()
}
fn default_scaling_factor() -> f64 {
    0.18215
}
fn default_down_block_types() -> Vec<String> {
    vec!["DownEncoderBlock2D".into()]
}
fn default_up_block_types() -> Vec<String> {
    vec!["UpDecoderBlock2D".into()]
}

impl VaeConfig {
    /// `key` (`up_block_types` or `down_block_types`) has one block per `block_out_channels`
    /// entry, each of the one type this code builds.
    pub(crate) fn check_block_types(&self, key: &str, types: &[String], want: &str) -> Result<()> {
        let bad = |m: String| Err(PipelineError::config("vae/config.json", m));
        if types.len() != self.block_out_channels.len() {
            return bad(format!(
                "{key} has {} entries but block_out_channels has {}",
                types.len(),
                self.block_out_channels.len()
            ));
        }
        if let Some(t) = types.iter().find(|t| t.as_str() != want) {
            return bad(format!("unsupported {key} entry {t:?} (only {want})"));
        }
        Ok(())
    }

    /// Rejects configs this decoder cannot build, naming the offending key.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(PipelineError::config("vae/config.json", m));
        if self.block_out_channels.is_empty() {
            return bad("block_out_channels is empty".into());
        }
        self.check_block_types("up_block_types", &self.up_block_types, "UpDecoderBlock2D")?;
        let g = self.norm_num_groups;
        if g == 0
            || self
                .block_out_channels
                .iter()
                .any(|c| *c == 0 || c % g != 0)
        {
            return bad(format!(
                "norm_num_groups {g} does not divide block_out_channels {:?}",
                self.block_out_channels
            ));
        }
        Activation::from_name(&self.act_fn)?;
        Ok(())
    }
}

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

    /// `act(group_norm(x))`, fused into one pass for SiLU on f32 CPU tensors and on CUDA.
    pub(crate) fn forward_act(&self, x: &Tensor, act: Activation) -> candle_core::Result<Tensor> {
        let silu = matches!(act, Activation::Silu);
        let gpu = crate::kernels::cuda::group_norm;
        let fast = match gpu(x, self.groups, &self.weight, &self.bias, self.eps, silu)? {
            Some(y) => Some(y),
            None => crate::kernels::norm::group_norm(
                x,
                self.groups,
                &self.weight,
                &self.bias,
                self.eps,
                silu,
            )?,
        };
        if let Some(y) = fast {
            return if silu { Ok(y) } else { act.forward(&y) };
        }
        act.forward(&self.forward(x)?)
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let gpu = crate::kernels::cuda::group_norm;
        let fast = match gpu(x, self.groups, &self.weight, &self.bias, self.eps, false)? {
            Some(y) => Some(y),
            None => crate::kernels::norm::group_norm(
                x,
                self.groups,
                &self.weight,
                &self.bias,
                self.eps,
                false,
            )?,
        };
        if let Some(y) = fast {
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

/// `UpDecoderBlock2D`: resnets, then optionally nearest 2x upsampling and a 3x3 conv.
#[derive(Debug, Clone)]
struct UpBlock {
    resnets: Vec<ResnetBlock>,
    upsampler: Option<Conv2d>,
}

impl UpBlock {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = x.clone();
        for r in &self.resnets {
            x = r.forward(&x)?;
        }
        if let Some(conv) = &self.upsampler {
            let (_, _, h, w) = x.dims4()?;
            x = conv.forward(&x.upsample_nearest2d(2 * h, 2 * w)?)?;
        }
        Ok(x)
    }
}

/// `AutoencoderKL.decode` without the encoder: `post_quant_conv` + `decoder`.
#[derive(Debug, Clone)]
pub struct AutoencoderKlDecoder {
    config: VaeConfig,
    post_quant_conv: Option<Conv2d>,
    conv_in: Conv2d,
    mid_resnet_0: ResnetBlock,
    mid_attention: Option<Attention>,
    mid_resnet_1: ResnetBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    act: Activation,
    dtype: DType,
    attention_slice: Option<usize>,
}

impl AutoencoderKlDecoder {
    /// `vb` is rooted at the VAE weight file (keys `post_quant_conv.*`, `decoder.*`).
    pub fn new(vb: VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        cfg.validate()?;
        let act = Activation::from_name(&cfg.act_fn)?;
        let ch = &cfg.block_out_channels;
        let top = *ch.last().expect("validated non-empty");
        let latent = cfg.latent_channels;
        let post_quant_conv = if cfg.use_post_quant_conv {
            Some(conv(latent, latent, 1, vb.pp("post_quant_conv"))?)
        } else {
            None
        };
        let vd = vb.pp("decoder");
        let conv_in = conv(latent, top, 3, vd.pp("conv_in"))?;
        let vm = vd.pp("mid_block");
        let mid_resnet_0 = ResnetBlock::new(top, top, cfg, act, vm.pp("resnets.0"))?;
        let mid_attention = if cfg.mid_block_add_attention {
            Some(Attention::new(
                top,
                top,
                cfg.norm_num_groups,
                vm.pp("attentions.0"),
            )?)
        } else {
            None
        };
        let mid_resnet_1 = ResnetBlock::new(top, top, cfg, act, vm.pp("resnets.1"))?;

        let mut up_blocks = Vec::with_capacity(ch.len());
        let mut prev = top;
        for (i, &out) in ch.iter().rev().enumerate() {
            let vu = vd.pp(format!("up_blocks.{i}"));
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| {
                    let cin = if j == 0 { prev } else { out };
                    ResnetBlock::new(cin, out, cfg, act, vu.pp(format!("resnets.{j}")))
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            let upsampler = if i + 1 < ch.len() {
                Some(conv(out, out, 3, vu.pp("upsamplers.0.conv"))?)
            } else {
                None
            };
            up_blocks.push(UpBlock { resnets, upsampler });
            prev = out;
        }
        let bottom = ch[0];
        let conv_norm_out = GroupNorm::new(
            bottom,
            cfg.norm_num_groups,
            NORM_EPS,
            vd.pp("conv_norm_out"),
        )?;
        let conv_out = conv(bottom, cfg.out_channels, 3, vd.pp("conv_out"))?;
        Ok(Self {
            config: cfg.clone(),
            post_quant_conv,
            conv_in,
            mid_resnet_0,
            mid_attention,
            mid_resnet_1,
            up_blocks,
            conv_norm_out,
            conv_out,
            act,
            dtype: vb.dtype(),
            attention_slice: None,
        })
    }

    /// Computes the mid-block attention `rows` query rows at a time (`None`: all at once).
    /// At 512x512 there are 4096 tokens, so one full f32 score matrix is 64 MiB per image.
    pub fn with_attention_slice(mut self, rows: Option<usize>) -> Self {
        self.attention_slice = rows;
        self
    }

    pub fn set_attention_slice(&mut self, rows: Option<usize>) {
        self.attention_slice = rows;
    }

    /// diffusers `vae.decode(z).sample` for `z` = latents / scaling_factor, `[B, latent, h, w]`
    /// -> `[B, out_channels, h*f, w*f]` in the weights' dtype (values roughly in [-1, 1]).
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let mut x = z.to_dtype(self.dtype)?;
        if let Some(c) = &self.post_quant_conv {
            x = c.forward(&x)?;
        }
        x = self.conv_in.forward(&x)?;
        x = self.mid_resnet_0.forward(&x)?;
        if let Some(a) = &self.mid_attention {
            x = a.forward(&x, self.attention_slice)?;
        }
        x = self.mid_resnet_1.forward(&x)?;
        for block in &self.up_blocks {
            x = block.forward(&x)?;
        }
        x = self.conv_norm_out.forward_act(&x, self.act)?;
        Ok(self.conv_out.forward(&x)?)
    }

    /// Spatial ratio image / latent: `2^(len(block_out_channels) - 1)`.
    pub fn downscale_factor(&self) -> usize {
        1 << (self.config.block_out_channels.len() - 1)
    }

    pub fn scaling_factor(&self) -> f64 {
        self.config.scaling_factor
    }

    pub fn shift_factor(&self) -> Option<f64> {
        self.config.shift_factor
    }

    pub fn latent_channels(&self) -> usize {
        self.config.latent_channels
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_follow_diffusers() {
        let cfg: VaeConfig = serde_json::from_str(
            r#"{"_class_name": "AutoencoderKL", "block_out_channels": [8, 16],
                "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"], "norm_num_groups": 4}"#,
        )
        .unwrap();
        assert_eq!(cfg.latent_channels, 4);
        assert!(cfg.mid_block_add_attention && cfg.use_post_quant_conv);
        assert_eq!(cfg.shift_factor, None);
        assert!((cfg.scaling_factor - 0.18215).abs() < 1e-12);
        cfg.validate().unwrap();
    }

    #[test]
    fn config_rejects_mismatched_blocks() {
        let cfg: VaeConfig = serde_json::from_str(
            r#"{"block_out_channels": [8, 16], "up_block_types": ["UpDecoderBlock2D"]}"#,
        )
        .unwrap();
        assert!(matches!(cfg.validate(), Err(PipelineError::Config { .. })));
        // The encoder's down blocks go through the same check, named by their key.
        let cfg: VaeConfig = serde_json::from_str(
            r#"{"block_out_channels": [8, 16], "norm_num_groups": 4,
                "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
                "down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]}"#,
        )
        .unwrap();
        cfg.validate().unwrap();
        let e = cfg
            .check_block_types(
                "down_block_types",
                &cfg.down_block_types,
                "DownEncoderBlock2D",
            )
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("down_block_types") && e.contains("AttnDownEncoderBlock2D"),
            "{e}"
        );
    }

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
