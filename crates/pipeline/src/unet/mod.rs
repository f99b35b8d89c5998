//! diffusers `UNet2DConditionModel` (the SD 1.x / 2.x family), built from `unet/config.json`.
//!
//! `forward` equals `unet(sample, timesteps, encoder_hidden_states).sample` without the optional
//! inputs (class labels, masks, ControlNet residuals) that Stable Diffusion text-to-image never
//! passes. Weights may be f32, f16 or bf16; norms and softmax run in f32.

mod blocks;
mod config;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Linear, VarBuilder};

pub use crate::attention::AttentionSlicing;
use crate::{PipelineError, Result};
use blocks::{
    conv2d, Act, Conv2d, DownBlock, GroupNorm, MidBlock, ResnetParams, RunOpts, TransformerParams,
    UpBlock,
};
use config::BlockKind;
pub use config::{PerBlock, UNetConfig};

/// The config file the contract says a [`UNetConfig`] comes from; named in config errors.
const CONFIG_PATH: &str = "unet/config.json";

/// diffusers' `get_timestep_embedding` max_period for `Timesteps` (not a config key).
const TIMESTEP_MAX_PERIOD: f64 = 10000.0;

/// Sinusoidal timestep embedding `[B, dim]` in f32, as diffusers' `get_timestep_embedding`
/// (`scale` 1, `max_period` 10000): frequencies `exp(-ln(max_period) * i / (half - shift))`,
/// `[sin, cos]` (or `[cos, sin]` with `flip_sin_to_cos`), zero-padded to an odd `dim`.
pub fn timestep_embedding(
    timesteps: &Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
    downscale_freq_shift: f64,
) -> candle_core::Result<Tensor> {
    let half = dim / 2;
    // Computed in f32 step by step, as torch does for the float32 arange.
    let neg_log = -(TIMESTEP_MAX_PERIOD.ln()) as f32;
    let denom = (half as f64 - downscale_freq_shift) as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|i| (neg_log * i as f32 / denom).exp())
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), timesteps.device())?;
    let t = timesteps.to_dtype(DType::F32)?.unsqueeze(1)?;
    let args = t.broadcast_mul(&freqs)?;
    let (sin, cos) = (args.sin()?, args.cos()?);
    let emb = if flip_sin_to_cos {
        Tensor::cat(&[cos, sin], 1)?
    } else {
        Tensor::cat(&[sin, cos], 1)?
    };
    if dim % 2 == 1 {
        emb.pad_with_zeros(1, 0, 1)
    } else {
        Ok(emb)
    }
}

/// diffusers `TimestepEmbedding`: linear, activation, linear, optional post activation.
#[derive(Debug, Clone)]
struct TimestepEmbedding {
    linear_1: Linear,
    act: Act,
    linear_2: Linear,
    post_act: Option<Act>,
}

impl TimestepEmbedding {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.act.forward(&self.linear_1.forward(x)?)?;
        let h = self.linear_2.forward(&h)?;
        match self.post_act {
            Some(a) => a.forward(&h),
            None => Ok(h),
        }
    }
}

/// The conditional UNet of Stable Diffusion.
#[derive(Debug, Clone)]
pub struct UNet2DConditionModel {
    config: UNetConfig,
    dtype: DType,
    device: Device,
    conv_in: Conv2d,
    time_embedding: TimestepEmbedding,
    time_embed_act: Option<Act>,
    down_blocks: Vec<DownBlock>,
    mid_block: Option<MidBlock>,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_act: Act,
    conv_out: Conv2d,
    slicing: AttentionSlicing,
}

fn act(name: &str) -> Result<Act> {
    Act::from_name(name).map_err(|e| PipelineError::config(CONFIG_PATH, e))
}

