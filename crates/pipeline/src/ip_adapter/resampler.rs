//! IP-Adapter Plus's image projection, the Resampler (diffusers' `IPAdapterPlusImageProjection`,
//! h94's `Resampler`): learned query latents attend, block after block, to the image encoder's
//! penultimate hidden states (projected to the Resampler's width) and to themselves; the
//! result is projected to the UNet's cross-attention width and normalised.
//!
//! Read from h94's keys under `image_proj.`: `latents` `[1, queries, hidden]`, `proj_in`,
//! `layers.<i>.0` (the attention: `norm1` on the image states, `norm2` on the latents, `to_q`,
//! `to_kv` (keys then values), `to_out`, none with a bias), `layers.<i>.1` (the feed-forward:
//! `0` a LayerNorm, `1` and `3` linear layers without bias around an exact GELU), `proj_out`,
//! `norm_out`. Every width comes from the weights; the heads are the query rows over diffusers'
//! fixed head width of 64 (`heads = to_q.shape[0] // 64` in its converter); the blocks are
//! counted in the file (diffusers builds 4, as every h94 Plus file has).

use candle_core::{DType, Tensor, D};
use candle_nn::VarBuilder;

use crate::clip::F32LayerNorm;
use crate::kernels::linear::Dense;
use crate::Result;

/// diffusers' `IPAdapterPlusImageProjectionBlock` builds its `Attention` with `dim_head=64`.
const DIM_HEAD: usize = 64;
/// torch's `nn.LayerNorm` default, which every LayerNorm of the Resampler uses.
const NORM_EPS: f64 = 1e-5;

/// One block: `latents = attn(ln1(latents), cat(ln0(x), ln1(latents))) + latents`, then
/// `latents = ff(latents) + latents`.
#[derive(Debug, Clone)]
struct ResamplerBlock {
    ln0: F32LayerNorm,
    ln1: F32LayerNorm,
    to_q: Dense,
    to_k: Dense,
    to_v: Dense,
    to_out: Dense,
    ff_norm: F32LayerNorm,
    ff_in: Dense,
    ff_out: Dense,
}

/// The Resampler with the constants read from its weights.
#[derive(Debug, Clone)]
pub(super) struct Resampler {
    latents: Tensor,
    proj_in: Dense,
    blocks: Vec<ResamplerBlock>,
    proj_out: Dense,
    norm_out: F32LayerNorm,
    heads: usize,
    /// The image encoder's hidden width it takes.
    embed_dim: usize,
}

impl Resampler {
    /// Reads `vb` rooted at `image_proj`; `cross_dim` is the UNet's cross-attention width the
    /// output must have.
    pub(super) fn load(vb: VarBuilder, cross_dim: usize) -> std::result::Result<Self, String> {
        let e = |e: candle_core::Error| e.to_string();
        let dims = |name: &str| -> std::result::Result<Vec<usize>, String> {
            Ok(vb.get_unchecked(name).map_err(e)?.dims().to_vec())
        };
        let latents_dims = dims("latents")?;
        let [1, queries, hidden] = latents_dims[..] else {
            return Err(format!(
                "image_proj.latents is {latents_dims:?}, not [1, queries, width]"
            ));
        };
        let embed_dim = match dims("proj_in.weight")?[..] {
            [h, e] if h == hidden => e,
            ref d => return Err(format!("image_proj.proj_in.weight is {d:?}")),
        };
        let inner = dims("layers.0.0.to_q.weight")?[0];
        if inner == 0 || !inner.is_multiple_of(DIM_HEAD) {
            return Err(format!(
                "image_proj.layers.0.0.to_q has {inner} rows, not heads of {DIM_HEAD}"
            ));
        }
        let ff = dims("layers.0.1.1.weight")?[0];
        let depth = (0..)
            .take_while(|i| vb.contains_tensor(&format!("layers.{i}.0.to_q.weight")))
            .count();
        let blocks = (0..depth)
            .map(|i| {
                let b = vb.pp(format!("layers.{i}"));
                let kv = b.get((2 * inner, hidden), "0.to_kv.weight").map_err(e)?;
                let half = |j| -> std::result::Result<Dense, String> {
                    let w = kv.narrow(0, j * inner, inner).map_err(e)?;
                    Dense::new(candle_nn::Linear::new(w, None)).map_err(e)
                };
                Ok(ResamplerBlock {
                    ln0: F32LayerNorm::new(hidden, NORM_EPS, b.pp("0.norm1")).map_err(e)?,
                    ln1: F32LayerNorm::new(hidden, NORM_EPS, b.pp("0.norm2")).map_err(e)?,
                    to_q: Dense::load(hidden, inner, false, b.pp("0.to_q")).map_err(e)?,
                    to_k: half(0)?,
                    to_v: half(1)?,
                    to_out: Dense::load(inner, hidden, false, b.pp("0.to_out")).map_err(e)?,
                    ff_norm: F32LayerNorm::new(hidden, NORM_EPS, b.pp("1.0")).map_err(e)?,
                    ff_in: Dense::load(hidden, ff, false, b.pp("1.1")).map_err(e)?,
                    ff_out: Dense::load(ff, hidden, false, b.pp("1.3")).map_err(e)?,
                })
            })
            .collect::<std::result::Result<_, String>>()?;
        Ok(Self {
            latents: vb.get((1, queries, hidden), "latents").map_err(e)?,
            proj_in: Dense::load(embed_dim, hidden, true, vb.pp("proj_in")).map_err(e)?,
            blocks,
            proj_out: Dense::load(hidden, cross_dim, true, vb.pp("proj_out")).map_err(e)?,
            norm_out: F32LayerNorm::new(cross_dim, NORM_EPS, vb.pp("norm_out")).map_err(e)?,
            heads: inner / DIM_HEAD,
            embed_dim,
        })
    }

