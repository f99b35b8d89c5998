//! safetensors files built entry by entry, so headers can say anything: the fixtures parsed into
//! entries, edits drawn by proptest (keys renamed across styles, tensors dropped, shapes, dtypes,
//! alphas, NaN and infinity, offsets past the end), and the file written back.

use proptest::prelude::*;
use serde_json::{json, Map, Value};

#[derive(Debug, Clone)]
pub struct Entry {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
    /// Offsets the header claims instead of the real ones.
    pub claimed: Option<(u64, u64)>,
}

pub fn parse_safetensors(bytes: &[u8]) -> Vec<Entry> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    let mut out: Vec<Entry> = header
        .into_iter()
        .filter(|(k, _)| k != "__metadata__")
        .map(|(name, v)| {
            let off: Vec<usize> = serde_json::from_value(v["data_offsets"].clone()).unwrap();
            Entry {
                name,
                dtype: v["dtype"].as_str().unwrap().to_string(),
                shape: serde_json::from_value(v["shape"].clone()).unwrap(),
                data: data[off[0]..off[1]].to_vec(),
                claimed: None,
            }
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

pub fn write_safetensors(entries: &[Entry]) -> Vec<u8> {
    let mut header = Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut data = Vec::new();
    for e in entries {
        let start = data.len() as u64;
        data.extend_from_slice(&e.data);
        let (a, b) = e.claimed.unwrap_or((start, data.len() as u64));
        header.insert(
            e.name.clone(),
            json!({"dtype": e.dtype, "shape": e.shape, "data_offsets": [a, b]}),
        );
    }
    let mut text = serde_json::to_vec(&Value::Object(header)).unwrap();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text);
    out.extend(data);
    out
}

pub const DTYPES: &[(&str, usize)] = &[
    ("F32", 4),
    ("F16", 2),
    ("BF16", 2),
    ("F64", 8),
    ("I64", 8),
    ("I32", 4),
    ("I16", 2),
    ("I8", 1),
    ("U8", 1),
    ("U16", 2),
    ("U32", 4),
    ("U64", 8),
    ("BOOL", 1),
    ("F8_E4M3", 1),
    ("F8_E5M2", 1),
    ("F8_E8M0", 1),
    ("F6_E2M3", 1),
    ("F4", 1),
    ("C64", 8),
    ("Q4", 1),
];

/// Bytes of `n` elements of `dtype`: small finite numbers for the float types a LoRA uses
/// (so merges get far), pseudo-random bytes otherwise.
pub fn data_for(dtype: &str, n: usize, salt: u64) -> Vec<u8> {
    let mut x = salt
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = move || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (x >> 33) as u32
    };
    let small = |r: u32| (r as f32 / u32::MAX as f32 - 0.5) * 0.02;
    match dtype {
        "F32" => (0..n).flat_map(|_| small(next()).to_le_bytes()).collect(),
        "F64" => (0..n)
            .flat_map(|_| f64::from(small(next())).to_le_bytes())
            .collect(),
        // bf16: the top half of the f32.
        "BF16" => (0..n)
            .flat_map(|_| {
                let b = small(next()).to_le_bytes();
                [b[2], b[3]]
            })
            .collect(),
        _ => {
            let size = DTYPES.iter().find(|d| d.0 == dtype).map_or(1, |d| d.1);
            (0..n * size).map(|_| next() as u8).collect()
        }
    }
}

pub const PREFIXES: &[&str] = &[
    "lora_unet_",
    "lora_te_",
    "lora_te_text_model_",
    "oft_unet_",
    "unet.",
    "text_encoder.",
    "text_encoder.text_model.",
    "base_model.model.",
    "",
];
pub const SUFFIXES: &[&str] = &[
    ".lora_down.weight",
    ".lora_up.weight",
    ".alpha",
    ".lora_A.weight",
    ".lora_B.weight",
    ".weight",
    "",
];

#[derive(Debug, Clone)]
pub enum Edit {
    Drop(usize),
    /// New shape, data regenerated to fit.
    Shape(usize, Vec<usize>),
    /// New dtype, data regenerated to fit.
    Dtype(usize, usize),
    /// One F32 element set to this value.
    Poison(usize, usize, f32),
    /// Every F32 element times this.
    Scale(usize, f32),
    /// Prefix and suffix swapped for others (the middle kept), or a random middle.
    Rename(usize, usize, usize, Option<String>),
    /// The alpha of layer i: shape and value.
    Alpha(usize, Vec<usize>, f32),
    /// Offsets in the header that do not match the data (up to far past the end).
    Offsets(usize, u64, u64),
    /// A tensor the file did not have.
    Add(String, usize, Vec<usize>),
}

pub fn dim() -> impl Strategy<Value = usize> {
    prop_oneof![
        Just(0usize),
        Just(1),
        Just(2),
        Just(3),
        Just(4),
        Just(32),
        Just(64),
        1usize..70
    ]
}

pub fn shape() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(dim(), 0..5)
}

pub fn odd_value() -> impl Strategy<Value = f32> {
    prop_oneof![
        Just(f32::NAN),
        Just(f32::INFINITY),
        Just(f32::NEG_INFINITY),
        Just(f32::MAX),
        Just(1e30f32),
        Just(0.0),
        Just(-0.0),
        Just(f32::MIN_POSITIVE),
        any::<f32>(),
    ]
}

