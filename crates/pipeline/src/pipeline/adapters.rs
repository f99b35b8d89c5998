//! Adapters that change a loaded model per request: LoRA libraries (merged into the resident
//! weights) and textual-inversion embeddings (extra tokenizer words).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use candle_core::Tensor;

use super::{LoraWeight, StableDiffusion};
use crate::embeddings::EmbeddingLibrary;
use crate::lora::{
    compute_deltas, merge_deltas, shapes_of, Delta, Deltas, LoraKey, LoraLibrary, LoraState, Part,
    Target, TargetShapes,
};
use crate::{PipelineError, Result};

impl StableDiffusion {
    /// The LoRA files requests may name; replaces the previous library (and unmerges its LoRAs).
    pub fn set_lora_library(&mut self, library: LoraLibrary) -> Result<()> {
        self.lora_state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .restore()?;
        self.set_build_deltas(None);
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

    /// Why `set_embedding_library` would refuse embedding `e`, if it would: vectors of another
    /// width than the text encoder's, or a name the vocabulary already has.
    pub fn embedding_problem(&self, e: &crate::embeddings::Embedding) -> Option<String> {
        self.embedding_problem_for(e, self.text_hidden_size)
    }

    /// [`Self::embedding_problem`] as a model whose text encoder is `text_hidden_size` wide
    /// would judge it (with this model's vocabulary: SD 1.x models share CLIP's).
    pub fn embedding_problem_for(
        &self,
        e: &crate::embeddings::Embedding,
        text_hidden_size: usize,
    ) -> Option<String> {
        if e.hidden_size() != text_hidden_size {
            return Some(format!(
                "vectors of {} values; this text encoder takes {text_hidden_size}",
                e.hidden_size(),
            ));
        }
        self.base_tokenizer
            .token_id(&e.name)
            .map(|_| format!("{:?} is already a token of the vocabulary", e.name))
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
        crate::lora::check_fits(info, &self.lora_target_shapes()?)
    }

    /// The weights a LoRA may change in the parts held between runs: the resident UNet (under
    /// sequential offload, its weights in host memory) and the resident text encoder. An
    /// offloaded part is merged as it is built for its stage ([`Self::merge_into_built`]).
    fn lora_targets(&self) -> HashMap<Part, Vec<(String, Target<'_>)>> {
        let mut targets = HashMap::new();
        if let Some(unet) = self.unet.resident() {
            targets.insert(Part::Unet, unet.lora_targets());
        }
        if let Some(text) = self.text_encoder.resident() {
            targets.insert(Part::TextEncoder, text.lora_targets());
        }
        targets
    }

    /// Paths and dims of every part's LoRA targets: an offloaded part's as its last build listed
    /// them, or from a build made now (once: they never change).
    fn lora_target_shapes(&self) -> Result<TargetShapes> {
        let mut shapes: TargetShapes = self
            .lora_targets()
            .iter()
            .map(|(part, list)| (*part, shapes_of(list)))
            .collect();
        for part in [Part::Unet, Part::TextEncoder] {
            if shapes.contains_key(&part) {
                continue;
            }
            let known = self.lora_shapes.lock().unwrap_or_else(|e| e.into_inner());
            let list = match known.get(&part) {
                Some(list) => list.clone(),
                None => {
                    drop(known);
                    let list = match part {
                        Part::Unet => shapes_of(&self.unet.get(&self.device)?.lora_targets()),
                        Part::TextEncoder => {
                            shapes_of(&self.text_encoder.get(&self.device)?.lora_targets())
                        }
                    };
                    self.lora_shapes
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(part, list.clone());
                    list
                }
            };
            shapes.insert(part, list);
        }
        Ok(shapes)
    }

    /// A part built now for one stage (offloaded): the deltas of the last run's LoRAs merged
    /// into it (no originals kept: it is dropped after the stage), and its targets remembered
    /// for checks.
    pub(super) fn merge_into_built(
        &self,
        part: Part,
        targets: Vec<(String, Target<'_>)>,
    ) -> Result<()> {
        self.lora_shapes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(part)
            .or_insert_with(|| shapes_of(&targets));
        let held = self.build_deltas.read().unwrap_or_else(|e| e.into_inner());
        let Some(held) = held.as_ref() else {
            return Ok(());
        };
        let (loras, count) = (&held.loras, &self.lora_counters);
        match held.parts.get(&part) {
            None => Ok(()), // the LoRAs change no weight of this part
            Some(Some(deltas)) => {
                count.builds_from_kept.fetch_add(1, Relaxed);
                merge_deltas(
                    loras,
                    part,
                    deltas.iter().map(|(i, d)| (*i, d)),
                    &targets,
                    None,
                )
            }
            Some(None) => {
                // Past the limit of what is kept: computed again for this build.
                count.builds_recomputed.fetch_add(1, Relaxed);
                let shapes = TargetShapes::from([(part, shapes_of(&targets))]);
                let deltas = compute_deltas(&self.loras, loras, &shapes, self.dtype)?;
                let deltas = deltas.into_iter().map(|((_, i), d)| (i, d));
                merge_deltas(loras, part, deltas, &targets, None)
            }
        }
    }

    /// The deltas offloaded parts take when built (those of the last run's LoRAs).
    pub(super) fn set_build_deltas(&self, deltas: Option<BuildDeltas>) {
        *self.build_deltas.write().unwrap_or_else(|e| e.into_inner()) = deltas;
    }

    /// Makes the resident weights those of `loras` now, as the next run asking for them would
    /// (an empty list writes the originals back); that run then starts without the merge. The
    /// bench times merging and restoring with it.
    pub fn prepare_loras(&self, loras: &[LoraWeight]) -> Result<()> {
        self.sync_loras(loras).map(drop)
    }

    /// Makes the resident weights those of `loras`: unchanged when the last run had the same,
    /// else the originals are written back and the new LoRAs merged. Offloaded parts take them
    /// when built for their stage, from deltas computed here: every check that needs no base
    /// weight (names, shapes, values that are not finite, deltas beyond the weights' dtype) runs
    /// before the run builds or runs anything. Only a merged weight's overflow (base + delta past
    /// the dtype's range) needs the weight, and so is found when an offloaded part is built.
    pub(super) fn sync_loras(
        &self,
        loras: &[LoraWeight],
    ) -> Result<std::sync::MutexGuard<'_, LoraState>> {
        let mut state = self.lora_state.lock().unwrap_or_else(|e| e.into_inner());
        let want: Vec<(String, f64)> = loras.iter().map(|l| (l.name.clone(), l.weight)).collect();
        let key = want
            .iter()
            .map(|(name, weight)| LoraKey::of(&self.loras, name, *weight))
            .collect::<Result<Vec<_>>>()?;
        if state.active() == key.as_slice() {
            return Ok(state);
        }
        state.restore()?;
        self.set_build_deltas(None);
        if want.is_empty() {
            return Ok(state);
        }
        // Every file against every part first (shapes from the headers alone).
        let shapes = self.lora_target_shapes()?;
        for (name, _) in &want {
            let info = self
                .loras
                .get(name)
                .ok_or_else(|| PipelineError::InvalidRequest(format!("unknown LoRA {name:?}")))?;
            crate::lora::check_fits(info, &shapes)?;
        }
        let mut by_part = deltas_by_part(compute_deltas(&self.loras, &want, &shapes, self.dtype)?);
        self.lora_counters.sets_computed.fetch_add(1, Relaxed);
        for (part, targets) in &self.lora_targets() {
            let Some(deltas) = by_part.remove(part) else {
                continue;
            };
            if let Err(e) = state.merge(&want, *part, deltas, targets) {
                state.restore()?;
                return Err(e);
            }
        }
        // What is left is for the offloaded parts.
        self.set_build_deltas(Some(BuildDeltas::keep(
            want,
            by_part,
            self.lora_delta_limit,
        )));
        state.set_active(key);
        Ok(state)
    }

    /// The most bytes of LoRA deltas kept for offloaded parts between runs
    /// ([`DEFAULT_LORA_DELTA_LIMIT`] unless set); takes effect at the next change of LoRAs.
    pub fn set_lora_delta_limit(&mut self, bytes: usize) {
        self.lora_delta_limit = bytes;
    }

    /// What the LoRA deltas of offloaded parts did since the model was loaded.
    pub fn lora_delta_stats(&self) -> LoraDeltaStats {
        let count = &self.lora_counters;
        LoraDeltaStats {
            sets_computed: count.sets_computed.load(Relaxed),
            builds_from_kept: count.builds_from_kept.load(Relaxed),
            builds_recomputed: count.builds_recomputed.load(Relaxed),
            kept_bytes: self
                .build_deltas
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .map_or(0, BuildDeltas::bytes),
        }
    }
}

/// What the deltas of offloaded parts are kept to at most, by default: 1 GiB. A set of LoRAs on
/// every attention and feed-forward linear of SD 1.5 makes 509 MiB of UNet deltas and 162 MiB of
/// text encoder deltas in f16 (the GPU's dtype; twice that in f32): all kept, in host memory,
/// which model offload leaves to the weights' files; as many bytes as the copies the resident
/// path keeps on the device to restore its weights. A set past it (LoCon's convolutions too)
/// keeps the UNet's deltas only if they fit, and the other part's are computed at each build.
pub const DEFAULT_LORA_DELTA_LIMIT: usize = 1 << 30;

/// What the LoRA deltas of offloaded parts did (see [`StableDiffusion::lora_delta_stats`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LoraDeltaStats {
    /// LoRA sets whose deltas were computed (once per change of a run's LoRAs).
    pub sets_computed: usize,
    /// Builds of an offloaded part that merged the deltas kept for it.
    pub builds_from_kept: usize,
    /// Builds of an offloaded part that computed its deltas again (past the limit).
    pub builds_recomputed: usize,
    /// Bytes of deltas kept now.
    pub kept_bytes: usize,
}

