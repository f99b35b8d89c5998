//! SwinIR, as spandrel's `SwinIR` architecture builds and runs it
//! (`spandrel/architectures/SwinIR`; A1111 1.8+ reads its "SwinIR 4x" and every SwinIR file
//! with spandrel): the input reflect-padded to a multiple of the window and centred on the
//! RGB mean (times `img_range`), `conv_first`, residual Swin transformer groups (each: its
//! blocks ([`block`]), then a conv over the image, plus the group's input), a LayerNorm,
//! `conv_after_body` plus the shallow features, then the upsampler the file holds:
//!
//! - `pixelshuffle` (classical SR): conv + LeakyReLU(0.01), x2 (or one x3) conv + pixel
//!   shuffle steps, `conv_last`;
//! - `pixelshuffledirect` (lightweight SR): one conv to `3 * scale^2` channels, pixel shuffle;
//! - `nearest+conv` (real-world SR, A1111's "SwinIR 4x"): conv + LeakyReLU(0.01), then per x2
//!   nearest x2 + conv + LeakyReLU(0.2), `conv_hr` + LeakyReLU(0.2), `conv_last`;
//! - none (denoising, JPEG artefacts): the input plus `conv_last` of the features (1x).
//!
//! Every hyper-parameter is read from the state dict as spandrel's loader reads it: the
//! width from `conv_first`, the groups and their blocks from the names, each group's heads
//! from its bias table, the window from `relative_position_index`'s length, `img_size` from
//! the second block's `attn_mask` (else 64), `1conv` / `3conv` from `conv_after_body`,
//! `img_range` 255 for window 7 (the JPEG models) else 1, the upsampler and scale from its
//! layers.

mod block;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};

use self::block::{Attention, Block, Norm};
use super::compact::pixel_shuffle;
use super::net::reflect_pad_to_multiple;
use super::state::seq_len;
use crate::kernels::dense::Dense;
use crate::kernels::Conv2d;
use crate::{PipelineError, Result};

/// spandrel's `SizeRequirements(minimum=16)` for SwinIR: its descriptor pads smaller inputs.
pub const MIN_SIDE: usize = 16;

/// The RGB mean SwinIR centres a 3-channel input on.
const RGB_MEAN: [f32; 3] = [0.4488, 0.4371, 0.4040];

/// The upsampler a file holds, by spandrel's name for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upsampler {
    PixelShuffle,
    PixelShuffleDirect,
    NearestConv,
    /// None: a 1x restoration network.
    None,
}

impl Upsampler {
    pub fn name(self) -> &'static str {
        match self {
            Self::PixelShuffle => "pixelshuffle",
            Self::PixelShuffleDirect => "pixelshuffledirect",
            Self::NearestConv => "nearest+conv",
            Self::None => "none",
        }
    }
}

/// `1conv` (one 3x3 conv) or `3conv` (3x3 to a quarter of the width, LeakyReLU(0.2), 1x1,
/// LeakyReLU(0.2), 3x3 back).
enum ResiConv {
    One(Conv2d),
    Three([Conv2d; 3]),
}

fn leaky_relu(x: &Tensor, slope: f64) -> candle_core::Result<Tensor> {
    // max(x, slope x) is x where x >= 0 and slope x below (0 < slope < 1).
    x.maximum(&(x * slope)?)
}

impl ResiConv {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::One(c) => c.forward(x)?,
            Self::Three([a, b, c]) => {
                let y = leaky_relu(&a.forward(x)?, 0.2)?;
                let y = leaky_relu(&b.forward(&y)?, 0.2)?;
                c.forward(&y)?
            }
        })
    }
}

/// One residual Swin transformer group (spandrel's `RSTB`).
struct Group {
    blocks: Vec<Block>,
    conv: ResiConv,
}

