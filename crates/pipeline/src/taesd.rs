//! TAESD, the tiny distilled autoencoder (diffusers `AutoencoderTiny`), for live previews.
//!
//! Layout as diffusers 0.42 `DecoderTiny` / `EncoderTiny`: each is one `nn.Sequential` called
//! `layers`, so weight names are `decoder.layers.<i>...` where `i` also counts the modules that
//! have no weights (activations, upsamplers).
//! - Decoder: `tanh(z / 3) * 3`, 3x3 conv (latent -> c), act, then per level `num_decoder_blocks`
//!   blocks, a nearest upsampling by `upsampling_scaling_factor` on all but the last level, and a
//!   3x3 conv (no bias; the last level's maps to `out_channels`, with bias); output `x * 2 - 1`.
//! - Encoder: `(x + 1) / 2`, a 3x3 conv on the first level and a bias-free stride-2 3x3 conv on
//!   the others, each followed by `num_encoder_blocks` blocks, then a 3x3 conv to the latents.
//! - Block (`AutoencoderTinyBlock`): `relu(conv(act(conv(act(conv(x))))) + x)`; the outer ReLU is
//!   fixed in diffusers whatever `act_fn` says.
//!
//! A pipeline whose `vae` is an `AutoencoderTiny` decodes `vae.decode(latents / scaling_factor)`
//! and postprocesses as for the full VAE; [`Taesd::decode_preview`] does exactly that.
//! `latent_magnitude` / `latent_shift` only map latents to and from `[0, 1]` for storing them as
//! bytes ([`Taesd::scale_latents`]); decoding does not use them, nor `shift_factor` (the SD 1.x
//! pipeline does not read it).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::error::read_json;
use crate::kernels::Conv2d;
use crate::pipeline::RgbImage;
use crate::vae::Activation;
use crate::{PipelineError, Result};

/// `config.json` of an `AutoencoderTiny` folder; absent keys take diffusers' defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct TaesdConfig {
    #[serde(default = "default_3")]
    pub in_channels: usize,
    #[serde(default = "default_3")]
    pub out_channels: usize,
    #[serde(default = "default_channels")]
    pub encoder_block_out_channels: Vec<usize>,
    #[serde(default = "default_channels")]
    pub decoder_block_out_channels: Vec<usize>,
    #[serde(default = "default_act_fn")]
    pub act_fn: String,
    #[serde(default = "default_upsample_fn")]
    pub upsample_fn: String,
    #[serde(default = "default_4")]
    pub latent_channels: usize,
    #[serde(default = "default_2")]
    pub upsampling_scaling_factor: usize,
    #[serde(default = "default_encoder_blocks")]
    pub num_encoder_blocks: Vec<usize>,
    #[serde(default = "default_decoder_blocks")]
    pub num_decoder_blocks: Vec<usize>,
    #[serde(default = "default_latent_magnitude")]
    pub latent_magnitude: f64,
    #[serde(default = "default_latent_shift")]
    pub latent_shift: f64,
    /// Decode in f32 even when loaded in half precision (diffusers always saves `false`).
    #[serde(default)]
    pub force_upcast: bool,
    #[serde(default = "default_scaling_factor")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: f64,
}

fn default_2() -> usize {
    2
}
fn default_3() -> usize {
    3
}
fn default_4() -> usize {
    4
}
fn default_channels() -> Vec<usize> {
    vec![64; 4]
}
fn default_act_fn() -> String {
    "relu".into()
}
fn default_upsample_fn() -> String {
    "nearest".into()
}
fn default_encoder_blocks() -> Vec<usize> {
    vec![1, 3, 3, 3]
}
fn default_decoder_blocks() -> Vec<usize> {
    vec![3, 3, 3, 1]
}
fn default_latent_magnitude() -> f64 {
    3.0
}
fn default_latent_shift() -> f64 {
    0.5
}
fn default_scaling_factor() -> f64 {
    1.0
}

