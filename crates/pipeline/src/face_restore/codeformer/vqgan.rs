//! The VQGAN halves of CodeFormer (spandrel's `Encoder` and `Generator` block lists, from the
//! Unleashing Transformers VQGAN) and the fusion blocks between them (`Fuse_sft_block`).
//!
//! spandrel builds both lists from constants (nf 64, ch_mult [1, 2, 2, 4, 4, 8], 2 res blocks a
//! level, attention at 16 px); here each `blocks.N` is read as the kind its names say and at
//! the widths its shapes say, so a file spandrel loads runs the same blocks in the same order.
//! The kinds: a 3x3 conv (`weight` 4-D), a GroupNorm (`weight` 1-D; no activation after it),
//! a residual block (`norm1`: GroupNorm, swish, conv, GroupNorm, swish, conv, plus the input
//! through the 1x1 `conv_out` where the widths differ), a single-head self-attention over the
//! pixels (`q`), and a resampling conv (`conv`): in the encoder zero-padded by one on the right
//! and bottom and run with stride 2, in the generator after a nearest x2 upsampling.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Module, Tensor};

use crate::kernels::dense::Dense;
use crate::kernels::Conv2d;
use crate::upscaler::state::{checked_tensor, seq_len};
use crate::vae::{Activation, GroupNorm};
use crate::{PipelineError, Result};

/// spandrel's `normalize`: GroupNorm of 32 groups, eps 1e-6, everywhere in the VQGAN.
const GROUPS: usize = 32;
const NORM_EPS: f64 = 1e-6;

/// The state dict's tensors as the loaders read them: checked shapes, on the device.
pub(super) struct Weights<'a> {
    pub path: &'a Path,
    pub state: &'a HashMap<String, Tensor>,
    pub device: &'a Device,
}

impl Weights<'_> {
    pub fn bad(&self, message: impl std::fmt::Display) -> PipelineError {
        PipelineError::Weights {
            path: self.path.to_path_buf(),
            message: message.to_string(),
        }
    }

    pub fn has(&self, key: &str) -> bool {
        self.state.contains_key(key)
    }

    pub fn dims(&self, key: &str) -> Result<&[usize]> {
        Ok(checked_tensor(self.path, self.state, key, None)?.dims())
    }

    pub fn get(&self, key: &str, shape: &[usize]) -> Result<Tensor> {
        Ok(checked_tensor(self.path, self.state, key, Some(shape))?.to_device(self.device)?)
    }

    /// `{name}.weight` `[cout, cin, k, k]` and `{name}.bias`, padding `k / 2` unless given.
    pub fn conv(&self, name: &str, cout: usize, cin: usize, k: usize) -> Result<Conv2d> {
        let weight = self.get(&format!("{name}.weight"), &[cout, cin, k, k])?;
        let bias = self.get(&format!("{name}.bias"), &[cout])?;
        Ok(Conv2d::new(weight, Some(bias), 1, k / 2))
    }

    /// `{name}.weight` `[out, inp]` (and `{name}.bias` with `bias`) as a linear layer.
    pub fn dense(&self, name: &str, out: usize, inp: usize, bias: bool) -> Result<Dense> {
        let weight = self.get(&format!("{name}.weight"), &[out, inp])?;
        let bias = match bias {
            true => Some(self.get(&format!("{name}.bias"), &[out])?),
            false => None,
        };
        Ok(Dense::new(candle_nn::Linear::new(weight, bias))?)
    }

    /// A 1x1 conv `{name}` of `c` channels as a linear layer over the channels.
    fn pointwise(&self, name: &str, c: usize) -> Result<Dense> {
        let weight = self
            .get(&format!("{name}.weight"), &[c, c, 1, 1])?
            .reshape((c, c))?;
        let bias = self.get(&format!("{name}.bias"), &[c])?;
        Ok(Dense::new(candle_nn::Linear::new(weight, Some(bias)))?)
    }

    fn norm(&self, name: &str, c: usize) -> Result<GroupNorm> {
        if !c.is_multiple_of(GROUPS) {
            return Err(self.bad(format!(
                "{name} normalises {c} channels, not a multiple of its {GROUPS} groups"
            )));
        }
        let weight = self.get(&format!("{name}.weight"), &[c])?;
        let bias = self.get(&format!("{name}.bias"), &[c])?;
        Ok(GroupNorm::from_tensors(&weight, &bias, GROUPS, NORM_EPS)?)
    }
}

