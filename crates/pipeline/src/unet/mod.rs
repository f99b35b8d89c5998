//! diffusers `UNet2DConditionModel` (the SD 1.x / 2.x family), built from `unet/config.json`.
//!
//! `forward` equals `unet(sample, timesteps, encoder_hidden_states).sample` without the optional
//! inputs (class labels, masks) that Stable Diffusion never passes; [`UNet2DConditionModel::forward_with_residuals`]
//! takes a ControlNet's residuals. Weights may be f32, f16 or bf16; norms and softmax run in f32.
//!
//! The model is resident (every part built on its device, [`UNet2DConditionModel::new`]) or
//! streamed for sequential offload (weights in host memory, each part built on the device for
//! its turn, [`UNet2DConditionModel::streamed`]); both run the same `forward`.

pub(crate) mod blocks;
mod config;
mod encoder;
mod layout;
pub(crate) mod reference;
mod streaming;
mod time_embedding;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

pub use crate::attention::AttentionSlicing;
use crate::{PipelineError, Result};
use blocks::RunOpts;
pub use config::{CrossAttention, PerBlock, UNetConfig};
pub use encoder::AdditionalResiduals;
pub(crate) use encoder::UNetEncoder;
use layout::{Layout, ResidentParts, Stem};
pub use reference::ReferenceBanks;
pub(crate) use streaming::host_var_builder;
pub use streaming::StreamStats;
use streaming::{HostWeights, PartOnDevice};
pub use time_embedding::timestep_embedding;

/// The config file the contract says a [`UNetConfig`] comes from; named in config errors.
const CONFIG_PATH: &str = "unet/config.json";

/// Where the UNet's weights live between forward passes.
#[derive(Debug, Clone)]
enum UNetWeights {
    /// On the device, as built modules ([`UNet2DConditionModel::new`]).
    Resident(Box<ResidentParts>),
    /// In host memory; each part is built on the device for its turn in a forward pass and
    /// dropped after it ([`UNet2DConditionModel::streamed`], sequential offload).
    Streamed(HostWeights),
}

/// The conditional UNet of Stable Diffusion.
#[derive(Debug, Clone)]
pub struct UNet2DConditionModel {
    layout: Layout,
    dtype: DType,
    device: Device,
    weights: UNetWeights,
    slicing: AttentionSlicing,
}

impl UNet2DConditionModel {
    /// Builds the model, loading every tensor from `vb` (diffusers key names). A missing or
    /// mis-shaped tensor fails with a candle error naming it; an unsupported config value with
    /// [`PipelineError::Config`].
    pub fn new(vb: VarBuilder, config: &UNetConfig) -> Result<Self> {
        let layout = Layout::new(config)?;
        let parts = layout.build_all(&vb)?;
        Ok(Self {
            layout,
            dtype: vb.dtype(),
            device: vb.device().clone(),
            weights: UNetWeights::Resident(Box::new(parts)),
            slicing: AttentionSlicing::default(),
        })
    }

    /// Sequential offload: the weights are read from `host` once, converted to its dtype and
    /// checked as [`UNet2DConditionModel::new`] checks them, and kept where `host` puts them
    /// (host memory: give it the CPU device). Each `forward` then builds one part at a time on
    /// `device` (the stem, each down block, the mid block, each up block, the head), runs it and
    /// drops it before building the next, so `device` holds one part's weights at a time. Same
    /// results as the resident model, bit for bit.
    pub fn streamed(host: VarBuilder, config: &UNetConfig, device: &Device) -> Result<Self> {
        let layout = Layout::new(config)?;
        let dtype = host.dtype();
        let (recording_vb, recording) = streaming::recording(host);
        // One build on the host reads (and checks) every tensor once; the modules are dropped
        // part by part and the tensors they read kept.
        let lora_shapes = layout.build_each(&recording_vb)?;
        drop(recording_vb);
        Ok(Self {
            layout,
            dtype,
            device: device.clone(),
            weights: UNetWeights::Streamed(recording.finish(lora_shapes)),
            slicing: AttentionSlicing::default(),
        })
    }

    pub fn config(&self) -> &UNetConfig {
        &self.layout.config
    }

    /// The weights' dtype; `forward` computes and returns in it.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device `forward` computes on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// True when built by [`UNet2DConditionModel::streamed`].
    pub fn is_streamed(&self) -> bool {
        matches!(self.weights, UNetWeights::Streamed(_))
    }

    /// The weights in host memory when streamed (shared, not copied); `None` when resident.
    pub(crate) fn host_tensors(&self) -> Option<crate::memory::offload::HostTensors> {
        match &self.weights {
            UNetWeights::Streamed(h) => Some(h.tensors()),
            UNetWeights::Resident(_) => None,
        }
    }

