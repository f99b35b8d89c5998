//! The LoRA files (`LORA_DIR`) and textual-inversion embeddings (`EMBEDDINGS_DIR`) a server
//! offers: read when the model loads, listed by `GET /loras` and `GET /embeddings`, and checked
//! by validation (an unknown LoRA, or one that does not fit the model, is a 422 naming it).

use std::path::Path;

use sdserve_pipeline::embeddings::EmbeddingLibrary;
use sdserve_pipeline::lora::LoraLibrary;
use sdserve_pipeline::pipeline::StableDiffusion;
use serde::{Deserialize, Serialize};

/// One LoRA file as `GET /loras` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LoraListing {
    /// The name requests use (`loras[].name`, `<lora:name:weight>`): the file name without
    /// `.safetensors`.
    pub name: String,
    pub file: String,
    /// `kohya` or `peft`.
    pub format: String,
    pub rank: usize,
    /// The parts it adapts: `unet`, `text_encoder`.
    pub targets: Vec<String>,
    /// Adapted layers, and how many of them are convolutions (LoCon).
    pub layers: usize,
    pub conv_layers: usize,
    /// Why the file cannot be used with this model (wrong shapes); `null` when it can.
    pub error: Option<String>,
}

/// One embedding as `GET /embeddings` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EmbeddingListing {
    /// The word prompts use: the file name without its extension.
    pub name: String,
    pub file: String,
    /// `a1111_pt` or `safetensors`.
    pub format: String,
    pub vectors: usize,
}

/// What the loaded model offers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Adapters {
    pub loras: Vec<LoraListing>,
    pub embeddings: Vec<EmbeddingListing>,
}

impl Adapters {
    /// The reason a request may not use LoRA `name`, if any.
    pub fn lora_problem(&self, name: &str) -> Option<String> {
        match self.loras.iter().find(|l| l.name == name) {
            None if self.loras.is_empty() => Some(format!(
                "unknown LoRA {name:?}: no LoRA files are loaded (set LORA_DIR)"
            )),
            None => Some(format!(
                "unknown LoRA {name:?}; available: {}",
                self.loras
                    .iter()
                    .map(|l| l.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            Some(l) => l
                .error
                .as_ref()
                .map(|e| format!("LoRA {name:?} cannot be used: {e}")),
        }
    }
}

/// Reads the folders into the pipeline and describes them. A folder that cannot be read, or a
/// file that is not a LoRA or embedding, fails the load with a message naming it.
pub fn load_into(
    sd: &mut StableDiffusion,
    lora_dir: Option<&Path>,
    embeddings_dir: Option<&Path>,
) -> Result<Adapters, String> {
    let mut out = Adapters::default();
    if let Some(dir) = lora_dir {
        let library = LoraLibrary::scan(dir).map_err(|e| format!("LORA_DIR: {e}"))?;
        sd.set_lora_library(library).map_err(|e| e.to_string())?;
        for info in sd.lora_library().list() {
            let error = sd.check_lora(&info.name).err().map(|e| e.to_string());
            if let Some(e) = &error {
                tracing::warn!(lora = %info.name, "{e}");
            }
            out.loras.push(LoraListing {
                name: info.name.clone(),
                file: info.file.display().to_string(),
                format: info.format.name().to_string(),
                rank: info.rank,
                targets: info.targets.clone(),
                layers: info.layers,
                conv_layers: info.conv_layers,
                error,
            });
        }
        tracing::info!(dir = %dir.display(), count = out.loras.len(), "LoRA files");
    }
    if let Some(dir) = embeddings_dir {
        let library = EmbeddingLibrary::scan(dir).map_err(|e| format!("EMBEDDINGS_DIR: {e}"))?;
        sd.set_embedding_library(library)
            .map_err(|e| format!("EMBEDDINGS_DIR: {e}"))?;
        for e in sd.embedding_library().list() {
            out.embeddings.push(EmbeddingListing {
                name: e.name.clone(),
                file: e.file.display().to_string(),
                format: e.format.to_string(),
                vectors: e.num_vectors(),
            });
        }
        tracing::info!(dir = %dir.display(), count = out.embeddings.len(), "embeddings");
    }
    Ok(out)
}
