//! Heun, DPM2, DPM2 a and LCM end to end on the tiny-a pipeline against diffusers'
//! StableDiffusionPipeline / StableDiffusionImg2ImgPipeline (fixtures from
//! `tools/make_sampler_fixtures.py`): text-to-image with each, image-to-image with Heun, with
//! DPM2 a on a batch of two (its noise per image, from each image's generator) and with LCM, and
//! 4-channel inpainting (the known region noised after every UNet evaluation) with Heun, DPM2 a
//! and LCM.

use crate::common;

use std::ops::ControlFlow;

use candle_core::{DType, Device};
use common::{fixture_path, read_png, request_params, Fixtures};
use sdserve_pipeline::pipeline::{GenerationParams, InitImage, StableDiffusion};

fn tiny_a() -> StableDiffusion {
    StableDiffusion::load(&fixture_path("tiny-a"), &Device::Cpu, DType::F32).expect("tiny-a loads")
}

/// Every image case of the fixture: the same pixels as diffusers' pipelines (the bound the other
/// image tests state), and progress counting every UNet evaluation diffusers made.
#[test]
fn images_match_diffusers() {
    let f = Fixtures::load("samplers");
    let model = tiny_a();
    let cases = f.meta["cases"].as_object().unwrap();
    assert!(cases.len() >= 10);
    let mut failures = Vec::new();
    for (label, case) in cases {
        let params = GenerationParams {
            batch_size: case["batch_size"].as_u64().unwrap() as usize,
            init_image: case["init_image"].as_str().map(|name| InitImage {
                image: read_png(name),
                mask: case["mask_image"].as_str().map(read_png),
                strength: case["strength"].as_f64().unwrap(),
            }),
            ..request_params(case)
        };
        let mut progress = Vec::new();
        let images = model
            .generate(&params, &mut |p| {
                progress.push((p.step, p.total));
                ControlFlow::Continue(())
            })
            .expect("generates");
        let evaluations = case["unet_timesteps"].as_array().unwrap().len();
        assert_eq!(
            progress.len(),
            evaluations,
            "{label}: one progress call per UNet evaluation"
        );
        assert!(
            progress
                .iter()
                .enumerate()
                .all(|(i, &p)| p == (i + 1, evaluations)),
            "{label}: progress {progress:?}"
        );
        let expected = f.get(&format!("image.{label}"));
        failures.extend(common::batch_failures(label, &images, expected));
    }
    assert!(failures.is_empty(), "differ from diffusers: {failures:?}");
}
