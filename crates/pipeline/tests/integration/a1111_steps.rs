//! img2img on A1111 1.10's step rule (`StepRule::A1111`, `A1111FixSteps`) against diffusers run
//! over the slice A1111's own `setup_img2img_steps` / `sample_img2img` give
//! (`tools/make_a1111_steps_fixtures.py`, `a1111-steps.json`): the images, the UNet evaluations
//! the step hook counts and the server announces, and the prompt schedule's span (A1111's
//! `p.steps`, not the stretched schedule). diffusers' rule gives other images. The `.noise` cases
//! add A1111's `img2img_extra_noise` and `initial_noise_multiplier`.

use crate::common;

use std::ops::ControlFlow;

use candle_core::{DType, Device, Tensor};
use sdserve_pipeline::pipeline::{GenerationParams, InitImage, StableDiffusion, StepRule};

fn load() -> (serde_json::Map<String, serde_json::Value>, Tensors) {
    let text = std::fs::read_to_string(common::fixture_path("a1111-steps.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let tensors = candle_core::safetensors::load(
        common::fixture_path("a1111-steps.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    (json["cases"].as_object().unwrap().clone(), tensors)
}

type Tensors = std::collections::HashMap<String, Tensor>;

fn params_of(case: &serde_json::Value) -> GenerationParams {
    GenerationParams {
        batch_size: case["batch_size"].as_u64().unwrap() as usize,
        init_image: Some(InitImage {
            image: common::read_png(case["init_image"].as_str().unwrap()),
            mask: None,
            strength: case["strength"].as_f64().unwrap(),
        }),
        step_rule: StepRule::from_name(case["step_rule"].as_str().unwrap()).unwrap(),
        noise_multiplier: case
            .get("noise_multiplier")
            .map_or(1.0, |v| v.as_f64().unwrap()),
        extra_noise: case.get("extra_noise").map_or(0.0, |v| v.as_f64().unwrap()),
        ..common::request_params(case)
    }
}

#[test]
fn a1111_img2img_matches_diffusers_over_a1111_s_slice() {
    let (cases, tensors) = load();
    let (failures, images) = common::image_case_failures(&cases, params_of, |label| {
        tensors[&format!("image.{label}")].clone()
    });
    assert_eq!(images, 18);
    assert!(
        failures.is_empty(),
        "differ from the reference: {failures:?}"
    );
}

/// The `.noise` cases (A1111's `img2img_extra_noise` and `initial_noise_multiplier`, on its own
/// `sample_img2img`s' start) miss the reference without them.
#[test]
fn the_noise_cases_need_the_multiplier_and_the_extra_noise() {
    let (cases, tensors) = load();
    let noise: serde_json::Map<_, _> = cases
        .into_iter()
        .filter(|(label, _)| label.ends_with(".noise"))
        .collect();
    assert_eq!(noise.len(), 5);
    let (failures, images) = common::image_case_failures(
        &noise,
        |case| GenerationParams {
            noise_multiplier: 1.0,
            extra_noise: 0.0,
            ..params_of(case)
        },
        |label| tensors[&format!("image.{label}")].clone(),
    );
    assert_eq!(failures.len(), images, "{failures:?}");
}

#[test]
fn evaluations_and_prompt_spans_follow_the_rule() {
    let (cases, _) = load();
    let model =
        StableDiffusion::load(&common::fixture_path("tiny-a"), &Device::Cpu, DType::F32).unwrap();
    for (label, case) in &cases {
        let params = params_of(case);
        let schedules = model.schedules();
        let want = case["evaluations"].as_u64().unwrap() as usize;
        assert_eq!(
            schedules.unet_evaluations(&params).unwrap(),
            want,
            "{label}"
        );
        let diffusers = GenerationParams {
            step_rule: StepRule::Diffusers,
            ..params.clone()
        };
        assert_eq!(
            schedules.unet_evaluations(&diffusers).unwrap(),
            case["diffusers_evaluations"].as_u64().unwrap() as usize,
            "{label}: diffusers' rule"
        );
        // A1111 schedules prompts over `p.steps` (times the sampler's order), whatever the
        // schedule the strength stretched.
        let order = if case["scheduler"] == "heun" { 2 } else { 1 };
        assert_eq!(
            schedules.prompt_steps(&params).unwrap(),
            (params.steps * order, None),
            "{label}"
        );
    }
    // A1111 counts `t_enc + 1` steps, as the first-order samplers' UNet evaluations.
    let case = &cases["dpmpp_2m.6.0.3.fix"];
    assert_eq!(case["a1111_count"], case["evaluations"]);
    assert_eq!(case["schedule_steps"], 20);
}

#[test]
fn the_step_hook_counts_the_steps_that_run() {
    let (cases, _) = load();
    let model =
        StableDiffusion::load(&common::fixture_path("tiny-a"), &Device::Cpu, DType::F32).unwrap();
    let case = &cases["lms.10.0.75.fix"];
    let mut seen = Vec::new();
    model
        .generate(&params_of(case), &mut |p| {
            seen.push((p.step, p.total));
            ControlFlow::Continue(())
        })
        .unwrap();
    let want: Vec<_> = (1..=10).map(|s| (s, 10)).collect();
    assert_eq!(seen, want);
}

/// The same requests on diffusers' rule miss the reference where the rules run other steps.
#[test]
fn diffusers_rule_gives_other_images() {
    let (cases, tensors) = load();
    let differing: serde_json::Map<_, _> = cases
        .into_iter()
        .filter(|(_, c)| c["evaluations"] != c["diffusers_evaluations"])
        .collect();
    assert!(differing.len() >= 8, "{}", differing.len());
    let (failures, images) = common::image_case_failures(
        &differing,
        |case| GenerationParams {
            step_rule: StepRule::Diffusers,
            ..params_of(case)
        },
        |label| tensors[&format!("image.{label}")].clone(),
    );
    assert_eq!(failures.len(), images, "{failures:?}");
}

/// A1111's own DDIM, PLMS and UniPC (`ddim_a1111`, `plms_a1111`, `unipc_a1111`), txt2img and
/// img2img, against its `sd_samplers_timesteps_impl` functions (and its `uni_pc.py`) run by
/// `tools/make_a1111_timestep_sampler_fixtures.py` (`a1111-timestep-samplers.json`);
/// diffusers' DDIM, PNDM and UniPC give other images.
mod a1111_timestep_samplers {
    use super::*;
    use sdserve_pipeline::schedulers::SchedulerKind;

    fn load() -> (serde_json::Map<String, serde_json::Value>, Tensors) {
        let path = common::fixture_path("a1111-timestep-samplers.json");
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let tensors = candle_core::safetensors::load(
            common::fixture_path("a1111-timestep-samplers.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        (json["cases"].as_object().unwrap().clone(), tensors)
    }

    fn params_of(case: &serde_json::Value) -> GenerationParams {
        let base = GenerationParams {
            batch_size: case["batch_size"].as_u64().unwrap() as usize,
            ..common::request_params(case)
        };
        match case.get("init_image") {
            None => base,
            Some(_) => GenerationParams {
                step_rule: StepRule::from_name(case["step_rule"].as_str().unwrap()).unwrap(),
                ..params_of_image(case, base)
            },
        }
    }

    fn params_of_image(case: &serde_json::Value, base: GenerationParams) -> GenerationParams {
        GenerationParams {
            init_image: Some(InitImage {
                image: common::read_png(case["init_image"].as_str().unwrap()),
                mask: None,
                strength: case["strength"].as_f64().unwrap(),
            }),
            ..base
        }
    }

    #[test]
    fn images_match_a1111_s_own_samplers() {
        let (cases, tensors) = load();
        let (failures, images) = common::image_case_failures(&cases, params_of, |label| {
            tensors[&format!("image.{label}")].clone()
        });
        assert_eq!(images, 28);
        assert!(failures.is_empty(), "differ from A1111's: {failures:?}");
    }

    #[test]
    fn unet_evaluations_are_a1111_s() {
        let (cases, _) = load();
        let mut models = std::collections::HashMap::new();
        for (label, case) in &cases {
            let name = case["model"].as_str().unwrap();
            let model = models.entry(name).or_insert_with(|| {
                StableDiffusion::load(&common::fixture_path(name), &Device::Cpu, DType::F32)
                    .unwrap()
            });
            assert_eq!(
                model
                    .schedules()
                    .unet_evaluations(&params_of(case))
                    .unwrap(),
                case["unet_evaluations"].as_u64().unwrap() as usize,
                "{label}"
            );
        }
    }

    /// The latents after the last step (the step hook's), per model.
    fn final_latents(
        cases: &serde_json::Map<String, serde_json::Value>,
        params_of: impl Fn(&serde_json::Value) -> GenerationParams,
    ) -> Vec<(String, Tensor)> {
        let mut models = std::collections::HashMap::new();
        cases
            .iter()
            .map(|(label, case)| {
                let name = case["model"].as_str().unwrap();
                let model = models.entry(name).or_insert_with(|| {
                    StableDiffusion::load(&common::fixture_path(name), &Device::Cpu, DType::F32)
                        .unwrap()
                });
                let mut last = None;
                model
                    .generate(&params_of(case), &mut |p| {
                        if let Some(l) = p.latents {
                            last = Some(l.to_dtype(DType::F32).unwrap());
                        }
                        ControlFlow::Continue(())
                    })
                    .unwrap();
                (label.clone(), last.expect("a step ran"))
            })
            .collect()
    }

    /// A1111's samples to float noise (the images above hide small differences: the tiny
    /// models' decoders are forgiving), and diffusers' DDIM and PNDM (the dialect's mapping
    /// before) far from every one of them.
    #[test]
    fn latents_match_a1111_s_and_not_diffusers() {
        let (cases, tensors) = load();
        let want = |label: &str| tensors[&format!("latents.{label}")].clone();
        // The UNet's float noise over up to 10 evaluations (latents of magnitude about 1-4).
        let mut worst = 0f32;
        for (label, got) in final_latents(&cases, params_of) {
            let d = common::max_abs_diff(&got, &want(&label));
            eprintln!("{label}: max abs diff {d:e}");
            worst = worst.max(d);
        }
        assert!(worst < 1e-3, "{worst}");
        let diffusers = |case: &serde_json::Value| {
            let kind = match case["scheduler"].as_str().unwrap() {
                "ddim_a1111" => SchedulerKind::Ddim,
                "plms_a1111" => SchedulerKind::Pndm,
                "unipc_a1111" => SchedulerKind::UniPc,
                other => panic!("{other}"),
            };
            GenerationParams {
                scheduler: Some(kind),
                ..params_of(case)
            }
        };
        for (label, got) in final_latents(&cases, diffusers) {
            let d = common::max_abs_diff(&got, &want(&label));
            eprintln!("{label}, diffusers' scheduler: max abs diff {d}");
            assert!(
                d > 1e-2,
                "{label}: diffusers' scheduler gives A1111's latents ({d})"
            );
        }
    }

    /// UniPC's model times (fractional, float32) are the ones A1111's UNet got: the run's
    /// length, its start (img2img's `t_start`) and the float32 rounding that picks a
    /// v-prediction model's `alphas_cumprod` row.
    #[test]
    fn unipc_model_times_are_a1111_s() {
        let (cases, _) = load();
        let model =
            StableDiffusion::load(&common::fixture_path("tiny-a"), &Device::Cpu, DType::F32)
                .unwrap();
        let mut checked = 0;
        for (label, case) in cases
            .iter()
            .filter(|(_, c)| c["scheduler"] == "unipc_a1111")
        {
            let params = params_of(case);
            let (scheduler, begin) = model
                .schedules()
                .schedule(
                    params.scheduler,
                    None,
                    params.steps,
                    params.init_start(),
                    None,
                    Default::default(),
                )
                .unwrap();
            let got: Vec<f32> = scheduler.timesteps()[begin..]
                .iter()
                .map(|&t| t as f32)
                .collect();
            let want: Vec<f32> = case["model_times"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_f64().unwrap() as f32)
                .collect();
            assert_eq!(got, want, "{label}");
            checked += 1;
        }
        assert_eq!(checked, 12);
    }

    /// One step is a single timestep and no update: A1111 hands back the noise, and so do we
    /// (no step runs, nothing fails).
    #[test]
    fn one_step_runs_no_update() {
        let (cases, _) = load();
        let model =
            StableDiffusion::load(&common::fixture_path("tiny-a"), &Device::Cpu, DType::F32)
                .unwrap();
        for kind in [SchedulerKind::DdimA1111, SchedulerKind::PlmsA1111] {
            let params = GenerationParams {
                steps: 1,
                scheduler: Some(kind),
                ..params_of(&cases["ddim.10"])
            };
            let mut steps = 0;
            let images = model
                .generate(&params, &mut |_| {
                    steps += 1;
                    ControlFlow::Continue(())
                })
                .unwrap();
            assert_eq!((images.len(), steps), (1, 0), "{kind}");
            assert_eq!(model.schedules().unet_evaluations(&params).unwrap(), 0);
        }
    }
}