enum Tail {
    PixelShuffle {
        before: Conv2d,
        /// Each conv and the pixel shuffle factor after it.
        ups: Vec<(Conv2d, usize)>,
        last: Conv2d,
    },
    PixelShuffleDirect {
        up: Conv2d,
    },
    NearestConv {
        before: Conv2d,
        ups: Vec<Conv2d>,
        hr: Conv2d,
        last: Conv2d,
    },
    Restore {
        last: Conv2d,
    },
}

/// A loaded SwinIR.
pub struct SwinIr {
    conv_first: Conv2d,
    patch_norm: Norm,
    groups: Vec<Group>,
    norm: Norm,
    conv_after_body: ResiConv,
    tail: Tail,
    /// `[1, 3, 1, 1]`.
    mean: Tensor,
    img_range: f64,
    scale: usize,
    pub upsampler: Upsampler,
    pub embed_dim: usize,
    pub window: usize,
    pub img_size: usize,
    /// Blocks per group.
    pub depths: Vec<usize>,
    /// Heads per group.
    pub heads: Vec<usize>,
    pub three_conv: bool,
}

impl std::fmt::Debug for SwinIr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SwinIr")
            .field("scale", &self.scale)
            .field("upsampler", &self.upsampler)
            .field("embed_dim", &self.embed_dim)
            .field("depths", &self.depths)
            .field("heads", &self.heads)
            .field("window", &self.window)
            .field("img_size", &self.img_size)
            .field("three_conv", &self.three_conv)
            .finish()
    }
}

impl SwinIr {
    /// spandrel's detection (`SwinIRArch`).
    pub(super) fn detect(has: &dyn Fn(&str) -> bool) -> bool {
        has("layers.0.residual_group.blocks.0.norm1.weight")
            && (has("conv_first.weight") || has("conv_first.1.weight"))
            && has("layers.0.residual_group.blocks.0.mlp.fc1.bias")
            && has("layers.0.residual_group.blocks.0.attn.relative_position_index")
    }