/// spandrel's `ResBlock`.
pub(super) struct ResBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_out: Option<Conv2d>,
}

impl ResBlock {
    /// The block `name`, its widths from `norm1` (in) and `conv1` (out).
    pub fn load(w: &Weights, name: &str) -> Result<Self> {
        let cin = w.dims(&format!("{name}.norm1.weight"))?[0];
        let cout = w.dims(&format!("{name}.conv1.weight"))?[0];
        Ok(Self {
            norm1: w.norm(&format!("{name}.norm1"), cin)?,
            conv1: w.conv(&format!("{name}.conv1"), cout, cin, 3)?,
            norm2: w.norm(&format!("{name}.norm2"), cout)?,
            conv2: w.conv(&format!("{name}.conv2"), cout, cout, 3)?,
            // spandrel makes (and runs) it exactly where the widths differ.
            conv_out: match cin != cout {
                true => Some(w.conv(&format!("{name}.conv_out"), cout, cin, 1)?),
                false => None,
            },
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.norm1.forward_act(x, Activation::Silu)?;
        h = self.conv1.forward(&h)?;
        h = self.norm2.forward_act(&h, Activation::Silu)?;
        h = self.conv2.forward(&h)?;
        let shortcut = match &self.conv_out {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        Ok((h + shortcut)?)
    }
}

/// spandrel's `AttnBlock`: one head over the `H*W` pixels, scaled by `C^-0.5`, plus the input.
pub(super) struct AttnBlock {
    norm: GroupNorm,
    q: Dense,
    k: Dense,
    v: Dense,
    proj_out: Dense,
}

impl AttnBlock {
    fn load(w: &Weights, name: &str) -> Result<Self> {
        let c = w.dims(&format!("{name}.norm.weight"))?[0];
        Ok(Self {
            norm: w.norm(&format!("{name}.norm"), c)?,
            q: w.pointwise(&format!("{name}.q"), c)?,
            k: w.pointwise(&format!("{name}.k"), c)?,
            v: w.pointwise(&format!("{name}.v"), c)?,
            proj_out: w.pointwise(&format!("{name}.proj_out"), c)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, wd) = x.dims4()?;
        let tokens = self
            .norm
            .forward(x)?
            .flatten_from(2)?
            .transpose(1, 2)?
            .contiguous()?;
        let (q, k, v) = (
            self.q.forward(&tokens, None)?,
            self.k.forward(&tokens, None)?,
            self.v.forward(&tokens, None)?,
        );
        let attn = super::transformer::attend(&q, &k, &v, 1)?;
        let out = self
            .proj_out
            .forward(&attn, None)?
            .transpose(1, 2)?
            .reshape((b, c, h, wd))?;
        Ok((x + out)?)
    }
}

/// One entry of a block list.
pub(super) enum Block {
    Conv(Conv2d),
    Norm(GroupNorm),
    Res(ResBlock),
    Attn(AttnBlock),
    /// `Downsample`: pad right and bottom by one, 3x3 conv of stride 2.
    Down(Conv2d),
    /// `Upsample`: nearest x2, 3x3 conv.
    Up(Conv2d),
}

impl Block {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Conv(c) => c.forward(x)?,
            Self::Norm(n) => n.forward(x)?,
            Self::Res(r) => r.forward(x)?,
            Self::Attn(a) => a.forward(x)?,
            Self::Down(c) => c.forward(&x.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?)?,
            Self::Up(c) => {
                let (_, _, h, w) = x.dims4()?;
                c.forward(&x.upsample_nearest2d(2 * h, 2 * w)?)?
            }
        })
    }

    /// The channels the block gives.
    pub fn out_channels(&self) -> Result<usize> {
        Ok(match self {
            Self::Conv(c) | Self::Down(c) | Self::Up(c) => c.weight().dim(0)?,
            Self::Norm(_) | Self::Attn(_) => 0,
            Self::Res(r) => r.conv1.weight().dim(0)?,
        })
    }
}

/// Which list: the encoder's resampling convs go down, the generator's up.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Stack {
    Encoder,
    Generator,
}