impl TaesdConfig {
    /// Rejects configs diffusers could not run either, naming the key; `path` is the file.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |m: String| Err(PipelineError::config(path, m));
        for (name, channels, blocks, blocks_name) in [
            (
                "decoder_block_out_channels",
                &self.decoder_block_out_channels,
                &self.num_decoder_blocks,
                "num_decoder_blocks",
            ),
            (
                "encoder_block_out_channels",
                &self.encoder_block_out_channels,
                &self.num_encoder_blocks,
                "num_encoder_blocks",
            ),
        ] {
            if channels.is_empty() || channels.contains(&0) {
                return bad(format!(
                    "{name} must be non-empty and positive, got {channels:?}"
                ));
            }
            if channels.len() != blocks.len() {
                return bad(format!(
                    "{name} has {} entries but {blocks_name} has {}",
                    channels.len(),
                    blocks.len()
                ));
            }
            // Each level's convolutions map its own width to itself, so diffusers only runs
            // when every level has the same width.
            if channels.windows(2).any(|w| w[0] != w[1]) {
                return bad(format!(
                    "{name} must be one width for every level, got {channels:?}"
                ));
            }
        }
        if self.upsample_fn != "nearest" {
            return bad(format!(
                "unsupported upsample_fn {:?} (only \"nearest\")",
                self.upsample_fn
            ));
        }
        if self.upsampling_scaling_factor == 0 {
            return bad("upsampling_scaling_factor must be positive".into());
        }
        if self.latent_channels == 0 || self.in_channels == 0 || self.out_channels == 0 {
            return bad("channel counts must be positive".into());
        }
        if !(self.scaling_factor.is_finite() && self.scaling_factor != 0.0) {
            return bad(format!(
                "scaling_factor must be finite and non-zero, got {}",
                self.scaling_factor
            ));
        }
        self.activation(path)?;
        Ok(())
    }

    fn activation(&self, path: &Path) -> Result<Activation> {
        Activation::from_name(&self.act_fn).map_err(|_| {
            PipelineError::config(path, format!("unsupported act_fn {:?}", self.act_fn))
        })
    }

    /// Image pixels per latent pixel along a side: `upsampling_scaling_factor^(levels - 1)`.
    pub fn upscale_factor(&self) -> usize {
        let levels = self.decoder_block_out_channels.len().max(1) as u32;
        self.upsampling_scaling_factor.pow(levels - 1)
    }
}

/// 3x3 same-padding convolution, with or without bias.
fn conv3(
    cin: usize,
    cout: usize,
    stride: usize,
    bias: bool,
    vb: VarBuilder,
) -> candle_core::Result<Conv2d> {
    let weight = vb.get((cout, cin, 3, 3), "weight")?;
    let bias = if bias {
        Some(vb.get(cout, "bias")?)
    } else {
        None
    };
    Ok(Conv2d::new(weight, bias, stride, 1))
}

/// `AutoencoderTinyBlock` with `in_channels == out_channels` (the only kind AutoencoderTiny builds,
/// so its `skip` is the identity).
#[derive(Debug, Clone)]
struct Block {
    convs: [Conv2d; 3],
    act: Activation,
}

