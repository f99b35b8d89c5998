//! Adapters that change a loaded model per request: LoRA libraries (merged into the resident
//! weights) and textual-inversion embeddings (extra tokenizer words).

use std::collections::HashMap;

use candle_core::Tensor;

use super::{LoraWeight, StableDiffusion};
use crate::embeddings::EmbeddingLibrary;
use crate::lora::{LoraLibrary, LoraState, Part, Target};
use crate::{PipelineError, Result};

impl StableDiffusion {
    /// The LoRA files requests may name; replaces the previous library (and unmerges its LoRAs).
    pub fn set_lora_library(&mut self, library: LoraLibrary) -> Result<()> {
        self.lora_state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .restore()?;
        self.loras = library;
        Ok(())
    }

    /// The textual-inversion embeddings prompts may name by file name; replaces the previous
    /// ones. An embedding whose vectors do not have the text encoder's width, or whose name is
    /// already a token, is refused naming it.
    pub fn set_embedding_library(&mut self, library: EmbeddingLibrary) -> Result<()> {
        let mut tokenizer = self.base_tokenizer.clone();
        let mut rows = Vec::new();
        let mut next = self.text_vocab_size as u32;
        for e in library.list() {
            if e.hidden_size() != self.text_hidden_size {
                return Err(PipelineError::Weights {
                    path: e.file.clone(),
                    message: format!(
                        "embedding {:?} has vectors of {} values; this text encoder takes {}",
                        e.name,
                        e.hidden_size(),
                        self.text_hidden_size
                    ),
                });
            }
            let n = e.num_vectors() as u32;
            tokenizer
                .add_word(&e.name, (next..next + n).collect())
                .map_err(|err| PipelineError::Weights {
                    path: e.file.clone(),
                    message: format!("embedding {:?}: {err}", e.name),
                })?;
            next += n;
            rows.push(&e.vectors);
        }
        self.embedding_vectors = if rows.is_empty() {
            None
        } else {
            Some(
                Tensor::cat(&rows, 0)?
                    .to_device(&self.device)?
                    .to_dtype(self.dtype)?,
            )
        };
        self.tokenizer = tokenizer;
        self.embeddings = library;
        Ok(())
    }

    pub fn embedding_library(&self) -> &EmbeddingLibrary {
        &self.embeddings
    }

    pub fn lora_library(&self) -> &LoraLibrary {
        &self.loras
    }

    /// Checks that the library's LoRA `name` fits this model (every layer has a weight of its
    /// shape): an error names the LoRA and the layer.
    pub fn check_lora(&self, name: &str) -> Result<()> {
        let info = self
            .loras
            .get(name)
            .ok_or_else(|| PipelineError::InvalidRequest(format!("unknown LoRA {name:?}")))?;
        crate::lora::check_fits(info, &self.lora_targets()?)
    }

    /// The resident modules' weights a LoRA may change.
    fn lora_targets(&self) -> Result<HashMap<Part, Vec<(String, Target<'_>)>>> {
        let not_resident = || {
            PipelineError::InvalidRequest(
                "LoRA needs the text encoder and UNet resident on the device (offload none); \
                 this model runs with its weights offloaded"
                    .into(),
            )
        };
        let unet = self.unet.resident().ok_or_else(not_resident)?;
        let text = self.text_encoder.resident().ok_or_else(not_resident)?;
        let mut targets = HashMap::new();
        targets.insert(Part::Unet, unet.lora_targets().ok_or_else(not_resident)?);
        targets.insert(Part::TextEncoder, text.lora_targets());
        Ok(targets)
    }

    /// Makes the resident weights those of `loras` now, as the next run asking for them would
    /// (an empty list writes the originals back); that run then starts without the merge. The
    /// bench times merging and restoring with it.
    pub fn prepare_loras(&self, loras: &[LoraWeight]) -> Result<()> {
        self.sync_loras(loras).map(drop)
    }

    /// Makes the resident weights those of `loras`: unchanged when the last run had the same,
    /// else the originals are written back and the new LoRAs merged.
    pub(super) fn sync_loras(
        &self,
        loras: &[LoraWeight],
    ) -> Result<std::sync::MutexGuard<'_, LoraState>> {
        let mut state = self.lora_state.lock().unwrap_or_else(|e| e.into_inner());
        let want: Vec<(String, f64)> = loras.iter().map(|l| (l.name.clone(), l.weight)).collect();
        if state.active() == want.as_slice() {
            return Ok(state);
        }
        state.restore()?;
        if want.is_empty() {
            return Ok(state);
        }
        let targets = self.lora_targets()?;
        if let Err(e) = state.apply(&self.loras, &want, &targets) {
            state.restore()?;
            return Err(e);
        }
        Ok(state)
    }
}