/// `{encoder,generator}.blocks.N`, each read as the kind its names say.
pub(super) fn load_blocks(w: &Weights, stack: Stack) -> Result<Vec<Block>> {
    let prefix = match stack {
        Stack::Encoder => "encoder.blocks",
        Stack::Generator => "generator.blocks",
    };
    let count = seq_len(w.state, prefix);
    if count == 0 {
        return Err(w.bad(format!("{prefix}: no blocks")));
    }
    (0..count)
        .map(|i| {
            let name = format!("{prefix}.{i}");
            let key = |k: &str| format!("{name}.{k}");
            if w.has(&key("norm1.weight")) {
                Ok(Block::Res(ResBlock::load(w, &name)?))
            } else if w.has(&key("q.weight")) {
                Ok(Block::Attn(AttnBlock::load(w, &name)?))
            } else if w.has(&key("conv.weight")) {
                let c = w.dims(&key("conv.weight"))?[0];
                let conv = w.conv(&key("conv"), c, c, 3)?;
                Ok(match stack {
                    Stack::Encoder => Block::Down(Conv2d::new(
                        conv.weight().clone(),
                        conv.bias().cloned(),
                        2,
                        0,
                    )),
                    Stack::Generator => Block::Up(conv),
                })
            } else if w.has(&key("weight")) {
                match *w.dims(&key("weight"))? {
                    [c] => Ok(Block::Norm(w.norm(&name, c)?)),
                    [cout, cin, k, k2] if k == k2 => Ok(Block::Conv(w.conv(&name, cout, cin, k)?)),
                    ref dims => Err(w.bad(format!("{name}.weight has shape {dims:?}"))),
                }
            } else {
                Err(w.bad(format!("{name}: not a block of CodeFormer's VQGAN")))
            }
        })
        .collect()
}

/// spandrel's `Fuse_sft_block`: the encoder's features and the generator's, concatenated,
/// through a residual block; two conv-LeakyReLU(0.2)-conv branches make a scale and a shift;
/// `dec + w * (dec * scale + shift)`.
pub(super) struct Fuse {
    encode_enc: ResBlock,
    scale: [Conv2d; 2],
    shift: [Conv2d; 2],
}

impl Fuse {
    /// `fuse_convs_dict.{size}`; its width from `scale.0`.
    pub fn load(w: &Weights, size: usize) -> Result<Self> {
        let name = format!("fuse_convs_dict.{size}");
        let c = w.dims(&format!("{name}.scale.0.weight"))?[0];
        let pair = |branch: &str| -> Result<[Conv2d; 2]> {
            Ok([
                w.conv(&format!("{name}.{branch}.0"), c, c, 3)?,
                w.conv(&format!("{name}.{branch}.2"), c, c, 3)?,
            ])
        };
        let encode_enc = ResBlock::load(w, &format!("{name}.encode_enc"))?;
        if encode_enc.conv1.weight().dims()[..2] != [c, 2 * c] {
            return Err(w.bad(format!(
                "{name}.encode_enc does not take {} channels to {c}",
                2 * c
            )));
        }
        Ok(Self {
            encode_enc,
            scale: pair("scale")?,
            shift: pair("shift")?,
        })
    }

    pub fn forward(&self, enc: &Tensor, dec: &Tensor, weight: f64) -> Result<Tensor> {
        let feat = self.encode_enc.forward(&Tensor::cat(&[enc, dec], 1)?)?;
        let branch = |[a, b]: &[Conv2d; 2]| -> Result<Tensor> {
            b.forward(&leaky_relu(&a.forward(&feat)?, 0.2)?)
                .map_err(Into::into)
        };
        let (scale, shift) = (branch(&self.scale)?, branch(&self.shift)?);
        let residual = ((dec * scale)? + shift)?.affine(weight, 0.0)?;
        Ok((dec + residual)?)
    }
}

fn leaky_relu(x: &Tensor, slope: f32) -> candle_core::Result<Tensor> {
    match crate::kernels::act::leaky_relu(x, slope)? {
        Some(y) => Ok(y),
        // max(x, slope x) is x where x >= 0 and slope x below (0 < slope < 1).
        None => x.maximum(&(x * slope as f64)?),
    }
}
