//! img2img, inpainting (4- and 9-channel UNets) and batches against diffusers on the tiny
//! fixture models (references from `tools/make_img2img_fixtures.py`, cases in `img2img.json`).

use crate::common;

use common::{pixel_difference, read_png, request_params};

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sdserve_pipeline::pipeline::{GenerationParams, InitImage, StableDiffusion};
use sdserve_pipeline::PipelineError;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

struct Fixtures {
    cases: serde_json::Map<String, serde_json::Value>,
    tensors: HashMap<String, Tensor>,
    models: HashMap<String, StableDiffusion>,
}

fn load() -> Fixtures {
    let text = std::fs::read_to_string(fixtures().join("img2img.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases = json["cases"].as_object().expect("cases").clone();
    let tensors =
        candle_core::safetensors::load(fixtures().join("img2img.safetensors"), &Device::Cpu)
            .expect("references");
    Fixtures {
        cases,
        tensors,
        models: HashMap::new(),
    }
}

fn params_of(case: &serde_json::Value) -> GenerationParams {
    let init_image = case["init_image"].as_str().map(|name| InitImage {
        image: read_png(name),
        mask: case["mask_image"].as_str().map(read_png),
        strength: case["strength"].as_f64().unwrap(),
    });
    GenerationParams {
        batch_size: case["batch_size"].as_u64().unwrap() as usize,
        init_image,
        ..request_params(case)
    }
}

/// Runs every case whose label starts with one of `prefixes` and compares each image of it.
fn check(prefixes: &[&str]) {
    let mut f = load();
    let labels: Vec<String> = f
        .cases
        .keys()
        .filter(|k| prefixes.iter().any(|p| k.starts_with(p)))
        .cloned()
        .collect();
    assert!(!labels.is_empty(), "no cases for {prefixes:?}");
    let mut failures = Vec::new();
    for label in &labels {
        let case = f.cases[label].clone();
        let model_name = case["model"].as_str().unwrap().to_string();
        let model = f.models.entry(model_name.clone()).or_insert_with(|| {
            StableDiffusion::load(&fixtures().join(&model_name), &Device::Cpu, DType::F32)
                .expect("model loads")
        });
        let params = params_of(&case);
        let images = common::generate(model, &params);
        let expected = &f.tensors[&format!("image.{label}")];
        for image in &images {
            assert_eq!(
                (image.width as usize, image.height as usize),
                (params.width, params.height)
            );
        }
        failures.extend(common::batch_failures(label, &images, expected));
    }
    assert!(failures.is_empty(), "differ from diffusers: {failures:?}");
}

#[test]
fn img2img_tiny_a_every_scheduler_and_strength() {
    check(&["tiny-a.img2img."]);
}

#[test]
fn img2img_tiny_b_every_scheduler_and_strength() {
    check(&["tiny-b.img2img."]);
}

#[test]
fn inpaint_with_a_regular_unet_puts_the_known_region_back() {
    check(&["tiny-a.inpaint", "tiny-b.inpaint"]);
}

#[test]
fn inpaint_with_a_nine_channel_unet() {
    check(&["tiny-inpaint.inpaint"]);
}

/// Batches: one generator per image (seed + i) in one UNet batch; each image also alone.
#[test]
fn batches_match_a_list_of_generators_and_single_runs() {
    check(&["tiny-a.batch.", "tiny-b.batch."]);
}

/// The init image is 50x35 and the request 32x32: resized with PIL's Lanczos, reproduced here
/// to the bit, so the bound is the same as for the other cases.
#[test]
fn an_init_image_of_another_size_is_resized_like_pil() {
    check(&["tiny-a.img2img-resize."]);
}

/// Image i of a batch is the single run with seed + i (A1111's convention: each image can be made again
/// alone). For inpainting this is where we differ from diffusers on purpose: its list-of-
/// generators path encodes the (batch of one) init image with the first generator only.
#[test]
fn batch_images_are_their_single_runs() {
    let f = load();
    let model = StableDiffusion::load(&fixtures().join("tiny-a"), &Device::Cpu, DType::F32)
        .expect("model loads");
    for label in ["tiny-a.img2img.euler_a.0.75", "tiny-a.inpaint.euler_a.0.75"] {
        let mut params = params_of(&f.cases[label]);
        params.batch_size = 2;
        let batch = common::generate(&model, &params);
        params.batch_size = 1;
        params.seed += 1;
        let single = common::generate(&model, &params);
        let (mean, over) = pixel_difference(&batch[1].pixels, &single[0].pixels);
        assert!(
            mean < 0.05 && over == 0.0,
            "{label}: mean {mean}, >8 {over}"
        );
        assert_ne!(batch[0].pixels, batch[1].pixels, "{label}");
    }
}

#[test]
fn requests_the_model_cannot_run_are_refused() {
    let f = load();
    let inpaint_model =
        StableDiffusion::load(&fixtures().join("tiny-inpaint"), &Device::Cpu, DType::F32)
            .expect("the 9-channel model loads");
    assert_eq!(inpaint_model.unet_in_channels(), 9);
    let mut params = params_of(&f.cases["tiny-inpaint.inpaint.ddim.0.6"]);
    let refused = |model: &StableDiffusion, p: &GenerationParams| {
        let r = model.generate(p, &mut |_| ControlFlow::Continue(()));
        assert!(
            matches!(r, Err(PipelineError::InvalidRequest(_))),
            "{:?}",
            r.map(|v| v.len())
        );
    };
    // A 9-channel UNet needs a mask: neither text-to-image nor img2img.
    let mut no_mask = params.clone();
    no_mask.init_image.as_mut().unwrap().mask = None;
    refused(&inpaint_model, &no_mask);
    let mut text_only = params.clone();
    text_only.init_image = None;
    refused(&inpaint_model, &text_only);
    // int(10 * 0.05) = 0 steps; strength above 1.
    params.init_image.as_mut().unwrap().strength = 0.05;
    refused(&inpaint_model, &params);
    params.init_image.as_mut().unwrap().strength = 1.5;
    refused(&inpaint_model, &params);
}

#[test]
fn progress_counts_the_steps_that_run() {
    let f = load();
    let model = StableDiffusion::load(&fixtures().join("tiny-a"), &Device::Cpu, DType::F32)
        .expect("model loads");
    let params = params_of(&f.cases["tiny-a.img2img.euler.0.3"]);
    let mut seen = Vec::new();
    model
        .generate(&params, &mut |p| {
            seen.push((p.step, p.total));
            ControlFlow::Continue(())
        })
        .unwrap();
    // int(12 * 0.3) = 3 steps.
    assert_eq!(seen, vec![(1, 3), (2, 3), (3, 3)]);
}
