//! What the tests of A1111's guidance options share (a1111_sampler_params, a1111_skip_early,
//! a1111_cfgpp): the tiny model their fixtures ran, the first pass's scheduler, the evaluations
//! that skip the negative prompt under our rule, and the images against A1111's.

use candle_core::{DType, Device, Tensor};
use sdserve_pipeline::pipeline::{GenerationParams, StableDiffusion};
use sdserve_pipeline::schedulers::Scheduler;

/// The model the A1111 guidance fixtures were made with.
pub fn tiny_a() -> StableDiffusion {
    StableDiffusion::load(&super::fixture_path("tiny-a"), &Device::Cpu, DType::F32).unwrap()
}

/// A JSON list of numbers.
pub fn numbers(v: &serde_json::Value) -> Vec<f64> {
    let list = v.as_array().unwrap().iter();
    list.map(|s| s.as_f64().unwrap()).collect()
}

/// The first pass's scheduler and the schedule index it begins at, as the pipeline makes them
/// for `params`.
pub fn first_pass(
    model: &StableDiffusion,
    params: &GenerationParams,
) -> (Box<dyn Scheduler>, usize) {
    let schedules = model.schedules();
    let start = params.init_start();
    let (kind, churn) = (params.scheduler, params.churn);
    schedules
        .schedule(kind, None, params.steps, start, None, churn)
        .unwrap()
}

/// The first pass's evaluations (of `evaluations`) that skip the negative prompt under
/// `params.negative_guidance`, as A1111 counts its total steps (the pass's steps times the
/// scheduler's order); `sigma(i)` is what NGMS compares at evaluation `i`.
pub fn skipped_evaluations(
    params: &GenerationParams,
    scheduler: &dyn Scheduler,
    evaluations: usize,
    sigma: impl Fn(usize) -> f64,
) -> Vec<f64> {
    let total = params.steps_run() * scheduler.order();
    let guidance = &params.negative_guidance;
    (0..evaluations)
        .filter(|&i| guidance.skips(i, total, || Ok(sigma(i))).unwrap())
        .map(|i| i as f64)
        .collect()
}

/// Each case's images (`image.<label>` of its fixtures) against ours within `max` per value and
/// `mean` on average: the failures, one line each.
pub fn image_failures<'a>(
    model: &StableDiffusion,
    cases: impl IntoIterator<Item = (&'a str, GenerationParams, &'a Tensor)>,
    max: i32,
    mean: f64,
) -> Vec<String> {
    let mut all = Vec::new();
    for (label, params, want) in cases {
        let got = super::generate(model, &params);
        all.extend(super::tight_batch_failures(label, &got, want, max, mean));
    }
    all
}