    /// The query latents: the image tokens per image.
    pub(super) fn num_queries(&self) -> usize {
        self.latents.dim(1).unwrap_or(0)
    }

    pub(super) fn embed_dim(&self) -> usize {
        self.embed_dim
    }

    pub(super) fn heads(&self) -> usize {
        self.heads
    }

    /// Splits the query and key widths into `heads` (a test's mutation: the product is no
    /// longer the adapter's).
    pub(super) fn set_heads(&mut self, heads: usize) {
        self.heads = heads;
    }

    /// Hidden states `[B, positions, embed_dim]` to image tokens `[B, queries, cross_dim]`.
    pub(super) fn forward(&self, hidden_states: &Tensor) -> Result<Tensor> {
        let b = hidden_states.dim(0)?;
        let (_, q, h) = self.latents.dims3()?;
        let x = self.proj_in.forward(hidden_states, None)?;
        let mut latents = self.latents.broadcast_as((b, q, h))?.contiguous()?;
        for block in &self.blocks {
            let normed = block.ln1.forward(&latents)?;
            let context = Tensor::cat(&[&block.ln0.forward(&x)?, &normed], 1)?;
            let attended = self.attention(block, &normed, &context)?;
            latents = block.to_out.forward(&attended, Some(&latents))?;
            let ff = block
                .ff_in
                .forward(&block.ff_norm.forward(&latents)?, None)?;
            latents = block.ff_out.forward(&ff.gelu_erf()?, Some(&latents))?;
        }
        let out = self.proj_out.forward(&latents, None)?;
        Ok(self.norm_out.forward(&out)?)
    }

    /// Multi-head attention of the latents over `context` (no mask), scores in f32: a few
    /// hundred positions, once per request.
    fn attention(&self, block: &ResamplerBlock, latents: &Tensor, ctx: &Tensor) -> Result<Tensor> {
        let dtype = latents.dtype();
        let heads = self.heads;
        let split = |t: Tensor| -> candle_core::Result<Tensor> {
            let (b, n, inner) = t.dims3()?;
            t.reshape((b, n, heads, inner / heads))?
                .transpose(1, 2)?
                .contiguous()?
                .to_dtype(DType::F32)
        };
        let q = split(block.to_q.forward(latents, None)?)?;
        let k = split(block.to_k.forward(ctx, None)?)?;
        let v = split(block.to_v.forward(ctx, None)?)?;
        let dim_head = q.dim(D::Minus1)?;
        let scores = (q.matmul(&k.t()?.contiguous()?)? * (dim_head as f64).powf(-0.5))?;
        let weights = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = weights.matmul(&v)?.transpose(1, 2)?;
        let (b, n, _, _) = out.dims4()?;
        Ok(out.reshape((b, n, heads * dim_head))?.to_dtype(dtype)?)
    }
}
