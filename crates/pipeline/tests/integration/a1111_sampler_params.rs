//! A1111 1.10's sampler parameters against A1111's own code run by
//! tools/make_a1111_sampler_params_fixtures.py (`a1111-sampler-params.json`): k-diffusion's
//! churn (`s_churn`, `s_tmin`, `s_tmax`, `s_noise` on Euler, Heun, DPM2; none on Euler a) and the
//! negative guidance minimum sigma (`s_min_uncond`, `s_min_uncond_all`). The sigma of every UNet
//! evaluation, the evaluations that skip the negative prompt, and the images: each value within
//! 1 of A1111's and a mean absolute difference of at most 0.01 (float32 rounding flips a few
//! values by one; a churn noise drawn at the wrong step or a skip on the wrong evaluation moves
//! the mean by whole units).

use crate::common;
use common::a1111_guidance::{first_pass, image_failures, numbers, skipped_evaluations, tiny_a};

use candle_core::Tensor;
use sdserve_pipeline::pipeline::{GenerationParams, NegativeGuidance, RgbImage};
use sdserve_pipeline::schedulers::Churn;

/// The bounds stated above.
const MEAN_BOUND: f64 = 0.01;
const MAX_BOUND: i32 = 1;

fn load() -> (serde_json::Map<String, serde_json::Value>, common::Fixtures) {
    let f = common::Fixtures::load("a1111-sampler-params");
    (f.meta["cases"].as_object().unwrap().clone(), f)
}

/// The case's native request: the sampler, the effective churn (`sigma_tmax` 0: no bound) and
/// negative guidance.
fn params_of(case: &serde_json::Value) -> GenerationParams {
    let native = &case["native"];
    let num = |k: &str, default: f64| native[k].as_f64().unwrap_or(default);
    let tmax = num("sigma_tmax", 0.0);
    let base = GenerationParams {
        churn: Churn {
            churn: num("sigma_churn", 0.0),
            tmin: num("sigma_tmin", 0.0),
            tmax: if tmax == 0.0 { f64::INFINITY } else { tmax },
            noise: num("sigma_noise", 1.0),
        },
        negative_guidance: NegativeGuidance {
            min_sigma: num("negative_guidance_min_sigma", 0.0),
            all_steps: native["negative_guidance_all_steps"].as_bool().unwrap(),
            ..Default::default()
        },
        // The case names A1111's sampler; the native one is below.
        ..common::sampler_case_params(case)
    };
    GenerationParams {
        scheduler: native["scheduler"]
            .as_str()
            .map(|n| sdserve_pipeline::schedulers::SchedulerKind::from_name(n).unwrap()),
        ..base
    }
}

#[test]
fn evaluation_sigmas_and_skips_are_a1111_s() {
    let (cases, _) = load();
    let model = tiny_a();
    for (label, case) in &cases {
        let params = params_of(case);
        let want = numbers(&case["evaluation_sigmas"]);
        assert_eq!(
            model.schedules().unet_evaluations(&params).unwrap(),
            want.len(),
            "{label}: evaluations"
        );
        let (scheduler, begin) = first_pass(&model, &params);
        let sigma = |i| scheduler.guidance_sigma(begin + i).unwrap();
        for (i, w) in want.iter().enumerate() {
            let g = sigma(i);
            let close = ((g - w) / w).abs() < 2e-6;
            assert!(close, "{label}: evaluation {i}: {g} against A1111's {w}");
        }
        let skipped = skipped_evaluations(&params, scheduler.as_ref(), want.len(), sigma);
        let want_skipped = numbers(&case["skipped_evaluations"]);
        assert_eq!(skipped, want_skipped, "{label}: skipped evaluations");
    }
    assert!(cases.keys().any(|k| k.contains("img2img")));
}

/// Each image of `got` against the case's: the failures beyond the bounds.
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

/// The parameters matter: without the churn (or the skips) every such case leaves the bounds.
#[test]
fn the_cases_need_their_parameters() {
    let (cases, f) = load();
    let model = tiny_a();
    for (label, case) in &cases {
        let params = params_of(case);
        let without = GenerationParams {
            churn: Churn::default(),
            negative_guidance: NegativeGuidance::default(),
            ..params.clone()
        };
        if without == params {
            // Euler a: A1111 passes it no s_noise, and neither do we.
            assert!(label.starts_with("euler_a"), "{label}");
            continue;
        }
        let got = common::generate(&model, &without);
        let misses = failures(label, &got, f.get(&format!("image.{label}")));
        assert_eq!(misses.len(), got.len(), "{label}: {misses:?}");
    }
}
