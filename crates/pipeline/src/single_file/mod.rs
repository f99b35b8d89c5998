//! Single-file checkpoints (original LDM / CompVis key names, as most fine-tunes are shared)
//! converted to the diffusers folder layout the loader reads, plus load-time weight validation.
//!
//! Conversion ([`convert_single_file`]) is a pure key rename (and the VAE attention 1x1-conv ->
//! linear reshape): tensor bytes are copied unchanged, in their stored dtype, one tensor at a
//! time. It follows diffusers' `convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint` and
//! `convert_ldm_clip_checkpoint` (loaders/single_file_utils.py, diffusers 0.42.1).
//!
//! Configs: with [`ConvertOptions::config_dir`] the folder's configs are used verbatim (as
//! diffusers' `from_single_file(path, config=...)`). A `<checkpoint>.yaml` beside the file (the
//! LDM config A1111 reads, `ldm_yaml`) then decides what it states: prediction type, betas,
//! latent scale, head count; what contradicts the weights is refused. Without, everything the tensor shapes imply
//! is read from them (channels, block counts, layers per block, which blocks have attention,
//! cross-attention width, linear vs conv projections, text encoder width/depth/vocabulary,
//! latent channels); what shapes cannot say takes the Stable Diffusion 1.5 value: UNet
//! `attention_head_dim` 8, text encoder heads = hidden/64, `norm_num_groups` 32, eps 1e-5,
//! VAE `scaling_factor` 0.18215, quick_gelu, and SD 1.5's PNDM `scheduler_config.json`.
//!
//! Sources: `.safetensors` (memory-mapped) or a pickle checkpoint read by [`crate::ckpt`]
//! (never executed). SD 2.x (OpenCLIP) and SDXL single files are refused with a clear error.
//!
//! Files: `convert` (the conversion), `key_map` (LDM -> diffusers key names), `configs`
//! (configs read or inferred from shapes), `validate` (weight checks of a folder), `checked`
//! (a VarBuilder that checks each tensor as it loads), `vae_file` (a standalone VAE file read
//! for a swap), `shapes` (limits and weight shapes from the names and shapes alone); this one
//! reads the source file.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use safetensors::Dtype;

use crate::ckpt::{Checkpoint, TensorRef};
use crate::error::{PipelineError, Result};

mod checked;
mod configs;
mod controlnet_file;
mod convert;
mod key_map;
mod ldm_yaml;
mod shapes;
mod vae_file;
mod validate;

pub use checked::{checked_var_builder, CheckedWeights};
pub use configs::sd15_scheduler_config;
pub use controlnet_file::{read_controlnet_file, ControlNetFileShapes};
pub use convert::convert_single_file;
pub use key_map::{map_unet_key, map_vae_key};
pub use shapes::SingleFileShapes;
pub use vae_file::{read_vae_file, vae_file_config};
pub use validate::{component_weight_files, validate_folder, validate_safetensors, weight_variant};
pub(crate) use validate::{finite_sample_step, first_non_finite};

const UNET_PREFIX: &str = "model.diffusion_model.";
const VAE_PREFIXES: [&str; 2] = ["first_stage_model.", "vae."];
const CLIP_PREFIX: &str = "cond_stage_model.transformer.";

/// File names of the diffusers layout we write (the published SD 1.5 names).
pub const UNET_WEIGHTS: &str = "unet/diffusion_pytorch_model.safetensors";
pub const VAE_WEIGHTS: &str = "vae/diffusion_pytorch_model.safetensors";
pub const TEXT_ENCODER_WEIGHTS: &str = "text_encoder/model.safetensors";

/// The LDM `.yaml` config A1111 reads for a single-file checkpoint, if there is one beside it:
/// the same path with `.yaml` (its settings decide what the weights cannot say).
pub fn config_beside(checkpoint: &Path) -> Option<PathBuf> {
    ldm_yaml::beside(checkpoint)
}

/// Does this path look like a single-file checkpoint (by extension)?
pub fn is_single_file(path: &Path) -> bool {
    matches!(
        path.extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase())
            .as_deref(),
        Some("safetensors" | "ckpt" | "pt" | "pth" | "bin")
    )
}