impl UNet2DConditionModel {
    /// Builds the model, loading every tensor from `vb` (diffusers key names). A missing or
    /// mis-shaped tensor fails with a candle error naming it; an unsupported config value with
    /// [`PipelineError::Config`].
    pub fn new(vb: VarBuilder, config: &UNetConfig) -> Result<Self> {
        let r = config
            .resolve()
            .map_err(|m| PipelineError::config(CONFIG_PATH, m))?;
        let c = config;
        let ch = &c.block_out_channels;
        let n = ch.len();
        let act_fn = act(&c.act_fn)?;

        let conv_in = conv2d(
            c.in_channels,
            ch[0],
            c.conv_in_kernel,
            1,
            (c.conv_in_kernel - 1) / 2,
            vb.pp("conv_in"),
        )?;
        let te = vb.pp("time_embedding");
        let time_embedding = TimestepEmbedding {
            linear_1: candle_nn::linear(ch[0], r.time_embed_dim, te.pp("linear_1"))?,
            act: act_fn,
            linear_2: candle_nn::linear(r.time_embed_dim, r.time_embed_dim, te.pp("linear_2"))?,
            post_act: c.timestep_post_act.as_deref().map(act).transpose()?,
        };
        let time_embed_act = c.time_embedding_act_fn.as_deref().map(act).transpose()?;

        let rp = ResnetParams {
            groups: r.groups,
            eps: c.norm_eps,
            temb_channels: r.time_embed_dim,
            act: act_fn,
            scale_shift: c.resnet_time_scale_shift == "scale_shift",
            // diffusers does not pass `resnet_skip_time_act` / `resnet_out_scale_factor` to the
            // block types built here (only to the Simple*/ResnetDownsample* blocks): their
            // resnets always activate temb and use scale 1 (the mid block: mid_block_scale_factor).
            output_scale_factor: 1.0,
        };
        let tparams = |i: usize, only_cross: bool| TransformerParams {
            heads: r.heads[i],
            cross_dim: r.cross_dim[i],
            layers: r.tlayers[i],
            groups: r.groups,
            linear_projection: c.use_linear_projection,
            only_cross,
            upcast: c.upcast_attention,
        };

        let mut down_blocks = Vec::with_capacity(n);
        for i in 0..n {
            let cin = if i == 0 { ch[0] } else { ch[i - 1] };
            let tp = tparams(i, r.only_cross[i]);
            let is_final = i == n - 1;
            down_blocks.push(DownBlock::new(
                cin,
                ch[i],
                r.layers[i],
                &rp,
                (r.down_kinds[i] == BlockKind::CrossAttn).then_some(&tp),
                (!is_final).then_some(c.downsample_padding),
                vb.pp("down_blocks").pp(i),
            )?);
        }

        let mid_block = if r.mid_cross_attn {
            let mrp = ResnetParams {
                output_scale_factor: c.mid_block_scale_factor,
                ..rp.clone()
            };
            // The mid block never takes `only_cross_attention` in diffusers.
            let tp = tparams(n - 1, false);
            Some(MidBlock::new(ch[n - 1], &mrp, &tp, vb.pp("mid_block"))?)
        } else {
            None
        };

        let mut up_blocks = Vec::with_capacity(n);
        let mut out_ch = ch[n - 1];
        for i in 0..n {
            let j = n - 1 - i; // the matching down block
            let prev_out = out_ch;
            out_ch = ch[j];
            let cin = ch[j.saturating_sub(1)];
            let tp = tparams(j, r.only_cross[j]);
            up_blocks.push(UpBlock::new(
                cin,
                prev_out,
                out_ch,
                r.layers[j] + 1,
                &rp,
                (r.up_kinds[i] == BlockKind::CrossAttn).then_some(&tp),
                i != n - 1,
                vb.pp("up_blocks").pp(i),
            )?);
        }

        let conv_norm_out = GroupNorm::new(r.groups, ch[0], c.norm_eps, vb.pp("conv_norm_out"))?;
        let conv_out = conv2d(
            ch[0],
            c.out_channels,
            c.conv_out_kernel,
            1,
            (c.conv_out_kernel - 1) / 2,
            vb.pp("conv_out"),
        )?;
        Ok(Self {
            config: config.clone(),
            dtype: vb.dtype(),
            device: vb.device().clone(),
            conv_in,
            time_embedding,
            time_embed_act,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_act: act_fn,
            conv_out,
            slicing: AttentionSlicing::default(),
        })
    }

    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// The weights' dtype; `forward` computes and returns in it.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn attention_slicing(&self) -> AttentionSlicing {
        self.slicing
    }

    /// How attention score matrices are split (memory against speed); results do not change
    /// beyond float rounding.
    pub fn set_attention_slicing(&mut self, slicing: AttentionSlicing) {
        self.slicing = slicing;
    }

    /// `sample` `[B, in_channels, h, w]`, `timesteps` `[B]` (or `[1]`/scalar, broadcast to the
    /// batch) in any float dtype, `encoder_hidden_states` `[B, L, cross_attention_dim]`.
    /// Returns the prediction `[B, out_channels, h, w]` in the weights' dtype.
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (b, cin, h, w) = sample.dims4()?;
        if cin != c.in_channels {
            return Err(PipelineError::InvalidRequest(format!(
                "UNet input has {cin} channels, the model takes {}",
                c.in_channels
            )));
        }
        let timesteps = match timesteps.rank() {
            0 => timesteps.reshape(1)?,
            _ => timesteps.flatten_all()?,
        };
        let timesteps = match timesteps.dim(0)? {
            1 if b != 1 => timesteps.broadcast_as(b)?.contiguous()?,
            tb if tb == b => timesteps,
            tb => {
                return Err(PipelineError::InvalidRequest(format!(
                    "{tb} timesteps for a batch of {b} samples"
                )))
            }
        };
        let o = RunOpts {
            slicing: self.slicing,
        };
        let mut sample = sample.to_device(&self.device)?.to_dtype(self.dtype)?;
        let ctx = encoder_hidden_states
            .to_device(&self.device)?
            .to_dtype(self.dtype)?;
        if c.center_input_sample {
            sample = sample.affine(2.0, -1.0)?;
        }

        // Time embedding: sinusoids in f32, then cast to the weights' dtype as diffusers does.
        let t_emb = timestep_embedding(
            &timesteps.to_device(&self.device)?,
            c.block_out_channels[0],
            c.flip_sin_to_cos,
            c.freq_shift,
        )?
        .to_dtype(self.dtype)?;
        let mut emb = self.time_embedding.forward(&t_emb)?;
        if let Some(a) = self.time_embed_act {
            emb = a.forward(&emb)?;
        }

        // Odd latent sizes: each upsampler must produce exactly its skip connection's size.
        let up_factor = 1usize << self.up_blocks.len().saturating_sub(1);
        let forward_upsample_size = h % up_factor != 0 || w % up_factor != 0;

        let mut x = self.conv_in.forward(&sample)?;
        let mut skips = vec![x.clone()];
        for d in &self.down_blocks {
            x = d.forward(&x, &emb, &ctx, o, &mut skips)?;
        }
        if let Some(m) = &self.mid_block {
            x = m.forward(&x, &emb, &ctx, o)?;
        }
        let n_up = self.up_blocks.len();
        for (i, u) in self.up_blocks.iter().enumerate() {
            let keep = skips.len().saturating_sub(u.num_resnets());
            let mut res = skips.split_off(keep);
            let size = match skips.last() {
                Some(s) if i + 1 != n_up && forward_upsample_size => {
                    let (_, _, sh, sw) = s.dims4()?;
                    Some((sh, sw))
                }
                _ => None,
            };
            x = u.forward(&x, &mut res, &emb, &ctx, size, o)?;
        }
        let x = self.conv_norm_out.forward_act(&x, self.conv_act)?;
        Ok(self.conv_out.forward(&x)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestep_embedding_matches_formula() -> candle_core::Result<()> {
        let t = Tensor::new(&[0f32, 1.0, 999.0], &Device::Cpu)?;
        let dim = 8;
        let e = timestep_embedding(&t, dim, true, 1.0)?;
        assert_eq!(e.dims(), &[3, 8]);
        let e = e.to_vec2::<f32>()?;
        for (row, tv) in e.iter().zip([0f64, 1.0, 999.0]) {
            for i in 0..4 {
                let f = (-(10000f64.ln()) * i as f64 / (4.0 - 1.0)).exp();
                assert!((row[i] as f64 - (tv * f).cos()).abs() < 1e-3, "{row:?}");
                assert!((row[i + 4] as f64 - (tv * f).sin()).abs() < 1e-3, "{row:?}");
            }
        }
        // Not flipped: sin first; odd dims get a zero pad column.
        let e = timestep_embedding(&t, 7, false, 0.0)?.to_vec2::<f32>()?;
        assert_eq!(e[1].len(), 7);
        assert!((e[1][0] - 1f32.sin()).abs() < 1e-6);
        assert_eq!(e[2][6], 0.0);
        Ok(())
    }
}
