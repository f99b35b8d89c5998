//! CodeFormer (codeformer-v0.1.0.pth, A1111's default face restorer) as spandrel's
//! `CodeFormer` architecture builds and runs it (spandrel 0.1.6 in A1111 1.8,
//! spandrel-extra-arches since; the same network): on a 512x512 face in [-1, 1],
//!
//! 1. the VQGAN encoder ([`vqgan`]) down to a 16x16 grid of 256-wide features, keeping the
//!    features at the sizes of `connect_list` (after encoder block [`ENCODER_TAP`]);
//! 2. the transformer ([`transformer`]) over those 256 tokens (`feat_emb`, `ft_layers` with the
//!    learned `position_emb`), `idx_pred_layer` to logits over the codebook, and for each token
//!    the code of the highest logit (`softmax` then `topk(1)`: the same one);
//! 3. the codes' vectors, adaptive-instance-normalised to the encoder's features (AdaIN:
//!    their per-channel mean and unbiased std, eps 1e-5 on the variance);
//! 4. the VQGAN generator back to 512x512, where after generator block [`GENERATOR_TAP`] of
//!    each connected size (only when `weight > 0`) the fusion block mixes the encoder's
//!    features in, scaled by `weight` (A1111's `code_former_weight`: 0 keeps only the codes,
//!    1 the most of the input).
//!
//! spandrel's forward always runs AdaIN (its `adain` argument is ignored), as A1111 asks for
//! (`adain=True`). A1111 1.8 passes the weight as `w=`, which that forward swallows
//! (`**kwargs`): every weight runs as 0.5 there; 1.9 passes `weight=` (A1111 #15414). The
//! caller chooses; [`CodeFormer::forward`] takes it as given.
//!
//! Read from the state dict as spandrel's loader reads them: `dim_embd` and `latent_size`
//! from `position_emb`, `codebook_size` from `idx_pred_layer.1`, `n_layers` from the
//! `ft_layers.N` names, `connect_list` from the `fuse_convs_dict.<size>` names; `n_head` is
//! spandrel's 8 (the weights cannot say it). spandrel fixes the VQGAN (nf 64, ch_mult
//! [1, 2, 2, 4, 4, 8], 256-wide codes, a 16x16 grid); here it is read from the names and
//! shapes, so the narrowed test fixture runs the same code.

mod transformer;
mod vqgan;

use std::path::Path;

use candle_core::{DType, Device, Tensor, D};

use self::transformer::{Layer, LayerNorm};
use self::vqgan::{load_blocks, Block, Fuse, Stack, Weights};
use crate::kernels::dense::Dense;
use crate::{PipelineError, Result};

/// spandrel's `n_head`: "cannot be deduced from state dict".
pub const HEADS: usize = 8;

/// The sizes spandrel looks for under `fuse_convs_dict`, in its order.
pub const CONNECT_SIZES: [usize; 6] = [16, 32, 64, 128, 256, 512];

/// spandrel's `fuse_encoder_block`: the encoder block after which a size's features are kept
/// ("after second residual block for > 16, before attn layer for == 16").
pub const ENCODER_TAP: [(usize, usize); 6] =
    [(512, 2), (256, 5), (128, 8), (64, 11), (32, 14), (16, 18)];

/// spandrel's `fuse_generator_block`: the generator block after which a size is fused
/// ("after first residual block for > 16, before attn layer for == 16").
pub const GENERATOR_TAP: [(usize, usize); 6] =
    [(16, 6), (32, 9), (64, 12), (128, 15), (256, 18), (512, 21)];

/// The variance's eps of spandrel's `calc_mean_std`.
const ADAIN_EPS: f64 = 1e-5;

/// spandrel's detection (`CodeFormerArch`): every one of these names.
pub const DETECT: [&str; 5] = [
    "position_emb",
    "idx_pred_layer.1.weight",
    "quantize.embedding.weight",
    "ft_layers.0.self_attn.in_proj_weight",
    "encoder.blocks.0.weight",
];

/// A loaded CodeFormer (f32, on the device it was loaded to).
pub struct CodeFormer {
    encoder: Vec<Block>,
    generator: Vec<Block>,
    /// `[1, latent_size, dim_embd]`.
    position_emb: Tensor,
    feat_emb: Dense,
    layers: Vec<Layer>,
    idx_norm: LayerNorm,
    idx_pred: Dense,
    /// `[codebook_size, emb_dim]`.
    codebook: Tensor,
    /// By size, in `connect_list`'s order.
    fuse: Vec<(usize, Fuse)>,
    pub dim_embd: usize,
    pub latent_size: usize,
    pub codebook_size: usize,
    pub n_layers: usize,
    pub connect_list: Vec<usize>,
    /// The code vectors' width (spandrel: 256).
    pub emb_dim: usize,
    /// The encoder's first width (spandrel: 64).
    pub nf: usize,
    /// Each encoder level's width over `nf`, a level ending at each downsampling (spandrel:
    /// [1, 2, 2, 4, 4, 8]).
    pub ch_mult: Vec<usize>,
}

