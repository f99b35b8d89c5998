//! The hires fix with an ESRGAN upscaler model (`Upscaler::Model`) against
//! `tools/make_upscaler_hires_images.py`: diffusers' first pass, A1111's own
//! `images.resize_image` / `Upscaler.upscale` / `upscale_with_model` with the tiny ESRGAN
//! files, diffusers' img2img as the second pass. And the step hook's say over the upscale:
//! a tile asks it whether to go on (no step is counted), so a cancelled job stops within a tile.

use crate::common;

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use common::fixture_path;
use sdserve_pipeline::pipeline::{GenerationParams, Hires, RgbImage, StableDiffusion, Upscaler};
use sdserve_pipeline::schedulers::SchedulerKind;
use sdserve_pipeline::upscale::ModelUpscaler;
use sdserve_pipeline::PipelineError;
use serde_json::Value;

struct Fixture {
    cases: serde_json::Map<String, Value>,
    tensors: HashMap<String, Tensor>,
}

fn fixture() -> Fixture {
    let json: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture_path("upscaler-hires-images.json")).unwrap(),
    )
    .unwrap();
    Fixture {
        cases: json["cases"].as_object().unwrap().clone(),
        tensors: candle_core::safetensors::load(
            fixture_path("upscaler-hires-images.safetensors"),
            &Device::Cpu,
        )
        .expect("tools/make_upscaler_hires_images.py output"),
    }
}

fn params_of(case: &Value) -> GenerationParams {
    let n = |k: &str| case[k].as_u64().unwrap() as usize;
    GenerationParams {
        prompt: case["prompt"].as_str().unwrap().into(),
        negative_prompt: case["negative_prompt"].as_str().unwrap().into(),
        steps: n("steps"),
        width: n("width"),
        height: n("height"),
        seed: case["seed"].as_u64().unwrap(),
        guidance_scale: case["guidance_scale"].as_f64().unwrap(),
        scheduler: Some(SchedulerKind::from_name(case["scheduler"].as_str().unwrap()).unwrap()),
        hires: Some(Hires {
            width: n("hires_width"),
            height: n("hires_height"),
            upscale_width: n("hires_width"),
            upscale_height: n("hires_height"),
            upscaler: Upscaler::Model(Arc::new(ModelUpscaler::new(
                case["upscaler"].as_str().unwrap(),
                fixture_path(case["file"].as_str().unwrap()),
            ))),
            steps: n("hires_steps"),
            strength: case["strength"].as_f64().unwrap(),
            scheduler: None,
            schedule: None,
            prompt: None,
            negative_prompt: None,
        }),
        ..Default::default()
    }
}

fn rgb(t: &Tensor) -> RgbImage {
    let (h, w, _) = t.dims3().unwrap();
    RgbImage {
        width: w as u32,
        height: h as u32,
        pixels: t.flatten_all().unwrap().to_vec1::<u8>().unwrap(),
    }
}

fn tiny() -> StableDiffusion {
    StableDiffusion::load(&fixture_path("tiny-a-vae8"), &Device::Cpu, DType::F32).unwrap()
}

fn go_on() -> impl FnMut() -> ControlFlow<()> {
    || ControlFlow::Continue(())
}

/// A1111's upscale of diffusers' first image, ours against its: each byte within 1 (the
/// network's float noise carrying a value across a half where its output is rounded to
/// bytes, as tests/integration/esrgan.rs finds for its tiles; the Lanczos after it only averages those).
#[test]
fn the_upscale_is_a1111s_resize_image_with_the_model() {
    let f = fixture();
    for (label, case) in &f.cases {
        let hires = params_of(case).hires.unwrap();
        let first = rgb(&f.tensors[&format!("first.{label}")]);
        let want = rgb(&f.tensors[&format!("upscaled.{label}")]);
        let got = hires
            .upscale_image(&first, (&Device::Cpu, DType::F32), &mut go_on())
            .unwrap();
        assert_eq!(
            (got.width, got.height),
            (want.width, want.height),
            "{label}"
        );
        let (mean, _) = common::pixel_difference(&got.pixels, &want.pixels);
        let max = got
            .pixels
            .iter()
            .zip(&want.pixels)
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap();
        let off = got
            .pixels
            .iter()
            .zip(&want.pixels)
            .filter(|(a, b)| a != b)
            .count();
        eprintln!("{label}: upscale vs A1111's: mean abs diff {mean:.4}, max {max}, {off} off");
        assert!(max <= 1, "{label}: max {max}");
        // Not Lanczos alone: the model made it.
        let lanczos = sdserve_pipeline::image_in::resize_lanczos(
            &first,
            want.width as usize,
            want.height as usize,
        );
        assert!(common::pixel_difference(&lanczos.pixels, &want.pixels).0 > 2.0);
    }
}

/// The whole request: diffusers' txt2img, A1111's upscale, diffusers' img2img.
#[test]
fn hires_with_a_model_matches_a1111s_upscale_between_diffusers_passes() {
    let f = fixture();
    let model = tiny();
    let mut failures = Vec::new();
    for (label, case) in &f.cases {
        let params = params_of(case);
        let image = model
            .generate(&params, &mut |_| ControlFlow::Continue(()))
            .unwrap()
            .remove(0);
        let want = &f.tensors[&format!("image.{label}")];
        failures.extend(common::image_failure(label, &image.pixels, want));
    }
    assert!(
        failures.is_empty(),
        "differ from the reference: {failures:?}"
    );
}

#[test]
fn each_tile_asks_the_hook_and_a_cancel_stops_within_one() {
    let f = fixture();
    let model = tiny();
    // x2_by_3: two rounds of one tile each (64x48, then 128x96), after 4 first-pass steps.
    let params = params_of(&f.cases["x2_by_3"]);
    let mut seen = Vec::new();
    model
        .generate(&params, &mut |p| {
            seen.push((p.step, p.between_steps, p.latents.is_some()));
            ControlFlow::Continue(())
        })
        .unwrap();
    let polls: Vec<_> = seen.iter().filter(|s| s.1).collect();
    assert_eq!(polls, [&(4, true, false), &(4, true, false)]);
    // Steps are counted as without the polls: 4, then int(5 * 0.6) = 3.
    let steps: Vec<usize> = seen.iter().filter(|s| !s.1).map(|s| s.0).collect();
    assert_eq!(steps, (1..=7).collect::<Vec<_>>());

    // Cancelled at the second tile: no step of the second pass runs.
    let (mut polls, mut last_step) = (0, 0);
    let err = model
        .generate(&params, &mut |p| {
            if p.between_steps {
                polls += 1;
                if polls == 2 {
                    return ControlFlow::Break(());
                }
            } else {
                last_step = p.step;
            }
            ControlFlow::Continue(())
        })
        .unwrap_err();
    assert!(matches!(err, PipelineError::Cancelled), "{err:?}");
    assert_eq!((polls, last_step), (2, 4));
}

#[test]
fn a_model_that_cannot_be_read_fails_the_request_naming_it() {
    let model = tiny();
    let mut params = params_of(&fixture().cases["x4_by_2"]);
    if let Some(h) = &mut params.hires {
        h.upscaler = Upscaler::Model(Arc::new(ModelUpscaler::new(
            "broken",
            fixture_path("esrgan/not-rrdbnet.pth"),
        )));
    }
    let err = model
        .generate(&params, &mut |_| ControlFlow::Continue(()))
        .unwrap_err();
    assert!(
        matches!(&err, PipelineError::InvalidRequest(m) if m.contains("not-rrdbnet.pth")),
        "{err:?}"
    );
}