    /// Bytes of weights held in host memory when streamed; `None` when resident.
    pub fn host_weight_bytes(&self) -> Option<usize> {
        match &self.weights {
            UNetWeights::Streamed(h) => Some(h.bytes()),
            UNetWeights::Resident(_) => None,
        }
    }

    /// The weights a LoRA may change, by diffusers module path: the built modules', or when
    /// streamed the host tensors the parts are built from (merged there, every part built
    /// afterwards has them).
    pub(crate) fn lora_targets(&self) -> Vec<(String, crate::lora::Target<'_>)> {
        use crate::lora::{join, LoraTargets};
        let parts = match &self.weights {
            UNetWeights::Resident(parts) => parts,
            UNetWeights::Streamed(host) => return host.lora_targets(),
        };
        let mut out = Vec::new();
        for (i, b) in parts.down_blocks.iter().enumerate() {
            b.lora_targets(&join("down_blocks", i), &mut out);
        }
        if let Some(m) = &parts.mid_block {
            m.lora_targets("mid_block", &mut out);
        }
        for (i, b) in parts.up_blocks.iter().enumerate() {
            b.lora_targets(&join("up_blocks", i), &mut out);
        }
        crate::lora::with_biases(out)
    }

    /// What streaming did since the model was built; `None` when resident.
    pub fn stream_stats(&self) -> Option<StreamStats> {
        match &self.weights {
            UNetWeights::Streamed(h) => Some(h.counters.stats(self.layout.parts_per_forward())),
            UNetWeights::Resident(_) => None,
        }
    }

    pub fn attention_slicing(&self) -> AttentionSlicing {
        self.slicing
    }

    /// How attention score matrices are split (memory against speed); results do not change
    /// beyond float rounding.
    pub fn set_attention_slicing(&mut self, slicing: AttentionSlicing) {
        self.slicing = slicing;
    }