impl std::fmt::Debug for CodeFormer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CodeFormer")
            .field("dim_embd", &self.dim_embd)
            .field("latent_size", &self.latent_size)
            .field("codebook_size", &self.codebook_size)
            .field("n_layers", &self.n_layers)
            .field("connect_list", &self.connect_list)
            .field("emb_dim", &self.emb_dim)
            .finish()
    }
}

/// The block index a size maps to in one of the tap tables.
fn tap(table: &[(usize, usize)], size: usize) -> usize {
    table
        .iter()
        .find(|(s, _)| *s == size)
        .map(|(_, i)| *i)
        .expect("connect_list holds only CONNECT_SIZES")
}

impl CodeFormer {
    /// Whether a state dict's names are a CodeFormer's (spandrel's detection).
    pub fn detect(has: &dyn Fn(&str) -> bool) -> bool {
        DETECT.iter().all(|k| has(k))
    }

    /// The network of a `.pth` (the weights under `params_ema`, as the release ships them,
    /// or `params`, unwrapped as spandrel does) or `.safetensors` file, in f32 on `device`
    /// (spandrel's CodeFormer does not support half precision).
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let state = crate::upscaler::read_state(path)?;
        let w = Weights {
            path,
            state: &state,
            device,
        };
        if !Self::detect(&|k| w.has(k)) {
            let missing = DETECT.iter().find(|k| !w.has(k)).copied().unwrap_or("");
            return Err(w.bad(format!("not a CodeFormer: {missing} is missing")));
        }
        let pos = w.dims("position_emb")?;
        let (latent_size, dim_embd) = match *pos {
            [l, d] => (l, d),
            ref dims => return Err(w.bad(format!("position_emb has shape {dims:?}"))),
        };
        if dim_embd == 0 || !dim_embd.is_multiple_of(HEADS) {
            return Err(w.bad(format!(
                "dim_embd {dim_embd} is not a multiple of the {HEADS} heads"
            )));
        }
        let codebook_size = w.dims("idx_pred_layer.1.weight")?[0];
        let emb_dim = w.dims("quantize.embedding.weight")?[1];
        let n_layers = crate::upscaler::state::seq_len(&state, "ft_layers");
        let connect_list: Vec<usize> = CONNECT_SIZES
            .into_iter()
            .filter(|s| w.has(&format!("fuse_convs_dict.{s}.scale.0.weight")))
            .collect();

