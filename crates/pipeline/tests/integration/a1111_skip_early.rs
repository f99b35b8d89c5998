//! A1111 1.10's "Skip Early CFG" (`skip_early_cond`, our `negative_guidance_skip_early`) against
//! A1111's own code run by tools/make_a1111_skip_early_fixtures.py (`a1111-skip-early.json`):
//! Euler a, Heun (A1111 counts its `total_steps` as twice the steps) and A1111's DDIM, txt2img
//! and img2img, a batch of two, and with `s_min_uncond` beside it. A1111's `total_steps`, the
//! evaluations that skip the negative prompt, and the images: each value within 1 of A1111's
//! and a mean absolute difference of at most 0.01 (a skip on the wrong evaluation moves the mean
//! by whole units).

use crate::common;
use common::a1111_guidance::{first_pass, image_failures, numbers, skipped_evaluations, tiny_a};

use candle_core::Tensor;
use sdserve_pipeline::pipeline::{GenerationParams, NegativeGuidance, RgbImage};
use sdserve_pipeline::schedulers::SchedulerKind;

const MEAN_BOUND: f64 = 0.01;
const MAX_BOUND: i32 = 1;

fn load() -> (serde_json::Map<String, serde_json::Value>, common::Fixtures) {
    let f = common::Fixtures::load("a1111-skip-early");
    (f.meta["cases"].as_object().unwrap().clone(), f)
}

/// The case's native request: the scheduler and the negative guidance.
fn params_of(case: &serde_json::Value) -> GenerationParams {
    let native = &case["native"];
    GenerationParams {
        scheduler: Some(SchedulerKind::from_name(native["scheduler"].as_str().unwrap()).unwrap()),
        negative_guidance: NegativeGuidance {
            min_sigma: native["negative_guidance_min_sigma"].as_f64().unwrap(),
            all_steps: native["negative_guidance_all_steps"].as_bool().unwrap(),
            skip_early: native["negative_guidance_skip_early"].as_f64().unwrap(),
        },
        ..common::sampler_case_params(case)
    }
}

/// A1111's `total_steps`, its evaluations (sigmas on k-diffusion, timesteps on DDIM) and the ones
/// that skip the negative prompt.
#[test]
fn skipped_evaluations_are_a1111_s() {
    let (cases, _) = load();
    let model = tiny_a();
    for (label, case) in &cases {
        let params = params_of(case);
        let want = match case.get("evaluation_sigmas") {
            Some(sigmas) => numbers(sigmas),
            None => numbers(&case["evaluation_timesteps"]),
        };
        assert_eq!(
            model.schedules().unet_evaluations(&params).unwrap(),
            want.len(),
            "{label}: evaluations"
        );
        let (scheduler, begin) = first_pass(&model, &params);
        let total = params.steps_run() * scheduler.order();
        assert_eq!(
            total as u64,
            case["total_steps"].as_u64().unwrap(),
            "{label}"
        );
        let sigma = |i| scheduler.guidance_sigma(begin + i).unwrap();
        for (i, w) in want.iter().enumerate() {
            let g = sigma(i);
            let close = ((g - w) / w).abs() < 2e-6;
            assert!(close, "{label}: evaluation {i}: {g} against {w}");
        }
        let skipped = skipped_evaluations(&params, scheduler.as_ref(), want.len(), sigma);
        assert_eq!(skipped, numbers(&case["skipped_evaluations"]), "{label}");
        assert!(case["infotext"]["Skip Early CFG"].is_number(), "{label}");
    }
    assert!(cases.keys().any(|k| k.contains("img2img")));
}

fn failures(label: &str, got: &[RgbImage], want: &Tensor) -> Vec<String> {
    common::tight_batch_failures(label, got, want, MAX_BOUND, MEAN_BOUND)
}

#[test]
fn images_match_a1111_s() {
    let (cases, f) = load();
    let cases = cases.iter().map(|(label, case)| {
        (
            label.as_str(),
            params_of(case),
            f.get(&format!("image.{label}")),
        )
    });
    let all = image_failures(&tiny_a(), cases, MAX_BOUND, MEAN_BOUND);
    assert!(all.is_empty(), "differ from A1111's: {all:?}");
}

/// The skips matter: without the early ones every image leaves the bounds.
#[test]
fn the_cases_need_their_skips() {
    let (cases, f) = load();
    let model = tiny_a();
    for (label, case) in &cases {
        let params = params_of(case);
        let without = GenerationParams {
            negative_guidance: NegativeGuidance {
                skip_early: 0.0,
                ..params.negative_guidance
            },
            ..params
        };
        let got = common::generate(&model, &without);
        let misses = failures(label, &got, f.get(&format!("image.{label}")));
        assert_eq!(misses.len(), got.len(), "{label}: {misses:?}");
    }
}
