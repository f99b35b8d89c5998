//! A1111's seed resize (`seed_resize_from_w`/`_h`): our starting noise against A1111's own
//! `ImageRNG` run by torch on the CPU noise of the same seeds
//! (`tools/make_seed_resize_fixtures.py`): `first()` for each image, and the draw after it
//! (`next()`), which shows each image's generator goes on from the same place. And whole
//! images: diffusers' pipelines with A1111's `ImageRNG.first()` as their starting noise
//! (`tools/make_seed_resize_images.py`), in every mode.

use crate::common;

use common::{
    fixture_path, image_case_failures, max_abs_diff, pixel_difference, read_png, request_params,
    Fixtures,
};

use candle_core::{DType, Device};
use sdserve_pipeline::pipeline::{
    image_noise, resized_image_noise, GenerationParams, InitImage, SeedResize, StableDiffusion,
    Variation,
};
use sdserve_pipeline::rng::TorchRng;

#[test]
fn seed_resize_noise_matches_a1111_image_rng() {
    let fixtures = Fixtures::load("seed_resize");
    let cases = fixtures.meta["cases"].as_object().unwrap();
    assert_eq!(cases.len(), 8);
    for (label, case) in cases {
        let ints = |k: &str| -> Vec<i64> {
            case[k]
                .as_array()
                .map(|a| a.iter().map(|v| v.as_i64().unwrap()).collect())
                .unwrap_or_default()
        };
        let (seeds, subseeds, dims) = (ints("seeds"), ints("subseeds"), ints("shape"));
        let strength = case["subseed_strength"].as_f64().unwrap();
        let from_w = case["seed_resize_from_w"].as_i64().unwrap();
        let from_h = case["seed_resize_from_h"].as_i64().unwrap();
        let shape = (dims[0] as usize, dims[1] as usize, dims[2] as usize);
        let noise = fixtures.get(&format!("noise.{label}"));
        let next = fixtures.get(&format!("next.{label}"));
        for (i, &seed) in seeds.iter().enumerate() {
            let seed = seed as u64;
            let variation = subseeds.get(i).map(|&s| (s as u64, strength));
            let mut rng = TorchRng::new(seed);
            // A1111: on when both sides are above 0; `from // 8` latent cells.
            let ours = if from_w > 0 && from_h > 0 {
                let from = ((from_h / 8) as usize, (from_w / 8) as usize);
                resized_image_noise(&mut rng, seed, variation, from, shape, &Device::Cpu)
            } else {
                image_noise(&mut rng, variation, shape, &Device::Cpu)
            }
            .unwrap()
            .squeeze(0)
            .unwrap();
            let want = noise.get(i).unwrap();
            let d = max_abs_diff(&ours, &want);
            eprintln!("{label} image {i}: max |ours - A1111| = {d:e}");
            // torch's CPU normals to ~2e-6 (libm's log/sin/cos against torch's), a variation's
            // float32 slerp a few ulps more (as tests/integration/variation.rs).
            assert!(d < 2e-5, "{label} image {i}: {d}");
            let after = rng
                .randn_tensor(&[shape.0, shape.1, shape.2][..], &Device::Cpu, DType::F32)
                .unwrap();
            let d = max_abs_diff(&after, &next.get(i).unwrap());
            assert!(d < 2e-5, "{label} next {i}: {d}");
        }
    }
}

fn image_case_params(case: &serde_json::Value) -> GenerationParams {
    let from = case["seed_resize_from"].as_array().unwrap();
    let side = |i: usize| from[i].as_u64().unwrap() as usize;
    GenerationParams {
        batch_size: case["batch_size"].as_u64().unwrap() as usize,
        seed_resize_from: Some(SeedResize {
            width: side(0),
            height: side(1),
        }),
        variation: case["variation_seed"].as_u64().map(|seed| Variation {
            seed,
            strength: case["variation_strength"].as_f64().unwrap(),
        }),
        init_image: case["init_image"].as_str().map(|init| InitImage {
            image: read_png(init),
            mask: case["mask_image"].as_str().map(read_png),
            strength: case["strength"].as_f64().unwrap(),
        }),
        ..request_params(case)
    }
}

#[test]
fn seed_resize_images_match_diffusers_with_a1111_noise() {
    let fixtures = Fixtures::load("seed-resize-images");
    let cases = fixtures.meta["cases"].as_object().unwrap();
    assert_eq!(cases.len(), 7);
    let (failures, images) = image_case_failures(cases, image_case_params, |label| {
        fixtures.get(&format!("image.{label}")).clone()
    });
    assert_eq!(images, 11);
    assert!(
        failures.is_empty(),
        "seed resize images differ from the reference: {failures:?}"
    );
}

