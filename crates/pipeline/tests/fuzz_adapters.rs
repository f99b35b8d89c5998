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

mod common;

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

fn lora_with(edit: impl FnOnce(&mut Vec<Entry>)) -> Vec<u8> {
    let mut entries = parse_safetensors(&adapter_fixture("loras/te_kohya.safetensors"));
    edit(&mut entries);
    write_safetensors(&entries)
}

fn lora_error(bytes: &[u8]) -> String {
    let dir = ScratchDir::new("fuzz-adapters-regression");
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
fn peft_dora_layers_are_refused_not_merged_as_plain_loras() {
    // PEFT saves DoRA's magnitude as `<module>.lora_magnitude_vector` beside lora_A/lora_B.
    for suffix in [".lora_magnitude_vector", ".lora_magnitude_vector.weight"] {
        let mut entries = parse_safetensors(&adapter_fixture("loras/soft_peft.safetensors"));
        let down = entries
            .iter()
            .find(|e| e.name.ends_with(".lora_A.weight"))
            .unwrap()
            .clone();
        let layer = down.name.strip_suffix(".lora_A.weight").unwrap().to_owned();
        let mut magnitude = down;
        magnitude.name = format!("{layer}{suffix}");
        magnitude.shape = vec![1];
        magnitude.dtype = "F32".into();
        magnitude.data = 1.0f32.to_le_bytes().to_vec();
        entries.push(magnitude);
        let e = lora_error(&write_safetensors(&entries));
        assert!(e.contains("PEFT DoRA layer (lora_magnitude_vector)"), "{e}");
        assert!(e.contains("LoRA \"fuzz\""), "{e}");
    }
}

#[test]
fn keys_of_no_module_are_left_out_as_a1111_splits_them() {
    // `..lora_down.weight` is module "" with part `.lora_down.weight` (A1111 splits a key at its
    // first `.`): no type takes it, so its NaN alpha `..alpha` is never read and the file's real
    // layers merge. (The fuzzing's oracle once grouped it as module `.`; CI caught the mismatch.)
    let bytes = lora_with(|entries| {
        let mut down = entries[0].clone();
        down.name = "..lora_down.weight".into();
        down.shape = vec![];
        down.dtype = "F32".into();
        down.data = 0.5f32.to_le_bytes().to_vec();
        let mut alpha = down.clone();
        alpha.name = "..alpha".into();
        alpha.data = f32::NAN.to_le_bytes().to_vec();
        entries.extend([down, alpha]);
    });
    assert!(!uses_non_finite(&bytes));
    assert!(exercise_lora(&bytes, 1.0).unwrap(), "the real layers merge");
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
    let mut entries = parse_safetensors(&adapter_fixture("embeddings/tinyneg.safetensors"));
    entries[0].data[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    let dir = ScratchDir::new("fuzz-adapters-emb-regression");
    let e = EmbeddingLibrary::scan(dir.put("nan.safetensors", &write_safetensors(&entries)))
        .unwrap_err()
        .to_string();
    assert!(e.contains("not finite"), "{e}");
    assert!(e.contains("nan.safetensors"), "{e}");
}

#[test]
fn embeddings_of_the_wrong_width_are_refused_naming_them() {
    let mut entries = parse_safetensors(&adapter_fixture("embeddings/tinyneg.safetensors"));
    let e = &mut entries[0];
    let vectors = e.shape[0];
    e.shape = vec![vectors, 33];
    refill(e, 1);
    let dir = ScratchDir::new("fuzz-adapters-emb-width");
    let library =
        EmbeddingLibrary::scan(dir.put("wide.safetensors", &write_safetensors(&entries))).unwrap();
    let e = model()
        .set_embedding_library(library)
        .unwrap_err()
        .to_string();
    assert!(e.contains("\"wide\" has vectors of 33 values"), "{e}");
}

/// Under model offload the text encoder and the UNet are built for their stages, and their LoRA
/// deltas used to be computed (and checked) only then: a bad file failed the run after work was
/// done. A NaN in a UNet layer or a text encoder layer, and (in f16) a delta beyond 65504, are now
/// refused before the run builds any part or runs any step; the next run is unharmed.
#[test]
fn bad_loras_are_refused_before_an_offloaded_part_is_built() {
    use sdserve_pipeline::memory::Offload;
    let nan_in_first_down = |fixture: &str| {
        let mut entries = parse_safetensors(&adapter_fixture(&format!("loras/{fixture}")));
        let e = entries
            .iter_mut()
            .find(|e| e.name.ends_with(".lora_down.weight") && e.dtype == "F32")
            .unwrap();
        e.data[..4].copy_from_slice(&f32::NAN.to_le_bytes());
        write_safetensors(&entries)
    };
    let too_large_for_f16 = lora_with(|entries| {
        for e in entries
            .iter_mut()
            .filter(|e| e.name == DOWN0 || e.name == UP0)
        {
            for c in e.data.chunks_exact_mut(4) {
                c.copy_from_slice(&300f32.to_le_bytes());
            }
        }
    });
    let cases = [
        (
            DType::F32,
            nan_in_first_down("ink_kohya.safetensors"),
            "not finite",
        ),
        (
            DType::F32,
            nan_in_first_down("te_kohya.safetensors"),
            "not finite",
        ),
        (DType::F16, too_large_for_f16, "overflow its F16 range"),
    ];
    let params = GenerationParams {
        prompt: "a photo of an astronaut".into(),
        steps: 2,
        width: 64,
        height: 64,
        seed: 3,
        guidance_scale: 7.5,
        scheduler: Some(SchedulerKind::Euler),
        ..Default::default()
    };
    for (dtype, bytes, want) in cases {
        let dir = ScratchDir::new("fuzz-adapters-offloaded");
        let mut model = StableDiffusion::load(&common::fixture_path("tiny-a"), &Device::Cpu, dtype)
            .expect("tiny-a loads");
        model.set_offload(Offload::Model).unwrap();
        model
            .set_lora_library(LoraLibrary::scan(dir.put("bad.safetensors", &bytes)).unwrap())
            .unwrap();
        let run = |loras: Vec<LoraWeight>, steps: &mut usize| {
            let params = GenerationParams {
                loras,
                ..params.clone()
            };
            model.generate(&params, &mut |_| {
                *steps += 1;
                ControlFlow::Continue(())
            })
        };
        let mut steps = 0;
        let first = run(vec![], &mut steps).unwrap();
        let builds = model.component_builds();
        steps = 0;
        let bad = vec![LoraWeight {
            name: "bad".into(),
            weight: 1.0,
        }];
        let e = run(bad, &mut steps).unwrap_err().to_string();
        assert!(e.contains("\"bad\"") && e.contains(want), "{dtype:?}: {e}");
        assert_eq!(steps, 0, "{dtype:?}: no step ran");
        assert_eq!(model.component_builds(), builds, "{dtype:?}: nothing built");
        assert_eq!(
            run(vec![], &mut steps).unwrap(),
            first,
            "{dtype:?}: unharmed"
        );
    }
}
