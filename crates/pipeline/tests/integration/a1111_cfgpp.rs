//! A1111 1.10's `DDIM CFG++` (our `ddim_cfgpp`) against A1111's own code run by
//! tools/make_a1111_cfgpp_fixtures.py (`a1111-cfgpp.json`): `ddim_cfgpp` under its CFG denoiser
//! (the scale over 12.5, the unconditional prediction as the update's direction), txt2img and
//! img2img, eta 0 and above, a batch of two, and the negative prompt skipped by `s_min_uncond`;
//! and by tools/make_a1111_cfgpp_scale_fixtures.py (`a1111-cfgpp-scale.json`): guidance scales 1,
//! 0.5 and 0, where A1111 still runs the negative prompt, and "Skip Early CFG".
//! Each image's values within 1 of A1111's and a mean absolute difference of at most 0.01 (float32
//! rounding flips a few values by one; the guided prediction as the direction, or the scale
//! undivided, moves the mean by whole units).

use crate::common;
use common::a1111_guidance::{first_pass, image_failures, numbers, skipped_evaluations, tiny_a};

use candle_core::Tensor;
use sdserve_pipeline::pipeline::{GenerationParams, NegativeGuidance, RgbImage};
use sdserve_pipeline::schedulers::SchedulerKind;

const MEAN_BOUND: f64 = 0.01;
const MAX_BOUND: i32 = 1;

/// Every case of both fixture files, with its file.
fn load() -> Vec<(String, serde_json::Value, std::rc::Rc<common::Fixtures>)> {
    let mut all = Vec::new();
    for stem in ["a1111-cfgpp", "a1111-cfgpp-scale"] {
        let f = std::rc::Rc::new(common::Fixtures::load(stem));
        for (label, case) in f.meta["cases"].as_object().unwrap() {
            all.push((label.clone(), case.clone(), f.clone()));
        }
    }
    all
}

/// The case's native request (`native`: the scheduler, eta, negative guidance).
fn params_of(case: &serde_json::Value) -> GenerationParams {
    let native = &case["native"];
    let num = |k: &str| native[k].as_f64().unwrap_or(0.0);
    GenerationParams {
        scheduler: Some(SchedulerKind::from_name(native["scheduler"].as_str().unwrap()).unwrap()),
        eta: native["eta"].as_f64(),
        negative_guidance: NegativeGuidance {
            min_sigma: num("negative_guidance_min_sigma"),
            all_steps: native["negative_guidance_all_steps"]
                .as_bool()
                .unwrap_or(false),
            skip_early: case["options"]["skip_early_cond"].as_f64().unwrap_or(0.0),
        },
        ..common::sampler_case_params(case)
    }
}

fn failures(label: &str, got: &[RgbImage], want: &Tensor) -> Vec<String> {
    common::tight_batch_failures(label, got, want, MAX_BOUND, MEAN_BOUND)
}

/// A1111's UNet evaluations: as many as we run, at the same timesteps, and the same ones skip
/// the negative prompt.
#[test]
fn evaluations_are_a1111_s() {
    let cases = load();
    let model = tiny_a();
    for (label, case, _) in &cases {
        let params = params_of(case);
        let want = numbers(&case["evaluation_timesteps"]);
        assert_eq!(
            model.schedules().unet_evaluations(&params).unwrap(),
            want.len(),
            "{label}: evaluations"
        );
        let (scheduler, begin) = first_pass(&model, &params);
        assert_eq!(&scheduler.timesteps()[begin..], want.as_slice(), "{label}");
        // A1111's timesteps samplers compare NGMS's minimum with the timestep.
        let skipped = skipped_evaluations(&params, scheduler.as_ref(), want.len(), |i| want[i]);
        let want_skipped = numbers(&case["skipped_evaluations"]);
        assert_eq!(skipped, want_skipped, "{label}: skipped evaluations");
    }
    for part in [
        "img2img", "batch", "eta", "ngms", "scale1", "scale0.5", "skip",
    ] {
        assert!(cases.iter().any(|c| c.0.contains(part)), "no {part} case");
    }
}

#[test]
fn images_match_a1111_s() {
    let cases = load();
    let cases = cases.iter().map(|(label, case, f)| {
        (
            label.as_str(),
            params_of(case),
            f.get(&format!("image.{label}")),
        )
    });
    let all = image_failures(&tiny_a(), cases, MAX_BOUND, MEAN_BOUND);
    assert!(all.is_empty(), "differ from A1111's: {all:?}");
}

/// CFG++ is not A1111's DDIM: run as `ddim_a1111` (the guided prediction as the direction,
/// the whole scale; at 1 or below, no negative prompt at all, as `ddim_cfgpp` ran before it
/// followed A1111 there) every image leaves the bounds.
#[test]
fn plain_ddim_is_not_cfgpp() {
    let model = tiny_a();
    for (label, case, f) in &load() {
        let params = GenerationParams {
            scheduler: Some(SchedulerKind::DdimA1111),
            ..params_of(case)
        };
        let got = common::generate(&model, &params);
        let misses = failures(label, &got, f.get(&format!("image.{label}")));
        assert_eq!(misses.len(), got.len(), "{label}: {misses:?}");
    }
}