    pub(super) fn from_state(
        path: &Path,
        state: &HashMap<String, Tensor>,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let bad = |message: String| PipelineError::Weights {
            path: path.to_path_buf(),
            message,
        };
        if state.contains_key("conv_first.1.weight") {
            return Err(bad(
                "a SwinIR with a pixel-unshuffled input (conv_first.1): not run here".into(),
            ));
        }
        let dims = |key: &str| -> Result<Vec<usize>> {
            state
                .get(key)
                .map(|t| t.dims().to_vec())
                .ok_or_else(|| bad(format!("{key} is missing")))
        };
        let get = |key: String, shape: &[usize]| -> Result<Tensor> {
            let t = crate::upscaler::state::checked_tensor(path, state, &key, Some(shape))?;
            Ok(t.to_device(device)?.to_dtype(dtype)?)
        };
        let conv = |name: &str, cout: usize, cin: usize, k: usize| -> Result<Conv2d> {
            let weight = get(format!("{name}.weight"), &[cout, cin, k, k])?;
            let bias = get(format!("{name}.bias"), &[cout])?;
            Ok(Conv2d::new(weight, Some(bias), 1, k / 2))
        };
        let dense = |name: &str, out: usize, inp: usize| -> Result<Dense> {
            let weight = get(format!("{name}.weight"), &[out, inp])?;
            let bias = get(format!("{name}.bias"), &[out])?;
            Ok(Dense::new(candle_nn::Linear::new(weight, Some(bias)))?)
        };
        let norm = |name: &str, dim: usize| -> Result<Norm> {
            Ok(Norm {
                weight: get(format!("{name}.weight"), &[dim])?,
                bias: get(format!("{name}.bias"), &[dim])?,
            })
        };

        let upsampler = if state.contains_key("conv_before_upsample.0.weight") {
            if state.contains_key("conv_up1.weight") {
                Upsampler::NearestConv
            } else {
                Upsampler::PixelShuffle
            }
        } else if state.contains_key("upsample.0.weight") {
            Upsampler::PixelShuffleDirect
        } else {
            Upsampler::None
        };
        let first = dims("conv_first.weight")?;
        let (embed_dim, in_ch) = match first[..] {
            [e, c, 3, 3] => (e, c),
            _ => return Err(bad(format!("conv_first.weight has shape {first:?}"))),
        };
        let out_ch = match state.get("conv_last.weight") {
            Some(t) => t.dim(0)?,
            None => in_ch,
        };
        if in_ch != 3 || out_ch != 3 {
            return Err(bad(format!(
                "a SwinIR of {in_ch} input and {out_ch} output channels; upscalers of RGB \
                 images take and give 3"
            )));
        }
        let index_len = dims("layers.0.residual_group.blocks.0.attn.relative_position_index")?[0];
        let window = (index_len as f64).sqrt() as usize;
        if window == 0 || window * window != index_len {
            return Err(bad(format!(
                "relative_position_index has {index_len} rows, not a window's square"
            )));
        }
        let img_size = match state.get("layers.0.residual_group.blocks.1.attn_mask") {
            Some(m) => ((m.dim(0)? as f64).sqrt() * window as f64) as usize,
            None => 64,
        };
        let hidden = dims("layers.0.residual_group.blocks.0.mlp.fc1.bias")?[0];
        let three_conv = !state.contains_key("conv_after_body.weight");
        let resi = |name: &str| -> Result<ResiConv> {
            Ok(if three_conv {
                let q = embed_dim / 4;
                ResiConv::Three([
                    conv(&format!("{name}.0"), q, embed_dim, 3)?,
                    conv(&format!("{name}.2"), q, q, 1)?,
                    conv(&format!("{name}.4"), embed_dim, q, 3)?,
                ])
            } else {
                ResiConv::One(conv(name, embed_dim, embed_dim, 3)?)
            })
        };
        // spandrel's SwinTransformerBlock: an img_size no larger than the window makes the
        // window img_size and turns the shift off.
        let (block_window, shifts) = if img_size <= window {
            (img_size, false)
        } else {
            (window, true)
        };
        let n = block_window * block_window;
        let index = Tensor::new(block::relative_position_index(block_window), &Device::Cpu)?;
        let table_rows = (2 * block_window - 1) * (2 * block_window - 1);

        let mut depths = Vec::new();
        let mut heads = Vec::new();
        let mut groups = Vec::new();
        for g in 0..seq_len(state, "layers") {
            let prefix = format!("layers.{g}.residual_group.blocks");
            let depth = seq_len(state, &prefix);
            let table0 = dims(&format!("{prefix}.0.attn.relative_position_bias_table"))?;
            let nh = table0.get(1).copied().unwrap_or(0);
            if nh == 0 || !embed_dim.is_multiple_of(nh) {
                return Err(bad(format!(
                    "{prefix}.0 has {nh} heads for {embed_dim} features"
                )));
            }
            let mut blocks = Vec::new();
            for i in 0..depth {
                let p = format!("{prefix}.{i}");
                let table = get(
                    format!("{p}.attn.relative_position_bias_table"),
                    &[table_rows, nh],
                )?;
                // [rows, heads] gathered to [N, N, heads], then [1, heads, N, N].
                let bias = table
                    .to_device(&Device::Cpu)?
                    .index_select(&index, 0)?
                    .reshape((n, n, nh))?
                    .permute((2, 0, 1))?
                    .contiguous()?
                    .unsqueeze(0)?
                    .to_device(device)?;
                blocks.push(Block {
                    norm1: norm(&format!("{p}.norm1"), embed_dim)?,
                    attn: Attention {
                        qkv: dense(&format!("{p}.attn.qkv"), 3 * embed_dim, embed_dim)?,
                        proj: dense(&format!("{p}.attn.proj"), embed_dim, embed_dim)?,
                        bias,
                        heads: nh,
                    },
                    norm2: norm(&format!("{p}.norm2"), embed_dim)?,
                    fc1: dense(&format!("{p}.mlp.fc1"), hidden, embed_dim)?,
                    fc2: dense(&format!("{p}.mlp.fc2"), embed_dim, hidden)?,
                    window: block_window,
                    shift: if shifts && i % 2 == 1 { window / 2 } else { 0 },
                });
            }
            groups.push(Group {
                blocks,
                conv: resi(&format!("layers.{g}.conv"))?,
            });
            depths.push(depth);
            heads.push(nh);
        }
        if groups.is_empty() {
            return Err(bad("no residual Swin transformer groups (layers.N)".into()));
        }

        let feat_of = |key: &str| -> Result<usize> { Ok(dims(key)?[0]) };
        let (tail, scale) = match upsampler {
            Upsampler::NearestConv => {
                // spandrel: 2 to the number of conv_up weights; its class has 2, 4 and 8.
                let count = state
                    .keys()
                    .filter(|k| k.contains("conv_up") && !k.contains("bias"))
                    .count();
                if !(1..=3).contains(&count) {
                    return Err(bad(format!(
                        "{count} conv_up layers; SwinIR's nearest+conv upsampler has 1 to 3"
                    )));
                }
                let nf = feat_of("conv_before_upsample.0.weight")?;
                let ups = (1..=count)
                    .map(|i| conv(&format!("conv_up{i}"), nf, nf, 3))
                    .collect::<Result<Vec<_>>>()?;
                let tail = Tail::NearestConv {
                    before: conv("conv_before_upsample.0", nf, embed_dim, 3)?,
                    ups,
                    hr: conv("conv_hr", nf, nf, 3)?,
                    last: conv("conv_last", 3, nf, 3)?,
                };
                (tail, 1 << count)
            }
            Upsampler::PixelShuffle => {
                let nf = feat_of("conv_before_upsample.0.weight")?;
                let mut ups = Vec::new();
                let mut scale = 1;
                // spandrel's get_pixelshuffle_params: upsample.0, .2, ... each a conv to
                // factor^2 times its input, each factor 2 (or a single 3).
                for i in (0..10).step_by(2) {
                    let Some(t) = state.get(&format!("upsample.{i}.weight")) else {
                        break;
                    };
                    let out = t.dim(0)?;
                    let factor = match out / nf.max(1) {
                        4 => 2,
                        9 => 3,
                        r => {
                            return Err(bad(format!(
                                "upsample.{i} makes {r} times its input's channels; SwinIR's \
                                 pixel shuffle steps are x2 or x3"
                            )))
                        }
                    };
                    ups.push((conv(&format!("upsample.{i}"), out, nf, 3)?, factor));
                    scale *= factor;
                }
                if ups.len() > 1 && ups.iter().any(|(_, f)| *f == 3) {
                    return Err(bad("a x3 step among several pixel shuffles".into()));
                }
                let tail = Tail::PixelShuffle {
                    before: conv("conv_before_upsample.0", nf, embed_dim, 3)?,
                    ups,
                    last: conv("conv_last", 3, nf, 3)?,
                };
                (tail, scale)
            }
            Upsampler::PixelShuffleDirect => {
                let out = feat_of("upsample.0.bias")?;
                let scale = ((out / 3) as f64).sqrt() as usize;
                if scale == 0 || scale * scale * 3 != out {
                    return Err(bad(format!(
                        "upsample.0 has {out} outputs, not 3 times a square"
                    )));
                }
                let up = conv("upsample.0", out, embed_dim, 3)?;
                (Tail::PixelShuffleDirect { up }, scale)
            }
            Upsampler::None => (
                Tail::Restore {
                    last: conv("conv_last", 3, embed_dim, 3)?,
                },
                1,
            ),
        };
        Ok(Self {
            conv_first: conv("conv_first", embed_dim, in_ch, 3)?,
            patch_norm: norm("patch_embed.norm", embed_dim)?,
            groups,
            norm: norm("norm", embed_dim)?,
            conv_after_body: resi("conv_after_body")?,
            tail,
            mean: Tensor::new(&RGB_MEAN, &Device::Cpu)?
                .reshape((1, 3, 1, 1))?
                .to_device(device)?
                .to_dtype(dtype)?,
            img_range: if window == 7 { 255.0 } else { 1.0 },
            scale,
            upsampler,
            embed_dim,
            window,
            img_size,
            depths,
            heads,
            three_conv,
        })
    }

