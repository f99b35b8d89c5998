//! The UNet's encoder half (conv_in, time embedding, down blocks, mid block), built by the same
//! code as the UNet's own parts: diffusers' `ControlNetModel` is a copy of it
//! (`crate::controlnet`). Also the residuals a ControlNet hands the UNet.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::blocks::{DownBlock, MidBlock, RunOpts};
use super::{timestep_embedding, Layout, Stem, UNetConfig};
use crate::attention::AttentionSlicing;
use crate::{PipelineError, Result};

/// diffusers' `down_block_additional_residuals` / `mid_block_additional_residual`: added by the
/// UNet to its skip connections after the down blocks and to the mid block's output (what a
/// ControlNet returns, already scaled by its conditioning scale). `[B, C, h, w]` each, or
/// `[B, C, 1, 1]` (a ControlNet with `global_pool_conditions`), broadcast over the plane.
#[derive(Debug, Clone)]
pub struct AdditionalResiduals {
    /// One per skip connection, in the UNet's order (conv_in's output first).
    pub down: Vec<Tensor>,
    pub mid: Tensor,
}

impl AdditionalResiduals {
    /// The element-wise sum of two sets (diffusers' `MultiControlNetModel`).
    pub fn add(&self, other: &Self) -> Result<Self> {
        if self.down.len() != other.down.len() {
            return Err(PipelineError::InvalidRequest(format!(
                "ControlNet residual counts differ: {} and {}",
                self.down.len(),
                other.down.len()
            )));
        }
        let down = self
            .down
            .iter()
            .zip(&other.down)
            .map(|(a, b)| a.broadcast_add(b))
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            down,
            mid: self.mid.broadcast_add(&other.mid)?,
        })
    }

    /// The residuals with `rows` rows of zeros before their own: a ControlNet run on a batch's
    /// last rows alone, steering none of the first (the extension's `control * cond_mark`).
    pub fn after_zero_rows(self, rows: usize) -> Result<Self> {
        if rows == 0 {
            return Ok(self);
        }
        let pad = |t: Tensor| -> candle_core::Result<Tensor> {
            let mut dims = t.dims().to_vec();
            dims[0] = rows;
            Tensor::cat(&[&Tensor::zeros(dims, t.dtype(), t.device())?, &t], 0)
        };
        Ok(Self {
            down: self
                .down
                .into_iter()
                .map(pad)
                .collect::<candle_core::Result<_>>()?,
            mid: pad(self.mid)?,
        })
    }
}

/// `timesteps` (scalar, `[1]` or `[b]`) as `[b]`, as diffusers' `timesteps.expand(batch)`.
pub(super) fn batch_timesteps(timesteps: &Tensor, b: usize) -> Result<Tensor> {
    let timesteps = match timesteps.rank() {
        0 => timesteps.reshape(1)?,
        _ => timesteps.flatten_all()?,
    };
    match timesteps.dim(0)? {
        1 if b != 1 => Ok(timesteps.broadcast_as(b)?.contiguous()?),
        tb if tb == b => Ok(timesteps),
        tb => Err(PipelineError::InvalidRequest(format!(
            "{tb} timesteps for a batch of {b} samples"
        ))),
    }
}

/// Resident conv_in + time embedding, down blocks and mid block of a UNet config.
#[derive(Debug, Clone)]
pub(crate) struct UNetEncoder {
    layout: Layout,
    stem: Stem,
    down_blocks: Vec<DownBlock>,
    mid_block: Option<MidBlock>,
}

impl UNetEncoder {
    /// Built from `vb` rooted at the model's keys (`conv_in`, `time_embedding`, `down_blocks`,
    /// `mid_block`), under `config_path`'s name in config errors.
    pub(crate) fn new(vb: &VarBuilder, config: &UNetConfig, config_path: &str) -> Result<Self> {
        let layout = Layout::new(config).map_err(|e| match e {
            PipelineError::Config { message, .. } => PipelineError::config(config_path, message),
            other => other,
        })?;
        Ok(Self {
            stem: layout.build_stem(vb)?,
            down_blocks: (0..layout.levels())
                .map(|i| layout.build_down(i, vb))
                .collect::<Result<_>>()?,
            mid_block: layout.build_mid(vb)?,
            layout,
        })
    }

    pub(crate) fn config(&self) -> &UNetConfig {
        &self.layout.config
    }

    /// The time embedding `[b, time_embed_dim]` in `dtype`, as the UNet computes it.
    pub(crate) fn time_embedding(
        &self,
        timesteps: &Tensor,
        b: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let c = &self.layout.config;
        let t = batch_timesteps(timesteps, b)?.to_device(device)?;
        let t_emb =
            timestep_embedding(&t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)?
                .to_dtype(dtype)?;
        let mut emb = self.stem.time_embedding.forward(&t_emb, None)?;
        if let Some(a) = self.stem.time_embed_act {
            emb = a.forward(&emb)?;
        }
        Ok(emb)
    }

    pub(crate) fn conv_in(&self, x: &Tensor) -> Result<Tensor> {
        use candle_core::Module;
        Ok(self.stem.conv_in.forward(x)?)
    }

    /// The down blocks and mid block from `x` (conv_in's output, plus whatever the caller adds):
    /// every skip connection (`x` first) and the mid block's output (the last down block's
    /// without a mid block).
    pub(crate) fn run(
        &self,
        x: Tensor,
        emb: &Tensor,
        ctx: &Tensor,
        slicing: AttentionSlicing,
    ) -> Result<(Vec<Tensor>, Tensor)> {
        let o = RunOpts {
            slicing,
            ip: None,
            reference: None,
        };
        let mut skips = vec![x.clone()];
        let mut x = x;
        for d in &self.down_blocks {
            x = d.forward(&x, emb, ctx, o, &mut skips)?;
        }
        if let Some(m) = &self.mid_block {
            x = m.forward(&x, emb, ctx, o)?;
        }
        Ok((skips, x))
    }
}