#[derive(Default)]
pub(super) struct LoraCounters {
    sets_computed: AtomicUsize,
    builds_from_kept: AtomicUsize,
    builds_recomputed: AtomicUsize,
}

/// The deltas of the last run's LoRAs for the offloaded parts, merged into each as it is built
/// for its stage; kept until a run asks for other LoRAs (one set at a time).
pub(super) struct BuildDeltas {
    loras: Vec<(String, f64)>,
    /// By part, then target index; a part the LoRAs do not change is absent; `None`: past the
    /// limit, computed again at each build.
    parts: HashMap<Part, Option<BTreeMap<usize, Delta>>>,
}

impl BuildDeltas {
    /// Keeps the parts' deltas while they fit in `limit` bytes, the UNet's first (the larger,
    /// and the costlier to compute again).
    fn keep(
        loras: Vec<(String, f64)>,
        mut by_part: HashMap<Part, BTreeMap<usize, Delta>>,
        limit: usize,
    ) -> Self {
        let mut left = limit;
        let mut parts = HashMap::new();
        for part in [Part::Unet, Part::TextEncoder] {
            let Some(deltas) = by_part.remove(&part) else {
                continue;
            };
            let bytes = bytes_of(deltas.values());
            let kept = (bytes <= left).then(|| {
                left -= bytes;
                deltas
            });
            parts.insert(part, kept);
        }
        Self { loras, parts }
    }