pub fn edit() -> impl Strategy<Value = Edit> {
    let big = prop_oneof![
        Just(0u64),
        Just(1),
        Just(u64::from(u32::MAX)),
        Just(1u64 << 40),
        Just(u64::MAX),
        any::<u64>(),
    ];
    prop_oneof![
        2 => any::<usize>().prop_map(Edit::Drop),
        3 => (any::<usize>(), shape()).prop_map(|(i, s)| Edit::Shape(i, s)),
        2 => (any::<usize>(), 0..DTYPES.len()).prop_map(|(i, d)| Edit::Dtype(i, d)),
        3 => (any::<usize>(), any::<usize>(), odd_value()).prop_map(|(i, j, v)| Edit::Poison(i, j, v)),
        1 => (any::<usize>(), prop_oneof![Just(1e30f32), Just(1e20), Just(0.0), Just(-1e38)]).prop_map(|(i, v)| Edit::Scale(i, v)),
        3 => (any::<usize>(), 0..PREFIXES.len(), 0..SUFFIXES.len(), prop::option::of("[a-z0-9_.]{0,24}"))
            .prop_map(|(i, p, s, m)| Edit::Rename(i, p, s, m)),
        3 => (any::<usize>(), shape(), odd_value()).prop_map(|(i, s, v)| Edit::Alpha(i, s, v)),
        1 => (any::<usize>(), big.clone(), big).prop_map(|(i, a, b)| Edit::Offsets(i, a, b)),
        1 => ("[a-z_.]{0,20}(\\.lora_down\\.weight|\\.lora_up\\.weight|\\.lora_A\\.weight|\\.alpha|)", 0..DTYPES.len(), shape())
            .prop_map(|(n, d, s)| Edit::Add(n, d, s)),
    ]
}

pub fn strip_affixes(name: &str) -> &str {
    let mut m = name;
    if let Some(s) = SUFFIXES
        .iter()
        .filter(|s| !s.is_empty())
        .find(|s| m.ends_with(*s))
    {
        m = &m[..m.len() - s.len()];
    }
    if let Some(p) = PREFIXES
        .iter()
        .filter(|p| !p.is_empty())
        .find(|p| m.starts_with(*p))
    {
        m = &m[p.len()..];
    }
    m
}

/// Elements of a shape, capped: a shape claiming more than `MAX_DATA` bytes gets no data (the
/// header then lies about the size, which the reader must refuse without allocating it).
pub const MAX_DATA: usize = 1 << 20;

pub fn refill(e: &mut Entry, salt: u64) {
    let size = DTYPES.iter().find(|d| d.0 == e.dtype).map_or(1, |d| d.1);
    let n = e
        .shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .filter(|n| n.saturating_mul(size) <= MAX_DATA);
    e.data = n.map_or_else(Vec::new, |n| data_for(&e.dtype, n, salt));
}

pub fn apply_edits(mut entries: Vec<Entry>, edits: &[Edit]) -> Vec<Entry> {
    for (k, edit) in edits.iter().enumerate() {
        let n = entries.len();
        match edit {
            Edit::Add(name, d, shape) => {
                let mut e = Entry {
                    name: name.clone(),
                    dtype: DTYPES[*d].0.to_string(),
                    shape: shape.clone(),
                    data: Vec::new(),
                    claimed: None,
                };
                refill(&mut e, k as u64);
                entries.push(e);
                continue;
            }
            _ if n == 0 => continue,
            _ => {}
        }
        match edit {
            Edit::Drop(i) => {
                entries.remove(i % n);
            }
            Edit::Shape(i, shape) => {
                let e = &mut entries[i % n];
                e.shape = shape.clone();
                refill(e, k as u64);
            }
            Edit::Dtype(i, d) => {
                let e = &mut entries[i % n];
                e.dtype = DTYPES[*d].0.to_string();
                refill(e, k as u64);
            }
            Edit::Poison(i, j, v) => {
                let e = &mut entries[i % n];
                if e.dtype == "F32" && e.data.len() >= 4 {
                    let at = j % (e.data.len() / 4) * 4;
                    e.data[at..at + 4].copy_from_slice(&v.to_le_bytes());
                }
            }
            Edit::Scale(i, f) => {
                let e = &mut entries[i % n];
                if e.dtype == "F32" {
                    for c in e.data.chunks_exact_mut(4) {
                        let v = f32::from_le_bytes(c.try_into().unwrap()) * f;
                        c.copy_from_slice(&v.to_le_bytes());
                    }
                }
            }
            Edit::Rename(i, p, s, middle) => {
                let e = &mut entries[i % n];
                let m = middle
                    .clone()
                    .unwrap_or_else(|| strip_affixes(&e.name).to_string());
                e.name = format!("{}{m}{}", PREFIXES[*p], SUFFIXES[*s]);
            }
            Edit::Alpha(i, shape, v) => {
                let layer = strip_suffix_of(&entries[i % n].name).to_string();
                let name = format!("{layer}.alpha");
                entries.retain(|e| e.name != name);
                let count: usize = shape.iter().product();
                let mut e = Entry {
                    name,
                    dtype: "F32".into(),
                    shape: shape.clone(),
                    data: Vec::new(),
                    claimed: None,
                };
                if count <= MAX_DATA / 4 {
                    e.data = (0..count).flat_map(|_| v.to_le_bytes()).collect();
                }
                entries.push(e);
            }
            Edit::Offsets(i, a, b) => entries[i % n].claimed = Some((*a, *b)),
            Edit::Add(..) => unreachable!(),
        }
    }
    entries
}

pub fn strip_suffix_of(name: &str) -> &str {
    SUFFIXES
        .iter()
        .filter(|s| !s.is_empty())
        .find_map(|s| name.strip_suffix(s))
        .unwrap_or(name)
}
