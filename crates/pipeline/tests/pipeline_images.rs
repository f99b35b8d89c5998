//! Whole images against diffusers' `StableDiffusionPipeline` on the tiny fixture models, for every
//! scheduler (references from `tools/make_tiny_models.py`).

mod common;

/// The f32 weights live in their mapped files, as in the server (`weights::mapped`).
#[global_allocator]
static ALLOCATOR: sdserve_pipeline::weights::mapped::MappedAlloc =
    sdserve_pipeline::weights::mapped::MappedAlloc;

use common::pixel_difference;

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sdserve_pipeline::pipeline::{GenerationParams, StableDiffusion};
use sdserve_pipeline::schedulers::SchedulerKind;
use sdserve_pipeline::PipelineError;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

struct Reference {
    model: StableDiffusion,
    requests: serde_json::Map<String, serde_json::Value>,
    tensors: HashMap<String, Tensor>,
}

fn load_reference(name: &str) -> Reference {
    let model = StableDiffusion::load(&fixtures().join(name), &Device::Cpu, DType::F32)
        .expect("model loads");
    let text = std::fs::read_to_string(fixtures().join(format!("{name}.json"))).unwrap();
    // Python's json writes -Infinity in the recorded scheduler configs; JSON has no such number.
    let json: serde_json::Value = serde_json::from_str(&text.replace("-Infinity", "null")).unwrap();
    let requests = json["images"].as_object().expect("images").clone();
    let tensors = candle_core::safetensors::load(
        fixtures().join(format!("{name}.safetensors")),
        &Device::Cpu,
    )
    .expect("references");
    Reference {
        model,
        requests,
        tensors,
    }
}

fn params_of(request: &serde_json::Value) -> GenerationParams {
    GenerationParams {
        prompt: request["prompt"].as_str().unwrap().to_string(),
        negative_prompt: request["negative_prompt"]
            .as_str()
            .unwrap_or("")
            .to_string(),
        steps: request["steps"].as_u64().unwrap() as usize,
        width: request["width"].as_u64().unwrap() as usize,
        height: request["height"].as_u64().unwrap() as usize,
        seed: request["seed"].as_u64().unwrap(),
        guidance_scale: request["guidance_scale"].as_f64().unwrap(),
        // null: the model's own scheduler config.
        scheduler: request["scheduler"]
            .as_str()
            .map(|name| SchedulerKind::from_name(name).expect("known scheduler")),
        ..Default::default()
    }
}

fn check_images(name: &str) {
    let reference = load_reference(name);
    let mut failures = Vec::new();
    for (label, request) in &reference.requests {
        let params = params_of(request);
        let image = reference
            .model
            .generate(&params, &mut |_| ControlFlow::Continue(()))
            .expect("generates")
            .remove(0);
        assert_eq!(
            (image.width as usize, image.height as usize),
            (params.width, params.height)
        );
        let expected = reference.tensors[&format!("image.{label}")]
            .flatten_all()
            .unwrap()
            .to_vec1::<u8>()
            .unwrap();
        let (mean, over) = pixel_difference(&image.pixels, &expected);
        eprintln!("{name} {label}: mean abs diff {mean:.4}, fraction > 8: {over:.5}");
        if mean > 1.0 || over > 0.005 {
            failures.push(format!("{label}: mean {mean:.3}, >8 {over:.4}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{name}: images differ from diffusers: {failures:?}"
    );
}

#[test]
fn tiny_a_images_match_diffusers_for_every_scheduler() {
    check_images("tiny-a");
}

#[test]
fn tiny_b_images_match_diffusers_for_every_scheduler() {
    check_images("tiny-b");
}

#[test]
fn cancelling_stops_within_one_step() {
    let reference = load_reference("tiny-a");
    let params = params_of(&reference.requests["euler"]);
    let mut calls = 0;
    let result = reference.model.generate(&params, &mut |progress| {
        calls += 1;
        assert_eq!(progress.step, calls);
        if progress.step == 2 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    });
    assert!(
        matches!(result, Err(PipelineError::Cancelled)),
        "got {:?}",
        result.map(|_| ())
    );
    assert_eq!(calls, 2, "no step runs after the hook breaks");
}

#[test]
fn progress_reports_every_step_and_size_is_checked() {
    let reference = load_reference("tiny-a");
    let mut params = params_of(&reference.requests["ddim"]);
    let mut seen = Vec::new();
    reference
        .model
        .generate(&params, &mut |p| {
            seen.push((p.step, p.total));
            ControlFlow::Continue(())
        })
        .expect("generates");
    assert_eq!(
        seen,
        (1..=params.steps)
            .map(|s| (s, params.steps))
            .collect::<Vec<_>>()
    );

    params.width = 60; // not a multiple of 8
    let err = reference
        .model
        .generate(&params, &mut |_| ControlFlow::Continue(()))
        .unwrap_err();
    assert!(
        matches!(err, PipelineError::InvalidRequest(ref m) if m.contains("width")),
        "{err}"
    );
}

#[test]
fn empty_and_absent_negative_prompt_embed_the_same() {
    let reference = load_reference("tiny-b");
    let with_empty = reference.model.encode_prompt("a cat", "", true).unwrap();
    let uncond = with_empty.narrow(0, 0, 1).unwrap();
    let direct_empty = reference.model.encode_prompt("", "", false).unwrap();
    assert_eq!(common::max_abs_diff(&uncond, &direct_empty), 0.0);
}
