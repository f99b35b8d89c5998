//! A1111's hires fix: the latent upscale modes against torch's `interpolate` (and the `Nearest`
//! upscaler against Pillow), references from `tools/make_interpolate_fixtures.py`; whole
//! passes against A1111's own `sample_hr_pass` between diffusers' passes
//! (`tools/make_upscale_hires_fixtures.py`: its sizes, the 8-bit truncation, the crop of the
//! latents, A1111's step rule for the pass); the pass on a tiny model against the same steps done by hand (txt2img, A1111's
//! truncation, resize, img2img).

use crate::common;

use common::{fixture_path, generate_one};

use std::collections::HashMap;
use std::ops::ControlFlow;

use candle_core::{DType, Device, Tensor};
use sdserve_pipeline::image_in::{resize_lanczos, resize_nearest};
use sdserve_pipeline::interpolate::{interpolate, Interpolation, InterpolationMode};
use sdserve_pipeline::pipeline::{
    GenerationParams, Hires, InitImage, RgbImage, StableDiffusion, StepRule, Upscaler,
};
use sdserve_pipeline::schedulers::{SchedulerKind, SigmaSchedule};
use sdserve_pipeline::PipelineError;

fn references() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture_path("interpolate.safetensors"), &Device::Cpu)
        .expect("tools/make_interpolate_fixtures.py output")
}

#[test]
fn latent_modes_match_torch_interpolate() {
    let refs = references();
    let input = &refs["input"];
    let modes = [
        ("bilinear", InterpolationMode::Bilinear, false),
        ("bilinear.aa", InterpolationMode::Bilinear, true),
        ("bicubic", InterpolationMode::Bicubic, false),
        ("bicubic.aa", InterpolationMode::Bicubic, true),
        ("nearest", InterpolationMode::Nearest, false),
        ("nearest-exact", InterpolationMode::NearestExact, false),
    ];
    let mut checked = 0;
    for (name, mode, antialias) in modes {
        for (key, want) in refs.iter().filter(|(k, _)| {
            k.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix('.'))
                .is_some_and(|size| size.contains('x') && !size.contains('.'))
        }) {
            let (_, _, h, w) = want.dims4().unwrap();
            let got = interpolate(input, h, w, Interpolation { mode, antialias }).unwrap();
            let diff = common::max_abs_diff(&got, want);
            // Nearest copies values: exact. The others are f32 sums of a few products; torch's
            // vectorised kernels order and fuse them otherwise, which leaves a few f32 ulps (the
            // values are about +-10 here, an ulp about 1e-6; measured at most 6.7e-6).
            let tolerance = match mode {
                InterpolationMode::Nearest | InterpolationMode::NearestExact => 0.0,
                _ => 1e-5,
            };
            assert!(diff <= tolerance, "{key}: max |ours - torch| = {diff}");
            checked += 1;
        }
    }
    assert_eq!(checked, 30, "every mode at every size");
}

#[test]
fn nearest_image_resize_matches_pillow() {
    let refs = references();
    let rgb = |t: &Tensor| {
        let (h, w, _) = t.dims3().unwrap();
        RgbImage {
            width: w as u32,
            height: h as u32,
            pixels: t.flatten_all().unwrap().to_vec1::<u8>().unwrap(),
        }
    };
    let image = rgb(&refs["image"]);
    let mut checked = 0;
    for (key, want) in refs.iter().filter(|(k, _)| k.starts_with("pil_nearest.")) {
        let want = rgb(want);
        let got = resize_nearest(&image, want.width as usize, want.height as usize);
        assert!(got == want, "{key}");
        checked += 1;
    }
    assert_eq!(checked, 5);
}

fn tiny() -> StableDiffusion {
    StableDiffusion::load(&fixture_path("tiny-a-vae8"), &Device::Cpu, DType::F32).unwrap()
}

fn first_pass(seed: u64, batch_size: usize) -> GenerationParams {
    GenerationParams {
        prompt: "a lighthouse".into(),
        negative_prompt: "fog".into(),
        steps: 4,
        width: 64,
        height: 48,
        seed,
        guidance_scale: 6.0,
        scheduler: Some(SchedulerKind::Euler),
        batch_size,
        ..Default::default()
    }
}

fn hires(upscaler: Upscaler) -> Hires {
    Hires {
        width: 128,
        height: 96,
        upscale_width: 128,
        upscale_height: 96,
        upscaler,
        steps: 6,
        strength: 0.5,
        scheduler: None,
        schedule: None,
        prompt: None,
        negative_prompt: None,
    }
}