    /// The factor the image grows by.
    pub fn scale(&self) -> usize {
        self.scale
    }

    pub fn device(&self) -> &Device {
        self.conv_first.weight().device()
    }

    pub fn dtype(&self) -> DType {
        self.conv_first.weight().dtype()
    }

    /// `forward_features`: tokens through the groups, the LayerNorm, back to `[B, C, H, W]`.
    fn features(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let to_tokens = |t: &Tensor| -> candle_core::Result<Tensor> {
            t.flatten_from(2)?.transpose(1, 2)?.contiguous()
        };
        let to_image = |t: &Tensor| -> candle_core::Result<Tensor> {
            t.transpose(1, 2)?.contiguous()?.reshape((b, c, h, w))
        };
        let mut tokens = self.patch_norm.forward(&to_tokens(x)?)?;
        // One mask per (window, shift) this image needs.
        let mut masks: Vec<((usize, usize), Tensor)> = Vec::new();
        for group in &self.groups {
            let mut y = tokens.clone();
            for blk in &group.blocks {
                if !h.is_multiple_of(blk.window) || !w.is_multiple_of(blk.window) {
                    return Err(PipelineError::InvalidRequest(format!(
                        "a {w}x{h} feature map is not in whole {0}x{0} windows",
                        blk.window
                    )));
                }
                let mask = if blk.shift == 0 {
                    None
                } else {
                    let key = (blk.window, blk.shift);
                    if !masks.iter().any(|(k, _)| *k == key) {
                        let m =
                            block::mask_tensor(h, w, blk.window, blk.shift, x.device(), x.dtype())?;
                        masks.push((key, m));
                    }
                    masks.iter().find(|(k, _)| *k == key).map(|(_, m)| m)
                };
                y = blk.forward(&y, h, w, mask)?;
            }
            let conv = group.conv.forward(&to_image(&y)?)?;
            tokens = (to_tokens(&conv)? + tokens)?;
        }
        Ok(to_image(&self.norm.forward(&tokens)?)?)
    }

