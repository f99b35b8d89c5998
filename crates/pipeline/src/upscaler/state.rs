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

/// Every float (and int64) tensor of the file, f32 on the CPU, by its (canonical) name.
pub fn read_state(path: &Path) -> Result<HashMap<String, Tensor>> {
    read_state_under(path, None)
}

/// [`read_state`], a pickle's weights taken from the dict under `under` where its top level
/// has one (AdelaiDepth's checkpoints keep the depth network's under `depth_model`, beside
/// their other networks').
pub fn read_state_under(path: &Path, under: Option<&str>) -> Result<HashMap<String, Tensor>> {
    let mut named = if is_safetensors(path) {
        read_safetensors(path)?
    } else {
        read_pickle(path, under)?
    };
    strip_common_prefix(&mut named);
    Ok(named.into_iter().collect())
}

/// The (canonical) names of the file's tensors, read without their data: a safetensors
/// file's header, a checkpoint's pickle.
pub fn read_names(path: &Path) -> Result<Vec<String>> {
    let mut named: Vec<(String, ())> = if is_safetensors(path) {
        safetensors_names(path)?
    } else {
        let ckpt = Checkpoint::open(path)?;
        pickle_tensors(&ckpt, None)?
            .into_iter()
            .map(|(k, _)| (k, ()))
            .collect()
    };
    strip_common_prefix(&mut named);
    Ok(named.into_iter().map(|(k, _)| k).collect())
}

fn is_safetensors(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"))
}

/// A prefix every name has (`module.` from `DataParallel`, `netG.`) dropped.
fn strip_common_prefix<T>(named: &mut [(String, T)]) {
    for prefix in ["module.", "netG."] {
        if !named.is_empty() && named.iter().all(|(k, _)| k.starts_with(prefix)) {
            for (k, _) in named.iter_mut() {
                *k = k[prefix.len()..].to_string();
            }
        }
    }
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

/// The state dict's tensor `key` of `file`, of `shape` when one is given; else an error naming
/// the file and the key (every architecture's loader reads its tensors through this, the
/// face restorers' too).
pub(crate) fn checked_tensor<'a>(
    file: &Path,
    state: &'a HashMap<String, Tensor>,
    key: &str,
    shape: Option<&[usize]>,
) -> Result<&'a Tensor> {
    let t = state
        .get(key)
        .ok_or_else(|| bad(file, format!("{key} is missing")))?;
    match shape {
        Some(shape) if t.dims() != shape => Err(bad(
            file,
            format!(
                "{key} has shape {:?}, the network needs {shape:?}",
                t.dims()
            ),
        )),
        _ => Ok(t),
    }
}

/// spandrel's `get_seq_len(state, prefix)`: one past the highest `prefix.N.` index.
pub(crate) fn seq_len(state: &HashMap<String, Tensor>, prefix: &str) -> usize {
    let prefix = format!("{prefix}.");
    state
        .keys()
        .filter_map(|k| {
            k.strip_prefix(&prefix)?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .max()
        .map_or(0, |n| n + 1)
}

fn bad(path: &Path, message: impl std::fmt::Display) -> PipelineError {
    PipelineError::Weights {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

/// The dtype a tensor is read in: the float ones, and int64 (the index buffers of a
/// transformer such as SwinIR's `relative_position_index`, whose presence its detection
/// asks for; read as f32, which holds such indices exactly). `None` for the others, left out.
fn dtype_of(dtype: safetensors::Dtype) -> Option<DType> {
    match dtype {
        safetensors::Dtype::F32 => Some(DType::F32),
        safetensors::Dtype::F16 => Some(DType::F16),
        safetensors::Dtype::BF16 => Some(DType::BF16),
        safetensors::Dtype::F64 => Some(DType::F64),
        safetensors::Dtype::I64 => Some(DType::I64),
        _ => None,
    }
}

/// A safetensors file's tensor names, from its header alone.
fn safetensors_names(path: &Path) -> Result<Vec<(String, ())>> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(|e| PipelineError::io(path, e))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .map_err(|e| bad(path, format!("not a safetensors file: {e}")))?;
    let len = u64::from_le_bytes(len);
    if len > 100 << 20 {
        return Err(bad(path, "not a safetensors file: a header of over 100 MB"));
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header)
        .map_err(|e| bad(path, format!("not a safetensors file: {e}")))?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| bad(path, format!("not a safetensors file: {e}")))?;
    Ok(header
        .into_iter()
        .filter(|(k, _)| k != "__metadata__")
        .map(|(k, _)| (k, ()))
        .collect())
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

/// The checkpoint's weights dict (the one under `under` where given and there), unwrapped as
/// spandrel unwraps it, as (name, tensor).
fn pickle_tensors(
    ckpt: &Checkpoint,
    under: Option<&str>,
) -> Result<Vec<(String, crate::ckpt::TensorRef)>> {
    let path = ckpt.path();
    let root = ckpt.root();
    let mut dict = under
        .into_iter()
        .chain(UNWRAP_KEYS)
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
    Ok(items
        .iter()
        .filter_map(|(k, v)| match (k, v) {
            (Value::Str(name), Value::Tensor(t)) => Some((name.clone(), t.clone())),
            _ => None,
        })
        .collect())
}

fn read_pickle(path: &Path, under: Option<&str>) -> Result<Vec<(String, Tensor)>> {
    let ckpt = Checkpoint::open(path)?;
    let mut out = Vec::new();
    for (name, t) in pickle_tensors(&ckpt, under)? {
        let Some(dtype) = dtype_of(t.dtype) else {
            continue;
        };
        let bytes = ckpt.read_tensor(&t)?;
        let t =
            Tensor::from_raw_buffer(&bytes, dtype, &t.shape, &Device::Cpu)?.to_dtype(DType::F32)?;
        out.push((name, t));
    }
    Ok(out)
}
