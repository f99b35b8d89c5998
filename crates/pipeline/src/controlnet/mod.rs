//! diffusers' `ControlNetModel` (SD 1.x / 2.x), built from its `config.json`: a copy of the
//! UNet's encoder half (conv_in, time embedding, down blocks, mid block; built by the UNet's
//! own code, [`crate::unet::UNetEncoder`]) whose input also takes the control image through a
//! small convolutional hint encoder (`controlnet_cond_embedding`), and whose skip connections
//! and mid block output leave through 1x1 "zero" convolutions as residuals for the UNet
//! ([`AdditionalResiduals`]), scaled by the conditioning scale.
//!
//! Loading ([`ControlNetModel::load`]): a diffusers folder (`config.json` and
//! `diffusion_pytorch_model[.fp16].safetensors` / `.bin`) or a single file of the original
//! ControlNet's key names (`crate::single_file::read_controlnet_file`), whose config is the
//! UNet's it is used with plus the hint encoder's shapes from its weights (as diffusers'
//! single-file loader takes SD 1.5's UNet config).
//!
//! Files: `handle` (a ControlNet by name, loaded once, as requests carry it), `preprocess`
//! (the extension's model-free preprocessors: the control map from a photo); this one holds
//! the config and the model.

mod handle;
pub mod modes;
pub mod preprocess;
mod reference;

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

pub use handle::{ControlNet, ControlNetUnit, HiresOption};
pub use modes::{CondRows, ControlMode};
pub use reference::{ReferenceKind, ReferenceUnit};

use crate::attention::AttentionSlicing;
use crate::kernels::{conv2d, Conv2d};
use crate::unet::{AdditionalResiduals, UNetConfig, UNetEncoder};
use crate::{PipelineError, Result};

/// The config file of a diffusers ControlNet folder; named in config errors.
const CONFIG_FILE: &str = "config.json";

fn d_three() -> usize {
    3
}
fn d_rgb() -> String {
    "rgb".into()
}
fn d_embedding() -> Option<Vec<usize>> {
    Some(vec![16, 32, 96, 256])
}

/// diffusers `ControlNetModel` config: the UNet's keys (same names, same defaults) plus the
/// ControlNet's own. Keys `ControlNetModel` does not take (`up_block_types`, `conv_in_kernel`,
/// `time_embedding_*`, ...) are ignored as diffusers ignores them.
#[derive(Debug, Clone, Deserialize)]
pub struct ControlNetConfig {
    #[serde(flatten)]
    pub unet: UNetConfig,
    /// The control image's channels.
    #[serde(default = "d_three")]
    pub conditioning_channels: usize,
    /// `rgb`, or `bgr` (the image's channels reversed before the hint encoder).
    #[serde(default = "d_rgb")]
    pub controlnet_conditioning_channel_order: String,
    /// The hint encoder's widths; each step after the first halves the image.
    #[serde(default = "d_embedding")]
    pub conditioning_embedding_out_channels: Option<Vec<usize>>,
    /// The residuals averaged over the plane (shuffle-type ControlNets).
    #[serde(default)]
    pub global_pool_conditions: bool,
}

impl ControlNetConfig {
    /// The config of a single file: the UNet's it is used with, the hint encoder's shapes from
    /// the file, the rest diffusers' defaults (`rgb`, no global pooling).
    pub fn from_unet(unet: &UNetConfig, shapes: &crate::single_file::ControlNetFileShapes) -> Self {
        Self {
            unet: unet.clone(),
            conditioning_channels: shapes.conditioning_channels,
            controlnet_conditioning_channel_order: d_rgb(),
            conditioning_embedding_out_channels: Some(shapes.embedding_channels.clone()),
            global_pool_conditions: false,
        }
    }