        let encoder = load_blocks(&w, Stack::Encoder)?;
        let generator = load_blocks(&w, Stack::Generator)?;
        for (stack, blocks, table) in [
            ("encoder", &encoder, &ENCODER_TAP),
            ("generator", &generator, &GENERATOR_TAP),
        ] {
            for &s in &connect_list {
                let i = tap(table, s);
                if i >= blocks.len() {
                    return Err(w.bad(format!(
                        "size {s} is connected after {stack} block {i}, of {} blocks",
                        blocks.len()
                    )));
                }
            }
        }
        let in_ch = w.dims("encoder.blocks.0.weight")?[1];
        let out_ch = generator.last().map(Block::out_channels).transpose()?;
        if in_ch != 3 || out_ch != Some(3) {
            return Err(w.bad(format!(
                "a CodeFormer of {in_ch} input and {out_ch:?} output channels; faces are RGB"
            )));
        }
        let nf = encoder[0].out_channels()?;
        let mut ch_mult = Vec::new();
        let mut width = nf;
        for block in &encoder {
            match block {
                Block::Res(_) => width = block.out_channels()?,
                Block::Down(_) => ch_mult.push(width / nf.max(1)),
                _ => {}
            }
        }
        ch_mult.push(width / nf.max(1));
        Ok(Self {
            position_emb: w
                .get("position_emb", &[latent_size, dim_embd])?
                .unsqueeze(0)?,
            feat_emb: w.dense("feat_emb", dim_embd, emb_dim, true)?,
            layers: (0..n_layers)
                .map(|i| Layer::load(&w, &format!("ft_layers.{i}"), dim_embd, HEADS))
                .collect::<Result<_>>()?,
            idx_norm: LayerNorm::load(&w, "idx_pred_layer.0", dim_embd)?,
            idx_pred: w.dense("idx_pred_layer.1", codebook_size, dim_embd, false)?,
            codebook: w.get("quantize.embedding.weight", &[codebook_size, emb_dim])?,
            fuse: connect_list
                .iter()
                .map(|&s| Ok((s, Fuse::load(&w, s)?)))
                .collect::<Result<_>>()?,
            encoder,
            generator,
            dim_embd,
            latent_size,
            codebook_size,
            n_layers,
            connect_list,
            emb_dim,
            nf,
            ch_mult,
        })
    }

    pub fn device(&self) -> &Device {
        self.codebook.device()
    }

    /// The network on `[B, 3, H, W]` faces in [-1, 1] (A1111: 512x512), at fusion `weight`:
    /// the restored faces `[B, 3, H, W]`, unclamped, and the code logits
    /// `[B, latent_size, codebook_size]` (spandrel's `(out, logits)`).
    pub fn forward_with_logits(&self, x: &Tensor, weight: f64) -> Result<(Tensor, Tensor)> {
        let x = x.to_device(self.device())?.to_dtype(DType::F32)?;
        let mut kept: Vec<(usize, Tensor)> = Vec::new();
        let taps: Vec<usize> = self
            .connect_list
            .iter()
            .map(|&s| tap(&ENCODER_TAP, s))
            .collect();
        let mut h = x;
        for (i, block) in self.encoder.iter().enumerate() {
            h = block.forward(&h)?;
            if taps.contains(&i) {
                // spandrel keys them by the features' width.
                kept.push((h.dim(3)?, h.clone()));
            }
        }
        let lq = h;
        let (b, e, gh, gw) = lq.dims4()?;
        if gh * gw != self.latent_size || e != self.emb_dim {
            return Err(PipelineError::InvalidRequest(format!(
                "CodeFormer's encoder made a {gw}x{gh} grid of {e} features; its transformer \
                 takes {} positions of {} (a 512x512 face for the released model)",
                self.latent_size, self.emb_dim
            )));
        }
        let tokens = lq.flatten_from(2)?.transpose(1, 2)?.contiguous()?;
        let mut query = self.feat_emb.forward(&tokens, None)?;
        for layer in &self.layers {
            query = layer.forward(&query, &self.position_emb)?;
        }
        let logits = self
            .idx_pred
            .forward(&self.idx_norm.forward(&query)?, None)?;
        let codes = logits.argmax(D::Minus1)?.flatten_all()?;
        let quant = self
            .codebook
            .index_select(&codes, 0)?
            .reshape((b, gh, gw, e))?
            .permute((0, 3, 1, 2))?
            .contiguous()?;
        let mut h = adain(&quant, &lq)?;

        let taps: Vec<usize> = self
            .connect_list
            .iter()
            .map(|&s| tap(&GENERATOR_TAP, s))
            .collect();
        for (i, block) in self.generator.iter().enumerate() {
            h = block.forward(&h)?;
            if taps.contains(&i) && weight > 0.0 {
                let size = h.dim(3)?;
                let missing = || {
                    PipelineError::InvalidRequest(format!(
                        "CodeFormer fuses at a width of {size} where no {size} block or \
                         features are (not a 512x512 face)"
                    ))
                };
                let fuse = self
                    .fuse
                    .iter()
                    .find(|(s, _)| *s == size)
                    .ok_or_else(missing)?;
                let enc = kept
                    .iter()
                    .rev()
                    .find(|(s, _)| *s == size)
                    .ok_or_else(missing)?;
                h = fuse.1.forward(&enc.1, &h, weight)?;
            }
        }
        Ok((h, logits))
    }

    /// [`CodeFormer::forward_with_logits`]'s restored faces alone (what A1111 takes, `[0]`).
    pub fn forward(&self, x: &Tensor, weight: f64) -> Result<Tensor> {
        Ok(self.forward_with_logits(x, weight)?.0)
    }
}

/// spandrel's `adaptive_instance_normalization(content, style)`: `content` normalised by its
/// per-channel mean and std, then given `style`'s (std: the unbiased variance plus 1e-5, its
/// root).
fn adain(content: &Tensor, style: &Tensor) -> Result<Tensor> {
    let mean_std = |t: &Tensor| -> Result<(Tensor, Tensor)> {
        let (b, c, h, w) = t.dims4()?;
        let flat = t.reshape((b, c, h * w))?;
        let mean = flat.mean_keepdim(2)?;
        let var = (flat.broadcast_sub(&mean)?.sqr()?.sum_keepdim(2)? / (h * w - 1).max(1) as f64)?;
        let std = (var + ADAIN_EPS)?.sqrt()?;
        Ok((mean.unsqueeze(3)?, std.unsqueeze(3)?))
    };
    let (s_mean, s_std) = mean_std(style)?;
    let (c_mean, c_std) = mean_std(content)?;
    Ok(content
        .broadcast_sub(&c_mean)?
        .broadcast_div(&c_std)?
        .broadcast_mul(&s_std)?
        .broadcast_add(&s_mean)?)
}
