//! What a single-file checkpoint says of its model from tensor names and shapes alone (a
//! safetensors header, a pickle's object tree; no tensor data): the limits a request must fit
//! (`ModelLimits`, from the configs conversion would infer) and the diffusers name and shape of
//! each UNet and text encoder weight (what a LoRA must fit). A server checks a request naming
//! a MODELS_DIR single file with them before the job is queued, before any conversion.

use std::collections::HashMap;
use std::path::Path;

use super::configs::Configs;
use super::convert::split_components;
use super::key_map::map_unet_key;
use super::SourceFile;
use crate::error::{PipelineError, Result};
use crate::pipeline::ModelLimits;

/// Tensor shapes by diffusers name (`down_blocks.0....weight`, `text_model....weight`).
pub type Shapes = HashMap<String, Vec<usize>>;

/// A single file's model as its tensor names and shapes describe it.
#[derive(Debug, Clone)]
pub struct SingleFileShapes {
    pub limits: ModelLimits,
    pub unet: Shapes,
    pub text_encoder: Shapes,
}

impl SingleFileShapes {
    /// Reads `path` (`.safetensors`: its header through a mapping; a pickle: parsed, never
    /// run) as conversion would, without converting: the same key split, the same inferred
    /// configs (SD 1.5's values where shapes say nothing), the same names.
    pub fn read(path: &Path) -> Result<Self> {
        let file = SourceFile::open(path)?;
        let ([unet, vae, clip], _) = split_components(&file)?;
        let configs = Configs::infer(&file, &unet, &vae, &clip)?;
        let config = |what: &str, v: &serde_json::Value| {
            PipelineError::config(
                format!("{what} (inferred from the single file)"),
                v.to_string(),
            )
        };
        let text: crate::clip::ClipTextConfig =
            serde_json::from_value(configs.text_encoder.clone())
                .map_err(|_| config("text_encoder", &configs.text_encoder))?;
        let vae: crate::vae::VaeConfig =
            serde_json::from_value(configs.vae.clone()).map_err(|_| config("vae", &configs.vae))?;
        let layers = configs.unet["layers_per_block"]
            .as_u64()
            .ok_or_else(|| config("unet", &configs.unet))? as usize;
        let shape = |src: &String| file.tensors[src].shape.clone();
        Ok(Self {
            limits: ModelLimits::of_configs(&text, &vae),
            unet: unet
                .iter()
                .filter_map(|(src, k)| Some((map_unet_key(k, layers)?, shape(src))))
                .collect(),
            text_encoder: clip
                .iter()
                .map(|(src, k)| {
                    let name = match k.strip_prefix("text_model.") {
                        Some(_) => k.clone(),
                        None => format!("text_model.{k}"),
                    };
                    (name, shape(src))
                })
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name)
    }

    #[test]
    fn a_single_file_has_its_folder_s_limits_and_names() {
        // single-file/tiny-a.* are tiny-a's weights under LDM names.
        let folder = ModelLimits::of_folder(&fixture("tiny-a")).unwrap();
        for file in [
            "single-file/tiny-a.safetensors",
            "single-file/tiny-a-fp16.ckpt",
        ] {
            let s = SingleFileShapes::read(&fixture(file)).unwrap();
            assert_eq!(s.limits, folder, "{file}");
            let folder_shapes = |part: &str, stem: &str| -> Shapes {
                let path = fixture("tiny-a").join(part).join(stem);
                // SAFETY: a fixture, mapped read-only and not written while mapped.
                let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(path) };
                let st = st.unwrap();
                st.tensors()
                    .into_iter()
                    .map(|(name, v)| (name, v.shape().to_vec()))
                    .collect()
            };
            let unet = folder_shapes("unet", "diffusion_pytorch_model.safetensors");
            let text = folder_shapes("text_encoder", "model.safetensors");
            for (name, dims) in &s.unet {
                assert_eq!(unet.get(name), Some(dims), "{file}: {name}");
            }
            assert_eq!(s.unet.len(), unet.len(), "{file}");
            for (name, dims) in &s.text_encoder {
                let plain = name.strip_prefix("text_model.").unwrap();
                let want = text.get(name).or_else(|| text.get(plain));
                assert_eq!(want, Some(dims), "{file}: {name}");
            }
        }
    }
}
