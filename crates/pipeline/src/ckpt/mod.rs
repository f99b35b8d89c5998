//! A reader for PyTorch pickle checkpoints (`.ckpt`, `.pt`, `.pth`, `.bin`) that builds only
//! tensors and plain containers and never runs code.
//!
//! A pickle is a small stack-machine program; Python's `pickle.load` imports and calls whatever
//! `GLOBAL` + `REDUCE` name, which is how a `.ckpt` can run `os.system`. This module interprets
//! the opcodes itself: dicts, lists, tuples, strings, numbers and the handful of torch
//! rebuild functions (`torch._utils._rebuild_tensor_v2`, `torch.*Storage`, `collections.OrderedDict`)
//! are modelled as data; any other global is refused with an error naming it, before anything
//! else is read. Nothing is ever executed, in this process or another.
//!
//! Formats: the zip format of `torch.save` (torch >= 1.6: `<name>/data.pkl` plus one stored entry
//! `<name>/data/<key>` per storage) and the legacy format (`_use_new_zipfile_serialization=False`:
//! magic pickle, protocol pickle, sys-info pickle, the object pickle, the storage-key list, then
//! each storage as an 8-byte element count and its raw bytes). Only little-endian files are read.
//!
//! Files: `zip` and `legacy` (the two file formats), `pickle` (the interpreter); this one holds
//! the values, the opened checkpoint and the tensor reading.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use safetensors::Dtype;

use crate::error::{PipelineError, Result};

mod legacy;
mod pickle;
mod zip;

/// A plain value from a checkpoint. Tensors are references into the file; read them with
/// [`Checkpoint::read_tensor`].
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer that does not fit in i64 (pickle `LONG1` up to 16 bytes).
    BigInt(i128),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    List(Vec<Value>),
    Tuple(Vec<Value>),
    /// Insertion-ordered, as Python dicts are. Keys are usually `Str`.
    Dict(Vec<(Value, Value)>),
    Tensor(TensorRef),
}

impl Value {
    /// The value under a string key of a dict.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Dict(items) => items
                .iter()
                .find(|(k, _)| matches!(k, Value::Str(s) if s == key))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    /// JSON rendering for logs and tests; a tensor becomes `{"tensor": dtype, "shape": [..]}`.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match self {
            Value::None => J::Null,
            Value::Bool(b) => J::Bool(*b),
            Value::Int(i) => J::from(*i),
            Value::BigInt(i) => J::String(i.to_string()),
            Value::Float(f) => J::from(*f),
            Value::Str(s) => J::String(s.clone()),
            Value::Bytes(b) => J::Array(b.iter().map(|x| J::from(*x)).collect()),
            Value::List(v) | Value::Tuple(v) => J::Array(v.iter().map(Value::to_json).collect()),
            Value::Dict(items) => J::Object(
                items
                    .iter()
                    .map(|(k, v)| {
                        let key = match k {
                            Value::Str(s) => s.clone(),
                            other => other.to_json().to_string(),
                        };
                        (key, v.to_json())
                    })
                    .collect(),
            ),
            Value::Tensor(t) => {
                serde_json::json!({"tensor": format!("{:?}", t.dtype), "shape": t.shape})
            }
        }
    }
}

/// A tensor as the pickle describes it: a strided view into one storage.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRef {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Strides in elements.
    pub stride: Vec<usize>,
    /// Offset into the storage, in elements (includes a legacy storage view's offset).
    pub offset: usize,
    storage_key: String,
    /// Number of elements the pickle declares for the storage.
    storage_numel: usize,
}

/// An opened checkpoint: the unpickled object and where each storage's bytes are.
pub struct Checkpoint {
    path: PathBuf,
    root: Value,
    /// storage key -> (byte offset in the file, byte length)
    storages: HashMap<String, (u64, u64)>,
}