fn run(model: &StableDiffusion, params: &GenerationParams) -> Vec<RgbImage> {
    model
        .generate(params, &mut |_| ControlFlow::Continue(()))
        .unwrap()
}

/// The first pass's image as the hires fix takes it: its last latents decoded, then A1111's
/// `(255. * clamp((x + 1) / 2)).astype(np.uint8)`, which truncates.
fn first_image(model: &StableDiffusion, params: &GenerationParams) -> RgbImage {
    let mut last = None;
    model
        .generate(params, &mut |p| {
            last = p.latents.cloned();
            ControlFlow::Continue(())
        })
        .unwrap();
    let image = model.decode_latents(&last.unwrap()).unwrap();
    let (_, _, h, w) = image.dims4().unwrap();
    let hwc = image.get(0).unwrap().permute((1, 2, 0)).unwrap();
    let values = hwc.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    RgbImage {
        width: w as u32,
        height: h as u32,
        pixels: values
            .iter()
            .map(|x| (255.0 * ((x + 1.0) / 2.0).clamp(0.0, 1.0)) as u8)
            .collect(),
    }
}

/// txt2img, then the image resized, then img2img of it at the larger size, by hand.
fn by_hand(model: &StableDiffusion, seed: u64, resize: impl Fn(&RgbImage) -> RgbImage) -> RgbImage {
    let low = first_image(model, &first_pass(seed, 1));
    let h = hires(Upscaler::Resize);
    let params = GenerationParams {
        steps: h.steps,
        width: h.width,
        height: h.height,
        init_image: Some(InitImage {
            image: resize(&low),
            mask: None,
            strength: h.strength,
        }),
        ..first_pass(seed, 1)
    };
    generate_one(model, &params)
}

#[test]
fn image_upscalers_equal_txt2img_resize_img2img_by_hand() {
    let model = tiny();
    let lanczos = by_hand(&model, 21, |im| resize_lanczos(im, 128, 96));
    for upscaler in [Upscaler::Resize, Upscaler::Lanczos] {
        let params = GenerationParams {
            hires: Some(hires(upscaler.clone())),
            ..first_pass(21, 1)
        };
        let got = run(&model, &params);
        assert_eq!((got[0].width, got[0].height), (128, 96));
        assert!(got[0] == lanczos, "{upscaler:?}");
    }
    // Nearest: Pillow's nearest to the size, the Lanczos steps after it are no-ops here.
    let nearest = by_hand(&model, 21, |im| resize_nearest(im, 128, 96));
    let params = GenerationParams {
        hires: Some(hires(Upscaler::Nearest)),
        ..first_pass(21, 1)
    };
    assert!(run(&model, &params)[0] == nearest);
    assert!(nearest != lanczos);
}

#[test]
fn a_batch_runs_each_image_with_its_own_seed() {
    let model = tiny();
    let params = GenerationParams {
        hires: Some(hires(Upscaler::Resize)),
        ..first_pass(30, 2)
    };
    let batch = run(&model, &params);
    assert_eq!(batch.len(), 2);
    let second = by_hand(&model, 31, |im| resize_lanczos(im, 128, 96));
    let (max, _) = common::pixel_difference(&batch[1].pixels, &second.pixels);
    // The UNet's batch of 2 may round differently from a batch of 1.
    assert!(
        max <= 2.0,
        "image 1 of the batch vs seed 31 alone: max diff {max}"
    );
    assert!(batch[0] != batch[1]);
}

#[test]
fn latent_upscalers_run_at_the_larger_size_and_differ_by_mode() {
    let model = tiny();
    let mut images = Vec::new();
    for mode in [InterpolationMode::Bilinear, InterpolationMode::Nearest] {
        let params = GenerationParams {
            hires: Some(hires(Upscaler::Latent(Interpolation {
                mode,
                antialias: false,
            }))),
            ..first_pass(5, 1)
        };
        let image = run(&model, &params).remove(0);
        assert_eq!((image.width, image.height), (128, 96));
        images.push(image);
    }
    assert!(images[0] != images[1]);
    // A crop (both sides given, other aspect): upscaled to 128x128, 2 cells off the top.
    let params = GenerationParams {
        hires: Some(Hires {
            upscale_width: 128,
            upscale_height: 128,
            ..hires(Upscaler::Latent(Interpolation {
                mode: InterpolationMode::Bilinear,
                antialias: false,
            }))
        }),
        ..first_pass(5, 1)
    };
    let cropped = run(&model, &params).remove(0);
    assert_eq!((cropped.width, cropped.height), (128, 96));
}

