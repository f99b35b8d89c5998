//! IP-Adapter (image prompts), as diffusers 0.42 runs h94/IP-Adapter's `ip-adapter_sd15`:
//! `load_ip_adapter`, `encode_image`, `prepare_ip_adapter_image_embeds`, `ImageProjection` and
//! `IPAdapterAttnProcessor2_0`.
//!
//! The image goes through CLIP's image processor ([`clip_image`]) and image encoder
//! ([`clip_vision`]) to `image_embeds`; the adapter's `ImageProjection` (a linear layer to
//! `num_tokens x cross_attention_dim`, then a LayerNorm) makes image tokens of them, and of
//! zero embeds for the negative side of classifier-free guidance. Every cross-attention of the
//! UNet then adds `scale * attention(q, to_k_ip(tokens), to_v_ip(tokens))` to its text
//! attention; several adapters' terms add up, and a scale of 0 adds nothing (diffusers skips
//! it). The keys and values are the same at every step, so they are computed once per
//! request ([`ImagePrompts`]) and laid out per UNet batch ([`ImageTokens`]).
//!
//! Files: an adapter is a `.safetensors` (`image_proj.*`, `ip_adapter.N.to_k_ip.weight`) or
//! h94's `.bin` (a pickle of `{"image_proj": ..., "ip_adapter": ...}`, read without running
//! it); N = 2k + 1 numbers the UNet's k-th cross-attention in diffusers' order
//! ([`crate::unet::UNetConfig::cross_attentions`]). The image encoder is a folder of
//! `config.json` (`CLIPVisionModelWithProjection`), its weights and, where present,
//! `preprocessor_config.json`.

pub mod clip_image;
pub mod clip_vision;
mod prompts;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::clip::F32LayerNorm;
use crate::kernels::linear::Dense;
use crate::named_file::NamedFile;
use crate::pipeline::RgbImage;
use crate::unet::UNetConfig;
use crate::{PipelineError, Result};
pub use clip_image::ClipImageProcessor;
pub use clip_vision::{ClipVisionConfig, ClipVisionModel};
pub use prompts::{ImagePrompts, ImageTokens, LayerKv};

/// The LayerNorm of diffusers' `ImageProjection` (torch's default eps).
const PROJECTION_NORM_EPS: f64 = 1e-5;

/// An adapter file by its name.
pub type IpAdapter = NamedFile<IpAdapterModel>;
/// An image encoder folder by its name.
pub type ImageEncoder = NamedFile<ImageEncoderModel>;

/// One adapter of a request: diffusers' `ip_adapter_image` for it and its
/// `set_ip_adapter_scale`.
#[derive(Debug, Clone, PartialEq)]
pub struct IpAdapterUnit {
    pub model: Arc<IpAdapter>,
    /// The image encoder the adapter was trained with (h94's `models/image_encoder`).
    pub image_encoder: Arc<ImageEncoder>,
    /// Any size: the processor resizes and crops it.
    pub image: RgbImage,
    pub scale: f64,
}

impl NamedFile<IpAdapterModel> {
    /// The adapter, read onto `device` in `dtype` on first use and checked against `unet`.
    pub fn load_on(
        &self,
        unet: &UNetConfig,
        device: &Device,
        dtype: DType,
    ) -> std::result::Result<Arc<IpAdapterModel>, String> {
        self.get_or_read("IP-Adapter", "the IP-Adapter folder", |path| {
            IpAdapterModel::load(path, unet, device, dtype).map_err(|e| e.to_string())
        })
        .cloned()
    }
}

impl NamedFile<ImageEncoderModel> {
    /// The encoder, read onto `device` in `dtype` now unless handed over loaded, and not
    /// kept: it leaves the device when the caller drops it (ViT-H/14, SD 1.5's adapters'
    /// encoder, is 1.2 GB in f16; it is needed once per request, before denoising).
    pub fn load_on(
        &self,
        device: &Device,
        dtype: DType,
    ) -> std::result::Result<Arc<ImageEncoderModel>, String> {
        self.get_or_read_once("image encoder", "the IP-Adapter folder", |path| {
            ImageEncoderModel::load(path, device, dtype).map_err(|e| e.to_string())
        })
    }
}

/// An image encoder with its processor.
#[derive(Debug, Clone)]
pub struct ImageEncoderModel {
    pub model: ClipVisionModel,
    pub processor: ClipImageProcessor,
}

impl ImageEncoderModel {
    /// Reads a folder: `config.json`, `model.safetensors` (or `pytorch_model.bin`), and
    /// `preprocessor_config.json` where present (else what diffusers' `load_ip_adapter` builds:
    /// shortest side and crop at the encoder's `image_size`).
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let config = ClipVisionConfig::from_file(&dir.join("config.json"))?;
        let files = crate::pipeline::component_weight_files(dir, "", "model", dtype)?;
        let vb = crate::single_file::checked_var_builder(&files, dtype, device)?;
        let model = ClipVisionModel::new(vb, &config)?;
        let pre = dir.join("preprocessor_config.json");
        let processor = match pre.is_file() {
            true => ClipImageProcessor::from_file(&pre)?,
            false => ClipImageProcessor::for_image_size(config.image_size),
        };
        Ok(Self { model, processor })
    }

    /// `encode_image` for a non-plus adapter: `image_embeds` `[1, projection_dim]`.
    pub fn image_embeds(&self, image: &RgbImage) -> Result<Tensor> {
        let pixels = self.processor.preprocess(image, &Device::Cpu)?;
        Ok(self.model.forward(&pixels, false)?.image_embeds)
    }
}

/// diffusers' `ImageProjection`: `LayerNorm(Linear(embeds).reshape(B, tokens, cross))`.
#[derive(Debug, Clone)]
struct ImageProjection {
    proj: Dense,
    norm: F32LayerNorm,
    tokens: usize,
    cross_dim: usize,
}

