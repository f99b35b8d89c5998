//! diffusers' `Attention`, GEGLU `FeedForward`, `BasicTransformerBlock` and `Transformer2DModel`
//! (`attention.py`, `attention_processor.py`, `transformer_2d.py`).

use candle_core::{Result, Tensor, D};
use candle_nn::VarBuilder;

use super::{linear_fwd, GroupNorm, LayerNorm, Out, RunOpts};
use crate::attention::{merge_heads, sdpa, split_heads};
use crate::kernels::linear::Dense;
use crate::lora::{join, LoraTargets, Target};

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
    /// A cross-attention's module path from its block on (`down_blocks.0.attentions.0.
    /// transformer_blocks.0.attn2`): where an IP-Adapter's image keys and values join
    /// ([`crate::ip_adapter::ImageTokens`]); `None` for a self-attention.
    ip_layer: Option<String>,
}

/// The module path from the UNet's block on (any root prefix dropped).
pub(super) fn block_path(prefix: &str) -> String {
    ["down_blocks.", "mid_block.", "up_blocks."]
        .iter()
        .filter_map(|b| prefix.find(b))
        .min()
        .map_or(prefix, |at| &prefix[at..])
        .to_string()
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
        let ip_layer = vb
            .prefix()
            .ends_with("attn2")
            .then(|| block_path(&vb.prefix()));
        Ok(Self {
            to_q: Dense::load(dim, inner, false, vb.pp("to_q"))?,
            to_k: Dense::load(ctx_dim, inner, false, vb.pp("to_k"))?,
            to_v: Dense::load(ctx_dim, inner, false, vb.pp("to_v"))?,
            to_out: Dense::load(inner, dim, true, vb.pp("to_out").pp("0"))?,
            heads,
            scale: 1.0 / (head_dim as f64).sqrt(),
            upcast,
            ip_layer,
        })
    }

    /// `to_out(attention) + residual`; a cross-attention adds each IP-Adapter's
    /// `scale * attention(q, k_ip, v_ip)` before `to_out` (diffusers'
    /// `IPAdapterAttnProcessor2_0`).
    fn forward(
        &self,
        x: &Tensor,
        ctx: Option<&Tensor>,
        o: RunOpts<'_>,
        residual: &Tensor,
    ) -> Result<Tensor> {
        let ctx = ctx.unwrap_or(x);
        let (q, k, v) = (
            linear_fwd(&self.to_q, x, None)?,
            linear_fwd(&self.to_k, ctx, None)?,
            linear_fwd(&self.to_v, ctx, None)?,
        );
        let mut a = self.attend(&q, &k, &v, o)?;
        let image = match (o.ip, &self.ip_layer) {
            (Some(tokens), Some(layer)) => tokens.layer(layer),
            _ => &[],
        };
        for kv in image {
            let extra = self.attend(&q, &kv.key, &kv.value, o)?;
            a = (a + (extra * kv.scale)?)?;
        }
        linear_fwd(&self.to_out, &a, Some(residual))
    }

    /// `softmax(q k^T * scale) v` with heads merged back: `[B, N, inner]`.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, o: RunOpts<'_>) -> Result<Tensor> {
        // f16 on a GPU: our flash kernel, heads read in place (slicing is moot: no scores).
        if let Some(a) = crate::kernels::cuda::attention(q, k, v, self.heads, self.scale)? {
            return Ok(a);
        }
        // f32 on the CPU: fused attention, never the whole score matrix (slicing is moot).
        if let Some(a) = crate::kernels::attention::attention(q, k, v, self.heads, self.scale)? {
            return Ok(a);
        }
        let q = split_heads(q, self.heads)?;
        let k = split_heads(k, self.heads)?;
        let v = split_heads(v, self.heads)?;
        let a = sdpa(&q, &k, &v, self.scale, o.slicing, self.upcast)?;
        merge_heads(&a, self.heads)
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
    /// Its module path from the UNet's block on: the reference hooks' key.
    path: String,
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
            path: block_path(&vb.prefix()),
        })
    }

    fn forward(&self, x: &Tensor, ctx: &Tensor, o: RunOpts<'_>) -> Result<Tensor> {
        let n = self.norm1.forward(x)?;
        let x = match o.reference.filter(|_| !self.only_cross) {
            // The sd-webui-controlnet extension's reference hook (`crate::unet::reference`).
            Some(r) => r.self_attention(&self.path, &n, x, |n, extra, x| {
                self.attn1.forward(n, extra, o, x)
            })?,
            None => self
                .attn1
                .forward(&n, self.only_cross.then_some(ctx), o, x)?,
        };
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

    pub(crate) fn forward(&self, x: &Tensor, ctx: &Tensor, o: RunOpts<'_>) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let t = self.norm.forward(x)?;
        // f32 CPU: the projections read and write NCHW through strides (no transpose copies);
        // on a GPU with SDSERVE_CUDA_LINEAR=lt_nchw, strided cuBLASLt GEMMs do the same.
        use crate::kernels::cuda;
        use crate::kernels::linear::{linear_from_nchw, linear_to_nchw_add};
        let fast_in = match (self.proj_in.transposed()?, self.proj_in.stored()) {
            (Some((wt, bias)), _) => linear_from_nchw(&t, wt, bias)?,
            (None, Some((wo, bias))) => cuda::linear_from_nchw(&t, wo, bias)?,
            (None, None) => None,
        };
        // The layout changes and the residual add, booked apart when profiling (what the
        // NCHW projections save).
        let dev = x.device();
        let mut t = match fast_in {
            Some(t) => t,
            None => {
                let t = cuda::profiled(dev, "transformer_io", || {
                    t.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()
                })?;
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
        if let Some((wo, bias)) = self.proj_out.stored() {
            if let Some(y) = cuda::linear_to_nchw_add(&t, wo, bias, x)? {
                return Ok(y);
            }
        }
        let t = self.proj_out.forward(&t, None)?;
        cuda::profiled(dev, "transformer_io", || {
            t.transpose(1, 2)?.contiguous()?.reshape((b, c, h, w))? + x
        })
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
        out.push((join(p, "norm"), self.norm.lora_target()));
        out.push((join(p, "proj_in"), Target::Dense(&self.proj_in)));
        for (i, b) in self.blocks.iter().enumerate() {
            let bp = join(p, format!("transformer_blocks.{i}"));
            out.push((join(&bp, "norm1"), b.norm1.lora_target()));
            out.push((join(&bp, "norm2"), b.norm2.lora_target()));
            out.push((join(&bp, "norm3"), b.norm3.lora_target()));
            b.attn1.lora_targets(&join(&bp, "attn1"), out);
            b.attn2.lora_targets(&join(&bp, "attn2"), out);
            out.push((join(&bp, "ff.net.0.proj"), Target::Dense(&b.ff.proj)));
            out.push((join(&bp, "ff.net.2"), Target::Dense(&b.ff.out)));
        }
        out.push((join(p, "proj_out"), Target::Dense(&self.proj_out)));
    }
}
