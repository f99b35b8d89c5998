//! The UNet's building blocks, named and wired as in diffusers (`resnet.py`, `attention.py`,
//! `transformer_2d.py`, `unet_2d_blocks.py`, `downsampling.py`, `upsampling.py`) so that the
//! safetensors keys map one to one.

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{Linear, VarBuilder};

use crate::attention::{merge_heads, sdpa, split_heads, AttentionSlicing};
pub(crate) use crate::kernels::Conv2d;

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
        match fast {
            Some(y) if silu => Ok(y),
            Some(y) => act.forward(&y),
            None => act.forward(&self.forward(x)?),
        }
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gpu = crate::kernels::cuda::group_norm;
        if let Some(y) = gpu(x, self.groups, &self.weight, &self.bias, self.eps, false)? {
            return Ok(y);
        }
        let fast = crate::kernels::norm::group_norm;
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

pub(crate) fn conv2d(
    cin: usize,
    cout: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    vb: VarBuilder,
) -> Result<Conv2d> {
    crate::kernels::conv2d(cin, cout, kernel, stride, padding, vb)
}

// Linear layers of the transformers: weights stored transposed on the CPU, bias and residual
// folded into the gemm ([`crate::kernels::linear::Dense`]).
use crate::kernels::linear::Dense;

fn linear_fwd(l: &Dense, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
    l.forward(x, residual)
}

/// Options every block needs at run time.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RunOpts {
    pub slicing: AttentionSlicing,
}

// ---------------------------------------------------------------- resnet

#[derive(Debug, Clone)]
pub(crate) struct ResnetParams {
    pub groups: usize,
    pub eps: f64,
    pub temb_channels: usize,
    pub act: Act,
    pub scale_shift: bool,
    pub output_scale_factor: f64,
}

/// diffusers `ResnetBlock2D` (pre-norm, no up/down sampling inside).
#[derive(Debug, Clone)]
pub(crate) struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Linear,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    p: ResnetParams,
}

impl ResnetBlock {
    pub(crate) fn new(cin: usize, cout: usize, p: &ResnetParams, vb: VarBuilder) -> Result<Self> {
        let temb_out = if p.scale_shift { 2 * cout } else { cout };
        Ok(Self {
            norm1: GroupNorm::new(p.groups, cin, p.eps, vb.pp("norm1"))?,
            conv1: conv2d(cin, cout, 3, 1, 1, vb.pp("conv1"))?,
            time_emb_proj: candle_nn::linear(p.temb_channels, temb_out, vb.pp("time_emb_proj"))?,
            norm2: GroupNorm::new(p.groups, cout, p.eps, vb.pp("norm2"))?,
            conv2: conv2d(cout, cout, 3, 1, 1, vb.pp("conv2"))?,
            conv_shortcut: if cin != cout {
                Some(conv2d(cin, cout, 1, 1, 0, vb.pp("conv_shortcut"))?)
            } else {
                None
            },
            p: p.clone(),
        })
    }

    pub(crate) fn forward(&self, x: &Tensor, temb: &Tensor) -> Result<Tensor> {
        let act = self.p.act;
        let h = self.norm1.forward_act(x, act)?;
        let h = self.conv1.forward(&h)?;
        let t = self
            .time_emb_proj
            .forward(&act.forward(temb)?)?
            .unsqueeze(2)?
            .unsqueeze(3)?;
        let h = if self.p.scale_shift {
            let c = t.dim(1)? / 2;
            let (scale, shift) = (t.narrow(1, 0, c)?, t.narrow(1, c, c)?);
            let h = self
                .norm2
                .forward(&h)?
                .broadcast_mul(&(scale + 1.0)?)?
                .broadcast_add(&shift)?;
            act.forward(&h)?
        } else {
            // The time embedding is a per-(batch, channel) bias over h.
            let hw = h.dim(2)? * h.dim(3)?;
            let ht = match crate::kernels::cuda::bias_add(&h, &t, hw, None)? {
                Some(ht) => ht,
                None => h.broadcast_add(&t)?,
            };
            self.norm2.forward_act(&ht, act)?
        };
        let h = self.conv2.forward(&h)?;
        let x = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        let out = (x + h)?;
        if self.p.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out / self.p.output_scale_factor
        }
    }
}

