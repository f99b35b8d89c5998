//! Textual-inversion embeddings (`EMBEDDINGS_DIR`, see README): A1111 `.pt` files
//! (`string_to_param`, read with the code-free pickle reader) and `.safetensors` files
//! (`emb_params`). A file's name used as a word in a prompt stands for its vectors, as diffusers'
//! `load_textual_inversion` makes it: the name is an added token of the tokenizer, and each of
//! its ids is replaced by ids past the vocabulary that the text encoder reads from the vectors.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::{PipelineError, Result};

/// One embedding file.
#[derive(Debug, Clone)]
pub struct Embedding {
    pub name: String,
    pub file: PathBuf,
    /// `a1111_pt` or `safetensors`.
    pub format: &'static str,
    /// `[vectors, hidden]`, f32 on the CPU.
    pub vectors: Tensor,
    /// What an A1111 `.pt` says of its training (`step`, `sd_checkpoint`, `sd_checkpoint_name`);
    /// `None` when it does not say (and for `.safetensors` files).
    pub step: Option<i64>,
    pub sd_checkpoint: Option<String>,
    pub sd_checkpoint_name: Option<String>,
}

impl Embedding {
    pub fn num_vectors(&self) -> usize {
        self.vectors.dim(0).unwrap_or(0)
    }

    pub fn hidden_size(&self) -> usize {
        self.vectors.dim(1).unwrap_or(0)
    }

    /// Reads a `.pt` or `.safetensors` embedding.
    pub fn read(path: &Path) -> Result<Self> {
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .ok_or_else(|| PipelineError::config(path, "embedding file name is not UTF-8"))?
            .to_owned();
        let bad = |m: &str| PipelineError::Weights {
            path: path.to_path_buf(),
            message: m.to_owned(),
        };
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        let mut training = (None, None, None);
        let (format, vectors) = if ext == "safetensors" {
            let tensors = candle_core::safetensors::load(path, &Device::Cpu)?;
            let t = tensors
                .get("emb_params")
                .or_else(|| {
                    (tensors.len() == 1)
                        .then(|| tensors.values().next())
                        .flatten()
                })
                .ok_or_else(|| bad("no emb_params tensor"))?;
            ("safetensors", t.clone())
        } else {
            let ckpt = crate::ckpt::Checkpoint::open(path)?;
            let param = ckpt
                .root()
                .get("string_to_param")
                .ok_or_else(|| bad("no string_to_param (not an A1111 embedding)"))?;
            let crate::ckpt::Value::Dict(items) = param else {
                return Err(bad("string_to_param is not a dict"));
            };
            let Some((_, crate::ckpt::Value::Tensor(t))) = items.first() else {
                return Err(bad("string_to_param holds no tensor"));
            };
            let dtype = match t.dtype {
                safetensors::Dtype::F32 => DType::F32,
                safetensors::Dtype::F16 => DType::F16,
                safetensors::Dtype::BF16 => DType::BF16,
                other => return Err(bad(&format!("vectors of dtype {other:?}"))),
            };
            let bytes = ckpt.read_tensor(t)?;
            let v = Tensor::from_raw_buffer(&bytes, dtype, &t.shape, &Device::Cpu)?;
            let text = |key: &str| match ckpt.root().get(key) {
                Some(crate::ckpt::Value::Str(s)) => Some(s.clone()),
                _ => None,
            };
            let step = match ckpt.root().get("step") {
                Some(crate::ckpt::Value::Int(n)) => Some(*n),
                _ => None,
            };
            training = (step, text("sd_checkpoint"), text("sd_checkpoint_name"));
            ("a1111_pt", v)
        };
        let vectors = match vectors.rank() {
            1 => vectors.unsqueeze(0)?,
            2 => vectors,
            _ => return Err(bad("vectors are not [n, hidden]")),
        }
        .to_dtype(DType::F32)?;
        if vectors.dim(0)? == 0 {
            return Err(bad("no vectors"));
        }
        // A NaN or infinity would reach every image whose prompt names the embedding.
        if !vectors.abs()?.sum_all()?.to_scalar::<f32>()?.is_finite() {
            return Err(bad("vectors are not finite (NaN or infinity)"));
        }
        Ok(Self {
            name,
            file: path.to_path_buf(),
            format,
            vectors,
            step: training.0,
            sd_checkpoint: training.1,
            sd_checkpoint_name: training.2,
        })
    }
}

/// The embeddings of a folder, by name (file stem).
#[derive(Debug, Clone, Default)]
pub struct EmbeddingLibrary {
    entries: BTreeMap<String, Embedding>,
}

impl EmbeddingLibrary {
    /// Reads every `*.pt` and `*.safetensors` in `dir`; a file that is not an embedding fails
    /// the scan, naming it.
    pub fn scan(dir: &Path) -> Result<Self> {
        let (library, failed) = Self::scan_each(dir)?;
        match failed.into_iter().next() {
            Some((_, e)) => Err(e),
            None => Ok(library),
        }
    }

    /// Reads every `*.pt` and `*.safetensors` in `dir`: the library of those that are
    /// embeddings, and each other file with why it is not (a file being written, a broken
    /// one). Only a folder that cannot be listed is an error.
    pub fn scan_each(dir: &Path) -> Result<(Self, Vec<(PathBuf, PipelineError)>)> {
        let mut entries = BTreeMap::new();
        let mut failed = Vec::new();
        for path in crate::weights::files_with_extension(dir, &["pt", "bin", "safetensors"])? {
            let path = path?;
            match Embedding::read(&path) {
                Ok(e) => {
                    entries.insert(e.name.clone(), e);
                }
                Err(e) => failed.push((path, e)),
            }
        }
        failed.sort_by(|a, b| a.0.cmp(&b.0));
        Ok((Self { entries }, failed))
    }

    /// Takes `name` out of the library (one that does not fit the model).
    pub fn remove(&mut self, name: &str) -> Option<Embedding> {
        self.entries.remove(name)
    }

    pub fn list(&self) -> impl Iterator<Item = &Embedding> {
        self.entries.values()
    }

    pub fn get(&self, name: &str) -> Option<&Embedding> {
        self.entries.get(name)
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}
