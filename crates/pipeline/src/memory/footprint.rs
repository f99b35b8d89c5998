//! How big a model is: parameter counts from the weight files' headers (safetensors headers, or
//! a `.bin` pickle's tensor table; no weights read), and the shapes the activation estimates
//! need, from the configs.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use candle_core::DType;

use crate::error::read_json;
use crate::pipeline::component_weight_files;
use crate::unet::UNetConfig;
use crate::vae::VaeConfig;
use crate::{PipelineError, Result};

/// Parameter counts (elements, not bytes) of the parts the pipeline loads.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Deserialize)]
pub struct WeightCounts {
    /// UNet parameters grouped by streaming unit: `down_blocks.N`, `mid_block`, `up_blocks.N`,
    /// and `other` (conv_in, time embedding, conv_norm_out, conv_out).
    pub unet: BTreeMap<String, u64>,
    pub text_encoder: u64,
    /// `post_quant_conv.*` and `decoder.*`.
    pub vae_decoder: u64,
    /// `quant_conv.*` and `encoder.*`: the VAE encoder, for init images (absent in older
    /// recorded footprints: 0).
    #[serde(default)]
    pub vae_encoder: u64,
}

/// The sequential-offload unit a UNet key belongs to.
pub fn unet_group(key: &str) -> String {
    let mut parts = key.split('.');
    match (parts.next(), parts.next()) {
        (Some(b @ ("down_blocks" | "up_blocks")), Some(i)) => format!("{b}.{i}"),
        (Some("mid_block"), _) => "mid_block".into(),
        _ => "other".into(),
    }
}

/// Reads the JSON header of a safetensors file and returns `(name, element count)` per tensor.
/// Reads only the header (at most a few MB), never the data.
pub fn safetensors_numels(path: &Path) -> Result<Vec<(String, u64)>> {
    let io = |e| PipelineError::io(path, e);
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(io)?;
    let len = u64::from_le_bytes(len);
    if len > 100 << 20 {
        return Err(PipelineError::Weights {
            path: path.into(),
            message: format!("safetensors header of {len} bytes is implausible"),
        });
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header).map_err(io)?;
    let header: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| PipelineError::Weights {
            path: path.into(),
            message: format!("bad safetensors header: {e}"),
        })?;
    let mut out = Vec::with_capacity(header.len());
    for (name, info) in header {
        if name == "__metadata__" {
            continue;
        }
        let shape = info["shape"]
            .as_array()
            .ok_or_else(|| PipelineError::Weights {
                path: path.into(),
                message: format!("tensor {name} has no shape"),
            })?;
        let numel = shape.iter().map(|d| d.as_u64().unwrap_or(0)).product();
        out.push((name, numel));
    }
    Ok(out)
}

/// `(name, element count)` per tensor of a weight file: a safetensors header, or the tensor
/// table of a PyTorch pickle (`.bin`, read by [`crate::ckpt`] without running it).
pub fn weight_numels(path: &Path) -> Result<Vec<(String, u64)>> {
    let safetensors = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
    if safetensors {
        return safetensors_numels(path);
    }
    let checkpoint = crate::ckpt::Checkpoint::open(path)?;
    Ok(checkpoint
        .state_dict()?
        .into_iter()
        .map(|(name, t)| (name, t.shape.iter().map(|&d| d as u64).product()))
        .collect())
}