    /// The network on `[B, 3, H, W]` (values 0..1, in the weights' device and dtype):
    /// `[B, 3, H * scale, W * scale]`, unclamped (spandrel's `SwinIR.forward`).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let x = reflect_pad_to_multiple(x, self.window)?;
        let x = (x.broadcast_sub(&self.mean)? * self.img_range)?;
        let first = self.conv_first.forward(&x)?;
        let body = (self.conv_after_body.forward(&self.features(&first)?)? + &first)?;
        let out = match &self.tail {
            Tail::PixelShuffle { before, ups, last } => {
                let mut y = leaky_relu(&before.forward(&body)?, 0.01)?;
                for (conv, factor) in ups {
                    y = pixel_shuffle(&conv.forward(&y)?, *factor)?;
                }
                last.forward(&y)?
            }
            Tail::PixelShuffleDirect { up } => pixel_shuffle(&up.forward(&body)?, self.scale)?,
            Tail::NearestConv {
                before,
                ups,
                hr,
                last,
            } => {
                let mut y = leaky_relu(&before.forward(&body)?, 0.01)?;
                for conv in ups {
                    let (_, _, fh, fw) = y.dims4()?;
                    y = leaky_relu(&conv.forward(&y.upsample_nearest2d(2 * fh, 2 * fw)?)?, 0.2)?;
                }
                last.forward(&leaky_relu(&hr.forward(&y)?, 0.2)?)?
            }
            Tail::Restore { last } => (&x + last.forward(&body)?)?,
        };
        let out = ((out / self.img_range)?.broadcast_add(&self.mean))?;
        // The padding's share of the output is cut off.
        let (_, _, oh, ow) = out.dims4()?;
        Ok(out
            .narrow(2, 0, (h * self.scale).min(oh))?
            .narrow(3, 0, (w * self.scale).min(ow))?)
    }
}