/// Without the resize the same requests are far from the references (the test above cannot
/// pass on the plain noise), and a "from" size equal to the image's changes nothing (A1111:
/// the noise shape is the image's).
#[test]
fn seed_resize_changes_the_image_unless_the_size_is_the_same() {
    let fixtures = Fixtures::load("seed-resize-images");
    for label in ["tiny-a.txt2img.euler", "tiny-a.img2img.euler.0.75"] {
        let case = &fixtures.meta["cases"][label];
        let model = StableDiffusion::load(
            &fixture_path(case["model"].as_str().unwrap()),
            &Device::Cpu,
            DType::F32,
        )
        .unwrap();
        let run = |p: &GenerationParams| {
            model
                .generate(p, &mut |_| std::ops::ControlFlow::Continue(()))
                .unwrap()
                .remove(0)
        };
        let params = image_case_params(case);
        let want = fixtures.get(&format!("image.{label}")).get(0).unwrap();
        let want = want.flatten_all().unwrap().to_vec1::<u8>().unwrap();
        let plain = run(&GenerationParams {
            seed_resize_from: None,
            ..params.clone()
        });
        let (plain_mean, _) = pixel_difference(&plain.pixels, &want);
        eprintln!("{label}: without the resize, mean abs diff {plain_mean:.3}");
        assert!(plain_mean > 4.0, "{label}: the resize changed little");
        let same = run(&GenerationParams {
            seed_resize_from: Some(SeedResize {
                width: params.width,
                height: params.height,
            }),
            ..params.clone()
        });
        assert_eq!(same, plain, "{label}: resizing from the image's own size");
    }
}

/// The hires pass resizes its own noise from the same size (A1111 builds the same `ImageRNG`
/// at the pass's size): with the first pass's own size as the "from" size, the first pass is
/// unchanged but the hires image is not, through either way of upscaling.
#[test]
fn the_hires_pass_resizes_its_noise_too() {
    use sdserve_pipeline::interpolate::{Interpolation, InterpolationMode};
    use sdserve_pipeline::pipeline::{Hires, Upscaler};
    use sdserve_pipeline::schedulers::SchedulerKind;

    let model = StableDiffusion::load(&fixture_path("tiny-a"), &Device::Cpu, DType::F32).unwrap();
    let run = |p: &GenerationParams| {
        model
            .generate(p, &mut |_| std::ops::ControlFlow::Continue(()))
            .unwrap()
    };
    let first = GenerationParams {
        prompt: "a lighthouse".into(),
        steps: 3,
        width: 32,
        height: 32,
        seed: 5,
        guidance_scale: 6.0,
        scheduler: Some(SchedulerKind::Euler),
        batch_size: 2,
        ..Default::default()
    };
    let own_size = Some(SeedResize {
        width: 32,
        height: 32,
    });
    let resized = |p: &GenerationParams| GenerationParams {
        seed_resize_from: own_size,
        ..p.clone()
    };
    assert_eq!(run(&resized(&first)), run(&first), "the first pass alone");
    let latent = Upscaler::Latent(Interpolation {
        mode: InterpolationMode::Bilinear,
        antialias: false,
    });
    for upscaler in [latent, Upscaler::Resize] {
        let hires = GenerationParams {
            hires: Some(Hires {
                width: 64,
                height: 48,
                upscale_width: 64,
                upscale_height: 48,
                upscaler: upscaler.clone(),
                // All of the pass's schedule: its noise counts most (at 0.6, one step at a
                // low sigma, the images differ by 0.04 on 255).
                steps: 3,
                strength: 1.0,
                scheduler: None,
                schedule: None,
                prompt: None,
                negative_prompt: None,
            }),
            ..first.clone()
        };
        let (plain, with) = (run(&hires), run(&resized(&hires)));
        for (i, (a, b)) in plain.iter().zip(&with).enumerate() {
            let (mean, _) = pixel_difference(&a.pixels, &b.pixels);
            eprintln!(
                "{upscaler:?} image {i}: hires with the resize vs without: mean abs diff {mean:.3}"
            );
            assert!(
                mean > 1.0,
                "{upscaler:?} image {i}: the hires pass ignored the resize"
            );
        }
    }
}
