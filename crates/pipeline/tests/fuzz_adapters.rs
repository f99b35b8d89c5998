//! Property-based fuzzing of the adapter files a server reads from `LORA_DIR` and
//! `EMBEDDINGS_DIR`, which may come from strangers: LoRA `.safetensors` (kohya and PEFT key
//! styles) and textual-inversion embeddings (A1111 `.pt` through the pickle reader,
//! `.safetensors` `emb_params`). Files are the committed adapter fixtures mutated byte by byte,
//! or rebuilt tensor by tensor with edits (keys renamed across styles, tensors dropped, shapes,
//! ranks and dtypes changed, alpha of the wrong shape, NaN and infinity, data offsets claiming
//! far more than the file holds), then scanned, checked against tiny-a and merged into it.
//!
//! Properties: no panic, no hang, never an allocation beyond what the file holds; a clean error
//! or a value; a file with a NaN or infinity in a tensor it uses is refused; after any attempt
//! the model's weights are restored.
//!
//! `PROPTEST_CASES` sets the cases per property (CI: the defaults below; a long run: 50000).

mod common;

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};

use candle_core::{DType, Device};
use common::fuzz::{apply, mutation};
use proptest::prelude::*;
use sdserve_pipeline::embeddings::EmbeddingLibrary;
use sdserve_pipeline::lora::LoraLibrary;
use sdserve_pipeline::pipeline::{GenerationParams, LoraWeight, StableDiffusion};
use sdserve_pipeline::schedulers::SchedulerKind;
use serde_json::{json, Map, Value};

fn adapter_fixture(kind: &str, name: &str) -> Vec<u8> {
    let p = common::fixture_path("adapters").join(kind).join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// tiny-a, loaded once and shared by the properties (one case at a time holds it).
fn model() -> MutexGuard<'static, StableDiffusion> {
    static MODEL: OnceLock<Mutex<StableDiffusion>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            Mutex::new(
                StableDiffusion::load(&common::fixture_path("tiny-a"), &Device::Cpu, DType::F32)
                    .expect("tiny-a loads"),
            )
        })
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// A folder of its own per test thread holding the one file under test.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "sdserve-fuzz-adapters-{}-{tag}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn put(&self, file: &str, bytes: &[u8]) -> &Path {
        std::fs::write(self.0.join(file), bytes).unwrap();
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------------
// safetensors files built entry by entry, so headers can say anything.

#[derive(Debug, Clone)]
struct Entry {
    name: String,
    dtype: String,
    shape: Vec<usize>,
    data: Vec<u8>,
    /// Offsets the header claims instead of the real ones.
    claimed: Option<(u64, u64)>,
}