impl WeightCounts {
    /// Counts the weights of a diffusers folder from the files `StableDiffusion::load` would read
    /// for `dtype` (the fp16 variant when present).
    pub fn from_model_dir(dir: &Path, dtype: DType) -> Result<Self> {
        let mut counts = Self::default();
        for file in component_weight_files(dir, "unet", "diffusion_pytorch_model", dtype)? {
            for (name, n) in weight_numels(&file)? {
                *counts.unet.entry(unet_group(&name)).or_default() += n;
            }
        }
        for file in component_weight_files(dir, "text_encoder", "model", dtype)? {
            counts.text_encoder += weight_numels(&file)?.iter().map(|(_, n)| n).sum::<u64>();
        }
        for file in component_weight_files(dir, "vae", "diffusion_pytorch_model", dtype)? {
            for (k, n) in weight_numels(&file)? {
                if k.starts_with("decoder.") || k.starts_with("post_quant_conv.") {
                    counts.vae_decoder += n;
                } else if k.starts_with("encoder.") || k.starts_with("quant_conv.") {
                    counts.vae_encoder += n;
                }
            }
        }
        Ok(counts)
    }

    pub fn unet_total(&self) -> u64 {
        self.unet.values().sum()
    }

    /// The largest block that sequential offload streams in at once.
    pub fn unet_largest_block(&self) -> u64 {
        self.unet
            .iter()
            .filter(|(k, _)| k.as_str() != "other")
            .map(|(_, n)| *n)
            .max()
            .unwrap_or(0)
    }

    pub fn unet_other(&self) -> u64 {
        self.unet.get("other").copied().unwrap_or(0)
    }
}

/// Parameters of a ControlNet (a diffusers folder, read for `dtype` as the loader reads it, or
/// a single file, of which only the `control_model.` tensors when it has any: some files carry
/// the whole SD model beside them), from the headers alone: what the planner counts for a
/// request's ControlNets before they are read.
pub fn controlnet_weight_count(path: &Path, dtype: DType) -> Result<u64> {
    if path.is_dir() {
        let mut total = 0;
        for file in component_weight_files(path, "", "diffusion_pytorch_model", dtype)? {
            total += weight_numels(&file)?.iter().map(|(_, n)| n).sum::<u64>();
        }
        return Ok(total);
    }
    let numels = weight_numels(path)?;
    let prefixed = numels.iter().any(|(k, _)| k.starts_with("control_model."));
    Ok(numels
        .iter()
        .filter(|(k, _)| !prefixed || k.starts_with("control_model."))
        .map(|(_, n)| n)
        .sum())
}

/// The shape of an IP-Adapter image encoder (a CLIP vision transformer) that its activations
/// depend on, from its `config.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageEncoderShape {
    /// Patches and the class token.
    pub tokens: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
}

/// What a request's IP-Adapters put on the device while their images are encoded: the
/// encoder in `encoder_dir` (its config and the weight files the loader reads for `dtype`) and
/// the largest of `adapters`, counted from the headers alone.
pub fn image_prompt_load(
    encoder_dir: &Path,
    adapters: &[&Path],
    dtype: DType,
) -> Result<crate::memory::plan::ImagePromptLoad> {
    let config = crate::ip_adapter::ClipVisionConfig::from_file(&encoder_dir.join("config.json"))?;
    let mut params = 0;
    for file in component_weight_files(encoder_dir, "", "model", dtype)? {
        params += weight_numels(&file)?.iter().map(|(_, n)| n).sum::<u64>();
    }
    let mut largest = 0;
    for adapter in adapters {
        largest = largest.max(adapter_params(adapter)?);
    }
    let grid = config.image_size / config.patch_size.max(1);
    Ok(crate::memory::plan::ImagePromptLoad {
        params: params + largest,
        encoder: Some(ImageEncoderShape {
            tokens: grid * grid + 1,
            hidden: config.hidden_size,
            intermediate: config.intermediate_size,
            heads: config.num_attention_heads,
        }),
    })
}