#[test]
fn progress_counts_both_passes_and_cancelling_stops_the_second() {
    let model = tiny();
    let params = GenerationParams {
        hires: Some(hires(Upscaler::Resize)),
        ..first_pass(8, 1)
    };
    let mut seen = Vec::new();
    model
        .generate(&params, &mut |p| {
            seen.push((p.step, p.total, p.latents.map(|l| l.dims4().unwrap().3)));
            ControlFlow::Continue(())
        })
        .unwrap();
    // Euler: 4 steps at 64x48 (latent width 8), then int(6 * 0.5) = 3 at 128x96 (16).
    let want: Vec<_> = (1..=7)
        .map(|s| (s, 7, Some(if s <= 4 { 8 } else { 16 })))
        .collect();
    assert_eq!(seen, want);

    let mut steps = 0;
    let err = model
        .generate(&params, &mut |p| {
            steps = p.step;
            if p.step == 5 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap_err();
    assert!(matches!(err, PipelineError::Cancelled), "{err:?}");
    assert_eq!(steps, 5);
}

#[test]
fn bad_second_passes_are_refused_before_any_step() {
    let model = tiny();
    let cases = [
        Hires {
            strength: 0.1,
            ..hires(Upscaler::Resize)
        },
        Hires {
            width: 100,
            ..hires(Upscaler::Resize)
        },
        Hires {
            upscale_width: 64,
            ..hires(Upscaler::Resize)
        },
    ];
    for h in cases {
        let params = GenerationParams {
            hires: Some(h.clone()),
            ..first_pass(1, 1)
        };
        let mut steps = 0;
        let err = model
            .generate(&params, &mut |_| {
                steps += 1;
                ControlFlow::Continue(())
            })
            .unwrap_err();
        assert!(
            matches!(err, PipelineError::InvalidRequest(_)),
            "{h:?}: {err:?}"
        );
        assert_eq!(steps, 0, "{h:?}");
    }
}

/// A1111's hires timeline: `[lighthouse:castle:1.2]` (and `:5`, a step number counted from the
/// first pass's start) is the lighthouse for the whole first pass (4 steps) and switches at
/// the hires schedule's step 1 (of 6); the pass's 3 evaluations count from 0 as img2img's do.
/// So it equals txt2img of the lighthouse, resized, then img2img of `[lighthouse:castle:1]`.
#[test]
fn prompt_editing_goes_on_in_the_hires_pass() {
    let model = tiny();
    let a1111 = |prompt: &str, base: GenerationParams| GenerationParams {
        prompt: prompt.into(),
        prompt_syntax: sdserve_pipeline::pipeline::PromptSyntax::A1111,
        ..base
    };
    let low = first_image(&model, &a1111("a lighthouse", first_pass(21, 1)));
    let h = hires(Upscaler::Lanczos);
    let img2img = GenerationParams {
        steps: h.steps,
        width: h.width,
        height: h.height,
        init_image: Some(InitImage {
            image: resize_lanczos(&low, 128, 96),
            mask: None,
            strength: h.strength,
        }),
        ..a1111("a [lighthouse:castle:1]", first_pass(21, 1))
    };
    let by_hand = generate_one(&model, &img2img);
    let hires_of = |prompt: &str| {
        let params = GenerationParams {
            hires: Some(hires(Upscaler::Lanczos)),
            ..a1111(prompt, first_pass(21, 1))
        };
        run(&model, &params).remove(0)
    };
    for prompt in ["a [lighthouse:castle:1.2]", "a [lighthouse:castle:5]"] {
        let got = hires_of(prompt);
        let (mean, _) = common::pixel_difference(&got.pixels, &by_hand.pixels);
        assert!(mean < 0.01, "{prompt}: mean abs diff {mean}");
    }
    let unedited = hires_of("a lighthouse");
    let (apart, _) = common::pixel_difference(&unedited.pixels, &by_hand.pixels);
    assert!(apart > 0.05, "the edit changes the hires pass ({apart})");
}

#[test]
fn a_pass_of_its_own_runs_on_its_own_schedule() {
    // A1111's `hr_scheduler`: the first pass's sampler (Euler) on another schedule type.
    let model = tiny();
    let own = |schedule| GenerationParams {
        hires: Some(Hires {
            scheduler: Some(SchedulerKind::Euler),
            schedule,
            ..hires(Upscaler::Resize)
        }),
        ..first_pass(21, 1)
    };
    let exponential = run(&model, &own(Some(SigmaSchedule::Exponential))).remove(0);
    // The same as img2img of the resized first pass on that schedule, by hand.
    let low = first_image(&model, &first_pass(21, 1));
    let h = hires(Upscaler::Resize);
    let by_hand = generate_one(
        &model,
        &GenerationParams {
            steps: h.steps,
            width: h.width,
            height: h.height,
            schedule: Some(SigmaSchedule::Exponential),
            init_image: Some(InitImage {
                image: resize_lanczos(&low, 128, 96),
                mask: None,
                strength: h.strength,
            }),
            ..first_pass(21, 1)
        },
    );
    assert!(exponential == by_hand);
    // Not the first pass's schedule (uniform), which the pass runs without one of its own.
    let uniform = run(&model, &own(None)).remove(0);
    assert!(exponential != uniform);
    let (mean, _) = common::pixel_difference(&exponential.pixels, &uniform.pixels);
    eprintln!("hires on exponential vs uniform sigmas: mean abs diff {mean:.2}");
}

/// A1111's own `sample_hr_pass` between diffusers' passes (`upscale-hires.*`): the upscale to
/// `hr_upscale_to_x/y` exactly (100x75, 83x62: not whole cells), the first image truncated to
/// 8 bits, the crop of the latents (`truncate_x/y`) after the encode or the interpolation.
#[test]
fn hires_passes_match_a1111s_sample_hr_pass_between_diffusers_passes() {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture_path("upscale-hires.json")).unwrap())
            .unwrap();
    let tensors =
        candle_core::safetensors::load(fixture_path("upscale-hires.safetensors"), &Device::Cpu)
            .expect("tools/make_upscale_hires_fixtures.py output");
    let first = &json["first_pass"];
    let model = tiny();
    let mut failures = Vec::new();
    let cases = json["cases"].as_object().unwrap();
    for (label, case) in cases {
        let n = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap() as usize;
        let name = case["upscaler"].as_str().unwrap();
        let upscaler = match name {
            "None" => Upscaler::Resize,
            "Lanczos" => Upscaler::Lanczos,
            "Nearest" => Upscaler::Nearest,
            "Latent" => Upscaler::Latent(Interpolation {
                mode: InterpolationMode::Bilinear,
                antialias: false,
            }),
            "Latent (bicubic antialiased)" => Upscaler::Latent(Interpolation {
                mode: InterpolationMode::Bicubic,
                antialias: true,
            }),
            other => panic!("{other}"),
        };
        let params = GenerationParams {
            prompt: first["prompt"].as_str().unwrap().into(),
            negative_prompt: first["negative_prompt"].as_str().unwrap().into(),
            steps: n(first, "steps"),
            width: n(first, "width"),
            height: n(first, "height"),
            seed: case["seed"].as_u64().unwrap(),
            guidance_scale: first["guidance_scale"].as_f64().unwrap(),
            scheduler: SchedulerKind::from_name(first["scheduler"].as_str().unwrap()),
            hires: Some(Hires {
                width: n(case, "width"),
                height: n(case, "height"),
                upscale_width: n(case, "upscale_width"),
                upscale_height: n(case, "upscale_height"),
                upscaler,
                steps: n(case, "hires_steps"),
                strength: case["strength"].as_f64().unwrap(),
                scheduler: None,
                schedule: None,
                prompt: None,
                negative_prompt: None,
            }),
            // A1111's pass: its steps of a stretched schedule.
            step_rule: StepRule::A1111,
            ..Default::default()
        };
        let image = run(&model, &params).remove(0);
        let want = &tensors[&format!("image.{label}")];
        let (h, w, _) = want.dims3().unwrap();
        assert_eq!(
            (image.width as usize, image.height as usize),
            (w, h),
            "{label}"
        );
        failures.extend(common::image_failure(label, &image.pixels, want));
        // Tighter than image_failure's bound: measured at most 0.0071 here, where rounding
        // the first image (rather than truncating it) gives 0.09 and more.
        let want: Vec<u8> = want.flatten_all().unwrap().to_vec1().unwrap();
        let (mean, _) = common::pixel_difference(&image.pixels, &want);
        assert!(mean < 0.03, "{label}: mean abs diff {mean}");
    }
    assert_eq!(cases.len(), 5);
    assert!(failures.is_empty(), "differ from A1111's: {failures:?}");
}
