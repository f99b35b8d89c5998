//! The sd-webui-controlnet extension's control modes against its formulas on diffusers'
//! pipeline (`tools/make_controlnet_mode_fixtures.py`): the final latents of tiny-a-vae8 with
//! the tiny ControlNets in each mode (one unit, a batch, two units of different modes, no
//! guidance, a pooling ControlNet), and the hires pass's soft weights forced on canny units.

use crate::common;

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use common::{fixture_path, max_abs_diff, read_png, request_params, Fixtures, ScratchDir};
use sdserve_pipeline::controlnet::preprocess::Preprocessor;
use sdserve_pipeline::controlnet::{ControlMode, ControlNet, ControlNetUnit, HiresOption};
use sdserve_pipeline::pipeline::{GenerationParams, StableDiffusion};

/// cn-a's folder with `global_pool_conditions` set, as the reference script makes it.
fn pooling_copy(scratch: &ScratchDir) -> PathBuf {
    let from = fixture_path("controlnet/cn-a");
    let to = scratch.0.join("cn-a-pool");
    std::fs::create_dir_all(&to).unwrap();
    for entry in std::fs::read_dir(&from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
    let path = to.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["global_pool_conditions"] = true.into();
    std::fs::write(&path, config.to_string()).unwrap();
    to
}

fn net_path(name: &str, scratch: &ScratchDir) -> PathBuf {
    match name {
        "cn-a" => fixture_path("controlnet/cn-a"),
        "cn-b" => fixture_path("controlnet/cn-b.pth"),
        "cn-a-pool" => pooling_copy(scratch),
        other => panic!("no ControlNet fixture {other}"),
    }
}

fn params_of(case: &serde_json::Value, scratch: &ScratchDir) -> GenerationParams {
    let controlnets = case["controlnets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| {
            let name = u["model"].as_str().unwrap();
            ControlNetUnit {
                model: Arc::new(ControlNet::new(name, net_path(name, scratch))),
                image: read_png(u["image"].as_str().unwrap()),
                preprocessor: None,
                scale: u["scale"].as_f64().unwrap(),
                guidance_start: u["guidance_start"].as_f64().unwrap(),
                guidance_end: u["guidance_end"].as_f64().unwrap(),
                hires_image: None,
                hr_option: HiresOption::Both,
                inpaint_crop: true,
                control_mode: ControlMode::from_name(u["control_mode"].as_str().unwrap()).unwrap(),
                mask: None,
                hires_mask: None,
                infotext: None,
            }
        })
        .collect();
    GenerationParams {
        batch_size: case["batch_size"].as_u64().unwrap() as usize,
        controlnets,
        ..request_params(case)
    }
}

fn model() -> StableDiffusion {
    StableDiffusion::load(&fixture_path("tiny-a-vae8"), &Device::Cpu, DType::F32).unwrap()
}

/// The latents after the last step (before the VAE), as diffusers' `output_type="latent"`.
fn final_latents(sd: &StableDiffusion, params: &GenerationParams) -> Tensor {
    let mut last = None;
    sd.generate(params, &mut |p| {
        if let Some(l) = p.latents {
            last = Some(l.clone());
        }
        ControlFlow::Continue(())
    })
    .unwrap();
    last.expect("no step ran")
}

/// Within float noise of the reference: 1e-4 of its largest magnitude (f32 against torch's
/// f32 over 8 steps; a mode's effect moves them by over 1e-2 of it).
fn latents_failure(label: &str, got: &Tensor, want: &Tensor) -> Option<String> {
    let scale = want.abs().unwrap().max_all().unwrap();
    let scale = scale.to_scalar::<f32>().unwrap();
    let d = max_abs_diff(got, want);
    eprintln!("{label}: max abs diff {d} (reference magnitude {scale})");
    (d > 1e-4 * scale).then(|| format!("{label}: max abs diff {d} (magnitude {scale})"))
}