// ---------------------------------------------------------------- transformer

/// diffusers `Attention` with the default processor: no bias on q/k/v, bias on `to_out.0`.
#[derive(Debug, Clone)]
pub(crate) struct Attention {
    to_q: Dense,
    to_k: Dense,
    to_v: Dense,
    to_out: Dense,
    heads: usize,
    scale: f64,
    upcast: bool,
}

impl Attention {
    fn new(
        dim: usize,
        ctx_dim: usize,
        heads: usize,
        head_dim: usize,
        upcast: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        Ok(Self {
            to_q: Dense::load(dim, inner, false, vb.pp("to_q"))?,
            to_k: Dense::load(ctx_dim, inner, false, vb.pp("to_k"))?,
            to_v: Dense::load(ctx_dim, inner, false, vb.pp("to_v"))?,
            to_out: Dense::load(inner, dim, true, vb.pp("to_out").pp("0"))?,
            heads,
            scale: 1.0 / (head_dim as f64).sqrt(),
            upcast,
        })
    }

    /// `to_out(attention) + residual`.
    fn forward(
        &self,
        x: &Tensor,
        ctx: Option<&Tensor>,
        o: RunOpts,
        residual: &Tensor,
    ) -> Result<Tensor> {
        let ctx = ctx.unwrap_or(x);
        let (q, k, v) = (
            linear_fwd(&self.to_q, x, None)?,
            linear_fwd(&self.to_k, ctx, None)?,
            linear_fwd(&self.to_v, ctx, None)?,
        );
        // f16 on a GPU: our flash kernel, heads read in place (slicing is moot: no scores).
        let gpu = crate::kernels::cuda::attention;
        if let Some(a) = gpu(&q, &k, &v, self.heads, self.scale)? {
            return linear_fwd(&self.to_out, &a, Some(residual));
        }
        // f32 on the CPU: fused attention, never the whole score matrix (slicing is moot).
        let fast = crate::kernels::attention::attention;
        if let Some(a) = fast(&q, &k, &v, self.heads, self.scale)? {
            return linear_fwd(&self.to_out, &a, Some(residual));
        }
        let q = split_heads(&q, self.heads)?;
        let k = split_heads(&k, self.heads)?;
        let v = split_heads(&v, self.heads)?;
        let a = sdpa(&q, &k, &v, self.scale, o.slicing, self.upcast)?;
        linear_fwd(&self.to_out, &merge_heads(&a, self.heads)?, Some(residual))
    }
}

/// `FeedForward` with the GEGLU activation (`net.0.proj`, `net.2`).
#[derive(Debug, Clone)]
struct GegluFeedForward {
    proj: Dense,
    out: Dense,
    inner: usize,
}

impl GegluFeedForward {
    fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        // diffusers' FeedForward default: inner_dim = 4 * dim.
        let inner = 4 * dim;
        Ok(Self {
            proj: Dense::load(dim, 2 * inner, true, vb.pp("net").pp("0").pp("proj"))?,
            out: Dense::load(inner, dim, true, vb.pp("net").pp("2"))?,
            inner,
        })
    }

    /// `ff(x) + residual`.
    fn forward(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let h = linear_fwd(&self.proj, x, None)?;
        if let Some(y) = crate::kernels::cuda::geglu(&h)? {
            return linear_fwd(&self.out, &y, Some(residual));
        }
        if let Some(y) = crate::kernels::act::geglu(&h)? {
            return linear_fwd(&self.out, &y, Some(residual));
        }
        let a = h.narrow(D::Minus1, 0, self.inner)?;
        let gate = h.narrow(D::Minus1, self.inner, self.inner)?.gelu_erf()?;
        linear_fwd(&self.out, &(a * gate)?, Some(residual))
    }
}

/// `BasicTransformerBlock` with `norm_type="layer_norm"`.
#[derive(Debug, Clone)]
struct TransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: GegluFeedForward,
    only_cross: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct TransformerParams {
    pub heads: usize,
    pub cross_dim: usize,
    pub layers: usize,
    pub groups: usize,
    pub linear_projection: bool,
    pub only_cross: bool,
    pub upcast: bool,
}