impl Block {
    fn new(c: usize, act: Activation, vb: VarBuilder) -> candle_core::Result<Self> {
        let vb = vb.pp("conv");
        // Sequential(conv, act, conv, act, conv): the convolutions are entries 0, 2 and 4.
        Ok(Self {
            convs: [
                conv3(c, c, 1, true, vb.pp("0"))?,
                conv3(c, c, 1, true, vb.pp("2"))?,
                conv3(c, c, 1, true, vb.pp("4"))?,
            ],
            act,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = self.convs[0].forward(x)?;
        h = self.act.forward(&h)?;
        h = self.convs[1].forward(&h)?;
        h = self.act.forward(&h)?;
        h = self.convs[2].forward(&h)?;
        (h + x)?.relu()
    }
}

/// One level: blocks, optional upsampling (decoder) and a convolution.
#[derive(Debug, Clone)]
struct Level {
    /// Encoder only: the convolution before the blocks.
    conv_before: Option<Conv2d>,
    blocks: Vec<Block>,
    upsample: Option<usize>,
    /// Decoder only: the convolution after the blocks.
    conv_after: Option<Conv2d>,
}

impl Level {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = match &self.conv_before {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        for b in &self.blocks {
            x = b.forward(&x)?;
        }
        if let Some(f) = self.upsample {
            let (_, _, h, w) = x.dims4()?;
            x = x.upsample_nearest2d(h * f, w * f)?;
        }
        if let Some(c) = &self.conv_after {
            x = c.forward(&x)?;
        }
        Ok(x)
    }
}

/// diffusers `DecoderTiny`: latents (already divided by `scaling_factor`) to an image in about
/// `[-1, 1]`.
#[derive(Debug, Clone)]
pub struct TinyDecoder {
    conv_in: Conv2d,
    act: Activation,
    levels: Vec<Level>,
}

impl TinyDecoder {
    /// `vb` is rooted at `decoder`.
    fn new(cfg: &TaesdConfig, act: Activation, vb: VarBuilder) -> candle_core::Result<Self> {
        let vb = vb.pp("layers");
        let channels = &cfg.decoder_block_out_channels;
        let conv_in = conv3(cfg.latent_channels, channels[0], 1, true, vb.pp("0"))?;
        let mut index = 2; // 0: conv_in, 1: its activation
        let mut levels = Vec::with_capacity(channels.len());
        for (i, (&c, &n)) in channels.iter().zip(&cfg.num_decoder_blocks).enumerate() {
            let last = i + 1 == channels.len();
            let mut blocks = Vec::with_capacity(n);
            for _ in 0..n {
                blocks.push(Block::new(c, act, vb.pp(index.to_string()))?);
                index += 1;
            }
            let upsample = (!last).then_some(cfg.upsampling_scaling_factor);
            if upsample.is_some() {
                index += 1; // nn.Upsample has no weights
            }
            let cout = if last { cfg.out_channels } else { c };
            let conv = conv3(c, cout, 1, last, vb.pp(index.to_string()))?;
            index += 1;
            levels.push(Level {
                conv_before: None,
                blocks,
                upsample,
                conv_after: Some(conv),
            });
        }
        Ok(Self {
            conv_in,
            act,
            levels,
        })
    }

    fn forward(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        // diffusers' soft clamp of the input to (-3, 3).
        let mut x = ((z / 3.0)?.tanh()? * 3.0)?;
        x = self.act.forward(&self.conv_in.forward(&x)?)?;
        for level in &self.levels {
            x = level.forward(&x)?;
        }
        // [0, 1] -> [-1, 1], diffusers' image convention.
        x.affine(2.0, -1.0)
    }
}

/// diffusers `EncoderTiny`: an image in `[-1, 1]` to latents (before `scaling_factor`).
#[derive(Debug, Clone)]
pub struct TinyEncoder {
    levels: Vec<Level>,
    conv_out: Conv2d,
}

impl TinyEncoder {
    /// `vb` is rooted at `encoder`.
    fn new(cfg: &TaesdConfig, act: Activation, vb: VarBuilder) -> candle_core::Result<Self> {
        let vb = vb.pp("layers");
        let channels = &cfg.encoder_block_out_channels;
        let mut index = 0;
        let mut levels = Vec::with_capacity(channels.len());
        for (i, (&c, &n)) in channels.iter().zip(&cfg.num_encoder_blocks).enumerate() {
            let conv = if i == 0 {
                conv3(cfg.in_channels, c, 1, true, vb.pp(index.to_string()))?
            } else {
                conv3(c, c, 2, false, vb.pp(index.to_string()))?
            };
            index += 1;
            let mut blocks = Vec::with_capacity(n);
            for _ in 0..n {
                blocks.push(Block::new(c, act, vb.pp(index.to_string()))?);
                index += 1;
            }
            levels.push(Level {
                conv_before: Some(conv),
                blocks,
                upsample: None,
                conv_after: None,
            });
        }
        let top = *channels.last().expect("validated non-empty");
        let conv_out = conv3(top, cfg.latent_channels, 1, true, vb.pp(index.to_string()))?;
        Ok(Self { levels, conv_out })
    }

    fn forward(&self, image: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = image.affine(0.5, 0.5)?; // [-1, 1] -> [0, 1]
        for level in &self.levels {
            x = level.forward(&x)?;
        }
        self.conv_out.forward(&x)
    }
}

/// A loaded TAESD: the decoder, and the encoder when the weights hold one.
#[derive(Debug, Clone)]
pub struct Taesd {
    config: TaesdConfig,
    decoder: TinyDecoder,
    encoder: Option<TinyEncoder>,
    /// What the modules compute in (f32 when `force_upcast` overrides a half dtype).
    dtype: DType,
    device: Device,
    files: Vec<PathBuf>,
}

impl Taesd {
    /// Loads an `AutoencoderTiny` folder (`config.json` + `diffusion_pytorch_model.safetensors`,
    /// or its `.fp16` variant when `dtype` is f16, or shards, or the pickle `.bin` forms when
    /// there are no safetensors: `pipeline::component_weight_files`), e.g. `madebyollin/taesd`.
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let config_path = dir.join("config.json");
        let config: TaesdConfig = read_json(&config_path)?;
        config.validate(&config_path)?;
        let dtype = if config.force_upcast {
            DType::F32
        } else {
            dtype
        };
        let files =
            crate::pipeline::component_weight_files(dir, "", "diffusion_pytorch_model", dtype)?;
        let vb = crate::single_file::checked_var_builder(&files, dtype, device)?;
        Self::from_var_builder(vb, config, &config_path).map(|mut t| {
            t.files = files;
            t
        })
    }

    /// Builds from weights already open (keys `decoder.layers.*`, optionally `encoder.layers.*`);
    /// errors name `source` and the tensor.
    pub fn from_var_builder(vb: VarBuilder, config: TaesdConfig, source: &Path) -> Result<Self> {
        config.validate(source)?;
        let act = config.activation(source)?;
        let weights_error = |e: candle_core::Error| PipelineError::Weights {
            path: source.to_path_buf(),
            message: e.to_string(),
        };
        if !vb.contains_tensor("decoder.layers.0.weight") {
            return Err(PipelineError::Weights {
                path: source.to_path_buf(),
                message: "no TAESD decoder here (missing decoder.layers.0.weight)".into(),
            });
        }
        let decoder = TinyDecoder::new(&config, act, vb.pp("decoder")).map_err(weights_error)?;
        let encoder = if vb.contains_tensor("encoder.layers.0.weight") {
            Some(TinyEncoder::new(&config, act, vb.pp("encoder")).map_err(weights_error)?)
        } else {
            None
        };
        Ok(Self {
            config,
            decoder,
            encoder,
            dtype: vb.dtype(),
            device: vb.device().clone(),
            files: vec![source.to_path_buf()],
        })
    }

    /// diffusers `AutoencoderTiny.decode(z).sample`: `z` `[B, latent_channels, h, w]` (already
    /// divided by `scaling_factor`) -> `[B, out_channels, h*f, w*f]` in about `[-1, 1]`, f32.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        self.check_channels(z, self.config.latent_channels, "latent")?;
        let z = z.to_device(&self.device)?.to_dtype(self.dtype)?;
        Ok(self.decoder.forward(&z)?.to_dtype(DType::F32)?)
    }

