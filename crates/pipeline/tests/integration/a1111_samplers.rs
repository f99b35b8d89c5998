//! A1111 1.10's `Restart` (`restart`, `restart_karras`) against A1111's own `restart_sampler`
//! run by tools/make_a1111_sampler_fixtures.py (`a1111-samplers.json`): the sigma of every UNet
//! evaluation (the schedule swap from 20 steps, the restart segments, img2img's slice), their
//! count as the server announces it, and the images: each value within 1 of A1111's and a mean
//! absolute difference of at most 0.01 (float32 rounding flips a few values by one; a wrong
//! restart noise or a missed restart moves the mean by whole units).

use crate::common;

use std::ops::ControlFlow;

use candle_core::{DType, Device};
use sdserve_pipeline::pipeline::{GenerationParams, StableDiffusion};
use sdserve_pipeline::schedulers::restart::Restart;
use sdserve_pipeline::schedulers::{Scheduler, SchedulerConfig};

/// The bounds stated above.
const MEAN_BOUND: f64 = 0.01;
const MAX_BOUND: i32 = 1;

fn load() -> (serde_json::Map<String, serde_json::Value>, common::Fixtures) {
    let f = common::Fixtures::load("a1111-samplers");
    (f.meta["cases"].as_object().unwrap().clone(), f)
}

fn params_of(case: &serde_json::Value) -> GenerationParams {
    common::sampler_case_params(case)
}

#[test]
fn evaluations_are_a1111_s() {
    let (cases, _) = load();
    let model =
        StableDiffusion::load(&common::fixture_path("tiny-a"), &Device::Cpu, DType::F32).unwrap();
    let file: SchedulerConfig = sdserve_pipeline::error::read_json(
        &common::fixture_path("tiny-a").join("scheduler/scheduler_config.json"),
    )
    .unwrap();
    for (label, case) in &cases {
        let params = params_of(case);
        let want: Vec<f64> = case["evaluation_sigmas"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_f64().unwrap())
            .collect();
        let count = model.schedules().unet_evaluations(&params).unwrap();
        assert_eq!(count, want.len(), "{label}: evaluations");
        let kind = params.scheduler.unwrap();
        let mut restart = Restart::new(&kind.config(&file), params.steps).unwrap();
        let begin = match &params.init_image {
            None => 0,
            Some(init) => {
                let slice = params.step_rule.slice(params.steps, init.strength).unwrap();
                restart.first_index_of_step(slice.start)
            }
        };
        restart.set_begin_index(begin);
        let got = &restart.eval_sigmas()[begin..];
        assert_eq!(got.len(), want.len(), "{label}");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let rel = ((*g as f64 - w) / w).abs();
            assert!(
                rel < 2e-6,
                "{label}: evaluation {i}: {g} against A1111's {w}"
            );
        }
    }
    assert!(cases.keys().any(|k| k.contains("batch")));
    assert!(cases.keys().any(|k| k.contains("0.6.img2img")));
}

#[test]
fn images_match_a1111_s_restart() {
    let (cases, f) = load();
    let model =
        StableDiffusion::load(&common::fixture_path("tiny-a"), &Device::Cpu, DType::F32).unwrap();
    let mut failures = Vec::new();
    let mut images = 0;
    for (label, case) in &cases {
        let got = model
            .generate(&params_of(case), &mut |_| ControlFlow::Continue(()))
            .unwrap();
        failures.extend(common::tight_batch_failures(
            label,
            &got,
            f.get(&format!("image.{label}")),
            MAX_BOUND,
            MEAN_BOUND,
        ));
        images += got.len();
    }
    assert_eq!(images, 7);
    assert!(failures.is_empty(), "differ from A1111's: {failures:?}");
}