// Fixed by diffusers' Transformer2DModel for these UNets (not in unet/config.json).
const TRANSFORMER_GROUP_NORM_EPS: f64 = 1e-6;
const TRANSFORMER_LAYER_NORM_EPS: f64 = 1e-5;

impl TransformerBlock {
    fn new(dim: usize, p: &TransformerParams, vb: VarBuilder) -> Result<Self> {
        let head_dim = dim / p.heads;
        let eps = TRANSFORMER_LAYER_NORM_EPS;
        let attn1_ctx = if p.only_cross { p.cross_dim } else { dim };
        Ok(Self {
            norm1: LayerNorm::new(dim, eps, vb.pp("norm1"))?,
            attn1: Attention::new(dim, attn1_ctx, p.heads, head_dim, p.upcast, vb.pp("attn1"))?,
            norm2: LayerNorm::new(dim, eps, vb.pp("norm2"))?,
            attn2: Attention::new(
                dim,
                p.cross_dim,
                p.heads,
                head_dim,
                p.upcast,
                vb.pp("attn2"),
            )?,
            norm3: LayerNorm::new(dim, eps, vb.pp("norm3"))?,
            ff: GegluFeedForward::new(dim, vb.pp("ff"))?,
            only_cross: p.only_cross,
        })
    }

    fn forward(&self, x: &Tensor, ctx: &Tensor, o: RunOpts) -> Result<Tensor> {
        let n = self.norm1.forward(x)?;
        let x = self
            .attn1
            .forward(&n, self.only_cross.then_some(ctx), o, x)?;
        let n = self.norm2.forward(&x)?;
        let x = self.attn2.forward(&n, Some(ctx), o, &x)?;
        let n = self.norm3.forward(&x)?;
        self.ff.forward(&n, &x)
    }
}

/// `Transformer2DModel` on continuous inputs. `proj_in`/`proj_out` are linear layers or 1x1
/// convolutions; both are applied as matmuls over `[B, H*W, C]` (the same arithmetic).
#[derive(Debug, Clone)]
pub(crate) struct Transformer2D {
    norm: GroupNorm,
    proj_in: Dense,
    blocks: Vec<TransformerBlock>,
    proj_out: Dense,
}

