//! LyCORIS files (LoHa, LoKr, full diffs with bias diffs, LoCon's CP form, several types in one
//! file) on tiny-a against diffusers images with A1111's own deltas added to the weights (and
//! its `ex_bias` to the biases; `tools/make_lycoris_fixtures.py`); the types A1111 loads and
//! this server does not apply (IA3, OFT, DoRA, a LoHa's bias diff) are listed and refused
//! naming the LoRA and the type. (Each form's delta against A1111's, value by value:
//! `lora::a1111_deltas` in the crate.)

mod common;

/// The f32 weights live in their mapped files, as in the server (`weights::mapped`).
#[global_allocator]
static ALLOCATOR: sdserve_pipeline::weights::mapped::MappedAlloc =
    sdserve_pipeline::weights::mapped::MappedAlloc;

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::pixel_difference;
use sdserve_pipeline::lora::{LoraFormat, LoraLibrary};
use sdserve_pipeline::pipeline::{GenerationParams, LoraWeight, StableDiffusion};
use sdserve_pipeline::schedulers::SchedulerKind;
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

struct Reference {
    model: StableDiffusion,
    meta: Value,
    tensors: HashMap<String, Tensor>,
}

fn reference() -> Reference {
    let dir = fixtures().join("adapters");
    let mut model = StableDiffusion::load(&fixtures().join("tiny-a"), &Device::Cpu, DType::F32)
        .expect("model loads");
    model
        .set_lora_library(LoraLibrary::scan(&dir.join("lycoris")).unwrap())
        .unwrap();
    let text = std::fs::read_to_string(dir.join("lycoris.json")).unwrap();
    Reference {
        model,
        meta: serde_json::from_str(&text).unwrap(),
        tensors: candle_core::safetensors::load(dir.join("lycoris.safetensors"), &Device::Cpu)
            .unwrap(),
    }
}

fn request(r: &Reference, loras: &[(&str, f64)]) -> GenerationParams {
    let q = &r.meta["request"];
    GenerationParams {
        prompt: q["prompt"].as_str().unwrap().into(),
        negative_prompt: q["negative_prompt"].as_str().unwrap().into(),
        steps: q["steps"].as_u64().unwrap() as usize,
        width: q["width"].as_u64().unwrap() as usize,
        height: q["height"].as_u64().unwrap() as usize,
        seed: q["seed"].as_u64().unwrap(),
        guidance_scale: q["guidance_scale"].as_f64().unwrap(),
        scheduler: Some(SchedulerKind::from_name(q["scheduler"].as_str().unwrap()).unwrap()),
        loras: loras
            .iter()
            .map(|(n, w)| LoraWeight {
                name: n.to_string(),
                weight: *w,
            })
            .collect(),
        ..Default::default()
    }
}

fn generate(r: &Reference, params: &GenerationParams) -> Vec<u8> {
    r.model
        .generate(params, &mut |_| ControlFlow::Continue(()))
        .expect("generates")
        .remove(0)
        .pixels
}

fn expected(r: &Reference, key: &str) -> Vec<u8> {
    r.tensors[key]
        .flatten_all()
        .unwrap()
        .to_vec1::<u8>()
        .unwrap()
}

/// The tolerance of the LoRA images (tests/adapters.rs).
fn assert_close(label: &str, ours: &[u8], reference: &[u8]) {
    let (mean, over) = pixel_difference(ours, reference);
    eprintln!("{label}: mean abs diff {mean:.4}, fraction > 8: {over:.5}");
    assert!(
        mean <= 1.0 && over <= 0.005,
        "{label}: mean {mean}, >8 {over}"
    );
}

fn cases(r: &Reference) -> Vec<(String, Vec<(String, f64)>)> {
    r.meta["cases"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(case, files)| {
            let files = files
                .as_array()
                .unwrap()
                .iter()
                .map(|f| (f[0].as_str().unwrap().to_owned(), f[1].as_f64().unwrap()))
                .collect();
            (case.clone(), files)
        })
        .collect()
}

fn borrowed(files: &[(String, f64)]) -> Vec<(&str, f64)> {
    files.iter().map(|(n, w)| (n.as_str(), *w)).collect()
}

#[test]
fn the_library_lists_each_file_s_types_and_refuses_those_not_applied() {
    let r = reference();
    let lib = r.model.lora_library();
    let types = |name: &str| lib.get(name).unwrap().types.clone();
    assert_eq!(types("loha"), ["loha"]);
    assert_eq!(types("lokr"), ["lokr"]);
    assert_eq!(types("full"), ["full"]);
    assert_eq!(types("mixed"), ["full", "loha", "lokr", "lora"]);
    let loha = lib.get("loha").unwrap();
    assert_eq!(loha.format, LoraFormat::Kohya);
    assert_eq!(loha.targets, ["text_encoder", "unet"]);
    assert_eq!(
        loha.layers,
        r.meta["layers"]["loha"].as_u64().unwrap() as usize
    );
    // Two flattened 3x3 kernels and two in Tucker form.
    assert_eq!(loha.conv_layers, 4, "{loha:?}");
    assert_eq!(loha.rank, 4);
    for name in ["loha", "lokr", "full", "mixed"] {
        r.model.check_lora(name).unwrap();
    }
    for (name, type_name) in r.meta["refused"].as_object().unwrap() {
        assert_eq!(types(name), [type_name.as_str().unwrap()]);
        let err = r.model.check_lora(name).unwrap_err().to_string();
        let said = match name.as_str() {
            "ia3" => "IA3",
            "oft" => "OFT",
            "dora" => "DoRA",
            _ => "bias diff",
        };
        assert!(
            err.contains(&format!("LoRA {name:?}")) && err.contains(said),
            "{err}"
        );
        // Refused at the run too, before anything is merged.
        let run = r
            .model
            .generate(&request(&r, &[(name, 1.0)]), &mut |_| {
                ControlFlow::Continue(())
            })
            .unwrap_err()
            .to_string();
        assert!(run.contains(said), "{run}");
    }
}

#[test]
fn lycoris_images_match_a1111_s_merged_weights_and_the_base_comes_back() {
    let r = reference();
    let base = generate(&r, &request(&r, &[]));
    assert_close("base", &base, &expected(&r, "image.base"));
    for (case, files) in cases(&r) {
        let params = request(&r, &borrowed(&files));
        let got = generate(&r, &params);
        assert_close(&case, &got, &expected(&r, &format!("image.{case}")));
        assert_ne!(got, base, "{case} changes the image");
        assert_eq!(generate(&r, &params), got, "{case} again");
    }
    assert_eq!(
        generate(&r, &request(&r, &[])),
        base,
        "the base weights back"
    );
}

/// Offloaded, the deltas are computed from the files and the targets' shapes alone and merged
/// into each part as it is built (model offload) or into the host weights (sequential): the
/// resident model's images, bit for bit, and the base image after.
#[test]
fn lycoris_files_under_offload_give_the_resident_images() {
    use sdserve_pipeline::memory::Offload;
    let mut r = reference();
    let base = generate(&r, &request(&r, &[]));
    let set = request(&r, &[("mixed", 0.9), ("loha", 0.5), ("full", -0.4)]);
    let with = generate(&r, &set);
    for offload in [Offload::Model, Offload::Sequential] {
        r.model.set_offload(offload).unwrap();
        assert_eq!(generate(&r, &set), with, "{offload:?}");
        assert_eq!(generate(&r, &set), with, "{offload:?}, again");
        assert_eq!(generate(&r, &request(&r, &[])), base, "{offload:?}, none");
    }
}