    /// The UNet config the encoder half is built from: `ControlNetModel.__init__` fixes
    /// conv_in's kernel at 3, the time embedding at `4 * block_out_channels[0]` without extra
    /// activations or a condition projection, and never centres the input; the up blocks
    /// (unused) mirror the down blocks so the config resolves.
    fn encoder_config(&self) -> UNetConfig {
        let mut c = self.unet.clone();
        c.conv_in_kernel = 3;
        c.time_embedding_dim = None;
        c.time_embedding_act_fn = None;
        c.timestep_post_act = None;
        c.time_cond_proj_dim = None;
        c.center_input_sample = false;
        c.up_block_types = c
            .down_block_types
            .iter()
            .rev()
            .map(|t| t.replace("DownBlock2D", "UpBlock2D"))
            .collect();
        c
    }

    fn embedding_channels(&self) -> Result<&[usize]> {
        match self.conditioning_embedding_out_channels.as_deref() {
            Some(c) if !c.is_empty() && !c.contains(&0) => Ok(c),
            other => Err(PipelineError::config(
                CONFIG_FILE,
                format!(
                    "`conditioning_embedding_out_channels` {other:?} must list positive widths"
                ),
            )),
        }
    }

    fn bgr(&self) -> Result<bool> {
        match self.controlnet_conditioning_channel_order.as_str() {
            "rgb" => Ok(false),
            "bgr" => Ok(true),
            other => Err(PipelineError::config(
                CONFIG_FILE,
                format!("unknown `controlnet_conditioning_channel_order` {other:?} (rgb, bgr)"),
            )),
        }
    }
}

/// `ControlNetConditioningEmbedding`: conv_in, SiLU, then per width step a convolution and a
/// stride-2 convolution (each followed by SiLU), then conv_out to the UNet's first width.
#[derive(Debug, Clone)]
struct HintEncoder {
    conv_in: Conv2d,
    blocks: Vec<Conv2d>,
    conv_out: Conv2d,
}

