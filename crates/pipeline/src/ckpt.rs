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

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use safetensors::Dtype;

use crate::error::{PipelineError, Result};

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

    /// The tensor's elements, contiguous, row-major, little-endian.
    pub fn read_tensor(&self, t: &TensorRef) -> Result<Vec<u8>> {
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
        let mut file = File::open(&self.path).map_err(|e| PipelineError::io(&self.path, e))?;
        let span = if numel == 0 {
            0
        } else {
            (last + 1 - t.offset) * es
        };
        let mut raw = vec![0u8; span];
        file.seek(SeekFrom::Start(start + (t.offset * es) as u64))
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

    fn open_zip(path: &Path, mut file: File) -> Result<Self> {
        let entries =
            zip_entries(&mut file).map_err(|m| err(path, format!("bad zip archive: {m}")))?;
        let pkl = entries
            .keys()
            .filter(|n| n.ends_with("/data.pkl") || n.as_str() == "data.pkl")
            .min_by_key(|n| n.len())
            .cloned()
            .ok_or_else(|| {
                err(
                    path,
                    "zip archive without data.pkl: not a torch.save checkpoint",
                )
            })?;
        let prefix = &pkl[..pkl.len() - "data.pkl".len()];
        if let Some(&(off, len)) = entries.get(&format!("{prefix}byteorder")) {
            let bytes = read_at(&mut file, off, len).map_err(|e| PipelineError::io(path, e))?;
            if bytes != b"little" {
                return Err(err(path, "big-endian checkpoints are not supported"));
            }
        }
        let (off, len) = entries[&pkl];
        let data = read_at(&mut file, off, len).map_err(|e| PipelineError::io(path, e))?;
        let mut up = Unpickler::new(&data, PersistentIds::Zip);
        let root = up.load().map_err(|m| err(path, m))?;
        let root = to_value(&root, 0).map_err(|m| err(path, m))?;
        let data_prefix = format!("{prefix}data/");
        let storages = entries
            .iter()
            .filter_map(|(n, &loc)| n.strip_prefix(&data_prefix).map(|k| (k.to_string(), loc)))
            .collect();
        Ok(Self {
            path: path.to_path_buf(),
            root,
            storages,
        })
    }

    fn open_legacy(path: &Path, mut file: File) -> Result<Self> {
        // The pickles are small compared to the storages that follow them; read in growing
        // chunks until all five pickles parse.
        let total = file
            .metadata()
            .map_err(|e| PipelineError::io(path, e))?
            .len();
        let mut want = 1u64 << 20;
        loop {
            let n = want.min(total);
            let head = read_at(&mut file, 0, n).map_err(|e| PipelineError::io(path, e))?;
            match parse_legacy_head(&head) {
                Ok((root, keys, pos)) => {
                    let mut storages = HashMap::new();
                    let mut at = pos as u64;
                    for (key, es) in keys {
                        let count =
                            read_at(&mut file, at, 8).map_err(|e| PipelineError::io(path, e))?;
                        let numel = u64::from_le_bytes(count.try_into().expect("8 bytes"));
                        let len = numel
                            .checked_mul(es as u64)
                            .filter(|l| {
                                l.checked_add(8)
                                    .and_then(|n| at.checked_add(n))
                                    .is_some_and(|end| end <= total)
                            })
                            .ok_or_else(|| {
                                err(path, format!("storage {key} runs past the end of the file"))
                            })?;
                        storages.insert(key, (at + 8, len));
                        at += 8 + len;
                    }
                    let root = to_value(&root, 0).map_err(|m| err(path, m))?;
                    return Ok(Self {
                        path: path.to_path_buf(),
                        root,
                        storages,
                    });
                }
                Err(LegacyError::Truncated) if n < total => want *= 4,
                Err(LegacyError::Truncated) => return Err(err(path, "truncated pickle")),
                Err(LegacyError::Bad(m)) => return Err(err(path, m)),
            }
        }
    }
}