/// An IP-Adapter file's parameters: a safetensors header's, or the tensors of h94's `.bin`,
/// a pickle of dicts (`{"image_proj": {...}, "ip_adapter": {...}}`) one level down.
fn adapter_params(path: &Path) -> Result<u64> {
    let safetensors = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
    if safetensors {
        return Ok(safetensors_numels(path)?.iter().map(|(_, n)| n).sum());
    }
    use crate::ckpt::Value;
    let checkpoint = crate::ckpt::Checkpoint::open(path)?;
    let tensor = |v: &Value| match v {
        Value::Tensor(t) => t.shape.iter().map(|&d| d as u64).product(),
        _ => 0,
    };
    let dict = |v: &Value, count: &dyn Fn(&Value) -> u64| match v {
        Value::Dict(items) => items.iter().map(|(_, v)| count(v)).sum(),
        _ => 0,
    };
    Ok(dict(checkpoint.root(), &|v| tensor(v) + dict(v, &tensor)))
}

/// One UNet resolution level that has attention.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttentionLevel {
    /// Downsampling steps below the latent resolution (0 = full latent size).
    pub level: usize,
    pub heads: usize,
    /// Channels at this level.
    pub channels: usize,
}

/// The shapes the activation estimates need.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelShapes {
    pub latent_channels: usize,
    /// Pixels per latent cell (8 for SD 1.5).
    pub vae_scale_factor: usize,
    pub unet_channels: Vec<usize>,
    pub unet_layers_per_block: usize,
    pub attention_levels: Vec<AttentionLevel>,
    /// Text tokens the cross-attention sees (77 for CLIP).
    pub context_len: usize,
    /// `block_out_channels` of the VAE decoder (first = the full-resolution stage).
    pub vae_channels: Vec<usize>,
    pub vae_mid_attention: bool,
    /// `force_upcast` in the VAE config: decode in f32 when the rest runs in half precision.
    pub vae_force_upcast: bool,
    /// The VAE's `sample_size` in pixels (diffusers' tile size for tiled decoding).
    pub vae_sample_size: Option<usize>,
}

impl ModelShapes {
    pub fn from_configs(unet: &UNetConfig, vae: &VaeConfig, context_len: usize) -> Result<Self> {
        let r = unet
            .resolve()
            .map_err(|m| PipelineError::config("unet/config.json", m))?;
        let mut attention_levels = Vec::new();
        for (i, kind) in unet.down_block_types.iter().enumerate() {
            if kind.contains("CrossAttn") {
                attention_levels.push(AttentionLevel {
                    level: i,
                    heads: r.heads[i],
                    channels: unet.block_out_channels[i],
                });
            }
        }
        let sample_size = match &vae.sample_size {
            Some(serde_json::Value::Number(n)) => n.as_u64().map(|n| n as usize),
            Some(serde_json::Value::Array(a)) => {
                a.first().and_then(|n| n.as_u64()).map(|n| n as usize)
            }
            _ => None,
        };
        Ok(Self {
            latent_channels: unet.in_channels,
            vae_scale_factor: 1 << (vae.block_out_channels.len().saturating_sub(1)),
            unet_channels: unet.block_out_channels.clone(),
            unet_layers_per_block: r.layers.iter().copied().max().unwrap_or(1),
            attention_levels,
            context_len,
            vae_channels: vae.block_out_channels.clone(),
            vae_mid_attention: vae.mid_block_add_attention,
            vae_force_upcast: vae.force_upcast,
            vae_sample_size: sample_size,
        })
    }

    /// Reads `unet/config.json` and `vae/config.json` of a diffusers folder.
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let unet: UNetConfig = read_json(&dir.join("unet/config.json"))?;
        let vae: VaeConfig = read_json(&dir.join("vae/config.json"))?;
        // CLIP's max_position_embeddings; 77 for every SD 1.x text encoder.
        #[derive(serde::Deserialize)]
        struct Text {
            #[serde(default = "seventy_seven")]
            max_position_embeddings: usize,
        }
        fn seventy_seven() -> usize {
            77
        }
        let text: Text = read_json(&dir.join("text_encoder/config.json"))?;
        Self::from_configs(&unet, &vae, text.max_position_embeddings)
    }
}

/// Weights and shapes together: all the planner needs to know about a model.
#[derive(Debug, Clone, PartialEq)]
pub struct Footprint {
    pub weights: WeightCounts,
    pub shapes: ModelShapes,
}