    /// The images a pipeline with this TAESD as its VAE would return for `latents` (the
    /// denoising latents, as the step hook sees them): `decode(latents / scaling_factor)`, then
    /// `(x / 2 + 0.5).clamp(0, 1)` rounded to RGB8, one image per batch entry.
    pub fn decode_preview(&self, latents: &Tensor) -> Result<Vec<RgbImage>> {
        let image = self.decode(&(latents.to_dtype(DType::F32)? / self.config.scaling_factor)?)?;
        (0..image.dim(0)?)
            .map(|i| crate::pipeline::postprocess(&image.narrow(0, i, 1)?))
            .collect()
    }

    /// diffusers `AutoencoderTiny.encode(image).latents`: `image` `[B, in_channels, H, W]` in
    /// `[-1, 1]` -> latents (multiply by `scaling_factor` for the denoising space), f32.
    pub fn encode(&self, image: &Tensor) -> Result<Tensor> {
        let encoder = self
            .encoder
            .as_ref()
            .ok_or_else(|| PipelineError::Weights {
                path: self.files.first().cloned().unwrap_or_default(),
                message: "this TAESD has no encoder weights (encoder.layers.*)".into(),
            })?;
        self.check_channels(image, self.config.in_channels, "image")?;
        let image = image.to_device(&self.device)?.to_dtype(self.dtype)?;
        Ok(encoder.forward(&image)?.to_dtype(DType::F32)?)
    }

    /// diffusers `scale_latents`: raw latents -> `[0, 1]` (for storing them as bytes).
    pub fn scale_latents(&self, z: &Tensor) -> Result<Tensor> {
        let m = 2.0 * self.config.latent_magnitude;
        Ok(z.affine(1.0 / m, self.config.latent_shift)?
            .clamp(0.0, 1.0)?)
    }

    /// diffusers `unscale_latents`: `[0, 1]` -> raw latents.
    pub fn unscale_latents(&self, x: &Tensor) -> Result<Tensor> {
        let m = 2.0 * self.config.latent_magnitude;
        Ok(x.affine(m, -self.config.latent_shift * m)?)
    }

    fn check_channels(&self, x: &Tensor, want: usize, what: &str) -> Result<()> {
        let (_, c, _, _) = x.dims4()?;
        if c != want {
            return Err(PipelineError::InvalidRequest(format!(
                "TAESD takes {want} {what} channels, got {c}"
            )));
        }
        Ok(())
    }

