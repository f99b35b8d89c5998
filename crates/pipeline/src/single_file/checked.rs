//! A VarBuilder backend that checks every tensor as the model code loads it, from safetensors
//! or (never executed) PyTorch pickle weight files.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use super::validate::{check_dtype, first_non_finite, non_finite};
use super::weights;
use crate::ckpt::{Checkpoint, TensorRef};
use crate::error::{PipelineError, Result};

/// A VarBuilder backend over weight files (safetensors, or PyTorch pickles such as diffusers'
/// `.bin` read by [`crate::ckpt`], which never runs their code) that checks, for every tensor
/// the model code asks for (i.e. every tensor its config implies), that it exists, has the
/// asked shape, a floating point dtype and finite sampled values, with errors naming the file
/// and the tensor.
pub struct CheckedWeights {
    files: Vec<(PathBuf, WeightFile)>,
    routing: HashMap<String, usize>,
}

enum WeightFile {
    /// Memory-mapped; tensors may live in the mapping or are copied out of it.
    Safetensors(crate::weights::SafetensorsFile),
    /// A pickle cannot be mapped as tensors: a contiguous f32 tensor kept as f32 on the CPU is
    /// read straight into its own memory, any other through one tensor-sized buffer that is
    /// dropped once converted (the file's pages go to the page cache, not to this process), so
    /// a load holds the weights plus about one tensor, never the whole file twice.
    Pickle {
        checkpoint: Checkpoint,
        tensors: HashMap<String, TensorRef>,
    },
}

/// Whether a weight file is read as safetensors (by its name); anything else is a pickle.
fn is_safetensors(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"))
}

impl CheckedWeights {
    pub fn new(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::new();
        let mut routing = HashMap::new();
        for (i, p) in paths.iter().enumerate() {
            crate::weights::prefetch(p);
            let file = if is_safetensors(p) {
                let st = crate::weights::SafetensorsFile::open(p).map_err(|e| weights(p, e))?;
                WeightFile::Safetensors(st)
            } else {
                // Refuses any pickle global it does not model, naming it, before reading
                // anything else.
                let checkpoint = Checkpoint::open(p)?;
                let tensors = checkpoint.state_dict()?.into_iter().collect();
                WeightFile::Pickle {
                    checkpoint,
                    tensors,
                }
            };
            let names: Vec<String> = match &file {
                WeightFile::Safetensors(st) => st.names(),
                WeightFile::Pickle { tensors, .. } => tensors.keys().cloned().collect(),
            };
            for name in names {
                routing.insert(name, i);
            }
            files.push((p.clone(), file));
        }
        Ok(Self { files, routing })
    }

