//! A full LCM (guidance-distilled) model end to end: the tiny-lcm UNet has `time_cond_proj_dim`,
//! so the pipeline runs without classifier-free guidance and hands the UNet the guidance scale
//! embedding (`timestep_cond`) instead, as diffusers' StableDiffusionPipeline /
//! StableDiffusionImg2ImgPipeline do (fixtures from `tools/make_lcm_fixtures.py`).

use crate::common;

use std::ops::ControlFlow;

use candle_core::{DType, Device};
use common::{fixture_path, generate_one, pixel_difference, read_png, request_params, Fixtures};
use sdserve_pipeline::memory::{MemoryPlan, Offload};
use sdserve_pipeline::pipeline::{GenerationParams, InitImage, StableDiffusion};

#[test]
fn images_match_diffusers() {
    let f = Fixtures::load("lcm");
    let model = StableDiffusion::load(&fixture_path("tiny-lcm"), &Device::Cpu, DType::F32)
        .expect("tiny-lcm loads");
    let cases = f.meta["cases"].as_object().unwrap();
    assert!(cases.len() >= 3);
    let mut failures = Vec::new();
    for (label, case) in cases {
        // scheduler null: the model's own, LCMScheduler.
        assert!(case["scheduler"].is_null(), "{label}");
        let params = GenerationParams {
            batch_size: case["batch_size"].as_u64().unwrap() as usize,
            init_image: case["init_image"].as_str().map(|name| InitImage {
                image: read_png(name),
                mask: None,
                strength: case["strength"].as_f64().unwrap(),
            }),
            ..request_params(case)
        };
        let mut progress = 0;
        let images = model
            .generate(&params, &mut |_| {
                progress += 1;
                ControlFlow::Continue(())
            })
            .expect("generates");
        assert_eq!(
            progress,
            case["unet_timesteps"].as_array().unwrap().len(),
            "{label}: one progress call per UNet evaluation"
        );
        let expected = f.get(&format!("image.{label}"));
        failures.extend(common::batch_failures(label, &images, expected));
    }
    assert!(failures.is_empty(), "differ from diffusers: {failures:?}");
}

/// Sequential offload builds the stem (with `cond_proj`) from host weights for every forward pass:
/// the same image as the resident model, which is diffusers' image.
#[test]
fn sequential_offload_streams_cond_proj() {
    let f = Fixtures::load("lcm");
    let label = "tiny-lcm.txt2img.8";
    let params = request_params(&f.meta["cases"][label]);
    let mut plan = MemoryPlan::cpu(DType::F32);
    plan.offload = Offload::Sequential;
    let model =
        StableDiffusion::load_with_plan(&fixture_path("tiny-lcm"), &Device::Cpu, DType::F32, &plan)
            .expect("tiny-lcm loads");
    let image = generate_one(&model, &params);
    let stats = model.unet_stream_stats().expect("streamed");
    assert_eq!(stats.forwards, params.steps);
    let reference: Vec<u8> = f
        .get(&format!("image.{label}"))
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let (mean, over) = pixel_difference(&image.pixels, &reference);
    assert!(mean <= 1.0 && over <= 0.005, "mean {mean}, >8 {over}");
}
