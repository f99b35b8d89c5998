//! The state dict of a DPT depth network (Depth Anything's, MiDaS's): its tensors read and
//! checked against the shapes the network needs, with errors naming the file and the key.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{LayerNorm, Linear};

use super::vit::{Block, BlockWeights};
use super::{Fusion, Rcu};
use crate::kernels::Conv2d;
use crate::{PipelineError, Result};

/// The state dict and where it came from, for errors naming the file and key (`what`: the
/// network it should be).
pub(in super::super) struct State<'a> {
    pub(in super::super) path: &'a Path,
    pub(in super::super) tensors: std::collections::HashMap<String, Tensor>,
    pub(in super::super) device: &'a Device,
    pub(in super::super) what: &'static str,
}

impl State<'_> {
    pub(in super::super) fn bad(&self, message: String) -> PipelineError {
        PipelineError::Weights {
            path: self.path.to_path_buf(),
            message,
        }
    }

    pub(in super::super) fn any(&self, key: &str) -> Result<Tensor> {
        let t = self
            .tensors
            .get(key)
            .ok_or_else(|| self.bad(format!("{key} is missing (not a {} network)", self.what)))?;
        Ok(t.to_dtype(DType::F32)?.to_device(self.device)?)
    }

    pub(in super::super) fn get(&self, key: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.any(key)?;
        if t.dims() != shape {
            return Err(self.bad(format!(
                "{key} has shape {:?}, the network needs {shape:?}",
                t.dims()
            )));
        }
        Ok(t)
    }

    pub(in super::super) fn conv(
        &self,
        key: &str,
        shape: [usize; 4],
        stride: usize,
        bias: bool,
    ) -> Result<Conv2d> {
        let weight = self.get(&format!("{key}.weight"), &shape)?;
        let bias = match bias {
            true => Some(self.get(&format!("{key}.bias"), &shape[..1])?),
            false => None,
        };
        Ok(Conv2d::new(weight, bias, stride, shape[2] / 2))
    }

    pub(in super::super) fn linear(&self, key: &str, out: usize, inp: usize) -> Result<Linear> {
        let weight = self.get(&format!("{key}.weight"), &[out, inp])?;
        Ok(Linear::new(
            weight,
            Some(self.get(&format!("{key}.bias"), &[out])?),
        ))
    }

    pub(in super::super) fn norm(&self, key: &str, dim: usize, eps: f64) -> Result<LayerNorm> {
        let w = self.get(&format!("{key}.weight"), &[dim])?;
        Ok(LayerNorm::new(
            w,
            self.get(&format!("{key}.bias"), &[dim])?,
            eps,
        ))
    }

    /// A ViT's position embedding `key` (`d` wide, the class token's first): it and the side of
    /// its square grid of patches.
    pub(in super::super) fn pos_embed(&self, key: &str, d: usize) -> Result<(Tensor, usize)> {
        let pos_embed = self.any(key)?;
        let tokens = pos_embed.dim(1)? - 1;
        let grid = (tokens as f64).sqrt().round() as usize;
        if grid * grid != tokens || pos_embed.dims() != [1, tokens + 1, d] {
            return Err(self.bad(format!(
                "pos_embed {:?} is not a square grid",
                pos_embed.dims()
            )));
        }
        Ok((pos_embed, grid))
    }

    /// The attention heads of a `d`-wide ViT: `heads` where given (the files do not say), else
    /// `head_width` wide each (one for a narrower network).
    pub(in super::super) fn heads(
        &self,
        heads: Option<usize>,
        d: usize,
        head_width: usize,
    ) -> Result<usize> {
        let heads = heads.unwrap_or((d / head_width).max(1));
        if heads == 0 || !d.is_multiple_of(heads) {
            return Err(self.bad(format!("{heads} heads do not divide the width {d}")));
        }
        Ok(heads)
    }

    /// The ViT block `key` (`d` wide, LayerNorms of `eps`): DINOv2's with its layer scales
    /// (`ls1.gamma`, `ls2.gamma`), timm's ViT-B's without (`layer_scales` false: ones).
    pub(in super::super) fn vit_block(
        &self,
        key: &str,
        d: usize,
        eps: f64,
        layer_scales: bool,
    ) -> Result<Block> {
        let k = |n: &str| format!("{key}.{n}");
        let hidden = self.any(&k("mlp.fc1.weight"))?.dim(0)?;
        let scale = |n: &str| match layer_scales {
            true => self.get(&k(n), &[d]),
            false => Ok(Tensor::ones(d, DType::F32, self.device)?),
        };
        let weights = BlockWeights {
            norm1: self.norm(&k("norm1"), d, eps)?,
            qkv: self.linear(&k("attn.qkv"), 3 * d, d)?,
            proj: self.linear(&k("attn.proj"), d, d)?,
            ls1: scale("ls1.gamma")?,
            norm2: self.norm(&k("norm2"), d, eps)?,
            fc1: self.linear(&k("mlp.fc1"), hidden, d)?,
            fc2: self.linear(&k("mlp.fc2"), d, hidden)?,
            ls2: scale("ls2.gamma")?,
        };
        Block::new(weights, eps)
    }

    fn rcu(&self, key: &str, f: usize) -> Result<Rcu> {
        let c = |i| self.conv(&format!("{key}.conv{i}"), [f, f, 3, 3], 1, true);
        Ok(Rcu([c(1)?, c(2)?]))
    }

    /// `refinenet{i}` (`f` wide) under `key`: the one at the coarsest level (`first`) fuses
    /// nothing finer, so its (unused) first unit is not read.
    pub(in super::super) fn fusion(&self, key: &str, f: usize, first: bool) -> Result<Fusion> {
        Ok(Fusion {
            unit1: (!first)
                .then(|| self.rcu(&format!("{key}.resConfUnit1"), f))
                .transpose()?,
            unit2: self.rcu(&format!("{key}.resConfUnit2"), f)?,
            out_conv: self.conv(&format!("{key}.out_conv"), [f, f, 1, 1], 1, true)?,
        })
    }
}
