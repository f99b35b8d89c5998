//! A1111 1.10's classifier-free guidance below a scale of 1 (our `guidance_rule: a1111`) against
//! A1111's own CFG denoiser run by tools/make_a1111_cfg_below_one_fixtures.py
//! (`a1111-cfg-below-one.json`): Euler a and A1111's DDIM at 0.5 and 0, txt2img and img2img, a
//! batch of two. A1111 runs the negative prompt at every scale (`uncond + (cond - uncond) *
//! scale`), diffusers' rule runs the prompt alone at or below 1. Each image's values within 1 of
//! A1111's and a mean absolute difference of at most 0.01 (the a1111_cfgpp tests' bounds).

use crate::common;
use common::a1111_guidance::{image_failures, tiny_a};

use sdserve_pipeline::pipeline::{GenerationParams, GuidanceRule};
use sdserve_pipeline::schedulers::SchedulerKind;

const MEAN_BOUND: f64 = 0.01;
const MAX_BOUND: i32 = 1;

/// Every case with its native request under `rule`.
fn cases(rule: GuidanceRule) -> (Vec<(String, GenerationParams)>, common::Fixtures) {
    let f = common::Fixtures::load("a1111-cfg-below-one");
    let cases = f.meta["cases"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(label, case)| {
            let native = &case["native"];
            let params = GenerationParams {
                scheduler: SchedulerKind::from_name(native["scheduler"].as_str().unwrap()),
                guidance_rule: rule,
                ..common::sampler_case_params(case)
            };
            assert!(params.guidance_scale < 1.0, "{label}");
            (label.clone(), params)
        });
    (cases.collect(), f)
}

#[test]
fn images_match_a1111_s() {
    let (cases, f) = cases(GuidanceRule::A1111);
    assert!(cases.iter().any(|(l, _)| l.contains("img2img")));
    assert!(cases.iter().any(|(_, p)| p.guidance_scale == 0.0));
    let with_images = cases.iter().map(|(label, params)| {
        let want = f.get(&format!("image.{label}"));
        (label.as_str(), params.clone(), want)
    });
    let all = image_failures(&tiny_a(), with_images, MAX_BOUND, MEAN_BOUND);
    assert!(all.is_empty(), "differ from A1111's: {all:?}");
}

/// diffusers' rule (the prompt alone) leaves the bounds on every image.
#[test]
fn diffusers_rule_misses_them() {
    let (cases, f) = cases(GuidanceRule::Diffusers);
    let model = tiny_a();
    for (label, params) in &cases {
        let got = common::generate(&model, params);
        let want = f.get(&format!("image.{label}"));
        let misses = common::tight_batch_failures(label, &got, want, MAX_BOUND, MEAN_BOUND);
        assert_eq!(misses.len(), got.len(), "{label}: {misses:?}");
    }
}