    /// One part ready on the device: the resident module, or one built now from the host
    /// weights and freed when the returned value is dropped.
    fn part<'a, T>(
        &'a self,
        resident: impl FnOnce(&'a ResidentParts) -> &'a T,
        build: impl FnOnce(&Layout, &VarBuilder) -> Result<T>,
    ) -> Result<PartOnDevice<'a, T>> {
        match &self.weights {
            UNetWeights::Resident(parts) => Ok(PartOnDevice::Resident(resident(parts))),
            UNetWeights::Streamed(host) => {
                let vb = host.var_builder(self.dtype, &self.device);
                let part = build(&self.layout, &vb)?;
                Ok(PartOnDevice::streamed(part, &host.counters))
            }
        }
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
        self.forward_with_cond(sample, timesteps, encoder_hidden_states, None)
    }

    /// [`Self::forward`] with diffusers' `timestep_cond` `[B, time_cond_proj_dim]`: a
    /// guidance-distilled (LCM) model's guidance scale embedding, added to the time embedding by
    /// `time_embedding.cond_proj` (ignored by a model without `time_cond_proj_dim`, as diffusers).
    pub fn forward_with_cond(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        timestep_cond: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.forward_with_residuals(
            sample,
            timesteps,
            encoder_hidden_states,
            timestep_cond,
            None,
        )
    }

    /// [`Self::forward_with_cond`] with a ControlNet's residuals, added where diffusers'
    /// `UNet2DConditionModel.forward` adds `down_block_additional_residuals` (to every skip
    /// connection, after the down blocks) and `mid_block_additional_residual` (to the mid
    /// block's output).
    pub fn forward_with_residuals(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        timestep_cond: Option<&Tensor>,
        residuals: Option<&AdditionalResiduals>,
    ) -> Result<Tensor> {
        self.forward_with_image_tokens(
            sample,
            timesteps,
            encoder_hidden_states,
            timestep_cond,
            residuals,
            None,
        )
    }

    /// [`Self::forward_with_residuals`] with IP-Adapters' image keys and values for each row
    /// (diffusers' `encoder_hidden_states = (text, image_tokens)`).
    pub fn forward_with_image_tokens(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        timestep_cond: Option<&Tensor>,
        residuals: Option<&AdditionalResiduals>,
        image_tokens: Option<&crate::ip_adapter::ImageTokens>,
    ) -> Result<Tensor> {
        self.forward_hooked(
            sample,
            timesteps,
            encoder_hidden_states,
            timestep_cond,
            (residuals, image_tokens),
            None,
        )
    }

    /// [`Self::forward_with_image_tokens`] through the reference modules' hooks
    /// ([`ReferenceBanks`]), writing or reading as they are set.
    pub fn forward_hooked(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        timestep_cond: Option<&Tensor>,
        (residuals, image_tokens): (
            Option<&AdditionalResiduals>,
            Option<&crate::ip_adapter::ImageTokens>,
        ),
        reference: Option<&ReferenceBanks>,
    ) -> Result<Tensor> {
        let c = &self.layout.config;
        let (b, cin, h, w) = sample.dims4()?;
        if cin != c.in_channels {
            return Err(PipelineError::InvalidRequest(format!(
                "UNet input has {cin} channels, the model takes {}",
                c.in_channels
            )));
        }
        let timesteps = encoder::batch_timesteps(timesteps, b)?;
        if let UNetWeights::Streamed(host) = &self.weights {
            host.counters.forward_started();
        }
        let o = RunOpts {
            slicing: self.slicing,
            ip: image_tokens,
            reference,
        };
        let mut sample = sample.to_device(&self.device)?.to_dtype(self.dtype)?;
        let ctx = encoder_hidden_states
            .to_device(&self.device)?
            .to_dtype(self.dtype)?;
        if c.center_input_sample {
            sample = sample.affine(2.0, -1.0)?;
        }

        // Each part below is dropped at the end of its statement block, before the next is
        // built: when streamed, the device holds one part's weights at a time.
        let stem = self.part(|p| &p.stem, |l, vb| l.build_stem(vb))?;
        // Time embedding: sinusoids in f32, then cast to the weights' dtype as diffusers does.
        let t_emb = timestep_embedding(
            &timesteps.to_device(&self.device)?,
            c.block_out_channels[0],
            c.flip_sin_to_cos,
            c.freq_shift,
        )?
        .to_dtype(self.dtype)?;
        let cond = timestep_cond
            .map(|c| c.to_device(&self.device))
            .transpose()?;
        if let (Some(c), Some(d)) = (&cond, c.time_cond_proj_dim) {
            if c.dims() != [b, d] {
                return Err(PipelineError::InvalidRequest(format!(
                    "timestep_cond has shape {:?}, the model takes [{b}, {d}]",
                    c.dims()
                )));
            }
        }
        let mut emb = stem.time_embedding.forward(&t_emb, cond.as_ref())?;
        if let Some(a) = stem.time_embed_act {
            emb = a.forward(&emb)?;
        }

        // Odd latent sizes: each upsampler must produce exactly its skip connection's size.
        let n = self.layout.levels();
        let up_factor = 1usize << n.saturating_sub(1);
        let forward_upsample_size = h % up_factor != 0 || w % up_factor != 0;

        let mut x = stem.conv_in.forward(&sample)?;
        drop(stem);
        let mut skips = vec![x.clone()];
        for i in 0..n {
            let d = self.part(|p| &p.down_blocks[i], |l, vb| l.build_down(i, vb))?;
            x = d.forward(&x, &emb, &ctx, o, &mut skips)?;
        }
        if let Some(r) = residuals {
            if r.down.len() != skips.len() {
                return Err(PipelineError::InvalidRequest(format!(
                    "{} down residuals for a UNet of {} skip connections",
                    r.down.len(),
                    skips.len()
                )));
            }
            for (s, add) in skips.iter_mut().zip(&r.down) {
                *s = s.broadcast_add(&add.to_dtype(self.dtype)?)?;
            }
        }
        if self.layout.has_mid_block() {
            let mid = self.part(|p| &p.mid_block, |l, vb| l.build_mid(vb))?;
            if let Some(m) = &*mid {
                x = m.forward(&x, &emb, &ctx, o)?;
            }
        }
        if let Some(r) = residuals {
            x = x.broadcast_add(&r.mid.to_dtype(self.dtype)?)?;
        }
        for i in 0..n {
            let u = self.part(|p| &p.up_blocks[i], |l, vb| l.build_up(i, vb))?;
            let keep = skips.len().saturating_sub(u.num_resnets());
            let mut res = skips.split_off(keep);
            let size = match skips.last() {
                Some(s) if i + 1 != n && forward_upsample_size => {
                    let (_, _, sh, sw) = s.dims4()?;
                    Some((sh, sw))
                }
                _ => None,
            };
            x = u.forward(&x, &mut res, &emb, &ctx, size, o)?;
        }
        let head = self.part(|p| &p.head, |l, vb| l.build_head(vb))?;
        let x = head.conv_norm_out.forward_act(&x, head.conv_act)?;
        Ok(head.conv_out.forward(&x)?)
    }
}
