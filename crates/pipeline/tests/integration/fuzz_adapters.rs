//! Property-based fuzzing of the adapter files a server reads from `LORA_DIR` and
//! `EMBEDDINGS_DIR`, which may come from strangers: LoRA `.safetensors` (kohya and PEFT key
//! styles, LyCORIS LoHa/LoKr/full/CP/IA3/GLoRA/OFT/BOFT/norm modules, DoRA) and textual-inversion embeddings (A1111 `.pt` through the pickle reader,
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

use crate::common;

use std::ops::ControlFlow;
use std::sync::{Mutex, MutexGuard, OnceLock};

use candle_core::{DType, Device};
use common::fuzz::{apply, mutation};
use common::ScratchDir;
use proptest::prelude::*;
use safetensors_edits::{apply_edits, edit, parse_safetensors, refill, write_safetensors, Entry};
use sdserve_pipeline::embeddings::EmbeddingLibrary;
use sdserve_pipeline::lora::LoraLibrary;
use sdserve_pipeline::pipeline::{GenerationParams, LoraWeight, StableDiffusion};
use sdserve_pipeline::schedulers::SchedulerKind;

fn adapter_fixture(name: &str) -> Vec<u8> {
    let p = common::fixture_path("adapters").join(name);
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

#[path = "fuzz_adapters/safetensors_edits.rs"]
mod safetensors_edits;

// ---------------------------------------------------------------------------------------------
// What a server does with the files.

/// Under `adapters/`: the first `EDITED` are the small ones the edits start from.
const LORA_FIXTURES: &[&str] = &[
    "loras/te_kohya.safetensors",
    "loras/soft_peft.safetensors",
    "lycoris/mixed.safetensors",
    "lycoris/oft_diag.safetensors",
    "lycoris/boft.safetensors",
    "lycoris/oft.safetensors",
    "lycoris/norm.safetensors",
    "loras/ink_kohya.safetensors",
    "lycoris/lokr.safetensors",
    "lycoris/full.safetensors",
    "lycoris/dora.safetensors",
    "lycoris/ia3.safetensors",
    "lycoris/glora.safetensors",
];

/// Scans a folder holding `bytes` as `fuzz.safetensors`, checks the LoRA against tiny-a, merges
/// it, and restores the base weights. Returns whether the merge succeeded.
const EDITED: usize = 7;

fn exercise_lora(bytes: &[u8], weight: f64) -> Result<bool, TestCaseError> {
    let dir = ScratchDir::new("fuzz-adapters-lora");
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

/// Whether a tensor a LoRA layer uses holds a value that is not finite, as the merge reads it
/// (converted to f32): down, up and alpha of a layer with a down key (and LoCon's mid), and the
/// tensors of a LyCORIS module A1111 would apply, sorted by type in its order (`alpha` only
/// where the type has a rank).
fn uses_non_finite(bytes: &[u8]) -> bool {
    let Ok(tensors) = candle_core::safetensors::load_buffer(bytes, &Device::Cpu) else {
        return false;
    };
    let mut used = Vec::new();
    // PEFT names: the module is everything before the suffix.
    for name in tensors.keys() {
        if let Some(layer) = name.strip_suffix(".lora_A.weight") {
            used.extend([
                name.clone(),
                format!("{layer}.lora_B.weight"),
                format!("{layer}.alpha"),
            ]);
        }
    }
    let mut modules: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
    for name in tensors.keys() {
        if let Some((module, part)) = name.split_once('.') {
            modules.entry(module).or_default().push(part);
        }
    }
    for (module, parts) in modules {
        let has = |p: &str| parts.contains(&p);
        let at = |p: &str| format!("{module}.{p}");
        let hada = ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"];
        let factor = |n: u8| {
            let whole = format!("lokr_w{n}");
            let (a, b) = (format!("lokr_w{n}_a"), format!("lokr_w{n}_b"));
            if has(&whole) {
                Some(vec![at(&whole)])
            } else if has(&a) && has(&b) {
                Some(vec![at(&a), at(&b)])
            } else {
                None
            }
        };
        // A bias diff (`diff_b`) is applied with a full diff only; with another type refused.
        let refused = has("bias");
        if refused {
            continue;
        } else if has("lora_down.weight") {
            // kohya names: the module is the part before the first `.`, as A1111 splits them.
            used.extend(
                [
                    "lora_down.weight",
                    "lora_up.weight",
                    "alpha",
                    "lora_mid.weight",
                    "dora_scale",
                ]
                .iter()
                .map(|p| at(p)),
            );
            continue;
        } else if hada.iter().all(|p| has(p)) {
            if has("diff_b") {
                continue;
            }
            used.extend(["hada_t1", "hada_t2", "alpha"].iter().map(|p| at(p)));
            used.extend(hada.iter().map(|p| at(p)));
        } else if has("weight") && has("on_input") {
            // IA3 (`on_input` a bool: the oracle's loader refuses the file).
            used.push(at("weight"));
        } else if has("weight") || has("on_input") {
            continue;
        } else if let (Some(w1), Some(w2)) = (factor(1), factor(2)) {
            if has("diff_b") {
                continue;
            }
            if w1.len() + w2.len() > 2 {
                used.push(at("alpha"));
            }
            if w2.len() == 2 {
                used.push(at("lokr_t2"));
            }
            used.extend(w1.into_iter().chain(w2));
        } else if has("diff") {
            used.extend([at("diff"), at("diff_b")]);
        } else if has("w_norm") && has("b_norm") {
            used.extend([at("w_norm"), at("b_norm")]);
        } else if has("w_norm") || has("b_norm") {
            continue;
        } else if ["a1.weight", "a2.weight", "b1.weight", "b2.weight", "alpha"]
            .iter()
            .all(|p| has(p))
        {
            // GLoRA (its alpha required, not used).
            used.extend(["a1.weight", "a2.weight", "b1.weight", "b2.weight"].map(at));
        } else if has("oft_blocks") || has("oft_diag") {
            // OFT: its scale is 1 (the file's is not read); alpha (oft_blocks' constraint)
            // clamps a norm, and an infinite one clamps nothing, as in A1111.
            let blocks = if has("oft_blocks") {
                "oft_blocks"
            } else {
                "oft_diag"
            };
            used.extend([at(blocks), at("rescale"), at("dora_scale")]);
            continue;
        } else {
            continue;
        }
        used.extend([at("scale"), at("dora_scale")]);
    }
    used.iter().filter_map(|n| tensors.get(n)).any(|t| {
        t.to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .is_ok_and(|v| v.iter().any(|x| !x.is_finite()))
    })
}

fn exercise_embedding(file: &str, bytes: &[u8]) -> Result<(), TestCaseError> {
    let dir = ScratchDir::new("fuzz-adapters-emb");
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
        seed in 0..EDITED,
        edits in prop::collection::vec(edit(), 1..6),
        w in weight(),
    ) {
        let entries = parse_safetensors(&adapter_fixture(LORA_FIXTURES[seed]));
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
        let bytes = apply(adapter_fixture(LORA_FIXTURES[seed]), &muts);
        let poisoned = uses_non_finite(&bytes);
        let merged = exercise_lora(&bytes, w)?;
        prop_assert!(!(poisoned && merged), "a LoRA with a non-finite value it uses was merged");
    }

    #[test]
    fn mutated_pt_embeddings_never_panic(muts in prop::collection::vec(mutation(), 1..6)) {
        let bytes = apply(adapter_fixture("embeddings/tinystyle.pt"), &muts);
        exercise_embedding("fuzzemb.pt", &bytes)?;
    }

    #[test]
    fn edited_safetensors_embeddings_never_panic(
        base in 0..2usize,
        edits in prop::collection::vec(edit(), 0..4),
        muts in prop::collection::vec(mutation(), 0..2),
    ) {
        let entries = parse_safetensors(&adapter_fixture("embeddings/tinyneg.safetensors"));
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

#[path = "fuzz_adapters/regressions.rs"]
mod regressions;
