//! The cases the fuzzing found (and the refusals they led to), kept as plain tests.

use super::*;

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