enum LegacyError {
    Truncated,
    Bad(String),
}

/// Parses magic, protocol, sys-info, the object and the storage keys; returns the object, the
/// keys with their element sizes, and the offset where the storage data begins.
#[allow(clippy::type_complexity)]
fn parse_legacy_head(
    head: &[u8],
) -> std::result::Result<(Obj, Vec<(String, usize)>, usize), LegacyError> {
    let mut pos = 0;
    let mut next =
        |ids: PersistentIds| -> std::result::Result<(Obj, HashMap<String, Dtype>), LegacyError> {
            let mut up = Unpickler::new(&head[pos..], ids);
            match up.load() {
                Ok(v) => {
                    pos += up.pos;
                    Ok((v, up.storage_dtypes))
                }
                Err(_) if up.truncated => Err(LegacyError::Truncated),
                Err(m) => Err(LegacyError::Bad(m)),
            }
        };
    let (magic, _) = next(PersistentIds::None)?;
    if !matches!(magic, Obj::Int(0x1950a86a20f9469cfc6c)) {
        return Err(LegacyError::Bad(
            "not a torch.save file (bad magic number)".into(),
        ));
    }
    let (proto, _) = next(PersistentIds::None)?;
    if !matches!(proto, Obj::Int(1001)) {
        return Err(LegacyError::Bad(
            "unsupported legacy torch.save protocol".into(),
        ));
    }
    let (_sys_info, _) = next(PersistentIds::None)?;
    let (root, dtypes) = next(PersistentIds::Legacy)?;
    let (keys, _) = next(PersistentIds::None)?;
    let keys = match keys {
        Obj::List(l) => l.borrow().clone(),
        _ => return Err(LegacyError::Bad("storage key list missing".into())),
    };
    let mut out = Vec::new();
    for k in keys {
        let Obj::Str(k) = k else {
            return Err(LegacyError::Bad("storage key is not a string".into()));
        };
        let dt = *dtypes
            .get(&k)
            .ok_or_else(|| LegacyError::Bad(format!("storage {k} has no type")))?;
        out.push((k, dt.bitsize() / 8));
    }
    Ok((root, out, pos))
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

// ---------------------------------------------------------------------------------------------
// Zip (stored entries only, zip64 aware): torch.save writes uncompressed entries.

fn le16(b: &[u8], at: usize) -> u64 {
    u16::from_le_bytes([b[at], b[at + 1]]) as u64
}
fn le32(b: &[u8], at: usize) -> u64 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes")) as u64
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// name -> (data offset, size) for every entry.
fn zip_entries(f: &mut File) -> std::result::Result<HashMap<String, (u64, u64)>, String> {
    let io = |e: std::io::Error| e.to_string();
    let len = f.metadata().map_err(io)?.len();
    let tail_len = len.min(22 + 65535 + 20);
    let tail = read_at(f, len - tail_len, tail_len).map_err(io)?;
    let eocd = (0..tail.len().saturating_sub(21))
        .rev()
        .find(|&i| tail[i..i + 4] == [0x50, 0x4b, 0x05, 0x06])
        .ok_or("no end-of-central-directory record")?;
    let mut count = le16(&tail, eocd + 10);
    let mut cd_size = le32(&tail, eocd + 12);
    let mut cd_off = le32(&tail, eocd + 16);
    if (count == 0xFFFF || cd_off == 0xFFFF_FFFF || cd_size == 0xFFFF_FFFF) && eocd >= 20 {
        let loc = eocd - 20;
        if tail[loc..loc + 4] != [0x50, 0x4b, 0x06, 0x07] {
            return Err("zip64 locator missing".into());
        }
        let z64 = read_at(f, le64(&tail, loc + 8), 56).map_err(io)?;
        if z64[0..4] != [0x50, 0x4b, 0x06, 0x06] {
            return Err("zip64 end record missing".into());
        }
        count = le64(&z64, 32);
        cd_size = le64(&z64, 40);
        cd_off = le64(&z64, 48);
    }
    if cd_off.checked_add(cd_size).is_none_or(|end| end > len) {
        return Err("central directory out of range".into());
    }
    let cd = read_at(f, cd_off, cd_size).map_err(io)?;
    let mut out = HashMap::new();
    let mut p = 0usize;
    for _ in 0..count {
        if p + 46 > cd.len() || cd[p..p + 4] != [0x50, 0x4b, 0x01, 0x02] {
            return Err("bad central directory entry".into());
        }
        let method = le16(&cd, p + 10);
        let mut csize = le32(&cd, p + 20);
        let mut usize_ = le32(&cd, p + 24);
        let nlen = le16(&cd, p + 28) as usize;
        let xlen = le16(&cd, p + 30) as usize;
        let clen = le16(&cd, p + 32) as usize;
        let mut local = le32(&cd, p + 42);
        if p + 46 + nlen + xlen + clen > cd.len() {
            return Err("central directory entry runs past the directory".into());
        }
        let name = String::from_utf8_lossy(&cd[p + 46..p + 46 + nlen]).into_owned();
        // zip64 extra field: present values replace the 0xFFFFFFFF placeholders, in order.
        let mut x = p + 46 + nlen;
        let xend = x + xlen;
        while x + 4 <= xend {
            let id = le16(&cd, x);
            let sz = le16(&cd, x + 2) as usize;
            if id == 1 {
                let mut q = x + 4;
                for field in [&mut usize_, &mut csize, &mut local] {
                    if *field == 0xFFFF_FFFF && q + 8 <= (x + 4 + sz).min(xend) {
                        *field = le64(&cd, q);
                        q += 8;
                    }
                }
            }
            x += 4 + sz;
        }
        p = xend + clen;
        if method != 0 || csize != usize_ {
            return Err(format!(
                "entry {name} is compressed; torch.save writes stored entries"
            ));
        }
        let lh = read_at(f, local, 30).map_err(io)?;
        if lh[0..4] != [0x50, 0x4b, 0x03, 0x04] {
            return Err(format!("bad local header for {name}"));
        }
        let data = local
            .checked_add(30 + le16(&lh, 26) + le16(&lh, 28))
            .filter(|d| d.checked_add(csize).is_some_and(|end| end <= len));
        let Some(data) = data else {
            return Err(format!("entry {name} runs past the end of the file"));
        };
        if data + csize > len {
            return Err(format!("entry {name} runs past the end of the file"));
        }
        out.insert(name, (data, csize));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// The pickle interpreter.

/// What the allowed globals stand for. Anything not listed here is refused.
#[derive(Debug, Clone, PartialEq)]
enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildTensor,
    RebuildParameter,
    RebuildParameterWithState,
    StorageType(Dtype),
}

fn allowed_global(module: &str, name: &str) -> Option<Global> {
    Some(match (module, name) {
        ("collections", "OrderedDict") => Global::OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
        ("torch._utils", "_rebuild_tensor") => Global::RebuildTensor,
        ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
        ("torch._utils", "_rebuild_parameter_with_state") => Global::RebuildParameterWithState,
        ("torch", storage) => Global::StorageType(match storage {
            "FloatStorage" => Dtype::F32,
            "HalfStorage" => Dtype::F16,
            "BFloat16Storage" => Dtype::BF16,
            "DoubleStorage" => Dtype::F64,
            "LongStorage" => Dtype::I64,
            "IntStorage" => Dtype::I32,
            "ShortStorage" => Dtype::I16,
            "CharStorage" => Dtype::I8,
            "ByteStorage" => Dtype::U8,
            "BoolStorage" => Dtype::BOOL,
            _ => return None,
        }),
        _ => return None,
    })
}

#[derive(Debug, Clone)]
enum Obj {
    Mark,
    None,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    // Lists and dicts are shared and mutable: a memoized dict is filled after it is memoized.
    List(Rc<RefCell<Vec<Obj>>>),
    Dict(Rc<RefCell<Vec<(Obj, Obj)>>>),
    Tuple(Rc<Vec<Obj>>),
    Global(Global),
    Storage {
        key: String,
        dtype: Dtype,
        numel: usize,
        offset: usize,
    },
    Tensor(TensorRef),
}

#[derive(Clone, Copy, PartialEq)]
enum PersistentIds {
    /// No persistent ids expected (plain pickles).
    None,
    /// `('storage', type, key, location, numel)`.
    Zip,
    /// `('storage', type, root_key, location, numel, view_metadata)`.
    Legacy,
}

struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Obj>,
    memo: HashMap<u32, Obj>,
    ids: PersistentIds,
    /// Element type of each storage key seen (legacy format needs it for the data blocks).
    storage_dtypes: HashMap<String, Dtype>,
    truncated: bool,
}

type PResult<T> = std::result::Result<T, String>;

impl<'a> Unpickler<'a> {
    fn new(data: &'a [u8], ids: PersistentIds) -> Self {
        Self {
            data,
            pos: 0,
            stack: Vec::new(),
            memo: HashMap::new(),
            ids,
            storage_dtypes: HashMap::new(),
            truncated: false,
        }
    }

    fn take(&mut self, n: usize) -> PResult<&'a [u8]> {
        if n > self.data.len() - self.pos {
            self.truncated = true;
            return Err("truncated pickle".into());
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> PResult<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> PResult<u64> {
        Ok(le16(self.take(2)?, 0))
    }
    fn u32(&mut self) -> PResult<u64> {
        Ok(le32(self.take(4)?, 0))
    }
    fn u64(&mut self) -> PResult<u64> {
        Ok(le64(self.take(8)?, 0))
    }
    fn line(&mut self) -> PResult<String> {
        let rest = &self.data[self.pos..];
        let Some(end) = rest.iter().position(|&b| b == b'\n') else {
            self.truncated = true;
            return Err("truncated pickle".into());
        };
        self.pos += end + 1;
        Ok(String::from_utf8_lossy(&rest[..end]).into_owned())
    }
    fn pop(&mut self) -> PResult<Obj> {
        match self.stack.pop() {
            Some(Obj::Mark) | None => Err("malformed pickle: stack underflow".into()),
            Some(v) => Ok(v),
        }
    }
    fn top(&mut self) -> PResult<&mut Obj> {
        self.stack
            .last_mut()
            .ok_or_else(|| "malformed pickle: empty stack".to_string())
    }
    fn pop_mark(&mut self) -> PResult<Vec<Obj>> {
        let m = self
            .stack
            .iter()
            .rposition(|o| matches!(o, Obj::Mark))
            .ok_or("malformed pickle: no MARK")?;
        let items = self.stack.split_off(m + 1);
        self.stack.pop();
        Ok(items)
    }
    fn string(&mut self, n: usize) -> PResult<Obj> {
        let b = self.take(n)?;
        Ok(Obj::Str(
            String::from_utf8(b.to_vec()).map_err(|_| "bad UTF-8 in pickle string")?,
        ))
    }
    fn global(&mut self, module: &str, name: &str) -> PResult<Global> {
        allowed_global(module, name).ok_or_else(|| {
            format!(
                "refused pickle global `{module}.{name}`: a checkpoint may only hold tensors and plain \
                 containers; nothing was executed (convert the file to .safetensors with a tool you trust)"
            )
        })
    }

    fn load(&mut self) -> PResult<Obj> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    let proto = self.u8()?;
                    if proto > 5 {
                        return Err(format!("unsupported pickle protocol {proto}"));
                    }
                }
                0x95 => {
                    self.u64()?; // FRAME: a length hint only
                }
                b'.' => return self.pop(),
                b'(' => self.stack.push(Obj::Mark),
                b'}' => self.stack.push(Obj::Dict(Default::default())),
                b']' => self.stack.push(Obj::List(Default::default())),
                b')' => self.stack.push(Obj::Tuple(Rc::new(Vec::new()))),
                b'N' => self.stack.push(Obj::None),
                0x88 => self.stack.push(Obj::Bool(true)),
                0x89 => self.stack.push(Obj::Bool(false)),
                b'J' => {
                    let v = self.u32()? as u32 as i32;
                    self.stack.push(Obj::Int(v as i128));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Obj::Int(v as i128));
                }
                b'M' => {
                    let v = self.u16()?;
                    self.stack.push(Obj::Int(v as i128));
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    if n > 16 {
                        return Err("integer too large".into());
                    }
                    let b = self.take(n)?;
                    let mut v: i128 = 0;
                    for (i, &x) in b.iter().enumerate() {
                        v |= (x as i128) << (8 * i);
                    }
                    if n > 0 && n < 16 && b[n - 1] & 0x80 != 0 {
                        v -= 1i128 << (8 * n); // two's complement sign
                    }
                    self.stack.push(Obj::Int(v));
                }
                b'G' => {
                    let b = self.take(8)?;
                    self.stack.push(Obj::Float(f64::from_be_bytes(
                        b.try_into().expect("8 bytes"),
                    )));
                }
                b'I' => {
                    // Protocol 0 INT: "01"/"00" are booleans.
                    let l = self.line()?;
                    let o = match l.as_str() {
                        "00" => Obj::Bool(false),
                        "01" => Obj::Bool(true),
                        s => Obj::Int(s.parse().map_err(|_| "bad INT")?),
                    };
                    self.stack.push(o);
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let s = self.string(n)?;
                    self.stack.push(s);
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let s = self.string(n)?;
                    self.stack.push(s);
                }
                0x8d => {
                    let n = self.u64()? as usize;
                    let s = self.string(n)?;
                    self.stack.push(s);
                }
                b'T' | b'B' => {
                    let n = self.u32()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.stack.push(if op == b'T' {
                        Obj::Str(String::from_utf8_lossy(&b).into())
                    } else {
                        Obj::Bytes(b)
                    });
                }
                b'U' | b'C' => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.stack.push(if op == b'U' {
                        Obj::Str(String::from_utf8_lossy(&b).into())
                    } else {
                        Obj::Bytes(b)
                    });
                }
                0x8e => {
                    let n = self.u64()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.stack.push(Obj::Bytes(b));
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Obj::Tuple(Rc::new(items)));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err("malformed pickle: stack underflow".into());
                    }
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.stack.push(Obj::Tuple(Rc::new(items)));
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Obj::List(Rc::new(RefCell::new(items))));
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let pairs = pairs(items)?;
                    self.stack.push(Obj::Dict(Rc::new(RefCell::new(pairs))));
                }
                b'a' => {
                    let v = self.pop()?;
                    match self.top()? {
                        Obj::List(l) => l.borrow_mut().push(v),
                        _ => return Err("APPEND to a non-list".into()),
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    match self.top()? {
                        Obj::List(l) => l.borrow_mut().extend(items),
                        _ => return Err("APPENDS to a non-list".into()),
                    }
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    match self.top()? {
                        Obj::Dict(d) => d.borrow_mut().push((k, v)),
                        _ => return Err("SETITEM on a non-dict".into()),
                    }
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let p = pairs(items)?;
                    match self.top()? {
                        Obj::Dict(d) => d.borrow_mut().extend(p),
                        _ => return Err("SETITEMS on a non-dict".into()),
                    }
                }
                0x8f => self.stack.push(Obj::List(Default::default())), // EMPTY_SET: as a list
                0x90 => {
                    let items = self.pop_mark()?;
                    match self.top()? {
                        Obj::List(l) => l.borrow_mut().extend(items),
                        _ => return Err("ADDITEMS to a non-set".into()),
                    }
                }
                0x91 => {
                    let items = self.pop_mark()?;
                    self.stack.push(Obj::Tuple(Rc::new(items)));
                }
                b'q' => {
                    let i = self.u8()? as u32;
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                b'r' => {
                    let i = self.u32()? as u32;
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                0x94 => {
                    let i = self.memo.len() as u32;
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                b'h' | b'j' => {
                    let i = if op == b'h' {
                        self.u8()? as u32
                    } else {
                        self.u32()? as u32
                    };
                    let v = self
                        .memo
                        .get(&i)
                        .cloned()
                        .ok_or("malformed pickle: unknown memo key")?;
                    self.stack.push(v);
                }
                b'p' | b'g' => {
                    let l = self.line()?;
                    let i: u32 = l.parse().map_err(|_| "bad memo key")?;
                    if op == b'p' {
                        let v = self.top()?.clone();
                        self.memo.insert(i, v);
                    } else {
                        let v = self
                            .memo
                            .get(&i)
                            .cloned()
                            .ok_or("malformed pickle: unknown memo key")?;
                        self.stack.push(v);
                    }
                }
                b'0' => {
                    self.stack.pop();
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.stack.push(v);
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let g = self.global(&module, &name)?;
                    self.stack.push(Obj::Global(g));
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Obj::Str(module), Obj::Str(name)) = (module, name) else {
                        return Err("STACK_GLOBAL with non-string names".into());
                    };
                    let g = self.global(&module, &name)?;
                    self.stack.push(Obj::Global(g));
                }
                b'i' => {
                    // INST: module and name inline, then instantiate with the marked args.
                    let module = self.line()?;
                    let name = self.line()?;
                    let g = self.global(&module, &name)?;
                    let args = self.pop_mark()?;
                    let r = self.call(g, args)?;
                    self.stack.push(r);
                }
                b'o' => {
                    let mut items = self.pop_mark()?;
                    if items.is_empty() {
                        return Err("OBJ without a class".into());
                    }
                    let cls = items.remove(0);
                    let Obj::Global(g) = cls else {
                        return Err("OBJ on a non-class".into());
                    };
                    let r = self.call(g, items)?;
                    self.stack.push(r);
                }
                b'R' | 0x81 => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    let Obj::Tuple(args) = args else {
                        return Err("REDUCE arguments are not a tuple".into());
                    };
                    let Obj::Global(g) = f else {
                        return Err("REDUCE on something that is not an allowed global".into());
                    };
                    let r = self.call(g, args.to_vec())?;
                    self.stack.push(r);
                }
                0x92 => {
                    // NEWOBJ_EX(cls, args, kwargs)
                    let _kwargs = self.pop()?;
                    let args = self.pop()?;
                    let f = self.pop()?;
                    let (Obj::Tuple(args), Obj::Global(g)) = (args, f) else {
                        return Err("bad NEWOBJ_EX".into());
                    };
                    let r = self.call(g, args.to_vec())?;
                    self.stack.push(r);
                }
                b'b' => {
                    // BUILD sets state on the object below; only harmless cases are accepted.
                    let state = self.pop()?;
                    match (self.top()?, state) {
                        (_, Obj::None) => {}
                        (Obj::Dict(_), Obj::Dict(s)) if s.borrow().is_empty() => {}
                        (Obj::Tensor(_), _) => {}
                        _ => return Err("BUILD with state on an unsupported object".into()),
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let s = self.persistent(pid)?;
                    self.stack.push(s);
                }
                b'P' => return Err("text persistent ids are not supported".into()),
                _ => {
                    return Err(format!(
                        "unsupported pickle opcode 0x{op:02x} at byte {}",
                        self.pos - 1
                    ))
                }
            }
        }
    }

    fn persistent(&mut self, pid: Obj) -> PResult<Obj> {
        let Obj::Tuple(t) = pid else {
            return Err("persistent id is not a tuple".into());
        };
        let want = match self.ids {
            PersistentIds::None => return Err("unexpected persistent id".into()),
            PersistentIds::Zip => 5,
            PersistentIds::Legacy => 6,
        };
        if t.len() != want || !matches!(&t[0], Obj::Str(s) if s == "storage") {
            return Err("unsupported persistent id (only tensor storages are allowed)".into());
        }
        let Obj::Global(Global::StorageType(dtype)) = t[1] else {
            return Err("persistent id without a storage type".into());
        };
        let key = match &t[2] {
            Obj::Str(s) => s.clone(),
            Obj::Int(i) => i.to_string(),
            _ => return Err("bad storage key".into()),
        };
        let Obj::Int(numel) = t[4] else {
            return Err("bad storage size".into());
        };
        let numel = usize::try_from(numel).map_err(|_| "bad storage size")?;
        let mut offset = 0;
        let mut view_numel = numel;
        if want == 6 {
            if let Obj::Tuple(view) = &t[5] {
                // (view_key, offset, view_size): a slice of the root storage.
                if let [_, Obj::Int(off), Obj::Int(sz)] = view.as_slice() {
                    offset = usize::try_from(*off).map_err(|_| "bad view")?;
                    view_numel = usize::try_from(*sz).map_err(|_| "bad view")?;
                } else {
                    return Err("bad storage view".into());
                }
            }
        }
        self.storage_dtypes.insert(key.clone(), dtype);
        let _ = view_numel;
        Ok(Obj::Storage {
            key,
            dtype,
            numel,
            offset,
        })
    }

    fn call(&mut self, g: Global, args: Vec<Obj>) -> PResult<Obj> {
        match g {
            Global::OrderedDict => {
                if !args.is_empty() {
                    return Err("OrderedDict with arguments".into());
                }
                Ok(Obj::Dict(Default::default()))
            }
            Global::RebuildTensorV2 | Global::RebuildTensor => {
                if args.len() < 4 {
                    return Err("_rebuild_tensor with too few arguments".into());
                }
                let Obj::Storage {
                    key,
                    dtype,
                    numel,
                    offset: view_off,
                } = &args[0]
                else {
                    return Err("_rebuild_tensor without a storage".into());
                };
                let Obj::Int(off) = args[1] else {
                    return Err("bad storage offset".into());
                };
                let shape = ints(&args[2])?;
                let stride = ints(&args[3])?;
                if shape.len() != stride.len() {
                    return Err("tensor size and stride differ in length".into());
                }
                let off = usize::try_from(off).map_err(|_| "bad storage offset")?;
                Ok(Obj::Tensor(TensorRef {
                    dtype: *dtype,
                    shape,
                    stride,
                    offset: view_off + off,
                    storage_key: key.clone(),
                    storage_numel: *numel,
                }))
            }
            Global::RebuildParameter | Global::RebuildParameterWithState => {
                match args.into_iter().next() {
                    Some(t @ Obj::Tensor(_)) => Ok(t),
                    _ => Err("_rebuild_parameter without a tensor".into()),
                }
            }
            Global::StorageType(_) => {
                Err("constructing a storage directly is not supported".into())
            }
        }
    }
}