#[test]
fn each_mode_weights_and_marks_the_residuals_as_the_extension() {
    let f = Fixtures::load("controlnet-modes");
    let sd = model();
    let scratch = ScratchDir::new("cn-modes");
    let cases = f.meta["cases"].as_object().unwrap();
    assert_eq!(cases.len(), 7);
    let mut failures = Vec::new();
    for (label, case) in cases {
        let got = final_latents(&sd, &params_of(case, &scratch));
        failures.extend(latents_failure(
            label,
            &got,
            f.get(&format!("latents.{label}")),
        ));
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn a_wrong_mode_is_outside_the_bounds() {
    // The check above fails when a unit's weights or rows are wrong: each case run in the
    // neighbouring mode lands far from its reference.
    let f = Fixtures::load("controlnet-modes");
    let sd = model();
    let scratch = ScratchDir::new("cn-modes-wrong");
    for (label, wrong) in [
        ("prompt", ControlMode::Balanced),
        ("controlnet", ControlMode::Prompt),
        ("controlnet-batch", ControlMode::Prompt),
    ] {
        let mut p = params_of(&f.meta["cases"][label], &scratch);
        p.controlnets[0].control_mode = wrong;
        let got = final_latents(&sd, &p);
        let want = f.get(&format!("latents.{label}"));
        assert!(
            latents_failure(label, &got, want).is_some(),
            "{label} in mode {wrong:?} matches"
        );
    }
    // Without guidance every row is the prompt's: "ControlNet is more important" is the soft
    // weights alone.
    let case = &f.meta["cases"]["controlnet-no-cfg"];
    let mut p = params_of(case, &scratch);
    p.controlnets[0].control_mode = ControlMode::Prompt;
    let got = final_latents(&sd, &p);
    assert!(
        latents_failure("no-cfg as prompt", &got, f.get("latents.controlnet-no-cfg")).is_none()
    );
}

#[test]
fn the_hires_pass_forces_soft_weights_on_canny_units() {
    // The extension's `high_res_fix_forced_soft_injection`: in the second pass a unit whose
    // preprocessor is canny takes the soft weights, as one in "My prompt is more important";
    // the first pass and a unit without a preprocessor keep their mode's.
    use sdserve_pipeline::pipeline::{Hires, Upscaler};
    let f = Fixtures::load("controlnet-modes");
    let sd = model();
    let scratch = ScratchDir::new("cn-modes-hires");
    let base = GenerationParams {
        steps: 4,
        hires: Some(Hires {
            width: 128,
            height: 128,
            upscale_width: 128,
            upscale_height: 128,
            upscaler: Upscaler::Resize,
            steps: 4,
            strength: 0.6,
            scheduler: None,
            schedule: None,
            prompt: None,
            negative_prompt: None,
        }),
        ..params_of(&f.meta["cases"]["balanced"], &scratch)
    };
    let canny = Preprocessor::Canny {
        low_threshold: 100.0,
        high_threshold: 200.0,
        resolution: 512,
    };
    let run = |option: HiresOption, preprocessor: Option<Preprocessor>, mode: ControlMode| {
        let mut p = base.clone();
        p.controlnets[0].hr_option = option;
        p.controlnets[0].preprocessor = preprocessor;
        p.controlnets[0].control_mode = mode;
        let mut last = None;
        sd.generate(&p, &mut |s| {
            if let Some(l) = s.latents {
                last = Some(l.clone());
            }
            ControlFlow::Continue(())
        })
        .unwrap();
        last.unwrap()
    };
    use ControlMode::{Balanced, Prompt};
    let high_canny = run(HiresOption::HighResOnly, Some(canny), Balanced);
    let high_soft = run(HiresOption::HighResOnly, None, Prompt);
    let high_plain = run(HiresOption::HighResOnly, None, Balanced);
    assert_eq!(max_abs_diff(&high_canny, &high_soft), 0.0);
    assert!(max_abs_diff(&high_canny, &high_plain) > 1e-2);
    // The first pass keeps the balanced weights.
    let low_canny = run(HiresOption::LowResOnly, Some(canny), Balanced);
    let low_plain = run(HiresOption::LowResOnly, None, Balanced);
    assert_eq!(max_abs_diff(&low_canny, &low_plain), 0.0);
}
