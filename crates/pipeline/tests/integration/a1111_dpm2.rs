//! A1111's `DPM2` and `DPM2 a` (`dpm2_a1111`, `dpm2_a_a1111`) against k-diffusion 0.1.1.post1's
//! own `sample_dpm_2` and `sample_dpm_2_ancestral` on A1111 1.10's sigmas: the schedule of
//! `steps + 1` with the next-to-last dropped (tools/make_a1111_dpm2_fixtures.py,
//! `a1111-dpm2.json`): Automatic (uniform), Karras and Exponential schedules, churn with
//! `s_tmin`/`s_tmax`/`s_noise` on DPM2, eta 1, 0.5 and 0 on DPM2 a, batches of two, img2img at
//! 0.6 on A1111's rule. The sigma of every UNet evaluation, their count as the run reports it,
//! and the images. Bound: every byte within 1 of the reference and a mean absolute difference of
//! at most 0.01 per image (float32 rounding flips a few values by one; a kept sigma, a churn
//! gamma over the wrong length or a missed noise draw moves the mean by whole units).

use crate::common;

use std::ops::ControlFlow;

use candle_core::{DType, Device};
use common::{fixture_path, Fixtures};
use sdserve_pipeline::pipeline::{GenerationParams, RgbImage, StableDiffusion};
use sdserve_pipeline::schedulers::{self, Churn, SchedulerConfig, SchedulerKind, SigmaSchedule};

const MAX_BYTE_DIFF: i32 = 1;
const MAX_MEAN_DIFF: f64 = 0.01;

fn params_of(case: &serde_json::Value) -> GenerationParams {
    let num = |k: &str| case[k].as_f64().unwrap();
    GenerationParams {
        eta: Some(num("eta")),
        schedule: Some(SigmaSchedule::from_name(case["schedule"].as_str().unwrap()).unwrap()),
        churn: Churn {
            churn: num("sigma_churn"),
            tmin: num("sigma_tmin"),
            tmax: match num("sigma_tmax") {
                0.0 => f64::INFINITY,
                t => t,
            },
            noise: num("sigma_noise"),
        },
        ..common::sampler_case_params(case)
    }
}

fn load() -> (Fixtures, StableDiffusion) {
    let f = Fixtures::load("a1111-dpm2");
    let model = StableDiffusion::load(&fixture_path("tiny-a"), &Device::Cpu, DType::F32)
        .expect("tiny-a loads");
    (f, model)
}

#[test]
fn evaluations_are_k_diffusion_s() {
    let (f, model) = load();
    let file: SchedulerConfig = sdserve_pipeline::error::read_json(
        &fixture_path("tiny-a").join("scheduler/scheduler_config.json"),
    )
    .unwrap();
    for (label, case) in f.meta["cases"].as_object().unwrap() {
        let params = params_of(case);
        let want: Vec<f64> = case["eval_sigmas"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_f64().unwrap())
            .collect();
        assert_eq!(
            model.schedules().unet_evaluations(&params).unwrap(),
            want.len(),
            "{label}: evaluations"
        );
        let kind = params.scheduler.unwrap();
        let mut s =
            schedulers::build_with(kind, params.schedule.unwrap(), &file, params.steps).unwrap();
        s.set_eta(params.eta.unwrap());
        if kind.takes_churn() {
            s.set_churn(params.churn);
        }
        let begin = match &params.init_image {
            None => 0,
            Some(init) => {
                let slice = params.step_rule.slice(params.steps, init.strength).unwrap();
                s.first_index_of_step(slice.start)
            }
        };
        s.set_begin_index(begin);
        let got: Vec<f64> = (begin..s.timesteps().len())
            .map(|i| s.guidance_sigma(i).unwrap())
            .collect();
        assert_eq!(got.len(), want.len(), "{label}");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let rel = ((g - w) / w).abs();
            assert!(rel < 2e-6, "{label}: evaluation {i}: {g} against {w}");
        }
    }
}

fn run(model: &StableDiffusion, params: &GenerationParams) -> (Vec<RgbImage>, usize) {
    let mut reports = 0;
    let images = model
        .generate(params, &mut |_| {
            reports += 1;
            ControlFlow::Continue(())
        })
        .expect("generates");
    (images, reports)
}

#[test]
fn images_match_k_diffusion_as_a1111_runs_it() {
    let (f, model) = load();
    let cases = f.meta["cases"].as_object().unwrap();
    assert_eq!(cases.len(), 11);
    let mut failures = Vec::new();
    for (label, case) in cases {
        let (images, reports) = run(&model, &params_of(case));
        let evaluations = case["eval_sigmas"].as_array().unwrap().len();
        assert_eq!(reports, evaluations, "{label}");
        failures.extend(common::tight_batch_failures(
            label,
            &images,
            f.get(&format!("image.{label}")),
            MAX_BYTE_DIFF,
            MAX_MEAN_DIFF,
        ));
    }
    assert!(failures.is_empty(), "differ from k-diffusion: {failures:?}");
}

/// diffusers' KDPM2 classes (`dpm2`, `dpm2_a`: the next-to-last sigma kept, their own
/// interpolation) are another run: every one of their images leaves the bound.
#[test]
fn diffusers_kdpm2_is_another_run() {
    let (f, model) = load();
    for label in ["dpm2.automatic", "dpm2_a.automatic", "dpm2.karras.batch"] {
        let case = &f.meta["cases"][label];
        let native = match case["scheduler"].as_str().unwrap() {
            "dpm2_a1111" => SchedulerKind::Dpm2,
            _ => SchedulerKind::Dpm2Ancestral,
        };
        let params = GenerationParams {
            scheduler: Some(native),
            ..params_of(case)
        };
        let (images, _) = run(&model, &params);
        let failures = common::tight_batch_failures(
            label,
            &images,
            f.get(&format!("image.{label}")),
            MAX_BYTE_DIFF,
            MAX_MEAN_DIFF,
        );
        assert_eq!(failures.len(), images.len(), "{label}: {failures:?}");
    }
}
