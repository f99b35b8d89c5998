//! Whole images for the Karras names, DPM++ 2M SDE and its Heun form (`euler_karras`,
//! `euler_a_karras`, `dpmpp_2m_sde`, `dpmpp_2m_sde_karras`, `dpmpp_2m_sde_heun`,
//! `dpmpp_2m_sde_heun_karras`, `lms_karras`, `unipc_karras`) against diffusers on the
//! tiny models: txt2img on both (tiny-b predicts v), batches of two whose stochastic schedulers
//! draw each image's noise from its own generator, and img2img (references from
//! `tools/make_karras_images.py`, cases in `karras-images.json`).

use crate::common;

use common::{fixture_path, read_png, request_params};

use candle_core::Device;
use sdserve_pipeline::pipeline::{GenerationParams, InitImage};

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
    assert!(cases.len() >= 20, "{} cases", cases.len());
    let (failures, images) = common::image_case_failures(cases, params_of, |label| {
        tensors[&format!("image.{label}")].clone()
    });
    assert!(
        failures.is_empty(),
        "images differ from diffusers: {failures:?}"
    );
    eprintln!("{images} images match");
}