impl Footprint {
    pub fn from_model_dir(dir: &Path, dtype: DType) -> Result<Self> {
        Ok(Self {
            weights: WeightCounts::from_model_dir(dir, dtype)?,
            shapes: ModelShapes::from_model_dir(dir)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_controlnet_counts_its_own_weights_only() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/controlnet");
        // The diffusers folder and the same model as an LDM single file (other key names).
        let folder = controlnet_weight_count(&dir.join("cn-a"), DType::F32).unwrap();
        let file = dir.join("cn-a-ldm.safetensors");
        let single = controlnet_weight_count(&file, DType::F32).unwrap();
        let tensors = candle_core::safetensors::load(&file, &candle_core::Device::Cpu).unwrap();
        let all: u64 = tensors.values().map(|t| t.elem_count() as u64).sum();
        assert_eq!((folder, single), (all, all));
        // A file carrying an SD model beside its `control_model.` tensors: those alone.
        let mut with_sd = tensors.clone();
        let extra = candle_core::Tensor::zeros((3, 5), DType::F32, &candle_core::Device::Cpu);
        with_sd.insert("model.diffusion_model.out.2.weight".into(), extra.unwrap());
        let tmp =
            std::env::temp_dir().join(format!("cn-with-sd-{}.safetensors", std::process::id()));
        candle_core::safetensors::save(&with_sd, &tmp).unwrap();
        let counted = controlnet_weight_count(&tmp, DType::F32);
        std::fs::remove_file(&tmp).unwrap();
        assert_eq!(counted.unwrap(), all);
    }

    #[test]
    fn ip_adapters_count_the_encoder_and_their_largest_adapter() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ip-adapter/models");
        let numels = |file: &Path| -> u64 {
            let tensors = candle_core::safetensors::load(file, &candle_core::Device::Cpu).unwrap();
            tensors.values().map(|t| t.elem_count() as u64).sum()
        };
        let encoder = dir.join("image_encoder");
        let (base, plus) = (
            dir.join("ip-adapter_sd15.safetensors"),
            dir.join("ip-adapter-plus_sd15.safetensors"),
        );
        let plus_params = numels(&plus);
        assert!(
            plus_params > numels(&base),
            "the Plus adapter is the larger"
        );
        let both = image_prompt_load(&encoder, &[&base, &plus], DType::F32).unwrap();
        assert_eq!(
            both.params,
            numels(&encoder.join("model.safetensors")) + plus_params
        );
        let one = image_prompt_load(&encoder, &[&base], DType::F32).unwrap();
        assert_eq!(both.params - one.params, plus_params - numels(&base));
        // The fixture's config: 32x32 images in 8x8 patches (16 and the class token).
        assert_eq!(
            one.encoder,
            Some(ImageEncoderShape {
                tokens: 17,
                hidden: 32,
                intermediate: 40,
                heads: 4
            })
        );
        // The .bin of the same adapter counts the same (its pickle's tensor table).
        let bin = image_prompt_load(&encoder, &[&dir.join("ip-adapter_sd15.bin")], DType::F32);
        assert_eq!(bin.unwrap().params, one.params);
        assert!(
            image_prompt_load(&dir, &[&base], DType::F32).is_err(),
            "no config.json"
        );
    }

    #[test]
    fn groups_unet_keys_by_block() {
        assert_eq!(
            unet_group("down_blocks.2.attentions.0.proj_in.weight"),
            "down_blocks.2"
        );
        assert_eq!(
            unet_group("up_blocks.10.resnets.0.conv1.bias"),
            "up_blocks.10"
        );
        assert_eq!(unet_group("mid_block.resnets.0.norm1.weight"), "mid_block");
        assert_eq!(unet_group("conv_in.weight"), "other");
        assert_eq!(unet_group("time_embedding.linear_1.weight"), "other");
    }
}
