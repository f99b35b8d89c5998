//! A VarBuilder backend that checks every tensor as the model code loads it.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use super::validate::{check_dtype, first_non_finite, non_finite};
use super::weights;
use crate::error::{PipelineError, Result};

/// A VarBuilder backend over safetensors files that checks, for every tensor the model code asks
/// for (i.e. every tensor its config implies), that it exists, has the asked shape, a floating
/// point dtype and finite sampled values, with errors naming the file and the tensor.
pub struct CheckedSafetensors {
    files: Vec<(PathBuf, crate::weights::SafetensorsFile)>,
    routing: HashMap<String, usize>,
}

impl CheckedSafetensors {
    pub fn new(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::new();
        let mut routing = HashMap::new();
        for (i, p) in paths.iter().enumerate() {
            crate::weights::prefetch(p);
            let st = crate::weights::SafetensorsFile::open(p).map_err(|e| weights(p, e))?;
            for name in st.names() {
                routing.insert(name, i);
            }
            files.push((p.clone(), st));
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
        let (path, st) = &self.files[i];
        let Some((view, _)) = st.view(name) else {
            candle_core::bail!(
                "bad weights in {}: tensor `{name}` is unreadable",
                path.display()
            );
        };
        if let Some(s) = want {
            // A transposed read is asked for `[in, out]` of a stored `[out, in]` (or
            // `[out, in, 1, 1]`); errors name the stored shape the config implies.
            let stored = crate::weights::matrix_dims(view.shape());
            let fits = match (transposed, s.dims()) {
                (false, dims) => view.shape() == dims,
                (true, &[cols, rows]) => stored == Some((rows, cols)),
                (true, _) => false,
            };
            if !fits {
                let implied = match (transposed, s.dims()) {
                    (true, &[cols, rows]) => {
                        let mut d = vec![rows, cols];
                        d.extend(view.shape().iter().skip(2));
                        d
                    }
                    (_, dims) => dims.to_vec(),
                };
                return Err(candle_core::Error::Msg(format!(
                    "bad weights in {}: tensor `{name}` has shape {:?}, the config implies {:?}",
                    path.display(),
                    view.shape(),
                    implied
                )));
            }
        }
        let msg = |e: PipelineError| candle_core::Error::Msg(e.to_string());
        check_dtype(path, name, view.dtype()).map_err(msg)?;
        let (t, bad, in_mapping) = if transposed {
            let bad = first_non_finite(view.dtype(), view.data());
            let t = crate::weights::load_view_transposed(&view, dtype, dev)?;
            (t, bad, false)
        } else {
            // Storage in the mapping where it can be; a copy looks at the samples in what it
            // just wrote (in cache), not in the mapping.
            st.load(name, dtype, dev)?
        };
        if let Some(i) = bad {
            return Err(msg(non_finite(path, name, i)));
        }
        if !in_mapping {
            // The copy (or upload) is done, so its pages can leave the resident set: loading
            // holds the weights once.
            st.release(view.data());
        }
        Ok(t)
    }
}

impl SimpleBackend for CheckedSafetensors {
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

/// A VarBuilder that validates each tensor as the model code loads it (see [`CheckedSafetensors`]).
pub fn checked_var_builder(
    paths: &[PathBuf],
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>> {
    let backend = CheckedSafetensors::new(paths)?;
    Ok(VarBuilder::from_backend(
        Box::new(backend),
        dtype,
        device.clone(),
    ))
}