/// How to fill in what a single file does not carry.
#[derive(Debug, Default, Clone)]
pub struct ConvertOptions<'a> {
    /// A diffusers folder whose `unet/`, `vae/`, `text_encoder/`, `scheduler/` configs (and
    /// `tokenizer/`, if it has one) are used instead of inferred ones.
    pub config_dir: Option<&'a Path>,
    /// Tokenizer files `(file name, bytes)` written to `tokenizer/` when `config_dir` has none
    /// (the server bundles the real CLIP tokenizer: single files carry none).
    pub tokenizer_files: &'a [(&'a str, &'a [u8])],
}

/// What a conversion did.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvertSummary {
    /// Tensors written per component: unet, vae, text_encoder.
    pub tensors: [usize; 3],
    /// Keys of the file that belong to none of the three models (EMA copies, schedules...).
    pub ignored: usize,
    /// Whether the configs were inferred (no `config_dir`).
    pub inferred_configs: bool,
    /// The `<checkpoint>.yaml` applied over them, if there was one.
    pub yaml_config: Option<PathBuf>,
}

/// One tensor of the source file.
struct SrcTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    ckpt: Option<TensorRef>,
}

enum Source {
    Safetensors(MmapedSafetensors),
    Ckpt(Checkpoint),
}

struct SourceFile {
    path: PathBuf,
    source: Source,
    tensors: BTreeMap<String, SrcTensor>,
}

impl SourceFile {
    fn open(path: &Path) -> Result<Self> {
        let is_st = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
        if is_st {
            // SAFETY: the file is mapped read-only; we do not modify it while mapped.
            let st = unsafe { MmapedSafetensors::new(path) }.map_err(|e| weights(path, e))?;
            let tensors = st
                .tensors()
                .into_iter()
                .map(|(name, v)| {
                    (
                        name,
                        SrcTensor {
                            dtype: v.dtype(),
                            shape: v.shape().to_vec(),
                            ckpt: None,
                        },
                    )
                })
                .collect();
            Ok(Self {
                path: path.to_path_buf(),
                source: Source::Safetensors(st),
                tensors,
            })
        } else {
            let ck = Checkpoint::open(path)?;
            let tensors = ck
                .state_dict()?
                .into_iter()
                .map(|(name, t)| {
                    (
                        name,
                        SrcTensor {
                            dtype: t.dtype,
                            shape: t.shape.clone(),
                            ckpt: Some(t),
                        },
                    )
                })
                .collect();
            Ok(Self {
                path: path.to_path_buf(),
                source: Source::Ckpt(ck),
                tensors,
            })
        }
    }

    fn read(&self, name: &str) -> Result<Cow<'_, [u8]>> {
        match &self.source {
            Source::Safetensors(st) => {
                let v = st.get(name).map_err(|e| weights(&self.path, e))?;
                Ok(Cow::Borrowed(v.data()))
            }
            Source::Ckpt(ck) => {
                let t = self.tensors[name].ckpt.as_ref().expect("ckpt tensor");
                Ok(Cow::Owned(ck.read_tensor(t)?))
            }
        }
    }
}

impl SourceFile {
    /// Tensor `src` read in `shape` (its element count unchanged) and converted to `dtype` on
    /// the CPU; `what` names the model in the error for a non-float tensor. Bytes read from the
    /// safetensors mapping leave the resident set once copied.
    fn host_tensor(
        &self,
        src: &str,
        shape: &[usize],
        dtype: candle_core::DType,
        what: &str,
    ) -> Result<candle_core::Tensor> {
        use candle_core::{DType, Device, Tensor};
        let stored = match self.tensors[src].dtype {
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            Dtype::F32 => DType::F32,
            Dtype::F64 => DType::F64,
            other => {
                return Err(weights(
                    &self.path,
                    format!("`{src}` is {other:?}; a {what} weight is a float tensor"),
                ))
            }
        };
        let bytes = self.read(src)?;
        let tensor = Tensor::from_raw_buffer(&bytes, stored, shape, &Device::Cpu)
            .and_then(|t| t.to_dtype(dtype))
            .map_err(|e| weights(&self.path, format!("`{src}`: {e}")))?;
        if let Cow::Borrowed(mapped) = &bytes {
            // Copied: its pages of the file leave the resident set now, not when the whole
            // file is read (the read peaks at the weights plus one tensor, not twice the file).
            // SAFETY: borrowed bytes lie in the read-only mapping of the safetensors file.
            unsafe { crate::weights::release_mapped(mapped) };
        }
        Ok(tensor)
    }
}

fn weights(path: &Path, message: impl std::fmt::Display) -> PipelineError {
    PipelineError::Weights {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

fn read_json_value(path: &Path) -> Result<serde_json::Value> {
    crate::error::read_json(path)
}