impl HintEncoder {
    fn new(cond: usize, widths: &[usize], out: usize, vb: VarBuilder) -> Result<Self> {
        let conv_in = conv2d(cond, widths[0], 3, 1, 1, vb.pp("conv_in"))?;
        let mut blocks = Vec::new();
        for (i, pair) in widths.windows(2).enumerate() {
            let b = vb.pp("blocks");
            blocks.push(conv2d(pair[0], pair[0], 3, 1, 1, b.pp(2 * i))?);
            blocks.push(conv2d(pair[0], pair[1], 3, 2, 1, b.pp(2 * i + 1))?);
        }
        let last = *widths.last().expect("checked non-empty");
        let conv_out = conv2d(last, out, 3, 1, 1, vb.pp("conv_out"))?;
        Ok(Self {
            conv_in,
            blocks,
            conv_out,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.conv_in.forward(x)?.silu()?;
        for b in &self.blocks {
            x = b.forward(&x)?.silu()?;
        }
        Ok(self.conv_out.forward(&x)?)
    }

    /// How many times the hint encoder halves the image.
    fn downsamples(&self) -> usize {
        self.blocks.len() / 2
    }
}

/// A loaded ControlNet, resident on its device.
#[derive(Debug, Clone)]
pub struct ControlNetModel {
    config: ControlNetConfig,
    encoder: UNetEncoder,
    hint: HintEncoder,
    /// `controlnet_down_blocks`: one per skip connection.
    down_zero: Vec<Conv2d>,
    mid_zero: Conv2d,
    bgr: bool,
    dtype: DType,
    device: Device,
}

impl ControlNetModel {
    /// Builds the model from `vb` (diffusers key names). A missing or mis-shaped tensor fails
    /// naming it; an unsupported config value with [`PipelineError::Config`].
    pub fn new(vb: VarBuilder, config: &ControlNetConfig) -> Result<Self> {
        let unet = config.encoder_config();
        let encoder = UNetEncoder::new(&vb, &unet, CONFIG_FILE)?;
        let ch = &unet.block_out_channels;
        let layers = unet
            .layers_per_block
            .expand(ch.len(), "layers_per_block")
            .map_err(|m| PipelineError::config(CONFIG_FILE, m))?;
        let hint = HintEncoder::new(
            config.conditioning_channels,
            config.embedding_channels()?,
            ch[0],
            vb.pp("controlnet_cond_embedding"),
        )?;
        // One zero convolution per skip connection: conv_in's output, each resnet's, each
        // downsampler's (every block but the last).
        let mut widths = vec![ch[0]];
        for (i, &c) in ch.iter().enumerate() {
            widths.extend(std::iter::repeat_n(c, layers[i]));
            if i + 1 != ch.len() {
                widths.push(c);
            }
        }
        let zb = vb.pp("controlnet_down_blocks");
        let down_zero = widths
            .iter()
            .enumerate()
            .map(|(i, &c)| conv2d(c, c, 1, 1, 0, zb.pp(i)))
            .collect::<candle_core::Result<_>>()?;
        let last = ch[ch.len() - 1];
        let mid_zero = conv2d(last, last, 1, 1, 0, vb.pp("controlnet_mid_block"))?;
        Ok(Self {
            bgr: config.bgr()?,
            config: config.clone(),
            encoder,
            hint,
            down_zero,
            mid_zero,
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    /// Loads a diffusers ControlNet folder, or a single file of the original names whose config
    /// is `unet`'s (the UNet it will steer) plus its hint encoder's shapes.
    pub fn load(path: &Path, unet: &UNetConfig, device: &Device, dtype: DType) -> Result<Self> {
        if path.is_dir() {
            let config_path = path.join(CONFIG_FILE);
            let config: ControlNetConfig = crate::error::read_json(&config_path)?;
            let files = crate::pipeline::component_weight_files(
                path,
                "",
                "diffusion_pytorch_model",
                dtype,
            )?;
            let vb = crate::single_file::checked_var_builder(&files, dtype, device)?;
            return Self::new(vb, &config).map_err(|e| in_file(e, &config_path));
        }
        let layers = unet
            .layers_per_block
            .expand(unet.block_out_channels.len(), "layers_per_block")
            .map_err(|m| PipelineError::config(path, m))?;
        if layers.iter().any(|&l| l != layers[0]) {
            return Err(PipelineError::config(
                path,
                "a single-file ControlNet needs one `layers_per_block` for every block",
            ));
        }
        let (tensors, shapes) = crate::single_file::read_controlnet_file(path, layers[0], dtype)?;
        let config = ControlNetConfig::from_unet(unet, &shapes);
        let vb = VarBuilder::from_tensors(tensors, dtype, device);
        Self::new(vb, &config).map_err(|e| match e {
            PipelineError::Candle(e) => PipelineError::Weights {
                path: path.to_path_buf(),
                message: format!("does not fit the model's UNet: {e}"),
            },
            other => in_file(other, path),
        })
    }

    pub fn config(&self) -> &ControlNetConfig {
        &self.config
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Why this ControlNet's residuals cannot go into `unet`'s skip connections, if they
    /// cannot: the input channels, widths, layers per block and cross-attention width must
    /// be the UNet's.
    pub fn fits(&self, unet: &UNetConfig) -> std::result::Result<(), String> {
        let mine = self.encoder.config();
        let n = unet.block_out_channels.len();
        let cross = |c: &UNetConfig| c.cross_attention_dim.expand(n, "cross_attention_dim").ok();
        let layers = |c: &UNetConfig| c.layers_per_block.expand(n, "layers_per_block").ok();
        let checks = [
            ("in_channels", mine.in_channels == unet.in_channels),
            (
                "block_out_channels",
                mine.block_out_channels == unet.block_out_channels,
            ),
            ("layers_per_block", layers(mine) == layers(unet)),
            ("cross_attention_dim", cross(mine) == cross(unet)),
        ];
        match checks.iter().find(|(_, ok)| !ok) {
            None => Ok(()),
            Some((key, _)) => Err(format!(
                "its `{key}` is not the model's UNet's (in_channels {}, block_out_channels {:?}): \
                 a ControlNet for another base model",
                unet.in_channels, unet.block_out_channels
            )),
        }
    }

    /// The factor from control image pixels to latent cells (8 for SD 1.5's ControlNets).
    pub fn image_scale_factor(&self) -> usize {
        1 << self.hint.downsamples()
    }

    /// How many residuals it hands the UNet: one per skip connection, and the mid block's.
    pub fn residual_count(&self) -> usize {
        self.down_zero.len() + 1
    }

    /// diffusers' `controlnet(sample, t, encoder_hidden_states, controlnet_cond,
    /// conditioning_scale, guess_mode=False)`: `sample` `[B, in, h, w]`, `cond` `[B, C, H, W]`
    /// in `[0, 1]` (RGB), with `H = h * image_scale_factor()`. The residuals come back in
    /// the model's dtype, times `scale`.
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        cond: &Tensor,
        scale: f64,
        slicing: AttentionSlicing,
    ) -> Result<AdditionalResiduals> {
        let weights = vec![scale; self.residual_count()];
        self.forward_weighted(
            sample,
            timesteps,
            encoder_hidden_states,
            cond,
            &weights,
            slicing,
        )
    }

    /// [`Self::forward`] with a weight per residual (skip connections first, the mid block's
    /// last: [`Self::residual_count`] of them), as the extension's `control_scales`.
    pub fn forward_weighted(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        cond: &Tensor,
        weights: &[f64],
        slicing: AttentionSlicing,
    ) -> Result<AdditionalResiduals> {
        if weights.len() != self.residual_count() {
            return Err(PipelineError::InvalidRequest(format!(
                "{} residual weights for a ControlNet of {} residuals",
                weights.len(),
                self.residual_count()
            )));
        }
        let (b, _, h, w) = sample.dims4()?;
        let (cb, cc, ch, cw) = cond.dims4()?;
        let f = self.image_scale_factor();
        if cb != b || cc != self.config.conditioning_channels || (ch, cw) != (h * f, w * f) {
            return Err(PipelineError::InvalidRequest(format!(
                "control image batch {:?}, the ControlNet takes [{b}, {}, {}, {}]",
                cond.dims(),
                self.config.conditioning_channels,
                h * f,
                w * f
            )));
        }
        let on =
            |t: &Tensor| -> Result<Tensor> { Ok(t.to_device(&self.device)?.to_dtype(self.dtype)?) };
        let mut cond = on(cond)?;
        if self.bgr {
            let chans: Vec<Tensor> = (0..cc)
                .rev()
                .map(|c| cond.narrow(1, c, 1))
                .collect::<candle_core::Result<_>>()?;
            cond = Tensor::cat(&chans, 1)?;
        }
        let emb = self
            .encoder
            .time_embedding(timesteps, b, self.dtype, &self.device)?;
        let x = (self.encoder.conv_in(&on(sample)?)? + self.hint.forward(&cond)?)?;
        let ctx = on(encoder_hidden_states)?;
        let (skips, mid) = self.encoder.run(x, &emb, &ctx, slicing)?;
        let pool = |t: Tensor, scale: f64| -> Result<Tensor> {
            let t = (t * scale)?;
            if self.config.global_pool_conditions {
                Ok(t.mean_keepdim(3)?.mean_keepdim(2)?)
            } else {
                Ok(t)
            }
        };
        let down = skips
            .iter()
            .zip(&self.down_zero)
            .zip(weights)
            .map(|((s, z), &w)| pool(z.forward(s)?, w))
            .collect::<Result<_>>()?;
        let mid = pool(self.mid_zero.forward(&mid)?, weights[weights.len() - 1])?;
        Ok(AdditionalResiduals { down, mid })
    }
}

/// A config error raised while building names the file it came from.
fn in_file(e: PipelineError, path: &Path) -> PipelineError {
    match e {
        PipelineError::Config { message, .. } => PipelineError::config(path, message),
        other => other,
    }
}
