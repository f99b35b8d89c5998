//! The zip format of `torch.save` (stored entries only, zip64 aware): torch.save writes
//! uncompressed entries.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use super::pickle::{to_value, PersistentIds, Unpickler};
use super::{err, le16, le32, le64, read_at, Checkpoint};
use crate::error::{PipelineError, Result};

impl Checkpoint {
    pub(super) fn open_zip(path: &Path, mut file: File) -> Result<Self> {
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
