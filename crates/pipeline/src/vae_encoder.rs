//! The encoder half of diffusers' `AutoencoderKL` (`vae/`): images to latent distributions.
//!
//! Layout as `diffusers.models.autoencoders.vae.Encoder` (0.42): `encoder.conv_in`,
//! `encoder.down_blocks.*` (`layers_per_block` resnets each, a stride-2 3x3 conv with
//! (0,1,0,1) zero padding on all but the last), `encoder.mid_block` (resnet, attention, resnet),
//! `conv_norm_out`, SiLU (fixed in diffusers' Encoder), `conv_out` to `2 * latent_channels`
//! (mean and log-variance), then `quant_conv` (1x1). The blocks are the decoder's (`vae/`).

use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;

use crate::kernels::Conv2d;
use crate::memory::tiling::encode_tiled;
use crate::memory::VaeTiling;
use crate::rng::TorchRng;
use crate::unet::blocks::Downsample;
use crate::vae::{conv, Activation, GroupNorm, MidBlock, ResnetBlock, VaeConfig, NORM_EPS};
use crate::Result;

/// `DownEncoderBlock2D`: resnets, then optionally the stride-2 downsampler.
#[derive(Debug, Clone)]
struct DownBlock {
    resnets: Vec<ResnetBlock>,
    downsampler: Option<Downsample>,
}

/// `AutoencoderKL.encode` without the decoder: `encoder` + `quant_conv`.
#[derive(Debug, Clone)]
pub struct AutoencoderKlEncoder {
    conv_in: Conv2d,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    quant_conv: Option<Conv2d>,
    latent_channels: usize,
    dtype: DType,
    attention_slice: Option<usize>,
}

/// `DiagonalGaussianDistribution` of `encode(x).latent_dist`: per-element mean and standard
/// deviation (log-variance clamped to [-30, 20] as diffusers does), in f32.
#[derive(Debug, Clone)]
pub struct LatentDist {
    pub mean: Tensor,
    pub std: Tensor,
}

impl LatentDist {
    /// `latent_dist.sample(generator)`: `mean + std * randn(mean.shape)`, the noise drawn from
    /// `rng` on the host as torch's CPU generator draws it.
    pub fn sample(&self, rng: &mut TorchRng) -> Result<Tensor> {
        let noise = rng.randn_tensor(self.mean.dims().to_vec(), self.mean.device(), DType::F32)?;
        Ok((&self.mean + (&self.std * noise)?)?)
    }
}

fn check_config(cfg: &VaeConfig) -> Result<()> {
    cfg.validate()?;
    cfg.check_block_types(
        "down_block_types",
        &cfg.down_block_types,
        "DownEncoderBlock2D",
    )
}

impl AutoencoderKlEncoder {
    /// `vb` is rooted at the VAE weight file (keys `encoder.*`, `quant_conv.*`).
    pub fn new(vb: VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        check_config(cfg)?;
        let act = Activation::from_name(&cfg.act_fn)?;
        let ch = &cfg.block_out_channels;
        let top = *ch.last().expect("validated non-empty");
        let ve = vb.pp("encoder");
        let conv_in = conv(cfg.in_channels, ch[0], 3, ve.pp("conv_in"))?;
        let mut down_blocks = Vec::with_capacity(ch.len());
        let mut prev = ch[0];
        for (i, &out) in ch.iter().enumerate() {
            let vd = ve.pp(format!("down_blocks.{i}"));
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    let cin = if j == 0 { prev } else { out };
                    ResnetBlock::new(cin, out, cfg, act, vd.pp(format!("resnets.{j}")))
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            // The Encoder builds its downsamplers with `downsample_padding=0`.
            let downsampler = if i + 1 < ch.len() {
                Some(Downsample::new(out, 0, vd.pp("downsamplers.0"))?)
            } else {
                None
            };
            down_blocks.push(DownBlock {
                resnets,
                downsampler,
            });
            prev = out;
        }
        let mid_block = MidBlock::new(top, cfg, act, ve.pp("mid_block"))?;
        let conv_norm_out =
            GroupNorm::new(top, cfg.norm_num_groups, NORM_EPS, ve.pp("conv_norm_out"))?;
        let moments = 2 * cfg.latent_channels;
        let conv_out = conv(top, moments, 3, ve.pp("conv_out"))?;
        let quant_conv = if cfg.use_quant_conv {
            Some(conv(moments, moments, 1, vb.pp("quant_conv"))?)
        } else {
            None
        };
        Ok(Self {
            conv_in,
            down_blocks,
            mid_block,
            conv_norm_out,
            conv_out,
            quant_conv,
            latent_channels: cfg.latent_channels,
            dtype: vb.dtype(),
            attention_slice: None,
        })
    }

    /// Computes the mid-block attention `rows` query rows at a time (`None`: all at once).
    pub fn set_attention_slice(&mut self, rows: Option<usize>) {
        self.attention_slice = rows;
    }

    /// The moments `[B, 2 * latent_channels, h, w]` (`quant_conv` applied) of images in [-1, 1].
    pub fn moments(&self, image: &Tensor) -> Result<Tensor> {
        let mut x = self.conv_in.forward(&image.to_dtype(self.dtype)?)?;
        for block in &self.down_blocks {
            for r in &block.resnets {
                x = r.forward(&x)?;
            }
            if let Some(d) = &block.downsampler {
                x = d.forward(&x)?;
            }
        }
        x = self.mid_block.forward(&x, self.attention_slice)?;
        // diffusers' Encoder uses nn.SiLU() here whatever `act_fn` says.
        x = self.conv_norm_out.forward_act(&x, Activation::Silu)?;
        x = self.conv_out.forward(&x)?;
        if let Some(q) = &self.quant_conv {
            x = q.forward(&x)?;
        }
        Ok(x)
    }

    /// `vae.encode(image).latent_dist` for `image` `[B, 3, H, W]` in [-1, 1].
    pub fn encode(&self, image: &Tensor) -> Result<LatentDist> {
        self.distribution(&self.moments(image)?)
    }

    /// As [`encode`](Self::encode), tile by tile (diffusers' `_tiled_encode` with
    /// `use_tiling`): peak memory follows the tile, not the image. `f` is the VAE's scale
    /// factor. An image no larger than a tile is encoded whole, as diffusers does.
    pub fn encode_tiled(&self, image: &Tensor, tiling: VaeTiling, f: usize) -> Result<LatentDist> {
        let (_, _, h, w) = image.dims4()?;
        let tile_px = tiling.tile_latent * f;
        if h <= tile_px && w <= tile_px {
            return self.encode(image);
        }
        let moments = encode_tiled(image, tiling, f, |tile| self.moments(tile))?;
        self.distribution(&moments)
    }

    /// `DiagonalGaussianDistribution(moments)`: mean and the clamped log-variance's std.
    fn distribution(&self, moments: &Tensor) -> Result<LatentDist> {
        let moments = moments.to_dtype(DType::F32)?;
        let c = self.latent_channels;
        let mean = moments.narrow(1, 0, c)?;
        let logvar = moments.narrow(1, c, c)?.clamp(-30f32, 20f32)?;
        let std = (logvar * 0.5)?.exp()?;
        Ok(LatentDist { mean, std })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }
}
