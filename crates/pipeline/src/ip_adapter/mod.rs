//! IP-Adapter (image prompts), as diffusers 0.42 runs h94/IP-Adapter's `ip-adapter_sd15`,
//! `ip-adapter-plus_sd15` and `ip-adapter-plus-face_sd15`: `load_ip_adapter`, `encode_image`,
//! `prepare_ip_adapter_image_embeds`, `ImageProjection`, `IPAdapterPlusImageProjection` and
//! `IPAdapterAttnProcessor2_0`.
//!
//! The image goes through CLIP's image processor ([`clip_image`]) and image encoder
//! ([`clip_vision`]). A plain adapter's `ImageProjection` (a linear layer to
//! `num_tokens x cross_attention_dim`, then a LayerNorm) makes image tokens of its
//! `image_embeds`, and of zero embeds for the negative side of classifier-free guidance. A Plus
//! adapter's Resampler ([`resampler`]) makes them of the encoder's penultimate hidden states,
//! and the negative side of the hidden states of zero pixel values (diffusers' `encode_image`
//! with `output_hidden_states=True` runs the encoder on `zeros_like(pixel_values)`; they are
//! not zeros). Every cross-attention of the
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
mod extension;
mod prompts;
mod resampler;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;

use crate::clip::F32LayerNorm;
use crate::kernels::linear::Dense;
use crate::named_file::NamedFile;
use crate::pipeline::RgbImage;
use crate::unet::UNetConfig;
use crate::{PipelineError, Result};
pub use clip_image::ClipImageProcessor;
pub use clip_vision::{ClipVisionConfig, ClipVisionModel};
pub use extension::{
    read_uncond_states, unit_tokens as extension_unit_tokens, ExtensionImage, ExtensionRecord,
    ExtensionRun,
};
pub use prompts::{ImagePrompts, ImageTokens, LayerKv};
use resampler::Resampler;

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
    /// Run as the sd-webui-controlnet extension runs an ip-adapter unit (A1111 requests):
    /// its images, window and Plus negative side; `None`: as diffusers.
    pub extension: Option<ExtensionRun>,
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

    /// `encode_image(..., output_hidden_states=True)` for a Plus adapter: the penultimate
    /// hidden states `[1, positions, hidden]` of the image and of zero pixel values (the
    /// processor's output zeroed, diffusers' negative side), in that order.
    pub fn penultimate_states(&self, image: &RgbImage) -> Result<(Tensor, Tensor)> {
        let pixels = self.processor.preprocess(image, &Device::Cpu)?;
        self.penultimate_of_pixels(&pixels)
    }

    /// The penultimate hidden states of `pixels` and of zero pixel values, in that order.
    pub fn penultimate_of_pixels(&self, pixels: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((
            self.penultimate(pixels)?,
            self.penultimate(&pixels.zeros_like()?)?,
        ))
    }

    /// The penultimate hidden states of `pixels`.
    pub(super) fn penultimate(&self, pixels: &Tensor) -> Result<Tensor> {
        self.model
            .forward(pixels, true)?
            .penultimate
            .ok_or_else(|| {
                PipelineError::InvalidRequest("the image encoder gave no hidden states".into())
            })
    }

    /// The encoder's outputs `adapter` takes for `image` and for its negative side.
    pub fn adapter_inputs(
        &self,
        adapter: &IpAdapterModel,
        image: &RgbImage,
    ) -> Result<(Tensor, Tensor)> {
        match adapter.takes_hidden_states() {
            true => self.penultimate_states(image),
            false => {
                let embeds = self.image_embeds(image)?;
                Ok((embeds.clone(), embeds.zeros_like()?))
            }
        }
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

/// How an adapter makes image tokens.
#[derive(Debug, Clone)]
enum Projection {
    /// `ip-adapter_sd15`: of `image_embeds`.
    Linear(ImageProjection),
    /// Plus: of the penultimate hidden states.
    Resampler(Box<Resampler>),
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
    projection: Projection,
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
    /// `N.to_v_ip` pair for each (N = 1, 3, 5, ...), each `[hidden_size, cross_attention_dim]`.
    /// A plain adapter's projection (`image_proj.proj`) makes its rows over
    /// `cross_attention_dim` tokens; a Plus adapter's (`image_proj.latents`) is a Resampler
    /// with its constants read from the weights. An adapter for another UNet (or a FaceID /
    /// full-face adapter, not read) is refused naming what differs.
    pub fn load(path: &Path, unet: &UNetConfig, device: &Device, dtype: DType) -> Result<Self> {
        let bad = |message: String| PipelineError::Weights {
            path: path.to_path_buf(),
            message,
        };
        let tensors = read_adapter_tensors(path)?;
        let plus = tensors.contains_key("image_proj.latents");
        if !plus && !tensors.contains_key("image_proj.proj.weight") {
            return Err(bad("neither image_proj.proj.weight (ip-adapter_sd15) nor \
                 image_proj.latents (Plus): not an adapter this server reads (FaceID and \
                 full-face adapters are not)"
                .into()));
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
        let cross_dim = attentions.first().map_or(0, |a| a.cross_attention_dim);
        let shape_err = |e: candle_core::Error| bad(format!("does not fit the model's UNet: {e}"));
        let (projection, embed_dim) = match plus {
            true => {
                let r = Resampler::load(vb.pp("image_proj"), cross_dim)
                    .map_err(|e| bad(format!("the Plus Resampler: {e}")))?;
                let embed_dim = r.embed_dim();
                (Projection::Resampler(Box::new(r)), embed_dim)
            }
            false => {
                let (rows, embed_dim) =
                    vb.pp("image_proj.proj").get_unchecked("weight")?.dims2()?;
                if cross_dim == 0 || !rows.is_multiple_of(cross_dim) {
                    return Err(bad(format!(
                        "image_proj.proj has {rows} rows, not a whole number of tokens of the \
                         UNet's cross_attention_dim {cross_dim}"
                    )));
                }
                let projection = ImageProjection {
                    proj: Dense::load(embed_dim, rows, true, vb.pp("image_proj.proj"))
                        .map_err(shape_err)?,
                    norm: F32LayerNorm::new(
                        cross_dim,
                        PROJECTION_NORM_EPS,
                        vb.pp("image_proj.norm"),
                    )
                    .map_err(shape_err)?,
                    tokens: rows / cross_dim,
                    cross_dim,
                };
                (Projection::Linear(projection), embed_dim)
            }
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

    /// The image tokens per image: the projection's output length.
    pub fn num_tokens(&self) -> usize {
        match &self.projection {
            Projection::Linear(p) => p.tokens,
            Projection::Resampler(r) => r.num_queries(),
        }
    }

    /// Whether it takes the encoder's penultimate hidden states (Plus) rather than its
    /// `image_embeds`.
    pub fn takes_hidden_states(&self) -> bool {
        matches!(self.projection, Projection::Resampler(_))
    }

    /// The width of the encoder output it takes: `projection_dim` (plain) or the encoder's
    /// hidden size (Plus).
    pub fn embed_dim(&self) -> usize {
        self.embed_dim
    }

    /// A Plus adapter's attention heads (the query rows over 64, as diffusers reads them).
    pub fn resampler_heads(&self) -> Option<usize> {
        match &self.projection {
            Projection::Linear(_) => None,
            Projection::Resampler(r) => Some(r.heads()),
        }
    }

    /// The adapter with its Resampler's queries and keys split into `heads` instead: not the
    /// adapter any more; tests use it to show the split matters.
    #[doc(hidden)]
    pub fn with_resampler_heads(mut self, heads: usize) -> Self {
        if let Projection::Resampler(r) = &mut self.projection {
            r.set_heads(heads);
        }
        self
    }

    /// The image tokens `[B, num_tokens, cross_attention_dim]` of the encoder's output: plain,
    /// `ImageProjection(image_embeds [B, embed_dim])`; Plus, the Resampler of the hidden
    /// states `[B, positions, embed_dim]`.
    pub fn image_tokens(&self, input: &Tensor) -> Result<Tensor> {
        let e = input.dim(D::Minus1)?;
        let rank = match self.projection {
            Projection::Linear(_) => 2,
            Projection::Resampler(_) => 3,
        };
        if e != self.embed_dim || input.rank() != rank {
            return Err(PipelineError::InvalidRequest(format!(
                "the IP-Adapter {} takes encoder outputs of rank {rank} and width {}, got {:?}",
                self.path.display(),
                self.embed_dim,
                input.dims()
            )));
        }
        match &self.projection {
            Projection::Linear(p) => p.forward(input),
            Projection::Resampler(r) => r.forward(input),
        }
    }
}