fn parse_safetensors(bytes: &[u8]) -> Vec<Entry> {
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

fn write_safetensors(entries: &[Entry]) -> Vec<u8> {
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

const DTYPES: &[(&str, usize)] = &[
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
fn data_for(dtype: &str, n: usize, salt: u64) -> Vec<u8> {
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

const PREFIXES: &[&str] = &[
    "lora_unet_",
    "lora_te_",
    "lora_te_text_model_",
    "unet.",
    "text_encoder.",
    "text_encoder.text_model.",
    "base_model.model.",
    "",
];
const SUFFIXES: &[&str] = &[
    ".lora_down.weight",
    ".lora_up.weight",
    ".alpha",
    ".lora_A.weight",
    ".lora_B.weight",
    ".weight",
    "",
];

#[derive(Debug, Clone)]
enum Edit {
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

fn dim() -> impl Strategy<Value = usize> {
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

fn shape() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(dim(), 0..5)
}

fn odd_value() -> impl Strategy<Value = f32> {
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

fn edit() -> impl Strategy<Value = Edit> {
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

fn strip_affixes(name: &str) -> &str {
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
const MAX_DATA: usize = 1 << 20;

fn refill(e: &mut Entry, salt: u64) {
    let size = DTYPES.iter().find(|d| d.0 == e.dtype).map_or(1, |d| d.1);
    let n = e
        .shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .filter(|n| n.saturating_mul(size) <= MAX_DATA);
    e.data = n.map_or_else(Vec::new, |n| data_for(&e.dtype, n, salt));
}

fn apply_edits(mut entries: Vec<Entry>, edits: &[Edit]) -> Vec<Entry> {
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

fn strip_suffix_of(name: &str) -> &str {
    SUFFIXES
        .iter()
        .filter(|s| !s.is_empty())
        .find_map(|s| name.strip_suffix(s))
        .unwrap_or(name)
}

// ---------------------------------------------------------------------------------------------
// What a server does with the files.

const LORA_FIXTURES: &[&str] = &[
    "te_kohya.safetensors",
    "soft_peft.safetensors",
    "ink_kohya.safetensors",
];

/// Scans a folder holding `bytes` as `fuzz.safetensors`, checks the LoRA against tiny-a, merges
/// it, and restores the base weights. Returns whether the merge succeeded.
fn exercise_lora(bytes: &[u8], weight: f64) -> Result<bool, TestCaseError> {
    let dir = ScratchDir::new("lora");
    let Ok(library) = LoraLibrary::scan(dir.put("fuzz.safetensors", bytes)) else {
        return Ok(false);
    };
    let mut model = model();
    model
        .set_lora_library(library)
        .map_err(|e| TestCaseError::fail(format!("restoring before a new library: {e}")))?;
    let checked = model.check_lora("fuzz");
    let merged = model.prepare_loras(&[LoraWeight {
        name: "fuzz".into(),
        weight,
    }]);
    // The header check is a subset of the merge's checks.
    prop_assert!(
        merged.is_err() || checked.is_ok(),
        "merged, but the check said {checked:?}"
    );
    for e in [checked.as_ref().err(), merged.as_ref().err()]
        .into_iter()
        .flatten()
    {
        prop_assert!(!e.to_string().is_empty());
    }
    model
        .prepare_loras(&[])
        .map_err(|e| TestCaseError::fail(format!("restoring the base weights: {e}")))?;
    model
        .set_lora_library(LoraLibrary::default())
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    Ok(merged.is_ok())
}

/// Whether a tensor a LoRA layer uses (down, up or alpha of a layer with a down key) holds a
/// value that is not finite, as the merge reads it (converted to f32).
fn uses_non_finite(bytes: &[u8]) -> bool {
    let Ok(tensors) = candle_core::safetensors::load_buffer(bytes, &Device::Cpu) else {
        return false;
    };
    let mut used = Vec::new();
    for name in tensors.keys() {
        for (down, up) in [
            (".lora_down.weight", ".lora_up.weight"),
            (".lora_A.weight", ".lora_B.weight"),
        ] {
            if let Some(layer) = name.strip_suffix(down) {
                used.extend([
                    name.clone(),
                    format!("{layer}{up}"),
                    format!("{layer}.alpha"),
                ]);
            }
        }
    }
    used.iter().filter_map(|n| tensors.get(n)).any(|t| {
        t.to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .is_ok_and(|v| v.iter().any(|x| !x.is_finite()))
    })
}

fn exercise_embedding(file: &str, bytes: &[u8]) -> Result<(), TestCaseError> {
    let dir = ScratchDir::new("emb");
    let Ok(library) = EmbeddingLibrary::scan(dir.put(file, bytes)) else {
        return Ok(());
    };
    for e in library.list() {
        let v = e
            .vectors
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(
            v.iter().all(|x| x.is_finite()),
            "{} kept non-finite vectors",
            e.name
        );
    }
    let mut model = model();
    if model.set_embedding_library(library).is_ok() {
        // The name is a word now: a prompt naming it encodes.
        let params = GenerationParams {
            prompt: "a fuzzemb photo".into(),
            guidance_scale: 1.0,
            steps: 1,
            width: 64,
            height: 64,
            ..Default::default()
        };
        let r = model.encode_conditioning(&params);
        prop_assert!(
            r.is_ok(),
            "an accepted embedding failed to encode: {:?}",
            r.err()
        );
    }
    model
        .set_embedding_library(EmbeddingLibrary::default())
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    Ok(())
}

fn cases(default: u32) -> u32 {
    common::fuzz::cases(default)
}

fn weight() -> impl Strategy<Value = f64> {
    prop_oneof![Just(1.0), Just(0.0), Just(-4.0), Just(4.0), -4.0..4.0f64]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(1000), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn edited_loras_never_panic(
        seed in 0..2usize,
        edits in prop::collection::vec(edit(), 1..6),
        w in weight(),
    ) {
        let entries = parse_safetensors(&adapter_fixture("loras", LORA_FIXTURES[seed]));
        let bytes = write_safetensors(&apply_edits(entries, &edits));
        let poisoned = uses_non_finite(&bytes);
        let merged = exercise_lora(&bytes, w)?;
        prop_assert!(!(poisoned && merged), "a LoRA with a non-finite value it uses was merged");
    }

    #[test]
    fn mutated_lora_bytes_never_panic(
        seed in 0..LORA_FIXTURES.len(),
        muts in prop::collection::vec(mutation(), 1..6),
        w in weight(),
    ) {
        let bytes = apply(adapter_fixture("loras", LORA_FIXTURES[seed]), &muts);
        let poisoned = uses_non_finite(&bytes);
        let merged = exercise_lora(&bytes, w)?;
        prop_assert!(!(poisoned && merged), "a LoRA with a non-finite value it uses was merged");
    }

    #[test]
    fn mutated_pt_embeddings_never_panic(muts in prop::collection::vec(mutation(), 1..6)) {
        let bytes = apply(adapter_fixture("embeddings", "tinystyle.pt"), &muts);
        exercise_embedding("fuzzemb.pt", &bytes)?;
    }

    #[test]
    fn edited_safetensors_embeddings_never_panic(
        base in 0..2usize,
        edits in prop::collection::vec(edit(), 0..4),
        muts in prop::collection::vec(mutation(), 0..2),
    ) {
        let entries = parse_safetensors(&adapter_fixture("embeddings", "tinyneg.safetensors"));
        // Also start from an empty file, or one with a second tensor beside emb_params.
        let entries = match base {
            0 => entries,
            _ => {
                let mut e = entries;
                e.push(Entry { name: "string_to_param".into(), ..e[0].clone() });
                e
            }
        };
        let bytes = apply(write_safetensors(&apply_edits(entries, &edits)), &muts);
        exercise_embedding("fuzzemb.safetensors", &bytes)?;
    }

    #[test]
    fn random_bytes_as_adapter_files(bytes in prop::collection::vec(any::<u8>(), 0..256), ext in 0..3usize) {
        exercise_lora(&bytes, 1.0)?;
        exercise_embedding(["fuzzemb.pt", "fuzzemb.safetensors", "fuzzemb.bin"][ext], &bytes)?;
    }
}

// ---------------------------------------------------------------------------------------------
// Regressions: each case the fuzzing found, kept.

fn lora_with(edit: impl FnOnce(&mut Vec<Entry>)) -> Vec<u8> {
    let mut entries = parse_safetensors(&adapter_fixture("loras", "te_kohya.safetensors"));
    edit(&mut entries);
    write_safetensors(&entries)
}

fn lora_error(bytes: &[u8]) -> String {
    let dir = ScratchDir::new("regression");
    let library = match LoraLibrary::scan(dir.put("fuzz.safetensors", bytes)) {
        Ok(l) => l,
        Err(e) => return e.to_string(),
    };
    let mut model = model();
    model.set_lora_library(library).unwrap();
    let merged = model.prepare_loras(&[LoraWeight {
        name: "fuzz".into(),
        weight: 1.0,
    }]);
    model.prepare_loras(&[]).unwrap();
    model.set_lora_library(LoraLibrary::default()).unwrap();
    merged.expect_err("refused").to_string()
}

const DOWN0: &str = "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight";
const UP0: &str = "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight";
const ALPHA0: &str = "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha";

fn set(entries: &mut [Entry], name: &str, shape: &[usize], values: &[f32]) {
    let e = entries.iter_mut().find(|e| e.name == name).unwrap();
    e.shape = shape.to_vec();
    e.dtype = "F32".into();
    e.data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
}

#[test]
fn lora_shapes_that_used_to_panic_are_refused_naming_the_layer() {
    // A scalar down weight (indexing its rank panicked), a 1-D up weight, an empty alpha, a rank
    // of 0 (alpha / 0 = NaN merged into the weights).
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            lora_with(|e| set(e, DOWN0, &[], &[0.1])),
            "must be 2-D (linear) or 4-D",
        ),
        (
            lora_with(|e| set(e, UP0, &[32], &[0.0; 32])),
            "must be 2-D (linear) or 4-D",
        ),
        (
            lora_with(|e| set(e, ALPHA0, &[0], &[])),
            "alpha has shape [0]",
        ),
        (
            lora_with(|e| {
                set(e, DOWN0, &[0, 32], &[]);
                set(e, UP0, &[32, 0], &[]);
            }),
            "rank of at least 1",
        ),
    ];
    for (bytes, want) in cases {
        let e = lora_error(&bytes);
        assert!(e.contains(want), "{e}");
        assert!(e.contains("encoder_layers_0_self_attn_q_proj"), "{e}");
    }
}

#[test]
fn non_finite_loras_are_refused_and_the_weights_restored() {
    let params = GenerationParams {
        prompt: "a photo of an astronaut".into(),
        steps: 1,
        width: 64,
        height: 64,
        seed: 3,
        guidance_scale: 7.5,
        scheduler: Some(SchedulerKind::Euler),
        ..Default::default()
    };
    let image = || {
        model()
            .generate(&params, &mut |_| ControlFlow::Continue(()))
            .unwrap()
            .remove(0)
            .pixels
    };
    let before = image();
    for (name, value) in [
        (DOWN0, f32::NAN),
        (UP0, f32::INFINITY),
        (ALPHA0, f32::NEG_INFINITY),
    ] {
        let bytes = lora_with(|entries| {
            let e = entries.iter_mut().find(|e| e.name == name).unwrap();
            e.data[..4].copy_from_slice(&value.to_le_bytes());
        });
        let e = lora_error(&bytes);
        assert!(
            e.contains("not finite") || e.contains("alpha is"),
            "{name}: {e}"
        );
    }
    // Finite but overflowing once multiplied.
    let e = lora_error(&lora_with(|entries| {
        for e in entries
            .iter_mut()
            .filter(|e| e.name == DOWN0 || e.name == UP0)
        {
            for c in e.data.chunks_exact_mut(4) {
                c.copy_from_slice(&1e30f32.to_le_bytes());
            }
        }
    }));
    assert!(e.contains("not finite"), "{e}");
    assert_eq!(image(), before, "the base weights came back");
}

#[test]
fn a_lora_header_longer_than_its_file_is_refused_before_allocating() {
    // 16 bytes claiming a 100 MB header.
    let mut bytes = (100u64 << 20).to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{\"a\":1}\0");
    let e = lora_error(&bytes);
    assert!(
        e.contains("a header of 104857600 bytes in a file of 16 bytes"),
        "{e}"
    );
}

#[test]
fn non_finite_embeddings_are_refused() {
    let mut entries = parse_safetensors(&adapter_fixture("embeddings", "tinyneg.safetensors"));
    entries[0].data[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    let dir = ScratchDir::new("emb-regression");
    let e = EmbeddingLibrary::scan(dir.put("nan.safetensors", &write_safetensors(&entries)))
        .unwrap_err()
        .to_string();
    assert!(e.contains("not finite"), "{e}");
    assert!(e.contains("nan.safetensors"), "{e}");
}

#[test]
fn embeddings_of_the_wrong_width_are_refused_naming_them() {
    let mut entries = parse_safetensors(&adapter_fixture("embeddings", "tinyneg.safetensors"));
    let e = &mut entries[0];
    let vectors = e.shape[0];
    e.shape = vec![vectors, 33];
    refill(e, 1);
    let dir = ScratchDir::new("emb-width");
    let library =
        EmbeddingLibrary::scan(dir.put("wide.safetensors", &write_safetensors(&entries))).unwrap();
    let e = model()
        .set_embedding_library(library)
        .unwrap_err()
        .to_string();
    assert!(e.contains("\"wide\" has vectors of 33 values"), "{e}");
}
