//! An upscaler file's tensors by name: `.safetensors`, or a PyTorch pickle (`.pth`, `.pt`)
//! read by [`crate::ckpt`], which never runs the pickle. Canonicalized as spandrel's
//! `canonicalize_state_dict` does: the first dict under one of [`UNWRAP_KEYS`] is the weights
//! (a training checkpoint's `params_ema`, ...), a dict holding one dict is that dict, and a
//! prefix every name has (`module.` from `DataParallel`, `netG.`) is dropped.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::ckpt::{Checkpoint, Value};
use crate::{PipelineError, Result};

/// Every float tensor of the file, f32 on the CPU, by its (canonical) name.
pub fn read_state(path: &Path) -> Result<HashMap<String, Tensor>> {
    let is_safetensors = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
    let mut named = if is_safetensors {
        read_safetensors(path)?
    } else {
        read_pickle(path)?
    };
    for prefix in ["module.", "netG."] {
        if !named.is_empty() && named.iter().all(|(k, _)| k.starts_with(prefix)) {
            for (k, _) in named.iter_mut() {
                *k = k[prefix.len()..].to_string();
            }
        }
    }
    Ok(named.into_iter().collect())
}

/// spandrel's `unwrap_keys`, in its order.
const UNWRAP_KEYS: [&str; 7] = [
    "model_state_dict",
    "state_dict",
    "params_ema",
    "params-ema",
    "params",
    "model",
    "net",
];

fn bad(path: &Path, message: impl std::fmt::Display) -> PipelineError {
    PipelineError::Weights {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

/// The float dtype of a tensor; `None` for integer and bool ones (buffers such as a
/// transformer's `relative_position_index`, which none of the networks run here has), left
/// out so that such a file reaches the architecture detection and is named there.
fn dtype_of(dtype: safetensors::Dtype) -> Option<DType> {
    match dtype {
        safetensors::Dtype::F32 => Some(DType::F32),
        safetensors::Dtype::F16 => Some(DType::F16),
        safetensors::Dtype::BF16 => Some(DType::BF16),
        safetensors::Dtype::F64 => Some(DType::F64),
        _ => None,
    }
}

fn read_safetensors(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let bytes = std::fs::read(path).map_err(|e| PipelineError::io(path, e))?;
    let file = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| bad(path, format!("not a safetensors file: {e}")))?;
    let mut out = Vec::new();
    for (name, view) in file.tensors() {
        let Some(dtype) = dtype_of(view.dtype()) else {
            continue;
        };
        let t = Tensor::from_raw_buffer(view.data(), dtype, view.shape(), &Device::Cpu)?
            .to_dtype(DType::F32)?;
        out.push((name, t));
    }
    Ok(out)
}

fn read_pickle(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let ckpt = Checkpoint::open(path)?;
    let root = ckpt.root();
    let mut dict = UNWRAP_KEYS
        .iter()
        .find_map(|k| root.get(k).filter(|v| matches!(v, Value::Dict(_))))
        .unwrap_or(root);
    if let Value::Dict(items) = dict {
        if let [(_, single @ Value::Dict(_))] = items.as_slice() {
            dict = single;
        }
    }
    let Value::Dict(items) = dict else {
        return Err(bad(path, "the file does not hold a dict of tensors"));
    };
    let mut out = Vec::new();
    for (k, v) in items {
        let (Value::Str(name), Value::Tensor(t)) = (k, v) else {
            continue;
        };
        let Some(dtype) = dtype_of(t.dtype) else {
            continue;
        };
        let bytes = ckpt.read_tensor(t)?;
        let t =
            Tensor::from_raw_buffer(&bytes, dtype, &t.shape, &Device::Cpu)?.to_dtype(DType::F32)?;
        out.push((name.clone(), t));
    }
    Ok(out)
}
