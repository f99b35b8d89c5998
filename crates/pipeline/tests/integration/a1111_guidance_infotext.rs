//! Where A1111 1.10 writes "Skip Early CFG" and "NGMS" in the infotext: only where a call of the
//! run skipped the negative prompt by that rule (its CFG denoiser sets each entry in that rule's
//! branch). `ModelSchedules::guidance_skips` against the infotext A1111's own code wrote in every
//! A1111 guidance fixture, and tools/make_a1111_guidance_infotext_fixtures.py's cases
//! (`a1111-guidance-infotext.json`): NGMS never reached, the early skip covering every call below
//! it, the early skip on the first call only, NGMS after the early skip; their images within 1
//! of A1111's and a mean absolute difference of at most 0.01 (the a1111_skip_early tests' bounds).

use crate::common;
use common::a1111_guidance::{image_failures, tiny_a};

use sdserve_pipeline::pipeline::{GenerationParams, NegativeGuidance};
use sdserve_pipeline::schedulers::SchedulerKind;

const FIXTURES: [&str; 5] = [
    "a1111-guidance-infotext",
    "a1111-skip-early",
    "a1111-sampler-params",
    "a1111-cfgpp",
    "a1111-cfgpp-scale",
];

/// The case's native request: the scheduler and the negative guidance (the early skip from
/// A1111's options; absent: off).
fn params_of(case: &serde_json::Value) -> GenerationParams {
    let native = &case["native"];
    GenerationParams {
        scheduler: Some(SchedulerKind::from_name(native["scheduler"].as_str().unwrap()).unwrap()),
        negative_guidance: NegativeGuidance {
            min_sigma: native["negative_guidance_min_sigma"]
                .as_f64()
                .unwrap_or(0.0),
            all_steps: native["negative_guidance_all_steps"]
                .as_bool()
                .unwrap_or(false),
            skip_early: case["options"]["skip_early_cond"].as_f64().unwrap_or(0.0),
        },
        ..common::sampler_case_params(case)
    }
}

#[test]
fn the_rules_that_skipped_are_the_entries_a1111_wrote() {
    let model = tiny_a();
    let (mut without_ngms, mut checked) = (0, 0);
    for stem in FIXTURES {
        let f = common::Fixtures::load(stem);
        for (label, case) in f.meta["cases"].as_object().unwrap() {
            let params = params_of(case);
            let skips = model.schedules().guidance_skips(&params).unwrap();
            let written = |key: &str| case["infotext"].get(key).is_some();
            assert_eq!(skips.early, written("Skip Early CFG"), "{stem} {label}");
            assert_eq!(skips.min_sigma, written("NGMS"), "{stem} {label}");
            let on = params.negative_guidance.min_sigma > 0.0;
            without_ngms += usize::from(on && !skips.min_sigma);
            checked += 1;
        }
    }
    // NGMS on and never skipping: the unreached sigma and the early skip covering it.
    assert_eq!(without_ngms, 2);
    assert!(checked > 20, "{checked}");
}

#[test]
fn images_match_a1111_s() {
    let f = common::Fixtures::load("a1111-guidance-infotext");
    let cases = f.meta["cases"].as_object().unwrap();
    let cases = cases.iter().map(|(label, case)| {
        let want = f.get(&format!("image.{label}"));
        (label.as_str(), params_of(case), want)
    });
    let all = image_failures(&tiny_a(), cases, 1, 0.01);
    assert!(all.is_empty(), "differ from A1111's: {all:?}");
}