impl ImageProjection {
    fn forward(&self, embeds: &Tensor) -> Result<Tensor> {
        let b = embeds.dim(0)?;
        let x = self.proj.forward(embeds, None)?;
        let x = x.reshape((b, self.tokens, self.cross_dim))?;
        Ok(self.norm.forward(&x)?)
    }
}

/// One cross-attention's `to_k_ip` and `to_v_ip`.
#[derive(Debug, Clone)]
struct IpLayer {
    name: String,
    to_k: Dense,
    to_v: Dense,
}

/// An adapter's weights, matched to a UNet's cross-attentions.
#[derive(Debug, Clone)]
pub struct IpAdapterModel {
    projection: ImageProjection,
    layers: Vec<IpLayer>,
    embed_dim: usize,
    path: PathBuf,
    device: Device,
    dtype: DType,
}

/// An adapter file's tensors as `image_proj.*` / `ip_adapter.*` names, f32 on the CPU.
fn read_adapter_tensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    let safetensors = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
    if safetensors {
        return crate::upscaler::state::read_state(path);
    }
    let mut out = HashMap::new();
    for part in ["image_proj", "ip_adapter"] {
        let checkpoint = crate::ckpt::Checkpoint::open(path)?;
        if checkpoint.root().get(part).is_none() {
            return Err(PipelineError::Weights {
                path: path.to_path_buf(),
                message: format!("no {part:?} dict: not an IP-Adapter file"),
            });
        }
        for (k, v) in crate::upscaler::state::read_state_under(path, Some(part))? {
            out.insert(format!("{part}.{k}"), v);
        }
    }
    Ok(out)
}

impl IpAdapterModel {
    /// Reads an adapter file and matches it to `unet`'s cross-attentions: one `N.to_k_ip` /
    /// `N.to_v_ip` pair for each (N = 1, 3, 5, ...), each `[hidden_size, cross_attention_dim]`;
    /// the projection's tokens are its rows over `cross_attention_dim`. An adapter for another
    /// UNet (or a plus / FaceID adapter, not read yet) is refused naming what differs.
    pub fn load(path: &Path, unet: &UNetConfig, device: &Device, dtype: DType) -> Result<Self> {
        let bad = |message: String| PipelineError::Weights {
            path: path.to_path_buf(),
            message,
        };
        let tensors = read_adapter_tensors(path)?;
        if !tensors.contains_key("image_proj.proj.weight") {
            let kind = match tensors.contains_key("image_proj.latents") {
                true => "an IP-Adapter Plus (a Resampler projection), not supported yet",
                false => "no image_proj.proj.weight: not an ip-adapter_sd15-style adapter",
            };
            return Err(bad(kind.into()));
        }
        let attentions = unet.cross_attentions().map_err(bad)?;
        let count = tensors
            .keys()
            .filter(|k| k.starts_with("ip_adapter.") && k.ends_with(".to_k_ip.weight"))
            .count();
        if count != attentions.len() {
            return Err(bad(format!(
                "{count} cross-attention layers, the model's UNet has {}",
                attentions.len()
            )));
        }
        let vb = VarBuilder::from_tensors(tensors, dtype, device);
        let (proj_rows, embed_dim) = vb.pp("image_proj.proj").get_unchecked("weight")?.dims2()?;
        let cross_dim = attentions.first().map_or(0, |a| a.cross_attention_dim);
        if cross_dim == 0 || !proj_rows.is_multiple_of(cross_dim) {
            return Err(bad(format!(
                "image_proj.proj has {proj_rows} rows, not a whole number of tokens of the \
                 UNet's cross_attention_dim {cross_dim}"
            )));
        }
        let shape_err = |e: candle_core::Error| bad(format!("does not fit the model's UNet: {e}"));
        let projection = ImageProjection {
            proj: Dense::load(embed_dim, proj_rows, true, vb.pp("image_proj.proj"))
                .map_err(shape_err)?,
            norm: F32LayerNorm::new(cross_dim, PROJECTION_NORM_EPS, vb.pp("image_proj.norm"))
                .map_err(shape_err)?,
            tokens: proj_rows / cross_dim,
            cross_dim,
        };
        let layers = attentions
            .iter()
            .enumerate()
            .map(|(k, a)| {
                let vb = vb.pp(format!("ip_adapter.{}", 2 * k + 1));
                let (c, h) = (a.cross_attention_dim, a.hidden_size);
                Ok(IpLayer {
                    name: a.name.clone(),
                    to_k: Dense::load(c, h, false, vb.pp("to_k_ip")).map_err(shape_err)?,
                    to_v: Dense::load(c, h, false, vb.pp("to_v_ip")).map_err(shape_err)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            projection,
            layers,
            embed_dim,
            path: path.to_path_buf(),
            device: device.clone(),
            dtype,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The image tokens per embed: the projection's output length.
    pub fn num_tokens(&self) -> usize {
        self.projection.tokens
    }

    /// The image embeds' width it takes (the encoder's `projection_dim`).
    pub fn embed_dim(&self) -> usize {
        self.embed_dim
    }

    /// `ImageProjection(image_embeds)`: `[B, num_tokens, cross_attention_dim]`.
    pub fn image_tokens(&self, image_embeds: &Tensor) -> Result<Tensor> {
        let e = image_embeds.dim(1)?;
        if e != self.embed_dim {
            return Err(PipelineError::InvalidRequest(format!(
                "the IP-Adapter {} takes image embeds of {} values, the image encoder gives {e}",
                self.path.display(),
                self.embed_dim
            )));
        }
        self.projection.forward(image_embeds)
    }
}