impl Transformer2D {
    pub(crate) fn new(channels: usize, p: &TransformerParams, vb: VarBuilder) -> Result<Self> {
        let proj = |cin, cout, vb: VarBuilder| {
            if p.linear_projection {
                Dense::load(cin, cout, true, vb)
            } else {
                Dense::load_conv1x1(cin, cout, vb)
            }
        };
        let vbb = vb.pp("transformer_blocks");
        Ok(Self {
            norm: GroupNorm::new(
                p.groups,
                channels,
                TRANSFORMER_GROUP_NORM_EPS,
                vb.pp("norm"),
            )?,
            proj_in: proj(channels, channels, vb.pp("proj_in"))?,
            blocks: (0..p.layers)
                .map(|i| TransformerBlock::new(channels, p, vbb.pp(i)))
                .collect::<Result<_>>()?,
            proj_out: proj(channels, channels, vb.pp("proj_out"))?,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor, ctx: &Tensor, o: RunOpts) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let t = self.norm.forward(x)?;
        // f32 CPU: the projections read and write NCHW through strides (no transpose copies).
        use crate::kernels::linear::{linear_from_nchw, linear_to_nchw_add};
        let fast_in = match self.proj_in.transposed()? {
            Some((wt, bias)) => linear_from_nchw(&t, wt, bias)?,
            None => None,
        };
        let mut t = match fast_in {
            Some(t) => t,
            None => {
                let t = t.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?;
                self.proj_in.forward(&t, None)?
            }
        };
        for blk in &self.blocks {
            t = blk.forward(&t, ctx, o)?;
        }
        if let Some((wt, bias)) = self.proj_out.transposed()? {
            if let Some(y) = linear_to_nchw_add(&t, wt, bias, x)? {
                return Ok(y);
            }
        }
        let t = self.proj_out.forward(&t, None)?;
        let t = t.transpose(1, 2)?.contiguous()?.reshape((b, c, h, w))?;
        t + x
    }
}

// ---------------------------------------------------------------- resampling

/// `Downsample2D` with a convolution (stride 2).
#[derive(Debug, Clone)]
pub(crate) struct Downsample {
    conv: Conv2d,
    pad_right_bottom: bool,
}

impl Downsample {
    pub(crate) fn new(channels: usize, padding: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv: conv2d(channels, channels, 3, 2, padding, vb.pp("conv"))?,
            // diffusers pads (0,1,0,1) itself when the conv has no padding.
            pad_right_bottom: padding == 0,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.pad_right_bottom {
            let x = x.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?;
            self.conv.forward(&x)
        } else {
            self.conv.forward(x)
        }
    }
}

/// `Upsample2D`: nearest-neighbour to twice the size (or to `size`), then a 3x3 convolution.
#[derive(Debug, Clone)]
pub(crate) struct Upsample {
    conv: Conv2d,
}

/// torch's `nearest` source index for output `i`: `min(floor(i * (in/out as f32)), in-1)`.
fn nearest_indices(input: usize, output: usize, dev: &Device) -> Result<Tensor> {
    let scale = input as f32 / output as f32;
    let idx: Vec<u32> = (0..output)
        .map(|i| ((i as f32 * scale).floor() as usize).min(input - 1) as u32)
        .collect();
    Tensor::from_vec(idx, output, dev)
}

pub(crate) fn upsample_nearest(x: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    match size {
        None => x.upsample_nearest2d(2 * h, 2 * w),
        Some((oh, ow)) if oh == 2 * h && ow == 2 * w => x.upsample_nearest2d(oh, ow),
        Some((oh, ow)) => {
            let x = x.index_select(&nearest_indices(h, oh, x.device())?, 2)?;
            x.index_select(&nearest_indices(w, ow, x.device())?, 3)
        }
    }
}

impl Upsample {
    pub(crate) fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv: conv2d(channels, channels, 3, 1, 1, vb.pp("conv"))?,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        self.conv.forward(&upsample_nearest(x, size)?)
    }
}

// ---------------------------------------------------------------- UNet blocks

/// `DownBlock2D` (no attentions) or `CrossAttnDownBlock2D`.
#[derive(Debug, Clone)]
pub(crate) struct DownBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<Transformer2D>,
    downsample: Option<Downsample>,
}

impl DownBlock {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        cin: usize,
        cout: usize,
        layers: usize,
        rp: &ResnetParams,
        tp: Option<&TransformerParams>,
        downsample_padding: Option<usize>,
        vb: VarBuilder,
    ) -> Result<Self> {
        let mut resnets = Vec::with_capacity(layers);
        let mut attentions = Vec::new();
        for i in 0..layers {
            let c = if i == 0 { cin } else { cout };
            resnets.push(ResnetBlock::new(c, cout, rp, vb.pp("resnets").pp(i))?);
            if let Some(tp) = tp {
                attentions.push(Transformer2D::new(cout, tp, vb.pp("attentions").pp(i))?);
            }
        }
        let downsample = match downsample_padding {
            Some(p) => Some(Downsample::new(cout, p, vb.pp("downsamplers").pp(0))?),
            None => None,
        };
        Ok(Self {
            resnets,
            attentions,
            downsample,
        })
    }

    /// Returns the output and pushes the skip connections onto `skips`.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        ctx: &Tensor,
        o: RunOpts,
        skips: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        let mut x = x.clone();
        for (i, r) in self.resnets.iter().enumerate() {
            x = r.forward(&x, temb)?;
            if let Some(a) = self.attentions.get(i) {
                x = a.forward(&x, ctx, o)?;
            }
            skips.push(x.clone());
        }
        if let Some(d) = &self.downsample {
            x = d.forward(&x)?;
            skips.push(x.clone());
        }
        Ok(x)
    }
}

/// `UNetMidBlock2DCrossAttn`: resnet, then (transformer, resnet) pairs.
#[derive(Debug, Clone)]
pub(crate) struct MidBlock {
    first: ResnetBlock,
    rest: Vec<(Transformer2D, ResnetBlock)>,
}

