//! The decoder half of diffusers' `AutoencoderKL` (`vae/`): latents to images.
//!
//! Layout as `diffusers.models.autoencoders.vae.Decoder` (0.42): `post_quant_conv` (1x1), then
//! `decoder.conv_in`, `decoder.mid_block` (resnet, single-head self-attention, resnet),
//! `decoder.up_blocks.*` (`layers_per_block + 1` resnets each, nearest-2x + 3x3 conv upsampler on
//! all but the last), `conv_norm_out`, activation, `conv_out`. Every number comes from
//! [`VaeConfig`]; the fixed ones (norm eps 1e-6, one attention head) are fixed in diffusers too.
//!
//! Generic over the VarBuilder's dtype: convolutions and matmuls run in it, group norms and the
//! attention softmax run in f32 when the weights are half precision.
//!
//! Files: `config` (`VaeConfig`), `layers` (activation, group norm, convolution, resnet,
//! attention; shared with the encoder); this one holds the decoder.

use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;

use crate::kernels::Conv2d;
use crate::Result;

mod config;
mod layers;

pub use config::VaeConfig;
pub(crate) use layers::{conv, Activation, GroupNorm, MidBlock, ResnetBlock, NORM_EPS};

/// `UpDecoderBlock2D`: resnets, then optionally nearest 2x upsampling and a 3x3 conv.
#[derive(Debug, Clone)]
struct UpBlock {
    resnets: Vec<ResnetBlock>,
    upsampler: Option<Conv2d>,
}

impl UpBlock {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = x.clone();
        for r in &self.resnets {
            x = r.forward(&x)?;
        }
        if let Some(conv) = &self.upsampler {
            let (_, _, h, w) = x.dims4()?;
            x = conv.forward(&x.upsample_nearest2d(2 * h, 2 * w)?)?;
        }
        Ok(x)
    }
}

/// `AutoencoderKL.decode` without the encoder: `post_quant_conv` + `decoder`.
#[derive(Debug, Clone)]
pub struct AutoencoderKlDecoder {
    config: VaeConfig,
    post_quant_conv: Option<Conv2d>,
    conv_in: Conv2d,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    act: Activation,
    dtype: DType,
    attention_slice: Option<usize>,
}

impl AutoencoderKlDecoder {
    /// `vb` is rooted at the VAE weight file (keys `post_quant_conv.*`, `decoder.*`).
    pub fn new(vb: VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        cfg.validate()?;
        let act = Activation::from_name(&cfg.act_fn)?;
        let ch = &cfg.block_out_channels;
        let top = *ch.last().expect("validated non-empty");
        let latent = cfg.latent_channels;
        let post_quant_conv = if cfg.use_post_quant_conv {
            Some(conv(latent, latent, 1, vb.pp("post_quant_conv"))?)
        } else {
            None
        };
        let vd = vb.pp("decoder");
        let conv_in = conv(latent, top, 3, vd.pp("conv_in"))?;
        let mid_block = MidBlock::new(top, cfg, act, vd.pp("mid_block"))?;

        let mut up_blocks = Vec::with_capacity(ch.len());
        let mut prev = top;
        for (i, &out) in ch.iter().rev().enumerate() {
            let vu = vd.pp(format!("up_blocks.{i}"));
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| {
                    let cin = if j == 0 { prev } else { out };
                    ResnetBlock::new(cin, out, cfg, act, vu.pp(format!("resnets.{j}")))
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            let upsampler = if i + 1 < ch.len() {
                Some(conv(out, out, 3, vu.pp("upsamplers.0.conv"))?)
            } else {
                None
            };
            up_blocks.push(UpBlock { resnets, upsampler });
            prev = out;
        }
        let bottom = ch[0];
        let conv_norm_out = GroupNorm::new(
            bottom,
            cfg.norm_num_groups,
            NORM_EPS,
            vd.pp("conv_norm_out"),
        )?;
        let conv_out = conv(bottom, cfg.out_channels, 3, vd.pp("conv_out"))?;
        Ok(Self {
            config: cfg.clone(),
            post_quant_conv,
            conv_in,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_out,
            act,
            dtype: vb.dtype(),
            attention_slice: None,
        })
    }

    /// Computes the mid-block attention `rows` query rows at a time (`None`: all at once).
    /// At 512x512 there are 4096 tokens, so one full f32 score matrix is 64 MiB per image.
    pub fn with_attention_slice(mut self, rows: Option<usize>) -> Self {
        self.attention_slice = rows;
        self
    }

    pub fn set_attention_slice(&mut self, rows: Option<usize>) {
        self.attention_slice = rows;
    }

    /// diffusers `vae.decode(z).sample` for `z` = latents / scaling_factor, `[B, latent, h, w]`
    /// -> `[B, out_channels, h*f, w*f]` in the weights' dtype (values roughly in [-1, 1]).
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let mut x = z.to_dtype(self.dtype)?;
        if let Some(c) = &self.post_quant_conv {
            x = c.forward(&x)?;
        }
        x = self.conv_in.forward(&x)?;
        x = self.mid_block.forward(&x, self.attention_slice)?;
        for block in &self.up_blocks {
            x = block.forward(&x)?;
        }
        x = self.conv_norm_out.forward_act(&x, self.act)?;
        Ok(self.conv_out.forward(&x)?)
    }

    /// Spatial ratio image / latent: `2^(len(block_out_channels) - 1)`.
    pub fn downscale_factor(&self) -> usize {
        1 << (self.config.block_out_channels.len() - 1)
    }

    pub fn scaling_factor(&self) -> f64 {
        self.config.scaling_factor
    }

    pub fn shift_factor(&self) -> Option<f64> {
        self.config.shift_factor
    }

    pub fn latent_channels(&self) -> usize {
        self.config.latent_channels
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }
}