fn ints(o: &Obj) -> PResult<Vec<usize>> {
    let Obj::Tuple(t) = o else {
        return Err("expected a tuple of ints".into());
    };
    t.iter()
        .map(|x| match x {
            Obj::Int(i) => usize::try_from(*i).map_err(|_| "negative size".to_string()),
            _ => Err("expected an int".to_string()),
        })
        .collect()
}

fn pairs(items: Vec<Obj>) -> PResult<Vec<(Obj, Obj)>> {
    if !items.len().is_multiple_of(2) {
        return Err("odd number of dict items".into());
    }
    let mut it = items.into_iter();
    let mut out = Vec::new();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    Ok(out)
}

/// Converts the interpreter's objects into plain values. Depth-limited: a crafted pickle can
/// build a self-referencing list.
fn to_value(o: &Obj, depth: usize) -> PResult<Value> {
    if depth > 64 {
        return Err("checkpoint nesting too deep (or self-referencing)".into());
    }
    Ok(match o {
        Obj::None => Value::None,
        Obj::Bool(b) => Value::Bool(*b),
        Obj::Int(i) => match i64::try_from(*i) {
            Ok(v) => Value::Int(v),
            Err(_) => Value::BigInt(*i),
        },
        Obj::Float(f) => Value::Float(*f),
        Obj::Str(s) => Value::Str(s.clone()),
        Obj::Bytes(b) => Value::Bytes(b.clone()),
        Obj::List(l) => Value::List(
            l.borrow()
                .iter()
                .map(|x| to_value(x, depth + 1))
                .collect::<PResult<_>>()?,
        ),
        Obj::Tuple(t) => Value::Tuple(
            t.iter()
                .map(|x| to_value(x, depth + 1))
                .collect::<PResult<_>>()?,
        ),
        Obj::Dict(d) => Value::Dict(
            d.borrow()
                .iter()
                .map(|(k, v)| Ok((to_value(k, depth + 1)?, to_value(v, depth + 1)?)))
                .collect::<PResult<_>>()?,
        ),
        Obj::Tensor(t) => Value::Tensor(t.clone()),
        Obj::Mark => return Err("malformed pickle: stray MARK".into()),
        Obj::Global(_) | Obj::Storage { .. } => {
            return Err("checkpoint holds a bare class or storage".into())
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unpickle(bytes: &[u8]) -> PResult<Value> {
        let mut up = Unpickler::new(bytes, PersistentIds::None);
        let o = up.load()?;
        to_value(&o, 0)
    }

    #[test]
    fn plain_containers() {
        // python3 -c 'import pickle; print(pickle.dumps({"a": [1, -2, 3.5, None, True], "b": ("x", b"y")}, protocol=3))'
        let p = b"\x80\x03}q\x00(X\x01\x00\x00\x00aq\x01]q\x02(K\x01J\xfe\xff\xff\xffG@\x0c\x00\x00\x00\x00\x00\x00N\x88eX\x01\x00\x00\x00bq\x03X\x01\x00\x00\x00xq\x04C\x01yq\x05\x86q\x06u.";
        let v = unpickle(p).unwrap();
        assert_eq!(
            v.to_json(),
            serde_json::json!({"a": [1, -2, 3.5, null, true], "b": ["x", [121]]})
        );
    }

    #[test]
    fn refuses_globals_by_name() {
        // GLOBAL 'subprocess Popen'
        let e = unpickle(b"\x80\x02csubprocess\nPopen\nq\x00.").unwrap_err();
        assert!(e.contains("subprocess.Popen"), "{e}");
        // STACK_GLOBAL builtins.getattr
        let e = unpickle(b"\x80\x04\x8c\x08builtins\x8c\x07getattr\x93.").unwrap_err();
        assert!(e.contains("builtins.getattr"), "{e}");
    }

    #[test]
    fn self_reference_is_an_error_not_a_crash() {
        // EMPTY_LIST, BINPUT 0, BINGET 0, APPEND, STOP
        let e = unpickle(b"\x80\x02]q\x00h\x00a.").unwrap_err();
        assert!(e.contains("too deep"), "{e}");
    }

    #[test]
    fn contiguity() {
        assert!(is_contiguous(&[2, 3], &[3, 1]));
        assert!(!is_contiguous(&[3, 2], &[1, 3]));
        assert!(is_contiguous(&[1, 4], &[99, 1]));
        assert!(is_contiguous(&[], &[]));
    }
}
