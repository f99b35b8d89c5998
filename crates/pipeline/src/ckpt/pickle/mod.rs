//! The pickle interpreter: allowed globals, the objects it builds, its stack machine's state
//! and the torch rebuild calls; the opcode loop is in `opcodes.rs`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use safetensors::Dtype;

use super::{le16, le32, le64, TensorRef, Value};

mod opcodes;

/// What the allowed globals stand for. Anything not listed here is refused.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Global {
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
pub(super) enum Obj {
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
pub(super) enum PersistentIds {
    /// No persistent ids expected (plain pickles).
    None,
    /// `('storage', type, key, location, numel)`.
    Zip,
    /// `('storage', type, root_key, location, numel, view_metadata)`.
    Legacy,
}

pub(super) struct Unpickler<'a> {
    data: &'a [u8],
    pub(super) pos: usize,
    stack: Vec<Obj>,
    memo: HashMap<u32, Obj>,
    ids: PersistentIds,
    /// Element type of each storage key seen (legacy format needs it for the data blocks).
    pub(super) storage_dtypes: HashMap<String, Dtype>,
    pub(super) truncated: bool,
}

type PResult<T> = std::result::Result<T, String>;

impl<'a> Unpickler<'a> {
    pub(super) fn new(data: &'a [u8], ids: PersistentIds) -> Self {
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
    /// The little-endian length before a sized string or bytes opcode's data: one byte for the
    /// SHORT_ forms (`U`, `C`, 0x8c), eight for the 8 forms (0x8d, 0x8e), else four.
    fn length_prefix(&mut self, op: u8) -> PResult<usize> {
        Ok(match op {
            b'U' | b'C' | 0x8c => self.u8()? as usize,
            0x8d | 0x8e => self.u64()? as usize,
            _ => self.u32()? as usize,
        })
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
pub(super) fn to_value(o: &Obj, depth: usize) -> PResult<Value> {
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
    fn sized_strings_and_bytes_of_every_width() {
        // MARK, then each opcode with its little-endian length (1, 4 or 8 bytes) and "ab",
        // then LIST, STOP: X/0x8c/0x8d are UTF-8 text, T/U Python 2 strings (read as text),
        // B/C/0x8e bytes.
        let mut p = b"\x80\x04(".to_vec();
        for (op, width) in [
            (b'X', 4),
            (0x8c, 1),
            (0x8d, 8),
            (b'T', 4),
            (b'U', 1),
            (b'B', 4),
            (b'C', 1),
            (0x8e, 8),
        ] {
            p.push(op);
            p.extend_from_slice(&2u64.to_le_bytes()[..width]);
            p.extend_from_slice(b"ab");
        }
        p.extend_from_slice(b"l.");
        let v = unpickle(&p).unwrap();
        let text = serde_json::json!("ab");
        let bytes = serde_json::json!([97, 98]);
        assert_eq!(
            v.to_json(),
            serde_json::json!([&text, &text, &text, &text, &text, &bytes, &bytes, &bytes])
        );
        // A length past the end is a truncated pickle, whatever its width.
        for op in [b'X', 0x8c, 0x8d, b'T', b'U', b'B', b'C', 0x8e] {
            assert!(unpickle(&[0x80, 4, op, 9]).is_err(), "{op:#x}");
        }
    }

    #[test]
    fn memo_puts_and_gets_of_every_form() {
        // MARK; 7 MEMOIZE (key 0); 8 PUT "5"; 9 LONG_BINPUT 9; BINPUT 3; then BINGET 0, GET "5",
        // LONG_BINGET 9, BINGET 3; LIST; STOP.
        let p = b"\x80\x04(K\x07\x94K\x08p5\nK\x09r\x09\x00\x00\x00q\x03\
                  h\x00g5\nj\x09\x00\x00\x00h\x03l.";
        let v = unpickle(p).unwrap();
        assert_eq!(v.to_json(), serde_json::json!([7, 8, 9, 7, 8, 9, 9]));
        assert!(unpickle(b"\x80\x04K\x01px\n.")
            .unwrap_err()
            .contains("bad memo key"));
        assert!(unpickle(b"\x80\x04g7\n.")
            .unwrap_err()
            .contains("unknown memo key"));
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
}
