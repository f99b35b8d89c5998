//! A request's `eta` end to end on the tiny-a pipeline (fixtures from tools/make_eta_fixtures.py):
//! DDIM against diffusers' StableDiffusionPipeline with `eta`; Euler a, DPM2 a, DPM++ SDE and
//! DPM++ 2M SDE against k-diffusion's own samplers with `eta` (A1111's), batches drawing each
//! image's noise from its own generator (DPM++ SDE: its own Brownian tree). Without eta (`None`)
//! each sampler keeps its default: the eta 1 Euler a case is diffusers' own image, DDIM with eta
//! 0 is not the eta 1 image, and the k-diffusion cases at eta < 1 are not their eta 1 image.

use crate::common;

use candle_core::{DType, Device};
use common::{fixture_path, generate_one, request_params, Fixtures};
use sdserve_pipeline::pipeline::{GenerationParams, StableDiffusion};

#[test]
fn images_match_diffusers_and_k_diffusion() {
    let f = Fixtures::load("eta");
    let model = StableDiffusion::load(&fixture_path("tiny-a"), &Device::Cpu, DType::F32)
        .expect("tiny-a loads");
    let cases = f.meta["cases"].as_object().unwrap();
    assert!(cases.len() >= 5);
    let mut failures = Vec::new();
    for (label, case) in cases {
        let eta = case["eta"].as_f64().unwrap();
        let params = GenerationParams {
            batch_size: case["batch_size"].as_u64().unwrap() as usize,
            eta: Some(eta),
            ..request_params(case)
        };
        let images = model
            .generate(&params, &mut |_| std::ops::ControlFlow::Continue(()))
            .expect("generates");
        let expected = f.get(&format!("image.{label}"));
        failures.extend(common::batch_failures(label, &images, expected));
        // The sampler's default eta: Euler a's is 1, DDIM's 0 (another image than eta > 0).
        let default = generate_one(
            &model,
            &GenerationParams {
                eta: None,
                ..params.clone()
            },
        );
        let defaults_to_this = default.pixels == images[0].pixels;
        let default_eta = if label.starts_with("ddim") { 0.0 } else { 1.0 };
        assert_eq!(defaults_to_this, eta == default_eta, "{label}: eta None");
    }
    assert!(
        failures.is_empty(),
        "differ from the reference: {failures:?}"
    );
}
