//! Whole images for the Karras names and DPM++ 2M SDE (`euler_karras`, `euler_a_karras`,
//! `dpmpp_2m_sde`, `dpmpp_2m_sde_karras`, `lms_karras`, `unipc_karras`) against diffusers on the
//! tiny models: txt2img on both (tiny-b predicts v), batches of two whose stochastic schedulers
//! draw each image's noise from its own generator, and img2img (references from
//! `tools/make_karras_images.py`, cases in `karras-images.json`).

mod common;

/// The f32 weights live in their mapped files, as in the server (`weights::mapped`).
#[global_allocator]
static ALLOCATOR: sdserve_pipeline::weights::mapped::MappedAlloc =
    sdserve_pipeline::weights::mapped::MappedAlloc;

use common::{fixture_path, generate_one, read_png, request_params};

use std::collections::HashMap;
use std::ops::ControlFlow;

use candle_core::{DType, Device};
use sdserve_pipeline::pipeline::{GenerationParams, InitImage, StableDiffusion};

fn params_of(case: &serde_json::Value) -> GenerationParams {
    let init_image = case["init_image"].as_str().map(|name| InitImage {
        image: read_png(name),
        mask: None,
        strength: case["strength"].as_f64().unwrap(),
    });
    GenerationParams {
        batch_size: case["batch_size"].as_u64().unwrap() as usize,
        init_image,
        ..request_params(case)
    }
}

#[test]
fn images_match_diffusers() {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture_path("karras-images.json")).unwrap())
            .unwrap();
    let tensors =
        candle_core::safetensors::load(fixture_path("karras-images.safetensors"), &Device::Cpu)
            .unwrap();
    let cases = json["cases"].as_object().unwrap();
    assert!(cases.len() >= 16, "{} cases", cases.len());
    let mut models: HashMap<String, StableDiffusion> = HashMap::new();
    let (mut failures, mut images) = (Vec::new(), 0);
    for (label, case) in cases {
        let name = case["model"].as_str().unwrap();
        let model = models.entry(name.to_string()).or_insert_with(|| {
            StableDiffusion::load(&fixture_path(name), &Device::Cpu, DType::F32).unwrap()
        });
        let params = params_of(case);
        let got = if params.batch_size == 1 {
            vec![generate_one(model, &params)]
        } else {
            model
                .generate(&params, &mut |_| ControlFlow::Continue(()))
                .unwrap()
        };
        let want = &tensors[&format!("image.{label}")];
        assert_eq!(got.len(), want.dim(0).unwrap(), "{label}: image count");
        for (i, image) in got.iter().enumerate() {
            let row = want.get(i).unwrap();
            failures.extend(common::image_failure(
                &format!("{label}[{i}]"),
                &image.pixels,
                &row,
            ));
            images += 1;
        }
    }
    assert!(
        failures.is_empty(),
        "images differ from diffusers: {failures:?}"
    );
    eprintln!("{images} images match");
}