impl MidBlock {
    pub(crate) fn new(
        channels: usize,
        rp: &ResnetParams,
        tp: &TransformerParams,
        vb: VarBuilder,
    ) -> Result<Self> {
        // diffusers builds it with its default num_layers=1.
        let num_layers = 1;
        let first = ResnetBlock::new(channels, channels, rp, vb.pp("resnets").pp(0))?;
        let rest = (0..num_layers)
            .map(|i| {
                Ok((
                    Transformer2D::new(channels, tp, vb.pp("attentions").pp(i))?,
                    ResnetBlock::new(channels, channels, rp, vb.pp("resnets").pp(i + 1))?,
                ))
            })
            .collect::<Result<_>>()?;
        Ok(Self { first, rest })
    }

    pub(crate) fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        ctx: &Tensor,
        o: RunOpts,
    ) -> Result<Tensor> {
        let mut x = self.first.forward(x, temb)?;
        for (a, r) in &self.rest {
            x = r.forward(&a.forward(&x, ctx, o)?, temb)?;
        }
        Ok(x)
    }
}

/// `UpBlock2D` or `CrossAttnUpBlock2D`.
#[derive(Debug, Clone)]
pub(crate) struct UpBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<Transformer2D>,
    upsample: Option<Upsample>,
}

impl UpBlock {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        cin: usize,
        prev_out: usize,
        cout: usize,
        layers: usize,
        rp: &ResnetParams,
        tp: Option<&TransformerParams>,
        add_upsample: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let mut resnets = Vec::with_capacity(layers);
        let mut attentions = Vec::new();
        for i in 0..layers {
            let skip = if i == layers - 1 { cin } else { cout };
            let rin = if i == 0 { prev_out } else { cout };
            resnets.push(ResnetBlock::new(
                rin + skip,
                cout,
                rp,
                vb.pp("resnets").pp(i),
            )?);
            if let Some(tp) = tp {
                attentions.push(Transformer2D::new(cout, tp, vb.pp("attentions").pp(i))?);
            }
        }
        let upsample = if add_upsample {
            Some(Upsample::new(cout, vb.pp("upsamplers").pp(0))?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            upsample,
        })
    }

    pub(crate) fn num_resnets(&self) -> usize {
        self.resnets.len()
    }

    /// Consumes skip connections from the end of `skips` (last one first, as diffusers).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        skips: &mut Vec<Tensor>,
        temb: &Tensor,
        ctx: &Tensor,
        upsample_size: Option<(usize, usize)>,
        o: RunOpts,
    ) -> Result<Tensor> {
        let mut x = x.clone();
        for (i, r) in self.resnets.iter().enumerate() {
            let skip = match skips.pop() {
                Some(s) => s,
                None => candle_core::bail!("UNet up block ran out of skip connections"),
            };
            x = r.forward(&Tensor::cat(&[&x, &skip], 1)?, temb)?;
            if let Some(a) = self.attentions.get(i) {
                x = a.forward(&x, ctx, o)?;
            }
        }
        match &self.upsample {
            Some(u) => u.forward(&x, upsample_size),
            None => Ok(x),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_indices_match_torch_rule() -> Result<()> {
        // torch: F.interpolate(arange(5), size=9, mode="nearest") picks floor(i*5/9).
        let idx = nearest_indices(5, 9, &Device::Cpu)?.to_vec1::<u32>()?;
        assert_eq!(idx, vec![0, 0, 1, 1, 2, 2, 3, 3, 4]);
        let idx = nearest_indices(3, 6, &Device::Cpu)?.to_vec1::<u32>()?;
        assert_eq!(idx, vec![0, 0, 1, 1, 2, 2]);
        Ok(())
    }

    #[test]
    fn upsample_odd_size_equals_exact_double_when_size_is_double() -> Result<()> {
        let x = Tensor::arange(0f32, 12.0, &Device::Cpu)?.reshape((1, 1, 3, 4))?;
        let a = upsample_nearest(&x, None)?;
        let b = upsample_nearest(&x, Some((6, 8)))?;
        assert_eq!(
            a.flatten_all()?.to_vec1::<f32>()?,
            b.flatten_all()?.to_vec1::<f32>()?
        );
        let c = upsample_nearest(&x, Some((5, 7)))?;
        assert_eq!(c.dims(), &[1, 1, 5, 7]);
        // Row 4 of 5 maps to source row floor(4*3/5)=2; column 6 of 7 to floor(6*4/7)=3.
        assert_eq!(c.get(0)?.get(0)?.get(4)?.get(6)?.to_scalar::<f32>()?, 11.0);
        Ok(())
    }

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

// The weights a LoRA may change, by diffusers module path (see `crate::lora`).
mod lora_targets {
    use super::*;
    use crate::lora::{join, LoraTargets, Target};

    type Out<'a> = Vec<(String, Target<'a>)>;

    impl LoraTargets for ResnetBlock {
        fn lora_targets<'a>(&'a self, p: &str, out: &mut Out<'a>) {
            out.push((join(p, "conv1"), Target::Conv(&self.conv1)));
            out.push((
                join(p, "time_emb_proj"),
                Target::Linear(&self.time_emb_proj),
            ));
            out.push((join(p, "conv2"), Target::Conv(&self.conv2)));
            if let Some(c) = &self.conv_shortcut {
                out.push((join(p, "conv_shortcut"), Target::Conv(c)));
            }
        }
    }

    impl LoraTargets for Attention {
        fn lora_targets<'a>(&'a self, p: &str, out: &mut Out<'a>) {
            out.push((join(p, "to_q"), Target::Dense(&self.to_q)));
            out.push((join(p, "to_k"), Target::Dense(&self.to_k)));
            out.push((join(p, "to_v"), Target::Dense(&self.to_v)));
            out.push((join(p, "to_out.0"), Target::Dense(&self.to_out)));
        }
    }

    impl LoraTargets for Transformer2D {
        fn lora_targets<'a>(&'a self, p: &str, out: &mut Out<'a>) {
            out.push((join(p, "proj_in"), Target::Dense(&self.proj_in)));
            for (i, b) in self.blocks.iter().enumerate() {
                let bp = join(p, format!("transformer_blocks.{i}"));
                b.attn1.lora_targets(&join(&bp, "attn1"), out);
                b.attn2.lora_targets(&join(&bp, "attn2"), out);
                out.push((join(&bp, "ff.net.0.proj"), Target::Dense(&b.ff.proj)));
                out.push((join(&bp, "ff.net.2"), Target::Dense(&b.ff.out)));
            }
            out.push((join(p, "proj_out"), Target::Dense(&self.proj_out)));
        }
    }

    impl LoraTargets for DownBlock {
        fn lora_targets<'a>(&'a self, p: &str, out: &mut Out<'a>) {
            for (i, r) in self.resnets.iter().enumerate() {
                r.lora_targets(&join(p, format!("resnets.{i}")), out);
            }
            for (i, a) in self.attentions.iter().enumerate() {
                a.lora_targets(&join(p, format!("attentions.{i}")), out);
            }
            if let Some(d) = &self.downsample {
                out.push((join(p, "downsamplers.0.conv"), Target::Conv(&d.conv)));
            }
        }
    }

    impl LoraTargets for MidBlock {
        fn lora_targets<'a>(&'a self, p: &str, out: &mut Out<'a>) {
            self.first.lora_targets(&join(p, "resnets.0"), out);
            for (i, (a, r)) in self.rest.iter().enumerate() {
                a.lora_targets(&join(p, format!("attentions.{i}")), out);
                r.lora_targets(&join(p, format!("resnets.{}", i + 1)), out);
            }
        }
    }

    impl LoraTargets for UpBlock {
        fn lora_targets<'a>(&'a self, p: &str, out: &mut Out<'a>) {
            for (i, r) in self.resnets.iter().enumerate() {
                r.lora_targets(&join(p, format!("resnets.{i}")), out);
            }
            for (i, a) in self.attentions.iter().enumerate() {
                a.lora_targets(&join(p, format!("attentions.{i}")), out);
            }
            if let Some(u) = &self.upsample {
                out.push((join(p, "upsamplers.0.conv"), Target::Conv(&u.conv)));
            }
        }
    }
}