fn err(path: &Path, message: impl std::fmt::Display) -> PipelineError {
    PipelineError::Weights {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

impl Checkpoint {
    /// Parses the file's pickle (refusing any code reference) and indexes its storages.
    /// Tensor bytes are read later, one tensor at a time.
    pub fn open(path: &Path) -> Result<Self> {
        let mut file = File::open(path).map_err(|e| PipelineError::io(path, e))?;
        let mut magic = [0u8; 4];
        let n = read_up_to(&mut file, &mut magic).map_err(|e| PipelineError::io(path, e))?;
        if n == 4 && &magic == b"PK\x03\x04" {
            Self::open_zip(path, file)
        } else if n >= 1 && magic[0] == 0x80 {
            Self::open_legacy(path, file)
        } else {
            Err(err(
                path,
                "not a PyTorch checkpoint (neither a zip archive nor a pickle)",
            ))
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The whole unpickled object (usually a dict).
    pub fn root(&self) -> &Value {
        &self.root
    }

    /// The model weights: the dict under `"state_dict"` when there is one (Lightning / CompVis
    /// checkpoints), else the top-level dict. Non-tensor entries are skipped.
    pub fn state_dict(&self) -> Result<Vec<(String, TensorRef)>> {
        let dict = match self.root.get("state_dict") {
            Some(d @ Value::Dict(_)) => d,
            _ => &self.root,
        };
        let Value::Dict(items) = dict else {
            return Err(err(
                &self.path,
                "the checkpoint does not hold a dict of tensors",
            ));
        };
        Ok(items
            .iter()
            .filter_map(|(k, v)| match (k, v) {
                (Value::Str(name), Value::Tensor(t)) => Some((name.clone(), t.clone())),
                _ => None,
            })
            .collect())
    }

    /// Where a tensor's bytes lie in the file, checked against its storage: the byte offset of
    /// the first element its view touches, its element count, and the bytes from that element
    /// to the last one it touches.
    fn locate(&self, t: &TensorRef) -> Result<(u64, usize, usize)> {
        let es = t.dtype.bitsize() / 8;
        let &(start, len) = self
            .storages
            .get(&t.storage_key)
            .ok_or_else(|| err(&self.path, format!("storage {} is missing", t.storage_key)))?;
        let overflow = || err(&self.path, "tensor sizes overflow");
        let storage_bytes = t.storage_numel.checked_mul(es).ok_or_else(overflow)?;
        if len != storage_bytes as u64 {
            return Err(err(
                &self.path,
                format!(
                    "storage {} holds {len} bytes, the pickle declares {} elements",
                    t.storage_key, t.storage_numel
                ),
            ));
        }
        let numel = t
            .shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(overflow)?;
        // A view bigger than its storage (zero strides) would make a small file expand into
        // any amount of memory; weights never are.
        if numel > t.storage_numel {
            return Err(err(
                &self.path,
                format!("a tensor view is larger than storage {}", t.storage_key),
            ));
        }
        // Highest element index the view touches; bounds-check before reading anything.
        let last = if numel == 0 {
            0
        } else {
            t.shape
                .iter()
                .zip(&t.stride)
                .try_fold(t.offset, |a, (&d, &s)| {
                    a.checked_add((d - 1).checked_mul(s)?)
                })
                .ok_or_else(overflow)?
        };
        if numel > 0 && last >= t.storage_numel {
            return Err(err(
                &self.path,
                format!("a tensor view reaches past storage {}", t.storage_key),
            ));
        }
        let span = if numel == 0 {
            0
        } else {
            (last + 1 - t.offset) * es
        };
        Ok((start + (t.offset * es) as u64, numel, span))
    }

    /// The byte offset and length of a tensor's elements in the file when they lie there
    /// contiguously, row-major (a caller may read them straight into place); `None` for a
    /// strided view (read it with [`Checkpoint::read_tensor`]).
    pub fn contiguous_bytes(&self, t: &TensorRef) -> Result<Option<(u64, usize)>> {
        let (at, numel, _) = self.locate(t)?;
        let es = t.dtype.bitsize() / 8;
        Ok(is_contiguous(&t.shape, &t.stride).then_some((at, numel * es)))
    }

    /// The tensor's elements, contiguous, row-major, little-endian.
    pub fn read_tensor(&self, t: &TensorRef) -> Result<Vec<u8>> {
        let es = t.dtype.bitsize() / 8;
        let (at, numel, span) = self.locate(t)?;
        let mut file = File::open(&self.path).map_err(|e| PipelineError::io(&self.path, e))?;
        let mut raw = vec![0u8; span];
        file.seek(SeekFrom::Start(at))
            .and_then(|_| file.read_exact(&mut raw))
            .map_err(|e| PipelineError::io(&self.path, e))?;
        if is_contiguous(&t.shape, &t.stride) {
            raw.truncate(numel * es);
            return Ok(raw);
        }
        // Strided gather, e.g. a transposed tensor saved without `.contiguous()`.
        let mut out = Vec::with_capacity(numel * es);
        let mut idx = vec![0usize; t.shape.len()];
        for _ in 0..numel {
            let off: usize = idx.iter().zip(&t.stride).map(|(i, s)| i * s).sum();
            out.extend_from_slice(&raw[off * es..(off + 1) * es]);
            for d in (0..idx.len()).rev() {
                idx[d] += 1;
                if idx[d] < t.shape[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        Ok(out)
    }
}

fn is_contiguous(shape: &[usize], stride: &[usize]) -> bool {
    let mut expect = 1;
    for (&d, &s) in shape.iter().zip(stride).rev() {
        if d != 1 && s != expect {
            return false;
        }
        expect *= d;
    }
    true
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn read_at(f: &mut File, off: u64, len: u64) -> std::io::Result<Vec<u8>> {
    f.seek(SeekFrom::Start(off))?;
    let mut v = vec![0u8; len as usize];
    f.read_exact(&mut v)?;
    Ok(v)
}

fn le16(b: &[u8], at: usize) -> u64 {
    u16::from_le_bytes([b[at], b[at + 1]]) as u64
}
fn le32(b: &[u8], at: usize) -> u64 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes")) as u64
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguity() {
        assert!(is_contiguous(&[2, 3], &[3, 1]));
        assert!(!is_contiguous(&[3, 2], &[1, 3]));
        assert!(is_contiguous(&[1, 4], &[99, 1]));
        assert!(is_contiguous(&[], &[]));
    }
}
