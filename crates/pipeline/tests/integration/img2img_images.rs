//! img2img, inpainting (4- and 9-channel UNets) and batches against diffusers on the tiny
//! fixture models (references from `tools/make_img2img_fixtures.py`, cases in `img2img.json`;
//! an inpainting model without a mask: `tools/make_unmasked_inpainting_fixtures.py`, cases in
//! `inpainting-unmasked.json`).

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
    load_set("img2img")
}

/// The cases in `{stem}.json` and their references in `{stem}.safetensors`.
fn load_set(stem: &str) -> Fixtures {
    let text = std::fs::read_to_string(fixtures().join(format!("{stem}.json"))).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases = json["cases"].as_object().expect("cases").clone();
    let tensors = candle_core::safetensors::load(
        fixtures().join(format!("{stem}.safetensors")),
        &Device::Cpu,
    )
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
    check_set("img2img", prefixes)
}

fn check_set(stem: &str, prefixes: &[&str]) {
    let mut f = load_set(stem);
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

/// Without a mask an inpainting model repaints the whole image (A1111's conditioning of one in
/// txt2img and img2img; diffusers' inpainting pipeline with an all-white mask): text-to-image
/// at two sizes and three schedulers, img2img at two strengths.
#[test]
fn an_inpainting_model_without_a_mask_repaints_everything() {
    check_set("inpainting-unmasked", &["txt2img.", "img2img."]);
}

/// The unmasked run is not the masked one: the mask's conditioning reaches the UNet.
#[test]
fn an_inpainting_models_mask_changes_its_image() {
    let f = load_set("inpainting-unmasked");
    let model = StableDiffusion::load(&fixtures().join("tiny-inpaint"), &Device::Cpu, DType::F32)
        .expect("the 9-channel model loads");
    let unmasked = params_of(&f.cases["img2img.euler.0.6"]);
    let mut masked = unmasked.clone();
    masked.init_image.as_mut().unwrap().mask = Some(read_png("mask-32x32.png"));
    let a = &common::generate(&model, &unmasked)[0];
    let b = &common::generate(&model, &masked)[0];
    let (mean, _) = pixel_difference(&a.pixels, &b.pixels);
    assert!(
        mean > 3.0,
        "the mask changed the image by only {mean} levels on average"
    );
}

/// The hires fix on an inpainting model: its second pass is conditioned as the first (a mask
/// of ones, a grey image's latents at the hires size, A1111's `txt2img_image_conditioning`),
/// and repaints the enlarged image rather than returning it.
#[test]
fn an_inpainting_models_hires_pass_repaints_the_enlarged_image() {
    use sdserve_pipeline::image_in::resize_lanczos;
    use sdserve_pipeline::pipeline::{Hires, Upscaler};
    let f = load_set("inpainting-unmasked");
    let model = StableDiffusion::load(&fixtures().join("tiny-inpaint"), &Device::Cpu, DType::F32)
        .expect("the 9-channel model loads");
    let first = params_of(&f.cases["txt2img.euler_a"]);
    let hires = GenerationParams {
        hires: Some(Hires {
            width: 48,
            height: 48,
            upscale_width: 48,
            upscale_height: 48,
            upscaler: Upscaler::Resize,
            steps: 4,
            strength: 0.6,
            scheduler: None,
            schedule: None,
            prompt: None,
            negative_prompt: None,
        }),
        ..first.clone()
    };
    let small = &common::generate(&model, &first)[0];
    let large = &common::generate(&model, &hires)[0];
    assert_eq!((large.width, large.height), (48, 48));
    let enlarged = resize_lanczos(small, 48, 48);
    let (mean, _) = pixel_difference(&large.pixels, &enlarged.pixels);
    assert!(
        mean > 3.0,
        "the hires pass changed the enlarged image by only {mean} levels"
    );
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