    pub fn config(&self) -> &TaesdConfig {
        &self.config
    }

    pub fn has_encoder(&self) -> bool {
        self.encoder.is_some()
    }

    /// The dtype the modules compute in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The weight files it was loaded from.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> TaesdConfig {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn defaults_are_madebyollin_taesd() {
        let cfg = config(r#"{"_class_name": "AutoencoderTiny"}"#);
        assert_eq!(cfg.decoder_block_out_channels, [64; 4]);
        assert_eq!(cfg.num_decoder_blocks, [3, 3, 3, 1]);
        assert_eq!(cfg.num_encoder_blocks, [1, 3, 3, 3]);
        assert_eq!(
            (cfg.act_fn.as_str(), cfg.upsample_fn.as_str()),
            ("relu", "nearest")
        );
        assert_eq!(
            (cfg.latent_magnitude, cfg.latent_shift, cfg.scaling_factor),
            (3.0, 0.5, 1.0)
        );
        assert_eq!(cfg.upscale_factor(), 8);
        assert!(!cfg.force_upcast);
        cfg.validate(Path::new("config.json")).unwrap();
    }

    #[test]
    fn configs_diffusers_cannot_run_are_refused_by_key() {
        for (json, key) in [
            (
                r#"{"decoder_block_out_channels": [8, 8]}"#,
                "num_decoder_blocks",
            ),
            (
                r#"{"encoder_block_out_channels": [8, 16, 16, 16]}"#,
                "encoder_block_out_channels",
            ),
            (r#"{"upsample_fn": "bilinear"}"#, "upsample_fn"),
            (r#"{"act_fn": "tanhshrink"}"#, "act_fn"),
            (r#"{"scaling_factor": 0.0}"#, "scaling_factor"),
        ] {
            let err = config(json)
                .validate(Path::new("t/config.json"))
                .unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, PipelineError::Config { .. }), "{msg}");
            assert!(
                msg.contains(key) && msg.contains("t/config.json"),
                "{json}: {msg}"
            );
        }
    }

    /// All-zero weights: every convolution gives 0, so the image is `0 * 2 - 1 = -1` (black)
    /// at `upsampling_scaling_factor^(levels - 1)` times the latent size, one per batch entry.
    #[test]
    fn shapes_follow_the_config() {
        let dev = Device::Cpu;
        let cfg = config(
            r#"{"decoder_block_out_channels": [4, 4, 4], "num_decoder_blocks": [1, 2, 1],
                "encoder_block_out_channels": [4, 4], "num_encoder_blocks": [1, 1],
                "upsampling_scaling_factor": 3, "latent_magnitude": 2, "latent_shift": 0.25}"#,
        );
        let t = Taesd::from_var_builder(VarBuilder::zeros(DType::F32, &dev), cfg, Path::new("z"))
            .unwrap();
        let latents = Tensor::randn(0f32, 1.0, (2, 4, 3, 5), &dev).unwrap();
        let images = t.decode_preview(&latents).unwrap();
        assert_eq!(images.len(), 2);
        for img in &images {
            assert_eq!((img.width, img.height), (45, 27));
            assert!(img.pixels.iter().all(|p| *p == 0));
        }
        let encoded = t
            .encode(&Tensor::zeros((1, 3, 8, 6), DType::F32, &dev).unwrap())
            .unwrap();
        assert_eq!(encoded.dims(), [1, 4, 4, 3]);
        let wrong = Tensor::zeros((1, 9, 3, 5), DType::F32, &dev).unwrap();
        assert!(matches!(
            t.decode_preview(&wrong),
            Err(PipelineError::InvalidRequest(_))
        ));

        // scale_latents / unscale_latents: (z / (2 * 2) + 0.25).clamp(0, 1) and back.
        let z = Tensor::new(&[[-1.0f32, 0.0, 2.0, 5.0]], &dev).unwrap();
        let s: Vec<Vec<f32>> = t.scale_latents(&z).unwrap().to_vec2().unwrap();
        assert_eq!(s[0], [0.0, 0.25, 0.75, 1.0]);
        let back: Vec<Vec<f32>> = t
            .unscale_latents(&t.scale_latents(&z).unwrap())
            .unwrap()
            .to_vec2()
            .unwrap();
        assert_eq!(back[0], [-1.0, 0.0, 2.0, 3.0]);
    }
}
