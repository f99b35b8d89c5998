//! Whole images against diffusers' `StableDiffusionPipeline` on the tiny fixture models, for every
//! scheduler (references from `tools/make_tiny_models.py`).

use crate::common;

use common::{request_params, tiny_model_json};

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sdserve_pipeline::pipeline::StableDiffusion;
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
    let json = tiny_model_json(name);
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

fn check_images(name: &str) {
    let reference = load_reference(name);
    let mut failures = Vec::new();
    for (label, request) in &reference.requests {
        let params = request_params(request);
        let image = reference
            .model
            .generate(&params, &mut |_| ControlFlow::Continue(()))
            .expect("generates")
            .remove(0);
        assert_eq!(
            (image.width as usize, image.height as usize),
            (params.width, params.height)
        );
        let expected = &reference.tensors[&format!("image.{label}")];
        failures.extend(common::image_failure(
            &format!("{name} {label}"),
            &image.pixels,
            expected,
        ));
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
    let params = request_params(&reference.requests["euler"]);
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
    let mut params = request_params(&reference.requests["ddim"]);
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
