//! What the model-file fuzz targets (`fuzz_parsers`, `fuzz_adapters`) share: the case count,
//! scratch files, and byte-level mutations of seed files.

use std::path::{Path, PathBuf};

use proptest::prelude::*;

/// Cases per property: `PROPTEST_CASES`, else `default` (sized so CI's whole fuzz run stays
/// around a minute on 2 cores).
pub fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A scratch file per test thread, rewritten for each case.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str, ext: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("sdserve-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir.join(format!("{tag}.{ext}")))
    }
    pub fn write(&self, bytes: &[u8]) -> &Path {
        std::fs::write(&self.0, bytes).unwrap();
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[derive(Debug, Clone)]
pub enum Mutation {
    Flip(usize, u8),
    Set(usize, u8),
    Insert(usize, Vec<u8>),
    Remove(usize, usize),
    Truncate(usize),
    /// A little-endian u16/u32/u64 field set to an edge value (sizes, offsets, counts).
    Field(usize, u8, u64),
}

pub fn mutation() -> impl Strategy<Value = Mutation> {
    let edge = prop_oneof![
        Just(0u64),
        Just(1),
        Just(0x7F),
        Just(0xFF),
        Just(0xFFFF),
        Just(0xFFFF_FFFF),
        Just(u64::MAX),
        Just(u64::MAX / 2),
        any::<u64>(),
    ];
    prop_oneof![
        (any::<usize>(), 1u8..=255).prop_map(|(p, b)| Mutation::Flip(p, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(p, b)| Mutation::Set(p, b)),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(p, b)| Mutation::Insert(p, b)),
        (any::<usize>(), 1usize..64).prop_map(|(p, n)| Mutation::Remove(p, n)),
        any::<usize>().prop_map(Mutation::Truncate),
        (
            any::<usize>(),
            prop_oneof![Just(2u8), Just(4), Just(8)],
            edge
        )
            .prop_map(|(p, w, v)| Mutation::Field(p, w, v)),
    ]
}

pub fn apply(mut b: Vec<u8>, muts: &[Mutation]) -> Vec<u8> {
    for m in muts {
        if b.is_empty() {
            break;
        }
        let n = b.len();
        match m {
            Mutation::Flip(p, x) => b[p % n] ^= x,
            Mutation::Set(p, x) => b[p % n] = *x,
            Mutation::Insert(p, bytes) => {
                let at = p % (n + 1);
                b.splice(at..at, bytes.iter().copied());
            }
            Mutation::Remove(p, len) => {
                let at = p % n;
                let end = (at + len).min(n);
                b.drain(at..end);
            }
            Mutation::Truncate(p) => b.truncate(p % n),
            Mutation::Field(p, w, v) => {
                let w = *w as usize;
                if n >= w {
                    let at = p % (n - w + 1);
                    b[at..at + w].copy_from_slice(&v.to_le_bytes()[..w]);
                }
            }
        }
    }
    b
}
