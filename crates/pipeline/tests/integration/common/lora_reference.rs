//! The LoRA reference images' harness (tests/integration/adapters.rs, tests/integration/lycoris.rs): tiny-a with a
//! folder of adapter files, the fixture script's JSON (its request) and its tensors (images and
//! deltas), requests naming LoRAs, and the LoRA images' tolerance.

use std::collections::HashMap;
use std::ops::ControlFlow;

use candle_core::{DType, Device, Tensor};
use sdserve_pipeline::lora::LoraLibrary;
use sdserve_pipeline::pipeline::{GenerationParams, LoraWeight, StableDiffusion};
use sdserve_pipeline::schedulers::SchedulerKind;
use serde_json::Value;

use super::{fixture_path, pixel_difference};

pub struct Reference {
    pub model: StableDiffusion,
    pub meta: Value,
    pub tensors: HashMap<String, Tensor>,
}

/// tiny-a with `adapters/<loras>` as its LoRA folder, and `adapters/<name>.json` /
/// `adapters/<name>.safetensors` as the reference.
pub fn reference(loras: &str, name: &str) -> Reference {
    let dir = fixture_path("adapters");
    let mut model = StableDiffusion::load(&fixture_path("tiny-a"), &Device::Cpu, DType::F32)
        .expect("model loads");
    model
        .set_lora_library(LoraLibrary::scan(&dir.join(loras)).unwrap())
        .unwrap();
    let text = std::fs::read_to_string(dir.join(format!("{name}.json"))).unwrap();
    Reference {
        model,
        meta: serde_json::from_str(&text).unwrap(),
        tensors: candle_core::safetensors::load(
            dir.join(format!("{name}.safetensors")),
            &Device::Cpu,
        )
        .unwrap(),
    }
}

/// The reference's request with these LoRAs (name, weight).
pub fn request(r: &Reference, loras: &[(&str, f64)]) -> GenerationParams {
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

pub fn generate(r: &Reference, params: &GenerationParams) -> Vec<u8> {
    r.model
        .generate(params, &mut |_| ControlFlow::Continue(()))
        .expect("generates")
        .remove(0)
        .pixels
}

/// A reference image's bytes.
pub fn expected(r: &Reference, key: &str) -> Vec<u8> {
    r.tensors[key]
        .flatten_all()
        .unwrap()
        .to_vec1::<u8>()
        .unwrap()
}

/// The LoRA images' tolerance: mean abs diff at most 1, at most 0.5% of bytes off by more than 8.
pub fn assert_close(label: &str, ours: &[u8], reference: &[u8]) {
    let (mean, over) = pixel_difference(ours, reference);
    eprintln!("{label}: mean abs diff {mean:.4}, fraction > 8: {over:.5}");
    assert!(
        mean <= 1.0 && over <= 0.005,
        "{label}: mean {mean}, >8 {over}"
    );
}