    fn bytes(&self) -> usize {
        bytes_of(self.parts.values().flatten().flat_map(|d| d.values()))
    }
}

fn bytes_of<'a>(deltas: impl Iterator<Item = &'a Delta>) -> usize {
    deltas.map(Delta::bytes).sum()
}

fn deltas_by_part(deltas: Deltas) -> HashMap<Part, BTreeMap<usize, Delta>> {
    let mut by_part: HashMap<Part, BTreeMap<usize, Delta>> = HashMap::new();
    for ((part, index), delta) in deltas {
        by_part.entry(part).or_default().insert(index, delta);
    }
    by_part
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The targets read from a folder's headers are the built model's, path for path and dim
    /// for dim, whatever the architecture (so a LoRA fits an unloaded folder exactly when it
    /// would fit it loaded).
    #[test]
    fn a_folder_s_headers_give_the_built_model_s_lora_targets() {
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        // tiny-inpaint-bin keeps its weights as pickles (`.bin`).
        for model in [
            "tiny-a",
            "tiny-b",
            "tiny-inpaint",
            "tiny-inpaint-bin",
            "tiny-lcm",
        ] {
            let dir = fixtures.join(model);
            let sd =
                StableDiffusion::load(&dir, &candle_core::Device::Cpu, candle_core::DType::F32)
                    .unwrap();
            let mut built = sd.lora_target_shapes().unwrap();
            for list in built.values_mut() {
                list.sort();
            }
            let read = crate::lora::target_shapes_of_folder(&dir).unwrap();
            assert_eq!(read, built, "{model}");
            assert!(
                built[&Part::Unet].iter().any(|(_, d)| d.len() == 4),
                "{model}"
            );
            // And each LoRA fixture fits the folder exactly when it fits the loaded model,
            // refused with the same words (the LoRA, its first layer that does not fit).
            // LyCORIS types too (the last two are types this server refuses, by name).
            let files = [
                "loras/ink_kohya",
                "loras/soft_peft",
                "loras/te_kohya",
                "lycoris/loha",
                "lycoris/lokr",
                "lycoris/full",
                "lycoris/mixed",
                "lycoris/dora",
                "lycoris/ia3",
                "lycoris/glora",
                "lycoris/oft",
                "lycoris/boft",
                "lycoris/oft_diag",
                "lycoris/norm",
                "lycoris/norm_half",
                "lycoris/bias",
            ];
            for (i, file) in files.into_iter().enumerate() {
                let path = fixtures.join(format!("adapters/{file}.safetensors"));
                let name = file.split_once('/').unwrap().1;
                let info = crate::lora::LoraInfo::read(&path).unwrap();
                let loaded = match crate::lora::check_fits(&info, &built) {
                    Ok(()) => None,
                    Err(PipelineError::InvalidRequest(why)) => Some(why),
                    Err(e) => panic!("{e}"),
                };
                let unloaded = crate::lora::fit_problem_in_model(&info, &dir).unwrap();
                assert_eq!(unloaded, loaded, "{file} on {model}");
                // The fixtures were made for tiny-a; tiny-b has other shapes everywhere.
                match model {
                    "tiny-a" if i < 14 => assert_eq!(loaded, None, "{file}"),
                    "tiny-a" | "tiny-b" => {
                        assert!(loaded.is_some_and(|w| w.contains(name)), "{file}")
                    }
                    _ => {}
                }
                // tiny-a's single files (LDM names) read as conversion reads them: the same
                // targets, the same verdicts.
                if model == "tiny-a" {
                    for single in ["tiny-a.safetensors", "tiny-a-fp16.ckpt"] {
                        let p = fixtures.join("single-file").join(single);
                        let shapes = crate::single_file::SingleFileShapes::read(&p).unwrap();
                        let read = crate::lora::target_shapes_of_single_file(&shapes);
                        assert_eq!(read, built, "{single}");
                        let fit = crate::lora::fit_problem_in_model(&info, &p).unwrap();
                        assert_eq!(fit, unloaded, "{file} on {single}");
                    }
                }
            }
        }
    }
}
