//! The legacy format of `torch.save` (`_use_new_zipfile_serialization=False`): five pickles,
//! then each storage's element count and bytes.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use safetensors::Dtype;

use super::pickle::{to_value, Obj, PersistentIds, Unpickler};
use super::{err, read_at, Checkpoint};
use crate::error::{PipelineError, Result};

impl Checkpoint {
    pub(super) fn open_legacy(path: &Path, mut file: File) -> Result<Self> {
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