    fn files_list(&self) -> String {
        self.files
            .iter()
            .map(|(p, _)| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn fetch(
        &self,
        name: &str,
        want: Option<&Shape>,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        // `X^T`: the transpose of the matrix `X`, written transposed from the file.
        let (name, transposed) = match name.strip_suffix(crate::weights::TRANSPOSED) {
            Some(base) => (base, true),
            None => (name, false),
        };
        let Some(&i) = self.routing.get(name) else {
            let implied = want
                .map(|s| format!(" (the config implies shape {:?})", s.dims()))
                .unwrap_or_default();
            return Err(candle_core::Error::Msg(format!(
                "bad weights in {}: tensor `{name}` is missing{implied}",
                self.files_list()
            )));
        };
        let (path, file) = &self.files[i];
        let stored = match file {
            WeightFile::Safetensors(st) => match st.view(name) {
                Some((view, _)) => (view.shape().to_vec(), view.dtype()),
                None => candle_core::bail!(
                    "bad weights in {}: tensor `{name}` is unreadable",
                    path.display()
                ),
            },
            WeightFile::Pickle { tensors, .. } => {
                let t = &tensors[name];
                (t.shape.clone(), t.dtype)
            }
        };
        let (shape, stored_dtype) = (&stored.0[..], stored.1);
        if let Some(s) = want {
            // A transposed read is asked for `[in, out]` of a stored `[out, in]` (or
            // `[out, in, 1, 1]`); errors name the stored shape the config implies.
            let matrix = crate::weights::matrix_dims(shape);
            let fits = match (transposed, s.dims()) {
                (false, dims) => shape == dims,
                (true, &[cols, rows]) => matrix == Some((rows, cols)),
                (true, _) => false,
            };
            if !fits {
                let implied = match (transposed, s.dims()) {
                    (true, &[cols, rows]) => {
                        let mut d = vec![rows, cols];
                        d.extend(shape.iter().skip(2));
                        d
                    }
                    (_, dims) => dims.to_vec(),
                };
                return Err(candle_core::Error::Msg(format!(
                    "bad weights in {}: tensor `{name}` has shape {:?}, the config implies {:?}",
                    path.display(),
                    shape,
                    implied
                )));
            }
        }
        let msg = |e: PipelineError| candle_core::Error::Msg(e.to_string());
        check_dtype(path, name, stored_dtype).map_err(msg)?;
        let (t, bad) = match file {
            WeightFile::Safetensors(st) => {
                let (view, _) = st.view(name).expect("looked up above");
                let (t, bad, in_mapping) = if transposed {
                    let bad = first_non_finite(view.dtype(), view.data());
                    let t = crate::weights::load_view_transposed(&view, dtype, dev)?;
                    (t, bad, false)
                } else {
                    // Storage in the mapping where it can be; a copy looks at the samples in
                    // what it just wrote (in cache), not in the mapping.
                    st.load(name, dtype, dev)?
                };
                if !in_mapping {
                    // The copy (or upload) is done, so its pages can leave the resident set:
                    // loading holds the weights once.
                    st.release(view.data());
                }
                (t, bad)
            }
            WeightFile::Pickle {
                checkpoint,
                tensors,
            } => {
                let tensor = &tensors[name];
                let f32_kept = !transposed
                    && dev.is_cpu()
                    && stored_dtype == safetensors::Dtype::F32
                    && dtype == DType::F32
                    && cfg!(target_endian = "little");
                if let (true, Some((at, len))) =
                    (f32_kept, checkpoint.contiguous_bytes(tensor).map_err(msg)?)
                {
                    // Read straight into the tensor's own memory: held once, copied once.
                    let v = crate::weights::read_f32_at(path, at, len / 4)
                        .map_err(|e| msg(PipelineError::io(path, e)))?;
                    // SAFETY: the f32s' bytes, read-only, while `v` is alive.
                    let bytes = unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), len) };
                    let bad = first_non_finite(stored_dtype, bytes);
                    if let Some(i) = bad {
                        return Err(msg(non_finite(path, name, i)));
                    }
                    return Tensor::from_vec(v, shape, dev);
                }
                // One tensor's bytes, dropped as soon as it is converted.
                let raw = checkpoint.read_tensor(tensor).map_err(msg)?;
                let view = safetensors::tensor::TensorView::new(stored_dtype, shape.to_vec(), &raw)
                    .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
                if transposed {
                    let bad = first_non_finite(stored_dtype, &raw);
                    (
                        crate::weights::load_view_transposed(&view, dtype, dev)?,
                        bad,
                    )
                } else {
                    crate::weights::load_view_sampled(&view, dtype, dev)?
                }
            }
        };
        if let Some(i) = bad {
            return Err(msg(non_finite(path, name, i)));
        }
        Ok(t)
    }
}

impl SimpleBackend for CheckedWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.fetch(name, Some(&s), dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.fetch(name, None, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        let base = name
            .strip_suffix(crate::weights::TRANSPOSED)
            .unwrap_or(name);
        self.routing.contains_key(base)
    }
}

/// A VarBuilder that validates each tensor as the model code loads it (see [`CheckedWeights`]).
pub fn checked_var_builder(
    paths: &[PathBuf],
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>> {
    let backend = CheckedWeights::new(paths)?;
    Ok(VarBuilder::from_backend(
        Box::new(backend),
        dtype,
        device.clone(),
    ))
}
